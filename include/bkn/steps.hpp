// SPDX-License-Identifier: MIT
// The four forward steps of Algorithm 1 as routines over a backend: observe (batch
// statistics), predict (Eq. 3 through the transition), update (Eq. 5) and normalize.
#pragma once

#include "bkn/detail/small_matrix.hpp"
#include "bkn/layer.hpp"
#include "bkn/math/kalman.hpp"
#include "bkn/tensor.hpp"

#include <type_traits>

BKN_BEGIN_NAMESPACE
namespace detail {

// ---- functors of the per-channel math (run through kernels<Backend>::for_each) ----

template <class P>
struct copy_op {
  const P* from;
  P* to;
  BKN_HOST_DEVICE void operator()(index_t i) const { to[i] = from[i]; }
};

/// diag[g * C + c] = full[(g * C + c) * C + c].
template <class P>
struct diagonal_op {
  const P* full;
  P* diag;
  index_t channels;
  BKN_HOST_DEVICE void operator()(index_t i) const { diag[i] = full[i * channels + i % channels]; }
};

/// The predicted mean (and, in diagonal mode, variance) of (g, c): Eq. 3 through A.
template <class P>
struct predict_op {
  transition_kind kind;
  const P* weights;
  const P* noise;  // null: R = 0
  const P* prior_mean;
  const P* prior_var;  // diagonal mode; null in full mode
  index_t prior_groups, channels, in_channels;
  P* mean;
  P* var;  // null in full mode

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const index_t g = i / channels, c = i % channels;
    const index_t base = (prior_groups == 1 ? 0 : g) * in_channels;
    double m = 0, v = 0;
    if (kind == transition_kind::dense) {
      for (index_t k = 0; k < in_channels; ++k) {
        const double a = weights[c * in_channels + k];
        m += a * double(prior_mean[base + k]);
        if (var) v += a * a * double(prior_var[base + k]);
      }
    } else {
      const double a = kind == transition_kind::diagonal ? double(weights[c]) : 1.0;
      m = a * double(prior_mean[base + c]);
      if (var) v = a * a * double(prior_var[base + c]);
    }
    mean[i] = P(m);
    if (var) var[i] = P(v + (noise ? math::softplus(double(noise[c])) : 0.0));
  }
};

/// Full mode, Sigma_pred = A Sigma_prev A^T + R for the identity and diagonal transitions
/// (the dense one goes through batched_product).
template <class P>
struct predict_cov_op {
  transition_kind kind;
  const P* weights;
  const P* noise;
  const P* prior_cov;
  index_t prior_groups, channels;
  P* cov;  // already holds A Sigma_prev A^T for dense

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

template <class P>
BKN_HOST_DEVICE inline double gain_at(const P* gain_logit, index_t gain_count, index_t c) {
  return gain_logit ? math::sigmoid(double(gain_logit[gain_count == 1 ? 0 : c])) : 1.0;
}

/// Eq. 5 for (g, c): the mean, and in diagonal mode (var != null) the variance.
template <class P>
struct update_op {
  const P* gain_logit;
  index_t gain_count, channels;
  const P *pred_mean, *pred_var, *obs_mean, *obs_var;
  P *mean, *var;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const double q = gain_at(gain_logit, gain_count, i % channels);
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
  const P* gain_logit;
  index_t channels;
  const P *pred_mean, *pred_cov, *obs_mean, *obs_cov;
  P* cov;

  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels;
    const index_t g = e / (C * C), i = (e / C) % C, j = e % C;
    const double q = gain_at(gain_logit, 1, 0), p = 1 - q;
    const double di = double(obs_mean[g * C + i]) - double(pred_mean[g * C + i]);
    const double dj = double(obs_mean[g * C + j]) - double(pred_mean[g * C + j]);
    cov[e] = P(p * double(pred_cov[e]) + q * double(obs_cov[e]) + p * q * di * dj);
  }
};

/// y = a x + k with a = gamma / sqrt(var + eps), k = beta - a mu, per (g, c).
template <class P>
struct normalize_coefficients_op {
  const P *gamma, *beta, *mean, *cov;
  index_t channels, cov_stride;  // cov_stride: 1 (diagonal) or C + 1 (diagonal of C x C)
  double epsilon;
  P *a, *k;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const index_t c = i % channels;
    const index_t g = i / channels;
    const double var = double(cov[cov_stride == 1 ? i : g * channels * channels + c * cov_stride]);
    const double scale = (gamma ? double(gamma[c]) : 1.0) / sqrt(var + epsilon);
    a[i] = P(scale);
    k[i] = P((beta ? double(beta[c]) : 0.0) - scale * double(mean[i]));
  }
};

// ---- the steps, unchecked: the public routines and forward() validate first ----

template <class Backend, class T, class P>
void observe(const Backend& backend, tensor_view<const T> x, index_t group_size,
             covariance mode, gaussian_view<P> observed, const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  if (mode == covariance::diagonal) {
    K::moments(backend, x, group_size, observed.mean, observed.cov, w.scratch);
    return;
  }
  K::moments(backend, x, group_size, observed.mean, w.var, w.scratch);
  K::covariance(backend, x, group_size, span<const P>(observed.mean), observed.cov, w.scratch);
}

template <class Backend, class P>
void predict(const Backend& backend, covariance mode, const transition<P>& A,
             span<const P> noise, gaussian_view<const P> prior, gaussian_view<P> predicted,
             const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = predicted.channels, G = predicted.groups, Cin = prior.channels;
  const P* noise_data = noise.empty() ? nullptr : noise.data();
  const bool full = mode == covariance::full;
  K::for_each(backend, G * C,
              predict_op<P>{A.kind, A.weights.data(), noise_data, prior.mean.data(),
                            full ? nullptr : prior.cov.data(), prior.groups, C, Cin,
                            predicted.mean.data(), full ? nullptr : predicted.cov.data()});
  if (!full) return;
  if (A.kind == transition_kind::dense) {
    // product = A Sigma_prev (C x C' per prior group), then cov = product A^T.
    const index_t PG = prior.groups;
    K::for_each(backend, PG * C * Cin,
                batched_product<P>{{A.weights.data(), 0, Cin, false},
                                   {prior.cov.data(), Cin * Cin, Cin, false},
                                   w.product.data(), PG, PG, C, Cin, Cin, false});
    const index_t product_stride = PG == 1 ? 0 : C * Cin;
    K::for_each(backend, G * C * C,
                batched_product<P>{{w.product.data(), product_stride, Cin, false},
                                   {A.weights.data(), 0, Cin, true},
                                   predicted.cov.data(), G, G, C, C, Cin, false});
  }
  K::for_each(backend, G * C * C,
              predict_cov_op<P>{A.kind, A.weights.data(), noise_data, prior.cov.data(),
                                prior.groups, C, predicted.cov.data()});
}

template <class Backend, class P>
void update(const Backend& backend, covariance mode,
            span<const detail::nondeduced<P>> gain_logit,
            gaussian_view<const detail::nondeduced<P>> predicted,
            gaussian_view<const detail::nondeduced<P>> observed, gaussian_view<P> posterior) {
  using K = kernels<Backend>;
  const index_t C = posterior.channels, G = posterior.groups;
  if (mode == covariance::diagonal) {
    K::for_each(backend, G * C,
                update_op<P>{gain_logit.data(), gain_logit.size(), C, predicted.mean.data(),
                             predicted.cov.data(), observed.mean.data(), observed.cov.data(),
                             posterior.mean.data(), posterior.cov.data()});
    return;
  }
  K::for_each(backend, G * C,
              update_op<P>{gain_logit.data(), 1, C, predicted.mean.data(), nullptr,
                           observed.mean.data(), nullptr, posterior.mean.data(), nullptr});
  K::for_each(backend, G * C * C,
              update_cov_op<P>{gain_logit.data(), C, predicted.mean.data(), predicted.cov.data(),
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
  K::affine(backend, y, x, span<const P>(w.a), tensor_view<const T>(), span<const P>(),
            span<const P>(w.k), group_size);
}

}  // namespace detail
BKN_END_NAMESPACE

BKN_BEGIN_NAMESPACE

namespace detail {
template <class Backend, class P>
layer_workspace<P> carve_checked(const char* routine, const Backend& backend, covariance mode,
                                 const tensor_shape& shape, index_t group_size,
                                 index_t in_channels, span<std::byte> workspace) {
  options opt;
  opt.mode = mode;
  workspace_arena measure;
  carve_workspace<Backend, P>(measure, backend, opt, shape, group_size, in_channels);
  check_workspace(routine, workspace, measure.used());
  workspace_arena arena(workspace);
  return carve_workspace<Backend, P>(arena, backend, opt, shape, group_size, in_channels);
}
}  // namespace detail

/// Algorithm 1's first two lines: per statistics group of `group_size` consecutive samples,
/// the mean xbar and the biased covariance S of x's channels (variances in diagonal mode).
/// `observed` holds N / group_size groups of C channels. The layer's workspace fits.
template <class Backend, class X, class P>
void observe(const Backend& backend, covariance mode, tensor_view<X> input, index_t group_size,
             gaussian_view<P> observed, span<std::byte> workspace) {
  constexpr const char* routine = "bkn::observe";
  const tensor_view<const std::remove_const_t<X>> x = input;
  detail::check_view(routine, "x", x, false);
  detail::require(group_size > 0 && x.batch() % group_size == 0, routine, "group_size",
                  "expected a positive divisor of the batch size ", x.batch(), ", got ",
                  group_size);
  detail::check_gaussian(routine, "observed", observed, x.batch() / group_size, x.channels(),
                         mode);
  if (x.empty()) return;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, mode, x.shape(), group_size,
                                                   x.channels(), workspace);
  detail::observe(backend, x, group_size, mode, observed, w);
}

/// Eq. 3: mu_pred = A mu_prev and Sigma_pred = A Sigma_prev A^T + R (diagonal mode:
/// v_pred = (A o A) v_prev + r), R = diag(softplus(noise)) (empty noise: R = 0). `prior` has 1
/// group (shared) or as many as `predicted`. The layer's workspace fits.
template <class Backend, class P>
void predict(const Backend& backend, covariance mode, const transition<P>& A,
             span<const detail::nondeduced<P>> noise,
             gaussian_view<const detail::nondeduced<P>> prior, gaussian_view<P> predicted,
             span<std::byte> workspace) {
  constexpr const char* routine = "bkn::predict";
  const index_t C = predicted.channels, G = predicted.groups;
  detail::check_transition(routine, A, C);
  detail::check_optional(routine, "noise", noise.size(), C, "one per channel");
  detail::check_gaussian(routine, "predicted", predicted, G, C, mode);
  detail::require(prior.groups == 1 || prior.groups == G, routine, "prior", "expected 1 or ", G,
                  " groups, got ", prior.groups);
  detail::check_gaussian(routine, "prior", prior, prior.groups, A.input_channels(C), mode);
  if (G == 0) return;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, mode, {G, C, 1, 1}, 1,
                                                   A.input_channels(C), workspace);
  detail::predict(backend, mode, A, noise, prior, predicted, w);
}

/// Eq. 5: the posterior p N(predicted) + q N(observed), q = sigmoid(gain_logit) (1 element, or
/// C per-channel gains in diagonal mode).
template <class Backend, class P>
void update(const Backend& backend, covariance mode,
            span<const detail::nondeduced<P>> gain_logit,
            gaussian_view<const detail::nondeduced<P>> predicted,
            gaussian_view<const detail::nondeduced<P>> observed, gaussian_view<P> posterior) {
  constexpr const char* routine = "bkn::update";
  const index_t C = posterior.channels, G = posterior.groups;
  detail::require(gain_logit.size() == 1 ||
                      (gain_logit.size() == C && mode == covariance::diagonal),
                  routine, "gain_logit", "expected 1 or (diagonal mode) ", C,
                  " elements, got ", gain_logit.size());
  detail::check_gaussian(routine, "predicted", predicted, G, C, mode);
  detail::check_gaussian(routine, "observed", observed, G, C, mode);
  detail::check_gaussian(routine, "posterior", posterior, G, C, mode);
  detail::update(backend, mode, gain_logit, predicted, observed, posterior);
}

/// y = gamma (x - mu) / sqrt(diag Sigma + eps) + beta with the estimate of each sample's group
/// (gamma, beta empty: 1, 0). y may be the same view as x. The layer's workspace fits.
template <class Backend, class T, class E>
void normalize(const Backend& backend, covariance mode, tensor_view<const detail::nondeduced<T>> x,
               tensor_view<T> y, span<const std::remove_const_t<E>> gamma,
               span<const std::remove_const_t<E>> beta, gaussian_view<E> estimate_,
               double epsilon, span<std::byte> workspace) {
  constexpr const char* routine = "bkn::normalize";
  using P = std::remove_const_t<E>;
  const gaussian_view<const P> estimate = estimate_;
  detail::check_view(routine, "x", x, false);
  detail::check_view(routine, "y", y, true);
  detail::check_shape(routine, "y", y, x.shape());
  const index_t C = x.channels();
  detail::check_optional(routine, "gamma", gamma.size(), C, "one per channel");
  detail::check_optional(routine, "beta", beta.size(), C, "one per channel");
  detail::require(epsilon > 0, routine, "epsilon", "expected > 0, got ", epsilon);
  if (x.empty()) return;
  detail::require(estimate.groups > 0 && x.batch() % estimate.groups == 0, routine, "estimate",
                  "expected a number of groups dividing the batch size ", x.batch(), ", got ",
                  estimate.groups);
  detail::check_gaussian(routine, "estimate", estimate, estimate.groups, C, mode);
  const index_t group_size = x.batch() / estimate.groups;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, mode, x.shape(), group_size,
                                                   C, workspace);
  detail::normalize(backend, mode, x, y, gamma, beta, estimate, group_size, epsilon, w);
}

BKN_END_NAMESPACE
