// Tests of bkn/math/activation.hpp: the moments of f(z), z ~ N(mu, v), that carry a Gaussian
// through the host's activation (docs/math.md, "Transitions through the host layer's weights").
// relu_moments against numerical integration of the rectified Gaussian, its four derivatives
// against central differences, its v -> 0 limit (a point mass), and identity_moments.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bkn/math/activation.hpp"

namespace {

namespace m = bkn::math;

constexpr double kEps = std::numeric_limits<double>::epsilon();
constexpr double kPi = 3.14159265358979323846;

/// E[relu(z)] and Var[relu(z)] for z ~ N(mu, v) by composite Simpson quadrature, written
/// without Phi/erfc so that it shares nothing with the closed form. With z = s (a + t),
/// t ~ N(0, 1), a = mu / s: relu(z) is 0 below t = -a (that mass adds nothing to E[f] or E[f^2])
/// and s (a + t) above, so
///   E[f] = s I1,  E[f^2] = v I2,  Ik = int_{-a}^{inf} (a + t)^k phi(t) dt.
/// The integrand is smooth on [L, U] = [max(-a, -14), max(L, 0) + 14]; what is cut off is below
/// phi(14) ~ 1e-43 of the integrals. 40000 intervals of h <= 7e-4: Simpson's error
/// h^4 max|f''''| (U - L) / 180 is a few 1e-12 of each integral, even in the far tail (a = -6,
/// where the integrand and its derivatives scale together with phi(6)). Measured against the
/// closed form: e within 6e-13 and var within 4e-12 (relative) for |a| <= 6.
struct rectified {
  double e, var;
};
rectified relu_by_quadrature(double mu, double v) {
  const double s = std::sqrt(v), a = mu / s;
  const double L = std::max(-a, -14.0), U = std::max(L, 0.0) + 14.0;
  constexpr int n = 40000;  // even
  const double h = (U - L) / n;
  double i1 = 0, i2 = 0;
  for (int k = 0; k <= n; ++k) {
    const double t = L + k * h;
    const double weight = (k == 0 || k == n) ? 1.0 : (k % 2 == 1 ? 4.0 : 2.0);
    const double density = std::exp(-0.5 * t * t) / std::sqrt(2 * kPi);
    i1 += weight * (a + t) * density;
    i2 += weight * (a + t) * (a + t) * density;
  }
  i1 *= h / 3;
  i2 *= h / 3;
  return {s * i1, v * (i2 - i1 * i1)};
}

double relative(double got, double want) { return std::abs(got - want) / std::abs(want); }

/// The (mu / s, v) grid: mu / s from -6 to 6, v over twelve decades.
const double kRatios[] = {-6,  -5,  -4, -3,  -2, -1.5, -1, -0.5, -0.1, 0, 0.1,
                          0.3, 0.5, 1,  1.5, 2,  2.5,  3,  4,    5,    6};
const double kVariances[] = {1e-8, 1e-3, 0.04, 0.25, 1, 2, 7, 1e4};

}  // namespace

TEST_CASE("relu_moments: the mean and variance of a rectified Gaussian, against quadrature") {
  // Tolerance 1e-10 relative: the quadrature is good to ~4e-12 (above) and the closed form to a
  // few 1e-14 for |a| <= 6 (its cancellations lose at most a^2 + 1 = 37 ulps at a = 6, and
  // about 1000 ulps at a = -6, where e ~ 1.6e-10 s and var ~ 4.8e-11 v); both are far below
  // 1e-10, while a wrong term (e.g. v instead of mu^2 + v, or a missing s phi) is off by O(1).
  double worst_e = 0, worst_var = 0;
  for (const double r : kRatios)
    for (const double v : kVariances) {
      const double mu = r * std::sqrt(v);
      CAPTURE(mu);
      CAPTURE(v);
      const rectified want = relu_by_quadrature(mu, v);
      const m::activation_moments got = m::relu_moments(mu, v);
      CHECK(relative(got.e, want.e) <= 1e-10);
      CHECK(relative(got.var, want.var) <= 1e-10);
      CHECK(got.e > 0);
      CHECK(got.var > 0);
      worst_e = std::max(worst_e, relative(got.e, want.e));
      worst_var = std::max(worst_var, relative(got.var, want.var));
    }
  MESSAGE("relu_moments vs quadrature, |mu/s| <= 6: worst relative error e ", worst_e, ", var ",
          worst_var);
}

TEST_CASE("relu_moments: closed-form identities that hold for every (mu, v)") {
  // relu(z) - relu(-z) = z and relu(z)^2 + relu(-z)^2 = z^2, with -z ~ N(-mu, v):
  //   e(mu) - e(-mu) = mu,  E2(mu) + E2(-mu) = mu^2 + v  (E2 = var + e^2).
  // At mu = 0: e = s / sqrt(2 pi) and var = v (1/2 - 1/(2 pi)), at any scale.
  for (const double r : kRatios)
    for (const double v : kVariances) {
      const double mu = r * std::sqrt(v);
      CAPTURE(mu);
      CAPTURE(v);
      const auto p = m::relu_moments(mu, v), n = m::relu_moments(-mu, v);
      const double scale = std::abs(mu) + std::sqrt(v);
      CHECK(std::abs(p.e - n.e - mu) <= 8 * kEps * scale);
      const double e2p = p.var + p.e * p.e, e2n = n.var + n.e * n.e;
      CHECK(std::abs(e2p + e2n - (mu * mu + v)) <= 64 * kEps * scale * scale);
    }
  for (const double v : {1e-299, 1e-200, 1e-20, 1e-8, 1.0, 1e8, 1e200}) {
    CAPTURE(v);
    const auto z = m::relu_moments(0.0, v);
    CHECK(relative(z.e / std::sqrt(v), 1 / std::sqrt(2 * kPi)) <= 1e-15);
    CHECK(relative(z.var / v, 0.5 - 0.5 / kPi) <= 1e-15);
    CHECK(z.de_dmu == 0.5);
    CHECK(relative(z.dvar_dv, 0.5 - 0.5 / kPi) <= 1e-15);
  }
}

TEST_CASE("relu_moments: the four derivatives against central differences") {
  // Richardson-extrapolated central differences, D = (4 D(h/2) - D(h)) / 3 with
  // D(h) = (f(x + h) - f(x - h)) / 2h, steps h = 1e-3 s in mu and 1e-3 v in v (the scales the
  // functions vary on). Error of D:
  //   truncation  O(h^4 f^(5)): ~ (1e-3 |a|)^4 ~ 1e-9 of the derivative at |a| = 6;
  //   rounding    each f is a sum of terms of total magnitude M (M_e = |mu| Phi + s phi,
  //               M_var = (mu^2 + v) Phi + |mu| s phi + e^2; Phi, phi at a = mu / s), so it is
  //               off by a few eps M, and D by at most noise = 3 * 16 eps M / h (the factor 3
  //               for the Richardson combination, 16 for the handful of roundings).
  // Check: |analytic - D| <= 1e-7 |D| + noise. Where noise < 1e-9 |D| this is a 1e-7 relative
  // check: every derivative for -4 <= a <= 1.5, and de/dmu and dvar/dv everywhere (355 of the
  // 420 checks; the MESSAGE gives the worst relative error there). Elsewhere the derivative is
  // tiny next to the rounding of the function it is taken of (de/dv = phi(a) / 2s for a >= 2.5,
  // e.g. 3e-9 of e / v at a = 6; dvar/dmu = 2 e (1 - Phi) for a >= 2 or a <= -5), which a
  // difference quotient cannot resolve, and the allowance is the rounding bound. A wrong
  // derivative (e.g. dvar/dmu = 2 e (1 + Phi), de/dv = phi / s) fails by orders of magnitude.
  double worst = 0, worst_conditioned = 0;
  int noise_limited = 0;
  for (const double r : kRatios)
    for (const double v : {1e-6, 0.04, 1.0, 7.0, 1e4}) {
      const double s = std::sqrt(v), mu = r * s;
      CAPTURE(mu);
      CAPTURE(v);
      const auto at = m::relu_moments(mu, v);
      const double Phi = 0.5 * std::erfc(-r / std::sqrt(2.0));
      const double phi = std::exp(-0.5 * r * r) / std::sqrt(2 * kPi);
      const double magnitude_e = std::abs(mu) * Phi + s * phi;
      const double magnitude_var = (mu * mu + v) * Phi + std::abs(mu) * s * phi + at.e * at.e;
      // d/dmu (wrt_mu) or d/dv of e (of_e) or var.
      const auto difference = [&](bool wrt_mu, bool of_e, double h) {
        const auto f = [&](double step) {
          const auto p = wrt_mu ? m::relu_moments(mu + step, v) : m::relu_moments(mu, v + step);
          return of_e ? p.e : p.var;
        };
        const double d1 = (f(h) - f(-h)) / (2 * h), d2 = (f(h / 2) - f(-h / 2)) / h;
        return (4 * d2 - d1) / 3;
      };
      struct derivative {
        const char* name;
        double analytic;
        bool wrt_mu, of_e;
      };
      const derivative ds[] = {{"de/dmu", at.de_dmu, true, true},
                               {"de/dv", at.de_dv, false, true},
                               {"dvar/dmu", at.dvar_dmu, true, false},
                               {"dvar/dv", at.dvar_dv, false, false}};
      for (const derivative& d : ds) {
        const double h = d.wrt_mu ? 1e-3 * s : 1e-3 * v;
        const double fd = difference(d.wrt_mu, d.of_e, h);
        const double noise = 3 * 16 * kEps * (d.of_e ? magnitude_e : magnitude_var) / h;
        const double error = std::abs(d.analytic - fd);
        INFO(d.name, ": analytic ", d.analytic, ", finite difference ", fd, ", rounding bound ",
             noise);
        CHECK(error <= 1e-7 * std::abs(fd) + noise);
        worst = std::max(worst, error / (1e-7 * std::abs(fd) + noise));
        if (noise < 1e-9 * std::abs(fd))
          worst_conditioned = std::max(worst_conditioned, error / std::abs(fd));
        else
          ++noise_limited;
      }
    }
  MESSAGE("relu_moments derivatives vs central differences: worst error ", worst,
          " of the allowance; where rounding is negligible (all but ", noise_limited,
          " of 420), worst relative error ", worst_conditioned);
}

TEST_CASE("relu_moments: v -> 0 is a point mass at mu") {
  // At v = 0 (and below 1e-300, or negative) the activation is a constant: e = relu(mu),
  // var = 0, de/dmu = dvar/dv = the step 1[mu > 0], de/dv = dvar/dmu = 0 (the limits of the
  // smooth formulas for mu != 0).
  for (const double mu : {-3.0, -1e-3, 0.0, 1e-3, 2.5})
    for (const double v : {0.0, -0.0, 1e-301, 1e-300, -1.0}) {
      CAPTURE(mu);
      CAPTURE(v);
      const auto p = m::relu_moments(mu, v);
      const double on = mu > 0 ? 1.0 : 0.0;
      CHECK(p.e == on * mu);
      CHECK(p.var == 0);
      CHECK(p.de_dmu == on);
      CHECK(p.de_dv == 0);
      CHECK(p.dvar_dmu == 0);
      CHECK(p.dvar_dv == on);
    }
  // Approaching the limit with the smooth formulas: tiny variances give e -> relu(mu),
  // var -> 0 continuously. For mu > 0 the variance is v (Phi = 1) computed as
  // (mu^2 + v) - mu^2: its absolute error is a few eps mu^2 (so at v < eps mu^2 it is 0, and
  // its relative error grows as eps mu^2 / v; harmless next to any process noise r).
  for (const double mu : {-1.0, -1e-3, 1e-3, 1.0, 40.0})
    for (const double v : {1e-12, 1e-16, 1e-24, 1e-100, 2e-300}) {
      CAPTURE(mu);
      CAPTURE(v);
      const auto p = m::relu_moments(mu, v);
      const double s = std::sqrt(v);
      if (mu / s > 40) {  // Phi(a) = 1 and phi(a) = 0 in double
        CHECK(p.e == mu);
        CHECK(p.var >= 0);
        CHECK(std::abs(p.var - v) <= 4 * kEps * (mu * mu + v));
        CHECK(p.de_dmu == 1);
        CHECK(p.dvar_dv == 1);
      } else if (mu / s < -40) {  // Phi(a) and phi(a) underflow to 0: exactly the point mass
        CHECK(p.e == 0);
        CHECK(p.var == 0);
        CHECK(p.de_dmu == 0);
      } else {
        const rectified want = relu_by_quadrature(mu, v);
        CHECK(relative(p.e, want.e) <= 1e-10);
        CHECK(relative(p.var, want.var) <= 1e-10);
      }
    }
  // The smallest variance handled by the smooth formulas gives the point mass's numbers where
  // |mu| >> s (the variance to within v itself).
  for (const double mu : {-2.0, 2.0}) {
    const auto edge = m::relu_moments(mu, 1.0000001e-300), mass = m::relu_moments(mu, 0.0);
    CHECK(edge.e == mass.e);
    // The true variance is v Phi(mu / s) <= v: continuous with the point mass's 0.
    CHECK(edge.var >= 0);
    CHECK(edge.var <= 1.0000001e-300);
    CHECK(mass.var == 0);
    CHECK(edge.de_dmu == mass.de_dmu);
    CHECK(edge.dvar_dv == mass.dvar_dv);
  }
}

TEST_CASE("relu_moments: a NaN mean propagates to the mean") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(std::isnan(m::relu_moments(nan, 1.0).e));
}

TEST_CASE("identity_moments: f(z) = z passes (mu, v) through") {
  for (const double mu : {-5.0, 0.0, 0.25, 3e8})
    for (const double v : {0.0, 1e-12, 1.0, 42.0}) {
      const auto p = m::identity_moments(mu, v);
      CHECK(p.e == mu);
      CHECK(p.var == v);
      CHECK(p.de_dmu == 1);
      CHECK(p.de_dv == 0);
      CHECK(p.dvar_dmu == 0);
      CHECK(p.dvar_dv == 1);
    }
}

TEST_CASE("relu_moments: non-finite and huge inputs") {
  namespace m = bkn::math;
  // NaN poisons the channel (diagonal mode's policy); it must not turn into a point mass.
  for (const auto& p : {m::relu_moments(1.0, std::nan("")), m::relu_moments(std::nan(""), 1.0)}) {
    CHECK(std::isnan(p.e));
    CHECK(std::isnan(p.var));
  }
  // |mu| >> s: the variance is v, without forming mu^2 (which overflows at 1e160).
  const auto huge = m::relu_moments(1e160, 1.0);
  CHECK(huge.e == 1e160);
  CHECK(huge.var == doctest::Approx(1.0).epsilon(1e-12));
  const auto narrow = m::relu_moments(1.0, 1e-14);
  CHECK(narrow.var == doctest::Approx(1e-14).epsilon(1e-9));
}
