// SPDX-License-Identifier: MIT
// What batch_norm, batch_renorm and memorized_batch_norm share: the checks of their arguments,
// their workspace, and the passes and per-channel functors of their forward and backward.
#pragma once

#include <cmath>
#include <cstddef>
#include <initializer_list>

#include "bkn/forward.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

// ---- per-channel functors (run through kernels<Backend>::for_each) ----

/// Per (g, c): the coefficients of dx = a dy + b (x - batch_mean) + k for a layer
///   y = gamma (r (x - mu) / sqrt(v + eps) + d) + beta,
/// where (mu, v) are the statistics the forward normalized with and the current batch's own
/// mean and biased variance over its m values enter them with weight `share`:
///   dmu/dbatch_mean = share, dv/dbatch_var = share, dv/dbatch_mean = 2 share (batch_mean - mu)
/// (a weighted pooled mean and variance, docs/methods/batch.md). Batch normalization is
/// share = 1, r = 1, batch_mean = mu; r and d are constants for the gradient (renormalization).
template <class P>
struct batch_backward_op {
  double count, epsilon;  // count: m, the values of one group per channel
  index_t channels;
  const P* gamma;                    // C; null: 1
  const P *mean, *var;               // the statistics normalized with
  const P *sum_dy, *sum_dy_centred;  // about `mean`
  const P* scale;                    // r; null: 1
  const P* share;                    // per group; null: 1
  const P* batch_mean;               // null: `mean`
  P *a, *b, *k;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const index_t c = i % channels, g = i / channels;
    const double gr = (gamma ? double(gamma[c]) : 1.0) * (scale ? double(scale[i]) : 1.0);
    const double inv_sigma = 1.0 / sqrt(double(var[i]) + epsilon);
    const double dmean = -gr * double(sum_dy[i]) * inv_sigma;
    const double dvar = -0.5 * gr * double(sum_dy_centred[i]) * inv_sigma * inv_sigma * inv_sigma;
    const double w = share ? double(share[g]) : 1.0;
    const double offset = batch_mean ? double(batch_mean[i]) - double(mean[i]) : 0.0;
    const double dbatch_mean = w * (dmean + 2 * offset * dvar);
    const double dbatch_var = w * dvar;
    a[i] = P(gr * inv_sigma);
    b[i] = P(2 * dbatch_var / count);
    k[i] = P(dbatch_mean / count);
  }
};

/// Per channel, summed over the groups in a fixed order: dgamma = sum dy (r x_hat + d) and
/// dbeta = sum dy, x_hat = (x - mu) / sqrt(v + eps).
template <class P>
struct affine_gradients_op {
  double epsilon;
  index_t groups, channels;
  const P *var, *sum_dy, *sum_dy_centred;
  const P *scale, *shift;  // r and d per (g, c); null: 1 and 0
  P *dgamma, *dbeta;       // never null: the workspace's sink when not wanted

  static constexpr int sums = 2;  // a group-sum functor (steps.hpp)
  BKN_HOST_DEVICE index_t group_count() const { return groups; }
  BKN_HOST_DEVICE void add(index_t g, index_t c, double* acc, index_t stride) const {
    using std::sqrt;
    const index_t i = g * channels + c;
    const double r = scale ? double(scale[i]) : 1.0, d = shift ? double(shift[i]) : 0.0;
    acc[0] += r * double(sum_dy_centred[i]) / sqrt(double(var[i]) + epsilon) +
              d * double(sum_dy[i]);
    acc[stride] += double(sum_dy[i]);
  }
  BKN_HOST_DEVICE void finish(index_t c, const double* acc, index_t stride) const {
    dgamma[c] = P(acc[0]);
    dbeta[c] = P(acc[stride]);
  }
  BKN_HOST_DEVICE void operator()(index_t c) const { sum_over_groups(*this, c); }
};

// ---- workspace ----

/// The arrays the batch-statistics methods carve from the workspace, G*C each.
template <class P>
struct batch_workspace {
  span<P> a, b, k;                 // coefficients of the tensor passes
  span<P> sum_dy, sum_dy_centred;  // backward reductions
  span<P> mean, var;               // statistics a method derives on the fly
  span<P> sink;                    // C: optional outputs nobody asked for (branch-free loops)
  span<std::byte> scratch;         // the backend's own
};

template <class Backend, class P>
batch_workspace<P> carve_batch_workspace(workspace_arena& arena, const Backend& backend,
                                         const tensor_shape& x, index_t group_size) {
  const index_t n = x.batch / group_size * x.channels;
  batch_workspace<P> w;
  for (span<P>* v : {&w.a, &w.b, &w.k, &w.sum_dy, &w.sum_dy_centred, &w.mean, &w.var})
    *v = arena.take<P>(n);
  w.sink = arena.take<P>(x.channels);
  // Inference passes run over the whole batch as one group, training ones over the groups.
  using K = kernels<Backend>;
  std::size_t scratch = K::scratch_bytes(backend, x, group_size, covariance::diagonal);
  if (x.batch > 0) {
    const std::size_t whole = K::scratch_bytes(backend, x, x.batch, covariance::diagonal);
    if (whole > scratch) scratch = whole;
  }
  w.scratch = arena.take_bytes(scratch);
  return w;
}

template <class Backend, class P>
batch_workspace<P> carve_batch_checked(const char* routine, const Backend& backend,
                                       const tensor_shape& x, index_t group_size,
                                       span<std::byte> workspace) {
  workspace_arena measure;
  carve_batch_workspace<Backend, P>(measure, backend, x, group_size);
  check_workspace(routine, workspace, measure.used());
  workspace_arena arena(workspace);
  return carve_batch_workspace<Backend, P>(arena, backend, x, group_size);
}

// ---- checks, before anything is written ----

/// Samples per statistics group (options.group_size; 0: the whole batch), which must divide N.
inline index_t resolve_group_size(const char* routine, index_t group_size, index_t batch) {
  options o;
  o.group_size = group_size;
  return resolve_group_size(routine, o, batch);
}

/// The options every batch-statistics method has.
template <class Options>
void check_batch_options(const char* routine, const Options& opt) {
  require(opt.epsilon > 0, routine, "options.epsilon", "expected > 0, got ", opt.epsilon);
  require(opt.momentum >= 0 && opt.momentum <= 1, routine, "options.momentum",
          "expected a value in [0, 1], got ", opt.momentum);
  require(opt.group_size >= 0, routine, "options.group_size",
          "expected >= 0 (0: the whole batch), got ", opt.group_size);
}

/// The workspace_size of every batch-statistics method: validates the options it reads.
template <class Backend, class Options>
std::size_t batch_workspace_size(const char* routine, const Backend& backend, const Options& opt,
                                 const tensor_shape& x) {
  check_batch_options(routine, opt);
  require(x.batch >= 0 && x.channels >= 0 && x.height >= 0 && x.width >= 0, routine, "x",
          "extents must be non-negative, got (", x.batch, ", ", x.channels, ", ", x.height, ", ",
          x.width, ")");
  const index_t group_size = resolve_group_size(routine, opt.group_size, x.batch);
  workspace_arena arena;
  carve_batch_workspace<Backend, double>(arena, backend, x, group_size);
  return arena.used();
}

template <class T>
void check_forward_views(const char* routine, const tensor_view<const T>& x,
                         const tensor_view<T>& y) {
  check_view(routine, "x", x, false);
  check_view(routine, "y", y, true);
  check_shape(routine, "y", y, x.shape());
  check_no_overlap(routine, "y", y, "x", x, true);
}

template <class T>
void check_backward_views(const char* routine, const tensor_view<const T>& x,
                          const tensor_view<const T>& dy, const tensor_view<T>& dx) {
  check_view(routine, "x", x, false);
  check_view(routine, "dy", dy, false);
  check_view(routine, "dx", dx, true);
  check_shape(routine, "dy", dy, x.shape());
  check_shape(routine, "dx", dx, x.shape());
  check_no_overlap(routine, "dx", dx, "x", x, false);
  check_no_overlap(routine, "dx", dx, "dy", dy, true);
}

/// Requires an array the call needs to hold exactly `expected` elements (`what` says why).
template <class P>
void check_required(const char* routine, const char* name, span<P> v, index_t expected,
                    const char* what) {
  require(v.size() == expected && (expected == 0 || v.data() != nullptr), routine, name,
          "expected ", expected, " elements (", what, "), got ", v.size());
}

/// gamma and beta: C each, or none (1 and 0).
template <class P>
void check_affine(const char* routine, index_t channels, span<const P> gamma, span<const P> beta) {
  check_optional(routine, "params.gamma", gamma.size(), channels, "one per channel");
  check_optional(routine, "params.beta", beta.size(), channels, "one per channel");
}

/// dgamma and dbeta: C each, or none (not computed).
template <class P>
void check_affine_gradients(const char* routine, index_t channels, span<P> dgamma, span<P> dbeta) {
  check_optional(routine, "grads.gamma", dgamma.size(), channels, "one per channel");
  check_optional(routine, "grads.beta", dbeta.size(), channels, "one per channel");
}

/// The moving averages: mean and var together, C each; `required` for the call.
template <class P>
void check_running(const char* routine, const running_statistics<P>& r, index_t channels,
                   bool required, const char* why) {
  check_optional(routine, "running.mean", r.mean.size(), channels, "one per channel");
  check_optional(routine, "running.var", r.var.size(), channels, "one per channel");
  require(r.mean.empty() == r.var.empty(), routine, "running",
          "mean and var must be given together");
  check_optional(routine, "running.skipped", r.skipped.size(), channels, "one per channel");
  require(!required || !r.mean.empty(), routine, "running", why,
          " needs running.mean and running.var");
}

/// Batch statistics of fewer than two values per channel and group say nothing.
template <class T>
void check_values_per_group(const char* routine, const tensor_view<const T>& x, index_t group_size,
                            const char* remedy) {
  require(x.batch() == 0 || group_size * x.spatial() > 1, routine, "x",
          "one value per channel and statistics group (group size ", group_size, ", ",
          x.shape().height, "x", x.shape().width,
          " pixels): batch statistics carry no information; ", remedy);
}

// ---- the passes, unchecked: the public routines validate first ----

/// y = gamma (x - mean) / sqrt(var + eps) + beta with per-(g, c) statistics (`groups` of
/// `group_size` samples; a single group of the whole batch for per-channel statistics).
template <class Backend, class T, class P>
void normalize_batch(const Backend& backend, tensor_view<const T> x, tensor_view<T> y,
                     span<const P> gamma, span<const P> beta, span<const P> mean, span<const P> var,
                     index_t groups, index_t group_size, double epsilon,
                     const batch_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = x.channels();
  K::for_each(backend, groups * C,
              normalize_coefficients_op<P>{gamma.empty() ? nullptr : gamma.data(),
                                           beta.empty() ? nullptr : beta.data(), mean.data(),
                                           var.data(), C, 1, epsilon, w.a.data(), w.k.data()});
  K::affine(backend, y, x, span<const P>(w.a), mean, tensor_view<const T>(), span<const P>(),
            span<const P>(w.k), group_size);
}

/// Backward through a normalization with constant per-channel statistics (inference):
/// dx = gamma / sigma dy, dgamma = sum dy (x - mean) / sigma, dbeta = sum dy.
template <class Backend, class T, class P>
void constant_statistics_backward(const Backend& backend, tensor_view<const T> x,
                                  tensor_view<const T> dy, tensor_view<T> dx, span<const P> gamma,
                                  span<const P> mean, span<const P> var, span<P> dgamma,
                                  span<P> dbeta, double epsilon, const batch_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = x.channels();
  K::sums(backend, dy, x, mean, x.batch(), w.sum_dy, w.sum_dy_centred, w.scratch);
  K::for_each(
      backend, C,
      normalize_coefficients_op<P>{gamma.empty() ? nullptr : gamma.data(), nullptr, mean.data(),
                                   var.data(), C, 1, epsilon, w.a.data(), w.k.data()});
  // k is zero: it serves as dy's centre and as the constant term.
  K::affine(backend, dx, dy, span<const P>(w.a), span<const P>(w.k), tensor_view<const T>(),
            span<const P>(), span<const P>(w.k), x.batch());
  K::for_each(
      backend, C,
      affine_gradients_op<P>{epsilon, 1, C, var.data(), w.sum_dy.data(), w.sum_dy_centred.data(),
                             nullptr, nullptr, dgamma.empty() ? w.sink.data() : dgamma.data(),
                             dbeta.empty() ? w.sink.data() : dbeta.data()});
}

/// What the backward through batch statistics reads besides x and dy (see batch_backward_op).
template <class P>
struct batch_backward_inputs {
  span<const P> gamma;
  span<const P> mean, var;     // G*C: the statistics normalized with
  span<const P> scale, shift;  // G*C: r and d of renormalization; empty: 1 and 0
  span<const P> share;         // G: the current batch's weight in (mean, var); empty: 1
  span<const P> batch_mean;    // G*C: the current batch's own mean; empty: `mean`
};

/// One `sums` pass, the coefficients, one `affine` pass, and the parameter gradients.
template <class Backend, class T, class P>
void batch_backward(const Backend& backend, tensor_view<const T> x, tensor_view<const T> dy,
                    tensor_view<T> dx, index_t group_size, double epsilon,
                    const batch_backward_inputs<P>& in, span<P> dgamma, span<P> dbeta,
                    const batch_workspace<P>& w) {
  using K = kernels<Backend>;
  const index_t C = x.channels(), G = x.batch() / group_size;
  auto or_null = [](span<const P> v) { return v.empty() ? nullptr : v.data(); };
  K::sums(backend, dy, x, in.mean, group_size, w.sum_dy, w.sum_dy_centred, w.scratch);
  K::for_each(backend, G * C,
              batch_backward_op<P>{double(group_size * x.spatial()), epsilon, C, or_null(in.gamma),
                                   in.mean.data(), in.var.data(), w.sum_dy.data(),
                                   w.sum_dy_centred.data(), or_null(in.scale), or_null(in.share),
                                   or_null(in.batch_mean), w.a.data(), w.b.data(), w.k.data()});
  // dx = b (x - batch mean) + a dy + k: the centred term first, in the element type.
  const span<const P> centre = in.batch_mean.empty() ? in.mean : in.batch_mean;
  K::affine(backend, dx, x, span<const P>(w.b), centre, dy, span<const P>(w.a), span<const P>(w.k),
            group_size);
  K::for_each(backend, C,
              affine_gradients_op<P>{epsilon, G, C, in.var.data(), w.sum_dy.data(),
                                     w.sum_dy_centred.data(), or_null(in.scale), or_null(in.shift),
                                     dgamma.empty() ? w.sink.data() : dgamma.data(),
                                     dbeta.empty() ? w.sink.data() : dbeta.data()});
}

/// The moving averages from per-(g, c) statistics averaged over the groups; `var` is taken
/// as it is (Bessel's correction applied by the caller) unless bessel_excess > 0. `sink`: the
/// workspace's, counting nothing when r.skipped is absent.
template <class Backend, class P>
void update_running(const Backend& backend, const running_statistics<P>& r, span<const P> mean,
                    span<const P> var, index_t groups, index_t channels, double momentum,
                    double bessel_excess, span<P> sink) {
  using K = kernels<Backend>;
  if (r.mean.empty()) return;
  if (r.skipped.empty()) K::for_each(backend, channels, fill_op<P>{sink.data(), P(0)});
  K::for_each(backend, channels,
              running_update_op<P, false, gain_source::unit>{
                  mean.data(), var.data(), var.data(), nullptr, groups, channels, momentum,
                  bessel_excess, r.mean.data(), r.var.data(),
                  r.skipped.empty() ? sink.data() : r.skipped.data()});
}

/// m / (m - 1) - 1 for Bessel's correction of a variance over m values, when asked.
inline double bessel_excess(bool unbiased, double count) {
  return unbiased && count > 1 ? 1.0 / (count - 1) : 0.0;
}

}  // namespace detail
BKN_END_NAMESPACE
