// SPDX-License-Identifier: MIT
// layer_storage: host memory for one layer (std::vector), for programs that let bkn allocate:
// examples, tests, a CPU host without its own tensors. Hosts with their own buffers skip it.
#pragma once

#include <cmath>
#include <vector>

#include "bkn/layer.hpp"

BKN_BEGIN_NAMESPACE

/// What a layer_storage allocates.
struct layer_config {
  index_t channels = 0;
  index_t groups = 1;  ///< statistics groups per batch (N / group_size)
  covariance mode = covariance::diagonal;
  transition_kind transition = transition_kind::identity;
  index_t in_channels = 0;  ///< C' of a dense or weights transition (0: C)
  /// A weights transition: the host layer's geometry (all ones: linear) and activation. The
  /// weights are C x C' x kh x kw, initialized like the dense identity on the centre tap.
  conv2d_geometry conv{};
  activation act = activation::relu;
  moment_function moments = nullptr;  ///< for activation::custom
  bool transition_bias = true;
  bool per_channel_gain = false;
  bool affine = true;
  bool noise = true;
  double initial_gain = 0.5;  ///< q at initialization
  double initial_noise = 0.01;  ///< r at initialization
};

/// Owns every array of one layer on the host, initialized to gamma = 1, beta = 0, q =
/// initial_gain, A = I (dense: the identity on the leading min(C, C') diagonal), r =
/// initial_noise, moving mean 0 and variance 1. view() gives the bkn::layer to pass to forward
/// and backward; it stays valid while the storage lives and is not resized.
template <class P>
class layer_storage {
 public:
  explicit layer_storage(const layer_config& cfg) : cfg_(cfg) {
    const index_t C = cfg.channels, G = cfg.groups;
    const index_t Cin = cfg.in_channels > 0 ? cfg.in_channels : C;
    const index_t cov = G * covariance_elements(C, cfg.mode);
    if (cfg.affine) {
      gamma.assign(size(C), P(1));
      beta.assign(size(C), P(0));
    }
    gain_logit.assign(size(cfg.per_channel_gain ? C : 1),
                      P(std::log(cfg.initial_gain / (1 - cfg.initial_gain))));
    if (cfg.transition == transition_kind::diagonal) transition_weights.assign(size(C), P(1));
    if (cfg.transition == transition_kind::dense || cfg.transition == transition_kind::weights) {
      const index_t taps = cfg.transition == transition_kind::weights ? cfg.conv.taps() : 1;
      const index_t centre = cfg.transition == transition_kind::weights
                                 ? cfg.conv.kernel_height / 2 * cfg.conv.kernel_width +
                                       cfg.conv.kernel_width / 2
                                 : 0;
      transition_weights.assign(size(C * Cin * taps), P(0));
      for (index_t c = 0; c < C && c < Cin; ++c)
        transition_weights[size((c * Cin + c) * taps + centre)] = P(1);
      if (cfg.transition == transition_kind::weights && cfg.transition_bias)
        transition_bias.assign(size(C), P(0));
    }
    if (cfg.noise) noise.assign(size(C), P(std::log(std::expm1(cfg.initial_noise))));
    running_mean.assign(size(C), P(0));
    running_var.assign(size(C), P(1));
    running_skipped.assign(size(C), P(0));
    for (auto* v : {&dgamma, &dbeta}) v->assign(gamma.size(), P(0));
    dgain_logit.assign(gain_logit.size(), P(0));
    dtransition_weights.assign(transition_weights.size(), P(0));
    dtransition_bias.assign(transition_bias.size(), P(0));
    dnoise.assign(noise.size(), P(0));
    for (auto* v : {&observed_mean, &predicted_mean, &posterior_mean, &dposterior_mean})
      v->assign(size(G * C), P(0));
    for (auto* v : {&observed_cov, &predicted_cov, &posterior_cov, &dposterior_cov})
      v->assign(size(cov), P(0));
  }

  layer<P> view() {
    const index_t C = cfg_.channels, G = cfg_.groups;
    layer<P> L;
    L.params = {gamma, beta, gain_logit, make_transition(), noise};
    L.grads = {dgamma, dbeta, dgain_logit, dnoise, dtransition_weights, dtransition_bias};
    L.running = {running_mean, running_var, running_skipped};
    // Named constructors: nvcc warns that G and C are unused in the braced form.
    L.state.observed = gaussian_view<P>(observed_mean, observed_cov, G, C);
    L.state.predicted = gaussian_view<P>(predicted_mean, predicted_cov, G, C);
    L.state.posterior = gaussian_view<P>(posterior_mean, posterior_cov, G, C);
    L.state.dposterior = gaussian_view<P>(dposterior_mean, dposterior_cov, G, C);
    return L;
  }

  const layer_config& config() const noexcept { return cfg_; }

  std::vector<P> gamma, beta, gain_logit, transition_weights, transition_bias, noise;
  std::vector<P> dgamma, dbeta, dgain_logit, dtransition_weights, dtransition_bias, dnoise;
  std::vector<P> running_mean, running_var, running_skipped;
  std::vector<P> observed_mean, observed_cov, predicted_mean, predicted_cov;
  std::vector<P> posterior_mean, posterior_cov, dposterior_mean, dposterior_cov;

 private:
  static std::size_t size(index_t n) { return static_cast<std::size_t>(n); }
  index_t in_channels() const { return cfg_.in_channels > 0 ? cfg_.in_channels : cfg_.channels; }
  transition<P> make_transition() const {
    const span<const P> w(transition_weights.data(), index_t(transition_weights.size()));
    switch (cfg_.transition) {
      case transition_kind::diagonal:
        return transition<P>::diagonal(w);
      case transition_kind::dense:
        return transition<P>::dense(w, in_channels());
      case transition_kind::weights:
        return transition<P>::conv2d(
            w, span<const P>(transition_bias.data(), index_t(transition_bias.size())),
            in_channels(), cfg_.conv, cfg_.act, cfg_.moments);
      case transition_kind::identity:
        break;
    }
    return transition<P>::identity();
  }

  layer_config cfg_;
};

/// A workspace of `bytes` on the host, aligned for bkn.
class host_workspace {
 public:
  explicit host_workspace(std::size_t bytes)
      : storage_((bytes + workspace_alignment) / sizeof(block) + 1) {}
  span<std::byte> bytes() {
    return {reinterpret_cast<std::byte*>(storage_.data()),
            index_t(storage_.size() * sizeof(block))};
  }

 private:
  struct alignas(workspace_alignment) block {
    std::byte b[workspace_alignment];
  };
  std::vector<block> storage_;
};

BKN_END_NAMESPACE
