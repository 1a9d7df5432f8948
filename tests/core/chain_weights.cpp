// Finite-difference gradients through bkn::chains whose transitions are the host's own layers
// (docs/math.md, "Transitions through the host layer's weights"): between normalized layers k
// and k+1 the host computes x_{k+1} = W_k * f(y_k) + b_k (a linear layer or a convolution),
// and layer k+1's transition is transition<P>::linear / ::conv2d of the SAME W_k and b_k. The
// host's gradient of W_k is its ordinary backprop gradient plus what bkn adds into
// grads.transition / grads.transition_bias; the sum must be the derivative of the loss.
// Then statistics groups along such a chain: the paper's (gradient batch, statistics batch)
// settings (256, 4), (16, 4), (8, 2) and (256, 1).
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <bkn/backends/reference.hpp>
#include <bkn/bkn.hpp>

#include "support/finite_difference.hpp"

namespace {

using bkn::index_t;
using P = double;
using vec = std::vector<P>;
using geometry = bkn::conv2d_geometry;


using bkn_test::check_gradient;
using bkn_test::kNonTrivial;
using bkn_test::pointers;
using bkn_test::worst_seen;

/// ||a - b|| / max(||a||, ||b||).
double relative_difference(const vec& a, const vec& b) {
  double diff = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return std::sqrt(diff / std::max(na, nb));
}

// ---- The host's activation ----------------------------------------------------------------

int tanh_moment_calls = 0;

/// The host's own activation for activation::custom, counting its calls.
bkn::math::activation_moments tanh_moments(double mu, double v) {
  ++tanh_moment_calls;
  return bkn_test::tanh_moments(mu, v);
}

double activate(bkn::activation act, double y) {
  return act == bkn::activation::relu ? std::max(y, 0.0) : std::tanh(y);
}
double activate_slope(bkn::activation act, double y) {
  if (act == bkn::activation::relu) return y > 0 ? 1.0 : 0.0;
  const double t = std::tanh(y);
  return 1 - t * t;
}

// ---- A 3-layer chain with the host's layers between the normalized layers -------------------

struct chain_spec {
  std::string name;
  index_t batch, group_size;  // group_size 0: one group
  std::array<index_t, 3> channels;
  index_t height = 1, width = 1;                // every layer's maps (1 x 1: linear host layers)
  geometry kernel{};                            // the host layers' kernel/stride/padding
  bkn::activation act = bkn::activation::relu;  // relu, or custom: tanh
  bool input_prior = false;                     // layer 1 takes a caller prior (1 group); else BN
  std::array<bool, 3> per_channel_gain{};

  index_t groups() const { return group_size == 0 ? 1 : batch / group_size; }
  bkn::tensor_shape shape(index_t k) const {
    return {batch, channels[std::size_t(k)], height, width};
  }
};

/// Three normalized layers through bkn::chain:
///   y0 = BKN0(x0),  x1 = W0 * f(y0) + b0,  y1 = BKN1(x1),  x2 = W1 * f(y1) + b1,
///   y2 = BKN2(x2),  L = sum(R y2),
/// where W_k, b_k are layer k+1's layer_storage transition_weights / transition_bias: one
/// buffer, read by the host layer and by the transition.
class chain_problem {
 public:
  static constexpr index_t kLayers = 3;
  using chain_type = bkn::chain<bkn::reference_backend, P>;

  explicit chain_problem(const chain_spec& spec, std::uint64_t seed = 4242)
      : spec_(spec), conv_(spec.kernel) {
    conv_.in_height = spec.height;
    conv_.in_width = spec.width;
    REQUIRE(conv_.out_height() == spec.height);
    REQUIRE(conv_.out_width() == spec.width);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    const auto fill = [&](vec& v, double mean, double deviation) {
      for (P& e : v) e = mean + deviation * normal(rng);
    };
    opt_.group_size = spec.group_size;
    std::size_t workspace_bytes = 0;
    storage_.reserve(std::size_t(kLayers));
    for (index_t k = 0; k < kLayers; ++k) {
      bkn::layer_config cfg;
      cfg.channels = spec.channels[std::size_t(k)];
      cfg.groups = spec.groups();
      cfg.per_channel_gain = spec.per_channel_gain[std::size_t(k)];
      if (k > 0) {
        cfg.transition = bkn::transition_kind::weights;
        cfg.in_channels = spec.channels[std::size_t(k - 1)];
        cfg.conv = conv_;
        cfg.act = spec.act;
        cfg.transition_bias = true;
      }
      storage_.emplace_back(cfg);
      bkn::layer_storage<P>& s = storage_.back();
      fill(s.gamma, 1, 0.3);
      fill(s.beta, 0, 0.5);
      fill(s.gain_logit, 0, 0.5);
      fill(s.noise, -1, 1);
      if (k > 0) {
        const double fan_in = double(cfg.in_channels * conv_.taps());
        fill(s.transition_weights, 0, 1.2 / std::sqrt(fan_in));
        fill(s.transition_bias, 0, 0.5);
      }
      const index_t elements = spec.shape(k).elements();
      for (auto* t : {&x_, &y_, &dx_, &dy_}) t->emplace_back(std::size_t(elements), 0.0);
      workspace_bytes = std::max(workspace_bytes, bkn::workspace_size(backend_, opt_, spec.shape(k),
                                                                      s.view().params.transition));
    }
    workspace_ = bkn::host_workspace(workspace_bytes);
    fill(x_[0], 0.5, 1.5);
    loss_weights_.resize(std::size_t(spec.shape(kLayers - 1).elements()));
    fill(loss_weights_, 0, 1);
    if (spec.input_prior) {
      input_mean_.resize(std::size_t(spec.channels[0]));
      input_var_.resize(std::size_t(spec.channels[0]));
      fill(input_mean_, 0.5, 0.5);
      for (P& v : input_var_) v = 1.5 + std::abs(normal(rng));
    }
  }

  /// The layers as the chain sees them; `bkn_weight_grads == false` drops grads.transition and
  /// grads.transition_bias (then only the host's own backprop reaches W and b).
  std::vector<bkn::layer<P>> views(bool bkn_weight_grads = true) {
    std::vector<bkn::layer<P>> out;
    for (auto& s : storage_) {
      bkn::layer<P> L = s.view();
      if (spec_.act == bkn::activation::custom &&
          L.params.transition.kind == bkn::transition_kind::weights)
        L.params.transition.moments = &tanh_moments;  // layer_config has no moment function
      if (!bkn_weight_grads) {
        L.grads.transition = {};
        L.grads.transition_bias = {};
      }
      out.push_back(L);
    }
    return out;
  }

  /// Runs the chain forward (every normalized and host layer) and returns the loss.
  double loss() {
    const auto layers = views();
    chain_type chain = make_chain(layers);
    run_forward(chain);
    double l = 0;
    for (std::size_t i = 0; i < loss_weights_.size(); ++i) l += loss_weights_[i] * y_[2][i];
    return l;
  }

  /// Forward, then backward along the chain, with the host's backprop between the layers.
  /// Sets the host layers' W and b gradients to `initial` (0: zeroes them) first: both the
  /// host and bkn add to them.
  void backward(bool bkn_weight_grads = true, double initial = 0) {
    for (auto& s : storage_) {
      std::fill(s.dtransition_weights.begin(), s.dtransition_weights.end(), initial);
      std::fill(s.dtransition_bias.begin(), s.dtransition_bias.end(), initial);
    }
    const auto layers = views(bkn_weight_grads);
    chain_type chain = make_chain(layers);
    run_forward(chain);
    for (index_t k = kLayers - 1; k >= 0; --k) {
      if (k == kLayers - 1)
        dy_[std::size_t(k)] = loss_weights_;
      else
        host_backward(k);
      chain.backward(k, view_const(x_, k), view_const(dy_, k), view(dx_, k), workspace_.bytes());
    }
  }

  /// The smallest |y| entering the host's ReLU (the distance to its kink).
  double kink_distance() const {
    double d = INFINITY;
    for (index_t k = 0; k + 1 < kLayers; ++k)
      for (const P y : y_[std::size_t(k)]) d = std::min(d, std::abs(y));
    return d;
  }
  /// Which of the host's activation inputs are positive (ReLU's active set).
  std::vector<bool> active_set() const {
    std::vector<bool> out;
    for (index_t k = 0; k + 1 < kLayers; ++k)
      for (const P y : y_[std::size_t(k)]) out.push_back(y > 0);
    return out;
  }

  bkn::layer_storage<P>& storage(index_t k) { return storage_[std::size_t(k)]; }
  vec& input() { return x_[0]; }
  const vec& input_gradient() const { return dx_[0]; }
  const vec& output(index_t k) const { return y_[std::size_t(k)]; }
  const chain_spec& spec() const { return spec_; }

 private:
  bkn::tensor_view<const P> view_const(const std::vector<vec>& t, index_t k) const {
    const auto s = spec_.shape(k);
    return bkn::nchw<const P>(t[std::size_t(k)].data(), s.batch, s.channels, s.height, s.width);
  }
  bkn::tensor_view<P> view(std::vector<vec>& t, index_t k) {
    const auto s = spec_.shape(k);
    return bkn::nchw<P>(t[std::size_t(k)].data(), s.batch, s.channels, s.height, s.width);
  }

  chain_type make_chain(const std::vector<bkn::layer<P>>& layers) const {
    bkn::gaussian_view<const P> prior;
    if (spec_.input_prior)
      prior = {bkn::span<const P>(input_mean_.data(), index_t(input_mean_.size())),
               bkn::span<const P>(input_var_.data(), index_t(input_var_.size())), 1,
               spec_.channels[0]};
    return chain_type(backend_, opt_,
                      bkn::span<const bkn::layer<P>>(layers.data(), index_t(layers.size())), prior);
  }

  void run_forward(chain_type& chain) {
    for (index_t k = 0; k < kLayers; ++k) {
      if (k > 0) host_forward(k - 1);
      chain.forward(k, view_const(x_, k), view(y_, k), workspace_.bytes());
    }
  }

  /// Input pixel of output (i, j) and tap (u, v), or false for padding.
  bool tap(index_t i, index_t j, index_t u, index_t v, index_t& row, index_t& col) const {
    row = i * conv_.stride_height - conv_.pad_height + u;
    col = j * conv_.stride_width - conv_.pad_width + v;
    return row >= 0 && row < conv_.in_height && col >= 0 && col < conv_.in_width;
  }

  /// x[k+1][n][c][i][j] = b[c] + sum_{c', u, v} W[c][c'][u][v] f(y[k][n][c'][row][col]).
  void host_forward(index_t k) {
    const vec& W = storage_[std::size_t(k + 1)].transition_weights;
    const vec& b = storage_[std::size_t(k + 1)].transition_bias;
    const index_t N = spec_.batch, Cin = spec_.channels[std::size_t(k)];
    const index_t C = spec_.channels[std::size_t(k + 1)], H = spec_.height, Wd = spec_.width;
    const index_t KH = conv_.kernel_height, KW = conv_.kernel_width;
    const vec& y = y_[std::size_t(k)];
    vec& x = x_[std::size_t(k + 1)];
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t i = 0; i < H; ++i)
          for (index_t j = 0; j < Wd; ++j) {
            double s = b[std::size_t(c)];
            for (index_t cp = 0; cp < Cin; ++cp)
              for (index_t u = 0; u < KH; ++u)
                for (index_t v = 0; v < KW; ++v) {
                  index_t row, col;
                  if (!tap(i, j, u, v, row, col)) continue;
                  s += W[std::size_t(((c * Cin + cp) * KH + u) * KW + v)] *
                       activate(spec_.act, y[std::size_t(((n * Cin + cp) * H + row) * Wd + col)]);
                }
            x[std::size_t(((n * C + c) * H + i) * Wd + j)] = s;
          }
  }

  /// The host layer's ordinary backprop from dx[k+1]: ADDS sum dx f(y) to dW and sum dx to db
  /// (bkn adds its share to the same buffers), and writes dy[k] = f'(y) (W^T * dx).
  void host_backward(index_t k) {
    const vec& W = storage_[std::size_t(k + 1)].transition_weights;
    vec& dW = storage_[std::size_t(k + 1)].dtransition_weights;
    vec& db = storage_[std::size_t(k + 1)].dtransition_bias;
    const index_t N = spec_.batch, Cin = spec_.channels[std::size_t(k)];
    const index_t C = spec_.channels[std::size_t(k + 1)], H = spec_.height, Wd = spec_.width;
    const index_t KH = conv_.kernel_height, KW = conv_.kernel_width;
    const vec& y = y_[std::size_t(k)];
    const vec& dx = dx_[std::size_t(k + 1)];
    vec& dy = dy_[std::size_t(k)];
    std::fill(dy.begin(), dy.end(), 0.0);  // d f(y) first, then times f'(y)
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t i = 0; i < H; ++i)
          for (index_t j = 0; j < Wd; ++j) {
            const double g = dx[std::size_t(((n * C + c) * H + i) * Wd + j)];
            db[std::size_t(c)] += g;
            for (index_t cp = 0; cp < Cin; ++cp)
              for (index_t u = 0; u < KH; ++u)
                for (index_t v = 0; v < KW; ++v) {
                  index_t row, col;
                  if (!tap(i, j, u, v, row, col)) continue;
                  const std::size_t w = std::size_t(((c * Cin + cp) * KH + u) * KW + v);
                  const std::size_t in = std::size_t(((n * Cin + cp) * H + row) * Wd + col);
                  dW[w] += g * activate(spec_.act, y[in]);
                  dy[in] += g * W[w];
                }
          }
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] *= activate_slope(spec_.act, y[i]);
  }

  chain_spec spec_;
  geometry conv_;
  bkn::options opt_;
  bkn::reference_backend backend_;
  std::vector<bkn::layer_storage<P>> storage_;
  std::vector<vec> x_, y_, dx_, dy_;
  bkn::host_workspace workspace_{0};
  vec loss_weights_, input_mean_, input_var_;
};

/// Every gradient of a layer, copied out of its storage after backward.
struct layer_gradients {
  vec gamma, beta, gain, noise, weights, bias;
  explicit layer_gradients(const bkn::layer_storage<P>& s)
      : gamma(s.dgamma),
        beta(s.dbeta),
        gain(s.dgain_logit),
        noise(s.dnoise),
        weights(s.dtransition_weights),
        bias(s.dtransition_bias) {}
};

/// Checks dx of the input and every parameter of every layer against finite differences, and
/// that bkn's share of dW and db matters.
void check_chain(const chain_spec& spec) {
  INFO("chain: ", spec.name);
  chain_problem s(spec);
  s.backward();
  const vec dx = s.input_gradient();
  std::vector<layer_gradients> grads;
  for (index_t k = 0; k < chain_problem::kLayers; ++k) grads.emplace_back(s.storage(k));

  // The loss for the differences; counts the steps that moved a ReLU input across its kink.
  const std::vector<bool> active = s.active_set();
  int crossings = 0;
  const auto loss = [&] {
    const double l = s.loss();
    crossings += s.active_set() != active;
    return l;
  };
  check_gradient("dx of the chain's input", pointers(s.input()), dx, loss);
  for (index_t k = 0; k < chain_problem::kLayers; ++k) {
    INFO("layer ", k, " of 0..2");
    auto& st = s.storage(k);
    const layer_gradients& g = grads[std::size_t(k)];
    check_gradient("dgamma", pointers(st.gamma), g.gamma, loss);
    check_gradient("dbeta", pointers(st.beta), g.beta, loss);
    if (k == 0 && !spec.input_prior) continue;  // batch normalization: no gain or noise
    check_gradient("dgain_logit", pointers(st.gain_logit), g.gain, loss);
    check_gradient("dnoise", pointers(st.noise), g.noise, loss);
    if (k == 0) continue;  // identity transition from the caller's prior
    check_gradient("dW (host backprop + bkn)", pointers(st.transition_weights), g.weights, loss);
    if (k + 1 < chain_problem::kLayers) {
      check_gradient("db (host backprop + bkn)", pointers(st.transition_bias), g.bias, loss);
    } else {
      // The last host layer's bias shifts x and its predicted mean equally: the last layer's
      // posterior moves with it and y does not change, so dL/db = 0 exactly. The host's
      // backprop gives sum(dx) != 0 (BKN, unlike BN, is not shift-invariant in x alone), and
      // bkn's share must cancel it.
      check_gradient("db of the last host layer (zero)", pointers(st.transition_bias), g.bias, loss,
                     /*may_vanish=*/true);
      double largest = 0;
      for (const P v : g.bias) largest = std::max(largest, std::abs(v));
      CHECK(largest <= 1e-12);
    }
  }
  INFO("smallest |y| entering the host's activation: ", s.kink_distance());
  CHECK(crossings == 0);

  // bkn ADDS into grads.transition and grads.transition_bias: starting from 0.25 instead of 0
  // gives the same gradients plus 0.25. (Here bkn's backward of layer k+1 runs before the
  // host's backprop of W_k, so only a non-zero start tells adding from overwriting.)
  s.backward(/*bkn_weight_grads=*/true, /*initial=*/0.25);
  for (index_t k = 1; k < chain_problem::kLayers; ++k) {
    INFO("layer ", k, ": gradients accumulated onto 0.25");
    const auto& st = s.storage(k);
    double worst = 0;
    for (std::size_t i = 0; i < st.dtransition_weights.size(); ++i)
      worst = std::max(
          worst, std::abs(st.dtransition_weights[i] - 0.25 - grads[std::size_t(k)].weights[i]));
    for (std::size_t i = 0; i < st.dtransition_bias.size(); ++i)
      worst =
          std::max(worst, std::abs(st.dtransition_bias[i] - 0.25 - grads[std::size_t(k)].bias[i]));
    CHECK(worst <= 1e-12);
  }

  // The host's backprop alone (bkn adds nothing to dW, db) is measurably wrong: bkn's share,
  // the statistics' dependence on W and b, is part of the gradient.
  s.backward(/*bkn_weight_grads=*/false);
  std::string summary = spec.name + ": the host's backprop alone is off by";
  for (index_t k = 1; k < chain_problem::kLayers; ++k) {
    const auto& st = s.storage(k);
    const double dw = relative_difference(st.dtransition_weights, grads[std::size_t(k)].weights);
    const double db = relative_difference(st.dtransition_bias, grads[std::size_t(k)].bias);
    INFO("layer ", k, ": the host's backprop alone differs from the total by ", 100 * dw,
         " % (W) and ", 100 * db, " % (b)");
    summary += " " + std::to_string(100 * dw) + " % (W" + std::to_string(k - 1) + "), " +
               std::to_string(100 * db) + " % (b" + std::to_string(k - 1) + ");";
    CHECK(dw > 1e-2);
    CHECK(db > 1e-2);
    // And without bkn's share, the rest of the gradient is unchanged.
    CHECK(relative_difference(st.dgamma, grads[std::size_t(k)].gamma) < 1e-13);
  }
  MESSAGE(summary);
}

}  // namespace

TEST_CASE("gradients through linear -> ReLU -> linear host layers that are the transitions") {
  chain_spec c{
      "NC (8, 4 -> 5 -> 3), 2 groups of m = 4, batch-normalized first layer", 8, 4, {4, 5, 3}};
  c.per_channel_gain = {false, true, false};
  check_chain(c);
  // The same with a caller prior on the first layer and one statistics group.
  chain_spec p{"NC (6, 3 -> 4 -> 2), 1 group of m = 6, caller prior", 6, 0, {3, 4, 2}};
  p.input_prior = true;
  p.per_channel_gain = {true, false, true};
  check_chain(p);
  MESSAGE("worst relative error of the finite-difference checks so far: ", worst_seen);
}

TEST_CASE("gradients through conv -> ReLU -> conv host layers that are the transitions") {
  // NCHW (4, 2 -> 3 -> 2, 5x5), 3x3 kernels with padding 1: 9 border classes per layer.
  chain_spec c{"NCHW (4, 2 -> 3 -> 2, 5x5), 3x3 pad 1, 2 groups of m = 50, caller prior",
               4,
               2,
               {2, 3, 2},
               5,
               5};
  c.kernel.kernel_height = c.kernel.kernel_width = 3;
  c.kernel.pad_height = c.kernel.pad_width = 1;
  c.input_prior = true;
  c.per_channel_gain = {false, true, false};
  check_chain(c);
  // Without a prior on the first layer and with one statistics group.
  chain_spec b = c;
  b.name =
      "NCHW (4, 2 -> 3 -> 2, 5x5), 3x3 pad 1, 1 group of m = 100, batch-normalized first layer";
  b.group_size = 0;
  b.input_prior = false;
  check_chain(b);
  MESSAGE("worst relative error of the finite-difference checks so far: ", worst_seen);
}

TEST_CASE("gradients through a host activation given by its moment function (tanh)") {
  // activation::custom: the host applies tanh, bkn carries the Gaussian through the test's
  // tanh_moments (mean, variance and their derivatives); the backward must use the
  // derivatives the function returns.
  chain_spec c{"NC (6, 3 -> 4 -> 2), custom tanh moments, 2 groups of m = 3", 6, 3, {3, 4, 2}};
  c.act = bkn::activation::custom;
  c.input_prior = true;
  tanh_moment_calls = 0;
  check_chain(c);
  CHECK(tanh_moment_calls > 0);
  chain_spec v{"NCHW (2, 2 -> 2 -> 2, 4x4), 3x3 pad 1, custom tanh moments", 2, 1, {2, 2, 2}, 4, 4};
  v.kernel.kernel_height = v.kernel.kernel_width = 3;
  v.kernel.pad_height = v.kernel.pad_width = 1;
  v.act = bkn::activation::custom;
  v.input_prior = true;
  check_chain(v);
  MESSAGE("worst relative error of the finite-difference checks so far: ", worst_seen);
}

// ---- Statistics groups along a chain with weight transitions -------------------------------

TEST_CASE(
    "statistics groups through a chain with weight transitions: (256,4) (16,4) (8,2) (256,1)") {
  struct setting {
    index_t batch, group_size;
  };
  const setting settings[] = {{256, 4}, {16, 4}, {8, 2}, {256, 1}};
  for (const setting& st : settings) {
    const index_t N = st.batch, G = N / st.group_size, C = 8;
    INFO("(gradient batch, statistics batch) = (", N, ", ", st.group_size, ")");
    // m = 1 per group only works with a prior: the first layer gets the caller's (1 group).
    chain_spec spec{"NC, 3 layers of 8", N, st.group_size, {C, C, C}};
    spec.input_prior = st.group_size == 1;
    spec.per_channel_gain = {false, true, false};
    chain_problem s(spec, 90 + std::uint64_t(st.group_size));
    s.backward();

    for (index_t k = 0; k < chain_problem::kLayers; ++k) {
      INFO("layer ", k);
      const auto& L = s.storage(k);
      // Per-group states: G groups of C channels each.
      for (const vec* v :
           {&L.observed_mean, &L.observed_cov, &L.predicted_mean, &L.predicted_cov,
            &L.posterior_mean, &L.posterior_cov, &L.dposterior_mean, &L.dposterior_cov})
        CHECK(v->size() == std::size_t(G * C));
      const auto finite = [](const vec& v) {
        return std::all_of(v.begin(), v.end(), [](P e) { return std::isfinite(e); });
      };
      CHECK(finite(s.output(k)));
      CHECK(finite(L.posterior_mean));
      CHECK(finite(L.posterior_cov));
      CHECK(finite(L.dgamma));
      CHECK(finite(L.dbeta));
      CHECK(finite(L.dgain_logit));
      CHECK(finite(L.dtransition_weights));
      CHECK(finite(L.dtransition_bias));
      CHECK(std::all_of(L.posterior_cov.begin(), L.posterior_cov.end(), [](P v) { return v > 0; }));
      // Every group has its own posterior.
      int identical = 0;
      for (index_t g = 0; g < G; ++g)
        for (index_t h = g + 1; h < G; ++h)
          identical +=
              std::equal(L.posterior_mean.begin() + g * C, L.posterior_mean.begin() + (g + 1) * C,
                         L.posterior_mean.begin() + h * C);
      CHECK(identical == 0);
      if (st.group_size == 1) {
        // m = 1: the batch variance is 0, the posterior's p v_pred + p q d^2 is not.
        CHECK(std::all_of(L.observed_cov.begin(), L.observed_cov.end(),
                          [](P v) { return v < 1e-20; }));
        CHECK(*std::min_element(L.posterior_cov.begin(), L.posterior_cov.end()) > 1e-3);
      }
    }
    CHECK(std::all_of(s.input_gradient().begin(), s.input_gradient().end(),
                      [](P e) { return std::isfinite(e); }));

    // The groups are independent: changing one sample of group 1 changes group 1's states in
    // every layer and no other group's (bitwise).
    std::vector<vec> before;
    for (index_t k = 0; k < chain_problem::kLayers; ++k)
      before.push_back(s.storage(k).posterior_mean);
    s.input()[std::size_t(1 * st.group_size * C)] += 0.5;  // sample 0 of group 1, channel 0
    s.loss();
    for (index_t k = 0; k < chain_problem::kLayers; ++k) {
      INFO("layer ", k);
      const vec& after = s.storage(k).posterior_mean;
      int changed_other = 0;
      for (index_t g = 0; g < G; ++g) {
        const bool same = std::equal(after.begin() + g * C, after.begin() + (g + 1) * C,
                                     before[std::size_t(k)].begin() + g * C);
        if (g == 1)
          CHECK_FALSE(same);
        else
          changed_other += !same;
      }
      CHECK(changed_other == 0);
    }
    s.input()[std::size_t(1 * st.group_size * C)] -= 0.5;

    if (st.group_size == 1) {
      // Without the caller's prior the first layer has nothing to normalize with at m = 1.
      chain_spec bn = spec;
      bn.input_prior = false;
      chain_problem plain(bn, 91);
      try {
        plain.loss();
        FAIL("expected bkn::invalid_argument");
      } catch (const bkn::invalid_argument& e) {
        INFO(e.what());
        CHECK(std::string(e.argument()) == "x");
        CHECK(std::string(e.what()).find("give the layer a prior") != std::string::npos);
      }
    }

    if (N == 16) {
      // A finite-difference check of a few random parameters of every kind.
      s.backward();
      std::vector<P*> entries;
      vec analytic;
      std::mt19937_64 pick(7);
      const auto sample = [&](vec& values, const vec& gradient, int count) {
        for (int i = 0; i < count; ++i) {
          const std::size_t at = std::size_t(pick() % values.size());
          entries.push_back(&values[at]);
          analytic.push_back(gradient[at]);
        }
      };
      vec dx = s.input_gradient();
      sample(s.input(), dx, 4);
      for (index_t k = 0; k < chain_problem::kLayers; ++k) {
        auto& L = s.storage(k);
        const layer_gradients g(L);
        sample(L.gamma, g.gamma, 2);
        sample(L.beta, g.beta, 1);
        if (k == 0) continue;
        sample(L.gain_logit, g.gain, 1);
        sample(L.noise, g.noise, 1);
        sample(L.transition_weights, g.weights, 3);
        sample(L.transition_bias, g.bias, 1);
      }
      const std::vector<bool> active = s.active_set();
      int crossings = 0;
      check_gradient("random parameters of the (16, 4) chain", entries, analytic, [&] {
        const double l = s.loss();
        crossings += s.active_set() != active;
        return l;
      });
      INFO("smallest |y| entering the host's ReLU: ", s.kink_distance());
      CHECK(crossings == 0);
    }
  }
}

TEST_CASE("statistics groups: a layer_storage for the wrong number of groups is rejected") {
  chain_spec spec{"NC, 3 layers of 8", 16, 4, {8, 8, 8}};
  chain_problem s(spec);
  bkn::layer_config cfg;
  cfg.channels = 8;
  cfg.groups = 2;  // 16 / 4 = 4 groups
  bkn::layer_storage<P> wrong(cfg);
  vec y(s.input().size());
  bkn::options opt;
  opt.group_size = 4;
  bkn::host_workspace ws(bkn::workspace_size(bkn::reference_backend{}, opt, {16, 8, 1, 1}));
  try {
    bkn::forward(bkn::reference_backend{}, opt, wrong.view(),
                 bkn::nc<const P>(s.input().data(), 16, 8), bkn::nc(y.data(), 16, 8),
                 bkn::gaussian_view<const P>(), ws.bytes());
    FAIL("expected bkn::invalid_argument");
  } catch (const bkn::invalid_argument& e) {
    INFO(e.what());
    CHECK(std::string(e.argument()).rfind("state.", 0) == 0);
    CHECK(std::string(e.what()).find("expected 4 groups") != std::string::npos);
  }
}
