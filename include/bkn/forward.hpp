// SPDX-License-Identifier: MIT
// forward: one normalized layer's forward pass (Algorithm 1: observe, predict, update,
// normalize, moving averages), and the host-side checks shared with backward.
#pragma once

#include <algorithm>
#include <cmath>

#include "bkn/steps.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

/// Where the moving averages find the gain q of (g, c): nowhere, q = 1 (no prior; `gain`
/// unread); at gain[g * C + c]; or at gain[c], one per channel, the same in every group
/// (kalman_step's).
enum class gain_source { unit, per_group, per_channel };

/// Moving averages from the posterior, per channel, averaged over the groups (a group-sum
/// functor, see steps.hpp). The variance takes the observed part with Bessel's correction when
/// asked. A non-finite estimate, or one beyond P's range, leaves the channel's moving averages
/// as they were and counts in `skipped`. `full`: the covariances are C x C matrices per group
/// (their diagonals are read). `gains` says where q is (gain_source).
template <class P, bool full = false, gain_source gains = gain_source::per_group>
struct running_update_op {
  const P *post_mean, *post_cov, *obs_cov, *gain;  // gain: null is q = 1
  index_t groups, channels;
  double momentum, bessel_excess;  // m / (m - 1) - 1, or 0
  // skipped: counts the updates skipped; never null (a sink when not counted: a branch in the
  // loop would keep it from vectorizing).
  P *mean, *var, *skipped;

  static constexpr int sums = 2;
  BKN_HOST_DEVICE index_t group_count() const { return groups; }
  // Forced inline: GCC left a fourth instantiation's calls in the eigen backend's loop over
  // the channels (forward_BKN-identity on NC 2x1024 1.7x slower).
  BKN_HOST_DEVICE BKN_FORCE_INLINE void add(index_t g, index_t c, double* acc,
                                            index_t stride) const {
    const index_t i = g * channels + c;
    const index_t d = full ? i * channels + c : i;
    acc[0] += double(post_mean[i]);
    const double q = gains == gain_source::unit          ? 1.0
                     : gains == gain_source::per_channel ? gain_at(gain, c)
                                                         : gain_at(gain, i);
    acc[stride] += double(post_cov[d]) + q * bessel_excess * double(obs_cov[d]);
  }
  BKN_HOST_DEVICE BKN_FORCE_INLINE void finish(index_t c, const double* acc,
                                               index_t stride) const {
    using std::isfinite;
    // The estimate rounded once to the evaluation type, and the blend in it (float for float,
    // whose moving averages round at every update anyway: in double, the conversions and the
    // masks' repacking were a fifth of BN's forward on NC 2x1024). An estimate beyond P's
    // range counts as non-finite: it has no value in P to average.
    using E = math::evaluation_t<P>;
    const E m = E(acc[0] / double(groups)), v = E(acc[stride] / double(groups));
    // Selects rather than branches (the same values): a compiler can vectorize them.
    const bool finite = isfinite(m) && isfinite(v);
    skipped[c] += finite ? P(0) : P(1);
    const P old_mean = mean[c], old_var = var[c];
    const E keep = E(1 - momentum), take = E(momentum);
    const P new_mean = P(keep * E(old_mean) + take * m);
    const P new_var = P(keep * E(old_var) + take * v);
    mean[c] = finite ? new_mean : old_mean;
    var[c] = finite ? new_var : old_var;
  }
  BKN_HOST_DEVICE void operator()(index_t c) const { sum_over_groups(*this, c); }
};

/// Writes the moving averages into a posterior (every group), for running-statistics inference:
/// the variances, or in full mode (`full`) diagonal covariance matrices.
template <class P, bool full = false>
struct broadcast_running_op {
  const P *mean, *var;
  index_t channels;
  P *post_mean, *post_cov;

  BKN_HOST_DEVICE index_t grid_width() const { return channels; }
  BKN_HOST_DEVICE void operator()(index_t i) const { at(i / channels, i % channels); }
  BKN_HOST_DEVICE void at(index_t g, index_t c) const {
    const index_t i = g * channels + c;
    post_mean[i] = mean[c];
    if constexpr (!full) {
      post_cov[i] = var[c];
    } else {
      P* row = post_cov + i * channels;
      for (index_t j = 0; j < channels; ++j) row[j] = j == c ? var[c] : P(0);
    }
  }
};

/// Everything forward and backward check in common, before anything is written.
template <class T, class P>
void check_layer_call(const char* routine, const options& opt, const layer<P>& L,
                      const tensor_view<const T>& x, gaussian_view<const P> prior,
                      index_t group_size) {
  const index_t C = x.channels();
  const index_t G = x.batch() / group_size;
  const parameters<P>& p = L.params;
  check_optional(routine, "params.gamma", p.gamma.size(), C, "one per channel");
  check_optional(routine, "params.beta", p.beta.size(), C, "one per channel");
  check_optional(routine, "running.mean", L.running.mean.size(), C, "one per channel");
  check_optional(routine, "running.var", L.running.var.size(), C, "one per channel");
  require(L.running.mean.empty() == L.running.var.empty(), routine, "running",
          "mean and var must be given together");
  check_optional(routine, "running.skipped", L.running.skipped.size(), C, "one per channel");
  if (!uses_batch_statistics(opt)) {
    require(!L.running.mean.empty(), routine, "running",
            "inference from running statistics needs running.mean and running.var");
    if (!L.state.posterior.empty())
      check_gaussian(routine, "state.posterior", L.state.posterior, G, C, opt.mode);
    return;
  }
  check_gaussian(routine, "state.observed", L.state.observed, G, C, opt.mode);
  check_gaussian(routine, "state.posterior", L.state.posterior, G, C, opt.mode);
  if (prior.empty()) {
    require(x.batch() == 0 || group_size * x.spatial() > 1, routine, "x",
            "one value per channel and statistics group (group size ", group_size, ", ",
            x.shape().height, "x", x.shape().width,
            " pixels): batch statistics carry no information; give the layer a prior (BKN) or "
            "use larger groups");
    return;
  }
  check_gain(routine, "params.gain_logit", opt, p.gain_logit.size(), C);
  check_optional(routine, "params.noise", p.noise.size(), C, "one per channel");
  check_transition(routine, p.transition, C, x.shape().height, x.shape().width);
  check_weight_transition_mode(routine, opt, p.transition);
  const index_t Cin = p.transition.input_channels(C);
  require(prior.groups == 1 || prior.groups == G, routine, "prior",
          "expected 1 group (a prior shared by every group) or ", G,
          " groups (one per statistics group), got ", prior.groups);
  check_gaussian(routine, "prior", prior, prior.groups, Cin, opt.mode);
  check_gaussian(routine, "state.predicted", L.state.predicted, G, C, opt.mode);
}

/// forward's steps for one chunk of groups (every view and array of those groups alone):
/// observe, then without a prior the posterior is the observed statistics (q = 1), with one
/// predict, the gains and update; then normalize.
template <class Backend, class T, class P>
void forward_groups(const Backend& backend, const options& opt, const parameters<P>& p,
                    tensor_view<const T> x, tensor_view<T> y, index_t group_size,
                    gaussian_view<const P> prior, gaussian_view<P> observed,
                    gaussian_view<P> predicted, gaussian_view<P> posterior,
                    const layer_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = x.channels(), G = observed.groups;
  const bool full = opt.mode == covariance::full;
  const P* gamma = p.gamma.empty() ? nullptr : p.gamma.data();
  const P* beta = p.beta.empty() ? nullptr : p.beta.data();
  observe(backend, opt.mode, x, group_size, observed, w);
  if (prior.empty() && !full) {
    // Batch normalization: the posterior is the observed statistics, copied in the pass that
    // computes the coefficients.
    K::for_each(backend, G * C,
                batch_posterior_op<P>{gamma, beta, observed.mean.data(), observed.cov.data(), C,
                                      opt.epsilon, posterior.mean.data(), posterior.cov.data(),
                                      w.a.data(), w.k.data()});
    K::affine(backend, y, x, span<const P>(w.a), span<const P>(observed.mean),
              tensor_view<const T>(), span<const P>(), span<const P>(w.k), group_size);
    return;
  }
  if (prior.empty()) {
    K::for_each(backend, G * C, copy_op<P>{observed.mean.data(), posterior.mean.data()});
    K::for_each(backend, observed.cov.size(), copy_op<P>{observed.cov.data(), posterior.cov.data()});
    // q = 1 without a prior, as an array: a null gain would be read through masked vector
    // loads, which cost a microcode assist per vector on some CPUs (AMD) when the pointer is null.
    K::for_each(backend, G * C, fill_op<P>{w.gain.data(), P(1)});
  } else if (one_kalman_pass(opt, p.transition)) {
    kalman_step(backend, opt, p, prior, gaussian_view<const P>(observed), predicted, posterior, w);
    K::affine(backend, y, x, span<const P>(w.a), span<const P>(posterior.mean),
              tensor_view<const T>(), span<const P>(), span<const P>(w.k), group_size);
    return;
  } else {
    predict(backend, opt.mode, p.transition, p.noise, prior, predicted, w);
    compute_gains(backend, opt, p.gain_logit, gaussian_view<const P>(predicted),
                  gaussian_view<const P>(observed), w);
    update(backend, opt.mode, w.gain.data(), gaussian_view<const P>(predicted),
           gaussian_view<const P>(observed), posterior);
  }
  normalize(backend, opt.mode, x, y, p.gamma, p.beta, gaussian_view<const P>(posterior),
            group_size, opt.epsilon, w);
}

}  // namespace detail

/// One layer's forward pass on `backend`: y = gamma (x - mu) / sqrt(diag Sigma + eps) + beta.
///
/// With batch statistics (training, or inference from the chain) it observes the batch's
/// statistics per group into L.state.observed, predicts this layer's statistics from `prior`
/// (the previous layer's posterior, or a caller prior) through the transition into
/// L.state.predicted, fuses both with gain q into L.state.posterior (Eq. 5), normalizes, and in
/// training updates the moving averages. Without a prior (empty `prior`) the layer is batch
/// normalization: q = 1, the posterior is the observed statistics. In inference from running
/// statistics it normalizes with L.running and writes them into L.state.posterior if given.
///
/// `x` and `y` have the same shape; y may be the same view as x. `workspace` holds
/// workspace_size(backend, opt, x.shape(), C') bytes. Asynchronous on backends with a stream.
/// Throws bkn::invalid_argument, before writing anything, on an invalid argument. A batch of
/// N = 0 changes nothing.
template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             gaussian_view<const detail::nondeduced<P>> prior, span<std::byte> workspace) {
  constexpr const char* routine = "bkn::forward";
  detail::check_options(routine, opt);
  detail::check_view(routine, "x", x, false);
  detail::check_view(routine, "y", y, true);
  detail::check_shape(routine, "y", y, x.shape());
  detail::check_no_overlap(routine, "y", y, "x", x, true);
  if (x.batch() == 0) return;
  const index_t group_size = detail::resolve_group_size(routine, opt, x.batch());
  detail::check_layer_call(routine, opt, L, x, prior, group_size);
  const transition<P> A = prior.empty() ? transition<P>() : L.params.transition;
  const auto w = detail::carve_checked<Backend, P>(routine, backend, opt, x.shape(), group_size,
                                                   A, workspace);
  if (opt.check_finite) detail::check_finite(routine, "x", x);

  using K = kernels<Backend>;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const bool full = opt.mode == covariance::full;
  const layer_state<P>& s = L.state;
  const parameters<P>& p = L.params;

  if (!detail::uses_batch_statistics(opt)) {
    const running_statistics<P>& r = L.running;
    K::for_each(backend, C,
                detail::normalize_coefficients_op<P>{
                    p.gamma.empty() ? nullptr : p.gamma.data(),
                    p.beta.empty() ? nullptr : p.beta.data(), r.mean.data(), r.var.data(), C, 1,
                    opt.epsilon, w.a.data(), w.k.data()});
    K::affine(backend, y, x, span<const P>(w.a), span<const P>(r.mean), tensor_view<const T>(),
              span<const P>(), span<const P>(w.k), x.batch());
    if (!s.posterior.empty() && !full)
      K::for_each(backend, G * C,
                  detail::broadcast_running_op<P>{r.mean.data(), r.var.data(), C,
                                                  s.posterior.mean.data(),
                                                  s.posterior.cov.data()});
    if (!s.posterior.empty() && full)
      K::for_each(backend, G * C,
                  detail::broadcast_running_op<P, true>{r.mean.data(), r.var.data(), C,
                                                        s.posterior.mean.data(),
                                                        s.posterior.cov.data()});
    return;
  }

  // Statistics, the Kalman steps, the normalization and the moving averages' sums, a chunk of
  // groups at a time when the backend asks for it (a chunk's tensors and arrays are then read
  // again from cache).
  const bool track = opt.training && !L.running.mean.empty();
  if (track && L.running.skipped.empty())
    K::for_each(backend, C, detail::fill_op<P>{w.sink.data(), P(0)});
  P* skipped = L.running.skipped.empty() ? w.sink.data() : L.running.skipped.data();
  const double bessel_excess =
      opt.unbiased_running_variance && group_size * x.spatial() > 1
          ? 1.0 / (double(group_size * x.spatial()) - 1)
          : 0.0;
  const index_t chunk =
      detail::groups_per_chunk(backend, opt, A, x.shape(), group_size, sizeof(T));
  for (index_t g0 = 0; g0 < G; g0 += chunk) {
    const index_t n = std::min(chunk, G - g0);
    const auto part = [&](auto view) { return detail::groups_of(view, g0, n, G, opt.mode); };
    const detail::layer_workspace<P> wp = detail::groups_of(w, g0, n, G, C);
    const gaussian_view<P> observed = part(s.observed), posterior = part(s.posterior);
    detail::forward_groups(backend, opt, p, detail::groups_of(x, g0, n, group_size),
                           detail::groups_of(y, g0, n, group_size), group_size, part(prior),
                           observed, part(s.predicted), posterior, wp);
    if (!track) continue;
    const auto moving_averages = [&](auto op, gaussian_view<const P> estimate, span<P> gain) {
      op = {estimate.mean.data(), estimate.cov.data(), observed.cov.data(), gain.data(),
            G, C, opt.momentum, bessel_excess, L.running.mean.data(), L.running.var.data(),
            skipped};
      detail::sum_chunk(backend, C, op, w.carry, g0, n, G);
    };
    if (prior.empty() && !full)  // batch normalization: q = 1, the observed statistics
      moving_averages(detail::running_update_op<P, false, detail::gain_source::unit>(), observed,
                      wp.gain);
    else if (full)
      moving_averages(detail::running_update_op<P, true>(), posterior, wp.gain);
    else if (detail::one_kalman_pass(opt, A))  // kalman_step's gains, one per channel
      moving_averages(detail::running_update_op<P, false, detail::gain_source::per_channel>(),
                      posterior, detail::kalman_step_gains(wp));
    else
      moving_averages(detail::running_update_op<P>(), posterior, wp.gain);
  }
}

BKN_END_NAMESPACE
