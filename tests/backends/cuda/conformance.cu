// SPDX-License-Identifier: MIT
// The conformance sweep on the CUDA backend: the whole layer's forward and backward on device
// memory against the reference backend on the host, for float, double, __half and bfloat16
// data, and bitwise repeatability. With no CUDA device every case reports "skipped".
#include "bkn/backends/cuda.hpp"

#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../conformance.hpp"
#include "support.hpp"

namespace {

using bkn::index_t;
using conformance::layer_case;

// ---- storage types on the host: __half and bfloat16 go through float ----

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}
template <class T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, __half>) return double(__half2float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return double(__bfloat162float(v));
  else return double(v);
}

/// Everything run_layer draws, drawn once, so a device run and a reference run see the same
/// inputs. `Round` is the device's storage type: x and dy are rounded to it first, so a
/// reference in float sees exactly the values a __half run reads.
template <class P>
struct layer_inputs {
  layer_case c;
  bkn::options opt;
  index_t cin = 0;
  std::unique_ptr<bkn::layer_storage<P>> storage;
  conformance::prior_buffers<P> prior;
  std::vector<double> x, dy;  // (n, c, pixel) order
};

template <class P, class Round>
layer_inputs<P> draw(const layer_case& c, std::uint32_t seed) {
  // run_layer's draws, in its order.
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  layer_inputs<P> in;
  in.c = c;
  const index_t G = c.batch / c.group_size;
  in.cin = c.transition == bkn::transition_kind::dense ? c.channels + 2 : c.channels;
  in.opt.mode = c.mode;
  in.opt.group_size = c.group_size;
  in.opt.training = c.training;
  in.opt.inference = bkn::inference_statistics::chain;
  bkn::layer_config cfg;
  cfg.channels = c.channels;
  cfg.groups = G;
  cfg.mode = c.mode;
  cfg.transition = c.transition;
  cfg.in_channels = in.cin;
  cfg.per_channel_gain = c.per_channel_gain;
  in.storage = std::make_unique<bkn::layer_storage<P>>(cfg);
  bkn::layer_storage<P>& s = *in.storage;
  for (auto& v : s.gamma) v = P(1 + 0.2 * normal(rng));
  for (auto& v : s.beta) v = P(normal(rng));
  for (auto& v : s.gain_logit) v = P(normal(rng));
  for (auto& v : s.transition_weights) v = P(0.5 + 0.2 * normal(rng));
  for (auto& v : s.noise) v = P(normal(rng) - 2);
  for (auto& v : s.running_var) v = P(1 + std::abs(normal(rng)));
  for (auto& v : s.dposterior_mean) v = P(0.1 * normal(rng));
  for (auto& v : s.dposterior_cov) v = P(0.1 * normal(rng));
  if (c.prior) {
    in.prior.groups = G;
    in.prior.channels = in.cin;
    const index_t cov = bkn::covariance_elements(in.cin, c.mode);
    in.prior.mean.resize(std::size_t(G * in.cin));
    in.prior.cov.assign(std::size_t(G * cov), P(0));
    in.prior.dmean.assign(in.prior.mean.size(), P(0));
    in.prior.dcov.assign(in.prior.cov.size(), P(0));
    for (auto& v : in.prior.mean) v = P(normal(rng));
    for (index_t g = 0; g < G; ++g)
      for (index_t i = 0; i < in.cin; ++i) {
        const double var = 0.5 + std::abs(normal(rng));
        if (c.mode == bkn::covariance::diagonal) in.prior.cov[std::size_t(g * in.cin + i)] = P(var);
        else in.prior.cov[std::size_t((g * in.cin + i) * in.cin + i)] = P(var);
      }
  }
  for (index_t n = 0; n < c.batch; ++n)
    for (index_t ch = 0; ch < c.channels; ++ch)
      for (index_t k = 0; k < c.height * c.width; ++k) {
        in.x.push_back(to_double(from_double<Round>(3 + 2 * normal(rng) + 0.1 * double(ch))));
        in.dy.push_back(to_double(from_double<Round>(normal(rng))));
      }
  return in;
}

/// A run's outputs, widened to double for comparison.
struct outputs {
  std::vector<double> y, dx;
  std::vector<std::vector<double>> per_channel;
};

template <class T>
void fill(conformance::tensor<T>& t, const std::vector<double>& values) {
  std::size_t i = 0;
  const bkn::tensor_shape& s = t.view.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t ch = 0; ch < s.channels; ++ch)
      for (index_t k = 0; k < s.spatial(); ++k) t.view.at(n, ch, k) = from_double<T>(values[i++]);
}

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = to_double(v[i]);
  return r;
}

/// The per-channel arrays run_layer reports, in its order.
template <class P>
std::vector<std::vector<P>*> reported(layer_inputs<P>& in) {
  bkn::layer_storage<P>& s = *in.storage;
  std::vector<std::vector<P>*> r = {&s.observed_mean, &s.observed_cov, &s.posterior_mean,
                                    &s.posterior_cov, &s.running_mean, &s.running_var,
                                    &s.dgamma,        &s.dbeta};
  if (in.c.prior)
    for (auto* v : {&s.predicted_mean, &s.predicted_cov, &s.dgain_logit, &s.dtransition_weights,
                    &s.dnoise, &in.prior.dmean, &in.prior.dcov})
      r.push_back(v);
  return r;
}

/// The whole layer on the reference backend, in host memory, with element type H.
template <class H, class P>
outputs run_reference(layer_inputs<P> in) {
  const layer_case& c = in.c;
  conformance::tensor<H> x(c, H(0)), y(c, H(-7)), dy(c, H(0)), dx(c, H(-7));
  fill(x, in.x);
  fill(dy, in.dy);
  const bkn::reference_backend backend{};
  bkn::host_workspace ws(bkn::workspace_size(backend, in.opt, x.view.shape(), in.cin));
  const bkn::layer<P> L = in.storage->view();
  bkn::forward(backend, in.opt, L, x.cview(), y.view, in.prior.view(), ws.bytes());
  bkn::backward(backend, in.opt, L, x.cview(), dy.cview(), dx.view, in.prior.view(),
                in.prior.gradient(), ws.bytes());
  outputs r{widen(y.memory), widen(dx.memory), {}};
  for (auto* v : reported(in)) r.per_channel.push_back(widen(*v));
  return r;
}

/// A host tensor's device copy, with the same shape, strides and offset into its memory.
template <class T>
struct device_tensor {
  cuda_test::device_vector<T> memory;
  bkn::tensor_view<T> view;
  explicit device_tensor(const conformance::tensor<T>& host)
      : memory(host.memory),
        view(memory.data() + (host.view.data() - host.memory.data()), host.view.shape(),
             host.view.strides()) {}
};

/// The whole layer on cuda_backend: every array mirrored to device memory, run on a stream,
/// copied back. Mirrors conformance::run_layer.
template <class T, class P>
outputs run_cuda(cudaStream_t stream, layer_inputs<P> in) {
  const layer_case& c = in.c;
  const index_t G = c.batch / c.group_size, C = c.channels;
  conformance::tensor<T> hx(c, from_double<T>(0)), hy(c, from_double<T>(-7)),
      hdy(c, from_double<T>(0)), hdx(c, from_double<T>(-7));
  fill(hx, in.x);
  fill(hdy, in.dy);
  device_tensor<T> x(hx), y(hy), dy(hdy), dx(hdx);

  bkn::layer_storage<P>& s = *in.storage;
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
  bkn::transition<P> A = bkn::transition<P>::identity();
  if (c.transition == bkn::transition_kind::diagonal)
    A = bkn::transition<P>::diagonal(cat(s.transition_weights));
  else if (c.transition == bkn::transition_kind::dense)
    A = bkn::transition<P>::dense(cat(s.transition_weights), in.cin);
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

  const bkn::cuda_backend backend{stream};
  const std::size_t bytes = bkn::workspace_size(backend, in.opt, x.view.shape(), in.cin);
  cuda_test::device_vector<std::byte> ws(bytes);  // cudaMalloc: 256-byte aligned
  const bkn::span<std::byte> workspace(ws.data(), index_t(bytes));
  bkn::forward(backend, in.opt, L, bkn::tensor_view<const T>(x.view), y.view, prior, workspace);
  bkn::backward(backend, in.opt, L, bkn::tensor_view<const T>(x.view),
                bkn::tensor_view<const T>(dy.view), dx.view, prior, dprior, workspace);
  BKN_CUDA_CHECK(cudaStreamSynchronize(stream));

  for (std::size_t i = 0; i < arrays.size(); ++i) *arrays[i] = d[i].to_host();
  outputs r{widen(y.memory.to_host()), widen(dx.memory.to_host()), {}};
  for (auto* v : reported(in)) r.per_channel.push_back(widen(*v));
  return r;
}

/// The device's storage type T, the per-channel type P and the reference's element type.
template <class T, class P>
struct precision {
  using host = std::conditional_t<std::is_same_v<T, double>, double, float>;
};

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

template <class T>
void check_against_reference(std::size_t count) {
  using P = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using H = typename precision<T, P>::host;
  MESSAGE("device: " << cuda_test::device_name());
  cudaStream_t stream = nullptr;
  BKN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const layer_case& c : conformance::sweep(count)) {
    const std::string name = conformance::describe(c);
    CAPTURE(name);
    const outputs got = run_cuda<T, P>(stream, draw<P, T>(c, 11));
    const outputs want = run_reference<H, P>(draw<P, T>(c, 11));
    const double tol = tolerance<T>();
    CHECK(conformance::relative_error(got.y, want.y) <= tol);
    CHECK(conformance::relative_error(got.dx, want.dx) <= tol);
    REQUIRE(got.per_channel.size() == want.per_channel.size());
    for (std::size_t k = 0; k < got.per_channel.size(); ++k) {
      CAPTURE(k);
      CHECK(conformance::relative_error(got.per_channel[k], want.per_channel[k]) <= tol);
    }
  }
  BKN_CUDA_CHECK(cudaStreamDestroy(stream));
}

template <class T>
void check_deterministic(std::size_t count) {
  using P = std::conditional_t<std::is_same_v<T, double>, double, float>;
  cudaStream_t stream = nullptr;
  BKN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const layer_case& c : conformance::sweep(count)) {
    const std::string name = conformance::describe(c);
    CAPTURE(name);
    const outputs a = run_cuda<T, P>(stream, draw<P, T>(c, 5));
    const outputs b = run_cuda<T, P>(stream, draw<P, T>(c, 5));
    // Compared as doubles widened exactly from T: equal doubles are equal bits of T, but for
    // -0.0 vs 0.0, which the reductions here cannot tell apart anyway.
    CHECK(a.y == b.y);
    CHECK(a.dx == b.dx);
    CHECK(a.per_channel == b.per_channel);
  }
  BKN_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE_TEMPLATE("cuda backend: whole layer agrees with the reference", T, float, double) {
  BKN_REQUIRE_CUDA_DEVICE();
  check_against_reference<T>(200);
}

TEST_CASE_TEMPLATE("cuda backend: 16-bit storage agrees with the reference in float", T, __half,
                   __nv_bfloat16) {
  BKN_REQUIRE_CUDA_DEVICE();
  check_against_reference<T>(100);
}

TEST_CASE_TEMPLATE("cuda backend: repeated runs are bitwise identical", T, float, double, __half) {
  BKN_REQUIRE_CUDA_DEVICE();
  check_deterministic<T>(60);
}
