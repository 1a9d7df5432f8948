// SPDX-License-Identifier: MIT
// Finite-difference checks, in double, of every gradient bkn::backward computes (dx, dgamma,
// dbeta, dgain_logit, dtransition, dnoise and d(prior)), on single layers in every mode,
// transition kind, layout and grouping, and on 3-layer bkn::chains with host layers between
// the normalized layers, where the gradient must flow back through the posteriors
// (docs/math.md, erratum 2).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#include "support/finite_difference.hpp"
#include "support/host_tensor.hpp"

namespace {

using bkn::covariance;
using bkn::index_t;
using bkn::transition_kind;
using P = double;

using bkn_test::check_gradient;
using bkn_test::kNonTrivial;
using bkn_test::pointers;

double dot(const std::vector<P>& a, const std::vector<P>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

class random_source {
 public:
  explicit random_source(std::uint64_t seed) : engine_(seed) {}
  double normal() { return normal_(engine_); }
  void fill(std::vector<P>& v, double mean, double deviation) {
    for (P& e : v) e = mean + deviation * normal();
  }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<double> normal_;
};

/// A symmetric positive definite covariance per group: B B^T / C + 0.5 I.
void fill_covariance(random_source& rng, std::vector<P>& cov, index_t groups, index_t channels,
                     covariance mode) {
  if (mode == covariance::diagonal) {
    for (P& v : cov) v = 0.5 + std::abs(rng.normal());
    return;
  }
  const index_t C = channels;
  std::vector<P> b(std::size_t(C * C));
  for (index_t g = 0; g < groups; ++g) {
    rng.fill(b, 0, 1);
    for (index_t i = 0; i < C; ++i)
      for (index_t j = 0; j < C; ++j) {
        double s = i == j ? 0.5 : 0.0;
        for (index_t k = 0; k < C; ++k)
          s += b[std::size_t(i * C + k)] * b[std::size_t(j * C + k)] / double(C);
        cov[std::size_t((g * C + i) * C + j)] = s;
      }
  }
}

// ---- Tensors in every layout ----------------------------------------------------------------

using bkn_test::layout;
using bkn_test::layout_name;
using host_tensor = bkn_test::host_tensor<P>;

bkn::gaussian_view<const P> const_gaussian(const std::vector<P>& mean, const std::vector<P>& cov,
                                           index_t groups, index_t channels) {
  return {bkn::span<const P>(mean.data(), index_t(mean.size())),
          bkn::span<const P>(cov.data(), index_t(cov.size())), groups, channels};
}

bkn::gaussian_view<P> gaussian(std::vector<P>& mean, std::vector<P>& cov, index_t groups,
                               index_t channels) {
  return {bkn::span<P>(mean.data(), index_t(mean.size())),
          bkn::span<P>(cov.data(), index_t(cov.size())), groups, channels};
}

/// Learned parameters away from their neutral initialization, so every term of the gradient
/// is exercised: gamma ~ 1, beta ~ 0, q = sigmoid(logit) around 1/2, A near the identity (or
/// random dense), softplus(noise) around 0.7.
void randomize_parameters(random_source& rng, bkn::layer_storage<P>& s) {
  rng.fill(s.gamma, 1, 0.3);
  rng.fill(s.beta, 0, 1);
  rng.fill(s.gain_logit, 0, 0.5);
  rng.fill(s.noise, 0, 1);
  const auto& cfg = s.config();
  if (cfg.transition == transition_kind::diagonal) rng.fill(s.transition_weights, 0.8, 0.3);
  if (cfg.transition == transition_kind::dense || cfg.transition == transition_kind::weights) {
    const index_t Cin = cfg.in_channels > 0 ? cfg.in_channels : cfg.channels;
    rng.fill(s.transition_weights, 0, 1.0 / std::sqrt(double(Cin)));
  }
  rng.fill(s.transition_bias, 0, 0.5);
}

// ---- One layer ------------------------------------------------------------------------------

enum class prior_kind { none, shared, per_group };

struct layer_case {
  covariance mode = covariance::diagonal;
  transition_kind transition = transition_kind::identity;
  index_t in_channels = 0;  // C' of a dense transition (0: C)
  bool per_channel_gain = false;
  layout lay = layout::nchw;
  bkn::tensor_shape shape{4, 3, 2, 3};
  index_t group_size = 2;  // 0: one group
  prior_kind prior = prior_kind::per_group;
  bool affine = true;  // gamma and beta
  bool noise = true;
  // A weights transition: the host layer's geometry (this layer's H x W is its output) and
  // activation; the authors' variant options.
  bkn::conv2d_geometry conv{};
  bkn::activation act = bkn::activation::relu;
  double fixed_gain = -1;
  double skip_threshold = 0;

  index_t groups() const { return group_size == 0 ? 1 : shape.batch / group_size; }
  index_t prior_channels() const {
    return transition == transition_kind::dense || transition == transition_kind::weights
               ? in_channels
               : shape.channels;
  }
  index_t prior_groups() const { return prior == prior_kind::shared ? 1 : groups(); }
};

std::string describe(const layer_case& c) {
  std::ostringstream s;
  s << (c.mode == covariance::full ? "full" : "diagonal") << ", ";
  if (c.prior == prior_kind::none) {
    s << "no prior";
  } else {
    switch (c.transition) {
      case transition_kind::identity: s << "identity A"; break;
      case transition_kind::diagonal: s << "diagonal A"; break;
      case transition_kind::dense:
        s << "dense A " << c.shape.channels << "x" << c.in_channels;
        break;
      case transition_kind::weights:
        s << (c.act == bkn::activation::relu ? "relu" : "identity") << " then "
          << (c.conv.taps() == 1 && c.conv.in_height == 1 ? "linear " : "conv ")
          << c.shape.channels << "x" << c.in_channels << "x" << c.conv.kernel_height << "x"
          << c.conv.kernel_width << " on " << c.conv.in_height << "x" << c.conv.in_width
          << " stride " << c.conv.stride_height << "x" << c.conv.stride_width << " pad "
          << c.conv.pad_height << "x" << c.conv.pad_width;
        break;
    }
    if (c.fixed_gain >= 0) s << ", fixed q = " << c.fixed_gain;
    if (c.skip_threshold > 0) s << ", skip rule at " << c.skip_threshold;
    s << ", " << (c.per_channel_gain ? "per-channel" : "scalar") << " gain, "
      << (c.prior == prior_kind::shared ? "shared prior" : "per-group prior");
  }
  s << ", " << layout_name(c.lay) << " (" << c.shape.batch << ", " << c.shape.channels << ", "
    << c.shape.height << ", " << c.shape.width << "), " << c.groups() << " group(s) of m = "
    << c.shape.batch / c.groups() * c.shape.spatial();
  if (!c.affine) s << ", no gamma/beta";
  if (c.prior != prior_kind::none && !c.noise) s << ", no noise";
  return s.str();
}

/// One layer with a prior, an input and a loss
///   L = sum(R_y * y) + <R_m, posterior.mean> + <R_c, posterior.cov>
/// whose gradient w.r.t. the posterior, (R_m, R_c), is fed to backward as state.dposterior.
class layer_problem {
 public:
  explicit layer_problem(const layer_case& c, std::uint64_t seed = 12345)
      : case_(c),
        storage_(config(c)),
        x_(c.lay, c.shape),
        y_(c.lay, c.shape),
        dy_(c.lay, c.shape),
        dx_(c.lay, c.shape),
        workspace_(bkn::workspace_size(backend_, options(c), c.shape,
                                       storage_.view().params.transition)) {
    // The prior is drawn last: the same case without a prior gets the same everything else.
    random_source rng(seed);
    randomize_parameters(rng, storage_);
    x_.fill(rng, 0.5, 1.5);
    dy_.fill(rng, 0, 1);
    rng.fill(storage_.dposterior_mean, 0, 1);
    rng.fill(storage_.dposterior_cov, 0, 1);
    if (c.prior != prior_kind::none) {
      const index_t PG = c.prior_groups(), Cin = c.prior_channels();
      prior_mean.resize(std::size_t(PG * Cin));
      prior_cov.resize(std::size_t(PG * bkn::covariance_elements(Cin, c.mode)));
      rng.fill(prior_mean, 0, 1);
      fill_covariance(rng, prior_cov, PG, Cin, c.mode);
      dprior_mean.assign(prior_mean.size(), 0);
      dprior_cov.assign(prior_cov.size(), 0);
    }
  }

  static bkn::options options(const layer_case& c) {
    bkn::options opt;
    opt.mode = c.mode;
    opt.group_size = c.group_size;
    opt.fixed_gain = c.fixed_gain;
    opt.skip_threshold = c.skip_threshold;
    return opt;
  }

  /// Runs forward and returns the loss.
  double loss() {
    bkn::forward(backend_, options(case_), storage_.view(), x_.cview(), y_.view(), prior(),
                 workspace_.bytes());
    double l = dot(y_.values(), dy_.values());
    l += dot(storage_.dposterior_mean, storage_.posterior_mean);
    l += dot(storage_.dposterior_cov, storage_.posterior_cov);
    return l;
  }

  /// Runs backward (after loss()): dx, the parameter gradients and d(prior).
  void backward() {
    bkn::gaussian_view<P> dprior;
    if (case_.prior != prior_kind::none)
      dprior = gaussian(dprior_mean, dprior_cov, case_.prior_groups(), case_.prior_channels());
    bkn::backward(backend_, options(case_), storage_.view(), x_.cview(), dy_.cview(),
                  dx_.view(), prior(), dprior, workspace_.bytes());
  }

  bkn::gaussian_view<const P> prior() const {
    if (case_.prior == prior_kind::none) return {};
    return const_gaussian(prior_mean, prior_cov, case_.prior_groups(), case_.prior_channels());
  }

  bkn::layer_storage<P>& storage() { return storage_; }
  host_tensor& x() { return x_; }
  host_tensor& y() { return y_; }
  host_tensor& dx() { return dx_; }

  std::vector<P> prior_mean, prior_cov, dprior_mean, dprior_cov;

 private:
  static bkn::layer_config config(const layer_case& c) {
    bkn::layer_config cfg;
    cfg.channels = c.shape.channels;
    cfg.groups = c.groups();
    cfg.mode = c.mode;
    cfg.transition = c.transition;
    cfg.in_channels = c.in_channels;
    cfg.per_channel_gain = c.per_channel_gain;
    cfg.affine = c.affine;
    cfg.noise = c.noise;
    cfg.conv = c.conv;
    cfg.act = c.act;
    return cfg;
  }

  layer_case case_;
  bkn::reference_backend backend_;
  bkn::layer_storage<P> storage_;
  host_tensor x_, y_, dy_, dx_;
  bkn::host_workspace workspace_;
};

/// Checks every gradient the case's layer has against finite differences of its loss.
void check_layer(const layer_case& c) {
  const std::string name = describe(c);
  INFO("case: ", name);
  layer_problem s(c);
  s.loss();
  s.backward();
  auto& st = s.storage();
  const std::vector<P> dx = s.dx().values(), dgamma = st.dgamma, dbeta = st.dbeta,
                       dgain = st.dgain_logit, dA = st.dtransition_weights, dnoise = st.dnoise,
                       dbias = st.dtransition_bias,
                       dprior_mean = s.dprior_mean, dprior_cov = s.dprior_cov;
  CHECK(s.dx().gaps_untouched());
  CHECK(s.y().gaps_untouched());
  const auto loss = [&] { return s.loss(); };

  check_gradient("dx", s.x().entries(), dx, loss);
  if (c.affine) {
    check_gradient("dgamma", pointers(st.gamma), dgamma, loss);
    check_gradient("dbeta", pointers(st.beta), dbeta, loss);
  } else {
    CHECK(st.dgamma.empty());
  }
  if (c.prior == prior_kind::none) return;
  if (c.fixed_gain < 0)
    check_gradient(c.per_channel_gain ? "dgain_logit (per channel)" : "dgain_logit (scalar)",
                   pointers(st.gain_logit), dgain, loss);
  else
    CHECK(std::all_of(dgain.begin(), dgain.end(), [](P v) { return v == 0; }));
  if (c.transition != transition_kind::identity)
    check_gradient(c.transition == transition_kind::dense      ? "dtransition (dense)"
                   : c.transition == transition_kind::weights ? "dW (host layer)"
                                                              : "dtransition (diagonal)",
                   pointers(st.transition_weights), dA, loss);
  if (!st.transition_bias.empty())
    check_gradient("db (host layer)", pointers(st.transition_bias), dbias, loss);
  if (c.noise) check_gradient("dnoise", pointers(st.noise), dnoise, loss);
  check_gradient("d(prior mean)", pointers(s.prior_mean), dprior_mean, loss);
  check_gradient("d(prior cov)", pointers(s.prior_cov), dprior_cov, loss);
}

constexpr covariance kModes[] = {covariance::diagonal, covariance::full};

TEST_CASE("gradients of one layer: every transition kind, scalar and per-channel gain") {
  struct kind_case {
    transition_kind kind;
    index_t in_channels;
  };
  // C = 3 channels; dense transitions from a wider (C' = 5) and a narrower (C' = 2) layer.
  const kind_case kinds[] = {{transition_kind::identity, 0},
                             {transition_kind::diagonal, 0},
                             {transition_kind::dense, 5},
                             {transition_kind::dense, 2}};
  for (const covariance mode : kModes)
    for (const kind_case& k : kinds)
      for (const bool per_channel : {false, true}) {
        if (per_channel && mode == covariance::full) continue;  // one gain in full mode
        layer_case c;
        c.mode = mode;
        c.transition = k.kind;
        c.in_channels = k.in_channels;
        c.per_channel_gain = per_channel;
        check_layer(c);  // NCHW (4, 3, 2, 3), 2 groups of m = 12, per-group priors
      }
}

TEST_CASE("gradients of one layer: layouts NC, NCHW, NHWC and a strided view") {
  for (const covariance mode : kModes)
    for (const layout lay : {layout::nc, layout::nchw, layout::nhwc, layout::strided}) {
      layer_case c;
      c.mode = mode;
      c.lay = lay;
      c.transition = transition_kind::dense;
      c.in_channels = 4;
      c.prior = prior_kind::shared;
      c.per_channel_gain = mode == covariance::diagonal && lay != layout::nchw;
      if (lay == layout::nc) {
        c.shape = {6, 3, 1, 1};
        c.group_size = 3;
      }
      check_layer(c);
    }
}

TEST_CASE("gradients of one layer: one or several groups, shared or per-group priors") {
  struct grouping {
    index_t group_size;
    prior_kind prior;
    layout lay;
  };
  const grouping groupings[] = {
      {0, prior_kind::per_group, layout::nhwc},  // 1 group: its prior is "shared" too
      {1, prior_kind::shared, layout::nchw},     // 4 groups, 1 prior group
      {1, prior_kind::per_group, layout::nchw},  // 4 groups, 4 prior groups
      {2, prior_kind::shared, layout::strided},
  };
  for (const covariance mode : kModes)
    for (const grouping& g : groupings) {
      layer_case c;
      c.mode = mode;
      c.transition = transition_kind::diagonal;
      c.group_size = g.group_size;
      c.prior = g.prior;
      c.lay = g.lay;
      check_layer(c);
    }
}

TEST_CASE("gradients of one layer: a dense A larger than one tile of its kernels") {
  // The dense predict, d(prior) and dA run in tiles (steps.hpp, backward.hpp: 4 rows of A by 2
  // groups, 16 columns by 4 prior groups, 4 rows by 16 columns): C = 9 rows and C' = 19 or 37
  // columns leave edge tiles in every direction, and 5 groups a partial tile of groups.
  for (const covariance mode : kModes)
    for (const index_t in_channels : {index_t(19), index_t(37)})
      for (const prior_kind prior : {prior_kind::shared, prior_kind::per_group}) {
        if (mode == covariance::full && in_channels == 37) continue;  // its prior: 5 x 37 x 37
        layer_case c;
        c.mode = mode;
        c.transition = transition_kind::dense;
        c.in_channels = in_channels;
        c.prior = prior;
        c.per_channel_gain = mode == covariance::diagonal;
        c.lay = layout::nc;
        c.shape = {10, 9, 1, 1};
        c.group_size = 2;
        check_layer(c);
      }
}

TEST_CASE("gradients of one layer: a per-layer gain summed over more channels than one pass") {
  // A per-layer gain's gradient sums its per-channel parts eight channels at a time, then the
  // last C mod 8 (scalar_gain_gradient_op): C = 21 is two blocks of eight and a tail of five,
  // and C = 8 one block without a tail.
  for (const covariance mode : kModes)
    for (const index_t channels : {index_t(8), index_t(21)}) {
      layer_case c;
      c.mode = mode;
      c.prior = prior_kind::shared;
      c.lay = layout::nc;
      c.shape = {4, channels, 1, 1};
      c.group_size = 2;
      check_layer(c);
    }
}

TEST_CASE("gradients of one layer: one value per channel and group (m = 1) with a prior") {
  // Batch statistics carry no information at m = 1 (S = 0); the prior keeps the variance
  // p v_pred + p q d^2 positive, and every gradient must still be right.
  for (const covariance mode : kModes)
    for (const transition_kind kind : {transition_kind::diagonal, transition_kind::dense})
      for (const prior_kind prior : {prior_kind::shared, prior_kind::per_group}) {
        layer_case c;
        c.mode = mode;
        c.transition = kind;
        c.in_channels = kind == transition_kind::dense ? 4 : 0;
        c.prior = prior;
        c.lay = layout::nc;
        c.shape = {3, 3, 1, 1};
        c.group_size = 1;
        check_layer(c);
      }
}

TEST_CASE("gradients of one layer without a prior: batch normalization") {
  // Only dx, dgamma and dbeta exist; the posterior is the batch statistics and its gradient
  // (state.dposterior) still reaches dx.
  for (const covariance mode : kModes)
    for (const layout lay : {layout::nc, layout::nchw, layout::nhwc, layout::strided})
      for (const index_t group_size : {0, 2}) {
        layer_case c;
        c.mode = mode;
        c.lay = lay;
        c.prior = prior_kind::none;
        c.group_size = group_size;
        if (lay == layout::nc) c.shape = {6, 3, 1, 1};
        check_layer(c);
      }
}

TEST_CASE("gradients of one layer without gamma, beta and noise") {
  for (const covariance mode : kModes) {
    layer_case c;
    c.mode = mode;
    c.transition = transition_kind::dense;
    c.in_channels = 2;
    c.affine = false;
    c.noise = false;
    check_layer(c);
  }
}

TEST_CASE("q = 1 exactly: zero gradient to the prior and the transition, batch normalization") {
  // sigmoid(40) = 1 / (1 + 4e-18) rounds to 1 in double: p = 1 - q = 0 multiplies every path
  // from the loss to the prior, A and R, so their gradients are exactly zero, and the layer
  // computes batch normalization (math.md, special cases).
  REQUIRE(bkn::math::sigmoid(40.0) == 1.0);
  for (const covariance mode : kModes)
    for (const transition_kind kind : {transition_kind::diagonal, transition_kind::dense}) {
      layer_case c;
      c.mode = mode;
      c.transition = kind;
      c.in_channels = kind == transition_kind::dense ? 4 : 0;
      INFO("case: ", describe(c), ", gain_logit 40");
      layer_problem s(c);
      for (P& v : s.storage().gain_logit) v = 40;
      const double loss = s.loss();
      s.backward();
      const auto& st = s.storage();
      const auto all_zero = [](const std::vector<P>& v) {
        return !v.empty() &&
               std::all_of(v.begin(), v.end(), [](P e) { return e == 0; });
      };
      CHECK(all_zero(s.dprior_mean));
      CHECK(all_zero(s.dprior_cov));
      CHECK(all_zero(st.dtransition_weights));
      CHECK(all_zero(st.dnoise));
      CHECK(all_zero(st.dgain_logit));

      // The same layer without a prior (q = 1 by definition) gives the same loss and dx.
      layer_case bn = c;
      bn.prior = prior_kind::none;
      layer_problem b(bn);  // same seed: same x, parameters and R's
      const double bn_loss = b.loss();
      b.backward();
      CHECK(loss == doctest::Approx(bn_loss).epsilon(1e-12));
      const std::vector<P> dx = s.dx().values(), bn_dx = b.dx().values();
      double worst = 0;
      for (std::size_t i = 0; i < dx.size(); ++i)
        worst = std::max(worst, std::abs(dx[i] - bn_dx[i]) / std::max(1.0, std::abs(bn_dx[i])));
      CHECK(worst <= 1e-12);
    }
}

// ---- A 3-layer chain --------------------------------------------------------------------------

/// Three normalized layers run through bkn::chain, with host layers between them:
///   y1 = BKN1(x1),  x2 = W1 tanh(y1) + b1,  y2 = BKN2(x2),  x3 = W2 tanh(y2) + b2,
///   y3 = BKN3(x3),  L = sum(R * y3).
/// W acts on the channels of each sample and pixel (a fully connected layer for NC, a 1x1
/// convolution for NCHW), so each layer's input depends smoothly on the previous output.
struct chain_case {
  std::string name;
  covariance mode;
  index_t batch, height, width, group_size;
  index_t channels[3];
  transition_kind transitions[3];  // transitions[0] applies to the input prior
  bool input_prior;                // layer 1 takes a caller prior (1 group); else BN
  bool per_channel_gain[3];
};

class chain_problem {
 public:
  static constexpr index_t kLayers = 3;
  using chain_type = bkn::chain<bkn::reference_backend, P>;

  explicit chain_problem(const chain_case& c, std::uint64_t seed = 777)
      : case_(c), groups_(c.group_size == 0 ? 1 : c.batch / c.group_size) {
    random_source rng(seed);
    opt_.mode = c.mode;
    opt_.group_size = c.group_size;
    std::size_t workspace_bytes = 0;
    storage_.reserve(kLayers);
    for (index_t k = 0; k < kLayers; ++k) {
      const index_t C = c.channels[k];
      const index_t Cin = k == 0 ? C : c.channels[k - 1];
      bkn::layer_config cfg;
      cfg.channels = C;
      cfg.groups = groups_;
      cfg.mode = c.mode;
      cfg.transition = c.transitions[k];
      cfg.in_channels = c.transitions[k] == transition_kind::dense ? Cin : 0;
      cfg.per_channel_gain = c.per_channel_gain[k];
      storage_.emplace_back(cfg);
      randomize_parameters(rng, storage_.back());
      x_.emplace_back(shape_layout(), shape(k));
      y_.emplace_back(shape_layout(), shape(k));
      dx_.emplace_back(shape_layout(), shape(k));
      dy_.emplace_back(shape_layout(), shape(k));
      workspace_bytes =
          std::max(workspace_bytes, bkn::workspace_size(backend_, opt_, shape(k), Cin));
    }
    workspace_ = bkn::host_workspace(workspace_bytes);
    for (index_t k = 0; k + 1 < kLayers; ++k) {
      weights_.emplace_back(std::size_t(c.channels[k + 1] * c.channels[k]));
      rng.fill(weights_.back(), 0, 1.0 / std::sqrt(double(c.channels[k])));
      bias_.emplace_back(std::size_t(c.channels[k + 1]));
      rng.fill(bias_.back(), 0, 0.5);
    }
    x_[0].fill(rng, 0.5, 1.5);
    loss_weights_.resize(std::size_t(shape(kLayers - 1).elements()));
    rng.fill(loss_weights_, 0, 1);
    if (c.input_prior) {
      const index_t C = c.channels[0];
      input_mean_.resize(std::size_t(C));
      input_cov_.resize(std::size_t(bkn::covariance_elements(C, c.mode)));
      rng.fill(input_mean_, 0.5, 0.5);
      fill_covariance(rng, input_cov_, 1, C, c.mode);
    }
    for (auto& s : storage_) {
      complete_.push_back(s.view());
      truncated_.push_back(s.view());
      truncated_.back().state.dposterior = {};  // no gradient along the posteriors
    }
  }

  /// Runs the chain forward (every layer and the host layers) and returns the loss.
  double loss() { return forward(complete_); }

  /// Runs forward and backward along the chain; on return every layer's grads and dx(0) hold
  /// the gradient. `truncated`: the chain without the posteriors' gradients (the paper's
  /// Eq. 6, erratum 2).
  void backward(bool truncated = false) {
    chain_type chain = make_chain(truncated ? truncated_ : complete_);
    run_forward(chain);
    for (index_t k = kLayers - 1; k >= 0; --k) {
      if (k == kLayers - 1) {
        const auto dy = dy_[std::size_t(k)].entries();
        for (std::size_t i = 0; i < dy.size(); ++i) *dy[i] = loss_weights_[i];
      } else {
        host_backward(k);
      }
      chain.backward(k, x_[std::size_t(k)].cview(), dy_[std::size_t(k)].cview(),
                     dx_[std::size_t(k)].view(), workspace_.bytes());
    }
  }

  bkn::layer_storage<P>& storage(index_t k) { return storage_[std::size_t(k)]; }
  host_tensor& input() { return x_[0]; }
  host_tensor& input_gradient() { return dx_[0]; }

 private:
  layout shape_layout() const {
    return case_.height * case_.width == 1 ? layout::nc : layout::nchw;
  }
  bkn::tensor_shape shape(index_t k) const {
    return {case_.batch, case_.channels[k], case_.height, case_.width};
  }

  chain_type make_chain(const std::vector<bkn::layer<P>>& layers) const {
    bkn::gaussian_view<const P> input_prior;
    if (case_.input_prior)
      input_prior = const_gaussian(input_mean_, input_cov_, 1, case_.channels[0]);
    return chain_type(backend_, opt_,
                      bkn::span<const bkn::layer<P>>(layers.data(), index_t(layers.size())),
                      input_prior);
  }

  double forward(const std::vector<bkn::layer<P>>& layers) {
    chain_type chain = make_chain(layers);
    run_forward(chain);
    const auto y = y_[kLayers - 1].values();
    return dot(y, loss_weights_);
  }

  void run_forward(chain_type& chain) {
    for (index_t k = 0; k < kLayers; ++k) {
      if (k > 0) host_forward(k - 1);
      chain.forward(k, x_[std::size_t(k)].cview(), y_[std::size_t(k)].view(),
                    workspace_.bytes());
    }
  }

  /// x[k+1] = W[k] tanh(y[k]) + b[k], per sample and pixel.
  void host_forward(index_t k) {
    const auto y = y_[std::size_t(k)].view();
    const auto x = x_[std::size_t(k + 1)].view();
    const index_t Cout = case_.channels[k + 1], Cin = case_.channels[k];
    const std::vector<P>& W = weights_[std::size_t(k)];
    for (index_t n = 0; n < case_.batch; ++n)
      for (index_t s = 0; s < y.spatial(); ++s)
        for (index_t i = 0; i < Cout; ++i) {
          double v = bias_[std::size_t(k)][std::size_t(i)];
          for (index_t j = 0; j < Cin; ++j)
            v += W[std::size_t(i * Cin + j)] * std::tanh(y.at(n, j, s));
          x.at(n, i, s) = v;
        }
  }

  /// dy[k] = (1 - tanh^2(y[k])) W[k]^T dx[k+1].
  void host_backward(index_t k) {
    const auto y = y_[std::size_t(k)].view();
    const auto dy = dy_[std::size_t(k)].view();
    const auto dx = dx_[std::size_t(k + 1)].view();
    const index_t Cout = case_.channels[k + 1], Cin = case_.channels[k];
    const std::vector<P>& W = weights_[std::size_t(k)];
    for (index_t n = 0; n < case_.batch; ++n)
      for (index_t s = 0; s < y.spatial(); ++s)
        for (index_t j = 0; j < Cin; ++j) {
          double v = 0;
          for (index_t i = 0; i < Cout; ++i) v += W[std::size_t(i * Cin + j)] * dx.at(n, i, s);
          const double t = std::tanh(y.at(n, j, s));
          dy.at(n, j, s) = (1 - t * t) * v;
        }
  }

  chain_case case_;
  index_t groups_;
  bkn::options opt_;
  bkn::reference_backend backend_;
  std::vector<bkn::layer_storage<P>> storage_;
  std::vector<bkn::layer<P>> complete_, truncated_;
  std::vector<host_tensor> x_, y_, dx_, dy_;
  bkn::host_workspace workspace_{0};
  std::vector<std::vector<P>> weights_, bias_;
  std::vector<P> loss_weights_, input_mean_, input_cov_;
};

/// Every gradient of a layer of the chain, copied out of its storage.
struct layer_gradients {
  std::vector<P> gamma, beta, gain, transition, noise;
  explicit layer_gradients(const bkn::layer_storage<P>& s)
      : gamma(s.dgamma), beta(s.dbeta), gain(s.dgain_logit), transition(s.dtransition_weights),
        noise(s.dnoise) {}
};

double relative_difference(const std::vector<P>& a, const std::vector<P>& b) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += a[i] * a[i];
  }
  return std::sqrt(diff / norm);
}

void check_chain(const chain_case& c) {
  INFO("chain: ", c.name, (c.mode == covariance::full ? ", full" : ", diagonal"));
  chain_problem s(c);
  s.backward();
  const std::vector<P> dx = s.input_gradient().values();
  std::vector<layer_gradients> grads;
  for (index_t k = 0; k < chain_problem::kLayers; ++k) grads.emplace_back(s.storage(k));

  const auto loss = [&] { return s.loss(); };
  check_gradient("dx of the chain's input", s.input().entries(), dx, loss);
  for (index_t k = 0; k < chain_problem::kLayers; ++k) {
    INFO("layer ", k + 1, " of 3");
    auto& st = s.storage(k);
    const layer_gradients& g = grads[std::size_t(k)];
    check_gradient("dgamma", pointers(st.gamma), g.gamma, loss);
    check_gradient("dbeta", pointers(st.beta), g.beta, loss);
    if (k == 0 && !c.input_prior) continue;  // batch normalization: no gain, A or R
    check_gradient("dgain_logit", pointers(st.gain_logit), g.gain, loss);
    if (c.transitions[k] != transition_kind::identity)
      check_gradient("dtransition", pointers(st.transition_weights), g.transition, loss);
    check_gradient("dnoise", pointers(st.noise), g.noise, loss);
  }

  // Without the gradient along the posteriors (the paper's Eq. 6) the input gradient and the
  // first layers' parameter gradients are clearly different: a truncated implementation fails.
  s.backward(/*truncated=*/true);
  const double dx_change = relative_difference(dx, s.input_gradient().values());
  const double dgamma_change = relative_difference(grads[0].gamma, s.storage(0).dgamma);
  INFO("truncating the chain changes dx by ", 100 * dx_change, " % and layer 1's dgamma by ",
       100 * dgamma_change, " %");
  CHECK(dx_change > 0.1);  // measured 25-100 %
  CHECK(dgamma_change > 0.1);
  // And the last layer, whose posterior feeds nothing, is unaffected.
  CHECK(relative_difference(grads[2].gamma, s.storage(2).dgamma) < 1e-12);
}

TEST_CASE("gradients through a 3-layer chain: NC, dense transitions 4 -> 3 -> 5") {
  for (const covariance mode : kModes) {
    chain_case c{"NC (8, 4 -> 3 -> 5), 2 groups of m = 4, BN first layer, dense A",
                 mode,
                 8, 1, 1, 4,
                 {4, 3, 5},
                 {transition_kind::identity, transition_kind::dense, transition_kind::dense},
                 false,
                 {false, false, false}};
    check_chain(c);
  }
}

TEST_CASE("gradients through a 3-layer chain: NCHW, diagonal and identity transitions") {
  for (const covariance mode : kModes) {
    const bool diag = mode == covariance::diagonal;
    chain_case c{"NCHW (2, 3, 2, 2), 2 groups of m = 4, caller prior, A diagonal/identity/diagonal",
                 mode,
                 2, 2, 2, 1,
                 {3, 3, 3},
                 {transition_kind::diagonal, transition_kind::identity, transition_kind::diagonal},
                 true,
                 {false, diag, false}};
    check_chain(c);
  }
}

}  // namespace

// ---- Transitions through the host layer's weights (issue #3) --------------------------------

TEST_CASE("gradients of one layer through a linear host layer, with and without ReLU") {
  for (bkn::activation act : {bkn::activation::relu, bkn::activation::none})
    for (prior_kind prior : {prior_kind::per_group, prior_kind::shared}) {
      layer_case c;
      c.transition = transition_kind::weights;
      c.in_channels = 5;
      c.act = act;
      c.prior = prior;
      c.lay = layout::nc;
      c.shape = {6, 3, 1, 1};
      check_layer(c);
    }
}

TEST_CASE("gradients of one layer through pointwise host layers, larger than one tile") {
  // A linear layer and a 1x1 convolution without padding (stride 2) run as a dense A on the
  // activation's moments (steps.hpp, backward.hpp): C = 9, C' = 19 leave edge tiles.
  bkn::conv2d_geometry strided;
  strided.in_height = 4;
  strided.in_width = 3;
  strided.stride_height = strided.stride_width = 2;
  for (const bool image : {false, true})
    for (prior_kind prior : {prior_kind::per_group, prior_kind::shared}) {
      layer_case c;
      c.transition = transition_kind::weights;
      c.in_channels = 19;
      c.act = bkn::activation::relu;
      c.prior = prior;
      c.per_channel_gain = prior == prior_kind::shared;
      c.lay = image ? layout::nhwc : layout::nc;
      if (image) c.conv = strided;
      c.shape = {10, 9, image ? strided.out_height() : 1, image ? strided.out_width() : 1};
      check_layer(c);
    }
}

TEST_CASE("gradients of one layer through a conv host layer: strides, padding, borders") {
  struct geometry_case {
    bkn::conv2d_geometry conv;
    layout lay;
  };
  const geometry_case geometries[] = {
      {{5, 4, 3, 2, 2, 1, 1, 0}, layout::nchw},  // 5x4 -> 3x3, uneven borders
      {{4, 4, 3, 3, 1, 1, 1, 1}, layout::nhwc},  // 'same' 3x3: 9 border classes
      {{6, 5, 2, 2, 2, 2, 0, 0}, layout::strided},  // no padding: one class
  };
  for (const auto& g : geometries)
    for (bkn::activation act : {bkn::activation::relu, bkn::activation::none}) {
      layer_case c;
      c.transition = transition_kind::weights;
      c.in_channels = 2;
      c.conv = g.conv;
      c.act = act;
      c.lay = g.lay;
      c.shape = {4, 3, g.conv.out_height(), g.conv.out_width()};
      c.per_channel_gain = act == bkn::activation::relu;
      c.prior = act == bkn::activation::relu ? prior_kind::per_group : prior_kind::shared;
      check_layer(c);
    }
}

TEST_CASE("gradients of one layer through a conv host layer wider than one run of its inputs") {
  // 3x3 'same' convolution from C' = 19 channels: the per-tap functors (steps.hpp,
  // backward.hpp) take eight taps as a vector and the ninth alone, and dW in runs of 16 input
  // channels, so 19 leaves a partial run.
  for (prior_kind prior : {prior_kind::per_group, prior_kind::shared}) {
    layer_case c;
    c.transition = transition_kind::weights;
    c.in_channels = 19;
    c.conv = {3, 3, 3, 3, 1, 1, 1, 1};
    c.act = bkn::activation::relu;
    c.prior = prior;
    c.lay = layout::nchw;
    c.shape = {4, 2, 3, 3};
    check_layer(c);
  }
}

namespace {
/// A linear host layer (no activation) in full-covariance mode, C' -> the shape's C channels.
layer_case full_mode_linear_layer(index_t in_channels, const bkn::tensor_shape& shape) {
  layer_case c;
  c.mode = covariance::full;
  c.transition = transition_kind::weights;
  c.in_channels = in_channels;
  c.act = bkn::activation::none;
  c.lay = layout::nc;
  c.shape = shape;
  return c;
}
}  // namespace

TEST_CASE("gradients of one layer through a linear host layer in full-covariance mode") {
  check_layer(full_mode_linear_layer(4, {6, 3, 1, 1}));
}

TEST_CASE("a linear host layer in full mode, over whole tiles: dW exact and added to the host's") {
  // C = 9 rows and C' = 19 columns: dA's tiles of 4 rows by 16 columns, a row at a time, and
  // the edge columns. A host layer's dW is added to what the host's own backprop left there,
  // so a start of 0.25 must come back as the same gradient plus 0.25 in every entry.
  const layer_case c = full_mode_linear_layer(19, {10, 9, 1, 1});
  check_layer(c);

  layer_problem s(c);
  s.loss();
  auto& st = s.storage();
  std::fill(st.dtransition_weights.begin(), st.dtransition_weights.end(), P(0));
  s.backward();
  const std::vector<P> from_zero = st.dtransition_weights;
  std::fill(st.dtransition_weights.begin(), st.dtransition_weights.end(), P(0.25));
  s.backward();
  REQUIRE(st.dtransition_weights.size() == from_zero.size());
  double worst = 0, largest = 0;
  for (std::size_t i = 0; i < from_zero.size(); ++i) {
    worst = std::max(worst, std::abs(double(st.dtransition_weights[i]) - 0.25 - from_zero[i]));
    largest = std::max(largest, std::abs(double(from_zero[i])));
  }
  CHECK(largest > 1e-3);  // a gradient to add to
  CHECK(worst <= 1e-12);
}

TEST_CASE("the authors' variant: a fixed gain gets no gradient, the rest stays exact") {
  for (covariance mode : kModes) {
    layer_case c;
    c.mode = mode;
    c.transition = transition_kind::dense;
    c.in_channels = 4;
    c.fixed_gain = 0.1;
    check_layer(c);
  }
}

TEST_CASE("the authors' variant: the skip rule keeps the batch statistics of skipped groups") {
  // A prior far wider than the batch makes every group skip: the layer is then exactly batch
  // normalization, whatever the gain.
  layer_case c;
  c.transition = transition_kind::identity;
  c.skip_threshold = 1.5;
  layer_problem wide(c);
  for (auto& v : wide.prior_cov) v = 100;
  wide.loss();
  layer_case bn = c;
  bn.prior = prior_kind::none;
  bn.skip_threshold = 0;
  layer_problem plain(bn);
  plain.loss();
  CHECK(wide.y().values() == plain.y().values());
  // A threshold between the two groups' ratios mean_c(v_pred / (s + eps)) skips exactly one;
  // away from the switch the gradient is exact.
  layer_case probe = c;
  probe.skip_threshold = 0;
  layer_problem measured(probe);
  measured.loss();
  const auto& st = measured.storage();
  double ratio[2] = {0, 0};
  for (index_t g = 0; g < 2; ++g)
    for (index_t ch = 0; ch < 3; ++ch)
      ratio[g] += st.predicted_cov[std::size_t(g * 3 + ch)] /
                  (st.observed_cov[std::size_t(g * 3 + ch)] + 1e-5) / 3;
  REQUIRE(std::abs(ratio[0] - ratio[1]) > 0.1);
  c.skip_threshold = (ratio[0] + ratio[1]) / 2;
  layer_problem split(c);
  split.loss();
  const auto& sp = split.storage();
  int skipped = 0;
  for (index_t g = 0; g < 2; ++g) {
    bool same = true;
    for (index_t ch = 0; ch < 3; ++ch)
      same = same && sp.posterior_mean[std::size_t(g * 3 + ch)] ==
                         sp.observed_mean[std::size_t(g * 3 + ch)];
    skipped += same;
  }
  CHECK(skipped == 1);
  check_layer(c);
}

TEST_CASE("the authors' variant: a constant channel does not divide by zero in the skip rule") {
  // s = 0 exactly on channel 0: the authors' ratio v_pred / s is infinite; bkn's
  // v_pred / (s + eps) is finite, the rule fires, and the layer is batch normalization there.
  layer_case c;
  c.transition = transition_kind::identity;
  c.skip_threshold = 100;
  layer_problem p(c);
  for (index_t n = 0; n < c.shape.batch; ++n)
    for (index_t k = 0; k < c.shape.spatial(); ++k) p.x().view().at(n, 0, k) = 3.25;
  p.loss();
  p.backward();
  const auto& st = p.storage();
  for (P v : p.y().values()) CHECK(std::isfinite(v));
  for (P v : p.dx().values()) CHECK(std::isfinite(v));
  for (P v : st.dgain_logit) CHECK(std::isfinite(v));
  CHECK(st.observed_cov[0] == 0);
  CHECK(st.posterior_mean[0] == st.observed_mean[0]);  // skipped: q = 1
}
