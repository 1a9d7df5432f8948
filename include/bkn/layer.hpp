// SPDX-License-Identifier: MIT
// layer: views of all the memory one normalized layer owns (parameters, gradients, moving
// averages, the per-batch Gaussian states), and the one workspace layout its routines share.
#pragma once

#include <cstddef>

#include "bkn/backend.hpp"
#include "bkn/gaussian.hpp"
#include "bkn/options.hpp"
#include "bkn/transition.hpp"
#include "bkn/workspace.hpp"

BKN_BEGIN_NAMESPACE

/// Learned parameters of a layer (read). Optional ones may be empty.
template <class P>
struct parameters {
  span<const P> gamma;       ///< C scales; empty: 1
  span<const P> beta;        ///< C shifts; empty: 0
  span<const P> gain_logit;  ///< 1 (per layer) or C (per channel, diagonal mode): q = sigmoid(.)
  bkn::transition<P> transition;  ///< A of Eq. 3
  span<const P> noise;       ///< C; the process noise R = diag(softplus(noise)); empty: R = 0
};

/// Gradients of the loss w.r.t. the parameters, written (not accumulated) by backward.
/// An empty span is not computed.
template <class P>
struct gradients {
  span<P> gamma, beta, gain_logit, noise;
  /// A dense or diagonal A's gradient is written; the host layer's weights and bias (a weights
  /// transition) get it added to their own gradient.
  span<P> transition, transition_bias;
};

/// Moving averages used at inference (C each), updated by a training forward. May be empty in
/// training (then nothing is tracked).
template <class P>
struct running_statistics {
  span<P> mean;
  span<P> var;
  /// Optional, C: a training forward adds 1 for each channel whose update it skipped because
  /// the batch's estimate was NaN or Inf, or beyond P's range (the moving averages are then
  /// left as they were).
  span<P> skipped;
};

/// The per-batch Gaussian estimates of one layer, G groups x C channels each. forward writes
/// observed, predicted and posterior; backward reads them. The posterior is the prior of the
/// next layer; `dposterior` is the gradient w.r.t. it, written by the NEXT layer's backward
/// (leave it empty on the last layer).
template <class P>
struct layer_state {
  gaussian_view<P> observed;   ///< xbar and S of the batch (Eq. 5's inputs)
  gaussian_view<P> predicted;  ///< mu and Sigma of the layer conditioned on the previous one
  gaussian_view<P> posterior;  ///< the fused estimate the layer normalizes with
  gaussian_view<P> dposterior;
};

/// Everything a normalized layer owns, as views into the host's memory.
template <class P>
struct layer {
  parameters<P> params;
  gradients<P> grads;
  running_statistics<P> running;
  layer_state<P> state;
};

namespace detail {

/// The arrays bkn's routines carve from the workspace. One layout serves forward, backward and
/// every step, so a host sizes a layer's workspace once.
template <class P>
struct layer_workspace {
  span<P> var;                          // G*C observed variances (full mode)
  span<P> a, b, k;                      // G*C coefficients of the tensor passes
  span<P> sum_dy, sum_dy_centred;       // G*C backward reductions
  span<P> dq;                           // G*C partial gradients of q
  span<P> dmean_predicted, dcov_predicted;
  span<P> dmean;                        // G*C total gradient of the posterior mean
  span<P> matrix, product, product2;    // full mode: G*C*C and G*C*max(C,C') temporaries
  span<P> gain, gain_slope;             // G*C effective gains and dq/dtheta
  span<P> skip;                         // G flags of the fusion skip rule
  span<P> sink;                         // C: optional outputs nobody asked for (branch-free loops)
  span<double> carry;                   // 4*C: group sums carried from one chunk to the next
  span<P> act_mean, act_var;            // G*C' moments of the activation (weights transition)
  span<P> tap_mean, tap_var;            // G*C*T moments of each tap's share of the output
  span<P> tap_dmean, tap_dvar;          // G*C*T their gradients
  span<P> class_dmean, class_dvar;      // G*K*C gradients of the border classes' moments
  span<std::byte> scratch;              // the backend's own
};

template <class Backend, class P, class Q>
layer_workspace<P> carve_workspace(workspace_arena& arena, const Backend& backend,
                                   const options& opt, const tensor_shape& x,
                                   index_t group_size, const transition<Q>& A,
                                   const char* routine = "bkn::workspace_size") {
  const index_t C = x.channels;
  const index_t G = group_size > 0 ? x.batch / group_size : 0;
  const bool full = opt.mode == covariance::full;
  const index_t in_channels = A.input_channels(C) > 0 ? A.input_channels(C) : C;
  const index_t wide = C > in_channels ? C : in_channels;
  const bool through_weights = A.kind == transition_kind::weights && !full;
  // make_border_classes checks the geometry. A pointwise weights transition runs as a dense
  // one: no taps, no border classes.
  const index_t classes = through_weights ? make_border_classes(A.conv, routine).count() : 0;
  const bool through_taps = through_weights && !is_pointwise(A.conv);
  const index_t K = through_taps ? classes : 0;
  const index_t T = through_taps ? A.conv.taps() : 0;
  layer_workspace<P> w;
  w.var = arena.take<P>(full ? G * C : 0);
  w.a = arena.take<P>(G * C);
  w.b = arena.take<P>(G * C);
  w.k = arena.take<P>(G * C);
  w.sum_dy = arena.take<P>(G * C);
  w.sum_dy_centred = arena.take<P>(G * C);
  w.dq = arena.take<P>(G * C);
  w.dmean_predicted = arena.take<P>(G * C);
  w.dcov_predicted = arena.take<P>(G * covariance_elements(C, opt.mode));
  w.dmean = arena.take<P>(G * C);
  w.matrix = arena.take<P>(full ? G * C * C : 0);
  w.product = arena.take<P>(full ? G * C * wide : 0);
  w.product2 = arena.take<P>(full ? G * C * wide : 0);
  w.gain = arena.take<P>(G * C);
  w.gain_slope = arena.take<P>(G * C);
  w.skip = arena.take<P>(G);
  w.sink = arena.take<P>(C);
  w.act_mean = arena.take<P>(through_weights ? G * in_channels : 0);
  w.act_var = arena.take<P>(through_weights ? G * in_channels : 0);
  w.tap_mean = arena.take<P>(G * C * T);
  w.tap_var = arena.take<P>(G * C * T);
  w.tap_dmean = arena.take<P>(G * C * T);
  w.tap_dvar = arena.take<P>(G * C * T);
  w.class_dmean = arena.take<P>(G * K * C);
  w.class_dvar = arena.take<P>(G * K * C);
  w.scratch = arena.take_bytes(kernels<Backend>::scratch_bytes(backend, x, group_size, opt.mode));
  w.carry = arena.take<double>(4 * C);
  return w;
}

/// Full-covariance mode pushes a Gaussian through a linear map exactly; through an activation
/// or a convolution's positions it would need moments bkn does not compute.
template <class P>
void check_weight_transition_mode(const char* routine, const options& opt,
                                  const transition<P>& A) {
  require(opt.mode == covariance::diagonal || A.kind != transition_kind::weights ||
              A.is_affine_linear(),
          routine, "params.transition",
          "full-covariance mode supports a weights transition only for a linear layer without "
          "activation (activation::none, no convolution)");
}

}  // namespace detail

/// Bytes of workspace every routine of a layer with transition `A` needs for inputs of shape
/// `x` (the same for forward, backward and each step). The workspace must start at a multiple
/// of `workspace_alignment`; its contents need no initialization.
template <class Backend, class P>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x,
                           const transition<P>& A) {
  detail::check_options("bkn::workspace_size", opt);
  const index_t group_size = detail::resolve_group_size("bkn::workspace_size", opt, x.batch);
  detail::workspace_arena arena;
  detail::carve_workspace<Backend, double>(arena, backend, opt, x, group_size, A);
  return arena.used();
}

/// The same for an identity, diagonal or dense transition from `in_channels` channels (C' of a
/// dense transition; 0: C).
template <class Backend>
std::size_t workspace_size(const Backend& backend, const options& opt, const tensor_shape& x,
                           index_t in_channels = 0) {
  return workspace_size(backend, opt, x,
                        transition<double>::dense({}, in_channels > 0 ? in_channels : x.channels));
}

BKN_END_NAMESPACE
