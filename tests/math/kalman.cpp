// Tests of bkn/math/kalman.hpp: sigmoid/softplus at extreme arguments, Eq. 5's update as the
// moments of a two-component mixture, and the diagonal-mode backward (math.md) against the
// batch-norm backward formula and against central differences of a loss written out here.
#include "bkn/math/kalman.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace {

namespace m = bkn::math;

template <class A>
A eps() {
  return std::numeric_limits<A>::epsilon();
}

}  // namespace

TEST_CASE_TEMPLATE("kalman: sigmoid", A, float, double) {
  CHECK(m::sigmoid(A(0)) == A(0.5));
  // No overflow at extreme arguments (exp(1000) is inf in both types).
  for (A t : {A(1000), A(-1000), A(100), A(-100), A(89), A(-89), A(710), A(-710),
              std::numeric_limits<A>::max(), std::numeric_limits<A>::lowest()}) {
    CAPTURE(t);
    const A s = m::sigmoid(t);
    CHECK(std::isfinite(s));
    CHECK(s >= 0);
    CHECK(s <= 1);
  }
  CHECK(m::sigmoid(A(1000)) == 1);
  CHECK(m::sigmoid(A(-1000)) == 0);
  // Deep in the negative tail sigmoid(t) = e^t (1 - e^t + ...): relative accuracy kept, not
  // flushed to 0 as 1 - sigmoid(-t) would be.
  CHECK(m::sigmoid(A(-30)) == doctest::Approx(std::exp(-30.0L)).epsilon(double(4 * eps<A>())));
  // Against the naive formula where it is accurate (moderate arguments), to a few ulps.
  for (A t : {A(-8), A(-2.5), A(-0.25), A(0.25), A(1), A(3), A(8)}) {
    CAPTURE(t);
    const long double expect = 1.0L / (1.0L + std::exp(-static_cast<long double>(t)));
    CHECK(std::fabs(m::sigmoid(t) - expect) <= 4 * eps<A>() * expect);
    // Symmetry sigmoid(-t) = 1 - sigmoid(t).
    CHECK(std::fabs(m::sigmoid(-t) - (1 - expect)) <= 4 * eps<A>());
  }
}

TEST_CASE_TEMPLATE("kalman: softplus", A, float, double) {
  // log(1 + e^0) = log 2.
  CHECK(std::fabs(m::softplus(A(0)) - std::log(2.0L)) <= 2 * eps<A>());
  for (A t : {A(1000), A(-1000), A(100), A(-100), A(89), A(710), A(-710),
              std::numeric_limits<A>::max(), std::numeric_limits<A>::lowest()}) {
    CAPTURE(t);
    const A r = m::softplus(t);
    CHECK(std::isfinite(r));
    CHECK(r >= 0);
  }
  // Large positive: softplus(t) = t + log1p(e^-t) = t to the last bit.
  CHECK(m::softplus(A(1000)) == A(1000));
  CHECK(m::softplus(A(100)) == A(100));  // exp(100) overflows float: the naive form gives inf
  // Large negative: e^t underflows; the result is 0 or a denormal, never negative or NaN.
  CHECK(m::softplus(A(-1000)) <= std::numeric_limits<A>::min());
  // Tails keep relative accuracy: softplus(-30) = e^-30 (1 - e^-30 / 2 + ...).
  CHECK(m::softplus(A(-30)) == doctest::Approx(std::exp(-30.0L)).epsilon(double(4 * eps<A>())));
  // Moderate arguments: the naive log(1 + e^t) in long double.
  for (A t : {A(-10), A(-3), A(-0.5), A(0.5), A(2), A(7), A(20)}) {
    CAPTURE(t);
    const long double expect = std::log1p(std::exp(static_cast<long double>(t)));
    CHECK(std::fabs(m::softplus(t) - expect) <= 4 * eps<A>() * expect);
  }
  // softplus(log(expm1(r))) = r: how layer_storage initializes the noise.
  for (double r : {0.01, 0.5, 3.0}) {
    const A rho = A(std::log(std::expm1(r)));
    CHECK(m::softplus(rho) == doctest::Approx(r).epsilon(double(8 * eps<A>())));
  }
}

TEST_CASE_TEMPLATE("kalman: kalman_update on hand-computed numbers", A, float, double) {
  // predicted N(1, 2), observed N(3, 4), q = 1/4, p = 3/4, d = 3 - 1 = 2:
  //   mean = 3/4 * 1 + 1/4 * 3 = 1.5
  //   var  = 3/4 * 2 + 1/4 * 4 + 3/4 * 1/4 * 2^2 = 1.5 + 1 + 0.75 = 3.25
  // Every operation is exact on these dyadic values.
  const auto r = m::kalman_update<A>({A(1), A(2)}, {A(3), A(4)}, A(0.25));
  CHECK(r.mean == A(1.5));
  CHECK(r.var == A(3.25));

  // predicted N(-2, 0.5), observed N(2, 0), q = 1/2: mean 0, var 0.25 + 0 + 0.25 * 16 = 4.25.
  const auto s = m::kalman_update<A>({A(-2), A(0.5)}, {A(2), A(0)}, A(0.5));
  CHECK(s.mean == A(0));
  CHECK(s.var == A(4.25));
}

TEST_CASE_TEMPLATE("kalman: q = 1 gives the observed, q = 0 the predicted moments", A, float,
                   double) {
  const m::moments<A> pred{A(0.3), A(1.7)}, obs{A(-4.1), A(0.02)};
  const auto one = m::kalman_update(pred, obs, A(1));
  CHECK(one.mean == obs.mean);
  CHECK(one.var == obs.var);
  const auto zero = m::kalman_update(pred, obs, A(0));
  CHECK(zero.mean == pred.mean);
  CHECK(zero.var == pred.var);
}

TEST_CASE_TEMPLATE("kalman: the update is the moment match of the mixture", A, float, double) {
  // Mixture p N(mp, vp) + q N(mo, vo): E = p mp + q mo, E[x^2] = p (vp + mp^2) + q (vo + mo^2),
  // Var = E[x^2] - E^2, computed here in long double. The update computes the same quantity as
  // p vp + q vo + p q d^2; both are sums of O(E[x^2]) terms, so the difference is bounded by a
  // few eps of E[x^2] (8 eps: ~5 rounded operations in the update, inputs exact in A).
  std::mt19937_64 gen(3);
  std::uniform_real_distribution<double> mean(-5, 5), var(0, 4), gain(0, 1);
  for (int trial = 0; trial < 200; ++trial) {
    const A mp = A(mean(gen)), vp = A(var(gen)), mo = A(mean(gen)), vo = A(var(gen));
    const A q = A(gain(gen));
    const long double p = 1.0L - q;
    const long double e = p * mp + q * static_cast<long double>(mo);
    const long double e2 =
        p * (vp + static_cast<long double>(mp) * mp) + q * (vo + static_cast<long double>(mo) * mo);
    const long double v = e2 - e * e;
    const auto r = m::kalman_update<A>({mp, vp}, {mo, vo}, q);
    CAPTURE(trial);
    CHECK(std::fabs(r.mean - e) <= 8 * eps<A>() * (std::fabs(mp) + std::fabs(mo)));
    CHECK(std::fabs(r.var - v) <= 8 * eps<A>() * e2);
    CHECK(r.var >= 0);
  }
  // Monte Carlo check of the mixture claim itself (independent of any algebra): 400k samples
  // of p N(1, 0.25) + q N(-2, 1), q = 0.3. Standard error of the variance estimate ~ 0.005.
  std::mt19937_64 g2(99);
  std::normal_distribution<double> z;
  std::bernoulli_distribution pick_obs(0.3);
  long double s = 0, s2 = 0;
  const int n = 400000;
  for (int i = 0; i < n; ++i) {
    const double x = pick_obs(g2) ? -2 + 1.0 * z(g2) : 1 + 0.5 * z(g2);
    s += x;
    s2 += static_cast<long double>(x) * x;
  }
  const double mc_mean = double(s / n), mc_var = double(s2 / n - (s / n) * (s / n));
  const auto r = m::kalman_update<double>({1, 0.25}, {-2, 1}, 0.3);
  CHECK(r.mean == doctest::Approx(mc_mean).epsilon(0.02));
  CHECK(r.var == doctest::Approx(mc_var).epsilon(0.02));
}

namespace {

// A layer's loss, written out from math.md's forward with no reference to kalman_backward:
// observed moments of x (biased), posterior = p N(pred) + q N(obs), y = gamma (x - mu) / sigma
// + beta, loss = sum_i w_i y_i + c_mean * mu + c_var * var (the c terms stand for what the next
// layer's predict feeds back).
struct toy_layer {
  std::vector<double> x, w;
  double q, gamma, beta, eps, pred_mean, pred_var, c_mean, c_var;

  m::moments<double> observed() const {
    double s = 0;
    for (double v : x) s += v;
    const double mu = s / double(x.size());
    double s2 = 0;
    for (double v : x) s2 += (v - mu) * (v - mu);
    return {mu, s2 / double(x.size())};
  }
  m::moments<double> posterior() const {
    const auto o = observed();
    const double p = 1 - q, d = o.mean - pred_mean;
    return {p * pred_mean + q * o.mean, p * pred_var + q * o.var + p * q * d * d};
  }
  double loss() const {
    const auto post = posterior();
    const double sigma = std::sqrt(post.var + eps);
    double l = c_mean * post.mean + c_var * post.var;
    for (std::size_t i = 0; i < x.size(); ++i)
      l += w[i] * (gamma * (x[i] - post.mean) / sigma + beta);
    return l;
  }
  m::diag_backward_in<double> backward_in() const {
    m::diag_backward_in<double> in{};
    in.count = double(x.size());
    in.q = q;
    in.gamma = gamma;
    in.epsilon = eps;
    in.observed = observed();
    in.predicted = {pred_mean, pred_var};
    in.posterior = posterior();
    const double mu = in.posterior.mean;
    in.sum_dy = 0;
    in.sum_dy_centred = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      in.sum_dy += w[i];
      in.sum_dy_centred += w[i] * (x[i] - mu);
    }
    in.dmean_out = c_mean;
    in.dvar_out = c_var;
    return in;
  }
};

// Central difference of f at member `field` (step h): error O(h^2 f''') + O(eps f / h).
template <class F>
double central(F loss_with, double h) {
  return (loss_with(h) - loss_with(-h)) / (2 * h);
}

}  // namespace

TEST_CASE("kalman: kalman_backward with q = 1 is the batch-norm backward") {
  // x = {1, 2, 4, 7}, m = 4: mean 3.5, deviations -2.5 -1.5 0.5 3.5, S = (6.25 + 2.25 + 0.25 +
  // 12.25) / 4 = 5.25. No prior: predicted = observed, q = 1.
  toy_layer t{{1, 2, 4, 7}, {0.5, -1, 2, 0.25}, 1.0, 1.5, 0.2, 1e-3, 0, 0, 0, 0};
  const auto o = t.observed();
  REQUIRE(o.mean == 3.5);
  REQUIRE(o.var == 5.25);
  t.pred_mean = o.mean;
  t.pred_var = o.var;
  const auto in = t.backward_in();
  const auto out = m::kalman_backward(in);

  // Batch normalization's backward, written out:
  //   xhat_i = (x_i - mean) / sigma, sigma = sqrt(S + eps)
  //   dx_i = gamma / sigma (dy_i - mean(dy) - xhat_i mean(dy xhat))
  //   dgamma = sum dy xhat, dbeta = sum dy
  const double sigma = std::sqrt(5.25 + 1e-3);
  double mean_dy = 0, mean_dy_xhat = 0, dgamma = 0;
  for (int i = 0; i < 4; ++i) {
    const double xhat = (t.x[i] - 3.5) / sigma;
    mean_dy += t.w[i] / 4;
    mean_dy_xhat += t.w[i] * xhat / 4;
    dgamma += t.w[i] * xhat;
  }
  for (int i = 0; i < 4; ++i) {
    const double xhat = (t.x[i] - 3.5) / sigma;
    const double bn = 1.5 / sigma * (t.w[i] - mean_dy - xhat * mean_dy_xhat);
    // dx = a dy + b (x - mu) + k, mu the posterior mean (3.5 here).
    const double got = out.a * t.w[i] + out.b * (t.x[i] - 3.5) + out.k;
    CAPTURE(i);
    // Terms of size ~1 combined in a few operations: 16 eps absolute.
    CHECK(std::fabs(got - bn) <= 16 * eps<double>());
  }
  CHECK(out.dgamma == doctest::Approx(dgamma).epsilon(1e-14));
  CHECK(out.dbeta == 1.75);  // 0.5 - 1 + 2 + 0.25
  // p = 0: no gradient reaches the prediction.
  CHECK(out.dmean_predicted == 0);
  CHECK(out.dvar_predicted == 0);
  // With d = 0 and S = v_pred: dq = dSig_tot (S - v_pred + (1 - 2q) d^2) + dmu_tot d = 0.
  CHECK(out.dq == 0);
}

TEST_CASE("kalman: kalman_backward dq with q = 1 and a distinct prior, by hand") {
  // q = 1 with a prediction that differs from the batch: the posterior is still the batch's,
  // but dq (the derivative at q = 1) is not zero. x = {0, 2}: mean 1, S = 1. Prediction
  // N(0, 3): d = 1. gamma = 1, eps = 1 (to keep numbers round): sigma = sqrt(1 + 1) = sqrt 2.
  // dy = {1, 0}: sum_dy = 1, sum_dy (x - mu) = -1.
  //   dmu_tot  = 0 - gamma sum_dy / sigma           = -1/sqrt2
  //   dSig_tot = 0 - 1/2 gamma sum_dy(x-mu)/sigma^3 = 1/2 / (2 sqrt2) = 1/(4 sqrt2)
  //   dq = dSig_tot (S - v_pred + (1 - 2q) d^2) + dmu_tot d = 1/(4sqrt2) (1 - 3 - 1) - 1/sqrt2
  //      = -3/(4 sqrt2) - 4/(4 sqrt2) = -7/(4 sqrt2)
  m::diag_backward_in<double> in{};
  in.count = 2;
  in.q = 1;
  in.gamma = 1;
  in.epsilon = 1;
  in.observed = {1, 1};
  in.predicted = {0, 3};
  in.posterior = {1, 1};
  in.sum_dy = 1;
  in.sum_dy_centred = -1;
  const auto out = m::kalman_backward(in);
  const double r2 = std::sqrt(2.0);
  CHECK(out.dq == doctest::Approx(-7 / (4 * r2)).epsilon(1e-15));
  CHECK(out.a == doctest::Approx(1 / r2).epsilon(1e-15));
  // dx = a dy + b (x - mu) + k: b = 2 q dSig_tot / m = 1/(4 sqrt2), k = q dmu_tot / m
  // = -1/(2 sqrt2). At x = 0 (dy = 1): 1/sqrt2 - 1/(4 sqrt2) - 1/(2 sqrt2) = 1/(4 sqrt2).
  CHECK(out.b == doctest::Approx(1 / (4 * r2)).epsilon(1e-15));
  CHECK(out.k == doctest::Approx(-1 / (2 * r2)).epsilon(1e-15));
  CHECK(out.a * 1 + out.b * (0 - 1) + out.k == doctest::Approx(1 / (4 * r2)).epsilon(1e-15));
  CHECK(out.dgamma == doctest::Approx(-1 / r2).epsilon(1e-15));
  CHECK(out.dbeta == 1);
  CHECK(out.dmean_predicted == 0);
  CHECK(out.dvar_predicted == 0);
}

TEST_CASE("kalman: kalman_backward matches central differences of the loss") {
  // Every output of kalman_backward is a derivative of toy_layer::loss: dx_i, dgamma, dbeta,
  // dq, dmean_predicted, dvar_predicted. Central differences with h = 1e-5 on O(1) quantities
  // have truncation error ~h^2 = 1e-10 and rounding error ~eps / h = 2e-11: 1e-7 relative
  // (plus 1e-8 absolute) is safely above both and far below any missing term (the omitted
  // terms of the paper's Eq. 6 change dq and the prior's gradients by O(1)).
  std::mt19937_64 gen(1);
  std::uniform_real_distribution<double> u(-2, 2), pos(0.2, 2), gain(0.05, 0.95);
  for (int trial = 0; trial < 20; ++trial) {
    const int n = 1 + trial % 5;  // m in 1..5, including m = 1 (q < 1 keeps it meaningful)
    toy_layer t{{}, {}, gain(gen), pos(gen), u(gen), 1e-3, u(gen), pos(gen), u(gen), u(gen)};
    for (int i = 0; i < n; ++i) {
      t.x.push_back(u(gen));
      t.w.push_back(u(gen));
    }
    const auto out = m::kalman_backward(t.backward_in());
    const double h = 1e-5;
    auto close = [](double got, double fd) {
      return std::fabs(got - fd) <= 1e-7 * std::fabs(fd) + 1e-8;
    };
    CAPTURE(trial);
    for (int i = 0; i < n; ++i) {
      const double fd = central(
          [&](double e) {
            toy_layer s = t;
            s.x[i] += e;
            return s.loss();
          },
          h);
      // dx = a dy + b (x - mu) + k, mu the posterior mean, at the unperturbed x.
      const double mu = t.posterior().mean;
      CHECK(close(out.a * t.w[i] + out.b * (t.x[i] - mu) + out.k, fd));
    }
    CHECK(close(out.dq, central(
                            [&](double e) {
                              toy_layer s = t;
                              s.q += e;
                              return s.loss();
                            },
                            h)));
    CHECK(close(out.dmean_predicted, central(
                                         [&](double e) {
                                           toy_layer s = t;
                                           s.pred_mean += e;
                                           return s.loss();
                                         },
                                         h)));
    CHECK(close(out.dvar_predicted, central(
                                        [&](double e) {
                                          toy_layer s = t;
                                          s.pred_var += e;
                                          return s.loss();
                                        },
                                        h)));
    CHECK(close(out.dgamma, central(
                                [&](double e) {
                                  toy_layer s = t;
                                  s.gamma += e;
                                  return s.loss();
                                },
                                h)));
    CHECK(close(out.dbeta, central(
                               [&](double e) {
                                 toy_layer s = t;
                                 s.beta += e;
                                 return s.loss();
                               },
                               h)));
  }
}

TEST_CASE("kalman: kalman_backward for m = 1 with a prior, by hand") {
  // One value x = 3, prediction N(1, 2), q = p = 1/2, gamma = 1, eps = 0 (allowed here: the
  // posterior variance is positive). Observed N(3, 0), d = 2. Posterior: mean 2,
  // var = 1/2 * 2 + 0 + 1/4 * 4 = 2, sigma = sqrt 2. dy = 1: sum_dy = 1, sum_dy (x - mu) = 1.
  //   dmu_tot  = -1/sqrt2 ;  dSig_tot = -1/2 * 1 / (2 sqrt2) = -1/(4 sqrt2)
  //   dx = a dy + b (x - mu) + k with a = 1/sqrt2, b = 2 q dSig / m = -1/(4 sqrt2),
  //        k = q dmu / m = -1/(2 sqrt2)
  //        dx = 1/sqrt2 - 1/(4 sqrt2) - 2/(4 sqrt2) = 1/(4 sqrt2)
  //   check by hand: y = (x - mu)/sigma with mu = (1 + x)/2, var = 1 + (x - 1)^2 / 4:
  //        y = ((x - 1)/2) / sqrt(1 + (x - 1)^2/4); at x = 3: dy/dx = (1/2)/(2^{3/2}) = 1/(4 sqrt2)
  //   dq = dSig (S - v_pred + (1 - 2q) d^2) + dmu d = -1/(4sqrt2) (0 - 2 + 0) - 2/sqrt2
  //      = 1/(2 sqrt2) - 2/sqrt2 = -3/(2 sqrt2)
  //   dmean_pred = p (dmu - 2 q d dSig) = 1/2 (-1/sqrt2 + 2/(4 sqrt2)) = -1/(4 sqrt2)
  //   dvar_pred = p dSig = -1/(8 sqrt2)
  m::diag_backward_in<double> in{};
  in.count = 1;
  in.q = 0.5;
  in.gamma = 1;
  in.epsilon = 0;
  in.observed = {3, 0};
  in.predicted = {1, 2};
  in.posterior = m::kalman_update<double>(in.predicted, in.observed, 0.5);
  REQUIRE(in.posterior.mean == 2);
  REQUIRE(in.posterior.var == 2);
  in.sum_dy = 1;
  in.sum_dy_centred = 1;
  const auto out = m::kalman_backward(in);
  const double r2 = std::sqrt(2.0);
  CHECK(out.a * 1 + out.b * (3 - 2) + out.k == doctest::Approx(1 / (4 * r2)).epsilon(1e-14));
  CHECK(out.dq == doctest::Approx(-3 / (2 * r2)).epsilon(1e-14));
  CHECK(out.dmean_predicted == doctest::Approx(-1 / (4 * r2)).epsilon(1e-14));
  CHECK(out.dvar_predicted == doctest::Approx(-1 / (8 * r2)).epsilon(1e-14));
}

TEST_CASE("kalman: exp_nonpositive and log1p_unit against long double libm") {
  // The straight-line forms that sigmoid and softplus use so that loops over channels
  // vectorize; their worst relative errors over a dense sweep, in units of double's epsilon.
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> wide(-708.0, 0.0), narrow(-1.0, 0.0), unit(0.0, 1.0);
  double exp_error = 0, log1p_error = 0;
  for (int i = 0; i < 200000; ++i) {
    const double x = i % 2 ? wide(rng) : narrow(rng);
    const long double e = std::exp(static_cast<long double>(x));
    exp_error = std::max(exp_error, double(std::fabs(m::exp_nonpositive(x) - e) / e));
    const double u = i % 3 ? unit(rng) : std::ldexp(unit(rng), -int(i % 60));
    const long double l = std::log1p(static_cast<long double>(u));
    if (l > 0) log1p_error = std::max(log1p_error, double(std::fabs(m::log1p_unit(u) - l) / l));
  }
  MESSAGE("worst relative error: exp ", exp_error / eps<double>(), " eps, log1p ",
          log1p_error / eps<double>(), " eps");
  CHECK(exp_error <= 2 * eps<double>());
  CHECK(log1p_error <= 3 * eps<double>());
  // Exact and limiting values.
  CHECK(m::exp_nonpositive(0.0) == 1.0);
  CHECK(m::exp_nonpositive(-1e-300) == 1.0);
  CHECK(m::exp_nonpositive(-std::numeric_limits<double>::infinity()) == 0.0);
  CHECK(m::exp_nonpositive(-std::numeric_limits<double>::max()) == 0.0);
  CHECK(std::isnan(m::exp_nonpositive(std::numeric_limits<double>::quiet_NaN())));
  CHECK(m::log1p_unit(0.0) == 0.0);
  CHECK(m::log1p_unit(1e-300) == 1e-300);
  CHECK(std::fabs(m::log1p_unit(1.0) - std::log(2.0L)) <= eps<double>());
  // Gradual underflow: e^-740 is a denormal, kept to its few bits.
  const long double tiny = std::exp(-740.0L);
  CHECK(std::fabs(m::exp_nonpositive(-740.0) - tiny) <= std::numeric_limits<double>::denorm_min());
  // sigmoid and softplus of NaN are NaN, not a trap or a garbage number.
  CHECK(std::isnan(m::sigmoid(std::numeric_limits<double>::quiet_NaN())));
  CHECK(std::isnan(m::softplus(std::numeric_limits<double>::quiet_NaN())));
}

TEST_CASE("kalman: exp_nonpositive and log1p_unit in float against long double libm") {
  // The float forms that softplus<float> and sigmoid<float> use; worst relative errors over a
  // dense sweep in units of float's epsilon (normal results: e^x down to 2^-126).
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> wide(-87.0f, 0.0f), narrow(-1.0f, 0.0f),
      unit(0.0f, 1.0f);
  double exp_error = 0, log1p_error = 0;
  for (int i = 0; i < 400000; ++i) {
    const float x = i % 2 ? wide(rng) : narrow(rng);
    const long double e = std::exp(static_cast<long double>(x));
    exp_error = std::max(exp_error, double(std::fabs(m::exp_nonpositive(x) - e) / e));
    const float u = i % 3 ? unit(rng) : std::ldexp(unit(rng), -int(i % 60));
    const long double l = std::log1p(static_cast<long double>(u));
    if (l > 0) log1p_error = std::max(log1p_error, double(std::fabs(m::log1p_unit(u) - l) / l));
  }
  MESSAGE("worst relative error: exp ", exp_error / eps<float>(), " eps, log1p ",
          log1p_error / eps<float>(), " eps");
  CHECK(exp_error <= 1.5 * eps<float>());
  CHECK(log1p_error <= 3 * eps<float>());
  CHECK(m::exp_nonpositive(0.0f) == 1.0f);
  CHECK(m::exp_nonpositive(-1e-30f) == 1.0f);
  CHECK(m::exp_nonpositive(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(m::exp_nonpositive(-std::numeric_limits<float>::max()) == 0.0f);
  CHECK(std::isnan(m::exp_nonpositive(std::numeric_limits<float>::quiet_NaN())));
  CHECK(m::log1p_unit(0.0f) == 0.0f);
  CHECK(m::log1p_unit(1e-30f) == 1e-30f);
  CHECK(std::fabs(m::log1p_unit(1.0f) - std::log(2.0L)) <= 2 * eps<float>());
  // Gradual underflow: e^-100 is a float denormal, kept to its few bits.
  CHECK(std::fabs(m::exp_nonpositive(-100.0f) - std::exp(-100.0L)) <=
        std::numeric_limits<float>::denorm_min());
  CHECK(std::isnan(m::sigmoid(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(m::softplus(std::numeric_limits<float>::quiet_NaN())));
}
