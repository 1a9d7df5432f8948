// SPDX-License-Identifier: MIT
// Filter response normalization with its thresholded linear unit (Singh & Krishnan 2019):
// each (sample, channel) divided by its root mean square, then max(., tau). No batch statistics.
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

/// nu2 = mean over H x W of x^2 per (sample, channel), y = gamma x / sqrt(nu2 + eps) + beta,
/// z = max(y, tau) (the TLU; optional). eps is options.epsilon, or the learned
/// options.epsilon + |learned_epsilon| (per layer or per channel), as the paper proposes for
/// 1 x 1 activations where nu2 = x^2. docs/methods/sample.md has the gradients.
namespace filter_response_norm {

struct options {
  /// eps, or its lower bound when the layer learns it. > 0. The paper's value.
  double epsilon = 1e-6;
  /// Apply the thresholded linear unit z = max(y, tau). Off: the layer outputs y.
  bool tlu = true;
  /// Scan x (and dy) on the host first and throw bkn::nonfinite_input naming the first NaN or
  /// Inf; as bkn::options::check_finite.
  bool check_finite = false;
};

/// Parameters (read). Empty gamma, beta, tau: 1, 0, 0 (with tau = 0 the TLU is a ReLU).
template <class P>
struct parameters {
  span<const P> gamma;  ///< C
  span<const P> beta;   ///< C
  span<const P> tau;    ///< C thresholds of the TLU; unused when options.tlu is off
  /// Empty: eps = options.epsilon, fixed. 1 (per layer) or C (per channel) elements:
  /// eps = options.epsilon + |learned_epsilon|, learned.
  span<const P> learned_epsilon;
};

/// Gradients, written (not accumulated) by backward; each as its parameter, or empty (not
/// computed). With the TLU off, tau's gradient is zero.
template <class P>
struct gradients {
  span<P> gamma, beta, tau, learned_epsilon;
};

/// The mean square nu2 of each (sample, channel), N * C at [n * C + c]: written by forward,
/// read by backward. Empty: forward keeps none and backward recomputes it from x.
template <class P>
struct statistics {
  span<P> nu2;
};

/// Everything one FRN layer owns, as views of the host's memory.
template <class P>
struct layer {
  parameters<P> params;
  gradients<P> grads;
  statistics<P> saved;
};

}  // namespace filter_response_norm

namespace detail {

template <class P>
struct frn_workspace {
  span<P> a, b;               // N*C coefficients of the affine passes
  span<P> zero;               // N*C zeros: the centre (FRN does not centre) and dx's k
  span<P> sum_dy, sum_dy_x;   // N*C backward sums; forward: the per-(n, c) mean and variance
  span<P> sum_dz;             // N*C sums of the TLU's incoming gradient (for tau)
  span<P> nu2;                // N*C mean squares when the caller keeps none
  span<std::byte> scratch;
};

template <class Backend, class P>
frn_workspace<P> carve_frn(workspace_arena& arena, const Backend& backend,
                           const tensor_shape& x) {
  const index_t NC = x.batch * x.channels;
  frn_workspace<P> w;
  w.a = arena.take<P>(NC);
  w.b = arena.take<P>(NC);
  w.zero = arena.take<P>(NC);
  w.sum_dy = arena.take<P>(NC);
  w.sum_dy_x = arena.take<P>(NC);
  w.sum_dz = arena.take<P>(NC);
  w.nu2 = arena.take<P>(NC);
  w.scratch = arena.take_bytes(
      kernels<Backend>::scratch_bytes(backend, x, 1, covariance::diagonal));
  return w;
}

inline void check_frn_options(const char* routine, const filter_response_norm::options& opt) {
  require(opt.epsilon > 0, routine, "options.epsilon", "expected > 0, got ", opt.epsilon);
}

template <class T, class P>
void check_frn_layer(const char* routine, const filter_response_norm::layer<P>& L,
                     const tensor_view<const T>& x) {
  const index_t C = x.channels();
  const filter_response_norm::parameters<P>& p = L.params;
  check_optional(routine, "params.gamma", p.gamma.size(), C, "one per channel");
  check_optional(routine, "params.beta", p.beta.size(), C, "one per channel");
  check_optional(routine, "params.tau", p.tau.size(), C, "one per channel");
  const index_t eps = p.learned_epsilon.size();
  require(eps == 0 || eps == 1 || eps == C, routine, "params.learned_epsilon",
          "expected none (fixed epsilon), 1 (per layer) or ", C, " (per channel) elements, got ",
          eps);
  check_optional(routine, "saved.nu2", L.saved.nu2.size(), x.batch() * C,
                 "one per sample and channel");
}

/// eps of channel c: options.epsilon, plus |learned| when learned.
template <class P>
BKN_HOST_DEVICE inline double frn_epsilon(double epsilon, const P* learned, index_t count,
                                          index_t c) {
  using std::fabs;
  return learned ? epsilon + fabs(double(learned[count == 1 ? 0 : c])) : epsilon;
}

/// Per (n, c), from the moments of x: nu2 = var + mean^2 (both non-negative: no cancellation),
/// stored rounded, so that forward and backward see the same value.
template <class P>
struct frn_mean_square_op {
  const P *mean, *var;
  P* nu2;
  BKN_HOST_DEVICE void operator()(index_t i) const {
    const double m = double(mean[i]);
    nu2[i] = P(double(var[i]) + m * m);
  }
};

/// Per (n, c): y = a x + k with a = gamma / sqrt(nu2 + eps), k = beta; zero[i] = 0.
template <class P>
struct frn_coefficients_op {
  const P *gamma, *beta, *learned, *nu2;
  index_t learned_count, channels;
  double epsilon;
  P *a, *k, *zero;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const index_t c = i % channels;
    const double eps = frn_epsilon(epsilon, learned, learned_count, c);
    a[i] = P((gamma ? double(gamma[c]) : 1.0) / sqrt(double(nu2[i]) + eps));
    k[i] = beta ? beta[c] : P(0);
    zero[i] = P(0);
  }
};

/// z = max(y, tau) in place, per element. A NaN y stays NaN.
template <class T, class P>
struct frn_threshold_op {
  tensor_view<T> y;
  const P* tau;  // null: 0
  bool channels_last;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const element_position p = element_at(y.shape(), channels_last, i);
    const T t = tau ? T(tau[p.c]) : T(0);
    T& v = y(p.n, p.c, p.h, p.w);
    if (v < t) v = t;
  }
};

/// Per element, the TLU's backward: dx = dz where y >= tau (the gradient goes to y at a tie,
/// as TensorFlow's maximum does), else 0. y is recomputed in double and rounded to T, as the
/// reference backend's affine pass computes it.
template <class T, class P>
struct frn_mask_op {
  tensor_view<const T> x, dz;
  tensor_view<T> dx;
  const P *a, *k, *tau;
  bool channels_last;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    const element_position p = element_at(x.shape(), channels_last, i);
    const index_t nc = p.n * x.channels() + p.c;
    const T y = T(double(a[nc]) * double(x(p.n, p.c, p.h, p.w)) + double(k[nc]));
    const T t = tau ? T(tau[p.c]) : T(0);
    const T g = dz(p.n, p.c, p.h, p.w);
    dx(p.n, p.c, p.h, p.w) = y >= t ? g : T(0);
  }
};

/// Per (n, c): dx = a dy + b x with dy the gradient reaching y, b = -gamma r^3 sum(dy x) / m.
template <class P>
struct frn_backward_op {
  const P *gamma, *learned, *nu2, *sum_dy_x;
  index_t learned_count, channels;
  double epsilon, count;
  P* b;

  BKN_HOST_DEVICE void operator()(index_t i) const {
    using std::sqrt;
    const index_t c = i % channels;
    const double r = 1.0 / sqrt(double(nu2[i]) + frn_epsilon(epsilon, learned, learned_count, c));
    b[i] = P(-(gamma ? double(gamma[c]) : 1.0) * r * r * r * double(sum_dy_x[i]) / count);
  }
};

/// Per channel, summed over the samples in order: dgamma = sum r sum(dy x), dbeta = sum dy,
/// dtau = sum dz - sum dy (what the TLU sent to tau), and a per-channel learned eps's gradient
/// sign(l) sum -gamma r^3 sum(dy x) / 2 (sign(0) = 0).
template <class P>
struct frn_parameter_gradients_op {
  const P *gamma, *learned, *nu2, *sum_dy, *sum_dy_x, *sum_dz;  // sum_dz null: no tau gradient
  index_t learned_count, batch, channels;
  double epsilon;
  P *dgamma, *dbeta, *dtau, *dlearned;  // null: not wanted (dlearned: per channel only)

  BKN_HOST_DEVICE void operator()(index_t c) const {
    using std::sqrt;
    const double gam = gamma ? double(gamma[c]) : 1.0;
    const double eps = frn_epsilon(epsilon, learned, learned_count, c);
    double sg = 0, sb = 0, st = 0, se = 0;
    for (index_t n = 0; n < batch; ++n) {
      const index_t i = n * channels + c;
      const double r = 1.0 / sqrt(double(nu2[i]) + eps);
      sg += r * double(sum_dy_x[i]);
      sb += double(sum_dy[i]);
      if (sum_dz) st += double(sum_dz[i]) - double(sum_dy[i]);
      se += -0.5 * gam * r * r * r * double(sum_dy_x[i]);
    }
    if (dgamma) dgamma[c] = P(sg);
    if (dbeta) dbeta[c] = P(sb);
    if (dtau) dtau[c] = P(st);
    if (dlearned) {
      const double l = double(learned[c]);
      dlearned[c] = P(l > 0 ? se : l < 0 ? -se : 0.0);
    }
  }
};

/// A per-layer learned eps's gradient: the sum over every (n, c), in order.
template <class P>
struct frn_scalar_epsilon_gradient_op {
  const P *gamma, *learned, *nu2, *sum_dy_x;
  index_t batch, channels;
  double epsilon;
  P* dlearned;

  BKN_HOST_DEVICE void operator()(index_t) const {
    using std::sqrt;
    const double l = double(learned[0]);
    const double eps = frn_epsilon(epsilon, learned, 1, 0);
    double se = 0;
    for (index_t i = 0; i < batch * channels; ++i) {
      const double r = 1.0 / sqrt(double(nu2[i]) + eps);
      se += -0.5 * (gamma ? double(gamma[i % channels]) : 1.0) * r * r * r * double(sum_dy_x[i]);
    }
    dlearned[0] = P(l > 0 ? se : l < 0 ? -se : 0.0);
  }
};

template <class Backend, class P>
frn_workspace<P> carve_frn_checked(const char* routine, const Backend& backend,
                                   const tensor_shape& x, span<std::byte> workspace) {
  workspace_arena measure;
  carve_frn<Backend, P>(measure, backend, x);
  check_workspace(routine, workspace, measure.used());
  workspace_arena arena(workspace);
  return carve_frn<Backend, P>(arena, backend, x);
}

/// The mean squares of x into w.nu2 (using w.sum_dy and w.sum_dy_x for the moments).
template <class Backend, class T, class P>
void frn_mean_squares(const Backend& backend, tensor_view<const T> x, span<P> nu2,
                      const frn_workspace<P>& w) {
  using K = kernels<Backend>;
  K::moments(backend, x, 1, w.sum_dy, w.sum_dy_x, w.scratch);
  K::for_each(backend, x.batch() * x.channels(),
              frn_mean_square_op<P>{w.sum_dy.data(), w.sum_dy_x.data(), nu2.data()});
}

}  // namespace detail

namespace filter_response_norm {

/// Bytes of workspace forward and backward need for inputs of shape `x` (64-byte aligned
/// start; contents need no initialization).
template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x) {
  constexpr const char* routine = "bkn::filter_response_norm::workspace_size";
  detail::check_frn_options(routine, opt);
  detail::require(x.batch >= 0 && x.channels >= 0 && x.height >= 0 && x.width >= 0, routine,
                  "x", "extents must be non-negative, got (", x.batch, ", ", x.channels, ", ",
                  x.height, ", ", x.width, ")");
  detail::workspace_arena arena;
  detail::carve_frn<Backend, double>(arena, backend, x);
  return arena.used();
}

/// z = max(gamma x / sqrt(nu2 + eps) + beta, tau) (or y without the TLU), per sample and
/// channel; writes L.saved.nu2 when given. y may be the same view as x. Throws
/// bkn::invalid_argument before writing anything on an invalid argument; N = 0 changes nothing.
template <class Backend, class T, class P>
void forward(const Backend& backend, const options& opt, const layer<P>& L,
             tensor_view<const detail::nondeduced<T>> x, tensor_view<T> y,
             span<std::byte> workspace) {
  constexpr const char* routine = "bkn::filter_response_norm::forward";
  detail::check_frn_options(routine, opt);
  detail::check_view(routine, "x", x, false);
  detail::check_view(routine, "y", y, true);
  detail::check_shape(routine, "y", y, x.shape());
  detail::check_no_overlap(routine, "y", y, "x", x, true);
  detail::check_frn_layer(routine, L, x);
  if (x.empty()) return;
  const auto w = detail::carve_frn_checked<Backend, P>(routine, backend, x.shape(), workspace);
  if (opt.check_finite) detail::check_finite(routine, "x", x);

  using K = kernels<Backend>;
  const index_t C = x.channels(), NC = x.batch() * C;
  const parameters<P>& p = L.params;
  const span<P> nu2 = L.saved.nu2.empty() ? w.nu2 : L.saved.nu2;
  detail::frn_mean_squares(backend, x, nu2, w);
  K::for_each(backend, NC,
              detail::frn_coefficients_op<P>{
                  p.gamma.empty() ? nullptr : p.gamma.data(),
                  p.beta.empty() ? nullptr : p.beta.data(),
                  p.learned_epsilon.empty() ? nullptr : p.learned_epsilon.data(), nu2.data(),
                  p.learned_epsilon.size(), C, opt.epsilon, w.a.data(), w.b.data(),
                  w.zero.data()});
  K::affine(backend, y, x, span<const P>(w.a), span<const P>(w.zero), tensor_view<const T>(),
            span<const P>(), span<const P>(w.b), 1);
  if (opt.tlu)
    K::for_each(backend, x.shape().elements(),
                detail::frn_threshold_op<T, P>{y, p.tau.empty() ? nullptr : p.tau.data(),
                                               detail::walk_channels_last(y)});
}

/// dx, and L.grads' non-empty spans (written, not accumulated), from x, dy (the gradient of the
/// layer's output) and L.saved (or, if empty, nu2 recomputed from x). dx may be the same view
/// as dy, never x.
template <class Backend, class T, class P>
void backward(const Backend& backend, const options& opt, const layer<P>& L,
              tensor_view<const detail::nondeduced<T>> x,
              tensor_view<const detail::nondeduced<T>> dy, tensor_view<T> dx,
              span<std::byte> workspace) {
  constexpr const char* routine = "bkn::filter_response_norm::backward";
  detail::check_frn_options(routine, opt);
  detail::check_view(routine, "x", x, false);
  detail::check_view(routine, "dy", dy, false);
  detail::check_view(routine, "dx", dx, true);
  detail::check_shape(routine, "dy", dy, x.shape());
  detail::check_shape(routine, "dx", dx, x.shape());
  detail::check_no_overlap(routine, "dx", dx, "x", x, false);
  detail::check_no_overlap(routine, "dx", dx, "dy", dy, true);
  detail::check_frn_layer(routine, L, x);
  const parameters<P>& p = L.params;
  const gradients<P>& d = L.grads;
  const index_t C = x.channels();
  detail::check_optional(routine, "grads.gamma", d.gamma.size(), C, "one per channel");
  detail::check_optional(routine, "grads.beta", d.beta.size(), C, "one per channel");
  detail::check_optional(routine, "grads.tau", d.tau.size(), C, "one per channel");
  detail::check_optional(routine, "grads.learned_epsilon", d.learned_epsilon.size(),
                         p.learned_epsilon.size(), "as params.learned_epsilon");
  if (x.empty()) return;
  const auto w = detail::carve_frn_checked<Backend, P>(routine, backend, x.shape(), workspace);
  if (opt.check_finite) {
    detail::check_finite(routine, "x", x);
    detail::check_finite(routine, "dy", dy);
  }

  using K = kernels<Backend>;
  const index_t N = x.batch(), NC = N * C;
  const P* gamma = p.gamma.empty() ? nullptr : p.gamma.data();
  const P* learned = p.learned_epsilon.empty() ? nullptr : p.learned_epsilon.data();
  const P* tau = p.tau.empty() ? nullptr : p.tau.data();
  auto or_null = [](span<P> v) { return v.empty() ? nullptr : v.data(); };
  span<const P> nu2 = L.saved.nu2;
  if (nu2.empty()) {
    detail::frn_mean_squares(backend, x, w.nu2, w);
    nu2 = w.nu2;
  }
  // a = gamma r and b = beta: y's coefficients, for the TLU's mask.
  K::for_each(backend, NC,
              detail::frn_coefficients_op<P>{gamma, p.beta.empty() ? nullptr : p.beta.data(),
                                             learned, nu2.data(), p.learned_epsilon.size(), C,
                                             opt.epsilon, w.a.data(), w.b.data(),
                                             w.zero.data()});
  const bool tau_gradient = opt.tlu && !d.tau.empty();
  if (tau_gradient)  // before the mask overwrites dy when dx is dy
    K::sums(backend, dy, x, span<const P>(w.zero), 1, w.sum_dz, w.sum_dy_x, w.scratch);
  tensor_view<const T> dy_of_y = dy;  // the gradient reaching y = gamma x r + beta
  if (opt.tlu) {
    K::for_each(backend, x.shape().elements(),
                detail::frn_mask_op<T, P>{x, dy, dx, w.a.data(), w.b.data(), tau,
                                          detail::walk_channels_last(dx)});
    dy_of_y = dx;
  }
  K::sums(backend, dy_of_y, x, span<const P>(w.zero), 1, w.sum_dy, w.sum_dy_x, w.scratch);
  K::for_each(backend, NC,
              detail::frn_backward_op<P>{gamma, learned, nu2.data(), w.sum_dy_x.data(),
                                         p.learned_epsilon.size(), C, opt.epsilon,
                                         double(x.spatial()), w.b.data()});
  K::affine(backend, dx, x, span<const P>(w.b), span<const P>(w.zero), dy_of_y,
            span<const P>(w.a), span<const P>(w.zero), 1);

  const bool per_channel_eps = p.learned_epsilon.size() == C && C > 1;
  if (!d.gamma.empty() || !d.beta.empty() || !d.tau.empty() ||
      (per_channel_eps && !d.learned_epsilon.empty()))
    K::for_each(backend, C,
                detail::frn_parameter_gradients_op<P>{
                    gamma, learned, nu2.data(), w.sum_dy.data(), w.sum_dy_x.data(),
                    tau_gradient ? w.sum_dz.data() : nullptr, p.learned_epsilon.size(), N, C,
                    opt.epsilon, or_null(d.gamma), or_null(d.beta), or_null(d.tau),
                    per_channel_eps ? or_null(d.learned_epsilon) : nullptr});
  if (!d.learned_epsilon.empty() && !per_channel_eps)
    K::for_each(backend, 1,
                detail::frn_scalar_epsilon_gradient_op<P>{gamma, learned, nu2.data(),
                                                          w.sum_dy_x.data(), N, C, opt.epsilon,
                                                          d.learned_epsilon.data()});
}

}  // namespace filter_response_norm

BKN_END_NAMESPACE
