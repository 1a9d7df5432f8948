// SPDX-License-Identifier: MIT
// Group normalization (Wu & He 2018) and its two special cases by name: layer normalization
// (one group) and instance normalization (one channel per group). Per-sample statistics only.
#pragma once

#include <cmath>
#include <cstddef>

#include "bkn/backend.hpp"
#include "bkn/error.hpp"
#include "bkn/methods/detail/sample_statistics.hpp"
#include "bkn/span.hpp"
#include "bkn/tensor.hpp"
#include "bkn/workspace.hpp"

BKN_BEGIN_NAMESPACE

/// y = gamma (x - mu) / sqrt(var + eps) + beta, with mu and var the mean and biased variance of
/// each sample's group of C/G consecutive channels over all their H x W values. Nothing depends
/// on other samples, so training and inference run the same math and there are no running
/// statistics. docs/methods/sample.md has the formulas and the backward pass.
namespace group_norm {

struct options {
  /// G: each sample's C channels form G groups of C / G consecutive channels. Must divide C.
  /// 32 is Wu & He's default; 1 is layer normalization, C instance normalization.
  index_t groups = 32;
  /// Added to the variance before the square root. > 0. PyTorch's default.
  double epsilon = 1e-5;
  /// Scan x (and dy) on the host first and throw bkn::nonfinite_input naming the first NaN or
  /// Inf; as bkn::options::check_finite.
  bool check_finite = false;
};

/// Per-channel affine parameters (read). Empty: gamma = 1, beta = 0.
template <class P>
struct parameters {
  span<const P> gamma;  ///< C
  span<const P> beta;   ///< C
};

/// Gradients of the parameters, written (not accumulated) by backward. Empty: not computed.
template <class P>
struct gradients {
  span<P> gamma, beta;
};

/// Each sample's group statistics, N * G each at [n * G + g]: written by forward, read by
/// backward. Empty: forward keeps none and backward recomputes them from x (one more pass).
template <class P>
struct statistics {
  span<P> mean;
  span<P> var;  ///< biased
};

/// Everything one group-normalized layer owns, as views of the host's memory.
template <class P>
struct layer {
  parameters<P> params;
  gradients<P> grads;
  statistics<P> saved;
};

}  // namespace group_norm

namespace detail {

/// The arrays group normalization carves from its workspace.
template <class P>
struct group_norm_workspace {
  span<P> a, b, k, centre;          // N*C coefficients of the affine pass, per (n, c)
  span<P> sum_dy, sum_dy_centred;   // N*C backward sums; forward: per-channel moments (fallback)
  span<P> mean, var;                // N*G statistics when the caller keeps none
  span<std::byte> scratch;
};

template <class Backend, class P>
group_norm_workspace<P> carve_group_norm(workspace_arena& arena, const Backend& backend,
                                         const tensor_shape& x, index_t groups) {
  const index_t NC = x.batch * x.channels, NG = x.batch * groups;
  group_norm_workspace<P> w;
  w.a = arena.take<P>(NC);
  w.b = arena.take<P>(NC);
  w.k = arena.take<P>(NC);
  w.centre = arena.take<P>(NC);
  w.sum_dy = arena.take<P>(NC);
  w.sum_dy_centred = arena.take<P>(NC);
  w.mean = arena.take<P>(NG);
  w.var = arena.take<P>(NG);
  w.scratch = arena.take_bytes(sample_scratch_bytes(backend, x, groups));
  return w;
}

inline void check_group_norm_options(const char* routine, double epsilon, index_t groups) {
  require(epsilon > 0, routine, "options.epsilon", "expected > 0, got ", epsilon);
  require(groups >= 1, routine, "options.groups", "expected >= 1, got ", groups);
}

inline void check_group_norm_groups(const char* routine, index_t groups, index_t channels) {
  require(channels % groups == 0, routine, "options.groups",
          "expected a divisor of the channel count ", channels, ", got ", groups);
}

/// Checks shared by forward and backward, after the views: groups, parameters, statistics,
/// and that each group pools more than one value.
template <class T, class P>
void check_group_norm_layer(const char* routine, index_t groups, const group_norm::layer<P>& L,
                            const tensor_view<const T>& x) {
  const index_t C = x.channels(), NG = x.batch() * groups;
  check_group_norm_groups(routine, groups, C);
  check_optional(routine, "params.gamma", L.params.gamma.size(), C, "one per channel");
  check_optional(routine, "params.beta", L.params.beta.size(), C, "one per channel");
  check_optional(routine, "saved.mean", L.saved.mean.size(), NG, "one per sample and group");
  check_optional(routine, "saved.var", L.saved.var.size(), NG, "one per sample and group");
  require(L.saved.mean.empty() == L.saved.var.empty(), routine, "saved",
          "mean and var must be given together");
  require(x.empty() || C / groups * x.spatial() > 1, routine, "x",
          "one value per sample and group (", C / groups, " channel(s) per group, ",
          x.shape().height, "x", x.shape().width,
          " pixels): its statistics carry no information; use fewer groups or larger images");
}

/// Per (n, c): y = a (x - centre) + k with a = gamma / sqrt(var + eps), centre = the group's
/// mean, k = beta.
template <class P>
struct group_norm_forward_op {
  const P *gamma, *beta, *mean, *var;
  index_t channels, per_group;
  double epsilon;
  P *a, *centre, *k;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const index_t c = i % channels, group = i / per_group;  // n * G + g
    a[i] = P((gamma ? double(gamma[c]) : 1.0) / sqrt(double(var[group]) + epsilon));
    centre[i] = mean[group];
    k[i] = beta ? beta[c] : P(0);
  }
};

/// Per (n, c): its group's mean, the centre of backward's sums and affine passes.
template <class P>
struct group_norm_centre_op {
  const P* mean;
  index_t per_group;
  P* centre;
  BKN_HOST_DEVICE void operator()(index_t i) const { centre[i] = mean[i / per_group]; }
};

/// Per (sample, group), from the per-(n, c) sums of dy and dy (x - mu): the coefficients of
/// dx = a dy + b (x - mu) + k for the group's channels, with r = 1 / sqrt(var + eps), m values,
/// a = gamma r, b = -r^3 / m sum gamma dy (x - mu), k = -r / m sum gamma dy.
template <class P>
struct group_norm_backward_op {
  const P *gamma, *var, *sum_dy, *sum_dy_centred;
  index_t channels, per_group;
  double count, epsilon;
  P *a, *b, *k;

  BKN_HOST_DEVICE void operator()(index_t group) const {
    using std::sqrt;
    const index_t first = group * per_group;  // (n, g * C/G) at n * C + g * C/G
    const index_t c0 = first % channels;
    const double r = 1.0 / sqrt(double(var[group]) + epsilon);
    double s_dy = 0, s_centred = 0;
    for (index_t j = 0; j < per_group; ++j) {
      const double gam = gamma ? double(gamma[c0 + j]) : 1.0;
      s_dy += gam * double(sum_dy[first + j]);
      s_centred += gam * double(sum_dy_centred[first + j]);
    }
    const P coefficient_b = P(-r * r * r * s_centred / count);
    const P coefficient_k = P(-r * s_dy / count);
    for (index_t j = 0; j < per_group; ++j) {
      a[first + j] = P((gamma ? double(gamma[c0 + j]) : 1.0) * r);
      b[first + j] = coefficient_b;
      k[first + j] = coefficient_k;
    }
  }
};

/// Per channel: dgamma = sum_n r sum dy (x - mu), dbeta = sum_n sum dy, in sample order.
template <class P>
struct group_norm_parameter_gradients_op {
  const P *var, *sum_dy, *sum_dy_centred;
  index_t batch, channels, per_group;
  double epsilon;
  P *dgamma, *dbeta;  // null: not wanted

  BKN_HOST_DEVICE void operator()(index_t c) const {
    using std::sqrt;
    const index_t groups = channels / per_group, g = c / per_group;
    double sg = 0, sb = 0;
    for (index_t n = 0; n < batch; ++n) {
      const index_t i = n * channels + c;
      sg += double(sum_dy_centred[i]) / sqrt(double(var[n * groups + g]) + epsilon);
      sb += double(sum_dy[i]);
    }
    if (dgamma) dgamma[c] = P(sg);
    if (dbeta) dbeta[c] = P(sb);
  }
};

template <class Backend>
std::size_t group_norm_workspace_size(const char* routine, const Backend& backend,
                                      double epsilon, index_t groups, const tensor_shape& x) {
  check_group_norm_options(routine, epsilon, groups);
  require(x.batch >= 0 && x.channels >= 0 && x.height >= 0 && x.width >= 0, routine, "x",
          "extents must be non-negative, got (", x.batch, ", ", x.channels, ", ", x.height, ", ",
          x.width, ")");
  check_group_norm_groups(routine, groups, x.channels);
  workspace_arena arena;
  carve_group_norm<Backend, double>(arena, backend, x, groups);
  return arena.used();
}

template <class Backend, class T, class P>
void group_norm_forward(const char* routine, const Backend& backend, double epsilon,
                        index_t groups, bool finite_check, const group_norm::layer<P>& L,
                        tensor_view<const T> x, tensor_view<T> y, span<std::byte> workspace) {
  check_group_norm_options(routine, epsilon, groups);
  check_view(routine, "x", x, false);
  check_view(routine, "y", y, true);
  check_shape(routine, "y", y, x.shape());
  check_no_overlap(routine, "y", y, "x", x, true);
  check_group_norm_layer(routine, groups, L, x);
  if (x.empty()) return;
  workspace_arena measure;
  carve_group_norm<Backend, P>(measure, backend, x.shape(), groups);
  check_workspace(routine, workspace, measure.used());
  workspace_arena arena(workspace);
  const auto w = carve_group_norm<Backend, P>(arena, backend, x.shape(), groups);
  if (finite_check) check_finite(routine, "x", x);

  using K = kernels<Backend>;
  const index_t N = x.batch(), C = x.channels();
  const bool keep = !L.saved.mean.empty();
  const span<P> mean = keep ? L.saved.mean : w.mean, var = keep ? L.saved.var : w.var;
  sample_moments(backend, x, groups, mean, var, w.sum_dy, w.sum_dy_centred, w.scratch);
  K::for_each(backend, N * C,
              group_norm_forward_op<P>{L.params.gamma.empty() ? nullptr : L.params.gamma.data(),
                                       L.params.beta.empty() ? nullptr : L.params.beta.data(),
                                       mean.data(), var.data(), C, C / groups, epsilon,
                                       w.a.data(), w.centre.data(), w.k.data()});
  K::affine(backend, y, x, span<const P>(w.a), span<const P>(w.centre), tensor_view<const T>(),
            span<const P>(), span<const P>(w.k), 1);
}

template <class Backend, class T, class P>
void group_norm_backward(const char* routine, const Backend& backend, double epsilon,
                         index_t groups, bool finite_check, const group_norm::layer<P>& L,
                         tensor_view<const T> x, tensor_view<const T> dy, tensor_view<T> dx,
                         span<std::byte> workspace) {
  check_group_norm_options(routine, epsilon, groups);
  check_view(routine, "x", x, false);
  check_view(routine, "dy", dy, false);
  check_view(routine, "dx", dx, true);
  check_shape(routine, "dy", dy, x.shape());
  check_shape(routine, "dx", dx, x.shape());
  check_no_overlap(routine, "dx", dx, "x", x, false);
  check_no_overlap(routine, "dx", dx, "dy", dy, true);
  check_group_norm_layer(routine, groups, L, x);
  const index_t C = x.channels();
  check_optional(routine, "grads.gamma", L.grads.gamma.size(), C, "one per channel");
  check_optional(routine, "grads.beta", L.grads.beta.size(), C, "one per channel");
  if (x.empty()) return;
  workspace_arena measure;
  carve_group_norm<Backend, P>(measure, backend, x.shape(), groups);
  check_workspace(routine, workspace, measure.used());
  workspace_arena arena(workspace);
  const auto w = carve_group_norm<Backend, P>(arena, backend, x.shape(), groups);
  if (finite_check) {
    check_finite(routine, "x", x);
    check_finite(routine, "dy", dy);
  }

  using K = kernels<Backend>;
  const index_t N = x.batch(), per_group = C / groups;
  const P* gamma = L.params.gamma.empty() ? nullptr : L.params.gamma.data();
  span<const P> mean = L.saved.mean, var = L.saved.var;
  if (L.saved.mean.empty()) {
    // a and b are free until the coefficients below.
    sample_moments(backend, x, groups, w.mean, w.var, w.a, w.b, w.scratch);
    mean = w.mean;
    var = w.var;
  }
  K::for_each(backend, N * C, group_norm_centre_op<P>{mean.data(), per_group, w.centre.data()});
  K::sums(backend, dy, x, span<const P>(w.centre), 1, w.sum_dy, w.sum_dy_centred, w.scratch);
  K::for_each(backend, N * groups,
              group_norm_backward_op<P>{gamma, var.data(), w.sum_dy.data(),
                                        w.sum_dy_centred.data(), C, per_group,
                                        double(per_group * x.spatial()), epsilon, w.a.data(),
                                        w.b.data(), w.k.data()});
  // dx = b (x - mu) + a dy + k: the centred term first, in the element type.
  K::affine(backend, dx, x, span<const P>(w.b), span<const P>(w.centre), dy, span<const P>(w.a),
            span<const P>(w.k), 1);
  if (!L.grads.gamma.empty() || !L.grads.beta.empty())
    K::for_each(backend, C,
                group_norm_parameter_gradients_op<P>{
                    var.data(), w.sum_dy.data(), w.sum_dy_centred.data(), N, C, per_group,
                    epsilon, L.grads.gamma.empty() ? nullptr : L.grads.gamma.data(),
                    L.grads.beta.empty() ? nullptr : L.grads.beta.data()});
}

}  // namespace detail

namespace group_norm {

/// Bytes of workspace forward and backward need for inputs of shape `x` (64-byte aligned
/// start; contents need no initialization).
template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  return detail::group_norm_workspace_size("bkn::group_norm::workspace_size", backend,
                                           opt.epsilon, opt.groups, x);
}

/// y = gamma (x - mu) / sqrt(var + eps) + beta per sample and channel group; writes
/// L.saved when given. y may be the same view as x. Throws bkn::invalid_argument before
/// writing anything on an invalid argument; N = 0 changes nothing. Asynchronous on backends
/// with a stream.
template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  detail::group_norm_forward("bkn::group_norm::forward", backend, opt.epsilon, opt.groups,
                             opt.check_finite, L, x, y, workspace);
}

/// dx, and L.grads' non-empty spans (written, not accumulated), from x, dy and L.saved (or, if
/// empty, statistics recomputed from x). dx may be the same view as dy, never x.
template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  detail::group_norm_backward("bkn::group_norm::backward", backend, opt.epsilon, opt.groups,
                              opt.check_finite, L, x, dy, dx, workspace);
}

}  // namespace group_norm

/// Layer normalization (Ba et al. 2016) of an (N, C, H, W) tensor: each sample normalized over
/// all its C * H * W values, i.e. group normalization with one group, with a per-channel
/// affine. PyTorch's nn.LayerNorm([C, H, W]) has an elementwise affine over (C, H, W) instead:
/// the two agree without an affine, and for NC tensors (H = W = 1) always; a host that wants
/// PyTorch's C*H*W weights runs this without gamma and beta and applies its own afterwards
/// (docs/methods/sample.md). Saved statistics hold N values.
namespace layer_norm {

struct options {
  double epsilon = 1e-5;  ///< > 0
  bool check_finite = false;
};

template <class P>
using layer = group_norm::layer<P>;

template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  return detail::group_norm_workspace_size("bkn::layer_norm::workspace_size", backend,
                                           opt.epsilon, 1, x);
}

template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  detail::group_norm_forward("bkn::layer_norm::forward", backend, opt.epsilon, 1,
                             opt.check_finite, L, x, y, workspace);
}

template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  detail::group_norm_backward("bkn::layer_norm::backward", backend, opt.epsilon, 1,
                              opt.check_finite, L, x, dy, dx, workspace);
}

}  // namespace layer_norm

/// Instance normalization (Ulyanov et al. 2016): each (sample, channel) normalized over its
/// H x W values, i.e. group normalization with C groups; gamma and beta per channel (PyTorch's
/// InstanceNorm2d(affine=True) without running statistics). Needs H * W > 1. Saved statistics
/// hold N * C values.
namespace instance_norm {

struct options {
  double epsilon = 1e-5;  ///< > 0
  bool check_finite = false;
};

template <class P>
using layer = group_norm::layer<P>;

template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  return detail::group_norm_workspace_size("bkn::instance_norm::workspace_size", backend,
                                           opt.epsilon, x.channels > 0 ? x.channels : 1, x);
}

template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  detail::group_norm_forward("bkn::instance_norm::forward", backend, opt.epsilon,
                             x.channels() > 0 ? x.channels() : 1, opt.check_finite, L, x, y,
                             workspace);
}

template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  detail::group_norm_backward("bkn::instance_norm::backward", backend, opt.epsilon,
                              x.channels() > 0 ? x.channels() : 1, opt.check_finite, L, x, dy,
                              dx, workspace);
}

}  // namespace instance_norm

BKN_END_NAMESPACE
