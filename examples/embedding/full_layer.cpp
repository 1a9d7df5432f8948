// SPDX-License-Identifier: MIT
// The host's full-covariance Kalman normalization, built on bkn: full mode, one gain per layer,
// an identity transition, its own epsilon and momentum. Compiled as C++20; bkn stays here.
#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "host_layer.hpp"

namespace {

using bkn::index_t;

template <class T>
bkn::tensor_view<T> view(T* data, const host::shape4& s, host::layout l) {
  return l == host::layout::nchw ? bkn::nchw(data, s.n, s.c, s.h, s.w)
                                 : bkn::nhwc(data, s.n, s.c, s.h, s.w);
}

template <class T>
bkn::span<T> span_of(std::vector<T>& v) {
  return {v.data(), index_t(v.size())};
}

class full_kalman_norm final : public host::normalization {
 public:
  full_kalman_norm(index_t channels, index_t group_size)
      : channels_(channels),
        gamma_(size(channels), 1.0f),
        beta_(size(channels), 0.0f),
        gain_logit_(1, 0.0f),  // q = 1/2 for the whole layer
        noise_(size(channels), float(std::log(std::expm1(0.05)))),  // r = 0.05
        dgamma_(gamma_.size()), dbeta_(beta_.size()), dgain_logit_(1), dnoise_(noise_.size()),
        running_mean_(size(channels), 0.0f),
        running_var_(size(channels), 1.0f) {
    opt_.mode = bkn::covariance::full;
    opt_.group_size = group_size;
    opt_.epsilon = 1e-3;
    opt_.momentum = 0.2;
  }

  std::size_t workspace_bytes(const host::shape4& s) const override {
    return bkn::workspace_size(backend_, opt_, {s.n, s.c, s.h, s.w});
  }

  void forward(const float* x, float* y, const host::shape4& s, host::layout l,
               const host::chain_link* prior, void* workspace, std::size_t bytes) override {
    resize_state(s);
    bkn::forward(backend_, opt_, layer(), view(x, s, l), view(y, s, l), prior_of(prior),
                 workspace_of(workspace, bytes));
    // The link carries variances: the diagonal of the posterior covariance.
    const index_t C = channels_;
    for (index_t i = 0; i < groups_ * C; ++i)
      posterior_var_[size(i)] = posterior_cov_[size(i * C + i % C)];
    std::fill(dposterior_mean_.begin(), dposterior_mean_.end(), 0.0f);
    std::fill(dposterior_var_.begin(), dposterior_var_.end(), 0.0f);
  }

  void backward(const float* x, const float* dy, float* dx, const host::shape4& s,
                host::layout l, const host::chain_link* prior, void* workspace,
                std::size_t bytes) override {
    // The next layer saw only the variances, so d(posterior cov) is diagonal.
    const index_t C = channels_;
    std::fill(dposterior_cov_.begin(), dposterior_cov_.end(), 0.0f);
    for (index_t i = 0; i < groups_ * C; ++i)
      dposterior_cov_[size(i * C + i % C)] = dposterior_var_[size(i)];
    bkn::gaussian_view<float> dprior;
    if (prior) {
      const index_t n = prior->groups * prior->channels;
      dprior_cov_.assign(size(n * prior->channels), 0.0f);
      dprior = {{prior->dmean, n}, span_of(dprior_cov_), prior->groups, prior->channels};
    }
    bkn::backward(backend_, opt_, layer(), view(x, s, l), view(dy, s, l), view(dx, s, l),
                  prior_of(prior), dprior, workspace_of(workspace, bytes));
    // A variance is the diagonal of the prior's covariance: its gradient is that diagonal's.
    if (prior)
      for (index_t i = 0; i < prior->groups * prior->channels; ++i)
        prior->dvar[i] = dprior_cov_[size(i * prior->channels + i % prior->channels)];
  }

  host::chain_link posterior() override {
    return {posterior_mean_.data(), posterior_var_.data(), dposterior_mean_.data(),
            dposterior_var_.data(), groups_, channels_};
  }

  std::vector<host::parameter> parameters() override {
    return {{"gamma", gamma_.data(), dgamma_.data(), channels_},
            {"beta", beta_.data(), dbeta_.data(), channels_},
            {"gain_logit", gain_logit_.data(), dgain_logit_.data(), 1},
            {"noise", noise_.data(), dnoise_.data(), channels_}};
  }

 private:
  static std::size_t size(index_t n) { return static_cast<std::size_t>(n); }
  static bkn::span<std::byte> workspace_of(void* p, std::size_t bytes) {
    return {static_cast<std::byte*>(p), index_t(bytes)};
  }

  // A prior of variances is a diagonal covariance; it is rebuilt from the link on each call,
  // so forward and backward see the same one.
  bkn::gaussian_view<const float> prior_of(const host::chain_link* link) {
    if (!link) return {};
    const index_t n = link->groups * link->channels;
    prior_cov_.assign(size(n * link->channels), 0.0f);
    for (index_t i = 0; i < n; ++i)
      prior_cov_[size(i * link->channels + i % link->channels)] = link->var[i];
    return {{link->mean, n}, {prior_cov_.data(), index_t(prior_cov_.size())}, link->groups,
            link->channels};
  }

  // Reallocated only when the number of groups changes; a batch bkn will reject leaves it.
  void resize_state(const host::shape4& s) {
    if (opt_.group_size <= 0 || s.n <= 0 || s.n % opt_.group_size != 0) return;
    const index_t groups = s.n / opt_.group_size;
    if (groups == groups_) return;
    groups_ = groups;
    const index_t C = channels_;
    for (auto* v : {&observed_mean_, &predicted_mean_, &posterior_mean_, &posterior_var_,
                    &dposterior_mean_, &dposterior_var_})
      v->assign(size(groups_ * C), 0.0f);
    for (auto* v : {&observed_cov_, &predicted_cov_, &posterior_cov_, &dposterior_cov_})
      v->assign(size(groups_ * C * C), 0.0f);
  }

  bkn::layer<float> layer() {
    const index_t G = groups_, C = channels_;
    bkn::layer<float> L;
    L.params = {gamma_, beta_, gain_logit_, bkn::transition<float>::identity(), noise_};
    L.grads = {span_of(dgamma_), span_of(dbeta_), span_of(dgain_logit_), span_of(dnoise_), {},
               {}};
    L.running = {span_of(running_mean_), span_of(running_var_), {}};
    L.state.observed = {span_of(observed_mean_), span_of(observed_cov_), G, C};
    L.state.predicted = {span_of(predicted_mean_), span_of(predicted_cov_), G, C};
    L.state.posterior = {span_of(posterior_mean_), span_of(posterior_cov_), G, C};
    L.state.dposterior = {span_of(dposterior_mean_), span_of(dposterior_cov_), G, C};
    return L;
  }

  bkn::reference_backend backend_;
  bkn::options opt_;
  index_t channels_, groups_ = 0;
  std::vector<float> gamma_, beta_, gain_logit_, noise_;
  std::vector<float> dgamma_, dbeta_, dgain_logit_, dnoise_;
  std::vector<float> running_mean_, running_var_;
  std::vector<float> observed_mean_, observed_cov_, predicted_mean_, predicted_cov_;
  std::vector<float> posterior_mean_, posterior_cov_, posterior_var_;
  std::vector<float> dposterior_mean_, dposterior_cov_, dposterior_var_;
  std::vector<float> prior_cov_, dprior_cov_;
};

}  // namespace

std::unique_ptr<host::normalization> host::make_full_kalman_norm(std::int64_t channels,
                                                                 std::int64_t group_size) {
  return std::make_unique<full_kalman_norm>(channels, group_size);
}
