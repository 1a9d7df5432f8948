// SPDX-License-Identifier: MIT
// Central finite differences of a scalar loss in double against analytic gradients: the check
// every gradient test uses, and the tanh activation's moments by quadrature for custom ones.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include <bkn/math/activation.hpp>

namespace bkn_test {

// Central differences with step h = kStep * max(1, |theta|). The estimate's error is
//   truncation  h^2 / 6 |L'''|  ~ 2e-13 |L'''|   (negligible unless |L'''| > 1e5),
//   rounding    ~ eps |L| / h   ~ 2e-10 |L|       (|L| is a few tens at most in these tests).
// Measured, every check agrees to better than 1e-8. The tolerance is the error relative to
// max(1, |finite difference|): 1e-6, over 100x above that noise, while every checked gradient
// must have a component above kNonTrivial (so no check is vacuous) and a wrong or missing term
// moves it by far more than 1e-6.
constexpr double kStep = 1e-6;
constexpr double kTolerance = 1e-6;
constexpr double kNonTrivial = 1e-3;

/// The worst relative error of any check so far in this test binary.
inline double worst_seen = 0;

/// Compares analytic[i] with the central difference of `loss` in *entries[i], for every i.
/// `loss` must recompute everything from the entries (it runs the forward pass). With
/// `may_vanish` the gradient may be all zero (e.g. a bias whose effect cancels exactly).
inline void check_gradient(const std::string& what, const std::vector<double*>& entries,
                           const std::vector<double>& analytic,
                           const std::function<double()>& loss, bool may_vanish = false) {
  REQUIRE(entries.size() == analytic.size());
  REQUIRE_FALSE(entries.empty());
  double worst = 0, largest = 0, fd_at_worst = 0;
  std::size_t worst_at = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    double& v = *entries[i];
    const double saved = v;
    const double h = kStep * std::max(1.0, std::abs(saved));
    const double up = saved + h, down = saved - h;
    v = up;
    const double loss_up = loss();
    v = down;
    const double loss_down = loss();
    v = saved;
    const double fd = (loss_up - loss_down) / (up - down);
    const double error = std::abs(fd - analytic[i]) / std::max(1.0, std::abs(fd));
    if (!(error <= worst)) {  // also catches NaN
      worst = error;
      worst_at = i;
      fd_at_worst = fd;
    }
    largest = std::max(largest, std::abs(analytic[i]));
  }
  worst_seen = std::max(worst_seen, worst);
  INFO(what, ": worst element ", worst_at, " of ", entries.size(), ": analytic ",
       analytic[worst_at], ", finite difference ", fd_at_worst, ", relative error ", worst);
  CHECK(worst <= kTolerance);
  INFO(what, ": largest analytic component ", largest);
  if (!may_vanish) CHECK(largest > kNonTrivial);
}

/// Pointers to every element of `v`, for check_gradient.
inline std::vector<double*> pointers(std::vector<double>& v) {
  std::vector<double*> out;
  for (double& e : v) out.push_back(&e);
  return out;
}

/// Moments of tanh(z), z ~ N(mu, v), by the trapezoid rule in t = (z - mu) / s on [-12, 12]
/// (geometric convergence for a smooth integrand times a Gaussian: ~1e-15 with 2400
/// intervals), with the derivatives from Stein's identities (g = tanh):
///   dE/dmu = E[g'],  dE/dv = E[g''] / 2,  dVar/dmu = 2 E[g g'] - 2 E[g] E[g'],
///   dVar/dv = E[g'^2 + g g''] - E[g] E[g''].
/// A host's own activation for activation::custom; v <= 0 is a point mass.
inline bkn::math::activation_moments tanh_moments(double mu, double v) {
  constexpr double pi = 3.14159265358979323846;
  if (!(v > 0)) {
    const double g = std::tanh(mu), g1 = 1 - g * g, g2 = -2 * g * g1;
    return {g, 0.0, g1, g2 / 2, 0.0, g1 * g1};
  }
  const double s = std::sqrt(v);
  constexpr int n = 2400;
  const double h = 24.0 / n;
  double E = 0, E2 = 0, E1 = 0, Eg2 = 0, Egg1 = 0, Ex = 0;
  for (int k = 0; k <= n; ++k) {
    const double t = -12 + k * h;
    const double w = (k == 0 || k == n ? 0.5 : 1.0) * h * std::exp(-0.5 * t * t) / std::sqrt(2 * pi);
    const double g = std::tanh(mu + s * t), g1 = 1 - g * g, g2 = -2 * g * g1;
    E += w * g;
    E2 += w * g * g;
    E1 += w * g1;
    Eg2 += w * g2;
    Egg1 += w * g * g1;
    Ex += w * (g1 * g1 + g * g2);
  }
  return {E, std::max(E2 - E * E, 0.0), E1, Eg2 / 2, 2 * Egg1 - 2 * E * E1, Ex - E * Eg2};
}

}  // namespace bkn_test
