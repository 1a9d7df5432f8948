// SPDX-License-Identifier: MIT
// The four forward steps of Algorithm 1 as routines over a backend: observe (batch
// statistics), predict (Eq. 3 through the transition), update (Eq. 5) and normalize.
#pragma once

#include <initializer_list>
#include <type_traits>
#include <utility>

#include "bkn/detail/lanes.hpp"
#include "bkn/detail/small_matrix.hpp"
#include "bkn/layer.hpp"
#include "bkn/math/kalman.hpp"
#include "bkn/tensor.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

// ---- functors of the per-channel math (run through kernels<Backend>::for_each) ----
//
// Functors over a 2-D index, i = row * width + col (a statistics group and a channel, mostly),
// also expose grid_width() and at(row, col), with operator()(i) == at(i / width, i % width).
// A CPU backend may run at() over whole rows: without the division the inner loop over col
// vectorizes.
//
// Functors that sum per channel over the statistics groups (the moving averages, the parameter
// gradients) have a row form instead: `sums` accumulators per channel, group_count(),
// add(g, c, acc, stride), which adds group g's terms to acc[0], acc[stride], ..., and
// finish(c, acc, stride), which writes channel c's results. Their operator()(c) is
// sum_over_groups: every add of channel c in the order of g, then finish. A CPU backend may run
// add over a block of channels, group after group, reading each group's row contiguously
// rather than a column of rows C apart; each sum still runs over g in order: the same bits.
// A group-sum functor may also have start(c, acc, stride), the sums before the first group
// (otherwise zero).
//
// Functors whose items are large (the dense transition's tiles) expose work_per_item(), about
// the multiply-adds of one item; their items write disjoint outputs, so a CPU backend may
// share them among threads (the same bits for any split).

/// A group-sum functor's result for channel c, the groups added in order.
template <class F>
BKN_HOST_DEVICE inline void sum_over_groups(const F& f, index_t c) {
  double acc[F::sums] = {};
  if constexpr (has_group_start<F>::value) f.start(c, acc, 1);
  const index_t groups = f.group_count();
  for (index_t g = 0; g < groups; ++g) f.add(g, c, acc, 1);
  f.finish(c, acc, 1);
}

/// Group-sum functor `F` over one chunk of `groups` groups, its sums going on from the chunks
/// before it (in `carry`, sums x C; F has no start of its own): every sum still runs over g in
/// order, the bits of all groups at once, for any chunks. `f` is built for all the groups (its
/// finish sees their count), its arrays offset to the chunk's first group. Only the `last`
/// chunk finishes; the others leave their sums in `carry`.
template <class F, bool last>
struct chunk_sums_op {
  F f;
  double* carry;
  index_t groups, channels;
  bool carried_in;

  static constexpr int sums = F::sums;
  BKN_HOST_DEVICE index_t group_count() const { return groups; }
  BKN_HOST_DEVICE void start(index_t c, double* acc, index_t stride) const {
    for (int s = 0; s < sums; ++s) acc[s * stride] = carried_in ? carry[s * channels + c] : 0.0;
  }
  BKN_HOST_DEVICE void add(index_t g, index_t c, double* acc, index_t stride) const {
    f.add(g, c, acc, stride);
  }
  BKN_HOST_DEVICE void finish(index_t c, const double* acc, index_t stride) const {
    if constexpr (last) {
      f.finish(c, acc, stride);
    } else {
      for (int s = 0; s < sums; ++s) carry[s * channels + c] = acc[s * stride];
    }
  }
  BKN_HOST_DEVICE void operator()(index_t c) const { sum_over_groups(*this, c); }
};

template <class P>
struct copy_op {
  const P* from;
  P* to;
  BKN_HOST_DEVICE void operator()(index_t i) const { to[i] = from[i]; }
};

template <class P>
struct fill_op {
  P* to;
  P value;
  BKN_HOST_DEVICE void operator()(index_t i) const { to[i] = value; }
};

/// The effective gain q of (g, c), or 1 without one.
template <class P>
BKN_HOST_DEVICE inline double gain_at(const P* gain, index_t i) {
  return gain ? double(gain[i]) : 1.0;
}

/// The predicted mean (and, in diagonal mode, variance) of (g, c): Eq. 3 through the identity
/// or diagonal A.
template <class P>
struct predict_op {
  transition_kind kind;
  const P *weights, *bias;    // bias: null when absent
  const P* noise_variance;    // softplus(noise) per channel (noise_variance_op); null: R = 0
  const P* prior_mean;
  const P* prior_var;  // diagonal mode; null in full mode
  index_t prior_groups, channels;
  P* mean;
  P* var;  // null in full mode

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    const index_t i = g * channels + c;
    const index_t base = (prior_groups == 1 ? 0 : g) * channels;
    const double a = kind == transition_kind::diagonal ? double(weights[c]) : 1.0;
    const double m = a * double(prior_mean[base + c]);
    const double v = var ? a * a * double(prior_var[base + c]) : 0.0;
    mean[i] = P(m + (bias ? double(bias[c]) : 0.0));
    if (var) var[i] = P(v + (noise_variance ? double(noise_variance[c]) : 0.0));
  }
};

/// predict_op for a dense A: mean[g, c] = sum_k A[c, k] mu_prev[g, k] (+ bias) and, in diagonal
/// mode, var[g, c] = sum_k A[c, k]^2 v_prev[g, k] (+ r), per tile of dense_tile_rows rows of A
/// by dense_tile_groups groups. A tile reads each weight (and squares it) once for all of its
/// groups, so A streams from memory once per dense_tile_groups groups rather than per group.
/// Each (g, c) sums k in eight interleaved partial sums (lanes), the same arithmetic in a whole
/// tile and at the edges.
inline constexpr index_t dense_tile_rows = 4, dense_tile_groups = 2;

template <class P>
struct dense_predict_op {
  const P *weights, *bias;     // bias: never null (zeros when absent)
  const P* noise_variance;     // never null in diagonal mode (zeros when absent)
  const P* prior_mean;
  const P* prior_var;          // diagonal mode; null in full mode
  index_t groups, prior_groups, channels, in_channels;
  P* mean;
  P* var;  // null in full mode

  BKN_HOST_DEVICE index_t group_tiles() const {
    return (groups + dense_tile_groups - 1) / dense_tile_groups;
  }
  BKN_HOST_DEVICE index_t tiles() const {
    return (channels + dense_tile_rows - 1) / dense_tile_rows * group_tiles();
  }
  BKN_HOST_DEVICE index_t work_per_item() const {
    return 2 * dense_tile_rows * dense_tile_groups * in_channels;
  }
  // Tiles row-major over (rows of A, groups): consecutive tiles share their rows of A. A
  // partial tile keeps its whole rows together (one group at a time), so one group (a shared
  // prior, or a batch in one group) still reads 4 rows of A per pass over its prior.
  BKN_HOST_DEVICE void operator()(index_t t) const {
    constexpr index_t R = dense_tile_rows, NG = dense_tile_groups;
    const index_t c0 = t / group_tiles() * R, g0 = t % group_tiles() * NG;
    const index_t rows = channels - c0 < R ? channels - c0 : R;
    const index_t last = g0 + NG < groups ? g0 + NG : groups;
    if (rows == R && last - g0 == NG) return run<R, NG>(c0, g0);
    for (index_t g = g0; g < last; ++g) {
      if (rows == R) {
        run<R, 1>(c0, g);
      } else {
        for (index_t c = c0; c < c0 + rows; ++c) run<1, 1>(c, g);
      }
    }
  }
  template <index_t R, index_t NG>
  BKN_HOST_DEVICE void run(index_t c0, index_t g0) const {
    if (var)
      tile<R, NG, true>(c0, g0);
    else
      tile<R, NG, false>(c0, g0);
  }

  template <index_t R, index_t NG, bool variances>
  BKN_HOST_DEVICE void tile(index_t c0, index_t g0) const {
    const P* row[R];
    const P *pm[NG], *pv[NG];
    for (index_t r = 0; r < R; ++r) row[r] = weights + (c0 + r) * in_channels;
    for (index_t j = 0; j < NG; ++j) {
      const index_t base = (prior_groups == 1 ? 0 : g0 + j) * in_channels;
      pm[j] = prior_mean + base;
      pv[j] = variances ? prior_var + base : pm[j];
    }
    lanes m[R][NG], v[R][NG];
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < NG; ++j) m[r][j] = v[r][j] = splat(0);
    const index_t whole = in_channels - in_channels % lane_count;
    for (index_t k = 0; k < whole; k += lane_count) {
      lanes a[R], a2[R];
      for (index_t r = 0; r < R; ++r) {
        a[r] = load_lanes(row[r] + k);
        a2[r] = a[r] * a[r];
      }
      for (index_t j = 0; j < NG; ++j) {
        const lanes x = load_lanes(pm[j] + k);
        for (index_t r = 0; r < R; ++r) m[r][j] += a[r] * x;
        if constexpr (variances) {
          const lanes y = load_lanes(pv[j] + k);
          for (index_t r = 0; r < R; ++r) v[r][j] += a2[r] * y;
        }
      }
    }
    double tail_m[R][NG] = {}, tail_v[R][NG] = {};
    for (index_t k = whole; k < in_channels; ++k)
      for (index_t r = 0; r < R; ++r) {
        const double a = double(row[r][k]);
        for (index_t j = 0; j < NG; ++j) {
          tail_m[r][j] += a * double(pm[j][k]);
          if constexpr (variances) tail_v[r][j] += a * a * double(pv[j][k]);
        }
      }
    for (index_t r = 0; r < R; ++r)
      for (index_t j = 0; j < NG; ++j) {
        const index_t i = (g0 + j) * channels + c0 + r;
        mean[i] = P(lane_sum(m[r][j]) + tail_m[r][j] + double(bias[c0 + r]));
        if constexpr (variances)
          var[i] = P(lane_sum(v[r][j]) + tail_v[r][j] + double(noise_variance[c0 + r]));
      }
  }
};

/// to[g, c] = from[c] for the groups after the first: a prediction from a shared prior is the
/// same in every group, so it is computed once.
template <class P>
struct broadcast_row_op {
  const P* from;
  P* to;
  index_t width;
  BKN_HOST_DEVICE index_t grid_width() const { return width; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / width, i % width); }
  BKN_HOST_DEVICE void at(index_t row, index_t col) const { to[row * width + col] = from[col]; }
};

/// softplus(noise[c]): the process noise R per channel, once rather than per group.
template <class P>
struct noise_variance_op {
  const P* noise;
  P* variance;
  BKN_HOST_DEVICE void operator()(index_t c) const {
    variance[c] = P(math::softplus(math::evaluation_t<P>(noise[c])));
  }
};

/// Full mode, Sigma_pred = A Sigma_prev A^T + R for the identity and diagonal transitions
/// (the dense one arrives here with A Sigma_prev A^T already in cov).
template <class P>
struct predict_cov_op {
  transition_kind kind;
  const P* weights;
  const P* noise;
  const P* prior_cov;
  index_t prior_groups, channels;
  P* cov;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels;
    const index_t g = e / (C * C), i = (e / C) % C, j = e % C;
    double s;
    if (kind == transition_kind::dense) {
      s = double(cov[e]);
    } else {
      s = double(prior_cov[((prior_groups == 1 ? 0 : g) * C + i) * C + j]);
      if (kind == transition_kind::diagonal) s *= double(weights[i]) * double(weights[j]);
    }
    if (i == j && noise) s += math::softplus(double(noise[i]));
    cov[e] = P(s);
  }
};

/// The moments of the activation f(z), z ~ N(prior mean, prior var), per (prior group, c').
template <class P>
BKN_HOST_DEVICE inline math::activation_moments activation_of(activation act,
                                                              moment_function custom,
                                                              double mean, double var) {
  switch (act) {
    case activation::relu: return math::relu_moments(mean, var);
    case activation::custom: return custom(mean, var);
    case activation::none: break;
  }
  return math::identity_moments(mean, var);
}

template <class P>
struct activation_op {
  activation act;
  moment_function custom;
  const P *prior_mean, *prior_var;
  P *mean, *var;
  BKN_HOST_DEVICE void operator()(index_t i) const {
    const auto m = activation_of<P>(act, custom, double(prior_mean[i]), double(prior_var[i]));
    mean[i] = P(m.e);
    var[i] = P(m.var);
  }
};

/// Taps of a weights transition taken together, a vector of them (lanes).
inline constexpr index_t tap_block = lane_count;

/// Weights transition, per (prior group g', channel c): each tap's share of the output's
/// moments, sum_c' W[c, c', t] E[f_c'] and sum_c' W[c, c', t]^2 Var[f_c'], at
/// [(g' C + c) T + t]. A border class's mean and within-class variance are these summed over
/// the taps it sees, so the work is one pass over W per prior group, not one per class.
template <class P>
struct tap_moments_op {
  const P *weights, *act_mean, *act_var;
  index_t prior_groups, channels, in_channels, taps;
  P *tap_mean, *tap_var;

  BKN_HOST_DEVICE index_t work_per_item() const { return 2 * in_channels * taps; }
  // Items channel-major: consecutive items share the channel's C' x T weights (in L1). Taps
  // tap_block at a time, then the rest one at a time (an odd square kernel leaves one, as
  // k^2 = 1 mod 8); even and odd input channels in separate partial sums, which halves the
  // chain of dependent adds.
  BKN_HOST_DEVICE void operator()(index_t i) const {
    const index_t c = i / prior_groups, gp = i % prior_groups;
    const P* w = weights + c * in_channels * taps;
    const P* m = act_mean + gp * in_channels;
    const P* v = act_var + gp * in_channels;
    const index_t out = (gp * channels + c) * taps;
    index_t t0 = 0;
    for (; t0 + tap_block <= taps; t0 += tap_block) {
      lanes sm0 = splat(0), sm1 = sm0, sv0 = sm0, sv1 = sm0;
      index_t j = 0;
      for (; j + 2 <= in_channels; j += 2) {
        const lanes x0 = load_lanes(w + j * taps + t0), x1 = load_lanes(w + (j + 1) * taps + t0);
        sm0 += x0 * splat(double(m[j]));
        sv0 += x0 * x0 * splat(double(v[j]));
        sm1 += x1 * splat(double(m[j + 1]));
        sv1 += x1 * x1 * splat(double(v[j + 1]));
      }
      if (j < in_channels) {
        const lanes x0 = load_lanes(w + j * taps + t0);
        sm0 += x0 * splat(double(m[j]));
        sv0 += x0 * x0 * splat(double(v[j]));
      }
      sm0 += sm1;
      sv0 += sv1;
      store_lanes(tap_mean + out + t0, sm0);
      store_lanes(tap_var + out + t0, sv0);
    }
    for (; t0 < taps; ++t0) {
      double sm0 = 0, sm1 = 0, sv0 = 0, sv1 = 0;
      index_t j = 0;
      for (; j + 2 <= in_channels; j += 2) {
        const double x0 = double(w[j * taps + t0]), x1 = double(w[(j + 1) * taps + t0]);
        sm0 += x0 * double(m[j]);
        sv0 += x0 * x0 * double(v[j]);
        sm1 += x1 * double(m[j + 1]);
        sv1 += x1 * x1 * double(v[j + 1]);
      }
      if (j < in_channels) {
        const double x0 = double(w[j * taps + t0]);
        sm0 += x0 * double(m[j]);
        sv0 += x0 * x0 * double(v[j]);
      }
      tap_mean[out + t0] = P(sm0 + sm1);
      tap_var[out + t0] = P(sv0 + sv1);
    }
  }
};

/// The sum of per-tap values (kh x kw, row-major) over the taps border class k sees: a
/// rectangle, a band of kernel rows by a band of kernel columns.
template <class P>
BKN_HOST_DEVICE inline double class_tap_sum(const border_classes& classes, index_t k,
                                            index_t kernel_width, const P* taps) {
  const tap_band& rows = classes.row[k / classes.cols];
  const tap_band& cols = classes.col[k % classes.cols];
  double s = 0;
  for (index_t u = rows.first; u <= rows.last; ++u)
    for (index_t v = cols.first; v <= cols.last; ++v) s += double(taps[u * kernel_width + v]);
  return s;
}

/// Diagonal mode through the host's weights, per (g, c): the pooled mean and variance over
/// the border classes (docs/math.md, "Transitions through the host layer"), from the tap
/// moments: class k's mean is b_c + its taps' tap_mean, its variance its taps' tap_var.
template <class P>
struct weights_predict_op {
  border_classes classes;
  const P *tap_mean, *tap_var, *bias, *noise;
  index_t prior_groups, channels, kernel_width, kernel_taps;
  P *mean, *var;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const index_t g = i / channels, c = i % channels;
    const index_t first = (prior_groups == 1 ? c : g * channels + c) * kernel_taps;
    const index_t K = classes.count();
    const double b = bias ? double(bias[c]) : 0.0;
    double mu = 0;
    for (index_t k = 0; k < K; ++k)
      mu += classes.weight(k) * (b + class_tap_sum(classes, k, kernel_width, tap_mean + first));
    double v = 0;
    for (index_t k = 0; k < K; ++k) {
      const double d = b + class_tap_sum(classes, k, kernel_width, tap_mean + first) - mu;
      v += classes.weight(k) * (class_tap_sum(classes, k, kernel_width, tap_var + first) + d * d);
    }
    mean[i] = P(mu);
    var[i] = P(v + (noise ? math::softplus(double(noise[c])) : 0.0));
  }
};

/// The authors' fusion skip rule, per group: 1 when mean_c(v_pred / (s + eps)) >= threshold.
template <class P>
struct skip_rule_op {
  const P *pred_cov, *obs_cov;
  index_t channels, cov_stride;  // 1 (diagonal) or C + 1 (the diagonal of C x C)
  double threshold, epsilon;
  P* skip;

  BKN_HOST_DEVICE void operator()(index_t g) const {
    const index_t first = cov_stride == 1 ? g * channels : g * channels * channels;
    double ratio = 0;
    for (index_t c = 0; c < channels; ++c) {
      const index_t d = first + c * cov_stride;
      ratio += double(pred_cov[d]) / (double(obs_cov[d]) + epsilon);
    }
    skip[g] = P(ratio / double(channels) >= threshold ? 1 : 0);
  }
};

/// The effective gain of (g, c) and dq/dtheta: learned (sigmoid of the logit), fixed, or 1 in a
/// group whose fusion is skipped. Fixed and skipped gains get no gradient.
template <class P>
struct gain_op {
  const P *learned, *learned_slope;  // per gain parameter: gain_sigmoid_op's q and q (1 - q)
  index_t gain_count, channels;
  double fixed;    // < 0: learned
  const P* skip;   // per group; null: the rule is off
  P *gain, *slope;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    const index_t i = g * channels + c;
    if (skip && skip[g] != P(0)) {
      gain[i] = P(1);
      slope[i] = P(0);
    } else if (fixed >= 0) {
      gain[i] = P(fixed);
      slope[i] = P(0);
    } else {
      const index_t j = gain_count == 1 ? 0 : c;
      gain[i] = learned[j];
      slope[i] = learned_slope[j];
    }
  }
};

/// q = sigmoid(theta) and dq/dtheta = q (1 - q) per gain parameter (1 or C), once rather than
/// per group.
template <class P>
struct gain_sigmoid_op {
  const P* gain_logit;
  P *gain, *slope;
  BKN_HOST_DEVICE void operator()(index_t j) const {
    const double q = math::sigmoid(double(gain_logit[j]));
    gain[j] = P(q);
    slope[j] = P(q * (1 - q));
  }
};

/// Eq. 5 for (g, c): the mean, and in diagonal mode (var != null) the variance.
template <class P>
struct update_op {
  const P* gain;
  const P *pred_mean, *pred_var, *obs_mean, *obs_var;
  P *mean, *var;
  index_t channels;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const { (*this)(g * channels + c); }
  BKN_HOST_DEVICE void operator()(index_t i) const {
    const double q = gain_at(gain, i);
    const double pv = var ? double(pred_var[i]) : 0.0, ov = var ? double(obs_var[i]) : 0.0;
    const auto post =
        math::kalman_update<double>({double(pred_mean[i]), pv}, {double(obs_mean[i]), ov}, q);
    mean[i] = P(post.mean);
    if (var) var[i] = P(post.var);
  }
};

/// Full-mode Eq. 5 for element (g, i, j): p Sigma_pred + q S + p q d d^T.
template <class P>
struct update_cov_op {
  const P* gain;
  index_t channels;
  const P *pred_mean, *pred_cov, *obs_mean, *obs_cov;
  P* cov;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels;
    const index_t g = e / (C * C), i = (e / C) % C, j = e % C;
    const double q = gain_at(gain, g * C), p = 1 - q;
    const double di = double(obs_mean[g * C + i]) - double(pred_mean[g * C + i]);
    const double dj = double(obs_mean[g * C + j]) - double(pred_mean[g * C + j]);
    cov[e] = P(p * double(pred_cov[e]) + q * double(obs_cov[e]) + p * q * di * dj);
  }
};

/// y = a (x - mu) + k with a = gamma / sqrt(var + eps), k = beta, per (g, c).
template <class P>
struct normalize_coefficients_op {
  const P *gamma, *beta, *mean, *cov;
  index_t channels, cov_stride;  // cov_stride: 1 (diagonal) or C + 1 (diagonal of C x C)
  double epsilon;
  P *a, *k;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    using std::sqrt;
    const index_t i = g * channels + c;
    using E = math::evaluation_t<P>;
    const E var = E(cov[cov_stride == 1 ? i : g * channels * channels + c * cov_stride]);
    a[i] = P((gamma ? E(gamma[c]) : E(1)) / sqrt(var + E(epsilon)));
    k[i] = beta ? beta[c] : P(0);
  }
};

/// Without a prior (q = 1, diagonal mode), per (g, c): the posterior is the observed
/// statistics, copied, and normalize_coefficients_op's a and k from them, in the same pass.
template <class P>
struct batch_posterior_op {
  const P *gamma, *beta, *obs_mean, *obs_var;
  index_t channels;
  double epsilon;
  P *post_mean, *post_var, *a, *k;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    using std::sqrt;
    const index_t i = g * channels + c;
    const P var = obs_var[i];
    post_mean[i] = obs_mean[i];
    post_var[i] = var;
    using E = math::evaluation_t<P>;
    a[i] = P((gamma ? E(gamma[c]) : E(1)) / sqrt(E(var) + E(epsilon)));
    k[i] = beta ? beta[c] : P(0);
  }
};

/// Diagonal mode through an identity or diagonal A, per (g, c), in one pass: predict_op (Eq. 3),
/// gain_op, update_op (Eq. 5) and normalize_coefficients_op one after another, each value
/// rounded to P where those store it, so the same values (the gains' slopes, which only
/// backward reads, are left to backward's own gains). Every per-channel input is an array
/// (ones, zeros, the channel's gain), so the loop has no branch and vectorizes; the groups'
/// arrays are walked once rather than four times. The gains, the same in every group, are not
/// copied per (g, c): the moving averages read them per channel.
template <class P>
struct kalman_step_op {
  const P *scale, *noise_variance;  // per channel: A's diagonal (ones: identity), softplus(noise)
  const P *prior_mean, *prior_var;
  index_t prior_stride;             // 0: one prior for every group; C: one per group
  const P* channel_gain;            // per channel: q (gain_op of one row)
  const P *obs_mean, *obs_var;
  const P *gamma, *beta;            // per channel: ones and zeros where the layer has none
  index_t channels;
  double epsilon;
  P *pred_mean, *pred_var, *post_mean, *post_var, *a, *k;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    using std::sqrt;
    const index_t i = g * channels + c, prior = g * prior_stride + c;
    const double s = double(scale[c]);
    const P mean = P(s * double(prior_mean[prior]));
    const P var = P(s * s * double(prior_var[prior]) + double(noise_variance[c]));
    pred_mean[i] = mean;
    pred_var[i] = var;
    const P q = channel_gain[c];
    const auto post = math::kalman_update<double>({double(mean), double(var)},
                                                  {double(obs_mean[i]), double(obs_var[i])},
                                                  double(q));
    const P posterior_var = P(post.var);
    post_mean[i] = P(post.mean);
    post_var[i] = posterior_var;
    using E = math::evaluation_t<P>;
    a[i] = P(E(gamma[c]) / sqrt(E(posterior_var) + E(epsilon)));
    k[i] = beta[c];
  }
};

// ---- the steps, unchecked: the public routines and forward() validate first ----

template <class Backend, class T, class P>
void observe(const Backend& backend, covariance mode, tensor_view<const T> x, index_t group_size,
             gaussian_view<P> observed, const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  if (mode == covariance::diagonal) {
    K::moments(backend, x, group_size, observed.mean, observed.cov, w.scratch);
    return;
  }
  K::moments(backend, x, group_size, observed.mean, w.var, w.scratch);
  K::covariance(backend, x, group_size, span<const P>(observed.mean), observed.cov, w.scratch);
}

/// predict's per-channel inputs: R's diagonal (diagonal mode; softplus once per channel) and
/// A's bias, as arrays in w.sum_dy and w.sum_dy_centred (free until backward's reductions, and
/// apart from the gains' w.dq and w.dmean: forward may compute both before either is read). An
/// absent bias or noise reads zeros rather than a null pointer: masked vector loads through a
/// null pointer cost a microcode assist per vector on some CPUs (AMD).
template <class P>
struct channel_inputs {
  const P* noise_variance;  // null in full mode (predict_cov_op adds R itself)
  const P* bias;
};

template <class Backend, class P>
channel_inputs<P> predict_inputs(const Backend& backend, const P* noise, const P* bias,
                                 index_t C, bool full, const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const P* noise_variance = nullptr;
  if (noise != nullptr && !full) {
    K::for_each(backend, C, noise_variance_op<P>{noise, w.sum_dy.data()});
    noise_variance = w.sum_dy.data();
  }
  if (bias == nullptr || noise_variance == nullptr) {
    K::for_each(backend, C, fill_op<P>{w.sum_dy_centred.data(), P(0)});
    if (bias == nullptr) bias = w.sum_dy_centred.data();
    if (noise_variance == nullptr && !full) noise_variance = w.sum_dy_centred.data();
  }
  return {noise_variance, bias};
}

template <class Backend, class P>
void predict(const Backend& backend, covariance mode, const transition<P>& A,
             span<const P> noise, gaussian_view<const P> prior, gaussian_view<P> predicted,
             const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = predicted.channels, G = predicted.groups, Cin = prior.channels;
  const index_t PG = prior.groups;
  const P* noise_data = noise.empty() ? nullptr : noise.data();
  const P* bias = A.bias.empty() ? nullptr : A.bias.data();
  const bool full = mode == covariance::full;
  // Through the host's weights, the prior is the moments of the activation.
  const P* prior_mean = prior.mean.data();
  const P* prior_var = full ? nullptr : prior.cov.data();
  if (A.kind == transition_kind::weights && !full) {
    K::for_each(backend, PG * Cin,
                activation_op<P>{A.act, A.moments, prior.mean.data(), prior.cov.data(),
                                 w.act_mean.data(), w.act_var.data()});
    prior_mean = w.act_mean.data();
    prior_var = w.act_var.data();
  }
  if (A.kind == transition_kind::weights && !full && !is_pointwise(A.conv)) {
    const index_t T = A.conv.taps();
    K::for_each(backend, C * PG,
                tap_moments_op<P>{A.weights.data(), w.act_mean.data(), w.act_var.data(), PG, C,
                                  Cin, T, w.tap_mean.data(), w.tap_var.data()});
    K::for_each(backend, G * C,
                weights_predict_op<P>{make_border_classes(A.conv), w.tap_mean.data(),
                                      w.tap_var.data(), bias, noise_data, PG, C,
                                      A.conv.kernel_width, T, predicted.mean.data(),
                                      predicted.cov.data()});
    return;
  }
  // A pointwise weights transition (diagonal mode: a linear layer or a 1x1 convolution
  // without padding) and an affine linear one (full mode) are a dense A plus the bias.
  const transition_kind kind = A.kind == transition_kind::weights ? transition_kind::dense : A.kind;
  const auto inputs = predict_inputs(backend, noise_data, bias, C, full, w);
  const P* noise_variance = inputs.noise_variance;
  bias = inputs.bias;
  if (kind == transition_kind::dense) {
    // A shared prior predicts the same in every group: once, then copied.
    const index_t groups = PG == 1 ? 1 : G;
    const dense_predict_op<P> op{A.weights.data(), bias,       noise_variance,
                                 prior_mean,       prior_var,  groups,
                                 PG,               C,          Cin,
                                 predicted.mean.data(), full ? nullptr : predicted.cov.data()};
    K::for_each(backend, op.tiles(), op);
    if (groups < G) {
      K::for_each(backend, (G - 1) * C,
                  broadcast_row_op<P>{predicted.mean.data(), predicted.mean.data() + C, C});
      if (!full)
        K::for_each(backend, (G - 1) * C,
                    broadcast_row_op<P>{predicted.cov.data(), predicted.cov.data() + C, C});
    }
  } else {
    K::for_each(backend, G * C,
                predict_op<P>{kind, A.weights.data(), bias, noise_variance, prior.mean.data(),
                              full ? nullptr : prior.cov.data(), PG, C, predicted.mean.data(),
                              full ? nullptr : predicted.cov.data()});
  }
  if (!full) return;
  if (kind == transition_kind::dense) {
    // product = A Sigma_prev (C x C' per prior group), then cov = product A^T.
    K::for_each(backend, PG * C * Cin,
                batched_product<P>{{A.weights.data(), 0, Cin, false},
                                   {prior.cov.data(), Cin * Cin, Cin, false},
                                   w.product.data(), PG, PG, C, Cin, Cin, false});
    K::for_each(backend, G * C * C,
                batched_product<P>{{w.product.data(), PG == 1 ? 0 : C * Cin, Cin, false},
                                   {A.weights.data(), 0, Cin, true},
                                   predicted.cov.data(), G, G, C, C, Cin, false});
  }
  K::for_each(backend, G * C * C,
              predict_cov_op<P>{kind, A.weights.data(), noise_data, prior.cov.data(), PG, C,
                                predicted.cov.data()});
}

/// gain_op writing `gain` and `slope`, the learned gains' sigmoids computed first, once, in
/// w.dq and w.dmean (free until backward's coefficients). `skip`: per group, or null.
template <class Backend, class P>
gain_op<P> gain_rows(const Backend& backend, const options& opt, span<const P> gain_logit,
                     index_t C, const P* skip, P* gain, P* slope, const layer_workspace<P>& w) {
  const bool learned = opt.fixed_gain < 0 && !gain_logit.empty();
  if (learned)
    kernels<Backend>::for_each(backend, gain_logit.size(),
                               gain_sigmoid_op<P>{gain_logit.data(), w.dq.data(), w.dmean.data()});
  return {learned ? w.dq.data() : nullptr, learned ? w.dmean.data() : nullptr,
          gain_logit.size(), C, opt.fixed_gain, skip, gain, slope};
}

/// The effective gains of every (g, c) into w.gain and w.gain_slope.
template <class Backend, class P>
void compute_gains(const Backend& backend, const options& opt, span<const P> gain_logit,
                   gaussian_view<const P> predicted, gaussian_view<const P> observed,
                   const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = observed.channels, G = observed.groups;
  const bool skip = opt.skip_threshold > 0;
  if (skip)
    K::for_each(backend, G,
                skip_rule_op<P>{predicted.cov.data(), observed.cov.data(), C,
                                opt.mode == covariance::full ? C + 1 : 1, opt.skip_threshold,
                                opt.epsilon, w.skip.data()});
  K::for_each(backend, G * C,
              gain_rows(backend, opt, gain_logit, C, skip ? w.skip.data() : nullptr,
                        w.gain.data(), w.gain_slope.data(), w));
}

/// Whether forward may run predict, the gains, update and the coefficients as kalman_step: in
/// diagonal mode, through an identity or diagonal A, without the skip rule (a mean over the
/// channels of the predicted state, needed before any gain).
template <class P>
bool one_kalman_pass(const options& opt, const transition<P>& A) {
  return opt.mode == covariance::diagonal && !(opt.skip_threshold > 0) &&
         (A.kind == transition_kind::identity || A.kind == transition_kind::diagonal);
}

/// Where kalman_step leaves its gains, one per channel (the same in every group), for forward's
/// moving averages to read after it: w.dmean_predicted, free until backward.
template <class P>
span<P> kalman_step_gains(const layer_workspace<P>& w) {
  return w.dmean_predicted;
}

/// predict, compute_gains, update and normalize's coefficients (into w.a, w.k) in one pass over
/// the groups (kalman_step_op), where one_kalman_pass holds. Its per-channel inputs go to
/// arrays of C that forward leaves free: ones in w.b, zeros and R's diagonal in w.sum_dy_centred
/// and w.sum_dy (predict_inputs), the sigmoids in w.dq and w.dmean (gain_rows), the gains of
/// one row in kalman_step_gains(w) (gain_op's slopes in w.dcov_predicted, unread).
template <class Backend, class P>
void kalman_step(const Backend& backend, const options& opt, const parameters<P>& p,
                 gaussian_view<const P> prior, gaussian_view<const P> observed,
                 gaussian_view<P> predicted, gaussian_view<P> posterior,
                 const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = observed.channels, G = observed.groups;
  const auto in = predict_inputs(backend, p.noise.empty() ? nullptr : p.noise.data(),
                                 static_cast<const P*>(nullptr), C, false, w);
  const P* zeros = in.bias;  // no bias through an identity or diagonal A: the zeros
  const bool identity = p.transition.kind == transition_kind::identity;
  if (identity || p.gamma.empty()) K::for_each(backend, C, fill_op<P>{w.b.data(), P(1)});
  const P* ones = w.b.data();
  K::for_each(backend, C,
              gain_rows(backend, opt, p.gain_logit, C, static_cast<const P*>(nullptr),
                        kalman_step_gains(w).data(), w.dcov_predicted.data(), w));
  K::for_each(backend, G * C,
              kalman_step_op<P>{identity ? ones : p.transition.weights.data(),
                                in.noise_variance,
                                prior.mean.data(),
                                prior.cov.data(),
                                prior.groups == 1 ? 0 : C,
                                kalman_step_gains(w).data(),
                                observed.mean.data(),
                                observed.cov.data(),
                                p.gamma.empty() ? ones : p.gamma.data(),
                                p.beta.empty() ? zeros : p.beta.data(),
                                C,
                                opt.epsilon,
                                predicted.mean.data(),
                                predicted.cov.data(),
                                posterior.mean.data(),
                                posterior.cov.data(),
                                w.a.data(),
                                w.k.data()});
}

template <class Backend, class P>
void update(const Backend& backend, covariance mode, const P* gain,
            gaussian_view<const P> predicted, gaussian_view<const P> observed,
            gaussian_view<P> posterior) {
  using K = kernels<Backend>;
  const index_t C = posterior.channels, G = posterior.groups;
  const bool full = mode == covariance::full;
  K::for_each(backend, G * C,
              update_op<P>{gain, predicted.mean.data(), full ? nullptr : predicted.cov.data(),
                           observed.mean.data(), full ? nullptr : observed.cov.data(),
                           posterior.mean.data(), full ? nullptr : posterior.cov.data(), C});
  if (!full) return;
  K::for_each(backend, G * C * C,
              update_cov_op<P>{gain, C, predicted.mean.data(), predicted.cov.data(),
                               observed.mean.data(), observed.cov.data(), posterior.cov.data()});
}

template <class Backend, class T, class P>
void normalize(const Backend& backend, covariance mode, tensor_view<const T> x,
               tensor_view<T> y, span<const P> gamma, span<const P> beta,
               gaussian_view<const P> estimate, index_t group_size, double epsilon,
               const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = estimate.channels, G = estimate.groups;
  K::for_each(backend, G * C,
              normalize_coefficients_op<P>{gamma.empty() ? nullptr : gamma.data(),
                                           beta.empty() ? nullptr : beta.data(),
                                           estimate.mean.data(), estimate.cov.data(), C,
                                           mode == covariance::full ? C + 1 : 1, epsilon,
                                           w.a.data(), w.k.data()});
  K::affine(backend, y, x, span<const P>(w.a), estimate.mean, tensor_view<const T>(),
            span<const P>(), span<const P>(w.k), group_size);
}

// ---- chunks of statistics groups ----

/// Whether kernels<Backend> has the optional group_chunk (see backend.hpp).
template <class Backend, class = void>
struct has_group_chunk : std::false_type {};
template <class Backend>
struct has_group_chunk<
    Backend, std::void_t<decltype(kernels<Backend>::group_chunk(
                 std::declval<const Backend&>(), tensor_shape{}, index_t(0), std::size_t(0)))>>
    : std::true_type {};

/// Statistics groups that forward and backward run through their steps at a time: what the
/// backend asks for (all of them without group_chunk), in diagonal mode and for transitions
/// whose per-channel math is per group (not through the host's weights, whose tap sums are
/// computed once per call). `element_bytes`: the size of one of the tensor's values.
template <class Backend, class P>
index_t groups_per_chunk(const Backend& backend, const options& opt, const transition<P>& A,
                         const tensor_shape& x, index_t group_size, std::size_t element_bytes) {
  using K = kernels<Backend>;
  const index_t G = x.batch / group_size;
  if constexpr (has_group_chunk<Backend>::value) {
    if (opt.mode == covariance::full || A.kind == transition_kind::weights) return G;
    const index_t chunk = K::group_chunk(backend, x, group_size, element_bytes);
    return chunk > 0 && chunk < G ? chunk : G;
  } else {
    (void)backend, (void)opt, (void)A, (void)element_bytes;
    return G;
  }
}

/// Groups [g0, g0 + n) of a tensor view (of `group_size` samples each), of a Gaussian estimate
/// (`mode` says its covariances' size) and of the workspace's per-group arrays. A view of
/// another number of groups (a prior shared by every group, an empty one) is returned as it is.
template <class T>
tensor_view<T> groups_of(const tensor_view<T>& v, index_t g0, index_t n, index_t group_size) {
  tensor_shape shape = v.shape();
  shape.batch = n * group_size;
  return strided(v.data() + g0 * group_size * v.strides().batch, shape, v.strides());
}

template <class P>
gaussian_view<P> groups_of(const gaussian_view<P>& v, index_t g0, index_t n, index_t groups,
                           covariance mode) {
  if (v.groups != groups || n == groups) return v;
  const index_t C = v.channels, cov = covariance_elements(C, mode);
  return {v.mean.subspan(g0 * C, n * C), v.cov.subspan(g0 * cov, n * cov), n, C};
}

/// The per-group arrays of diagonal mode (the only mode that runs in chunks). What a chunk uses
/// alone (the coefficients, the reductions, the gains) every chunk takes from the start of its
/// array, so that it stays in cache from one chunk to the next rather than streaming G x C
/// values through memory; the predicted state's gradients, which the transition's backward
/// reads after the last chunk, are the chunk's own groups.
template <class P>
layer_workspace<P> groups_of(const layer_workspace<P>& w, index_t g0, index_t n, index_t groups,
                             index_t channels) {
  if (n == groups) return w;
  layer_workspace<P> part = w;
  const index_t first = g0 * channels, count = n * channels;
  for (span<P>* a : {&part.a, &part.b, &part.k, &part.sum_dy, &part.sum_dy_centred, &part.dq,
                     &part.dmean, &part.gain, &part.gain_slope})
    *a = a->subspan(0, count);
  for (span<P>* a : {&part.dmean_predicted, &part.dcov_predicted})
    *a = a->subspan(first, count);
  part.skip = w.skip.subspan(g0, n);
  return part;
}

/// Runs group-sum functor `f` (built for all `groups`, its arrays offset to group g0) over
/// groups [g0, g0 + n): as chunk_sums_op when they are a chunk of them.
template <class Backend, class F>
void sum_chunk(const Backend& backend, index_t channels, const F& f, span<double> carry,
               index_t g0, index_t n, index_t groups) {
  using K = kernels<Backend>;
  double* const c = carry.data();
  if (n == groups)  // all at once
    K::for_each(backend, channels, f);
  else if (g0 + n == groups)
    K::for_each(backend, channels, chunk_sums_op<F, true>{f, c, n, channels, g0 > 0});
  else
    K::for_each(backend, channels, chunk_sums_op<F, false>{f, c, n, channels, g0 > 0});
}

template <class Backend, class P>
layer_workspace<P> carve_checked(const char* routine, const Backend& backend, const options& opt,
                                 const tensor_shape& shape, index_t group_size,
                                 const transition<P>& A, span<std::byte> workspace) {
  workspace_arena measure;
  carve_workspace<Backend, P>(measure, backend, opt, shape, group_size, A, routine);
  check_workspace(routine, workspace, measure.used());
  workspace_arena arena(workspace);
  return carve_workspace<Backend, P>(arena, backend, opt, shape, group_size, A, routine);
}

}  // namespace detail

/// Algorithm 1's first two lines: per statistics group of opt.group_size consecutive samples
/// (0: the whole batch), the mean xbar and the biased covariance S of x's channels (variances in
/// diagonal mode). `observed` holds N / group_size groups of C channels.
template <class Backend, class X, class P>
void observe(const Backend& backend, const options& opt, tensor_view<X> input,
             gaussian_view<P> observed, span<std::byte> workspace) {
  constexpr const char* routine = "bkn::observe";
  const tensor_view<const std::remove_const_t<X>> x = input;
  detail::check_options(routine, opt);
  detail::check_view(routine, "x", x, false);
  if (x.batch() == 0) return;
  const index_t group_size = detail::resolve_group_size(routine, opt, x.batch());
  detail::check_gaussian(routine, "observed", observed, x.batch() / group_size, x.channels(),
                         opt.mode);
  const auto w = detail::carve_checked<Backend, P>(routine, backend, opt, x.shape(), group_size,
                                                   transition<P>(), workspace);
  detail::observe(backend, opt.mode, x, group_size, observed, w);
}

/// Eq. 3: mu_pred = A mu_prev and Sigma_pred = A Sigma_prev A^T + R (diagonal mode:
/// v_pred = (A o A) v_prev + r), R = diag(softplus(noise)) (empty noise: R = 0); through the
/// host's weights, the moments of its activation and layer (docs/math.md). `prior` has 1 group
/// (shared) or as many as `predicted`; `height` x `width` is this layer's spatial size (for a
/// convolution transition).
template <class Backend, class P>
void predict(const Backend& backend, const options& opt, const transition<P>& A,
             span<const detail::nondeduced<P>> noise,
             gaussian_view<const detail::nondeduced<P>> prior, gaussian_view<P> predicted,
             span<std::byte> workspace, index_t height = 1, index_t width = 1) {
  constexpr const char* routine = "bkn::predict";
  const index_t C = predicted.channels, G = predicted.groups;
  detail::check_options(routine, opt);
  detail::check_transition(routine, A, C, height, width);
  detail::check_weight_transition_mode(routine, opt, A);
  detail::check_optional(routine, "noise", noise.size(), C, "one per channel");
  detail::check_gaussian(routine, "predicted", predicted, G, C, opt.mode);
  detail::require(prior.groups == 1 || prior.groups == G, routine, "prior", "expected 1 or ", G,
                  " groups, got ", prior.groups);
  detail::check_gaussian(routine, "prior", prior, prior.groups, A.input_channels(C), opt.mode);
  if (G == 0) return;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, opt, {G, C, height, width},
                                                   1, A, workspace);
  detail::predict(backend, opt.mode, A, noise, prior, predicted, w);
}

/// Eq. 5: the posterior p N(predicted) + q N(observed) with q = sigmoid(gain_logit) (1 element,
/// or C per-channel gains in diagonal mode), or opt.fixed_gain, and the fusion skipped
/// (q = 1) in groups where opt.skip_threshold says so.
template <class Backend, class P>
void update(const Backend& backend, const options& opt,
            span<const detail::nondeduced<P>> gain_logit,
            gaussian_view<const detail::nondeduced<P>> predicted,
            gaussian_view<const detail::nondeduced<P>> observed, gaussian_view<P> posterior,
            span<std::byte> workspace) {
  constexpr const char* routine = "bkn::update";
  const index_t C = posterior.channels, G = posterior.groups;
  detail::check_options(routine, opt);
  detail::check_gain(routine, "gain_logit", opt, gain_logit.size(), C);
  detail::check_gaussian(routine, "predicted", predicted, G, C, opt.mode);
  detail::check_gaussian(routine, "observed", observed, G, C, opt.mode);
  detail::check_gaussian(routine, "posterior", posterior, G, C, opt.mode);
  if (G == 0) return;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, opt, {G, C, 1, 1}, 1,
                                                   transition<P>(), workspace);
  detail::compute_gains(backend, opt, gain_logit, predicted, observed, w);
  detail::update(backend, opt.mode, w.gain.data(), predicted, observed, posterior);
}

/// y = gamma (x - mu) / sqrt(var + eps) + beta with the estimate of each sample's group
/// (gamma, beta empty: 1, 0; var: the diagonal in full mode). y may be the same view as x.
template <class Backend, class T, class E>
void normalize(const Backend& backend, const options& opt,
               tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
               span<const std::remove_const_t<E>> gamma, span<const std::remove_const_t<E>> beta,
               gaussian_view<E> estimate_, span<std::byte> workspace) {
  constexpr const char* routine = "bkn::normalize";
  using P = std::remove_const_t<E>;
  const gaussian_view<const P> estimate = estimate_;
  detail::check_options(routine, opt);
  detail::check_view(routine, "x", x, false);
  detail::check_view(routine, "y", y, true);
  detail::check_shape(routine, "y", y, x.shape());
  detail::check_no_overlap(routine, "y", y, "x", x, true);
  const index_t C = x.channels();
  detail::check_optional(routine, "gamma", gamma.size(), C, "one per channel");
  detail::check_optional(routine, "beta", beta.size(), C, "one per channel");
  if (x.empty()) return;
  detail::require(estimate.groups > 0 && x.batch() % estimate.groups == 0, routine, "estimate",
                  "expected a number of groups dividing the batch size ", x.batch(), ", got ",
                  estimate.groups);
  detail::check_gaussian(routine, "estimate", estimate, estimate.groups, C, opt.mode);
  const index_t group_size = x.batch() / estimate.groups;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, opt, x.shape(), group_size,
                                                   transition<P>(), workspace);
  detail::normalize(backend, opt.mode, x, y, gamma, beta, estimate, group_size, opt.epsilon, w);
}

BKN_END_NAMESPACE
