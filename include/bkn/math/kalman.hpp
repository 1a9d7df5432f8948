// SPDX-License-Identifier: MIT
// The per-channel BKN math of the paper's Eq. 3-6 in diagonal mode, forward and backward,
// as host/device functions over scalars. Every backend calls these; see docs/math.md.
#pragma once

#include <cmath>

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE
namespace math {

/// q = sigmoid(theta), computed without overflow for any finite theta.
template <class A>
BKN_HOST_DEVICE inline A sigmoid(A theta) {
  using std::exp;
  if (theta >= A(0)) return A(1) / (A(1) + exp(-theta));
  const A e = exp(theta);
  return e / (A(1) + e);
}

/// r = softplus(rho) = log(1 + exp(rho)) > 0, without overflow; its derivative is sigmoid(rho).
template <class A>
BKN_HOST_DEVICE inline A softplus(A rho) {
  using std::exp;
  using std::log1p;
  return (rho > A(0) ? rho : A(0)) + log1p(exp(rho > A(0) ? -rho : rho));
}

/// A Gaussian estimate of one channel: mean and variance.
template <class A>
struct moments {
  A mean;
  A var;
};

/// Eq. 5's update in diagonal mode: the mean and variance of the mixture
/// p N(predicted) + q N(observed), p = 1 - q. Needs 0 <= q <= 1.
template <class A>
BKN_HOST_DEVICE inline moments<A> kalman_update(moments<A> predicted, moments<A> observed,
                                                A q) {
  const A p = A(1) - q;
  const A d = observed.mean - predicted.mean;
  return {p * predicted.mean + q * observed.mean,
          p * predicted.var + q * observed.var + p * q * d * d};
}

/// The per-channel inputs of the diagonal-mode backward for one (group, channel).
template <class A>
struct diag_backward_in {
  A count;           ///< m: values pooled per channel in the group (n * H * W)
  A q;               ///< gain
  A gamma;           ///< scale (1 when the layer has no affine parameters)
  A epsilon;         ///< added to the posterior variance before the square root
  moments<A> observed, predicted, posterior;
  A sum_dy;          ///< sum_i dy_i
  A sum_dy_centred;  ///< sum_i dy_i (x_i - posterior.mean)
  A dmean_out;       ///< dl/dmu of this layer's posterior from the next layer's predict
  A dvar_out;        ///< dl/dSigma (diagonal) of this layer's posterior, likewise
};

/// What the diagonal-mode backward yields for one (group, channel):
/// dx = a dy + b (x - posterior.mean) + k.
template <class A>
struct diag_backward_out {
  A a, b, k;
  A dgamma, dbeta;
  A dq;
  A dmean_predicted, dvar_predicted;
};

/// The complete gradient of `math.md` ("Backward, diag mode"), including the terms Eq. 6 of
/// the paper omits: the prior's mean and variance receive gradients, and dq has the d term.
template <class A>
BKN_HOST_DEVICE inline diag_backward_out<A> kalman_backward(const diag_backward_in<A>& in) {
  using std::sqrt;
  const A q = in.q;
  const A p = A(1) - q;
  const A inv_sigma = A(1) / sqrt(in.posterior.var + in.epsilon);
  const A d = in.observed.mean - in.predicted.mean;

  diag_backward_out<A> out{};
  out.dgamma = in.sum_dy_centred * inv_sigma;
  out.dbeta = in.sum_dy;
  const A dmean = in.dmean_out - in.gamma * in.sum_dy * inv_sigma;
  const A dvar =
      in.dvar_out - A(0.5) * in.gamma * in.sum_dy_centred * inv_sigma * inv_sigma * inv_sigma;
  out.a = in.gamma * inv_sigma;
  out.b = A(2) * q * dvar / in.count;
  out.k = q * dmean / in.count;
  out.dq = dvar * (in.observed.var - in.predicted.var + (A(1) - A(2) * q) * d * d) + dmean * d;
  out.dmean_predicted = p * (dmean - A(2) * q * d * dvar);
  out.dvar_predicted = p * dvar;
  return out;
}

}  // namespace math
BKN_END_NAMESPACE
