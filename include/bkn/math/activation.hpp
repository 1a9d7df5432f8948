// SPDX-License-Identifier: MIT
// Moments of an activation of a Gaussian, f(z) with z ~ N(mu, v): the mean and variance of
// ReLU in closed form (a rectified Gaussian), and their derivatives for the backward.
#pragma once

#include <cmath>

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE
namespace math {

/// Mean e and variance var of f(z), z ~ N(mu, v), with the four partial derivatives the
/// backward needs.
struct activation_moments {
  double e, var;
  double de_dmu, de_dv, dvar_dmu, dvar_dv;
};

/// f(z) = z.
BKN_HOST_DEVICE inline activation_moments identity_moments(double mu, double v) {
  return {mu, v, 1, 0, 0, 1};
}

/// f(z) = max(z, 0). With s = sqrt(v), a = mu / s, Phi and phi the standard normal cdf and pdf
/// at a: e = mu Phi + s phi, var = E[relu^2] - e^2 (docs/math.md). A variance below 1e-300 is
/// a point mass at mu. NaN in mu or v gives NaN moments (a non-finite input poisons its own
/// channel, as everywhere in diagonal mode).
BKN_HOST_DEVICE inline activation_moments relu_moments(double mu, double v) {
  using std::erfc;
  using std::exp;
  using std::sqrt;
  if (mu != mu || v != v) return {mu + v, mu + v, mu + v, mu + v, mu + v, mu + v};
  if (v <= 1e-300) {
    const bool on = mu > 0;
    return {on ? mu : 0.0, 0.0, on ? 1.0 : 0.0, 0.0, 0.0, on ? 1.0 : 0.0};
  }
  const double s = sqrt(v), a = mu / s;
  const double Phi = 0.5 * erfc(-a * 0.70710678118654752440);
  const double phi = 0.39894228040143267794 * exp(-0.5 * a * a);
  const double e = mu * Phi + s * phi;
  // E[relu^2] - e^2 = v Phi + e (mu - e), since e = mu Phi + s phi: no mu^2, which overflows
  // for |mu| > 1e154 and cancels to nothing when v << mu^2.
  const double var = v * Phi + e * (mu - e);
  // d e/d mu = Phi, d e/d v = phi / (2 s); d E[relu^2]/d mu = 2 e, d E[relu^2]/d v = Phi.
  return {e, var < 0 ? 0.0 : var, Phi, phi / (2 * s), 2 * e - 2 * e * Phi, Phi - e * phi / s};
}

}  // namespace math
BKN_END_NAMESPACE
