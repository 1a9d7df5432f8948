// SPDX-License-Identifier: MIT
// A home-grown framework runs three bkn-backed layers from two translation units through its
// own interface only, and checks them against a direct double-precision computation.
//
// Network: x0 -> grouped (no prior, NCHW) -> tanh -> full (prior: layer 1, NHWC) -> tanh ->
// grouped (prior: layer 2, NCHW) -> loss = sum(w * y3). Forward outputs are compared with a
// direct computation of docs/math.md's formulas, and every gradient the layers write with
// central differences of that direct computation. Exits non-zero on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "host_layer.hpp"

namespace {

using host::layout;
using host::shape4;
using std::int64_t;

constexpr int64_t kBatch = 8, kChannels = 3, kHeight = 3, kWidth = 3, kGroupSize = 2;
constexpr int64_t kGroups = kBatch / kGroupSize;
constexpr layout kLayouts[3] = {layout::nchw, layout::nhwc, layout::nchw};
constexpr bool kFull[3] = {false, true, false};
constexpr double kEpsilon[3] = {1e-5, 1e-3, 1e-5};  // full_layer.cpp sets 1e-3

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// ---- The direct computation: logical (n, c, h, w) arrays in double, docs/math.md verbatim ----

struct direct_layer {
  std::vector<double> gamma, beta, gain_logit, transition, noise;  // as the layers hold them
};

struct gaussian {
  std::vector<double> mean, var;  // kGroups x kChannels
};

double sigmoid(double t) { return 1 / (1 + std::exp(-t)); }
double softplus(double t) { return std::log1p(std::exp(t)); }

int64_t at(int64_t n, int64_t c, int64_t s) { return (n * kChannels + c) * kHeight * kWidth + s; }

/// One layer: observe per group, predict (identity or diagonal A), update, normalize.
std::vector<double> direct_normalize(const direct_layer& p, bool full, double eps,
                                     const std::vector<double>& x, const gaussian* prior,
                                     gaussian& posterior) {
  const int64_t C = kChannels, S = kHeight * kWidth;
  const double m = double(kGroupSize * S);
  std::vector<double> y(x.size());
  posterior.mean.assign(size_t(kGroups * C), 0);
  posterior.var.assign(size_t(kGroups * C), 0);
  for (int64_t g = 0; g < kGroups; ++g) {
    std::vector<double> xbar(static_cast<size_t>(C), 0), cov(static_cast<size_t>(C * C), 0);
    for (int64_t n = g * kGroupSize; n < (g + 1) * kGroupSize; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t s = 0; s < S; ++s) xbar[size_t(c)] += x[size_t(at(n, c, s))] / m;
    for (int64_t n = g * kGroupSize; n < (g + 1) * kGroupSize; ++n)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t i = 0; i < C; ++i)
          for (int64_t j = 0; j < C; ++j)
            cov[size_t(i * C + j)] += (x[size_t(at(n, i, s))] - xbar[size_t(i)]) *
                                      (x[size_t(at(n, j, s))] - xbar[size_t(j)]) / m;
    std::vector<double> mu = xbar, sigma = cov;
    if (prior) {
      std::vector<double> mu_pred(static_cast<size_t>(C)), q(static_cast<size_t>(C));
      std::vector<double> sigma_pred(static_cast<size_t>(C * C), 0);
      for (int64_t c = 0; c < C; ++c) {
        const double a = full ? 1.0 : p.transition[size_t(c)];
        mu_pred[size_t(c)] = a * prior->mean[size_t(g * C + c)];
        sigma_pred[size_t(c * C + c)] =
            a * a * prior->var[size_t(g * C + c)] + softplus(p.noise[size_t(c)]);
        q[size_t(c)] = sigmoid(p.gain_logit[full ? 0 : size_t(c)]);
      }
      for (int64_t i = 0; i < C; ++i) {
        const double qi = q[size_t(i)], di = xbar[size_t(i)] - mu_pred[size_t(i)];
        mu[size_t(i)] = (1 - qi) * mu_pred[size_t(i)] + qi * xbar[size_t(i)];
        for (int64_t j = 0; j < C; ++j) {
          const double dj = xbar[size_t(j)] - mu_pred[size_t(j)];
          const size_t e = size_t(i * C + j);
          sigma[e] = (1 - qi) * sigma_pred[e] + qi * cov[e] + (1 - qi) * qi * di * dj;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      posterior.mean[size_t(g * C + c)] = mu[size_t(c)];
      posterior.var[size_t(g * C + c)] = sigma[size_t(c * C + c)];
      const double inv = 1 / std::sqrt(sigma[size_t(c * C + c)] + eps);
      for (int64_t n = g * kGroupSize; n < (g + 1) * kGroupSize; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const size_t e = size_t(at(n, c, s));
          y[e] = p.gamma[size_t(c)] * (x[e] - mu[size_t(c)]) * inv + p.beta[size_t(c)];
        }
    }
  }
  return y;
}

struct direct_network {
  std::vector<double> x0, w;  // input and loss weights, logical order
  direct_layer layers[3];

  /// The loss, and every layer's output in logical order when `outputs` is given.
  double loss(std::vector<double>* outputs = nullptr) const {
    std::vector<double> x = x0;
    gaussian posterior[3];
    for (int k = 0; k < 3; ++k) {
      const std::vector<double> y = direct_normalize(layers[k], kFull[k], kEpsilon[k], x,
                                                     k == 0 ? nullptr : &posterior[k - 1],
                                                     posterior[k]);
      if (outputs) outputs[k] = y;
      x.resize(y.size());
      for (size_t i = 0; i < y.size(); ++i) x[i] = std::tanh(y[i]);
      if (k == 2) {
        double sum = 0;
        for (size_t i = 0; i < y.size(); ++i) sum += w[i] * y[i];
        return sum;
      }
    }
    return 0;
  }
};

// ---- The host: its buffers in its layouts, its tanh, its backward --------------------------

const shape4 kShape{kBatch, kChannels, kHeight, kWidth};

std::vector<float> to_layout(const std::vector<double>& logical, layout l) {
  std::vector<float> out(logical.size());
  for (int64_t n = 0; n < kBatch; ++n)
    for (int64_t c = 0; c < kChannels; ++c)
      for (int64_t s = 0; s < kHeight * kWidth; ++s)
        out[size_t(host::offset(kShape, l, n, c, s / kWidth, s % kWidth))] =
            float(logical[size_t(at(n, c, s))]);
  return out;
}

std::vector<double> to_logical(const std::vector<float>& stored, layout l) {
  std::vector<double> out(stored.size());
  for (int64_t n = 0; n < kBatch; ++n)
    for (int64_t c = 0; c < kChannels; ++c)
      for (int64_t s = 0; s < kHeight * kWidth; ++s)
        out[size_t(at(n, c, s))] =
            stored[size_t(host::offset(kShape, l, n, c, s / kWidth, s % kWidth))];
  return out;
}

/// The host's tanh between layers, which also changes the storage layout.
std::vector<float> host_tanh(const std::vector<float>& y, layout from, layout to) {
  std::vector<double> logical = to_logical(y, from);
  for (double& v : logical) v = std::tanh(v);
  return to_layout(logical, to);
}

/// A 64-byte aligned block of host memory, as the host's allocator would give.
struct aligned_buffer {
  explicit aligned_buffer(std::size_t bytes)
      : size(bytes), data(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64)) {}
  ~aligned_buffer() { std::free(data); }
  aligned_buffer(const aligned_buffer&) = delete;
  aligned_buffer& operator=(const aligned_buffer&) = delete;
  std::size_t size;
  void* data;
};

/// Largest |a - b| over the arrays, relative to max(1, largest |b|).
double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0, scale = 1;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return worst / scale;
}

/// Central difference of net.loss() in each of `entries`.
std::vector<double> finite_difference(direct_network& net, std::vector<double>& entries) {
  std::vector<double> out(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const double saved = entries[i], h = 1e-6 * std::max(1.0, std::abs(saved));
    entries[i] = saved + h;
    const double up = net.loss();
    entries[i] = saved - h;
    const double down = net.loss();
    entries[i] = saved;
    out[i] = (up - down) / (2 * h);
  }
  return out;
}

}  // namespace

int main() {
  std::mt19937_64 rng(2024);
  std::normal_distribution<double> normal(0, 1);
  std::unique_ptr<host::normalization> layers[3] = {
      host::make_grouped_kalman_norm(kChannels, kGroupSize),
      host::make_full_kalman_norm(kChannels, kGroupSize),
      host::make_grouped_kalman_norm(kChannels, kGroupSize)};

  // Random parameters, written through the host's interface and mirrored in double.
  direct_network net;
  for (int k = 0; k < 3; ++k) {
    for (const host::parameter& p : layers[k]->parameters()) {
      std::vector<double> values(size_t(p.size));
      const std::string name = p.name;
      const double centre = name == "gamma" || name == "transition" ? 1.0 : 0.0;
      for (int64_t i = 0; i < p.size; ++i) {
        p.value[i] = float(centre + 0.4 * normal(rng));
        values[size_t(i)] = double(p.value[i]);  // the float value both sides use
      }
      direct_layer& d = net.layers[k];
      (name == "gamma"        ? d.gamma
       : name == "beta"       ? d.beta
       : name == "gain_logit" ? d.gain_logit
       : name == "transition" ? d.transition
                              : d.noise) = values;
    }
  }
  net.x0.resize(size_t(kShape.elements()));
  net.w.resize(net.x0.size());
  for (double& v : net.x0) v = double(float(2 + 1.5 * normal(rng)));
  for (double& v : net.w) v = double(float(normal(rng)));

  // ---- The host's forward: three layers, its own tanh between them, one shared workspace ----
  std::size_t bytes = 0;
  for (auto& L : layers) bytes = std::max(bytes, L->workspace_bytes(kShape));
  aligned_buffer workspace(bytes);
  std::vector<float> x[3], y[3];
  x[0] = to_layout(net.x0, kLayouts[0]);
  host::chain_link links[3];
  for (int k = 0; k < 3; ++k) {
    if (k > 0) x[k] = host_tanh(y[k - 1], kLayouts[k - 1], kLayouts[k]);
    y[k].assign(x[k].size(), 0.0f);
    layers[k]->forward(x[k].data(), y[k].data(), kShape, kLayouts[k],
                       k == 0 ? nullptr : &links[k - 1], workspace.data, workspace.size);
    links[k] = layers[k]->posterior();
  }

  std::vector<double> expected[3];
  net.loss(expected);
  for (int k = 0; k < 3; ++k) {
    const double error = relative_error(to_logical(y[k], kLayouts[k]), expected[k]);
    std::printf("layer %d forward: max relative error %.2e vs the direct computation\n", k + 1,
                error);
    check(error < 1e-4, "layer " + std::to_string(k + 1) + " forward");
  }

  // ---- The host's backward, in reverse: each layer fills the previous layer's link ----------
  std::vector<float> dy = to_layout(net.w, kLayouts[2]), dx[3];
  for (int k = 2; k >= 0; --k) {
    dx[k].assign(x[k].size(), 0.0f);
    layers[k]->backward(x[k].data(), dy.data(), dx[k].data(), kShape, kLayouts[k],
                        k == 0 ? nullptr : &links[k - 1], workspace.data, workspace.size);
    // tanh's derivative, back into the previous layer's layout.
    if (k > 0) {
      std::vector<double> g = to_logical(dx[k], kLayouts[k]), t = to_logical(x[k], kLayouts[k]);
      for (size_t i = 0; i < g.size(); ++i) g[i] *= 1 - t[i] * t[i];
      dy = to_layout(g, kLayouts[k - 1]);
    }
  }

  // Every gradient against central differences of the direct computation.
  auto compare = [&](const std::string& what, const std::vector<double>& analytic,
                     std::vector<double>& entries, bool may_vanish) {
    const std::vector<double> numeric = finite_difference(net, entries);
    const double error = relative_error(analytic, numeric);
    double largest = 0;
    for (double v : numeric) largest = std::max(largest, std::abs(v));
    std::printf("%-22s max relative error %.2e (largest component %.3g)\n", what.c_str(), error,
                largest);
    check(error < 1e-3, what + " gradient");
    check(may_vanish || largest > 1e-3, what + " gradient is not trivially zero");
  };
  compare("dx (layer 1 input)", to_logical(dx[0], kLayouts[0]), net.x0, false);
  for (int k = 0; k < 3; ++k) {
    for (const host::parameter& p : layers[k]->parameters()) {
      const std::string name = p.name;
      direct_layer& d = net.layers[k];
      std::vector<double>& entries = name == "gamma"        ? d.gamma
                                     : name == "beta"       ? d.beta
                                     : name == "gain_logit" ? d.gain_logit
                                     : name == "transition" ? d.transition
                                                            : d.noise;
      const std::vector<double> analytic(p.grad, p.grad + p.size);
      // Layer 1 has no prior: its gain, transition and noise take no part (zero gradient).
      const bool unused = k == 0 && name != "gamma" && name != "beta";
      compare("layer " + std::to_string(k + 1) + " " + name, analytic, entries, unused);
    }
  }

  // ---- A rejected call: a std::invalid_argument the host can catch, and nothing written -----
  const shape4 odd{7, kChannels, kHeight, kWidth};  // 7 samples in groups of 2
  std::vector<float> sentinel(size_t(odd.elements()), 12345.0f), out = sentinel;
  const std::vector<float> posterior_before(links[0].mean, links[0].mean + kGroups * kChannels);
  bool threw = false;
  try {
    layers[0]->forward(x[0].data(), out.data(), odd, layout::nchw, nullptr, workspace.data,
                       workspace.size);
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("group_size") != std::string::npos;
    std::printf("rejected as expected: %s\n", e.what());
  }
  check(threw, "a batch of 7 in groups of 2 throws std::invalid_argument naming group_size");
  check(std::memcmp(out.data(), sentinel.data(), out.size() * sizeof(float)) == 0,
        "the rejected call left y unchanged");
  check(std::equal(posterior_before.begin(), posterior_before.end(), layers[0]->posterior().mean),
        "the rejected call left the posterior unchanged");

  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("embedding: all checks passed\n");
  return 0;
}
