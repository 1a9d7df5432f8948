// SPDX-License-Identifier: MIT
// The host's grouped Kalman normalization, built on bkn: diagonal mode, statistics groups,
// per-channel gains, a learned diagonal transition. Compiled as C++17; bkn stays in this file.
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

class grouped_kalman_norm final : public host::normalization {
 public:
  grouped_kalman_norm(index_t channels, index_t group_size)
      : channels_(channels),
        gamma_(size(channels), 1.0f),
        beta_(size(channels), 0.0f),
        gain_logit_(size(channels), 0.0f),  // q = 1/2 per channel
        transition_(size(channels), 1.0f),
        noise_(size(channels), float(std::log(std::expm1(0.01)))),  // r = 0.01
        dgamma_(gamma_.size()), dbeta_(beta_.size()), dgain_logit_(gain_logit_.size()),
        dtransition_(transition_.size()), dnoise_(noise_.size()),
        running_mean_(size(channels), 0.0f),
        running_var_(size(channels), 1.0f) {
    opt_.mode = bkn::covariance::diagonal;
    opt_.group_size = group_size;
  }

  std::size_t workspace_bytes(const host::shape4& s) const override {
    return bkn::workspace_size(backend_, opt_, shape(s), transition());
  }

  void forward(const float* x, float* y, const host::shape4& s, host::layout l,
               const host::chain_link* prior, void* workspace, std::size_t bytes) override {
    resize_state(s);
    bkn::forward(backend_, opt_, layer(), view(x, s, l), view(y, s, l), prior_of(prior),
                 workspace_of(workspace, bytes));
    std::fill(dposterior_mean_.begin(), dposterior_mean_.end(), 0.0f);
    std::fill(dposterior_var_.begin(), dposterior_var_.end(), 0.0f);
  }

  void backward(const float* x, const float* dy, float* dx, const host::shape4& s,
                host::layout l, const host::chain_link* prior, void* workspace,
                std::size_t bytes) override {
    bkn::gaussian_view<float> dprior;
    if (prior)
      dprior = {{prior->dmean, prior->groups * prior->channels},
                {prior->dvar, prior->groups * prior->channels},
                prior->groups,
                prior->channels};
    bkn::backward(backend_, opt_, layer(), view(x, s, l), view(dy, s, l), view(dx, s, l),
                  prior_of(prior), dprior, workspace_of(workspace, bytes));
  }

  host::chain_link posterior() override {
    return {posterior_mean_.data(), posterior_var_.data(), dposterior_mean_.data(),
            dposterior_var_.data(), groups_, channels_};
  }

  std::vector<host::parameter> parameters() override {
    return {{"gamma", gamma_.data(), dgamma_.data(), channels_},
            {"beta", beta_.data(), dbeta_.data(), channels_},
            {"gain_logit", gain_logit_.data(), dgain_logit_.data(), channels_},
            {"transition", transition_.data(), dtransition_.data(), channels_},
            {"noise", noise_.data(), dnoise_.data(), channels_}};
  }

 private:
  static std::size_t size(index_t n) { return static_cast<std::size_t>(n); }
  static bkn::tensor_shape shape(const host::shape4& s) { return {s.n, s.c, s.h, s.w}; }
  static bkn::span<std::byte> workspace_of(void* p, std::size_t bytes) {
    return {static_cast<std::byte*>(p), index_t(bytes)};
  }
  static bkn::gaussian_view<const float> prior_of(const host::chain_link* link) {
    if (!link) return {};
    const index_t n = link->groups * link->channels;
    return {{link->mean, n}, {link->var, n}, link->groups, link->channels};
  }

  bkn::transition<float> transition() const {
    return bkn::transition<float>::diagonal({transition_.data(), channels_});
  }

  // The per-batch state is host memory sized by the batch; it is only reallocated when the
  // number of groups changes, and a batch bkn will reject (N not a multiple of the group size)
  // leaves it as it was.
  void resize_state(const host::shape4& s) {
    if (opt_.group_size <= 0 || s.n <= 0 || s.n % opt_.group_size != 0) return;
    const index_t groups = s.n / opt_.group_size;
    if (groups == groups_) return;
    groups_ = groups;
    for (auto* v : {&observed_mean_, &observed_var_, &predicted_mean_, &predicted_var_,
                    &posterior_mean_, &posterior_var_, &dposterior_mean_, &dposterior_var_})
      v->assign(size(groups_ * channels_), 0.0f);
  }

  bkn::layer<float> layer() {
    bkn::layer<float> L;
    L.params = {gamma_, beta_, gain_logit_, transition(), noise_};
    L.grads = {span_of(dgamma_), span_of(dbeta_), span_of(dgain_logit_), span_of(dnoise_),
               span_of(dtransition_), {}};
    L.running = {span_of(running_mean_), span_of(running_var_), {}};
    L.state.observed = {span_of(observed_mean_), span_of(observed_var_), groups_, channels_};
    L.state.predicted = {span_of(predicted_mean_), span_of(predicted_var_), groups_, channels_};
    L.state.posterior = {span_of(posterior_mean_), span_of(posterior_var_), groups_, channels_};
    L.state.dposterior = {span_of(dposterior_mean_), span_of(dposterior_var_), groups_,
                          channels_};
    return L;
  }

  bkn::reference_backend backend_;
  bkn::options opt_;
  index_t channels_, groups_ = 0;
  std::vector<float> gamma_, beta_, gain_logit_, transition_, noise_;
  std::vector<float> dgamma_, dbeta_, dgain_logit_, dtransition_, dnoise_;
  std::vector<float> running_mean_, running_var_;
  std::vector<float> observed_mean_, observed_var_, predicted_mean_, predicted_var_;
  std::vector<float> posterior_mean_, posterior_var_, dposterior_mean_, dposterior_var_;
};

}  // namespace

std::unique_ptr<host::normalization> host::make_grouped_kalman_norm(std::int64_t channels,
                                                                    std::int64_t group_size) {
  return std::make_unique<grouped_kalman_norm>(channels, group_size);
}
