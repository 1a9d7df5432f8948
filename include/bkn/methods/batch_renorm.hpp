// SPDX-License-Identifier: MIT
// bkn::batch_renorm: batch renormalization (Ioffe 2017), batch statistics corrected toward the
// moving averages by r and d, which are constants for the gradient; per statistics group.
#pragma once

#include <cmath>

#include "bkn/methods/batch_norm.hpp"
#include "bkn/methods/detail/batch_statistics.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

/// Per (g, c) in training: r = clip(sigma_B / sigma_run, 1 / r_max, r_max),
/// d = clip((mu_B - mu_run) / sigma_run, -d_max, d_max), sigma = sqrt(var + eps), and the
/// coefficients of y = a (x - mu_B) + k: a = gamma r / sigma_B, k = gamma d + beta.
template <class P>
struct renorm_coefficients_op {
  const P *gamma, *beta;  // null: 1 and 0
  const P *mean, *var, *running_mean, *running_var;
  index_t channels;
  double epsilon, r_max, d_max;
  P *r, *d, *a, *k;

  // Written so that NaN passes through rather than being clipped to a bound.
  BKN_HOST_DEVICE static double clip(double v, double low, double high) {
    return v < low ? low : v > high ? high : v;
  }

  BKN_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const index_t c = i % channels;
    const double sigma = sqrt(double(var[i]) + epsilon);
    const double sigma_run = sqrt(double(running_var[c]) + epsilon);
    const P rr = P(clip(sigma / sigma_run, 1 / r_max, r_max));
    const P dd = P(clip((double(mean[i]) - double(running_mean[c])) / sigma_run, -d_max, d_max));
    const double g = gamma ? double(gamma[c]) : 1.0;
    r[i] = rr;
    d[i] = dd;
    // The rounded r and d, which backward reads back: the gradient matches the output. a is
    // evaluated as batch_norm's gamma / sqrt(var + eps) is (math::evaluation_t), so that r = 1
    // gives batch_norm's bits.
    using E = math::evaluation_t<P>;
    a[i] = P(E(g) * E(rr) / sqrt(E(var[i]) + E(epsilon)));
    k[i] = P(g * double(dd) + (beta ? double(beta[c]) : 0.0));
  }
};

}  // namespace detail

namespace batch_renorm {

struct options {
  /// Samples per statistics group; 0: the whole batch. Must divide N (as batch_norm).
  index_t group_size = 0;
  /// Added to every variance before its square root. > 0.
  double epsilon = 1e-5;
  /// running = (1 - momentum) running + momentum batch estimate. In [0, 1].
  double momentum = 0.1;
  /// Training: normalize with batch statistics corrected by r and d, then update the moving
  /// averages. Inference: normalize with the moving averages.
  bool training = true;
  /// Bounds of r and d, >= 1 and >= 0; a host may change them every step (the paper's schedule
  /// relaxes them from 1 and 0, i.e. batch normalization, to e.g. 3 and 5). Infinity: no clip.
  double r_max = 1;
  double d_max = 0;
  /// The moving variance takes Bessel's correction m / (m - 1).
  bool unbiased_running_variance = true;
  /// Scan x (and dy) on the host first; throw bkn::nonfinite_input at the first NaN or Inf.
  bool check_finite = false;
};

/// Per-channel affine parameters and their gradients, as batch_norm's.
template <class P>
using parameters = batch_norm::parameters<P>;
template <class P>
using gradients = batch_norm::gradients<P>;

/// G x C each, at [g * C + c], written by a training forward and read by its backward: each
/// group's mean and biased variance, and its r and d. Required in training (r and d cannot be
/// recomputed: the forward moved the moving averages they came from).
template <class P>
struct statistics {
  span<P> mean, var, r, d;
};

/// Everything one batch-renormalized layer owns, as views of the host's memory.
template <class P>
struct layer {
  parameters<P> params;
  gradients<P> grads;
  /// The moving averages, C each (`skipped` optional). Required: training reads them for r
  /// and d before updating them; inference normalizes with them.
  running_statistics<P> running;
  statistics<P> saved;
};

/// Bytes of workspace forward and backward need for inputs of shape `x`.
template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  return detail::batch_workspace_size("bkn::batch_renorm::workspace_size", backend, opt, x);
}

}  // namespace batch_renorm

namespace detail {

/// The options of batch_renorm: batch_norm's, and the bounds of r and d.
inline void check_renorm_options(const char* routine, const batch_renorm::options& opt) {
  check_batch_options(routine, opt);
  require(opt.r_max >= 1, routine, "options.r_max", "expected >= 1, got ", opt.r_max);
  require(opt.d_max >= 0, routine, "options.d_max", "expected >= 0, got ", opt.d_max);
}

/// Every check of forward and backward after the options and views; returns the group size
/// (0 when N = 0).
template <class T, class P>
index_t check_renorm_layer(const char* routine, const batch_renorm::options& opt,
                           const batch_renorm::layer<P>& L, const tensor_view<const T>& x) {
  const index_t C = x.channels();
  check_affine(routine, C, L.params.gamma, L.params.beta);
  check_running(routine, L.running, C, true, opt.training ? "training (r and d)" : "inference");
  if (x.batch() == 0) return 0;
  const index_t group_size = resolve_group_size(routine, opt.group_size, x.batch());
  if (!opt.training) return group_size;
  const index_t G = x.batch() / group_size;
  check_values_per_group(routine, x, group_size, "use larger groups (options.group_size)");
  check_required(routine, "saved.mean", L.saved.mean, G * C, "groups x channels");
  check_required(routine, "saved.var", L.saved.var, G * C, "groups x channels");
  check_required(routine, "saved.r", L.saved.r, G * C, "groups x channels");
  check_required(routine, "saved.d", L.saved.d, G * C, "groups x channels");
  return group_size;
}

}  // namespace detail

namespace batch_renorm {

/// Training: y = gamma ((x - mu_B) / sigma_B r + d) + beta per group, r and d from the moving
/// averages as they were before this call (saved in L.saved.r and .d), which then move toward the
/// groups' statistics. Inference: y = gamma (x - mu_run) / sigma_run + beta. With r_max = 1
/// and d_max = 0 this is batch_norm. y may be the same view as x. Throws bkn::invalid_argument
/// before writing anything on an invalid argument. N = 0 changes nothing.
template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  constexpr const char* routine = "bkn::batch_renorm::forward";
  detail::check_renorm_options(routine, opt);
  detail::check_forward_views(routine, x, y);
  const index_t group_size = detail::check_renorm_layer(routine, opt, L, x);
  if (x.batch() == 0) return;
  const auto w =
      detail::carve_batch_checked<Backend, P>(routine, backend, x.shape(), group_size, workspace);
  if (opt.check_finite) detail::check_finite(routine, "x", x);

  using K = kernels<Backend>;
  const span<const P> running_mean = L.running.mean, running_var = L.running.var;
  if (!opt.training) {
    detail::normalize_batch(backend, x, y, L.params.gamma, L.params.beta, running_mean, running_var,
                            1, x.batch(), opt.epsilon, w);
    return;
  }
  const index_t C = x.channels(), G = x.batch() / group_size;
  K::moments(backend, x, group_size, L.saved.mean, L.saved.var, w.scratch);
  K::for_each(
      backend, G * C,
      detail::renorm_coefficients_op<P>{
          L.params.gamma.empty() ? nullptr : L.params.gamma.data(),
          L.params.beta.empty() ? nullptr : L.params.beta.data(), L.saved.mean.data(),
          L.saved.var.data(), running_mean.data(), running_var.data(), C, opt.epsilon, opt.r_max,
          opt.d_max, L.saved.r.data(), L.saved.d.data(), w.a.data(), w.k.data()});
  K::affine(backend, y, x, span<const P>(w.a), span<const P>(L.saved.mean), tensor_view<const T>(),
            span<const P>(), span<const P>(w.k), group_size);
  detail::update_running(
      backend, L.running, span<const P>(L.saved.mean), span<const P>(L.saved.var), G, C,
      opt.momentum,
      detail::bessel_excess(opt.unbiased_running_variance, double(group_size * x.spatial())),
      w.sink);
}

/// The gradient of forward's y, r and d held constant (the method's definition): dx, and dgamma
/// = sum dy (r x_hat + d) and dbeta = sum dy when given (written, not accumulated). Inference:
/// the moving averages are constants. dx may be the same view as dy, never x.
template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  constexpr const char* routine = "bkn::batch_renorm::backward";
  detail::check_renorm_options(routine, opt);
  detail::check_backward_views(routine, x, dy, dx);
  detail::check_affine_gradients(routine, x.channels(), L.grads.gamma, L.grads.beta);
  const index_t group_size = detail::check_renorm_layer(routine, opt, L, x);
  if (x.batch() == 0) return;
  const auto w =
      detail::carve_batch_checked<Backend, P>(routine, backend, x.shape(), group_size, workspace);
  if (opt.check_finite) {
    detail::check_finite(routine, "x", x);
    detail::check_finite(routine, "dy", dy);
  }

  if (!opt.training) {
    detail::constant_statistics_backward(
        backend, x, dy, dx, L.params.gamma, span<const P>(L.running.mean),
        span<const P>(L.running.var), L.grads.gamma, L.grads.beta, opt.epsilon, w);
    return;
  }
  detail::batch_backward_inputs<P> in;
  in.gamma = L.params.gamma;
  in.mean = L.saved.mean;
  in.var = L.saved.var;
  in.scale = L.saved.r;
  in.shift = L.saved.d;
  detail::batch_backward(backend, x, dy, dx, group_size, opt.epsilon, in, L.grads.gamma,
                         L.grads.beta, w);
}

}  // namespace batch_renorm
BKN_END_NAMESPACE
