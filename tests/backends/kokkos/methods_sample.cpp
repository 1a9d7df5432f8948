// SPDX-License-Identifier: MIT
// The per-sample methods (group, layer and instance normalization, filter response
// normalization) on the Kokkos backend (Serial; OpenMP when Kokkos has it) against the reference
// backend: outputs, saved statistics and every gradient over shapes, layouts (strided views
// included), group counts, float and double; OpenMP gives the bits of Serial; no allocation.
// The harness is tests/backends/methods_sample.hpp, shared with the Eigen test.

#include "../methods_sample.hpp"
#include "bkn/backends/kokkos.hpp"
#include "support.hpp"

using namespace methods_sample;

namespace {

template <class T>
using results = std::vector<run_result<T>>;

template <class T, class Backend>
results<T> run_sweep(const Backend& backend, std::size_t count) {
  results<T> r;
  for (const sample_case& c : sweep(count)) r.push_back(run_methods<Backend, T>(backend, c, 7));
  return r;
}

// memcmp, not ==: -0.0 == 0.0, and "the same result" here means the same bits.
template <class V>
bool same_bits(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0);
}

}  // namespace

#ifdef KOKKOS_ENABLE_SERIAL
using serial_backend = bkn::kokkos_backend<Kokkos::Serial>;
#endif
#ifdef KOKKOS_ENABLE_OPENMP
using openmp_backend = bkn::kokkos_backend<Kokkos::OpenMP>;
#endif

TEST_CASE_TEMPLATE("kokkos backend (Serial): the per-sample methods agree with the reference", T,
                   float, double) {
#ifdef KOKKOS_ENABLE_SERIAL
  check_against_reference<T>(serial_backend{}, 200);
#else
  MESSAGE("skipped: this Kokkos has no Serial execution space");
#endif
}

TEST_CASE_TEMPLATE("kokkos backend (OpenMP): the per-sample methods agree with the reference", T,
                   float, double) {
#ifdef KOKKOS_ENABLE_OPENMP
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads");
  check_against_reference<T>(openmp_backend{}, 200);
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space");
#endif
}

TEST_CASE_TEMPLATE("kokkos backend (OpenMP): the per-sample methods are bitwise repeatable", T,
                   float, double) {
#ifdef KOKKOS_ENABLE_OPENMP
  check_deterministic<T>(openmp_backend{}, 60);
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space");
#endif
}

// Serial runs every work item on one thread in index order; OpenMP splits them over its pool.
TEST_CASE_TEMPLATE("kokkos backend: the per-sample methods on OpenMP give the bits of Serial", T,
                   float, double) {
#if defined(KOKKOS_ENABLE_OPENMP) && defined(KOKKOS_ENABLE_SERIAL)
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads, vs Serial");
  const results<T> got = run_sweep<T>(openmp_backend{}, 120);
  const results<T> want = run_sweep<T>(serial_backend{}, 120);
  const std::vector<sample_case> cases = sweep(120);
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const std::string described = describe(cases[i]);
    CAPTURE(described);
    for (std::size_t k = 0; k < got[i].tensors.size(); ++k)
      CHECK(same_bits(got[i].tensors[k], want[i].tensors[k]));
    for (std::size_t k = 0; k < got[i].per_sample.size(); ++k)
      CHECK(same_bits(got[i].per_sample[k], want[i].per_sample[k]));
  }
#else
  MESSAGE("skipped: this Kokkos lacks the OpenMP or the Serial execution space");
#endif
}

// The methods take all their memory from the caller: forward and backward allocate nothing.
TEST_CASE("kokkos backend: the per-sample methods do not allocate") {
  using backend = bkn::kokkos_backend<Kokkos::DefaultHostExecutionSpace>;
  const backend b{};
  for (layout l : {layout::nhwc, layout::padded}) {
    CAPTURE(padded_layout_name(l));
    const index_t N = 4, C = 6, H = 5, W = 7;
    tensor<float> x(l, N, C, H, W, 1.0f), y(l, N, C, H, W, 0.0f), dy(l, N, C, H, W, 0.5f),
        dx(l, N, C, H, W, 0.0f);
    for (index_t k = 0; k < N * C * H * W; ++k)
      x.view.at(k / (C * H * W), k / (H * W) % C, k % (H * W)) = float(k % 11);
    std::vector<float> gamma(C, 1.5f), beta(C, 0.5f), tau(C, 0.25f), eps(1, 0.1f), mean(N * 2),
        var(N * 2), nu2(N * C), dg(C), db(C), dt(C), de(1);
    bkn::group_norm::options gn;
    gn.groups = 2;
    frn::options fo;
    exact_workspace ws(std::max(bkn::group_norm::workspace_size(b, gn, x.view.shape()),
                                frn::workspace_size(b, fo, x.view.shape())));
    const bkn::group_norm::layer<float> G{{gamma, beta}, {dg, db}, {mean, var}};
    const frn::layer<float> F{{gamma, beta, tau, eps}, {dg, db, dt, de}, {nu2}};
    const long before = kokkos_test::allocations();
    bkn::group_norm::forward(b, gn, G, x.cview(), y.view, ws.span_());
    bkn::group_norm::backward(b, gn, G, x.cview(), dy.cview(), dx.view, ws.span_());
    frn::forward(b, fo, F, x.cview(), y.view, ws.span_());
    frn::backward(b, fo, F, x.cview(), dy.cview(), dx.view, ws.span_());
    b.space.fence();
    CHECK(kokkos_test::allocations() - before == 0);
    CHECK(ws.intact());
  }
}
