// SPDX-License-Identifier: MIT
// backward: one layer's complete gradient (docs/math.md), to x, gamma, beta, the gain, the
// transition, the process noise and the previous layer's posterior, so it flows along the chain.
#pragma once

#include <algorithm>
#include <cmath>

#include "bkn/detail/lanes.hpp"
#include "bkn/forward.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

template <class P>
BKN_HOST_DEVICE inline double at_or_zero(const P* p, index_t i) {
  return p ? double(p[i]) : 0.0;
}

/// Diagonal mode, per (g, c): the coefficients of dx and the gradients of Eq. 5's inputs.
/// `no_prior`: q = 1 (batch normalization), only the coefficients (`gain`, the observed and
/// predicted moments, dq and the predicted gradients are neither read nor written).
template <class P, bool no_prior = false>
struct diag_backward_op {
  double count, epsilon;
  const P *gain, *gamma;
  index_t channels;
  const P *obs_mean, *obs_var, *pred_mean, *pred_var, *post_mean, *post_var;
  const P *sum_dy, *dpost_mean, *dpost_var;
  // In: sum dy (x - mu); out, in its place: the (g, c) part of dgamma (read, then written).
  P* sum_dy_centred;
  P *a, *b, *k, *dq, *dmean_pred, *dvar_pred;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    const index_t i = g * channels + c;
    math::diag_backward_in<double> in;
    in.count = count;
    in.q = no_prior ? 1.0 : gain_at(gain, i);
    in.gamma = gamma ? double(gamma[c]) : 1.0;
    in.epsilon = epsilon;
    if constexpr (!no_prior) {
      in.observed = {double(obs_mean[i]), double(obs_var[i])};
      in.predicted = {double(pred_mean[i]), double(pred_var[i])};
    }
    in.posterior = {double(post_mean[i]), double(post_var[i])};
    in.sum_dy = double(sum_dy[i]);
    in.sum_dy_centred = double(sum_dy_centred[i]);
    in.dmean_out = at_or_zero(dpost_mean, i);
    in.dvar_out = at_or_zero(dpost_var, i);
    const auto out = math::kalman_backward(in);
    a[i] = P(out.a);
    b[i] = P(out.b);
    k[i] = P(out.k);
    sum_dy_centred[i] = P(out.dgamma);
    if constexpr (!no_prior) {
      dq[i] = P(out.dq);
      dmean_pred[i] = P(out.dmean_predicted);
      dvar_pred[i] = P(out.dvar_predicted);
    }
  }
};

/// Full mode, per (g, i, j): G = dSigma_out + diag(-1/2 gamma sum dy (x - mu) / sigma^3).
template <class P>
struct full_gradient_matrix_op {
  double epsilon;
  const P *gamma, *post_cov, *sum_dy_centred, *dpost_cov;
  index_t channels;
  P* matrix;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    using std::sqrt;
    const index_t C = channels;
    const index_t g = e / (C * C), i = (e / C) % C, j = e % C;
    double v = at_or_zero(dpost_cov, e);
    if (i == j) {
      const double inv_sigma = 1.0 / sqrt(double(post_cov[e]) + epsilon);
      v -= 0.5 * (gamma ? double(gamma[i]) : 1.0) * double(sum_dy_centred[g * C + i]) *
           inv_sigma * inv_sigma * inv_sigma;
    }
    matrix[e] = P(v);
  }
};

/// Full mode, per (g, i): dx's a and k, dmu_total, dmu_pred and row i's part of dq.
template <class P>
struct full_backward_vector_op {
  double count, epsilon;
  const P *gain, *gamma;
  index_t channels;
  const P *matrix, *obs_mean, *obs_cov, *pred_mean, *pred_cov, *post_mean, *post_cov;
  const P *sum_dy, *dpost_mean;
  P *a, *k, *dmean, *dq, *dmean_pred;

  BKN_HOST_DEVICE void operator()(index_t r) const {
    using std::sqrt;
    const index_t C = channels, g = r / C, i = r % C;
    const double q = gain_at(gain, r), p = 1 - q;
    const double gam = gamma ? double(gamma[i]) : 1.0;
    const double inv_sigma = 1.0 / sqrt(double(post_cov[(g * C + i) * C + i]) + epsilon);
    const double dmean_total = at_or_zero(dpost_mean, r) - gam * double(sum_dy[r]) * inv_sigma;
    const P* G = matrix + g * C * C;
    const double d_i = double(obs_mean[r]) - double(pred_mean[r]);
    double gs_d = 0, dq_row = dmean_total * d_i;
    for (index_t j = 0; j < C; ++j) {
      const double gs = double(G[i * C + j]) + double(G[j * C + i]);
      const double d_j = double(obs_mean[g * C + j]) - double(pred_mean[g * C + j]);
      gs_d += gs * d_j;
      const index_t e = (g * C + i) * C + j;
      dq_row += double(G[i * C + j]) *
                (double(obs_cov[e]) - double(pred_cov[e]) + (1 - 2 * q) * d_i * d_j);
    }
    a[r] = P(gam * inv_sigma);
    k[r] = P(q / count * dmean_total);  // with dx's matrix applied to x - mu
    dmean[r] = P(dmean_total);
    dq[r] = P(dq_row);
    dmean_pred[r] = P(p * dmean_total - p * q * gs_d);
  }
};

/// Full mode, per (g, i, j): dx's matrix (q/m)(G + G^T) and dSigma_pred = p G.
template <class P>
struct full_mix_matrix_op {
  double count;
  const P* gain;
  index_t channels;
  const P* matrix;
  P *mix, *dcov_pred;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels;
    const index_t g = e / (C * C), i = (e / C) % C, j = e % C;
    const double q = gain_at(gain, g * C);
    const double gij = double(matrix[e]), gji = double(matrix[(g * C + j) * C + i]);
    mix[e] = P(q / count * (gij + gji));
    dcov_pred[e] = P((1 - q) * gij);
  }
};

/// Per (g, c), in place: sum dy (x - mu) / sqrt(var + eps), the (g, c) part of dgamma (what
/// diag_backward_op leaves; the other backward paths call this). `full`: C x C covariances
/// per group (their diagonals are read).
template <class P, bool full = false>
struct dgamma_parts_op {
  double epsilon;
  index_t channels;
  const P* cov;
  P* sum_dy_centred;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    using std::sqrt;
    const index_t i = g * channels + c;
    const double var = double(cov[full ? i * channels + c : i]);
    sum_dy_centred[i] = P(double(sum_dy_centred[i]) / sqrt(var + epsilon));
  }
};

/// Per channel: the parameter gradients, summed over the groups in a fixed order (a group-sum
/// functor, see steps.hpp), from the (g, c) parts of dgamma (dgamma_parts_op). `full`: C x C
/// covariances per group (the diagonals of dSigma_pred are read); `prior_terms`: also the
/// gain's and the process noise's (dnoise receives sum dSigma_pred, noise_gradient_op then
/// applies dr/drho). Every output is written: point the ones not wanted at the workspace's
/// sink (a branch in the loop would keep it from vectorizing).
template <class P, bool full = false, bool prior_terms = false>
struct parameter_gradients_op {
  index_t groups, channels;
  const P *dgamma_part, *sum_dy, *dq, *gain_slope, *dcov_pred;
  P *dgamma, *dbeta, *dgain, *dnoise;

  static constexpr int sums = prior_terms ? 4 : 2;
  BKN_HOST_DEVICE index_t group_count() const { return groups; }
  BKN_HOST_DEVICE void add(index_t g, index_t c, double* acc, index_t stride) const {
    const index_t i = g * channels + c;
    acc[0] += double(dgamma_part[i]);
    acc[stride] += double(sum_dy[i]);
    if constexpr (prior_terms) {
      acc[2 * stride] += double(dq[i]) * double(gain_slope[i]);
      acc[3 * stride] += double(dcov_pred[full ? i * channels + c : i]);
    }
  }
  BKN_HOST_DEVICE void finish(index_t c, const double* acc, index_t stride) const {
    dgamma[c] = P(acc[0]);
    dbeta[c] = P(acc[stride]);
    if constexpr (prior_terms) {
      dgain[c] = P(acc[2 * stride]);
      dnoise[c] = P(acc[3 * stride]);
    }
  }
  BKN_HOST_DEVICE void operator()(index_t c) const { sum_over_groups(*this, c); }
};

/// dnoise = sum dSigma_pred (written by parameter_gradients_op) times dr/drho = sigmoid(rho).
template <class P>
struct noise_gradient_op {
  const P* noise;
  P* dnoise;
  BKN_HOST_DEVICE void operator()(index_t c) const {
    dnoise[c] = P(double(dnoise[c]) * double(math::sigmoid(math::evaluation_t<P>(noise[c]))));
  }
};

/// The gradient of a per-layer gain: the sum of its per-channel parts (each summed over the
/// groups by parameter_gradients_op), in a fixed order: channel c into partial sum c mod 8,
/// the eight summed pairwise, then the last C mod 8 channels. One chain of C dependent
/// additions was a third of BKN-identity's backward on NC 2x1024; eight chains vectorize.
template <class P>
struct scalar_gain_gradient_op {
  const P* per_channel;
  index_t channels;
  P* dgain;
  BKN_HOST_DEVICE void operator()(index_t) const {
    // A plain array, not detail::lanes: GCC vectorizes this loop either way, but kept a lanes
    // struct's two AVX2 halves on the stack from one iteration to the next.
    double partial[8] = {};
    index_t c = 0;
    for (; c + 8 <= channels; c += 8)
      for (index_t l = 0; l < 8; ++l) partial[l] += double(per_channel[c + l]);
    double s = lane_sum(partial);
    for (; c < channels; ++c) s += double(per_channel[c]);
    dgain[0] = P(s);
  }
};

/// d(prior) through an identity or diagonal A (`scaled`), one prior per group, per (g, c):
/// d(prior mean) = a dmu_pred, and in diagonal mode (`variances`) d(prior var) = a^2 dv_pred.
/// In full mode the prior covariance's gradient comes from transition_cov_backward_op.
template <class P, bool scaled, bool variances>
struct channel_transition_backward_op {
  const P* weights;  // A's diagonal; unread for the identity
  index_t channels;
  const P *dmean_pred, *dvar_pred;  // dvar_pred unread without variances
  P *dprior_mean, *dprior_var;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    const index_t i = g * channels + c;
    const double a = scaled ? double(weights[c]) : 1.0;
    dprior_mean[i] = P(a * double(dmean_pred[i]));
    if constexpr (variances) dprior_var[i] = P(a * a * double(dvar_pred[i]));
  }
};

/// The same for a prior shared by every group: its gradient summed over the groups in order
/// (a group-sum functor, see steps.hpp).
template <class P, bool scaled, bool variances>
struct shared_transition_backward_op {
  const P* weights;
  index_t groups, channels;
  const P *dmean_pred, *dvar_pred;
  P *dprior_mean, *dprior_var;

  static constexpr int sums = variances ? 2 : 1;
  BKN_HOST_DEVICE index_t group_count() const { return groups; }
  BKN_HOST_DEVICE void add(index_t g, index_t c, double* acc, index_t stride) const {
    const index_t i = g * channels + c;
    const double a = scaled ? double(weights[c]) : 1.0;
    acc[0] += a * double(dmean_pred[i]);
    if constexpr (variances) acc[stride] += a * a * double(dvar_pred[i]);
  }
  BKN_HOST_DEVICE void finish(index_t c, const double* acc, index_t stride) const {
    dprior_mean[c] = P(acc[0]);
    if constexpr (variances) dprior_var[c] = P(acc[stride]);
  }
  BKN_HOST_DEVICE void operator()(index_t c) const { sum_over_groups(*this, c); }
};

/// A diagonal A's gradient per channel c: the mean part sum_g dmu_pred[g, c] mu_prev[g, c],
/// plus with `variances` (diagonal mode) the variance part sum_g 2 a_c dv_pred[g, c]
/// v_prev[g, c], each group's two terms added in turn. Full mode adds its covariance part
/// afterwards. A group-sum functor (see steps.hpp), so the sums over the groups vectorize
/// across channels.
template <class P, bool variances = true>
struct diagonal_transition_gradient_op {
  const P* weights;
  index_t groups, prior_groups, channels;
  const P *dmean_pred, *dvar_pred, *prior_mean, *prior_var;  // *var unread without variances
  P* dweights;

  static constexpr int sums = 1;
  BKN_HOST_DEVICE index_t group_count() const { return groups; }
  BKN_HOST_DEVICE void add(index_t g, index_t c, double* acc, index_t) const {
    const index_t i = g * channels + c, prior = (prior_groups == 1 ? 0 : g) * channels + c;
    acc[0] += double(dmean_pred[i]) * double(prior_mean[prior]);
    if constexpr (variances)
      acc[0] += 2 * double(weights[c]) * double(dvar_pred[i]) * double(prior_var[prior]);
  }
  BKN_HOST_DEVICE void finish(index_t c, const double* acc, index_t) const {
    dweights[c] = P(acc[0]);
  }
  BKN_HOST_DEVICE void operator()(index_t c) const { sum_over_groups(*this, c); }
};

/// Columns of A per tile of the dense transition's backward (two lanes), and prior groups
/// (dprior) or rows of A (dA) per tile: a tile loads and widens each value once for all of
/// them. Columns past the last whole block take a plain loop.
inline constexpr index_t dense_block = 2 * lane_count, dense_tile_prior_groups = 4,
                         dense_tile_weight_rows = 4;

/// d(prior) through a dense A, per tile of dense_block channels k of the previous
/// layer by dense_tile_prior_groups prior groups g': d(prior mean)[g', k] = sum over the rows
/// (g, c), g the groups that read g', of A[c, k] dmu_pred[g, c], and with `variances`
/// d(prior var) with A[c, k]^2 dSigma_pred[g, c]. A is read row by row (contiguous in k). A
/// shared prior sums every group's rows, dense_tile_prior_groups groups at a time in as many
/// partial sums.
template <class P, bool variances = true>
struct dense_transition_backward_op {
  const P* weights;
  index_t groups, prior_groups, channels, in_channels;
  const P *dmean_pred, *dvar_pred;  // dvar_pred unread without variances
  P *dprior_mean, *dprior_var;

  static constexpr index_t NP = dense_tile_prior_groups;
  BKN_HOST_DEVICE index_t column_tiles() const {
    return (in_channels + dense_block - 1) / dense_block;
  }
  BKN_HOST_DEVICE index_t tiles() const {
    return (prior_groups + NP - 1) / NP * column_tiles();
  }
  BKN_HOST_DEVICE index_t work_per_item() const {
    return 2 * dense_block * channels * (prior_groups == 1 ? groups : NP);
  }
  // Tiles row-major over (prior groups, columns): consecutive tiles share their rows of dmu.
  BKN_HOST_DEVICE void operator()(index_t t) const {
    const index_t p0 = t / column_tiles() * NP, k0 = t % column_tiles() * dense_block;
    const index_t last = p0 + NP < prior_groups ? p0 + NP : prior_groups;
    if (in_channels - k0 < dense_block) {
      for (index_t p = p0; p < last; ++p) edge(p, k0, in_channels - k0);
    } else if (prior_groups == 1) {
      shared(k0);
    } else if (last - p0 == NP) {
      tile<NP>(p0, k0);
    } else {
      for (index_t p = p0; p < last; ++p) tile<1>(p, k0);
    }
  }

  // Adds row i of dmu (and dSigma) times row c of A's columns [k0, k0 + dense_block).
  BKN_HOST_DEVICE void add_row(const lanes* a, const lanes* a2, index_t i, lanes* m,
                               lanes* v) const {
    const lanes d = splat(double(dmean_pred[i]));
    m[0] += a[0] * d;
    m[1] += a[1] * d;
    if constexpr (variances) {
      const lanes e = splat(double(dvar_pred[i]));
      v[0] += a2[0] * e;
      v[1] += a2[1] * e;
    }
  }
  BKN_HOST_DEVICE void load_row(index_t c, index_t k0, lanes* a, lanes* a2) const {
    const P* row = weights + c * in_channels + k0;
    a[0] = load_lanes(row);
    a[1] = load_lanes(row + lane_count);
    a2[0] = a[0] * a[0];
    a2[1] = a[1] * a[1];
  }
  BKN_HOST_DEVICE void store(index_t p, index_t k0, const lanes* m, const lanes* v) const {
    for (index_t l = 0; l < dense_block; ++l) {
      const index_t e = p * in_channels + k0 + l;
      dprior_mean[e] = P(lane(m[l / lane_count], l % lane_count));
      if constexpr (variances) dprior_var[e] = P(lane(v[l / lane_count], l % lane_count));
    }
  }

  // Prior groups [p0, p0 + N), each read by its own group.
  template <index_t N>
  BKN_HOST_DEVICE void tile(index_t p0, index_t k0) const {
    lanes m[N][2], v[N][2];
    for (index_t j = 0; j < N; ++j) m[j][0] = m[j][1] = v[j][0] = v[j][1] = splat(0);
    for (index_t c = 0; c < channels; ++c) {
      lanes a[2], a2[2];
      load_row(c, k0, a, a2);
      for (index_t j = 0; j < N; ++j) add_row(a, a2, (p0 + j) * channels + c, m[j], v[j]);
    }
    for (index_t j = 0; j < N; ++j) store(p0 + j, k0, m[j], v[j]);
  }

  // The one prior group, read by every group: groups g0 + j in partial sums j.
  BKN_HOST_DEVICE void shared(index_t k0) const {
    lanes m[NP][2], v[NP][2];
    for (index_t j = 0; j < NP; ++j) m[j][0] = m[j][1] = v[j][0] = v[j][1] = splat(0);
    const index_t whole = groups - groups % NP;
    for (index_t g0 = 0; g0 < whole; g0 += NP)
      for (index_t c = 0; c < channels; ++c) {
        lanes a[2], a2[2];
        load_row(c, k0, a, a2);
        for (index_t j = 0; j < NP; ++j) add_row(a, a2, (g0 + j) * channels + c, m[j], v[j]);
      }
    for (index_t g = whole; g < groups; ++g)
      for (index_t c = 0; c < channels; ++c) {
        lanes a[2], a2[2];
        load_row(c, k0, a, a2);
        add_row(a, a2, g * channels + c, m[0], v[0]);
      }
    for (index_t b = 0; b < 2; ++b) {
      m[0][b] += m[1][b];
      m[2][b] += m[3][b];
      m[0][b] += m[2][b];
      v[0][b] += v[1][b];
      v[2][b] += v[3][b];
      v[0][b] += v[2][b];
    }
    store(0, k0, m[0], v[0]);
  }

  // Columns [k0, k0 + n), n < dense_block, of prior group p.
  BKN_HOST_DEVICE void edge(index_t p, index_t k0, index_t n) const {
    const index_t per_prior = prior_groups == 1 ? groups : 1;
    for (index_t l = 0; l < n; ++l) {
      double m = 0, v = 0;
      for (index_t h = 0; h < per_prior; ++h)
        for (index_t c = 0; c < channels; ++c) {
          const index_t i = (p * per_prior + h) * channels + c;
          const double a = double(weights[c * in_channels + k0 + l]);
          m += a * double(dmean_pred[i]);
          if constexpr (variances) v += a * a * double(dvar_pred[i]);
        }
      dprior_mean[p * in_channels + k0 + l] = P(m);
      if constexpr (variances) dprior_var[p * in_channels + k0 + l] = P(v);
    }
  }
};

/// A dense A's gradient, per tile of dense_tile_weight_rows rows c by
/// dense_block columns k: dA[c, k] = sum_g dmu_pred[g, c] mu_prev[g, k] (+ with `variances`
/// 2 A[c, k] sum_g dSigma_pred[g, c] v_prev[g, k]), each prior row loaded once for the tile.
template <class P, bool variances = true>
struct dense_transition_gradient_op {
  const P* weights;
  index_t groups, prior_groups, channels, in_channels;
  const P *dmean_pred, *dvar_pred, *prior_mean, *prior_var;  // *var unread without variances
  P* dweights;
  bool accumulate;

  static constexpr index_t NR = dense_tile_weight_rows;
  BKN_HOST_DEVICE index_t column_tiles() const {
    return (in_channels + dense_block - 1) / dense_block;
  }
  BKN_HOST_DEVICE index_t tiles() const { return (channels + NR - 1) / NR * column_tiles(); }
  BKN_HOST_DEVICE index_t work_per_item() const { return 2 * NR * dense_block * groups; }
  BKN_HOST_DEVICE void operator()(index_t t) const {
    const index_t c0 = t / column_tiles() * NR, k0 = t % column_tiles() * dense_block;
    const index_t last = c0 + NR < channels ? c0 + NR : channels;
    if (in_channels - k0 < dense_block) {
      for (index_t c = c0; c < last; ++c) edge(c, k0, in_channels - k0);
    } else if (last - c0 == NR) {
      tile<NR>(c0, k0);
    } else {
      for (index_t c = c0; c < last; ++c) tile<1>(c, k0);
    }
  }

  // Rows [c0, c0 + N), columns [k0, k0 + dense_block).
  template <index_t N>
  BKN_HOST_DEVICE void tile(index_t c0, index_t k0) const {
    lanes s[N][2], sv[N][2];
    for (index_t r = 0; r < N; ++r) s[r][0] = s[r][1] = sv[r][0] = sv[r][1] = splat(0);
    for (index_t g = 0; g < groups; ++g) {
      const index_t base = (prior_groups == 1 ? 0 : g) * in_channels + k0;
      const lanes pm[2] = {load_lanes(prior_mean + base),
                           load_lanes(prior_mean + base + lane_count)};
      lanes pv[2] = {};
      if constexpr (variances) {
        pv[0] = load_lanes(prior_var + base);
        pv[1] = load_lanes(prior_var + base + lane_count);
      }
      for (index_t r = 0; r < N; ++r) {
        const lanes d = splat(double(dmean_pred[g * channels + c0 + r]));
        s[r][0] += d * pm[0];
        s[r][1] += d * pm[1];
        if constexpr (variances) {
          const lanes e = splat(double(dvar_pred[g * channels + c0 + r]));
          sv[r][0] += e * pv[0];
          sv[r][1] += e * pv[1];
        }
      }
    }
    // In lanes as well: with one group (a batch in one statistics group) these stores are
    // most of the tile's work. The members in locals, the halves by name and the rows
    // unrolled: through stores that may alias them, or indexed in a loop, GCC kept them (and
    // every partial sum) in memory.
    P* const dw = dweights;
    const P* const w = weights;
    const index_t stride = in_channels;
    const bool add = accumulate;
    BKN_UNROLL_LANES
    for (index_t r = 0; r < N; ++r) {
      const index_t e = (c0 + r) * stride + k0;
      store_gradient(dw + e, w + e, s[r][0], sv[r][0], add);
      store_gradient(dw + e + lane_count, w + e + lane_count, s[r][1], sv[r][1], add);
    }
  }

  // dA's lanes at `out`: the sums with the mean's gradient, plus 2 A times those with the
  // variance's, plus what `out` held when `add`.
  BKN_HOST_DEVICE static void store_gradient(P* out, const P* a, const lanes& mean_sums,
                                             const lanes& variance_sums, bool add) {
    lanes total = mean_sums;
    if constexpr (variances) total += splat(2) * load_lanes(a) * variance_sums;
    if (add) {
      lanes sum = load_lanes(out);
      sum += total;
      total = sum;
    }
    store_lanes(out, total);
  }

  // Columns [k0, k0 + n), n < dense_block, of row c.
  BKN_HOST_DEVICE void edge(index_t c, index_t k0, index_t n) const {
    for (index_t l = 0; l < n; ++l) {
      const index_t e = c * in_channels + k0 + l;
      double s = 0, sv = 0;
      for (index_t g = 0; g < groups; ++g) {
        const index_t base = (prior_groups == 1 ? 0 : g) * in_channels + k0 + l;
        s += double(dmean_pred[g * channels + c]) * double(prior_mean[base]);
        if constexpr (variances)
          sv += double(dvar_pred[g * channels + c]) * double(prior_var[base]);
      }
      if constexpr (variances) s += 2 * double(weights[e]) * sv;
      dweights[e] = P((accumulate ? double(dweights[e]) : 0.0) + s);
    }
  }
};

/// Full mode, identity and diagonal A: d(prior cov)[g', i, j] = a_i a_j dSigma_pred[g, i, j].
template <class P>
struct transition_cov_backward_op {
  const P* weights;  // null: identity
  index_t groups, prior_groups, channels;
  const P* dcov_pred;
  P* dprior_cov;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels;
    const index_t gp = e / (C * C), i = (e / C) % C, j = e % C;
    const index_t first = prior_groups == 1 ? 0 : gp, last = prior_groups == 1 ? groups : gp + 1;
    double s = 0;
    for (index_t g = first; g < last; ++g) s += double(dcov_pred[(g * C + i) * C + j]);
    if (weights) s *= double(weights[i]) * double(weights[j]);
    dprior_cov[e] = P(s);
  }
};

/// Full mode, diagonal A: adds sum_g sum_j D[k,j] a_j Sp[k,j] + D[j,k] a_j Sp[j,k] to da_k.
template <class P>
struct diagonal_transition_cov_gradient_op {
  const P* weights;
  index_t groups, prior_groups, channels;
  const P *dcov_pred, *prior_cov;
  P* dweights;

  BKN_HOST_DEVICE void operator()(index_t k) const {
    const index_t C = channels;
    double s = 0;
    for (index_t g = 0; g < groups; ++g) {
      const P* D = dcov_pred + g * C * C;
      const P* Sp = prior_cov + (prior_groups == 1 ? 0 : g) * C * C;
      for (index_t j = 0; j < C; ++j)
        s += double(weights[j]) * (double(D[k * C + j]) * double(Sp[k * C + j]) +
                                   double(D[j * C + k]) * double(Sp[j * C + k]));
    }
    dweights[k] = P(double(dweights[k]) + s);
  }
};

/// Weights transition, per (g, k, c): the gradients of border class k's mean and variance,
/// from mu_pred = sum_k w_k mean_k and v_pred = sum_k w_k (var_k + (mean_k - mu_pred)^2) + r,
/// with mean_k = b_c + the tap means k sees.
template <class P>
struct class_gradient_op {
  border_classes classes;
  const P *tap_mean, *bias, *pred_mean, *dmean_pred, *dvar_pred;
  index_t prior_groups, channels, kernel_width, kernel_taps;
  P *class_dmean, *class_dvar;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t K = classes.count(), C = channels;
    const index_t g = e / (K * C), k = (e / C) % K, c = e % C, i = g * C + c;
    const index_t first = (prior_groups == 1 ? c : i) * kernel_taps;
    const double wk = classes.weight(k);
    const double mk = (bias ? double(bias[c]) : 0.0) +
                      class_tap_sum(classes, k, kernel_width, tap_mean + first);
    const double dv = double(dvar_pred[i]);
    class_dmean[e] = P(wk * (double(dmean_pred[i]) + 2 * dv * (mk - double(pred_mean[i]))));
    class_dvar[e] = P(wk * dv);
  }
};

/// Weights transition, per (prior group g', channel c, tap (u, v)): the gradients of the tap
/// moments, the class gradients summed over the classes that see the tap and over the groups
/// that share the prior.
template <class P>
struct tap_gradient_op {
  border_classes classes;
  const P *class_dmean, *class_dvar;
  index_t groups, prior_groups, channels, kernel_width, kernel_taps;
  P *tap_dmean, *tap_dvar;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels, K = classes.count();
    const index_t t = e % kernel_taps, c = (e / kernel_taps) % C, gp = e / (kernel_taps * C);
    const index_t u = t / kernel_width, v = t % kernel_width;
    const index_t first = prior_groups == 1 ? 0 : gp, last = prior_groups == 1 ? groups : gp + 1;
    double dm = 0, dv = 0;
    for (index_t g = first; g < last; ++g)
      for (index_t k = 0; k < K; ++k) {
        if (!classes.covers(k, u, v)) continue;
        const index_t d = (g * K + k) * C + c;
        dm += double(class_dmean[d]);
        dv += double(class_dvar[d]);
      }
    tap_dmean[e] = P(dm);
    tap_dvar[e] = P(dv);
  }
};

/// The gradients of the prior's mean and variance from those of the activation's moments
/// (de = dl/dE[f], dvar = dl/dVar[f]) at a prior (mean, var).
template <class P>
BKN_HOST_DEVICE inline void through_activation(activation act, moment_function custom, P mean,
                                               P var, double de, double dvar, P& dmean,
                                               P& dvar_prior) {
  const auto m = activation_of<P>(act, custom, double(mean), double(var));
  dmean = P(de * m.de_dmu + dvar * m.dvar_dmu);
  dvar_prior = P(de * m.de_dv + dvar * m.dvar_dv);
}

/// Weights transition, per (prior group g', channel c'): the gradients of the activation's
/// mean and variance, sum over (c, t) of tap_dmean W[c, c', t] and tap_dvar W[c, c', t]^2, then
/// through the activation to the prior.
template <class P>
struct weights_input_gradient_op {
  activation act;
  moment_function custom;
  const P *weights, *prior_mean, *prior_var, *tap_dmean, *tap_dvar;
  index_t prior_groups, channels, in_channels, kernel_taps;
  P *dprior_mean, *dprior_var;

  BKN_HOST_DEVICE index_t work_per_item() const { return 2 * channels * kernel_taps; }
  // Items input-channel-major: consecutive items read neighbouring runs of T values in each
  // row of W, which stay in cache from one item to the next. The products of tap_block taps at
  // a time go to one vector of partial sums, those of the last T mod tap_block taps to one
  // more sum; all are added up at the end.
  BKN_HOST_DEVICE void operator()(index_t item) const {
    const index_t T = kernel_taps, C = channels;
    const index_t j = item / prior_groups, gp = item % prior_groups;
    lanes de = splat(0), dvar = splat(0);
    double de_tail = 0, dvar_tail = 0;
    for (index_t c = 0; c < C; ++c) {
      const P* dm = tap_dmean + (gp * C + c) * T;
      const P* dv = tap_dvar + (gp * C + c) * T;
      const P* w = weights + (c * in_channels + j) * T;
      index_t t = 0;
      for (; t + tap_block <= T; t += tap_block) {
        const lanes x = load_lanes(w + t);
        de += load_lanes(dm + t) * x;
        dvar += load_lanes(dv + t) * x * x;
      }
      for (; t < T; ++t) {
        const double x = double(w[t]);
        de_tail += double(dm[t]) * x;
        dvar_tail += double(dv[t]) * x * x;
      }
    }
    const index_t e = gp * in_channels + j;
    through_activation(act, custom, prior_mean[e], prior_var[e], lane_sum(de) + de_tail,
                       lane_sum(dvar) + dvar_tail, dprior_mean[e], dprior_var[e]);
  }
};

/// Weights transition through a pointwise layer, per (prior group g', channel c'): the
/// gradients of the activation's mean and variance (in dprior, from the dense transition's
/// backward), carried in place through the activation to the prior.
template <class P>
struct activation_backward_op {
  activation act;
  moment_function custom;
  const P *prior_mean, *prior_var;
  P *dprior_mean, *dprior_var;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    through_activation(act, custom, prior_mean[e], prior_var[e], double(dprior_mean[e]),
                       double(dprior_var[e]), dprior_mean[e], dprior_var[e]);
  }
};

/// Weights transition, per weight W[c, c', t]: adds sum over the prior groups of
/// tap_dmean E[f_c'] + 2 W tap_dvar Var[f_c'] to the host's weight gradient. Items are runs of
/// weight_run input channels of a row of W (output channel c), in memory order; each pair
/// (c, c') tap_block taps at a time.
template <class P>
struct weights_gradient_op {
  const P *weights, *act_mean, *act_var, *tap_dmean, *tap_dvar;
  index_t prior_groups, channels, in_channels, kernel_taps;
  P* dweights;

  // Input channels per item: enough items for a device's threads, few enough that a CPU's
  // division per item costs nothing.
  static constexpr index_t weight_run = 16;

  BKN_HOST_DEVICE index_t runs() const {
    return channels * ((in_channels + weight_run - 1) / weight_run);
  }
  BKN_HOST_DEVICE index_t work_per_item() const {
    return 2 * weight_run * kernel_taps * prior_groups;
  }
  BKN_HOST_DEVICE void operator()(index_t item) const {
    const index_t T = kernel_taps, C = channels, Cin = in_channels;
    const index_t per_row = (Cin + weight_run - 1) / weight_run;
    const index_t c = item / per_row, j0 = item % per_row * weight_run;
    const index_t j1 = j0 + weight_run < Cin ? j0 + weight_run : Cin;
    if (prior_groups == 1) return one_prior(c, j0, j1);
    for (index_t j = j0; j < j1; ++j) {
      const index_t e = (c * Cin + j) * T;
      index_t t = 0;
      for (; t + tap_block <= T; t += tap_block) {
        lanes s = splat(0);
        for (index_t gp = 0; gp < prior_groups; ++gp) {
          const index_t d = (gp * C + c) * T + t, a = gp * Cin + j;
          s += load_lanes(tap_dmean + d) * splat(double(act_mean[a]));
          s += load_lanes(weights + e + t) * load_lanes(tap_dvar + d) *
               splat(2 * double(act_var[a]));
        }
        lanes sum = load_lanes(dweights + e + t);
        sum += s;
        store_lanes(dweights + e + t, sum);
      }
      for (; t < T; ++t) {
        double s = 0;
        for (index_t gp = 0; gp < prior_groups; ++gp) {
          const index_t d = (gp * C + c) * T + t, a = gp * Cin + j;
          s += double(tap_dmean[d]) * double(act_mean[a]) +
               double(weights[e + t]) * double(tap_dvar[d]) * (2 * double(act_var[a]));
        }
        dweights[e + t] = P(double(dweights[e + t]) + s);
      }
    }
  }
  // One prior group (a shared prior, or one statistics group): the same sums of one term,
  // without the loop over prior groups that costs more than the term at the row's last taps.
  BKN_HOST_DEVICE void one_prior(index_t c, index_t j0, index_t j1) const {
    const index_t T = kernel_taps, Cin = in_channels;
    const P* dm = tap_dmean + c * T;
    const P* dv = tap_dvar + c * T;
    for (index_t j = j0; j < j1; ++j) {
      const double m = double(act_mean[j]), v = 2 * double(act_var[j]);
      const index_t e = (c * Cin + j) * T;
      index_t t = 0;
      for (; t + tap_block <= T; t += tap_block) {
        lanes s = load_lanes(dm + t) * splat(m);
        s += load_lanes(weights + e + t) * load_lanes(dv + t) * splat(v);
        lanes sum = load_lanes(dweights + e + t);
        sum += s;
        store_lanes(dweights + e + t, sum);
      }
      for (; t < T; ++t)
        dweights[e + t] = P(double(dweights[e + t]) +
                            (double(dm[t]) * m + double(weights[e + t]) * double(dv[t]) * v));
    }
  }
};

/// Adds sum over groups and classes of dmean_k to the host's bias gradient, per channel.
template <class P>
struct bias_gradient_op {
  index_t groups, classes, channels;
  const P* class_dmean;  // [(g * classes + k) * C + c]
  P* dbias;
  BKN_HOST_DEVICE void operator()(index_t c) const {
    double s = 0;
    for (index_t i = 0; i < groups * classes; ++i) s += double(class_dmean[i * channels + c]);
    dbias[c] = P(double(dbias[c]) + s);
  }
};

/// The backward of a transition through the host's weights (diagonal mode).
template <class Backend, class P>
void weights_transition_backward(const Backend& backend, const transition<P>& A, index_t groups,
                                 index_t channels, gaussian_view<const P> prior,
                                 const layer_workspace<P>& w, gaussian_view<const P> predicted,
                                 gaussian_view<P> dprior, span<P> dweights, span<P> dbias) {
  using K = kernels<Backend>;
  const index_t G = groups, C = channels, PG = prior.groups, Cin = prior.channels;
  const border_classes classes = make_border_classes(A.conv);
  const index_t KC = classes.count();
  const P* bias = A.bias.empty() ? nullptr : A.bias.data();
  // The workspace may have served other layers since forward: recompute what it held.
  K::for_each(backend, PG * Cin,
              activation_op<P>{A.act, A.moments, prior.mean.data(), prior.cov.data(),
                               w.act_mean.data(), w.act_var.data()});
  if (is_pointwise(A.conv)) {
    // One border class of weight 1: the dense transition's backward on the activation's
    // moments, with A = W (its class gradients are dmu_pred and dSigma_pred themselves).
    const P* dmean_pred = w.dmean_predicted.data();
    const P* dvar_pred = w.dcov_predicted.data();
    if (!dweights.empty()) {
      const dense_transition_gradient_op<P> op{A.weights.data(), G,
                                               PG,               C,
                                               Cin,              dmean_pred,
                                               dvar_pred,        w.act_mean.data(),
                                               w.act_var.data(), dweights.data(),
                                               true};
      K::for_each(backend, op.tiles(), op);
    }
    if (!dbias.empty())
      K::for_each(backend, C, bias_gradient_op<P>{G, 1, C, dmean_pred, dbias.data()});
    if (!dprior.empty()) {
      const dense_transition_backward_op<P> op{A.weights.data(), G,   PG,
                                               C,                Cin, dmean_pred,
                                               dvar_pred,        dprior.mean.data(),
                                               dprior.cov.data()};
      K::for_each(backend, op.tiles(), op);
      K::for_each(backend, PG * Cin,
                  activation_backward_op<P>{A.act, A.moments, prior.mean.data(),
                                            prior.cov.data(), dprior.mean.data(),
                                            dprior.cov.data()});
    }
    return;
  }
  // The tap moments (for the classes' means), the classes' gradients, then the taps'.
  const index_t T = A.conv.taps(), kw = A.conv.kernel_width;
  K::for_each(backend, C * PG,
              tap_moments_op<P>{A.weights.data(), w.act_mean.data(), w.act_var.data(), PG, C, Cin,
                                T, w.tap_mean.data(), w.tap_var.data()});
  K::for_each(backend, G * KC * C,
              class_gradient_op<P>{classes, w.tap_mean.data(), bias, predicted.mean.data(),
                                   w.dmean_predicted.data(), w.dcov_predicted.data(), PG, C, kw,
                                   T, w.class_dmean.data(), w.class_dvar.data()});
  K::for_each(backend, PG * C * T,
              tap_gradient_op<P>{classes, w.class_dmean.data(), w.class_dvar.data(), G, PG, C,
                                 kw, T, w.tap_dmean.data(), w.tap_dvar.data()});
  if (!dprior.empty()) {
    K::for_each(backend, Cin * PG,
                weights_input_gradient_op<P>{A.act, A.moments, A.weights.data(),
                                             prior.mean.data(), prior.cov.data(),
                                             w.tap_dmean.data(), w.tap_dvar.data(), PG, C, Cin,
                                             T, dprior.mean.data(), dprior.cov.data()});
  }
  if (!dweights.empty()) {
    const weights_gradient_op<P> op{A.weights.data(), w.act_mean.data(), w.act_var.data(),
                                    w.tap_dmean.data(), w.tap_dvar.data(), PG, C, Cin, T,
                                    dweights.data()};
    K::for_each(backend, op.runs(), op);
  }
  if (!dbias.empty())
    K::for_each(backend, C, bias_gradient_op<P>{G, KC, C, w.class_dmean.data(), dbias.data()});
}

/// The transition's backward: d(prior) and dA from dmu_pred and dSigma_pred (math.md).
template <class Backend, class P>
void transition_backward(const Backend& backend, covariance mode, const transition<P>& A,
                         index_t groups, index_t channels, gaussian_view<const P> prior,
                         const layer_workspace<P>& w, gaussian_view<const P> predicted,
                         gaussian_view<P> dprior, span<P> dweights, span<P> dbias) {
  using K = kernels<Backend>;
  const bool full = mode == covariance::full;
  if (A.kind == transition_kind::weights && !full) {
    weights_transition_backward(backend, A, groups, channels, prior, w, predicted, dprior,
                                dweights, dbias);
    return;
  }
  // A linear layer without activation in full mode is a dense A (its gradient accumulates
  // into the host's) plus a bias.
  const bool host_weights = A.kind == transition_kind::weights;
  const transition_kind kind = host_weights ? transition_kind::dense : A.kind;
  const index_t G = groups, C = channels, PG = prior.groups, Cin = prior.channels;
  const P* dvar_pred = full ? nullptr : w.dcov_predicted.data();
  if (host_weights && !dbias.empty())
    K::for_each(backend, C, bias_gradient_op<P>{G, 1, C, w.dmean_predicted.data(), dbias.data()});
  if (!dweights.empty() && kind == transition_kind::dense) {
    const auto gradient = [&](auto op) {
      op = {A.weights.data(), G, PG, C, Cin, w.dmean_predicted.data(), dvar_pred,
            prior.mean.data(), full ? nullptr : prior.cov.data(), dweights.data(), host_weights};
      K::for_each(backend, op.tiles(), op);
    };
    if (full)
      gradient(dense_transition_gradient_op<P, false>());
    else
      gradient(dense_transition_gradient_op<P>());
  }
  if (!dweights.empty() && kind != transition_kind::identity) {
    if (kind == transition_kind::diagonal) {
      const auto gradient = [&](auto op) {
        op = {A.weights.data(), G, PG, C, w.dmean_predicted.data(), dvar_pred,
              prior.mean.data(), full ? nullptr : prior.cov.data(), dweights.data()};
        K::for_each(backend, C, op);
      };
      if (full)
        gradient(diagonal_transition_gradient_op<P, false>());
      else
        gradient(diagonal_transition_gradient_op<P>());
    }
    if (full && kind == transition_kind::diagonal)
      K::for_each(backend, C,
                  diagonal_transition_cov_gradient_op<P>{A.weights.data(), G, PG, C,
                                                         w.dcov_predicted.data(),
                                                         prior.cov.data(), dweights.data()});
    if (full && kind == transition_kind::dense) {
      // dA += sum_g D_g (A Sp_g^T) + D_g^T (A Sp_g), every entry of D and Sp independent.
      const index_t ps = PG == 1 ? 0 : C * Cin;
      K::for_each(backend, PG * C * Cin,
                  batched_product<P>{{A.weights.data(), 0, Cin, false},
                                     {prior.cov.data(), Cin * Cin, Cin, true},
                                     w.product.data(), PG, PG, C, Cin, Cin, false});
      K::for_each(backend, PG * C * Cin,
                  batched_product<P>{{A.weights.data(), 0, Cin, false},
                                     {prior.cov.data(), Cin * Cin, Cin, false},
                                     w.product2.data(), PG, PG, C, Cin, Cin, false});
      K::for_each(backend, C * Cin,
                  batched_product<P>{{w.dcov_predicted.data(), C * C, C, false},
                                     {w.product.data(), ps, Cin, false},
                                     dweights.data(), G, 1, C, Cin, C, true});
      K::for_each(backend, C * Cin,
                  batched_product<P>{{w.dcov_predicted.data(), C * C, C, true},
                                     {w.product2.data(), ps, Cin, false},
                                     dweights.data(), G, 1, C, Cin, C, true});
    }
  }
  if (dprior.empty()) return;
  if (kind == transition_kind::dense) {
    const auto reduce = [&](auto op) {
      op = {A.weights.data(), G, PG, C, Cin, w.dmean_predicted.data(), dvar_pred,
            dprior.mean.data(), full ? nullptr : dprior.cov.data()};
      K::for_each(backend, op.tiles(), op);
    };
    if (full)
      reduce(dense_transition_backward_op<P, false>());
    else
      reduce(dense_transition_backward_op<P>());
  } else if (w.dmean_predicted.data() != dprior.mean.data()) {
    // Identity or diagonal: per (group, channel), or summed over the groups for a shared prior.
    // (Where backward pointed the workspace's predicted gradients at dprior, it is written.)
    const auto per_channel = [&](auto scaled, auto variances) {
      constexpr bool s = decltype(scaled)::value, v = decltype(variances)::value;
      if (PG == 1)
        K::for_each(backend, C,
                    shared_transition_backward_op<P, s, v>{A.weights.data(), G, C,
                                                           w.dmean_predicted.data(), dvar_pred,
                                                           dprior.mean.data(), dprior.cov.data()});
      else
        K::for_each(backend, G * C,
                    channel_transition_backward_op<P, s, v>{
                        A.weights.data(), C, w.dmean_predicted.data(), dvar_pred,
                        dprior.mean.data(), dprior.cov.data()});
    };
    const auto with = [&](auto scaled) {
      if (full)
        per_channel(scaled, std::false_type());
      else
        per_channel(scaled, std::true_type());
    };
    if (kind == transition_kind::diagonal)
      with(std::true_type());
    else
      with(std::false_type());
  }
  if (!full) return;
  if (kind != transition_kind::dense) {
    K::for_each(backend, PG * Cin * Cin,
                transition_cov_backward_op<P>{
                    kind == transition_kind::diagonal ? A.weights.data() : nullptr, G, PG, C,
                    w.dcov_predicted.data(), dprior.cov.data()});
    return;
  }
  // d(prior cov) = A^T D A: product = D A (per group), then A^T product (summed when shared).
  K::for_each(backend, G * C * Cin,
              batched_product<P>{{w.dcov_predicted.data(), C * C, C, false},
                                 {A.weights.data(), 0, Cin, false},
                                 w.product.data(), G, G, C, Cin, C, false});
  K::for_each(backend, PG * Cin * Cin,
              batched_product<P>{{A.weights.data(), 0, Cin, true},
                                 {w.product.data(), C * Cin, Cin, false},
                                 dprior.cov.data(), G, PG, Cin, Cin, C, false});
}

/// backward's steps for one chunk of groups (every view and array of those groups alone): the
/// gains, the reductions, the coefficients of dx and the gradients of Eq. 5's inputs, and dx.
template <class Backend, class T, class P>
void backward_groups(const Backend& backend, const options& opt, const parameters<P>& p,
                     bool has_prior, tensor_view<const T> x, tensor_view<const T> dy,
                     tensor_view<T> dx, index_t group_size, gaussian_view<const P> observed,
                     gaussian_view<const P> predicted, gaussian_view<const P> posterior,
                     gaussian_view<const P> dposterior, const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = x.channels(), G = observed.groups;
  const bool full = opt.mode == covariance::full;
  const P* gamma = p.gamma.empty() ? nullptr : p.gamma.data();
  const double count = double(group_size * x.spatial());
  if (has_prior)
    compute_gains(backend, opt, p.gain_logit, predicted, observed, w);
  else if (full)  // q = 1, as an array rather than a null pointer (see forward)
    K::for_each(backend, G * C, fill_op<P>{w.gain.data(), P(1)});
  const P* gain = w.gain.data();
  K::sums(backend, dy, x, posterior.mean, group_size, w.sum_dy, w.sum_dy_centred, w.scratch);
  const P* dpost_mean = dposterior.empty() ? nullptr : dposterior.mean.data();
  const P* dpost_cov = dposterior.empty() ? nullptr : dposterior.cov.data();

  if (!full) {
    const auto coefficients = [&](auto op) {
      op = {count, opt.epsilon, gain, gamma, C, observed.mean.data(), observed.cov.data(),
            predicted.mean.data(), predicted.cov.data(), posterior.mean.data(),
            posterior.cov.data(), w.sum_dy.data(), dpost_mean, dpost_cov,
            w.sum_dy_centred.data(), w.a.data(), w.b.data(), w.k.data(), w.dq.data(),
            w.dmean_predicted.data(), w.dcov_predicted.data()};
      K::for_each(backend, G * C, op);
    };
    if (has_prior)
      coefficients(diag_backward_op<P>());
    else
      coefficients(diag_backward_op<P, true>());
    // dx = b (x - mu) + a dy + k: the centred term first, in the element type.
    K::affine(backend, dx, x, span<const P>(w.b), posterior.mean, dy, span<const P>(w.a),
              span<const P>(w.k), group_size);
    return;
  }
  K::for_each(backend, G * C * C,
              full_gradient_matrix_op<P>{opt.epsilon, gamma, posterior.cov.data(),
                                         w.sum_dy_centred.data(), dpost_cov, C, w.matrix.data()});
  K::for_each(backend, G * C,
              full_backward_vector_op<P>{
                  count, opt.epsilon, gain, gamma, C, w.matrix.data(), observed.mean.data(),
                  observed.cov.data(), predicted.mean.data(), predicted.cov.data(),
                  posterior.mean.data(), posterior.cov.data(), w.sum_dy.data(), dpost_mean,
                  w.a.data(), w.k.data(), w.dmean.data(), w.dq.data(), w.dmean_predicted.data()});
  K::for_each(backend, G * C * C,
              full_mix_matrix_op<P>{count, gain, C, w.matrix.data(), w.product2.data(),
                                    w.dcov_predicted.data()});
  K::mix(backend, dx, dy, span<const P>(w.a), x, span<const P>(w.product2.subspan(0, G * C * C)),
         posterior.mean, span<const P>(w.k), group_size);
  K::for_each(backend, G * C,
              dgamma_parts_op<P, true>{opt.epsilon, C, posterior.cov.data(),
                                       w.sum_dy_centred.data()});
}

}  // namespace detail

/// One layer's backward pass: the complete gradient of docs/math.md.
///
/// Reads x (the forward's input), dy, the layer's state written by forward (same options), and
/// L.state.dposterior, the gradient w.r.t. this layer's posterior written by the next layer's
/// backward (empty on the last layer: zero). Writes dx, every non-empty span of L.grads
/// (overwritten, not accumulated), and `dprior`, the gradient w.r.t. `prior` (the previous
/// layer's posterior: pass its state.dposterior; empty: not wanted). A prior shared by every
/// group receives the sum over the groups.
///
/// dx may be the same view as dy, never x. Same workspace as forward. Throws
/// bkn::invalid_argument before writing anything on an invalid argument.
template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              gaussian_view<const detail::nondeduced<P>> prior,
              gaussian_view<detail::nondeduced<P>> dprior, span<std::byte> workspace) {
  constexpr const char* routine = "bkn::backward";
  detail::check_options(routine, opt);
  detail::check_view(routine, "x", x, false);
  detail::check_view(routine, "dy", dy, false);
  detail::check_view(routine, "dx", dx, true);
  detail::check_shape(routine, "dy", dy, x.shape());
  detail::check_shape(routine, "dx", dx, x.shape());
  detail::check_no_overlap(routine, "dx", dx, "x", x, false);
  detail::check_no_overlap(routine, "dx", dx, "dy", dy, true);
  if (x.batch() == 0) return;
  const index_t group_size = detail::resolve_group_size(routine, opt, x.batch());
  detail::check_layer_call(routine, opt, L, x, prior, group_size);
  const index_t C = x.channels(), G = x.batch() / group_size;
  const bool full = opt.mode == covariance::full;
  const bool batch_stats = detail::uses_batch_statistics(opt);
  const bool has_prior = batch_stats && !prior.empty();
  const parameters<P>& p = L.params;
  const gradients<P>& d = L.grads;
  const layer_state<P>& s = L.state;
  detail::check_optional(routine, "grads.gamma", d.gamma.size(), C, "one per channel");
  detail::check_optional(routine, "grads.beta", d.beta.size(), C, "one per channel");
  // Gradients that are zero (no prior, or constant moving averages) are still written.
  detail::check_optional(routine, "grads.gain_logit", d.gain_logit.size(), p.gain_logit.size(),
                         "as params.gain_logit");
  detail::check_optional(routine, "grads.noise", d.noise.size(), p.noise.size(),
                         "as params.noise");
  const bool host_weights = p.transition.kind == transition_kind::weights;
  if (!d.transition.empty() || !d.transition_bias.empty())
    detail::check_transition(routine, p.transition, C, x.shape().height, x.shape().width);
  detail::check_optional(routine, "grads.transition", d.transition.size(),
                         p.transition.weight_count(C), "as params.transition");
  if (host_weights)
    detail::check_optional(routine, "grads.transition_bias", d.transition_bias.size(), C,
                           "one per channel");
  else
    detail::require(d.transition_bias.empty(), routine, "grads.transition_bias",
                    "only a weights transition has a bias; expected none, got ",
                    d.transition_bias.size());
  if (!prior.empty() && !dprior.empty())
    detail::check_gaussian(routine, "dprior", dprior, prior.groups, prior.channels, opt.mode);
  if (batch_stats && !s.dposterior.empty())
    detail::check_gaussian(routine, "state.dposterior", s.dposterior, G, C, opt.mode);
  const transition<P> A = prior.empty() ? transition<P>() : p.transition;
  auto w = detail::carve_checked<Backend, P>(routine, backend, opt, x.shape(), group_size, A,
                                             workspace);
  // Through an identity A with one prior per group, d(prior) is the predicted state's gradient
  // itself: the coefficients write it there rather than into the workspace for a copy.
  if (has_prior && !full && A.kind == transition_kind::identity && prior.groups == G &&
      !dprior.empty()) {
    w.dmean_predicted = dprior.mean;
    w.dcov_predicted = dprior.cov;
  }
  if (opt.check_finite) {
    detail::check_finite(routine, "x", x);
    detail::check_finite(routine, "dy", dy);
  }

  using K = kernels<Backend>;
  const P* gamma = p.gamma.empty() ? nullptr : p.gamma.data();
  auto or_null = [](span<P> v) { return v.empty() ? nullptr : v.data(); };
  if (!has_prior) {
    const auto zero = [&](span<P> v) {
      if (!v.empty()) K::for_each(backend, v.size(), detail::fill_op<P>{v.data(), P(0)});
    };
    zero(d.gain_logit);
    zero(d.noise);
    // A host layer's weight and bias gradients accumulate: adding zero leaves them.
    if (!host_weights) zero(d.transition);
    if (!prior.empty()) {
      zero(dprior.mean);
      zero(dprior.cov);
    }
  }

  if (!batch_stats) {
    // The moving averages are constants: dx = gamma / sigma dy, and no gradient reaches the
    // gain, the transition or the prior.
    const running_statistics<P>& r = L.running;
    K::sums(backend, dy, x, span<const P>(r.mean), x.batch(), w.sum_dy, w.sum_dy_centred,
            w.scratch);
    K::for_each(backend, C,
                detail::normalize_coefficients_op<P>{gamma, nullptr, r.mean.data(), r.var.data(),
                                                     C, 1, opt.epsilon, w.a.data(), w.k.data()});
    K::for_each(backend, C, detail::fill_op<P>{w.k.data(), P(0)});
    K::affine(backend, dx, dy, span<const P>(w.a), span<const P>(w.k), tensor_view<const T>(),
              span<const P>(), span<const P>(w.k), x.batch());
    P* sink = w.sink.data();
    K::for_each(backend, C,
                detail::dgamma_parts_op<P>{opt.epsilon, C, r.var.data(), w.sum_dy_centred.data()});
    K::for_each(backend, C,
                detail::parameter_gradients_op<P>{1, C, w.sum_dy_centred.data(), w.sum_dy.data(),
                                                  nullptr, nullptr, nullptr,
                                                  d.gamma.empty() ? sink : d.gamma.data(),
                                                  d.beta.empty() ? sink : d.beta.data(), sink,
                                                  sink});
    return;
  }

  // Without a prior q = 1: the predicted state is irrelevant; pass the observed one.
  const gaussian_view<const P> predicted = has_prior ? gaussian_view<const P>(s.predicted)
                                                     : gaussian_view<const P>(s.observed);
  const bool per_channel_gain =
      has_prior && p.gain_logit.size() == C && !d.gain_logit.empty() && !full && C > 1;
  const bool scalar_gain = has_prior && !d.gain_logit.empty() && !per_channel_gain;
  P* dnoise = has_prior ? or_null(d.noise) : nullptr;
  // A per-layer gain's gradient is summed per channel first, into w.a (the last chunk's dx pass
  // has run when the sums finish).
  P* dgain = per_channel_gain ? d.gain_logit.data() : scalar_gain ? w.a.data() : nullptr;

  // The reductions, the coefficients, dx and the parameter gradients' sums, a chunk of groups at
  // a time when the backend asks for it (see forward).
  const index_t chunk =
      detail::groups_per_chunk(backend, opt, A, x.shape(), group_size, sizeof(T));
  for (index_t g0 = 0; g0 < G; g0 += chunk) {
    const index_t n = std::min(chunk, G - g0);
    const auto part = [&](auto view) { return detail::groups_of(view, g0, n, G, opt.mode); };
    const detail::layer_workspace<P> wp = detail::groups_of(w, g0, n, G, C);
    detail::backward_groups(backend, opt, p, has_prior, detail::groups_of(x, g0, n, group_size),
                            detail::groups_of(dy, g0, n, group_size),
                            detail::groups_of(dx, g0, n, group_size), group_size,
                            part(gaussian_view<const P>(s.observed)), part(predicted),
                            part(gaussian_view<const P>(s.posterior)),
                            part(gaussian_view<const P>(s.dposterior)), wp);
    const auto gradients = [&](auto op) {
      P* sink = w.sink.data();
      op = {G, C, wp.sum_dy_centred.data(), wp.sum_dy.data(), wp.dq.data(),
            wp.gain_slope.data(), wp.dcov_predicted.data(),
            d.gamma.empty() ? sink : d.gamma.data(), d.beta.empty() ? sink : d.beta.data(),
            dgain ? dgain : sink, dnoise ? dnoise : sink};
      detail::sum_chunk(backend, C, op, w.carry, g0, n, G);
    };
    if (full && has_prior)
      gradients(detail::parameter_gradients_op<P, true, true>());
    else if (full)
      gradients(detail::parameter_gradients_op<P, true>());
    else if (has_prior)
      gradients(detail::parameter_gradients_op<P, false, true>());
    else
      gradients(detail::parameter_gradients_op<P>());
  }
  if (dnoise != nullptr)
    K::for_each(backend, C, detail::noise_gradient_op<P>{p.noise.data(), dnoise});
  if (!has_prior) return;
  if (scalar_gain)
    K::for_each(backend, 1,
                detail::scalar_gain_gradient_op<P>{w.a.data(), C, d.gain_logit.data()});
  detail::transition_backward(backend, opt.mode, p.transition, G, C, prior, w, predicted, dprior,
                              d.transition, d.transition_bias);
}

BKN_END_NAMESPACE
