// SPDX-License-Identifier: MIT
// The per-channel BKN math of the paper's Eq. 3-6 in diagonal mode, forward and backward,
// as host/device functions over scalars. Every backend calls these; see docs/math.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE
namespace math {

/// e^x for x <= 0 (0 below -745, NaN for NaN), to about 1 ulp, in straight-line double
/// arithmetic: a loop over channels of it vectorizes, where libm's exp is one call per value (half
/// of BKN's forward on NC 2x1024 was libm's exp and log1p). e^x = 2^k e^r with
/// r = x - k log 2 in [-log 2 / 2, log 2 / 2] (log 2 in two parts, so k log 2 is exact) and e^r
/// by its Taylor series to r^13 / 13! (the next term is under 5e-18); 2^k, down to 2^-1076, as
/// the product of two powers of two built from their exponent bits.
BKN_HOST_DEVICE BKN_FORCE_INLINE double exp_nonpositive(double x) {
  using std::floor;
  constexpr double log2e = 1.4426950408889634, ln2_hi = 6.93147180369123816490e-01,
                   ln2_lo = 1.90821492927058770002e-10;
  x = x < -746.0 ? -746.0 : x;
  double k = floor(x * log2e + 0.5);
  k = k == k ? k : 0.0;  // NaN: r carries it; the integer conversion below must not see it
  const double r = (x - k * ln2_hi) - k * ln2_lo;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  constexpr double inverse_factorials[] = {1.0 / 479001600.0, 1.0 / 39916800.0,
                                           1.0 / 3628800.0,   1.0 / 362880.0,
                                           1.0 / 40320.0,     1.0 / 5040.0,
                                           1.0 / 720.0,       1.0 / 120.0,
                                           1.0 / 24.0,        1.0 / 6.0,
                                           0.5,               1.0,
                                           1.0};
  for (double c : inverse_factorials) p = p * r + c;
  const std::int64_t n = std::int64_t(k), half = n / 2;
  const auto power_of_two = [](std::int64_t e) {  // 2^e for -1022 <= e <= 1023
    const std::uint64_t bits = std::uint64_t(e + 1023) << 52;
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
  };
  return p * power_of_two(half) * power_of_two(n - half);
}

/// log(1 + u) for 0 <= u <= 1, to a few ulps, in straight-line double arithmetic (see
/// exp_nonpositive): 2 atanh(z) with z = u / (2 + u) <= 1/3, its odd series to z^35.
BKN_HOST_DEVICE BKN_FORCE_INLINE double log1p_unit(double u) {
  // Two loops of at most 16 steps: GCC unrolls (and then vectorizes) no longer loop.
  constexpr double high[] = {1.0 / 33, 1.0 / 31, 1.0 / 29, 1.0 / 27, 1.0 / 25, 1.0 / 23,
                             1.0 / 21, 1.0 / 19, 1.0 / 17},
                   low[] = {1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9, 1.0 / 7, 1.0 / 5, 1.0 / 3,
                            1.0};
  const double z = u / (2.0 + u), z2 = z * z;
  double s = 1.0 / 35;
  for (double c : high) s = s * z2 + c;
  for (double c : low) s = s * z2 + c;
  return 2.0 * z * s;
}

/// exp_nonpositive in float arithmetic, to about 1 float ulp (0 below -104, NaN for NaN): a
/// float loop of it runs twice as wide and its series is half as long (to r^7 / 7!, the next
/// term under 6e-9).
BKN_HOST_DEVICE BKN_FORCE_INLINE float exp_nonpositive(float x) {
  using std::floor;
  constexpr float log2e = 1.44269504f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  x = x < -104.0f ? -104.0f : x;
  float k = floor(x * log2e + 0.5f);
  k = k == k ? k : 0.0f;
  const float r = (x - k * ln2_hi) - k * ln2_lo;
  float p = 1.0f / 5040;  // 1 / 7!
  constexpr float inverse_factorials[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6,
                                          0.5f,       1.0f,       1.0f};
  for (float c : inverse_factorials) p = p * r + c;
  const std::int32_t n = std::int32_t(k), half = n / 2;
  const auto power_of_two = [](std::int32_t e) {  // 2^e for -126 <= e <= 127
    const std::uint32_t bits = std::uint32_t(e + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  };
  return p * power_of_two(half) * power_of_two(n - half);
}

/// log1p_unit in float arithmetic, to a few float ulps: 2 atanh(z), its odd series to z^13.
BKN_HOST_DEVICE BKN_FORCE_INLINE float log1p_unit(float u) {
  constexpr float terms[] = {1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f};
  const float z = u / (2.0f + u), z2 = z * z;
  float s = 1.0f / 13;
  for (float c : terms) s = s * z2 + c;
  return 2.0f * z * s;
}

/// The type a few per-channel functions of one P value (softplus and sigmoid of the noise, the
/// normalization's gamma / sqrt(var + eps)) are evaluated in: float for float, whose result is
/// rounded to float anyway and whose loops run twice as wide (double's square roots and
/// divisions were most of BN's forward on NC 2x1024), double for the others. Sums and
/// differences of several values stay in double.
template <class P>
using evaluation_t = std::conditional_t<std::is_same_v<P, float>, float, double>;

/// q = sigmoid(theta), computed without overflow for any theta, branch-free.
template <class A>
BKN_HOST_DEVICE BKN_FORCE_INLINE A sigmoid(A theta) {
  if constexpr (std::is_same_v<A, float>) {
    const float e = exp_nonpositive(theta >= 0 ? -theta : theta);
    return (theta >= 0 ? 1.0f : e) / (1.0f + e);
  } else if constexpr (sizeof(A) <= sizeof(double)) {
    const double t = double(theta), e = exp_nonpositive(t >= 0 ? -t : t);
    return A((t >= 0 ? 1.0 : e) / (1.0 + e));
  } else {
    using std::exp;
    if (theta >= A(0)) return A(1) / (A(1) + exp(-theta));
    const A e = exp(theta);
    return e / (A(1) + e);
  }
}

/// r = softplus(rho) = log(1 + exp(rho)) > 0, without overflow, branch-free; its derivative is
/// sigmoid(rho).
template <class A>
BKN_HOST_DEVICE BKN_FORCE_INLINE A softplus(A rho) {
  if constexpr (std::is_same_v<A, float>) {
    return (rho > 0 ? rho : 0.0f) + log1p_unit(exp_nonpositive(rho > 0 ? -rho : rho));
  } else if constexpr (sizeof(A) <= sizeof(double)) {
    const double r = double(rho);
    return A((r > 0 ? r : 0.0) + log1p_unit(exp_nonpositive(r > 0 ? -r : r)));
  } else {
    using std::exp;
    using std::log1p;
    return (rho > A(0) ? rho : A(0)) + log1p(exp(rho > A(0) ? -rho : rho));
  }
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
  // Times 1 / m rather than divided by m: the reciprocal is the same for every (group,
  // channel), so a loop computes it once, and two divisions per element were most of a
  // micro-batch's backward (within an ulp of the quotients).
  const A inv_count = A(1) / in.count;
  out.a = in.gamma * inv_sigma;
  out.b = A(2) * q * dvar * inv_count;
  out.k = q * dmean * inv_count;
  out.dq = dvar * (in.observed.var - in.predicted.var + (A(1) - A(2) * q) * d * d) + dmean * d;
  out.dmean_predicted = p * (dmean - A(2) * q * d * dvar);
  out.dvar_predicted = p * dvar;
  return out;
}

}  // namespace math
BKN_END_NAMESPACE
