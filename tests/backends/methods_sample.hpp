// SPDX-License-Identifier: MIT
// The backend-conformance harness of the per-sample methods (group, layer and instance
// normalization, FRN): a sweep of shapes, layouts and groups, run on any backend and compared.
#pragma once

#include <doctest/doctest.h>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/methods/filter_response_norm.hpp"
#include "bkn/methods/group_norm.hpp"
#include "support/sentinel_tensor.hpp"

namespace methods_sample {

using bkn::index_t;
using bkn::span;
namespace frn = bkn::filter_response_norm;

using layout = bkn_test::padded_layout;
using bkn_test::padded_layout_name;

struct sample_case {
  index_t N, C, H, W, groups;
  layout storage;
  bool tlu;
  int learned;  // FRN's eps: 0 fixed, 1 per layer, 2 per channel
};

std::string describe(const sample_case& c) {
  return std::string(padded_layout_name(c.storage)) + " N=" + std::to_string(c.N) +
         " C=" + std::to_string(c.C) +
         " HxW=" + std::to_string(c.H) + "x" + std::to_string(c.W) +
         " groups=" + std::to_string(c.groups) + (c.tlu ? " TLU" : "") +
         " eps=" + std::to_string(c.learned);
}

/// N in {1, 2, 3, 8}, C in {1, 3, 6, 16}, H x W in {1x1, 7x7, 5x3, 2x9}, six layouts, groups
/// among 1, a proper divisor and C; drawn from the product with a fixed seed so every value of
/// every axis appears.
std::vector<sample_case> sweep(std::size_t count) {
  std::vector<sample_case> cases;
  std::mt19937 rng(44);
  const index_t batches[] = {1, 2, 3, 8}, channels[] = {1, 3, 6, 16};
  const index_t spatial[][2] = {{1, 1}, {7, 7}, {5, 3}, {2, 9}};
  const layout layouts[] = {layout::nchw, layout::nhwc, layout::rows, layout::padded,
                            layout::padded_last};
  for (std::size_t i = 0; cases.size() < count; ++i) {
    sample_case c{};
    c.N = batches[i % 4];
    c.C = channels[(i / 4) % 4];
    const auto& hw = spatial[(i / 16 + rng()) % 4];
    c.H = hw[0];
    c.W = hw[1];
    c.storage = c.H * c.W == 1 ? layout::nc : layouts[(i / 3 + rng()) % 5];
    const index_t divisor = c.C % 3 == 0 && c.C > 3 ? 3 : c.C % 2 == 0 && c.C > 2 ? 2 : 1;
    const index_t groups[] = {1, divisor, c.C};
    c.groups = groups[rng() % 3];
    if (c.C / c.groups * c.H * c.W < 2) c.groups = 1;
    c.tlu = rng() % 3 != 0;
    c.learned = int(rng() % 3);
    if (c.C * c.H * c.W < 2) continue;  // one value per sample: group norm has nothing to do
    cases.push_back(c);
  }
  return cases;
}

template <class T>
using tensor = bkn_test::sentinel_tensor<T>;

/// Exactly `bytes` of aligned workspace followed by a canary that a pass writing past the
/// workspace would change.
struct exact_workspace {
  static constexpr std::size_t canary = 4096;
  std::vector<std::byte> memory;
  std::size_t offset, bytes;

  explicit exact_workspace(std::size_t size) : memory(size + canary + 64), bytes(size) {
    offset = (64 - reinterpret_cast<std::uintptr_t>(memory.data()) % 64) % 64;
    std::memset(memory.data(), 0xA5, memory.size());
  }
  span<std::byte> span_() { return {memory.data() + offset, index_t(bytes)}; }
  bool intact() const {
    for (std::size_t i = offset + bytes; i < offset + bytes + canary; ++i)
      if (memory[i] != std::byte{0xA5}) return false;
    return true;
  }
};

template <class T>
struct run_result {
  std::vector<std::vector<T>> tensors;    // GN y, dx; FRN y, dx (whole buffers)
  std::vector<std::vector<T>> per_sample;  // GN mean, var, dgamma, dbeta; FRN nu2 and grads
  bool workspace_intact = true;
};

template <class Backend, class T>
run_result<T> run_methods(const Backend& backend, const sample_case& c, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  const index_t N = c.N, C = c.C, H = c.H, W = c.W;
  tensor<T> x(c.storage, N, C, H, W, T(0)), dy(c.storage, N, C, H, W, T(0));
  for (index_t n = 0; n < N; ++n)
    for (index_t ch = 0; ch < C; ++ch)
      for (index_t k = 0; k < H * W; ++k) {
        x.view.at(n, ch, k) = T(3 + 2 * normal(rng) + 0.1 * double(ch));
        dy.view.at(n, ch, k) = T(normal(rng));
      }
  auto per_channel = [&](double centre, double spread) {
    std::vector<T> v(static_cast<std::size_t>(C));
    for (auto& e : v) e = T(centre + spread * normal(rng));
    return v;
  };
  run_result<T> r;

  // Group normalization with the case's group count.
  {
    tensor<T> y(c.storage, N, C, H, W, T(-7)), dx(c.storage, N, C, H, W, T(-7));
    std::vector<T> gamma = per_channel(1, 0.2), beta = per_channel(0, 1);
    std::vector<T> mean(std::size_t(N * c.groups)), var(mean.size());
    std::vector<T> dgamma(static_cast<std::size_t>(C)), dbeta(static_cast<std::size_t>(C));
    bkn::group_norm::options opt;
    opt.groups = c.groups;
    const bkn::group_norm::layer<T> L{{gamma, beta}, {dgamma, dbeta}, {mean, var}};
    exact_workspace ws(bkn::group_norm::workspace_size(backend, opt, x.view.shape()));
    bkn::group_norm::forward(backend, opt, L, x.cview(), y.view, ws.span_());
    bkn::group_norm::backward(backend, opt, L, x.cview(), dy.cview(), dx.view, ws.span_());
    r.workspace_intact = r.workspace_intact && ws.intact();
    r.tensors.push_back(y.memory);
    r.tensors.push_back(dx.memory);
    for (auto* v : {&mean, &var, &dgamma, &dbeta}) r.per_sample.push_back(*v);
  }

  // Filter response normalization, dx written over a copy of dy (in place).
  {
    tensor<T> y(c.storage, N, C, H, W, T(-7)), dx = dy;
    std::vector<T> gamma = per_channel(1, 0.2), beta = per_channel(0, 0.5),
                   tau = per_channel(0, 0.5), learned;
    if (c.learned) learned = per_channel(0.2, 0.3);
    if (c.learned == 1) learned.resize(1);
    std::vector<T> nu2(std::size_t(N * C)), dgamma(gamma.size()), dbeta(beta.size()),
        dtau(tau.size()), dlearned(learned.size());
    frn::options opt;
    opt.tlu = c.tlu;
    // 1 x 1 activations with a tiny fixed eps give dx = gamma r dy eps / (x^2 + eps): a
    // cancellation of 6 digits that float cannot compare. The paper learns eps there.
    if (H * W == 1) opt.epsilon = 0.1;
    const frn::layer<T> L{{gamma, beta, tau, learned}, {dgamma, dbeta, dtau, dlearned}, {nu2}};
    exact_workspace ws(frn::workspace_size(backend, opt, x.view.shape()));
    frn::forward(backend, opt, L, x.cview(), y.view, ws.span_());
    frn::backward(backend, opt, L, x.cview(), dx.cview(), dx.view, ws.span_());
    r.workspace_intact = r.workspace_intact && ws.intact();
    r.tensors.push_back(y.memory);
    r.tensors.push_back(dx.memory);
    for (auto* v : {&nu2, &dgamma, &dbeta, &dtau, &dlearned}) r.per_sample.push_back(*v);
  }
  return r;
}

/// Max |a - b| over max |b|: the error relative to the vector's scale.
template <class V>
double relative_error(const std::vector<V>& a, const std::vector<V>& b) {
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, std::abs(double(b[i])));
    err = std::max(err, std::abs(double(a[i]) - double(b[i])));
  }
  return err / (scale + 1e-30);
}

/// Tolerances as tests/backends/conformance.hpp: 1e-10 relative in double (summation order
/// over up to 16 * 7 * 7 * 8 terms), 2e-4 in float (float rounding of those reductions,
/// amplified by 1/sigma and by the cancellation in dx = a dy + b (x - mu) + k).
template <class T, class Backend>
void check_against_reference(const Backend& backend, std::size_t count) {
  const double tolerance = std::is_same_v<T, double> ? 1e-10 : 2e-4;
  double worst = 0;
  for (const sample_case& c : sweep(count)) {
    const std::string described = describe(c);
    CAPTURE(described);
    const run_result<T> got = run_methods<Backend, T>(backend, c, 3);
    const run_result<T> want = run_methods<bkn::reference_backend, T>({}, c, 3);
    CHECK(got.workspace_intact);
    for (std::size_t k = 0; k < got.tensors.size(); ++k) {
      CAPTURE(k);
      const double e = relative_error(got.tensors[k], want.tensors[k]);
      worst = std::max(worst, e);
      CHECK(e <= tolerance);
    }
    for (std::size_t k = 0; k < got.per_sample.size(); ++k) {
      CAPTURE(k);
      const double e = relative_error(got.per_sample[k], want.per_sample[k]);
      worst = std::max(worst, e);
      CHECK(e <= tolerance);
    }
  }
  MESSAGE(count << " cases, worst relative error " << worst);
}

template <class T, class Backend>
void check_deterministic(const Backend& backend, std::size_t count) {
  for (const sample_case& c : sweep(count)) {
    const std::string described = describe(c);
    CAPTURE(described);
    const run_result<T> a = run_methods<Backend, T>(backend, c, 5);
    const run_result<T> b = run_methods<Backend, T>(backend, c, 5);
    for (std::size_t k = 0; k < a.tensors.size(); ++k)
      CHECK(std::memcmp(a.tensors[k].data(), b.tensors[k].data(),
                        a.tensors[k].size() * sizeof(T)) == 0);
    for (std::size_t k = 0; k < a.per_sample.size(); ++k)
      CHECK(a.per_sample[k] == b.per_sample[k]);
  }
}

}  // namespace methods_sample
