// Tests of bkn/storage.hpp: what layer_storage allocates for each configuration, its initial
// values (q = initial_gain through the sigmoid, r = initial_noise through softplus, A = I),
// the views it hands out, and host_workspace's size and alignment.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"

namespace {

using bkn::covariance;
using bkn::index_t;
using bkn::transition_kind;

template <class V>
std::size_t n(const V& v) {
  return v.size();
}

template <class P, class V>
bool views(const bkn::span<P>& s, V& v) {
  return s.data() == v.data() && s.size() == index_t(v.size());
}

}  // namespace

TEST_CASE_TEMPLATE("storage: sizes, diagonal mode, identity transition", P, float, double) {
  bkn::layer_config cfg;
  cfg.channels = 5;
  cfg.groups = 3;
  bkn::layer_storage<P> st(cfg);
  CHECK(n(st.gamma) == 5);
  CHECK(n(st.beta) == 5);
  CHECK(n(st.gain_logit) == 1);
  CHECK(n(st.transition_weights) == 0);
  CHECK(n(st.noise) == 5);
  CHECK(n(st.dgamma) == 5);
  CHECK(n(st.dbeta) == 5);
  CHECK(n(st.dgain_logit) == 1);
  CHECK(n(st.dtransition_weights) == 0);
  CHECK(n(st.dnoise) == 5);
  CHECK(n(st.running_mean) == 5);
  CHECK(n(st.running_var) == 5);
  for (const auto* v :
       {&st.observed_mean, &st.predicted_mean, &st.posterior_mean, &st.dposterior_mean,
        &st.observed_cov, &st.predicted_cov, &st.posterior_cov, &st.dposterior_cov})
    CHECK(n(*v) == 15);  // G x C
}

TEST_CASE_TEMPLATE("storage: sizes, full mode", P, float, double) {
  bkn::layer_config cfg;
  cfg.channels = 4;
  cfg.groups = 2;
  cfg.mode = covariance::full;
  bkn::layer_storage<P> st(cfg);
  for (const auto* v :
       {&st.observed_mean, &st.predicted_mean, &st.posterior_mean, &st.dposterior_mean})
    CHECK(n(*v) == 8);  // G x C
  for (const auto* v : {&st.observed_cov, &st.predicted_cov, &st.posterior_cov, &st.dposterior_cov})
    CHECK(n(*v) == 32);  // G x C x C
  CHECK(n(st.gain_logit) == 1);
  CHECK(n(st.running_var) == 4);
}

TEST_CASE_TEMPLATE("storage: sizes and initial values of the transitions", P, float, double) {
  SUBCASE("diagonal: C ones") {
    bkn::layer_config cfg;
    cfg.channels = 3;
    cfg.transition = transition_kind::diagonal;
    bkn::layer_storage<P> st(cfg);
    CHECK(st.transition_weights == std::vector<P>{1, 1, 1});
    CHECK(n(st.dtransition_weights) == 3);
    const auto L = st.view();
    CHECK(L.params.transition.kind == transition_kind::diagonal);
    CHECK(L.params.transition.weight_count(3) == 3);
    CHECK(L.params.transition.input_channels(3) == 3);
  }
  SUBCASE("dense C x C' with C' > C: identity on the leading diagonal") {
    bkn::layer_config cfg;
    cfg.channels = 2;
    cfg.in_channels = 3;
    cfg.transition = transition_kind::dense;
    bkn::layer_storage<P> st(cfg);
    CHECK(st.transition_weights == std::vector<P>{1, 0, 0, 0, 1, 0});
    CHECK(n(st.dtransition_weights) == 6);
    const auto L = st.view();
    CHECK(L.params.transition.kind == transition_kind::dense);
    CHECK(L.params.transition.in_channels == 3);
    CHECK(L.params.transition.input_channels(2) == 3);
    CHECK(L.params.transition.weights.size() == 6);
  }
  SUBCASE("dense C x C' with C' < C") {
    bkn::layer_config cfg;
    cfg.channels = 3;
    cfg.in_channels = 2;
    cfg.transition = transition_kind::dense;
    bkn::layer_storage<P> st(cfg);
    CHECK(st.transition_weights == std::vector<P>{1, 0, 0, 1, 0, 0});
  }
  SUBCASE("dense with in_channels 0 is C x C") {
    bkn::layer_config cfg;
    cfg.channels = 2;
    cfg.transition = transition_kind::dense;
    bkn::layer_storage<P> st(cfg);
    CHECK(st.transition_weights == std::vector<P>{1, 0, 0, 1});
    CHECK(st.view().params.transition.in_channels == 2);
  }
  SUBCASE("weights (the host's convolution): C x C' x kh x kw, identity on the centre tap") {
    bkn::layer_config cfg;
    cfg.channels = 2;
    cfg.in_channels = 3;
    cfg.transition = transition_kind::weights;
    cfg.conv = bkn::conv2d_geometry{4, 4, 3, 3, 1, 1, 1, 1};  // 3 x 3, padding 1: 4 x 4 out
    bkn::layer_storage<P> st(cfg);
    REQUIRE(n(st.transition_weights) == 2 * 3 * 9);
    CHECK(n(st.dtransition_weights) == 2 * 3 * 9);
    CHECK(st.transition_bias == std::vector<P>{0, 0});
    CHECK(n(st.dtransition_bias) == 2);
    // W[c][k][i][j] at ((c * 3 + k) * 3 + i) * 3 + j: 1 where c == k and (i, j) = (1, 1).
    for (index_t c = 0; c < 2; ++c)
      for (index_t k = 0; k < 3; ++k)
        for (index_t t = 0; t < 9; ++t)
          CHECK(st.transition_weights[std::size_t((c * 3 + k) * 9 + t)] ==
                P(c == k && t == 4 ? 1 : 0));
    const auto L = st.view();
    CHECK(L.params.transition.kind == transition_kind::weights);
    CHECK(L.params.transition.in_channels == 3);
    CHECK(L.params.transition.weight_count(2) == 54);
    CHECK(L.params.transition.act == bkn::activation::relu);
    CHECK(L.params.transition.conv.out_height() == 4);
    CHECK(views(L.params.transition.bias, st.transition_bias));
    CHECK(views(L.grads.transition_bias, st.dtransition_bias));
    CHECK(views(L.grads.transition, st.dtransition_weights));
  }
  SUBCASE("weights without bias, an even kernel") {
    bkn::layer_config cfg;
    cfg.channels = 1;
    cfg.transition = transition_kind::weights;
    cfg.transition_bias = false;
    cfg.act = bkn::activation::none;
    cfg.conv = bkn::conv2d_geometry{3, 3, 2, 2, 1, 1, 0, 0};
    bkn::layer_storage<P> st(cfg);
    // Centre tap of a 2 x 2 kernel: (kh / 2, kw / 2) = (1, 1), index 3.
    CHECK(st.transition_weights == std::vector<P>{0, 0, 0, 1});
    CHECK(st.transition_bias.empty());
    CHECK(st.dtransition_bias.empty());
    CHECK(st.view().params.transition.act == bkn::activation::none);
  }
  SUBCASE("identity: no weights") {
    bkn::layer_config cfg;
    cfg.channels = 2;
    bkn::layer_storage<P> st(cfg);
    CHECK(st.view().params.transition.kind == transition_kind::identity);
    CHECK(st.view().params.transition.weights.empty());
  }
}

TEST_CASE_TEMPLATE("storage: per-channel gain, no affine, no noise", P, float, double) {
  bkn::layer_config cfg;
  cfg.channels = 4;
  cfg.per_channel_gain = true;
  cfg.affine = false;
  cfg.noise = false;
  bkn::layer_storage<P> st(cfg);
  CHECK(n(st.gain_logit) == 4);
  CHECK(n(st.dgain_logit) == 4);
  CHECK(st.gamma.empty());
  CHECK(st.beta.empty());
  CHECK(st.dgamma.empty());
  CHECK(st.dbeta.empty());
  CHECK(st.noise.empty());
  CHECK(st.dnoise.empty());
  const auto L = st.view();
  CHECK(L.params.gamma.empty());  // empty: gamma = 1
  CHECK(L.params.noise.empty());  // empty: R = 0
}

TEST_CASE_TEMPLATE("storage: initial values", P, float, double) {
  // gamma 1, beta 0, moving mean 0 and variance 1, states and gradients 0;
  // sigmoid(gain_logit) = initial_gain, softplus(noise) = initial_noise, up to the rounding
  // of the stored logit and inverse softplus to P (bounds below).
  const P eps = std::numeric_limits<P>::epsilon();
  for (double gain : {0.5, 0.1, 0.9, 0.999}) {
    for (double noise : {0.01, 1.0, 5.0}) {
      CAPTURE(gain);
      CAPTURE(noise);
      bkn::layer_config cfg;
      cfg.channels = 3;
      cfg.groups = 2;
      cfg.per_channel_gain = true;
      cfg.initial_gain = gain;
      cfg.initial_noise = noise;
      bkn::layer_storage<P> st(cfg);
      CHECK(st.gamma == std::vector<P>(3, P(1)));
      CHECK(st.beta == std::vector<P>(3, P(0)));
      CHECK(st.running_mean == std::vector<P>(3, P(0)));
      CHECK(st.running_var == std::vector<P>(3, P(1)));
      for (const auto* v :
           {&st.dgamma, &st.dbeta, &st.dgain_logit, &st.dnoise, &st.observed_mean, &st.observed_cov,
            &st.predicted_mean, &st.predicted_cov, &st.posterior_mean, &st.posterior_cov,
            &st.dposterior_mean, &st.dposterior_cov})
        for (P v2 : *v) CHECK(v2 == 0);
      for (P logit : st.gain_logit) {
        // Independent of bkn::math: the logistic function written out in long double.
        const long double q = 1.0L / (1.0L + std::exp(-static_cast<long double>(logit)));
        // The logit log(q / (1 - q)) is rounded to P: |d logit| <= eps/2 |logit|; q moves by
        // q p |d logit|. Plus the rounding inside the logit's computation: 8 eps of q.
        CHECK(std::fabs(q - gain) <= 8 * eps * gain * (1 + std::fabs(logit)));
      }
      for (P rho : st.noise) {
        // rho = log(expm1(r)) is rounded to P: |d rho| <= eps/2 |rho|, and r moves by
        // sigmoid(rho) |d rho| with sigmoid(rho) = 1 - e^-r <= r; with the rounding inside
        // log/expm1, 8 eps (1 + |rho|) of r is ample.
        const long double r = std::log1p(std::exp(static_cast<long double>(rho)));
        CHECK(std::fabs(r - noise) <= 8 * eps * noise * (1 + std::fabs(rho)));
      }
    }
  }
}

TEST_CASE_TEMPLATE("storage: view() points at the storage", P, float, double) {
  bkn::layer_config cfg;
  cfg.channels = 3;
  cfg.groups = 2;
  cfg.mode = covariance::full;
  cfg.transition = transition_kind::dense;
  cfg.in_channels = 4;
  bkn::layer_storage<P> st(cfg);
  const auto L = st.view();
  CHECK(views(L.params.gamma, st.gamma));
  CHECK(views(L.params.beta, st.beta));
  CHECK(views(L.params.gain_logit, st.gain_logit));
  CHECK(views(L.params.transition.weights, st.transition_weights));
  CHECK(views(L.params.noise, st.noise));
  CHECK(views(L.grads.gamma, st.dgamma));
  CHECK(views(L.grads.beta, st.dbeta));
  CHECK(views(L.grads.gain_logit, st.dgain_logit));
  CHECK(views(L.grads.transition, st.dtransition_weights));
  CHECK(L.grads.transition_bias.empty());  // only a weights transition has a bias
  CHECK(views(L.grads.noise, st.dnoise));
  CHECK(views(L.running.mean, st.running_mean));
  CHECK(views(L.running.var, st.running_var));
  CHECK(views(L.state.observed.mean, st.observed_mean));
  CHECK(views(L.state.observed.cov, st.observed_cov));
  CHECK(views(L.state.predicted.mean, st.predicted_mean));
  CHECK(views(L.state.predicted.cov, st.predicted_cov));
  CHECK(views(L.state.posterior.mean, st.posterior_mean));
  CHECK(views(L.state.posterior.cov, st.posterior_cov));
  CHECK(views(L.state.dposterior.mean, st.dposterior_mean));
  CHECK(views(L.state.dposterior.cov, st.dposterior_cov));
  for (const auto* g :
       {&L.state.observed, &L.state.predicted, &L.state.posterior, &L.state.dposterior}) {
    CHECK(g->groups == 2);
    CHECK(g->channels == 3);
  }
  CHECK(st.config().in_channels == 4);
}

TEST_CASE_TEMPLATE("storage: a layer_storage serves forward and backward as sized", P, float,
                   double) {
  // The storage's sizes are the ones the routines check: a full-mode, dense, 2-group layer
  // runs forward and backward without complaint.
  bkn::layer_config cfg;
  cfg.channels = 3;
  cfg.groups = 2;
  cfg.mode = covariance::full;
  cfg.transition = transition_kind::dense;
  cfg.in_channels = 2;
  bkn::layer_storage<P> st(cfg);
  bkn::layer_config prev_cfg;
  prev_cfg.channels = 2;
  prev_cfg.groups = 2;
  prev_cfg.mode = covariance::full;
  bkn::layer_storage<P> prev(prev_cfg);
  prev.posterior_cov = {1, 0, 0, 1, 2, 0, 0, 2};
  std::vector<P> x(4 * 3), y(x.size()), dy(x.size(), P(1)), dx(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = P(i % 5) - P(2);
  bkn::options opt;
  opt.mode = covariance::full;
  opt.group_size = 2;
  bkn::host_workspace ws(bkn::workspace_size(bkn::reference_backend{}, opt, {4, 3, 1, 1}, 2));
  const auto pv = prev.view();
  const bkn::gaussian_view<const P> prior = pv.state.posterior;
  CHECK_NOTHROW(bkn::forward(bkn::reference_backend{}, opt, st.view(),
                             bkn::tensor_view<const P>(bkn::nc(x.data(), 4, 3)),
                             bkn::nc(y.data(), 4, 3), prior, ws.bytes()));
  CHECK_NOTHROW(bkn::backward(bkn::reference_backend{}, opt, st.view(),
                              bkn::tensor_view<const P>(bkn::nc(x.data(), 4, 3)),
                              bkn::tensor_view<const P>(bkn::nc(dy.data(), 4, 3)),
                              bkn::nc(dx.data(), 4, 3), prior, pv.state.dposterior, ws.bytes()));
}

TEST_CASE("storage: host_workspace size and alignment") {
  for (std::size_t bytes :
       {std::size_t(0), std::size_t(1), std::size_t(63), std::size_t(64), std::size_t(65),
        std::size_t(1000), std::size_t(4096), std::size_t(100003)}) {
    CAPTURE(bytes);
    bkn::host_workspace ws(bytes);
    const auto b = ws.bytes();
    CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % bkn::workspace_alignment == 0);
    CHECK(std::size_t(b.size()) >= bytes);
    // Every byte is usable (ASan would flag an out-of-bounds write here).
    for (index_t i = 0; i < b.size(); ++i) b[i] = std::byte{0x7f};
    // A second call gives the same memory.
    CHECK(ws.bytes().data() == b.data());
  }
  static_assert(bkn::workspace_alignment == 64);
}

TEST_CASE("storage: workspace_size is a multiple of the alignment and grows with the shape") {
  bkn::reference_backend be;
  bkn::options opt;
  const auto small = bkn::workspace_size(be, opt, {4, 3, 1, 1});
  const auto big = bkn::workspace_size(be, opt, {4, 30, 1, 1});
  CHECK(small % bkn::workspace_alignment == 0);
  CHECK(big % bkn::workspace_alignment == 0);
  CHECK(big > small);
  opt.mode = covariance::full;
  CHECK(bkn::workspace_size(be, opt, {4, 30, 1, 1}) > big);
  // Groups multiply the per-group arrays.
  bkn::options grouped;
  grouped.group_size = 1;
  CHECK(bkn::workspace_size(be, grouped, {4, 30, 1, 1}) > big);
}
