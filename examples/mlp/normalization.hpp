// SPDX-License-Identifier: MIT
// The normalization choices of the MLP, each one small adapter behind one interface: none,
// batch normalization and BKN (identity, diagonal, dense or host-weights transition) over bkn.
#pragma once

#include <bkn/bkn.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "layers.hpp"

namespace mlp {

/// What a forward pass is for: training (batch statistics, moving averages updated), or
/// inference with the moving averages, or with the test batch's own statistics (the paper's
/// Table 3 reports both).
enum class phase { train, infer_moving, infer_batch };

/// What a normalization choice needs to know about the network it is part of.
template <class T>
struct host_network {
  index_t input_features = 0;
  std::vector<index_t> widths;     ///< channels of each normalized (hidden) layer
  std::vector<linear<T>*> layers;  ///< layers[k] computes normalized layer k's input
  index_t max_batch = 0;           ///< the largest batch any call will see
  /// Per-feature mean and variance of the (standardized) training inputs.
  std::vector<double> input_mean, input_var;
};

/// How statistics are gathered, the same for every choice.
struct statistics_settings {
  index_t statistics_batch = 0;  ///< samples per statistics group; 0: the whole batch
  double momentum = 0.1;         ///< of the moving averages
  double epsilon = 1e-5;
};

/// One normalization choice for all hidden layers of the MLP. Layers are called in order
/// forward (k = 0, 1, ...) and in reverse order backward, after a training forward of the same
/// batch; x is normalized layer k's input, n rows of widths[k] values.
template <class T>
class normalization {
 public:
  virtual ~normalization() = default;
  virtual void forward(int k, const T* x, T* y, index_t n, phase ph) = 0;
  /// Writes dx, and the gradients parameters() lists (a weights transition also adds into the
  /// host's linear layers' gradients, which the host zeroes before the step).
  virtual void backward(int k, const T* x, const T* dy, T* dx, index_t n) = 0;
  virtual std::vector<parameter<T>> parameters() = 0;
  /// Each layer's Kalman gain q, for the log (empty: not a BKN choice).
  virtual std::vector<double> gains() const { return {}; }
  /// The fraction of the training steps done, before each step (batch renormalization's
  /// schedule of r_max and d_max reads it).
  virtual void set_progress(double /*fraction*/) {}
};

// ---- none ---------------------------------------------------------------------------------

template <class T>
class no_normalization final : public normalization<T> {
 public:
  explicit no_normalization(const host_network<T>& net) : widths_(net.widths) {}
  void forward(int k, const T* x, T* y, index_t n, phase) override {
    std::copy(x, x + n * widths_[std::size_t(k)], y);
  }
  void backward(int k, const T*, const T* dy, T* dx, index_t n) override {
    std::copy(dy, dy + n * widths_[std::size_t(k)], dx);
  }
  std::vector<parameter<T>> parameters() override { return {}; }

 private:
  std::vector<index_t> widths_;
};

// ---- what the bkn-based choices share -----------------------------------------------------

/// A host workspace that grows to the largest size asked for (the routines never allocate:
/// the host sizes their workspace with workspace_size, and reallocates only on a new shape).
class growing_workspace {
 public:
  bkn::span<std::byte> get(std::size_t bytes) {
    if (!memory_ || bytes > bytes_) {
      memory_ = std::make_unique<bkn::host_workspace>(bytes);
      bytes_ = bytes;
    }
    return memory_->bytes();
  }

 private:
  std::unique_ptr<bkn::host_workspace> memory_;
  std::size_t bytes_ = 0;
};

/// Samples per statistics group for a batch of n (bkn's 0: the whole batch). A batch that the
/// statistics batch does not divide is one group: the host makes such calls only for the
/// leftover of a test set, which joins the last group.
inline index_t group_size_for(index_t n, index_t statistics_batch) {
  const index_t s = statistics_batch;
  return s > 0 && s < n && n % s == 0 ? s : 0;
}

/// One bkn layer per hidden layer, with the state sized for the most groups a batch can have
/// and viewed for the groups of the current call.
template <class Backend, class T>
class bkn_layers {
 protected:
  bkn_layers(Backend backend, const host_network<T>& net, statistics_settings stats)
      : backend_(backend), net_(net), stats_(stats) {}

  index_t group_size(index_t n) const { return group_size_for(n, stats_.statistics_batch); }
  index_t groups(index_t n) const {
    const index_t s = group_size(n);
    return s > 0 ? n / s : 1;
  }
  bkn::options options(index_t n, phase ph) const {
    bkn::options o;
    o.group_size = group_size(n);
    o.epsilon = stats_.epsilon;
    o.momentum = stats_.momentum;
    o.training = ph == phase::train;
    o.inference = ph == phase::infer_batch ? bkn::inference_statistics::chain
                                           : bkn::inference_statistics::running;
    return o;
  }

  void add_layer(const bkn::layer_config& cfg) { storage_.emplace_back(cfg); }

  /// Layer k's views with its states cut to G groups.
  bkn::layer<T> view(int k, index_t G) {
    bkn::layer_storage<T>& s = storage_[std::size_t(k)];
    bkn::layer<T> L = s.view();
    const index_t C = s.config().channels;
    const auto cut = [&](std::vector<T>& mean, std::vector<T>& cov) {
      return bkn::gaussian_view<T>(bkn::span<T>(mean.data(), G * C),
                                   bkn::span<T>(cov.data(), G * C), G, C);
    };
    L.state.observed = cut(s.observed_mean, s.observed_cov);
    L.state.predicted = cut(s.predicted_mean, s.predicted_cov);
    L.state.posterior = cut(s.posterior_mean, s.posterior_cov);
    L.state.dposterior = cut(s.dposterior_mean, s.dposterior_cov);
    return L;
  }

  bkn::tensor_view<const T> in(const T* x, int k, index_t n) const {
    return bkn::nc(x, n, net_.widths[std::size_t(k)]);
  }
  bkn::tensor_view<T> out(T* y, int k, index_t n) const {
    return bkn::nc(y, n, net_.widths[std::size_t(k)]);
  }

  void affine_parameters(std::vector<parameter<T>>& out_list) {
    for (std::size_t k = 0; k < storage_.size(); ++k) {
      auto& s = storage_[k];
      const std::string name = "norm" + std::to_string(k);
      out_list.push_back({name + ".gamma", s.gamma.data(), s.dgamma.data(),
                          index_t(s.gamma.size()), false});
      out_list.push_back({name + ".beta", s.beta.data(), s.dbeta.data(), index_t(s.beta.size()),
                          false});
    }
  }

  Backend backend_;
  host_network<T> net_;
  statistics_settings stats_;
  std::vector<bkn::layer_storage<T>> storage_;
  growing_workspace workspace_;
};

/// A layer_config for a normalized layer of C channels with room for a batch of max_batch.
inline bkn::layer_config plain_config(index_t channels, index_t max_batch) {
  bkn::layer_config cfg;
  cfg.channels = channels;
  cfg.groups = max_batch;  // at most one group per sample
  cfg.noise = false;
  return cfg;
}

// ---- batch normalization: bkn::forward without a prior (q = 1) ----------------------------

template <class Backend, class T>
class batch_normalization final : public normalization<T>, bkn_layers<Backend, T> {
  using base = bkn_layers<Backend, T>;

 public:
  batch_normalization(Backend backend, const host_network<T>& net, statistics_settings stats)
      : base(backend, net, stats) {
    for (index_t C : net.widths) this->add_layer(plain_config(C, net.max_batch));
  }

  void forward(int k, const T* x, T* y, index_t n, phase ph) override {
    const bkn::options opt = this->options(n, ph);
    const auto shape = this->in(x, k, n).shape();
    bkn::forward(this->backend_, opt, this->view(k, this->groups(n)), this->in(x, k, n),
                 this->out(y, k, n), {},
                 this->workspace_.get(bkn::workspace_size(this->backend_, opt, shape)));
  }

  void backward(int k, const T* x, const T* dy, T* dx, index_t n) override {
    const bkn::options opt = this->options(n, phase::train);
    const auto shape = this->in(x, k, n).shape();
    bkn::backward(this->backend_, opt, this->view(k, this->groups(n)), this->in(x, k, n),
                  this->in(dy, k, n), this->out(dx, k, n), {}, {},
                  this->workspace_.get(bkn::workspace_size(this->backend_, opt, shape)));
  }

  std::vector<parameter<T>> parameters() override {
    std::vector<parameter<T>> p;
    this->affine_parameters(p);
    return p;
  }
};

// ---- Batch Kalman Normalization ----------------------------------------------------------

/// How layer k's statistics are predicted from layer k-1's (docs/math.md): bkn's identity,
/// learned diagonal or dense A acting on the previous posterior, or the host's own next
/// linear layer through ReLU acting on the previous layer's normalized output.
enum class bkn_transition { identity, diagonal, dense, weights };

struct bkn_settings {
  bkn_transition transition = bkn_transition::weights;
  double fixed_gain = -1;  ///< q in [0, 1]; negative: learned through its logit
  bool per_channel_gain = false;
  /// The first layer's prior: the training inputs' per-feature statistics pushed through the
  /// first linear layer (without it the first layer uses batch statistics, q = 1).
  bool input_prior = true;
  double initial_gain = 0.5;
};

/// BKN over the hidden layers.
///
/// With the weights transition, layer k's prior is the distribution of layer k-1's normalized
/// output y = gamma (x - mu) / sqrt(v + eps) + beta when x follows layer k-1's posterior
/// N(mu, v): N(beta, gamma^2 v / (v + eps)), which is what bkn's transition through ReLU and
/// the weights takes (docs/math.md, "What the prior describes"). It hardly depends on the
/// group (v / (v + eps) ~ 1), so the adapter shares one prior with variance gamma^2 times the
/// groups' mean of v / (v + eps), and carries the gradient of that fold back to gamma, beta
/// and v. The first layer's input prior is shared by every group too.
///
/// A shared prior gives every group the same prediction, but bkn::forward predicts once per
/// group, O(G C C') through the weights. So a one-group "proxy" layer with a fixed q = 0,
/// whose posterior is then exactly its prediction, predicts once per batch, and the layer
/// itself takes that prediction as its prior through an identity transition without noise.
/// Backward runs the same way in reverse: the layer's d(prior) is the proxy's d(posterior);
/// the proxy's backward with dy = 0 adds the weights' share into the host's gradients and
/// gives d(noise) and the fold's gradient. tests/gradients.cpp checks the whole network by
/// finite differences.
template <class Backend, class T>
class kalman_normalization final : public normalization<T>, bkn_layers<Backend, T> {
  using base = bkn_layers<Backend, T>;

 public:
  kalman_normalization(Backend backend, const host_network<T>& net, statistics_settings stats,
                       bkn_settings settings)
      : base(backend, net, stats), cfg_(settings) {
    const std::size_t L = net.widths.size();
    if (settings.input_prior && index_t(net.input_mean.size()) != net.input_features)
      throw std::invalid_argument("BKN's input prior needs the inputs' per-feature statistics");
    input_mean_.assign(net.input_mean.begin(), net.input_mean.end());
    input_var_.assign(net.input_var.begin(), net.input_var.end());
    proxies_.resize(L);
    for (std::size_t k = 0; k < L; ++k) {
      const index_t C = net.widths[k];
      bkn::layer_config c = plain_config(C, net.max_batch);
      c.per_channel_gain = settings.per_channel_gain;
      c.initial_gain = settings.initial_gain;
      if (through_weights(int(k))) {
        bkn::layer_config p;  // the proxy: its noise is the layer's R
        p.channels = C;
        p.groups = 1;
        p.affine = false;
        proxies_[k] = std::make_unique<proxy>(p);
      } else if (k > 0) {
        c.noise = true;
        if (settings.transition != bkn_transition::dense && C != net.widths[k - 1])
          throw std::invalid_argument(
              std::string("BKN with an ") +
              (settings.transition == bkn_transition::identity ? "identity" : "diagonal") +
              " transition needs equal hidden widths, got " + std::to_string(net.widths[k - 1]) +
              " then " + std::to_string(C) + " (use a dense or weights transition)");
        c.transition = settings.transition == bkn_transition::identity
                           ? bkn::transition_kind::identity
                       : settings.transition == bkn_transition::diagonal
                           ? bkn::transition_kind::diagonal
                           : bkn::transition_kind::dense;
        c.in_channels = net.widths[k - 1];
      }
      this->add_layer(c);
    }
  }

  void forward(int k, const T* x, T* y, index_t n, phase ph) override {
    const bkn::options opt = this->options(n, ph);
    bkn::layer<T> L = layer(k, this->groups(n));
    bkn::gaussian_view<const T> prior;
    if (ph != phase::infer_moving) prior = prior_of(k, this->groups(n), true);
    const auto shape = this->in(x, k, n).shape();
    bkn::forward(this->backend_, opt, L, this->in(x, k, n), this->out(y, k, n), prior,
                 this->workspace_.get(
                     bkn::workspace_size(this->backend_, opt, shape, L.params.transition)));
  }

  void backward(int k, const T* x, const T* dy, T* dx, index_t n) override {
    const bkn::options opt = this->options(n, phase::train);
    const index_t G = this->groups(n);
    const std::size_t K = std::size_t(k);
    bkn::layer<T> L = layer(k, G);
    if (K + 1 == this->storage_.size()) L.state.dposterior = {};  // its posterior feeds nothing
    bkn::gaussian_view<T> dprior;
    if (proxies_[K])
      dprior = proxies_[K]->view().state.dposterior;
    else if (k > 0)
      dprior = this->view(k - 1, G).state.dposterior;
    const auto shape = this->in(x, k, n).shape();
    bkn::backward(this->backend_, opt, L, this->in(x, k, n), this->in(dy, k, n),
                  this->out(dx, k, n), prior_of(k, G, false), dprior,
                  this->workspace_.get(
                      bkn::workspace_size(this->backend_, opt, shape, L.params.transition)));
    if (proxies_[K]) proxy_backward(k, G);
    if (k > 0 && proxies_[K]) fold_backward(k - 1, G);
    if (K + 1 < proxies_.size() && proxies_[K + 1]) {
      // What the next layer's prior sent back to this layer's gamma and beta (fold_backward),
      // added now that this layer's backward has written its own.
      auto& s = this->storage_[K];
      for (std::size_t c = 0; c < s.dgamma.size(); ++c) {
        s.dgamma[c] += extra_dgamma_[K][c];
        s.dbeta[c] += extra_dbeta_[K][c];
      }
    }
  }

  std::vector<parameter<T>> parameters() override {
    std::vector<parameter<T>> p;
    this->affine_parameters(p);
    for (std::size_t k = 0; k < this->storage_.size(); ++k) {
      if (k == 0 && !cfg_.input_prior) continue;  // no prior: no gain, noise or transition
      auto& s = this->storage_[k];
      const std::string name = "norm" + std::to_string(k);
      if (cfg_.fixed_gain < 0)
        p.push_back({name + ".gain_logit", s.gain_logit.data(), s.dgain_logit.data(),
                     index_t(s.gain_logit.size()), false});
      auto& noisy = proxies_[k] ? proxies_[k]->storage : s;
      p.push_back({name + ".noise", noisy.noise.data(), noisy.dnoise.data(),
                   index_t(noisy.noise.size()), false});
      if (!s.transition_weights.empty())
        p.push_back({name + ".transition", s.transition_weights.data(),
                     s.dtransition_weights.data(), index_t(s.transition_weights.size()), false});
    }
    return p;
  }

  /// Per-channel gains are averaged; a first layer without a prior reports q = 1.
  std::vector<double> gains() const override {
    std::vector<double> q;
    for (const auto& s : this->storage_) {
      if (q.empty() && !cfg_.input_prior) {
        q.push_back(1);
        continue;
      }
      double sum = 0;
      for (T t : s.gain_logit) sum += 1 / (1 + std::exp(-double(t)));
      q.push_back(cfg_.fixed_gain >= 0 ? cfg_.fixed_gain : sum / double(s.gain_logit.size()));
    }
    return q;
  }

 private:
  /// The one-group layer that predicts a layer's statistics through the host's weights, and
  /// its dummy one-sample input (zero, with zero gradient).
  struct proxy {
    explicit proxy(const bkn::layer_config& cfg)
        : storage(cfg),
          zeros(std::size_t(cfg.channels), T(0)),
          y(zeros.size()),
          dx(zeros.size()) {}
    bkn::layer<T> view() {
      bkn::layer<T> L = storage.view();
      L.running = {};
      L.params.gain_logit = {};
      L.grads.gain_logit = {};
      return L;
    }
    bkn::layer_storage<T> storage;
    buffer<T> zeros, y, dx;
    std::vector<T> fold_mean, fold_var, dfold_mean, dfold_var;  // its prior and the gradient
  };

  bool through_weights(int k) const {
    return k == 0 ? cfg_.input_prior : cfg_.transition == bkn_transition::weights;
  }

  /// A fixed gain is an option of the call, not a parameter.
  bkn::options options(index_t n, phase ph) const {
    bkn::options o = base::options(n, ph);
    o.fixed_gain = cfg_.fixed_gain;
    return o;
  }

  bkn::options proxy_options() const {
    bkn::options o;
    o.epsilon = this->stats_.epsilon;
    o.fixed_gain = 0;  // posterior = prediction
    return o;
  }

  /// Layer k's views with the gain and transition this choice gives it.
  bkn::layer<T> layer(int k, index_t G) {
    bkn::layer<T> L = this->view(k, G);
    if (cfg_.fixed_gain >= 0) {
      L.params.gain_logit = {};
      L.grads.gain_logit = {};
    }
    return L;
  }

  /// Layer k's prior: none, the proxy's prediction, or layer k-1's posterior. With `predict`
  /// the proxy runs its forward first (forward passes; backward reads what it left).
  bkn::gaussian_view<const T> prior_of(int k, index_t G, bool predict) {
    const std::size_t K = std::size_t(k);
    if (proxies_[K]) {
      proxy& p = *proxies_[K];
      bkn::layer<T> P = p.view();
      if (predict) run_proxy(k, G, P);
      return P.state.posterior;
    }
    if (k == 0) return {};
    return this->view(k - 1, G).state.posterior;
  }

  /// The transition through the host's linear layer k (the first one: no activation before
  /// it), and the proxy's own prior.
  bkn::transition<T> host_transition(int k) const {
    const linear<T>* host = this->net_.layers[std::size_t(k)];
    return bkn::transition<T>::linear(host->weight, host->bias, host->in,
                                      k == 0 ? bkn::activation::none : bkn::activation::relu);
  }

  bkn::gaussian_view<const T> proxy_prior(int k) {
    if (k == 0)
      return bkn::gaussian_view<const T>(bkn::span<const T>(input_mean_),
                                         bkn::span<const T>(input_var_), 1,
                                         this->net_.input_features);
    proxy& p = *proxies_[std::size_t(k)];
    return bkn::gaussian_view<const T>(bkn::span<const T>(p.fold_mean),
                                       bkn::span<const T>(p.fold_var), 1,
                                       index_t(p.fold_mean.size()));
  }

  void run_proxy(int k, index_t G, bkn::layer<T> P) {
    if (k > 0) fold(k, G);
    P.params.transition = host_transition(k);
    const index_t C = this->net_.widths[std::size_t(k)];
    proxy& p = *proxies_[std::size_t(k)];
    const bkn::options opt = proxy_options();
    bkn::forward(this->backend_, opt, P, bkn::nc(p.zeros.data(), 1, C), bkn::nc(p.y.data(), 1, C),
                 proxy_prior(k),
                 this->workspace_.get(
                     bkn::workspace_size(this->backend_, opt, {1, C, 1, 1}, P.params.transition)));
  }

  /// Layer k's prior from layer k-1: N(beta, gamma^2 mean_g(v / (v + eps))).
  void fold(int k, index_t G) {
    proxy& p = *proxies_[std::size_t(k)];
    const auto& s = this->storage_[std::size_t(k - 1)];
    const bkn::gaussian_view<T> post = this->view(k - 1, G).state.posterior;
    const index_t C = post.channels;
    const double eps = this->stats_.epsilon;
    p.fold_mean.assign(std::size_t(C), T(0));
    p.fold_var.assign(std::size_t(C), T(0));
    for (index_t c = 0; c < C; ++c) {
      double ratio = 0;
      for (index_t g = 0; g < G; ++g) {
        const double v = double(post.cov[g * C + c]);
        ratio += v / (v + eps);
      }
      const double gamma = double(s.gamma[std::size_t(c)]);
      p.fold_mean[std::size_t(c)] = s.beta[std::size_t(c)];
      p.fold_var[std::size_t(c)] = T(gamma * gamma * ratio / double(G));
    }
  }

  /// The proxy's backward: from the gradient of its posterior (the layer's d(prior)) to the
  /// host's weights (added), the noise, and the gradient of its prior.
  void proxy_backward(int k, index_t /*G*/) {
    proxy& p = *proxies_[std::size_t(k)];
    bkn::layer<T> P = p.view();
    P.params.transition = host_transition(k);
    linear<T>* host = this->net_.layers[std::size_t(k)];
    P.grads.transition = host->dweight;
    P.grads.transition_bias = host->dbias;
    const index_t C = this->net_.widths[std::size_t(k)];
    bkn::gaussian_view<T> dprior;
    if (k > 0) {
      p.dfold_mean.assign(p.fold_mean.size(), T(0));
      p.dfold_var.assign(p.fold_var.size(), T(0));
      dprior = bkn::gaussian_view<T>(bkn::span<T>(p.dfold_mean), bkn::span<T>(p.dfold_var), 1,
                                     index_t(p.dfold_mean.size()));
    }
    const bkn::options opt = proxy_options();
    bkn::backward(this->backend_, opt, P, bkn::nc(p.zeros.data(), 1, C),
                  bkn::nc(p.zeros.data(), 1, C), bkn::nc(p.dx.data(), 1, C), proxy_prior(k),
                  dprior,
                  this->workspace_.get(
                      bkn::workspace_size(this->backend_, opt, {1, C, 1, 1}, P.params.transition)));
  }

  /// From the gradient of layer k+1's prior to layer k's gamma and beta (kept until layer k's
  /// backward has written its own) and to its posterior.
  void fold_backward(int k, index_t G) {
    const std::size_t K = std::size_t(k);
    const proxy& p = *proxies_[K + 1];
    auto& s = this->storage_[K];
    const bkn::gaussian_view<T> post = this->view(k, G).state.posterior;
    const bkn::gaussian_view<T> dpost = this->view(k, G).state.dposterior;
    const index_t C = post.channels;
    const double eps = this->stats_.epsilon;
    extra_dgamma_.resize(this->storage_.size());
    extra_dbeta_.resize(this->storage_.size());
    extra_dgamma_[K].assign(std::size_t(C), T(0));
    extra_dbeta_[K].assign(std::size_t(C), T(0));
    for (index_t c = 0; c < C; ++c) {
      const double gamma = double(s.gamma[std::size_t(c)]);
      const double dvar = double(p.dfold_var[std::size_t(c)]);
      double ratio = 0;
      for (index_t g = 0; g < G; ++g) {
        const double v = double(post.cov[g * C + c]), s2 = v + eps;
        ratio += v / s2;
        dpost.mean[g * C + c] = T(0);
        dpost.cov[g * C + c] = T(dvar * gamma * gamma * eps / (s2 * s2) / double(G));
      }
      extra_dbeta_[K][std::size_t(c)] = p.dfold_mean[std::size_t(c)];
      extra_dgamma_[K][std::size_t(c)] = T(dvar * 2 * gamma * ratio / double(G));
    }
  }

  bkn_settings cfg_;
  std::vector<T> input_mean_, input_var_;
  std::vector<std::unique_ptr<proxy>> proxies_;  // per layer; null: no weights transition
  std::vector<std::vector<T>> extra_dgamma_, extra_dbeta_;
};

}  // namespace mlp
