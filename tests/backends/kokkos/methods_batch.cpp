// SPDX-License-Identifier: MIT
// batch_norm, batch_renorm and memorized_batch_norm on the Kokkos backend (Serial; OpenMP when
// Kokkos has it) against the reference backend, and OpenMP bitwise equal to Serial.
#include <algorithm>
#include <cstring>

#include "../methods_batch.hpp"
#include "bkn/backends/kokkos.hpp"
#include "support.hpp"

#ifdef KOKKOS_ENABLE_SERIAL
using serial_backend = bkn::kokkos_backend<Kokkos::Serial>;
#endif
#ifdef KOKKOS_ENABLE_OPENMP
using openmp_backend = bkn::kokkos_backend<Kokkos::OpenMP>;
#endif

TEST_CASE_TEMPLATE("kokkos backend (Serial): batch-statistics methods agree with the reference", T,
                   float, double) {
#ifdef KOKKOS_ENABLE_SERIAL
  methods_batch::check_against_reference<T>(serial_backend{}, 60);
#else
  MESSAGE("skipped: this Kokkos has no Serial execution space");
#endif
}

TEST_CASE_TEMPLATE("kokkos backend (OpenMP): batch-statistics methods agree with the reference", T,
                   float, double) {
#ifdef KOKKOS_ENABLE_OPENMP
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads");
  methods_batch::check_against_reference<T>(openmp_backend{}, 60);
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space");
#endif
}

// The Kokkos backend's results depend on the shape alone (docs/reliability.md); the methods add
// only per-channel functors, so OpenMP, on any number of threads, must give Serial's bits.
TEST_CASE_TEMPLATE("kokkos backend: batch-statistics methods on OpenMP give the bits of Serial", T,
                   float, double) {
#if defined(KOKKOS_ENABLE_OPENMP) && defined(KOKKOS_ENABLE_SERIAL)
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads, vs Serial");
  for (const conformance::layer_case& c : methods_batch::sweep(40)) {
    CAPTURE(methods_batch::describe_shape(c));
    const auto got = methods_batch::run<openmp_backend, T>(openmp_backend{}, c, 5);
    const auto want = methods_batch::run<serial_backend, T>(serial_backend{}, c, 5);
    REQUIRE(got.size() == want.size());
    for (std::size_t k = 0; k < got.size(); ++k) {
      CAPTURE(want[k].what);
      const auto& a = got[k].values;
      const auto& b = want[k].values;
      // memcmp, not ==: the same bits, -0.0 and NaN included.
      CHECK((a.size() == b.size() &&
             (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0)));
    }
  }
#else
  MESSAGE("skipped: this Kokkos lacks the OpenMP or the Serial execution space");
#endif
}

// The methods add host-side checks and per-channel functors to the passes; none allocates.
TEST_CASE("kokkos backend (Serial): batch-statistics methods allocate nothing") {
#ifdef KOKKOS_ENABLE_SERIAL
  namespace bn = bkn::batch_norm;
  namespace brn = bkn::batch_renorm;
  namespace mbn = bkn::memorized_batch_norm;
  using T = float;
  const serial_backend b{};
  conformance::layer_case c{};
  c.batch = 4;
  c.channels = 3;
  c.height = 5;
  c.width = 3;
  c.group_size = 2;
  c.storage = conformance::layout::nhwc;
  std::mt19937 rng(1);
  conformance::tensor<T> x(c, T(1)), y(c, T(0)), dy(c, T(0)), dx(c, T(0));
  for (std::size_t i = 0; i < x.memory.size(); ++i) x.memory[i] = T(i % 7);
  methods_batch::arrays<T> a(c, 3, rng);
  const bkn::tensor_shape shape{4, 3, 5, 3};
  bn::options bn_opt;
  brn::options brn_opt;
  mbn::options mbn_opt;
  bn_opt.group_size = brn_opt.group_size = mbn_opt.group_size = 2;
  bkn::host_workspace ws(
      std::max({bn::workspace_size(b, bn_opt, shape), brn::workspace_size(b, brn_opt, shape),
                mbn::workspace_size(b, mbn_opt, shape)}));
  bn::layer<T> bn_layer;
  bn_layer.params = {a.gamma, a.beta};
  bn_layer.grads = {a.dgamma, a.dbeta};
  bn_layer.running = {a.running_mean, a.running_var, {}};
  bn_layer.saved = {a.mean, a.var};
  brn::layer<T> brn_layer;
  brn_layer.params = bn_layer.params;
  brn_layer.grads = bn_layer.grads;
  brn_layer.running = bn_layer.running;
  brn_layer.saved = {a.mean, a.var, a.r, a.d};
  mbn::layer<T> mbn_layer;
  mbn_layer.params = bn_layer.params;
  mbn_layer.grads = bn_layer.grads;
  mbn_layer.running = bn_layer.running;
  mbn_layer.memory = {a.memory_mean, a.memory_var, a.memory_count, a.newest, 3, 2, 3};
  mbn_layer.saved = {a.mean, a.var, a.batch_mean, a.batch_var, a.share};
  const long before = kokkos_test::allocations();
  for (bool training : {true, false}) {
    bn_opt.training = brn_opt.training = mbn_opt.training = training;
    bn::forward(b, bn_opt, bn_layer, x.cview(), y.view, ws.bytes());
    bn::backward(b, bn_opt, bn_layer, x.cview(), dy.cview(), dx.view, ws.bytes());
    brn::forward(b, brn_opt, brn_layer, x.cview(), y.view, ws.bytes());
    brn::backward(b, brn_opt, brn_layer, x.cview(), dy.cview(), dx.view, ws.bytes());
    mbn::forward(b, mbn_opt, mbn_layer, x.cview(), y.view, ws.bytes());
    mbn::backward(b, mbn_opt, mbn_layer, x.cview(), dy.cview(), dx.view, ws.bytes());
  }
  mbn::reset(b, mbn_layer.memory);
  b.space.fence();
  CHECK(kokkos_test::allocations() - before == 0);
#else
  MESSAGE("skipped: this Kokkos has no Serial execution space");
#endif
}
