// SPDX-License-Identifier: MIT
// bkn::batch_norm: batch normalization per statistics group ("ghost batches"), on the fast path
// of two tensor passes each way; inference from the moving averages or the test batch.
#pragma once

#include "bkn/methods/detail/batch_statistics.hpp"

BKN_BEGIN_NAMESPACE
namespace batch_norm {

struct options {
  /// Samples per statistics group ("ghost batch"): a batch of N is split into N / group_size
  /// groups of consecutive samples, each normalized with its own statistics. 0: the whole
  /// batch is one group. Must divide N.
  index_t group_size = 0;
  /// Added to the variance before the square root. > 0.
  double epsilon = 1e-5;
  /// running = (1 - momentum) running + momentum batch estimate (PyTorch's convention). In [0, 1].
  double momentum = 0.1;
  /// Training: normalize with each group's statistics and update the moving averages.
  bool training = true;
  /// In inference: `running`, the moving averages; `chain`, the test batch's own statistics per
  /// group, as in training but without touching the moving averages (what bkn::forward does
  /// with this option and no prior; the paper's Table 3 reports both).
  inference_statistics inference = inference_statistics::running;
  /// The moving variance takes Bessel's correction m / (m - 1) (m values per group and
  /// channel); normalization always uses the biased variance.
  bool unbiased_running_variance = true;
  /// Scan x (and dy) on the host first; throw bkn::nonfinite_input at the first NaN or Inf.
  bool check_finite = false;
};

/// Per-channel affine parameters (read), C each. Empty: gamma = 1, beta = 0.
template <class P>
struct parameters {
  span<const P> gamma, beta;
};

/// Gradients of the parameters, C each, written (not accumulated) by backward. Empty: not
/// computed.
template <class P>
struct gradients {
  span<P> gamma, beta;
};

/// Each statistics group's mean and biased variance, G x C at [g * C + c]: written by a forward
/// with batch statistics, read by its backward. Empty: forward keeps none and backward
/// recomputes them from x (one more pass over x).
template <class P>
struct statistics {
  span<P> mean, var;
};

/// Everything one batch-normalized layer owns, as views of the host's memory. G = N /
/// group_size groups, C channels.
template <class P>
struct layer {
  parameters<P> params;
  gradients<P> grads;
  /// The moving averages (C each; `skipped` optional). Needed for inference from them; may be
  /// empty in training (then nothing is tracked).
  running_statistics<P> running;
  statistics<P> saved;
};

/// Bytes of workspace forward and backward need for inputs of shape `x`.
template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  return detail::batch_workspace_size("bkn::batch_norm::workspace_size", backend, opt, x);
}

}  // namespace batch_norm

namespace detail {

/// The checks of batch_norm's forward and backward after the options and views; returns the
/// group size (0 when N = 0).
template <class T, class P>
index_t check_batch_norm_call(const char* routine, const batch_norm::options& opt,
                              const batch_norm::layer<P>& L, const tensor_view<const T>& x,
                              bool batch_stats) {
  const index_t C = x.channels();
  check_affine(routine, C, L.params.gamma, L.params.beta);
  check_running(routine, L.running, C, !batch_stats, "inference from running statistics");
  if (x.batch() == 0) return 0;
  const index_t group_size = resolve_group_size(routine, opt.group_size, x.batch());
  if (!batch_stats) return group_size;
  check_values_per_group(routine, x, group_size, "use larger groups (options.group_size)");
  const index_t G = x.batch() / group_size;
  check_optional(routine, "saved.mean", L.saved.mean.size(), G * C, "groups x channels");
  check_optional(routine, "saved.var", L.saved.var.size(), G * C, "groups x channels");
  require(L.saved.mean.empty() == L.saved.var.empty(), routine, "saved",
          "mean and var must be given together");
  return group_size;
}

}  // namespace detail

namespace batch_norm {

/// y = gamma (x - mu) / sqrt(var + eps) + beta, with (mu, var) each group's statistics
/// (training, or inference from the test batch) or the moving averages (inference). In
/// training the moving averages then move toward the statistics averaged over the groups.
/// y may be the same view as x. Throws bkn::invalid_argument before writing anything on an
/// invalid argument, including one value per channel and group with batch statistics. N = 0
/// changes nothing.
template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  constexpr const char* routine = "bkn::batch_norm::forward";
  const bool batch_stats = opt.training || opt.inference == inference_statistics::chain;
  detail::check_batch_options(routine, opt);
  detail::check_forward_views(routine, x, y);
  const index_t group_size = detail::check_batch_norm_call(routine, opt, L, x, batch_stats);
  if (x.batch() == 0) return;
  const auto w =
      detail::carve_batch_checked<Backend, P>(routine, backend, x.shape(), group_size, workspace);
  if (opt.check_finite) detail::check_finite(routine, "x", x);

  const parameters<P>& p = L.params;
  if (!batch_stats) {
    detail::normalize_batch(backend, x, y, p.gamma, p.beta, span<const P>(L.running.mean),
                            span<const P>(L.running.var), 1, x.batch(), opt.epsilon, w);
    return;
  }
  const index_t C = x.channels(), G = x.batch() / group_size;
  const bool keep = !L.saved.mean.empty();
  const span<P> mean = keep ? L.saved.mean : w.mean, var = keep ? L.saved.var : w.var;
  kernels<Backend>::moments(backend, x, group_size, mean, var, w.scratch);
  detail::normalize_batch(backend, x, y, p.gamma, p.beta, span<const P>(mean), span<const P>(var),
                          G, group_size, opt.epsilon, w);
  if (opt.training)
    detail::update_running(
        backend, L.running, span<const P>(mean), span<const P>(var), G, C, opt.momentum,
        detail::bessel_excess(opt.unbiased_running_variance, double(group_size * x.spatial())),
        w.sink);
}

/// The gradient of forward's y: dx, and dgamma and dbeta when given (written, not
/// accumulated). With batch statistics (same options as the forward) the gradient flows through
/// each group's mean and variance (L.saved, or recomputed from x when it is empty); in
/// inference from the moving averages they are constants: dx = gamma / sqrt(running var + eps)
/// dy. dx may be the same view as dy, never x.
template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  constexpr const char* routine = "bkn::batch_norm::backward";
  const bool batch_stats = opt.training || opt.inference == inference_statistics::chain;
  detail::check_batch_options(routine, opt);
  detail::check_backward_views(routine, x, dy, dx);
  detail::check_affine_gradients(routine, x.channels(), L.grads.gamma, L.grads.beta);
  const index_t group_size = detail::check_batch_norm_call(routine, opt, L, x, batch_stats);
  if (x.batch() == 0) return;
  const auto w =
      detail::carve_batch_checked<Backend, P>(routine, backend, x.shape(), group_size, workspace);
  if (opt.check_finite) {
    detail::check_finite(routine, "x", x);
    detail::check_finite(routine, "dy", dy);
  }

  if (!batch_stats) {
    detail::constant_statistics_backward(
        backend, x, dy, dx, L.params.gamma, span<const P>(L.running.mean),
        span<const P>(L.running.var), L.grads.gamma, L.grads.beta, opt.epsilon, w);
    return;
  }
  detail::batch_backward_inputs<P> in;
  in.gamma = L.params.gamma;
  if (L.saved.mean.empty()) {
    kernels<Backend>::moments(backend, x, group_size, w.mean, w.var, w.scratch);
    in.mean = w.mean;
    in.var = w.var;
  } else {
    in.mean = L.saved.mean;
    in.var = L.saved.var;
  }
  detail::batch_backward(backend, x, dy, dx, group_size, opt.epsilon, in, L.grads.gamma,
                         L.grads.beta, w);
}

}  // namespace batch_norm
BKN_END_NAMESPACE
