// SPDX-License-Identifier: MIT
// The conformance sweep on the CUDA backend: the whole layer's forward and backward on device
// memory against the reference backend on the host, for float, double, __half and bfloat16
// data, with and without a cuBLAS handle, and bitwise repeatability. With no CUDA device every
// case reports "skipped".
#include "bkn/backends/cuda.hpp"

#include <string>
#include <type_traits>
#include <vector>

#include "../conformance.hpp"
#include "support.hpp"

namespace {

using bkn::index_t;
using conformance::layer_case;
using cuda_test::wide_t;
using result = conformance::run_result<double, double>;

/// x and dy rounded to the device's storage type first, so that a reference in float reads
/// exactly the values a __half run reads.
template <class T>
struct rounded_to {
  double operator()(double v) const { return conformance::to_double(T(v)); }
};

template <class T>
conformance::layer_inputs<wide_t<T>> inputs(const layer_case& c, std::uint32_t seed) {
  return conformance::draw<wide_t<T>>(c, seed, rounded_to<T>{});
}

/// The whole layer on cuda_backend: every array mirrored to device memory, run on the
/// backend's stream, copied back. The device counterpart of conformance::run_layer.
template <class T, class P>
result run_cuda(const bkn::cuda_backend& backend, conformance::layer_inputs<P> in) {
  const layer_case& c = in.c;
  const index_t G = c.batch / c.group_size, C = c.channels;
  conformance::tensor<T> hx(c, T(0.0)), hy(c, T(-7.0)), hdy(c, T(0.0)), hdx(c, T(-7.0));
  conformance::fill(hx, in.x);
  conformance::fill(hdy, in.dy);
  cuda_test::mirrored_tensor<T> x(hx.memory, hx.view), y(hy.memory, hy.view),
      dy(hdy.memory, hdy.view), dx(hdx.memory, hdx.view);

  bkn::layer_storage<P>& s = in.storage;
  std::vector<std::vector<P>*> arrays = {
      &s.gamma,          &s.beta,          &s.gain_logit,     &s.transition_weights,
      &s.transition_bias, &s.noise,        &s.dgamma,         &s.dbeta,
      &s.dgain_logit,    &s.dtransition_weights, &s.dtransition_bias, &s.dnoise,
      &s.running_mean,   &s.running_var,   &s.running_skipped, &s.observed_mean,
      &s.observed_cov,   &s.predicted_mean, &s.predicted_cov, &s.posterior_mean,
      &s.posterior_cov,  &s.dposterior_mean, &s.dposterior_cov, &in.prior.mean,
      &in.prior.cov,     &in.prior.dmean,  &in.prior.dcov};
  std::vector<cuda_test::device_vector<P>> d;
  for (auto* v : arrays) d.emplace_back(*v);
  const auto at = [&](std::vector<P>& v) -> bkn::span<P> {
    for (std::size_t i = 0; i < arrays.size(); ++i)
      if (arrays[i] == &v) return {d[i].data(), index_t(v.size())};
    FAIL("no device copy");
    return {};
  };
  const auto cat = [&](std::vector<P>& v) { return bkn::span<const P>(at(v)); };

  bkn::layer<P> L;
  // The host's transition (kind, geometry, activation) on the device copies of its arrays.
  bkn::transition<P> A = s.view().params.transition;
  A.weights = cat(s.transition_weights);
  A.bias = cat(s.transition_bias);
  L.params = {cat(s.gamma), cat(s.beta), cat(s.gain_logit), A, cat(s.noise)};
  L.grads = {at(s.dgamma), at(s.dbeta), at(s.dgain_logit), at(s.dnoise),
             at(s.dtransition_weights), at(s.dtransition_bias)};
  L.running = {at(s.running_mean), at(s.running_var), at(s.running_skipped)};
  // Named constructors, not braces: nvcc's front end reports G and C as unused (#177-D) when
  // they only appear in a braced assignment.
  using gaussian = bkn::gaussian_view<P>;
  L.state.observed = gaussian(at(s.observed_mean), at(s.observed_cov), G, C);
  L.state.predicted = gaussian(at(s.predicted_mean), at(s.predicted_cov), G, C);
  L.state.posterior = gaussian(at(s.posterior_mean), at(s.posterior_cov), G, C);
  L.state.dposterior = gaussian(at(s.dposterior_mean), at(s.dposterior_cov), G, C);
  bkn::gaussian_view<const P> prior;
  bkn::gaussian_view<P> dprior;
  if (c.prior) {
    prior = bkn::gaussian_view<P>(at(in.prior.mean), at(in.prior.cov), in.prior.groups,
                                  in.prior.channels);
    dprior = bkn::gaussian_view<P>(at(in.prior.dmean), at(in.prior.dcov), in.prior.groups,
                                   in.prior.channels);
  }

  const std::size_t bytes = bkn::workspace_size(backend, in.opt, x.view.shape(), A);
  cuda_test::device_vector<std::byte> ws(bytes);  // cudaMalloc: 256-byte aligned
  const bkn::span<std::byte> workspace(ws.data(), index_t(bytes));
  bkn::forward(backend, in.opt, L, x.cview(), y.view, prior, workspace);
  bkn::backward(backend, in.opt, L, x.cview(), dy.cview(), dx.view, prior, dprior, workspace);
  BKN_CUDA_CHECK(cudaStreamSynchronize(backend.stream));

  for (std::size_t i = 0; i < arrays.size(); ++i) *arrays[i] = d[i].to_host();
  result r{conformance::to_double(y.memory.to_host()), conformance::to_double(dx.memory.to_host()),
           {}};
  for (auto* v : conformance::reported(in)) r.per_channel.push_back(conformance::to_double(*v));
  return r;
}

/// Tolerances relative to each output's largest magnitude: as conformance.hpp for float and
/// double; for 16-bit storage, a few roundings of y and dx to the type's epsilon (2^-11 for
/// __half, 2^-8 for bfloat16) on top of float accumulation.
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-10;
  else if constexpr (std::is_same_v<T, float>) return 2e-4;
  else if constexpr (std::is_same_v<T, __half>) return 4e-3;
  else return 3e-2;
}

/// The sweep on `backend` against the reference in wide_t<T> on the same (rounded) inputs.
template <class T>
void check_against_reference(const bkn::cuda_backend& backend, std::size_t count) {
  using P = wide_t<T>;
  MESSAGE("device: " << cuda_test::device_name()
                     << (backend.blas != nullptr ? ", covariance through cuBLAS" : ""));
  for (const layer_case& c : conformance::sweep(count)) {
    const std::string name = conformance::describe(c);
    CAPTURE(name);
    conformance::check_close(
        run_cuda<T, P>(backend, inputs<T>(c, 11)),
        conformance::widened(conformance::run_layer<bkn::reference_backend, wide_t<T>, P>(
            {}, inputs<T>(c, 11))),
        tolerance<T>());
  }
}

template <class T>
void check_deterministic(const bkn::cuda_backend& backend, std::size_t count) {
  using P = wide_t<T>;
  for (const layer_case& c : conformance::sweep(count)) {
    const std::string name = conformance::describe(c);
    CAPTURE(name);
    // Compared as doubles widened exactly from T: equal doubles are equal bits of T, but for
    // -0.0 vs 0.0, which the reductions here cannot tell apart anyway.
    conformance::check_identical(run_cuda<T, P>(backend, inputs<T>(c, 5)),
                                 run_cuda<T, P>(backend, inputs<T>(c, 5)));
  }
}

/// Sweep cases per element type: fewer for 16-bit storage, whose reference runs in float.
template <class T>
std::size_t sweep_cases() {
  return sizeof(T) == 2 ? 100 : 200;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda backend: whole layer agrees with the reference", T, float, double) {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  check_against_reference<T>(bkn::cuda_backend{stream}, sweep_cases<T>());
}

TEST_CASE_TEMPLATE("cuda backend: 16-bit storage agrees with the reference in float", T, __half,
                   __nv_bfloat16) {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  check_against_reference<T>(bkn::cuda_backend{stream}, sweep_cases<T>());
}

// The sweep's full-covariance cases (a third of those with C <= 16) take the cuBLAS path; the
// others check that a handle changes nothing else.
TEST_CASE_TEMPLATE("cuda backend: whole layer with a cuBLAS handle agrees with the reference", T,
                   float, double, __half, __nv_bfloat16) {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  const cuda_test::blas_handle blas(stream);
  check_against_reference<T>(bkn::cuda_backend{stream, blas}, sweep_cases<T>());
}

TEST_CASE_TEMPLATE("cuda backend: repeated runs are bitwise identical", T, float, double, __half) {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  check_deterministic<T>(bkn::cuda_backend{stream}, 60);
  const cuda_test::blas_handle blas(stream);
  check_deterministic<T>(bkn::cuda_backend{stream, blas}, 60);
}
