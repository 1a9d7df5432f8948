// SPDX-License-Identifier: MIT
// The backend conformance suite: a whole layer's forward and backward on a backend against the
// reference backend, over shapes, layouts, groups, modes and transitions. Written once.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"
#include "support/host_tensor.hpp"

namespace conformance {

using bkn::index_t;

using bkn_test::layout;
using bkn_test::layout_name;

struct layer_case {
  index_t batch, channels, height, width, group_size;
  layout storage;
  bkn::covariance mode;
  bkn::transition_kind transition;
  bool prior;  // false: batch normalization (q = 1)
  bool per_channel_gain;
  bool training;
};

/// A tensor in one layout, with room for the padded strides of the `strided` layout, filled
/// outside the view with a sentinel so writes outside it are caught.
template <class T>
struct tensor {
  std::vector<T> memory;
  bkn::tensor_view<T> view;

  tensor(const layer_case& c, T sentinel) {
    const index_t N = c.batch, C = c.channels, H = c.height, W = c.width;
    switch (c.storage) {
      case layout::nc:
      case layout::nchw:
        memory.assign(std::size_t(N * C * H * W), sentinel);
        view = bkn::nchw(memory.data(), N, C, H, W);
        break;
      case layout::nhwc:
        memory.assign(std::size_t(N * C * H * W), sentinel);
        view = bkn::nhwc(memory.data(), N, C, H, W);
        break;
      case layout::strided: {
        // A channels-first view inside a larger tensor: every axis padded.
        const bkn::tensor_strides s{(C + 1) * (H + 1) * (W + 2), (H + 1) * (W + 2), W + 2, 1};
        memory.assign(std::size_t(N * s.batch + 3), sentinel);
        view = bkn::strided(memory.data() + 1, {N, C, H, W}, s);
        break;
      }
    }
  }
  bkn::tensor_view<const T> cview() const { return view; }
};

template <class P>
struct prior_buffers {
  std::vector<P> mean, cov, dmean, dcov;
  index_t groups = 0, channels = 0;
  bkn::gaussian_view<const P> view() const {
    return {{mean.data(), index_t(mean.size())}, {cov.data(), index_t(cov.size())}, groups, channels};
  }
  bkn::gaussian_view<P> gradient() {
    return {{dmean.data(), index_t(dmean.size())}, {dcov.data(), index_t(dcov.size())}, groups, channels};
  }
};

/// Everything one run produces, flattened for comparison.
template <class T, class P>
struct run_result {
  std::vector<T> y, dx;
  std::vector<std::vector<P>> per_channel;  // states, running stats, gradients, d(prior)
};

/// Everything one case draws (parameters, states, prior, x and dy), drawn once so that two runs
/// (two backends, or host and device memory) can see the same inputs.
template <class P>
struct layer_inputs {
  layer_case c;
  bkn::options opt;
  index_t in_channels;
  bkn::layer_storage<P> storage;
  prior_buffers<P> prior;
  std::vector<double> x, dy;  // (n, c, pixel) order
};

/// The host layer of a weights transition, giving the case's H x W: a linear layer on 1x1, and
/// convolutions whose taps cover a vector of taps and a remainder (3x3, 5x5), exactly one
/// vector (4x2) or less (2x2), with and without padding.
inline bkn::conv2d_geometry host_geometry(const layer_case& c) {
  const index_t H = c.height, W = c.width;
  if (H * W == 1) return {};
  const bool odd = c.batch % 2 == 1;
  if (H == 7 && W == 7) return odd ? bkn::conv2d_geometry{7, 7, 3, 3, 1, 1, 1, 1}
                                   : bkn::conv2d_geometry{7, 7, 5, 5, 1, 1, 2, 2};
  if (H == 5 && W == 3) return odd ? bkn::conv2d_geometry{8, 4, 4, 2, 1, 1, 0, 0}
                                   : bkn::conv2d_geometry{6, 4, 2, 2, 1, 1, 0, 0};
  bkn::conv2d_geometry same{H, W, 3, 3, 1, 1, 1, 1};
  return same;
}

/// Leaves a drawn value as it is; a backend with narrower storage passes its own rounding.
struct exact {
  double operator()(double v) const { return v; }
};

/// A case's inputs from `seed`; each x and dy value goes through `round` (e.g. to the values a
/// 16-bit storage type can hold, so that a reference in float reads exactly the same numbers).
template <class P, class Round = exact>
layer_inputs<P> draw(const layer_case& c, std::uint32_t seed, Round round = {}) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  const index_t G = c.batch / c.group_size;
  const bool through_weights = c.transition == bkn::transition_kind::weights;
  const index_t Cin =
      c.transition == bkn::transition_kind::dense || through_weights ? c.channels + 2 : c.channels;
  bkn::options opt;
  opt.mode = c.mode;
  opt.group_size = c.group_size;
  opt.training = c.training;
  opt.inference = bkn::inference_statistics::chain;

  bkn::layer_config cfg;
  cfg.channels = c.channels;
  cfg.groups = G;
  cfg.mode = c.mode;
  cfg.transition = c.transition;
  cfg.in_channels = Cin;
  if (through_weights) cfg.conv = host_geometry(c);
  cfg.per_channel_gain = c.per_channel_gain;
  layer_inputs<P> in{c, opt, Cin, bkn::layer_storage<P>(cfg), {}, {}, {}};
  bkn::layer_storage<P>& s = in.storage;
  for (auto& v : s.gamma) v = P(1 + 0.2 * normal(rng));
  for (auto& v : s.beta) v = P(normal(rng));
  for (auto& v : s.gain_logit) v = P(normal(rng));
  for (auto& v : s.transition_weights) v = P(0.5 + 0.2 * normal(rng));
  for (auto& v : s.transition_bias) v = P(0.1 * normal(rng));
  for (auto& v : s.noise) v = P(normal(rng) - 2);
  for (auto& v : s.running_var) v = P(1 + std::abs(normal(rng)));
  for (auto& v : s.dposterior_mean) v = P(0.1 * normal(rng));
  for (auto& v : s.dposterior_cov) v = P(0.1 * normal(rng));

  prior_buffers<P>& prior = in.prior;
  if (c.prior) {
    prior.groups = G;
    prior.channels = Cin;
    const index_t cov = bkn::covariance_elements(Cin, c.mode);
    prior.mean.resize(std::size_t(G * Cin));
    prior.cov.assign(std::size_t(G * cov), P(0));
    prior.dmean.assign(prior.mean.size(), P(0));
    prior.dcov.assign(prior.cov.size(), P(0));
    for (auto& v : prior.mean) v = P(normal(rng));
    for (index_t g = 0; g < G; ++g)
      for (index_t i = 0; i < Cin; ++i) {
        const double var = 0.5 + std::abs(normal(rng));
        if (c.mode == bkn::covariance::diagonal) prior.cov[std::size_t(g * Cin + i)] = P(var);
        else prior.cov[std::size_t((g * Cin + i) * Cin + i)] = P(var);
      }
  }

  for (index_t n = 0; n < c.batch; ++n)
    for (index_t ch = 0; ch < c.channels; ++ch)
      for (index_t k = 0; k < c.height * c.width; ++k) {
        in.x.push_back(round(3 + 2 * normal(rng) + 0.1 * double(ch)));
        in.dy.push_back(round(normal(rng)));
      }
  return in;
}

/// Writes `values` ((n, c, pixel) order) into the view of `t`, converted to T.
template <class T>
void fill(tensor<T>& t, const std::vector<double>& values) {
  std::size_t i = 0;
  const bkn::tensor_shape& s = t.view.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t ch = 0; ch < s.channels; ++ch)
      for (index_t k = 0; k < s.spatial(); ++k) t.view.at(n, ch, k) = T(values[i++]);
}

/// The per-channel arrays a run reports (states, running stats, gradients, d(prior)), in order.
template <class P>
std::vector<std::vector<P>*> reported(layer_inputs<P>& in) {
  bkn::layer_storage<P>& s = in.storage;
  std::vector<std::vector<P>*> r = {&s.observed_mean, &s.observed_cov, &s.posterior_mean,
                                    &s.posterior_cov,  &s.running_mean, &s.running_var,
                                    &s.dgamma,         &s.dbeta};
  if (in.c.prior)
    for (auto* v : {&s.predicted_mean, &s.predicted_cov, &s.dgain_logit, &s.dtransition_weights,
                    &s.dnoise, &in.prior.dmean, &in.prior.dcov})
      r.push_back(v);
  return r;
}

/// A layer's forward and backward on `backend` in host memory, from drawn inputs.
template <class Backend, class T, class P>
run_result<T, P> run_layer(const Backend& backend, layer_inputs<P> in) {
  const layer_case& c = in.c;
  tensor<T> x(c, T(0)), y(c, T(-7)), dy(c, T(0)), dx(c, T(-7));
  fill(x, in.x);
  fill(dy, in.dy);
  const bkn::layer<P> L = in.storage.view();
  bkn::host_workspace ws(bkn::workspace_size(backend, in.opt, x.view.shape(), L.params.transition));
  bkn::forward(backend, in.opt, L, x.cview(), y.view, in.prior.view(), ws.bytes());
  bkn::backward(backend, in.opt, L, x.cview(), dy.cview(), dx.view, in.prior.view(),
                in.prior.gradient(), ws.bytes());

  run_result<T, P> r;
  r.y = y.memory;
  r.dx = dx.memory;
  for (const auto* v : reported(in)) r.per_channel.push_back(*v);
  return r;
}

template <class Backend, class T, class P>
run_result<T, P> run_layer(const Backend& backend, const layer_case& c, std::uint32_t seed) {
  return run_layer<Backend, T, P>(backend, draw<P>(c, seed));
}

/// v as a double; class types (CUDA's __half, __nv_bfloat16) through their conversion to float.
template <class V>
double to_double(V v) {
  if constexpr (std::is_arithmetic_v<V>) return double(v);
  else return double(static_cast<float>(v));
}

template <class V>
std::vector<double> to_double(const std::vector<V>& v) {
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = to_double(v[i]);
  return r;
}

/// A run's outputs widened to double, to compare runs of different element types.
template <class T, class P>
run_result<double, double> widened(const run_result<T, P>& r) {
  run_result<double, double> w{to_double(r.y), to_double(r.dx), {}};
  for (const auto& v : r.per_channel) w.per_channel.push_back(to_double(v));
  return w;
}

/// Max |a - b| / (max |b| + tiny) over a vector: the error relative to the vector's scale.
template <class V>
double relative_error(const std::vector<V>& a, const std::vector<V>& b) {
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, std::abs(double(b[i])));
    err = std::max(err, std::abs(double(a[i]) - double(b[i])));
  }
  return err / (scale + 1e-30);
}

inline std::string describe(const layer_case& c) {
  return std::string(layout_name(c.storage)) + " N=" + std::to_string(c.batch) +
         " C=" + std::to_string(c.channels) + " HxW=" + std::to_string(c.height) + "x" +
         std::to_string(c.width) + " group=" + std::to_string(c.group_size) +
         (c.mode == bkn::covariance::full ? " full" : " diag") +
         " transition=" + std::to_string(int(c.transition)) + (c.prior ? " prior" : " BN") +
         (c.per_channel_gain ? " per-channel-gain" : "") + (c.training ? " train" : " infer");
}

/// The sweep of issue #2: N in {1,2,3,8,32}, C in {1,3,16,64}, HxW in {1x1, 7x7, 5x3}, every
/// group size dividing N among {1, 2, N}, four layouts, both modes (full on C <= 16), every
/// transition (the host layer's weights in diagonal mode), with and without a prior. Cases are
/// drawn from the full product with a fixed seed so the suite stays fast while every value of
/// every axis appears.
inline std::vector<layer_case> sweep(std::size_t count) {
  std::vector<layer_case> cases;
  std::mt19937 rng(2024);
  const index_t batches[] = {1, 2, 3, 8, 32}, channels[] = {1, 3, 16, 64};
  const index_t spatial[][2] = {{1, 1}, {7, 7}, {5, 3}};
  const layout layouts[] = {layout::nc, layout::nchw, layout::nhwc, layout::strided};
  const bkn::transition_kind kinds[] = {bkn::transition_kind::identity,
                                        bkn::transition_kind::diagonal,
                                        bkn::transition_kind::dense,
                                        bkn::transition_kind::weights};
  for (std::size_t i = 0; cases.size() < count; ++i) {
    layer_case c{};
    c.batch = batches[i % 5];
    c.channels = channels[(i / 5) % 4];
    c.storage = layouts[(i / 20) % 4];
    const auto& hw = spatial[c.storage == layout::nc ? 0 : (i / 3 + rng()) % 3];
    c.height = hw[0];
    c.width = hw[1];
    const index_t groups[] = {1, 2, c.batch};
    c.group_size = groups[rng() % 3];
    if (c.batch % c.group_size != 0) c.group_size = c.batch;
    c.mode = (rng() % 3 == 0 && c.channels <= 16) ? bkn::covariance::full
                                                    : bkn::covariance::diagonal;
    c.transition = kinds[rng() % 4];
    // Full-covariance mode takes the host's weights only as a linear layer without activation.
    if (c.transition == bkn::transition_kind::weights) c.mode = bkn::covariance::diagonal;
    c.prior = rng() % 4 != 0;
    c.per_channel_gain = c.mode == bkn::covariance::diagonal && rng() % 2 == 0;
    c.training = rng() % 5 != 0;
    // Batch statistics of one value per channel are rejected without a prior (math.md).
    if (c.group_size * c.height * c.width == 1) c.prior = true;
    cases.push_back(c);
  }
  return cases;
}

/// Every output of `got` within `tolerance` of `want`, relative to each output's largest
/// magnitude.
template <class T, class P>
void check_close(const run_result<T, P>& got, const run_result<T, P>& want, double tolerance) {
  CHECK(relative_error(got.y, want.y) <= tolerance);
  CHECK(relative_error(got.dx, want.dx) <= tolerance);
  REQUIRE(got.per_channel.size() == want.per_channel.size());
  for (std::size_t k = 0; k < got.per_channel.size(); ++k) {
    CAPTURE(k);
    CHECK(relative_error(got.per_channel[k], want.per_channel[k]) <= tolerance);
  }
}

template <class T, class P>
void check_identical(const run_result<T, P>& a, const run_result<T, P>& b) {
  CHECK(a.y == b.y);
  CHECK(a.dx == b.dx);
  CHECK(a.per_channel == b.per_channel);
}

/// Runs every case on `backend` and on the reference backend and compares all outputs.
/// Tolerances: double results agree to ~1e-10 relative (different summation orders of up to
/// 32 * 49 terms, then O(C) per-channel algebra); float results to 2e-4 relative to each
/// output's largest magnitude (float rounding of the inputs and of reductions over up to 1568
/// terms, amplified by 1/sigma and by the cancellation in dx = a dy + b x + k).
template <class T, class Backend>
void check_against_reference(const Backend& backend, std::size_t count) {
  using P = T;
  const double tolerance = std::is_same_v<T, double> ? 1e-10 : 2e-4;
  for (const layer_case& c : sweep(count)) {
    const std::string name = describe(c);
    CAPTURE(name);
    check_close(run_layer<Backend, T, P>(backend, c, 11),
                run_layer<bkn::reference_backend, T, P>(bkn::reference_backend{}, c, 11),
                tolerance);
  }
}

/// Runs every case twice on `backend`: results must be bitwise identical.
template <class T, class Backend>
void check_deterministic(const Backend& backend, std::size_t count) {
  for (const layer_case& c : sweep(count)) {
    const std::string name = describe(c);
    CAPTURE(name);
    check_identical(run_layer<Backend, T, T>(backend, c, 5),
                    run_layer<Backend, T, T>(backend, c, 5));
  }
}

/// backward's inference path sums over the whole batch with the workspace sized for the layer's
/// group size: a backend's scratch for a group size must cover every multiple of it.
template <class Backend>
void check_scratch_covers_multiples(const Backend& backend) {
  using K = bkn::kernels<Backend>;
  for (index_t W : {1, 3, 7, 100, 511, 513, 2000})
    for (index_t H : {1, 5, 37})
      for (index_t group_size : {1, 2, 3, 5})
        for (index_t multiple : {1, 2, 3, 8}) {
          const bkn::tensor_shape s{group_size * multiple * 4, 3, H, W};
          for (auto mode : {bkn::covariance::diagonal, bkn::covariance::full})
            REQUIRE(K::scratch_bytes(backend, s, group_size, mode) >=
                    K::scratch_bytes(backend, s, group_size * multiple, mode));
        }
}

}  // namespace conformance
