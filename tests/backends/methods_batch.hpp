// SPDX-License-Identifier: MIT
// The backend-conformance driver of the batch-statistics methods (batch_norm, batch_renorm,
// memorized_batch_norm): runs training steps, a refresh and both inferences on any backend.
#pragma once

#include <bkn/methods/batch_norm.hpp>
#include <bkn/methods/batch_renorm.hpp>
#include <bkn/methods/memorized_batch_norm.hpp>

#include "conformance.hpp"

namespace methods_batch {

using bkn::index_t;
using bkn::span;
using conformance::layer_case;
using conformance::layout;

/// One array a run produces. `float_ok` is false for dx through batch statistics of at most two
/// values per channel and group: two values normalize to -1 and +1 whatever they are, so dx is
/// the cancellation of terms gamma / sigma |dy| to near zero (and a lone value has variance 0,
/// amplified by 1 / sqrt(eps)): float rounding is all there is to compare there. Double is
/// compared everywhere.
template <class T>
struct output {
  std::string what;
  std::vector<T> values;
  bool float_ok;
};
template <class T>
using outputs = std::vector<output<T>>;

/// The per-channel memory of one run: parameters, gradients, moving averages, saved statistics,
/// and for memorized_batch_norm its memory.
template <class T>
struct arrays {
  std::vector<T> gamma, beta, dgamma, dbeta, running_mean, running_var, mean, var, r, d, batch_mean,
      batch_var, share, memory_mean, memory_var, memory_count;
  std::vector<index_t> newest{0};

  arrays(const layer_case& c, index_t slots, std::mt19937& rng) {
    std::normal_distribution<double> normal;
    const index_t C = c.channels, G = c.batch / c.group_size;
    for (index_t k = 0; k < C; ++k) {
      gamma.push_back(T(1 + 0.2 * normal(rng)));
      beta.push_back(T(normal(rng)));
      running_mean.push_back(T(3 + normal(rng)));
      running_var.push_back(T(1 + 3 * std::abs(normal(rng))));
    }
    dgamma = dbeta = std::vector<T>(std::size_t(C), T(-7));
    mean = var = r = d = batch_mean = batch_var = std::vector<T>(std::size_t(G * C), T(-7));
    share.assign(std::size_t(G), T(-7));
    memory_mean = memory_var = std::vector<T>(std::size_t(slots * G * C), T(-7));
    memory_count.assign(std::size_t(slots), T(0));
  }
};

/// Runs every method of include/bkn/methods/batch_*.hpp and memorized_batch_norm.hpp through
/// several training steps and both inference modes on `backend`, and returns what they wrote.
template <class Backend, class T>
outputs<T> run(const Backend& backend, const layer_case& c, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  conformance::tensor<T> x(c, T(0)), y(c, T(-7)), dy(c, T(0)), dx(c, T(-7));
  auto refill = [&] {
    const double shift = normal(rng);
    for (index_t n = 0; n < c.batch; ++n)
      for (index_t ch = 0; ch < c.channels; ++ch)
        for (index_t k = 0; k < c.height * c.width; ++k) {
          x.view.at(n, ch, k) = T(3 + shift + 2 * normal(rng) + 0.1 * double(ch));
          dy.view.at(n, ch, k) = T(normal(rng));
        }
  };
  const bkn::tensor_shape shape{c.batch, c.channels, c.height, c.width};
  const bool one_value = c.group_size * c.height * c.width == 1;
  outputs<T> out;
  auto keep = [&](const std::string& what, const std::vector<T>& v) {
    out.push_back({what, v, true});
  };
  auto keep_tensors = [&](const std::string& what, bool batch_statistics) {
    keep(what + " y", y.memory);
    out.push_back(
        {what + " dx", dx.memory, !batch_statistics || c.group_size * c.height * c.width > 2});
  };

  {  // batch_norm: two training steps (none with one value per group), then both inferences.
    namespace bn = bkn::batch_norm;
    arrays<T> a(c, 1, rng);
    bn::layer<T> L;
    L.params = {a.gamma, a.beta};
    L.grads = {a.dgamma, a.dbeta};
    L.running.mean = a.running_mean;
    L.running.var = a.running_var;
    L.saved = {a.mean, a.var};
    bn::options opt;
    opt.group_size = c.group_size;
    bkn::host_workspace ws(bn::workspace_size(backend, opt, shape));
    for (int step = 0; step < 4; ++step) {
      opt.training = step < 2;
      opt.inference =
          step == 2 ? bkn::inference_statistics::chain : bkn::inference_statistics::running;
      if (one_value && step < 3) continue;
      refill();
      bn::forward(backend, opt, L, x.cview(), y.view, ws.bytes());
      bn::backward(backend, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
      const std::string what = "batch_norm step " + std::to_string(step);
      keep_tensors(what, step < 3);
      for (const auto* v : {&a.dgamma, &a.dbeta, &a.running_mean, &a.running_var, &a.mean, &a.var})
        keep(what, *v);
    }
  }
  {  // batch_renorm: r and d clipped in some channels, a schedule step, then inference.
    namespace brn = bkn::batch_renorm;
    arrays<T> a(c, 1, rng);
    brn::layer<T> L;
    L.params = {a.gamma, a.beta};
    L.grads = {a.dgamma, a.dbeta};
    L.running.mean = a.running_mean;
    L.running.var = a.running_var;
    L.saved = {a.mean, a.var, a.r, a.d};
    brn::options opt;
    opt.group_size = c.group_size;
    bkn::host_workspace ws(brn::workspace_size(backend, opt, shape));
    for (int step = 0; step < 3; ++step) {
      opt.training = step < 2;
      opt.r_max = step == 0 ? 1.5 : 3;
      opt.d_max = step == 0 ? 0.5 : 5;
      if (one_value && step < 2) continue;
      refill();
      brn::forward(backend, opt, L, x.cview(), y.view, ws.bytes());
      brn::backward(backend, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
      const std::string what = "batch_renorm step " + std::to_string(step);
      keep_tensors(what, step < 2);
      for (const auto* v :
           {&a.dgamma, &a.dbeta, &a.running_mean, &a.running_var, &a.mean, &a.var, &a.r, &a.d})
        keep(what, *v);
    }
  }
  {  // memorized_batch_norm: three pushes, a refresh, inference from the memory and running.
    namespace mbn = bkn::memorized_batch_norm;
    const index_t slots = 3;
    arrays<T> a(c, slots, rng);
    mbn::layer<T> L;
    L.params = {a.gamma, a.beta};
    L.grads = {a.dgamma, a.dbeta};
    L.running.mean = a.running_mean;
    L.running.var = a.running_var;
    L.memory.mean = a.memory_mean;
    L.memory.var = a.memory_var;
    L.memory.count = a.memory_count;
    L.memory.newest = a.newest;
    L.memory.slots = slots;
    L.memory.groups = c.batch / c.group_size;
    L.memory.channels = c.channels;
    L.saved = {a.mean, a.var, a.batch_mean, a.batch_var, a.share};
    mbn::options opt;
    opt.group_size = c.group_size;
    opt.decay = 0.8;
    bkn::host_workspace ws(mbn::workspace_size(backend, opt, shape));
    for (int step = 0; step < 6; ++step) {
      opt.training = step < 4;
      opt.update = step == 3 ? mbn::memory_update::refresh : mbn::memory_update::push;
      opt.inference = step == 4 ? mbn::inference_source::memory : mbn::inference_source::running;
      refill();
      mbn::forward(backend, opt, L, x.cview(), y.view, ws.bytes());
      mbn::backward(backend, opt, L, x.cview(), dy.cview(), dx.view, ws.bytes());
      const std::string what = "memorized_batch_norm step " + std::to_string(step);
      keep_tensors(what, step < 4);
      for (const auto* v :
           {&a.dgamma, &a.dbeta, &a.running_mean, &a.running_var, &a.mean, &a.var, &a.batch_mean,
            &a.batch_var, &a.share, &a.memory_mean, &a.memory_var, &a.memory_count})
        keep(what, *v);
      CHECK(a.newest[0] == (step < 3 ? step + 1 : 3) % slots);
    }
  }
  return out;
}

/// N in {1, 2, 3, 8, 32}, C in {1, 3, 16, 64}, H x W in {1x1, 7x7, 5x3}, the four layouts of
/// tests/backends/conformance.hpp, group sizes 1, 2 and N: drawn from the product with a fixed
/// seed so that every value of every axis appears.
inline std::vector<layer_case> sweep(std::size_t count) {
  std::vector<layer_case> cases;
  std::mt19937 rng(4);
  const index_t batches[] = {1, 2, 3, 8, 32}, channels[] = {1, 3, 16, 64};
  const index_t spatial[][2] = {{1, 1}, {7, 7}, {5, 3}};
  const layout layouts[] = {layout::nc, layout::nchw, layout::nhwc, layout::strided};
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
    cases.push_back(c);
  }
  return cases;
}

inline std::string describe_shape(const layer_case& c) {
  return std::string(conformance::layout_name(c.storage)) + " N=" + std::to_string(c.batch) +
         " C=" + std::to_string(c.channels) + " HxW=" + std::to_string(c.height) + "x" +
         std::to_string(c.width) + " group=" + std::to_string(c.group_size);
}

/// Every output of every case on `backend` against the reference backend: 1e-10 relative to
/// each array's largest magnitude in double, 2e-4 in float (as tests/backends/conformance.hpp;
/// see `output` for what float skips).
template <class T, class Backend>
void check_against_reference(const Backend& backend, std::size_t count) {
  const double tolerance = std::is_same_v<T, double> ? 1e-10 : 2e-4;
  for (const layer_case& c : sweep(count)) {
    CAPTURE(describe_shape(c));
    const outputs<T> got = run<Backend, T>(backend, c, 3);
    const outputs<T> want = run<bkn::reference_backend, T>(bkn::reference_backend{}, c, 3);
    REQUIRE(got.size() == want.size());
    for (std::size_t k = 0; k < got.size(); ++k) {
      CAPTURE(want[k].what);
      CAPTURE(k);
      if (std::is_same_v<T, float> && !want[k].float_ok) continue;
      CHECK(conformance::relative_error(got[k].values, want[k].values) <= tolerance);
    }
  }
}

}  // namespace methods_batch
