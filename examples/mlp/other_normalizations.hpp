// SPDX-License-Identifier: MIT
// The MLP's other normalization choices, adapters over bkn's methods (include/bkn/methods):
// batch renormalization, and group and layer normalization (per sample, no batch statistics).
#pragma once

#include <bkn/methods/batch_norm.hpp>
#include <bkn/methods/batch_renorm.hpp>
#include <bkn/methods/group_norm.hpp>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "normalization.hpp"

namespace mlp {

/// The affine parameters of one normalized layer and their gradients.
template <class T>
struct affine_storage {
  explicit affine_storage(index_t channels)
      : gamma(std::size_t(channels), T(1)),
        beta(std::size_t(channels), T(0)),
        dgamma(gamma.size(), T(0)),
        dbeta(beta.size(), T(0)) {}
  std::vector<T> gamma, beta, dgamma, dbeta;

  void parameters(const std::string& name, std::vector<parameter<T>>& out) {
    out.push_back({name + ".gamma", gamma.data(), dgamma.data(), index_t(gamma.size()), false});
    out.push_back({name + ".beta", beta.data(), dbeta.data(), index_t(beta.size()), false});
  }
};

// ---- batch renormalization ----------------------------------------------------------------

/// Batch renormalization (Ioffe 2017) per statistics group. r_max and d_max follow the paper's
/// schedule in fractions of the training: 1 and 0 (batch normalization) for the first 5% of
/// the steps, then linearly to 3 and 5 at 25%. Inference with batch statistics normalizes each
/// test group by its own statistics (bkn::batch_norm's chain inference with the same gamma and
/// beta), as for batch normalization.
template <class Backend, class T>
class batch_renormalization final : public normalization<T> {
 public:
  batch_renormalization(Backend backend, const host_network<T>& net, statistics_settings stats)
      : backend_(backend), widths_(net.widths), stats_(stats) {
    for (index_t C : net.widths) {
      layers_.emplace_back(C, net.max_batch);
    }
  }

  void set_progress(double fraction) override {
    const double t = std::clamp((fraction - 0.05) / 0.2, 0.0, 1.0);
    r_max_ = 1 + 2 * t;
    d_max_ = 5 * t;
  }

  void forward(int k, const T* x, T* y, index_t n, phase ph) override {
    per_layer& L = layers_[std::size_t(k)];
    const index_t C = widths_[std::size_t(k)], s = group_size_for(n, stats_.statistics_batch);
    const auto X = bkn::nc(x, n, C);
    const auto Y = bkn::nc(y, n, C);
    if (ph == phase::infer_batch) {
      bkn::batch_norm::options o;
      o.group_size = s;
      o.epsilon = stats_.epsilon;
      o.training = false;
      o.inference = bkn::inference_statistics::chain;
      bkn::batch_norm::layer<T> B;  // no saved statistics: no backward follows
      B.params = {L.affine.gamma, L.affine.beta};
      B.running = {L.running_mean, L.running_var, {}};
      bkn::batch_norm::forward(backend_, o, B, X, Y,
                               workspace_.get(bkn::batch_norm::workspace_size(backend_, o, X.shape())));
      return;
    }
    const bkn::batch_renorm::options o = options(n, ph == phase::train);
    bkn::batch_renorm::forward(backend_, o, view(k, s > 0 ? n / s : 1), X, Y,
                               workspace_.get(bkn::batch_renorm::workspace_size(backend_, o, X.shape())));
  }

  void backward(int k, const T* x, const T* dy, T* dx, index_t n) override {
    const index_t C = widths_[std::size_t(k)], s = group_size_for(n, stats_.statistics_batch);
    const bkn::batch_renorm::options o = options(n, true);
    const auto X = bkn::nc(x, n, C);
    bkn::batch_renorm::backward(backend_, o, view(k, s > 0 ? n / s : 1), X, bkn::nc(dy, n, C),
                                bkn::nc(dx, n, C),
                                workspace_.get(bkn::batch_renorm::workspace_size(backend_, o, X.shape())));
  }

  std::vector<parameter<T>> parameters() override {
    std::vector<parameter<T>> p;
    for (std::size_t k = 0; k < layers_.size(); ++k)
      layers_[k].affine.parameters("norm" + std::to_string(k), p);
    return p;
  }

 private:
  struct per_layer {
    per_layer(index_t C, index_t max_batch)
        : affine(C),
          running_mean(std::size_t(C), T(0)),
          running_var(std::size_t(C), T(1)),
          mean(std::size_t(C * max_batch)),
          var(mean.size()),
          r(mean.size()),
          d(mean.size()) {}
    affine_storage<T> affine;
    std::vector<T> running_mean, running_var, mean, var, r, d;
  };

  bkn::batch_renorm::options options(index_t n, bool training) const {
    bkn::batch_renorm::options o;
    o.group_size = group_size_for(n, stats_.statistics_batch);
    o.epsilon = stats_.epsilon;
    o.momentum = stats_.momentum;
    o.training = training;
    o.r_max = r_max_;
    o.d_max = d_max_;
    return o;
  }

  bkn::batch_renorm::layer<T> view(int k, index_t G) {
    per_layer& L = layers_[std::size_t(k)];
    const index_t GC = G * widths_[std::size_t(k)];
    bkn::batch_renorm::layer<T> v;
    v.params.gamma = L.affine.gamma;
    v.params.beta = L.affine.beta;
    v.grads.gamma = L.affine.dgamma;
    v.grads.beta = L.affine.dbeta;
    v.running = {L.running_mean, L.running_var, {}};
    v.saved = {bkn::span<T>(L.mean.data(), GC), bkn::span<T>(L.var.data(), GC),
               bkn::span<T>(L.r.data(), GC), bkn::span<T>(L.d.data(), GC)};
    return v;
  }

  Backend backend_;
  std::vector<index_t> widths_;
  statistics_settings stats_;
  std::vector<per_layer> layers_;
  growing_workspace workspace_;
  double r_max_ = 1, d_max_ = 0;
};

// ---- group and layer normalization ----------------------------------------------------------

/// Group normalization with `groups` groups of channels per sample (1: layer normalization).
/// Nothing depends on other samples: training and both kinds of inference are one computation.
template <class Backend, class T>
class group_normalization final : public normalization<T> {
 public:
  group_normalization(Backend backend, const host_network<T>& net, index_t groups, double epsilon)
      : backend_(backend), widths_(net.widths), groups_(groups), epsilon_(epsilon) {
    for (index_t C : net.widths) {
      if (groups < 1 || C % groups != 0)
        throw std::invalid_argument("group normalization with " + std::to_string(groups) +
                                    " groups needs widths they divide, got a layer of " +
                                    std::to_string(C) + " channels");
      affine_.emplace_back(C);
    }
  }

  void forward(int k, const T* x, T* y, index_t n, phase) override {
    const index_t C = widths_[std::size_t(k)];
    const auto X = bkn::nc(x, n, C);
    bkn::group_norm::forward(backend_, options(), view(k), X, bkn::nc(y, n, C),
                             workspace_.get(bkn::group_norm::workspace_size(backend_, options(), X.shape())));
  }

  void backward(int k, const T* x, const T* dy, T* dx, index_t n) override {
    const index_t C = widths_[std::size_t(k)];
    const auto X = bkn::nc(x, n, C);
    bkn::group_norm::backward(backend_, options(), view(k), X, bkn::nc(dy, n, C),
                              bkn::nc(dx, n, C),
                              workspace_.get(bkn::group_norm::workspace_size(backend_, options(), X.shape())));
  }

  std::vector<parameter<T>> parameters() override {
    std::vector<parameter<T>> p;
    for (std::size_t k = 0; k < affine_.size(); ++k)
      affine_[k].parameters("norm" + std::to_string(k), p);
    return p;
  }

 private:
  bkn::group_norm::options options() const {
    bkn::group_norm::options o;
    o.groups = groups_;
    o.epsilon = epsilon_;
    return o;
  }

  /// No saved statistics: backward recomputes them from x (one more pass over a small tensor),
  /// so the adapter keeps no buffers sized for the largest batch.
  bkn::group_norm::layer<T> view(int k) {
    affine_storage<T>& a = affine_[std::size_t(k)];
    bkn::group_norm::layer<T> L;
    L.params = {a.gamma, a.beta};
    L.grads = {a.dgamma, a.dbeta};
    return L;
  }

  Backend backend_;
  std::vector<index_t> widths_;
  index_t groups_;
  double epsilon_;
  std::vector<affine_storage<T>> affine_;
  growing_workspace workspace_;
};

}  // namespace mlp
