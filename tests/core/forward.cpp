// Tests of bkn/forward.hpp on the reference backend: batch normalization as the q = 1 case
// (computed naively here), the limits q -> 1 and q -> 0, the moving averages, inference from
// the moving averages and from the chain, a constant channel, m = 1, float32 statistics with a
// large offset, in-place use and N = 0.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"

#include "support/thrown.hpp"

namespace {

using bkn::covariance;
using bkn::index_t;
using bkn::span;
using B = bkn::reference_backend;

template <class P>
P nan() {
  return std::numeric_limits<P>::quiet_NaN();
}

template <class V>
std::vector<unsigned char> bytes_of(const V& v) {
  std::vector<unsigned char> b(v.size() * sizeof(v[0]));
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

template <class P>
struct gaussian {
  std::vector<P> mean, cov;
  index_t groups, channels;
  bkn::gaussian_view<const P> cview() const {
    return {span<const P>(mean.data(), index_t(mean.size())),
            span<const P>(cov.data(), index_t(cov.size())), groups, channels};
  }
};

/// A tensor stored as NCHW (S = H * W pixels), with a naive reading of its statistics.
template <class T>
struct batch {
  index_t N, C, H, W;
  std::vector<T> data;
  index_t S() const { return H * W; }
  std::size_t idx(index_t n, index_t c, index_t s) const {
    return std::size_t((n * C + c) * S() + s);
  }
  T at(index_t n, index_t c, index_t s) const { return data[idx(n, c, s)]; }
  bkn::tensor_view<const T> view() const {
    return H == 1 && W == 1 ? bkn::tensor_view<const T>(bkn::nc(data.data(), N, C))
                            : bkn::tensor_view<const T>(bkn::nchw(data.data(), N, C, H, W));
  }
  bkn::tensor_view<T> out_view(std::vector<T>& y) const {
    return H == 1 && W == 1 ? bkn::nc(y.data(), N, C) : bkn::nchw(y.data(), N, C, H, W);
  }
};

template <class T>
batch<T> random_batch(index_t N, index_t C, index_t H, index_t W, unsigned seed,
                      double spread = 2.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> z;
  std::uniform_real_distribution<double> offset(-3, 3);
  batch<T> b{N, C, H, W, std::vector<T>(std::size_t(N * C * H * W))};
  std::vector<double> off(static_cast<std::size_t>(C));
  for (auto& o : off) o = offset(gen);
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t s = 0; s < b.S(); ++s)
        b.data[b.idx(n, c, s)] = T(off[std::size_t(c)] + spread * z(gen));
  return b;
}

/// Per (group, channel) mean and biased variance, two-pass in long double.
struct naive_stats {
  std::vector<long double> mean, var;
};

template <class T>
naive_stats stats_of(const batch<T>& b, index_t gs) {
  const index_t G = b.N / gs;
  naive_stats r{std::vector<long double>(std::size_t(G * b.C)),
                std::vector<long double>(std::size_t(G * b.C))};
  const long double m = static_cast<long double>(gs * b.S());
  for (index_t g = 0; g < G; ++g)
    for (index_t c = 0; c < b.C; ++c) {
      long double s = 0;
      for (index_t n = g * gs; n < (g + 1) * gs; ++n)
        for (index_t p = 0; p < b.S(); ++p) s += b.at(n, c, p);
      const long double mu = s / m;
      long double s2 = 0;
      for (index_t n = g * gs; n < (g + 1) * gs; ++n)
        for (index_t p = 0; p < b.S(); ++p) s2 += (b.at(n, c, p) - mu) * (b.at(n, c, p) - mu);
      r.mean[std::size_t(g * b.C + c)] = mu;
      r.var[std::size_t(g * b.C + c)] = s2 / m;
    }
  return r;
}

/// Checks y against gamma (x - mu_g) / sqrt(var_g + eps) + beta (long double). Tolerance:
/// the routine stores mu and a = gamma / sigma in P (mu's rounding moves y by eps |a mu|) and
/// rounds y to T; the statistics themselves carry a few eps of relative error. 16 eps of
/// (|a| (|x| + |mu|) + |beta| + 1) covers all of it with margin.
template <class T, class P>
void check_normalized(const batch<T>& x, const std::vector<T>& y, index_t gs,
                      const std::vector<long double>& mean, const std::vector<long double>& var,
                      const std::vector<P>& gamma, const std::vector<P>& beta, double epsilon,
                      long double extra_rel = 0) {
  const long double eps =
      std::max<long double>(std::numeric_limits<T>::epsilon(), std::numeric_limits<P>::epsilon());
  int bad = 0;
  for (index_t n = 0; n < x.N; ++n)
    for (index_t c = 0; c < x.C; ++c)
      for (index_t s = 0; s < x.S(); ++s) {
        const std::size_t g = std::size_t((n / gs) * x.C + c);
        const long double gam = gamma.empty() ? 1 : gamma[std::size_t(c)];
        const long double bet = beta.empty() ? 0 : beta[std::size_t(c)];
        const long double a = gam / std::sqrt(var[g] + epsilon);
        const long double xv = x.at(n, c, s);
        const long double expect = a * (xv - mean[g]) + bet;
        const long double tol =
            (16 * eps + extra_rel) *
            (std::fabs(a) * (std::fabs(xv) + std::fabs(mean[g])) + std::fabs(bet) + 1);
        const long double got = y[x.idx(n, c, s)];
        if (!(std::fabs(got - expect) <= tol)) {
          if (++bad <= 5) {
            CAPTURE(n);
            CAPTURE(c);
            CAPTURE(s);
            CHECK(double(got) == doctest::Approx(double(expect)));
          }
        }
      }
  CHECK(bad == 0);
}

template <class P>
bkn::layer_config config(index_t C, index_t G, covariance mode = covariance::diagonal) {
  bkn::layer_config cfg;
  cfg.channels = C;
  cfg.groups = G;
  cfg.mode = mode;
  cfg.noise = false;  // R = 0 unless a test sets it: keeps hand computations exact
  return cfg;
}

template <class T, class P>
std::vector<T> run_forward(const bkn::options& opt, bkn::layer_storage<P>& st, const batch<T>& x,
                           const gaussian<P>* prior = nullptr, index_t in_channels = 0) {
  std::vector<T> y(x.data.size(), nan<T>());
  bkn::host_workspace ws(bkn::workspace_size(B{}, opt, x.view().shape(), in_channels));
  bkn::forward(B{}, opt, st.view(), x.view(), x.out_view(y),
               prior ? prior->cview() : bkn::gaussian_view<const P>(), ws.bytes());
  return y;
}

template <class P>
void random_affine(bkn::layer_storage<P>& st, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> pos(0.25, 2), u(-1, 1);
  for (auto& g : st.gamma) g = P(pos(gen));
  for (auto& b : st.beta) b = P(u(gen));
}

using bkn_test::thrown;

}  // namespace

// ---- q = 1 is batch normalization ----

TEST_CASE_TEMPLATE("forward: no prior is batch normalization, NC, with groups", P, float, double) {
  const auto x = random_batch<P>(8, 3, 1, 1, 1);
  for (index_t gs : {index_t(0), index_t(2), index_t(4), index_t(8)}) {
    CAPTURE(gs);
    const index_t g = gs == 0 ? 8 : gs, G = 8 / g;
    bkn::layer_storage<P> st(config<P>(3, G));
    random_affine(st, 2);
    bkn::options opt;
    opt.group_size = gs;
    const auto y = run_forward(opt, st, x);
    const auto ref = stats_of(x, g);
    check_normalized(x, y, g, ref.mean, ref.var, st.gamma, st.beta, opt.epsilon);
    // The posterior is the observed statistics (biased variance), per group.
    const long double eps = std::numeric_limits<P>::epsilon();
    for (std::size_t i = 0; i < ref.mean.size(); ++i) {
      CHECK(std::fabs(st.posterior_mean[i] - ref.mean[i]) <=
            4 * eps * (std::fabs(ref.mean[i]) + 3));
      CHECK(std::fabs(st.posterior_cov[i] - ref.var[i]) <= 16 * eps * (ref.var[i] + 9));
      CHECK(st.posterior_mean[i] == st.observed_mean[i]);
      CHECK(st.posterior_cov[i] == st.observed_cov[i]);
    }
  }
}

TEST_CASE_TEMPLATE("forward: no prior is batch normalization, NCHW, with groups", P, float,
                   double) {
  const auto x = random_batch<P>(4, 3, 3, 2, 3);
  for (index_t gs : {index_t(1), index_t(2), index_t(4)}) {
    CAPTURE(gs);
    bkn::layer_storage<P> st(config<P>(3, 4 / gs));
    random_affine(st, 4);
    bkn::options opt;
    opt.group_size = gs;
    opt.epsilon = 1e-3;
    const auto y = run_forward(opt, st, x);
    const auto ref = stats_of(x, gs);
    check_normalized(x, y, gs, ref.mean, ref.var, st.gamma, st.beta, opt.epsilon);
  }
}

TEST_CASE_TEMPLATE("forward: full-covariance mode without a prior normalizes like BN", P, float,
                   double) {
  // Full mode only changes the state (C x C covariances); y uses the diagonal, so it is BN.
  const auto x = random_batch<P>(6, 3, 2, 2, 5);
  bkn::layer_storage<P> st(config<P>(3, 2, covariance::full));
  random_affine(st, 6);
  bkn::options opt;
  opt.mode = covariance::full;
  opt.group_size = 3;
  const auto y = run_forward(opt, st, x);
  const auto ref = stats_of(x, 3);
  check_normalized(x, y, 3, ref.mean, ref.var, st.gamma, st.beta, opt.epsilon);
  // Diagonal of the posterior covariance = the biased variances.
  const long double eps = std::numeric_limits<P>::epsilon();
  for (index_t g = 0; g < 2; ++g)
    for (index_t c = 0; c < 3; ++c)
      CHECK(std::fabs(st.posterior_cov[std::size_t((g * 3 + c) * 3 + c)] -
                      ref.var[std::size_t(g * 3 + c)]) <=
            16 * eps * (ref.var[std::size_t(g * 3 + c)] + 9));
}

TEST_CASE("forward: float tensors with double per-channel arrays") {
  const auto x = random_batch<float>(8, 2, 2, 2, 7);
  bkn::layer_storage<double> st(config<double>(2, 2));
  random_affine(st, 8);
  bkn::options opt;
  opt.group_size = 4;
  const auto y = run_forward(opt, st, x);
  const auto ref = stats_of(x, 4);
  check_normalized(x, y, 4, ref.mean, ref.var, st.gamma, st.beta, opt.epsilon);
  // Statistics are kept in double: accurate to double precision, not float.
  for (std::size_t i = 0; i < ref.mean.size(); ++i)
    CHECK(std::fabs(st.posterior_cov[i] - ref.var[i]) <= 1e-13 * (ref.var[i] + 9));
}

TEST_CASE_TEMPLATE("forward: no prior is batch normalization, NHWC", P, float, double) {
  // The same numbers as an NCHW batch, stored channels-last: same y (to rounding), per group.
  const auto x = random_batch<P>(4, 3, 2, 3, 31);
  std::vector<P> nhwc(x.data.size()), y(x.data.size(), nan<P>());
  const auto at = [&](index_t n, index_t c, index_t s) {
    return std::size_t((n * x.S() + s) * x.C + c);
  };
  for (index_t n = 0; n < 4; ++n)
    for (index_t c = 0; c < 3; ++c)
      for (index_t s = 0; s < x.S(); ++s) nhwc[at(n, c, s)] = x.at(n, c, s);
  bkn::layer_storage<P> st(config<P>(3, 2));
  random_affine(st, 32);
  bkn::options opt;
  opt.group_size = 2;
  bkn::host_workspace ws(bkn::workspace_size(B{}, opt, {4, 3, 2, 3}));
  bkn::forward(B{}, opt, st.view(), bkn::tensor_view<const P>(bkn::nhwc(nhwc.data(), 4, 3, 2, 3)),
               bkn::nhwc(y.data(), 4, 3, 2, 3), bkn::gaussian_view<const P>(), ws.bytes());
  std::vector<P> y_nchw(y.size());
  for (index_t n = 0; n < 4; ++n)
    for (index_t c = 0; c < 3; ++c)
      for (index_t s = 0; s < x.S(); ++s) y_nchw[x.idx(n, c, s)] = y[at(n, c, s)];
  const auto ref = stats_of(x, 2);
  check_normalized(x, y_nchw, 2, ref.mean, ref.var, st.gamma, st.beta, opt.epsilon);
}

TEST_CASE_TEMPLATE("forward: full mode with a dense transition, end to end", P, float, double) {
  // Every step written out naively here in long double: S per group (C x C), the prediction
  // A Sigma_prev A^T + diag(softplus(rho)) from a prior of one group per statistics group, the
  // update p Sigma_pred + q S + p q d d^T, y from the posterior's diagonal, the EMA.
  const index_t N = 4, C = 3, Cin = 2, gs = 2, G = 2;
  const auto x = random_batch<P>(N, C, 2, 2, 33);
  std::mt19937 gen(34);
  std::uniform_real_distribution<double> u(-1, 1);
  bkn::layer_config cfg = config<P>(C, G, covariance::full);
  cfg.transition = bkn::transition_kind::dense;
  cfg.in_channels = Cin;
  cfg.noise = true;
  bkn::layer_storage<P> st(cfg);
  random_affine(st, 35);
  for (auto& a : st.transition_weights) a = P(u(gen));
  for (auto& r : st.noise) r = P(u(gen));
  st.gain_logit = {P(0.3)};
  gaussian<P> prior{std::vector<P>(std::size_t(G * Cin)),
                    std::vector<P>(std::size_t(G * Cin * Cin)), G, Cin};
  for (auto& m : prior.mean) m = P(2 * u(gen));
  for (index_t g = 0; g < G; ++g) {  // SPD: L L^T + I
    const double l0 = u(gen), l1 = u(gen), l2 = u(gen);
    const double S00 = l0 * l0 + 1, S01 = l0 * l1, S11 = l1 * l1 + l2 * l2 + 1;
    P* S = prior.cov.data() + g * Cin * Cin;
    S[0] = P(S00);
    S[1] = S[2] = P(S01);
    S[3] = P(S11);
  }
  bkn::options opt;
  opt.mode = covariance::full;
  opt.group_size = gs;
  opt.momentum = 0.25;
  const auto y = run_forward(opt, st, x, &prior, Cin);

  const long double q = 1.0L / (1.0L + std::exp(-static_cast<long double>(st.gain_logit[0])));
  const long double p = 1 - q;
  const long double eps = std::numeric_limits<P>::epsilon();
  const long double m = gs * x.S();
  std::vector<long double> post_mean(std::size_t(G * C)), post_var(std::size_t(G * C));
  std::vector<long double> ema_mean(std::size_t(C), 0), ema_var(std::size_t(C), 0);
  for (index_t g = 0; g < G; ++g) {
    // Observed.
    std::vector<long double> xbar(std::size_t(C), 0), S(std::size_t(C * C), 0);
    for (index_t c = 0; c < C; ++c) {
      for (index_t n = g * gs; n < (g + 1) * gs; ++n)
        for (index_t s = 0; s < x.S(); ++s) xbar[std::size_t(c)] += x.at(n, c, s);
      xbar[std::size_t(c)] /= m;
    }
    for (index_t i = 0; i < C; ++i)
      for (index_t j = 0; j < C; ++j) {
        for (index_t n = g * gs; n < (g + 1) * gs; ++n)
          for (index_t s = 0; s < x.S(); ++s)
            S[std::size_t(i * C + j)] +=
                (x.at(n, i, s) - xbar[std::size_t(i)]) * (x.at(n, j, s) - xbar[std::size_t(j)]);
        S[std::size_t(i * C + j)] /= m;
      }
    // Predicted.
    std::vector<long double> mp(std::size_t(C), 0), Sp(std::size_t(C * C), 0);
    const auto A = [&](index_t i, index_t k) -> long double {
      return st.transition_weights[std::size_t(i * Cin + k)];
    };
    const P* pm = prior.mean.data() + g * Cin;
    const P* pc = prior.cov.data() + g * Cin * Cin;
    for (index_t i = 0; i < C; ++i) {
      for (index_t k = 0; k < Cin; ++k) mp[std::size_t(i)] += A(i, k) * pm[k];
      for (index_t j = 0; j < C; ++j) {
        for (index_t k = 0; k < Cin; ++k)
          for (index_t l = 0; l < Cin; ++l)
            Sp[std::size_t(i * C + j)] += A(i, k) * pc[k * Cin + l] * A(j, l);
        if (i == j)
          Sp[std::size_t(i * C + j)] +=
              std::log1p(std::exp(static_cast<long double>(st.noise[std::size_t(i)])));
      }
    }
    // Update, compared entry by entry. Tolerance: each entry is a sum of O(1) terms computed
    // in double and stored in P, from statistics carrying a few eps: 64 eps of the scale.
    for (index_t i = 0; i < C; ++i) {
      const long double di = xbar[std::size_t(i)] - mp[std::size_t(i)];
      const long double mean = p * mp[std::size_t(i)] + q * xbar[std::size_t(i)];
      CHECK(std::fabs(st.posterior_mean[std::size_t(g * C + i)] - mean) <=
            64 * eps * (1 + std::fabs(mp[std::size_t(i)]) + std::fabs(xbar[std::size_t(i)])));
      post_mean[std::size_t(g * C + i)] = mean;
      for (index_t j = 0; j < C; ++j) {
        const long double dj = xbar[std::size_t(j)] - mp[std::size_t(j)];
        const long double e =
            p * Sp[std::size_t(i * C + j)] + q * S[std::size_t(i * C + j)] + p * q * di * dj;
        const long double scale = 1 + std::fabs(Sp[std::size_t(i * C + j)]) +
                                  std::fabs(S[std::size_t(i * C + j)]) + std::fabs(di * dj);
        CHECK(std::fabs(st.posterior_cov[std::size_t((g * C + i) * C + j)] - e) <=
              64 * eps * scale);
        CHECK(std::fabs(st.predicted_cov[std::size_t((g * C + i) * C + j)] -
                        Sp[std::size_t(i * C + j)]) <= 64 * eps * scale);
        CHECK(std::fabs(st.observed_cov[std::size_t((g * C + i) * C + j)] -
                        S[std::size_t(i * C + j)]) <= 64 * eps * scale);
        if (i == j) post_var[std::size_t(g * C + i)] = e;
      }
      ema_mean[std::size_t(i)] += mean / G;
      ema_var[std::size_t(i)] +=
          (post_var[std::size_t(g * C + i)] + q * S[std::size_t(i * C + i)] / (m - 1)) / G;
    }
  }
  check_normalized(x, y, gs, post_mean, post_var, st.gamma, st.beta, opt.epsilon);
  for (index_t c = 0; c < C; ++c) {
    // Initial moving averages (0, 1), momentum 1/4.
    CHECK(std::fabs(st.running_mean[std::size_t(c)] - 0.25L * ema_mean[std::size_t(c)]) <=
          64 * eps * (1 + std::fabs(ema_mean[std::size_t(c)])));
    CHECK(std::fabs(st.running_var[std::size_t(c)] - (0.75L + 0.25L * ema_var[std::size_t(c)])) <=
          64 * eps * (1 + ema_var[std::size_t(c)]));
  }
}

// ---- the limits of the gain ----

TEST_CASE_TEMPLATE("forward: a large gain logit approaches batch normalization", P, float, double) {
  const auto x = random_batch<P>(8, 2, 2, 1, 9);
  const gaussian<P> prior{{5, -4}, {0.5, 3}, 1, 2};
  bkn::options opt;
  opt.group_size = 4;
  bkn::layer_storage<P> bn(config<P>(2, 2));
  random_affine(bn, 10);
  const auto y_bn = run_forward(opt, bn, x);

  SUBCASE("logit 40: q = 1 to double precision, exactly BN") {
    bkn::layer_storage<P> st(config<P>(2, 2));
    random_affine(st, 10);
    st.gain_logit = {P(40)};
    const auto y = run_forward(opt, st, x, &prior);
    CHECK(y == y_bn);
    CHECK(st.posterior_mean == bn.posterior_mean);
    CHECK(st.posterior_cov == bn.posterior_cov);
  }
  SUBCASE("the gap to BN shrinks like p = 1 - q") {
    // p = sigmoid(-logit) ~ e^-logit: the posterior moves from BN's by p (prior - batch), so
    // y moves by O(p) (the prior is O(10) away here): < 1e-3 at logit 14, < 1e-7 at logit 24,
    // down to the rounding floor of P.
    const auto ref = stats_of(x, 4);
    for (double logit : {14.0, 24.0}) {
      CAPTURE(logit);
      bkn::layer_storage<P> st(config<P>(2, 2));
      random_affine(st, 10);
      st.gain_logit = {P(logit)};
      const auto y = run_forward(opt, st, x, &prior);
      const long double p = std::exp(-logit);
      check_normalized(x, y, 4, ref.mean, ref.var, st.gamma, st.beta, opt.epsilon, 1e3L * p);
    }
  }
}

TEST_CASE_TEMPLATE("forward: a very negative gain logit normalizes with the prediction", P, float,
                   double) {
  // q = sigmoid(-60) ~ 9e-27: the posterior is the prediction, here A = diag(a) applied to a
  // prior shared by both groups: mu_pred = a mu_prev, v_pred = a^2 v_prev (R = 0).
  const auto x = random_batch<P>(4, 2, 3, 1, 11);
  const gaussian<P> prior{{1.5, -2}, {0.75, 2}, 1, 2};
  bkn::layer_config cfg = config<P>(2, 2);
  cfg.transition = bkn::transition_kind::diagonal;
  bkn::layer_storage<P> st(cfg);
  random_affine(st, 12);
  st.gain_logit = {P(-60)};
  st.transition_weights = {2, -0.5};
  bkn::options opt;
  opt.group_size = 2;
  const auto y = run_forward(opt, st, x, &prior);
  // mu_pred = (3, 1), v_pred = (3, 0.5) for both groups.
  const std::vector<long double> mean{3, 1, 3, 1}, var{3, 0.5, 3, 0.5};
  check_normalized(x, y, 2, mean, var, st.gamma, st.beta, opt.epsilon);
  CHECK(st.predicted_mean == std::vector<P>{3, 1, 3, 1});
  CHECK(st.predicted_cov == std::vector<P>{3, 0.5, 3, 0.5});
  // The batch contributes q (xbar, S + d^2) ~ 1e-25: far below half an ulp of the prediction.
  CHECK(st.posterior_mean == std::vector<P>{3, 1, 3, 1});
  CHECK(st.posterior_cov == std::vector<P>{3, 0.5, 3, 0.5});
}

TEST_CASE_TEMPLATE("forward: options.fixed_gain 1 is BN, 0 is the prediction", P, float, double) {
  // The authors' fixed gain replaces sigmoid(gain_logit) (which is set far from both here).
  const auto x = random_batch<P>(6, 2, 1, 2, 37);
  const gaussian<P> prior{{1, -1}, {0.5, 2}, 1, 2};
  bkn::options opt;
  opt.group_size = 3;
  bkn::layer_storage<P> bn(config<P>(2, 2));
  random_affine(bn, 38);
  const auto y_bn = run_forward(opt, bn, x);
  for (double fixed : {1.0, 0.0}) {
    CAPTURE(fixed);
    bkn::layer_storage<P> st(config<P>(2, 2));
    random_affine(st, 38);
    st.gain_logit = {P(0.3)};
    bkn::options o = opt;
    o.fixed_gain = fixed;
    const auto y = run_forward(o, st, x, &prior);
    if (fixed == 1) {
      CHECK(y == y_bn);
      CHECK(st.posterior_cov == bn.posterior_cov);
    } else {
      // q = 0: the posterior is exactly the prediction (identity transition, R = 0).
      CHECK(st.posterior_mean == std::vector<P>{1, -1, 1, -1});
      CHECK(st.posterior_cov == std::vector<P>{0.5, 2, 0.5, 2});
      check_normalized(x, y, 3, {1, -1, 1, -1}, {0.5, 2, 0.5, 2}, st.gamma, st.beta, opt.epsilon);
    }
  }
}

// ---- moving averages ----

TEST_CASE_TEMPLATE("forward: moving averages without a prior", P, float, double) {
  // running = (1 - momentum) running + momentum * estimate, the estimate averaged over the
  // groups, with the variance's Bessel correction m / (m - 1) (m = group size * H * W) when
  // unbiased_running_variance is set, and the biased variance otherwise.
  const auto x = random_batch<P>(6, 2, 2, 2, 13);
  const index_t gs = 3, G = 2;
  const long double m = gs * 4;
  const auto ref = stats_of(x, gs);
  for (bool unbiased : {true, false}) {
    CAPTURE(unbiased);
    bkn::layer_storage<P> st(config<P>(2, G));
    st.running_mean = {P(0.5), P(-1)};
    st.running_var = {P(2), P(0.25)};
    bkn::options opt;
    opt.group_size = gs;
    opt.momentum = 0.3;
    opt.unbiased_running_variance = unbiased;
    run_forward(opt, st, x);
    for (index_t c = 0; c < 2; ++c) {
      long double mean = 0, var = 0;
      for (index_t g = 0; g < G; ++g) {
        mean += ref.mean[std::size_t(g * 2 + c)] / G;
        var += ref.var[std::size_t(g * 2 + c)] * (unbiased ? m / (m - 1) : 1) / G;
      }
      const long double r0m = c == 0 ? 0.5L : -1.0L, r0v = c == 0 ? 2.0L : 0.25L;
      const long double em = 0.7L * r0m + 0.3L * mean, ev = 0.7L * r0v + 0.3L * var;
      // A few roundings of O(|running| + |estimate|) values (the statistics themselves carry a
      // few eps): 16 eps of that scale.
      const long double eps = std::numeric_limits<P>::epsilon();
      CHECK(std::fabs(st.running_mean[std::size_t(c)] - em) <=
            16 * eps * (std::fabs(r0m) + std::fabs(mean) + 1));
      CHECK(std::fabs(st.running_var[std::size_t(c)] - ev) <= 16 * eps * (r0v + var + 1));
    }
  }
}

TEST_CASE_TEMPLATE("forward: moving averages with exact statistics (hand-computed)", P, float,
                   double) {
  // NC, N = 4, one group. Channel 0: 1, 3, 5, 7 (mean 4, biased var 5, unbiased 20/3);
  // channel 1: -1, -1, 1, 1 (mean 0, var 1, unbiased 4/3). momentum 0.5, running (0, 1):
  //   mean (2, 0); var unbiased (0.5 + 10/3, 0.5 + 2/3) = (23/6, 7/6); biased (3, 1).
  batch<P> x{4, 2, 1, 1, {1, -1, 3, -1, 5, 1, 7, 1}};
  bkn::options opt;
  opt.momentum = 0.5;
  bkn::layer_storage<P> st(config<P>(2, 1));
  run_forward(opt, st, x);
  CHECK(st.running_mean == std::vector<P>{2, 0});
  const P eps = std::numeric_limits<P>::epsilon();
  CHECK(std::fabs(st.running_var[0] - P(23.0L / 6)) <= 2 * eps * 4);
  CHECK(std::fabs(st.running_var[1] - P(7.0L / 6)) <= 2 * eps * 2);
  opt.unbiased_running_variance = false;
  bkn::layer_storage<P> sb(config<P>(2, 1));
  run_forward(opt, sb, x);
  CHECK(sb.running_mean == std::vector<P>{2, 0});
  CHECK(sb.running_var == std::vector<P>{3, 1});

  SUBCASE("momentum 0 keeps the moving averages, momentum 1 replaces them") {
    opt.momentum = 0;
    bkn::layer_storage<P> s0(config<P>(2, 1));
    s0.running_mean = {P(0.1), P(0.2)};
    s0.running_var = {P(0.3), P(0.4)};
    run_forward(opt, s0, x);
    CHECK(s0.running_mean == std::vector<P>{P(0.1), P(0.2)});
    CHECK(s0.running_var == std::vector<P>{P(0.3), P(0.4)});
    opt.momentum = 1;
    run_forward(opt, s0, x);
    CHECK(s0.running_mean == std::vector<P>{4, 0});
    CHECK(s0.running_var == std::vector<P>{5, 1});
  }
}

TEST_CASE_TEMPLATE("forward: moving averages with a prior", P, float, double) {
  // With q = 1/2 and a prior, the estimate is the posterior with its observed part
  // Bessel-corrected: p v_pred + q S m / (m - 1) + p q d^2 (and the posterior mean).
  // One channel, NC, N = 4: x = 1, 3, 5, 7: xbar 4, S 5, m = 4. Prior N(2, 6): d = 2.
  //   mean estimate 3; var estimate 3 + 10/3 + 1 = 22/3 (biased: 3 + 2.5 + 1 = 6.5).
  // momentum 1 makes running equal the estimate.
  batch<P> x{4, 1, 1, 1, {1, 3, 5, 7}};
  const gaussian<P> prior{{2}, {6}, 1, 1};
  bkn::options opt;
  opt.momentum = 1;
  bkn::layer_storage<P> st(config<P>(1, 1));
  st.gain_logit = {P(0)};
  run_forward(opt, st, x, &prior);
  CHECK(st.posterior_mean == std::vector<P>{3});
  CHECK(st.posterior_cov == std::vector<P>{6.5});
  CHECK(st.running_mean == std::vector<P>{3});
  CHECK(std::fabs(st.running_var[0] - P(22.0L / 3)) <= 2 * std::numeric_limits<P>::epsilon() * 8);
  opt.unbiased_running_variance = false;
  bkn::layer_storage<P> sb(config<P>(1, 1));
  sb.gain_logit = {P(0)};
  run_forward(opt, sb, x, &prior);
  CHECK(sb.running_var == std::vector<P>{6.5});
}

TEST_CASE_TEMPLATE("forward: moving averages with a per-channel gain", P, float, double) {
  // Two channels, logits (0, 40): q = (1/2, 1). x = NC rows (1, -1), (3, -1), (5, 1), (7, 1):
  // channel 0 xbar 4, S 5; channel 1 xbar 0, S 1; m = 4. Prior N((2, 3), (6, 2)), momentum 1.
  //   channel 0 (q = 1/2, d = 2): mean 3, var 3 + 2.5 + 1 = 6.5, estimate 3 + 10/3 + 1 = 22/3
  //   channel 1 (q = 1): the batch: mean 0, var 1, estimate 4/3 (the prior drops out)
  batch<P> x{4, 2, 1, 1, {1, -1, 3, -1, 5, 1, 7, 1}};
  const gaussian<P> prior{{2, 3}, {6, 2}, 1, 2};
  bkn::layer_config cfg = config<P>(2, 1);
  cfg.per_channel_gain = true;
  bkn::layer_storage<P> st(cfg);
  st.gain_logit = {P(0), P(40)};
  bkn::options opt;
  opt.momentum = 1;
  run_forward(opt, st, x, &prior);
  CHECK(st.posterior_mean == std::vector<P>{3, 0});
  CHECK(st.posterior_cov == std::vector<P>{6.5, 1});
  CHECK(st.running_mean == std::vector<P>{3, 0});
  const P eps = std::numeric_limits<P>::epsilon();
  CHECK(std::fabs(st.running_var[0] - P(22.0L / 3)) <= 2 * eps * 8);
  CHECK(std::fabs(st.running_var[1] - P(4.0L / 3)) <= 2 * eps * 2);
}

TEST_CASE_TEMPLATE("forward: moving averages take each group's own gain (skip rule)", P, float,
                   double) {
  // One channel, groups of 2 (m = 2, Bessel factor 2), prior N(0, 20) shared, q = 1/2 learned,
  // options.skip_threshold 10 with epsilon 1: a group keeps q = 1 when v_pred / (S + 1) >= 10.
  //   group 0: x = 1, 3: xbar 2, S 1: ratio 20 / 2 = 10 -> skipped: posterior N(2, 1),
  //            estimate var S m / (m - 1) = 2
  //   group 1: x = -4, 4: xbar 0, S 16: ratio 20 / 17 -> fused, d = 0: posterior N(0, 18),
  //            estimate var 10 + 1/2 * 16 * 2 = 26
  // momentum 1: running mean (2 + 0) / 2 = 1, running var (2 + 26) / 2 = 14.
  batch<P> x{4, 1, 1, 1, {1, 3, -4, 4}};
  const gaussian<P> prior{{0}, {20}, 1, 1};
  bkn::layer_storage<P> st(config<P>(1, 2));
  st.gain_logit = {P(0)};
  bkn::options opt;
  opt.group_size = 2;
  opt.epsilon = 1;
  opt.momentum = 1;
  opt.skip_threshold = 10;
  run_forward(opt, st, x, &prior);
  CHECK(st.posterior_mean == std::vector<P>{2, 0});
  CHECK(st.posterior_cov == std::vector<P>{1, 18});
  CHECK(st.running_mean == std::vector<P>{1});
  CHECK(st.running_var == std::vector<P>{14});
}

TEST_CASE_TEMPLATE("forward: inference leaves the moving averages untouched", P, float, double) {
  const auto x = random_batch<P>(4, 2, 2, 2, 15);
  for (auto source : {bkn::inference_statistics::running, bkn::inference_statistics::chain}) {
    bkn::layer_storage<P> st(config<P>(2, 2));
    st.running_mean = {P(0.3), P(-0.7)};
    st.running_var = {P(1.1), P(2.9)};
    const auto before_m = bytes_of(st.running_mean), before_v = bytes_of(st.running_var);
    bkn::options opt;
    opt.group_size = 2;
    opt.training = false;
    opt.inference = source;
    run_forward(opt, st, x);
    CHECK(bytes_of(st.running_mean) == before_m);
    CHECK(bytes_of(st.running_var) == before_v);
  }
}

TEST_CASE_TEMPLATE("forward: non-finite statistics leave the moving averages as they were", P,
                   float, double) {
  for (P bad : {nan<P>(), std::numeric_limits<P>::infinity()}) {
    for (covariance mode : {covariance::diagonal, covariance::full}) {
      for (bool with_prior : {false, true}) {
        CAPTURE(with_prior);
        CAPTURE(mode == covariance::full);
        auto x = random_batch<P>(4, 2, 1, 1, 17);
        x.data[x.idx(2, 0, 0)] = bad;  // poisons channel 0 of group 1 (groups of 2)
        bkn::layer_storage<P> st(config<P>(2, 2, mode));
        st.gain_logit = {P(0)};
        st.running_mean = {P(0.3), P(-0.7)};
        st.running_var = {P(1.1), P(2.9)};
        const gaussian<P> prior{
            {0, 0},
            mode == covariance::full ? std::vector<P>{1, 0, 0, 1} : std::vector<P>{1, 1},
            1,
            2};
        const P m0 = st.running_mean[0], v0 = st.running_var[0];
        bkn::options opt;
        opt.mode = mode;
        opt.group_size = 2;
        run_forward(opt, st, x, with_prior ? &prior : nullptr);
        CHECK(std::memcmp(&st.running_mean[0], &m0, sizeof(P)) == 0);
        CHECK(std::memcmp(&st.running_var[0], &v0, sizeof(P)) == 0);
        // Channel 1 saw only finite values: it is updated, and stays finite.
        CHECK(st.running_mean[1] != P(-0.7));
        CHECK(std::isfinite(st.running_mean[1]));
        CHECK(std::isfinite(st.running_var[1]));
      }
    }
  }
}

// ---- inference ----

TEST_CASE_TEMPLATE("forward: inference from the moving averages", P, float, double) {
  const auto x = random_batch<P>(4, 3, 2, 1, 19);
  for (covariance mode : {covariance::diagonal, covariance::full}) {
    CAPTURE(mode == covariance::full);
    bkn::layer_storage<P> st(config<P>(3, 2, mode));
    random_affine(st, 20);
    st.running_mean = {P(0.5), P(-1), P(2)};
    st.running_var = {P(0.25), P(4), P(1.5)};
    bkn::options opt;
    opt.mode = mode;
    opt.group_size = 2;
    opt.training = false;
    const auto y = run_forward(opt, st, x);
    const std::vector<long double> mean{0.5, -1, 2, 0.5, -1, 2}, var{0.25, 4, 1.5, 0.25, 4, 1.5};
    check_normalized(x, y, 2, mean, var, st.gamma, st.beta, opt.epsilon);
    // The posterior state of every group holds the moving averages (full mode: diagonal).
    CHECK(st.posterior_mean == std::vector<P>{P(0.5), P(-1), P(2), P(0.5), P(-1), P(2)});
    if (mode == covariance::diagonal) {
      CHECK(st.posterior_cov == std::vector<P>{P(0.25), P(4), P(1.5), P(0.25), P(4), P(1.5)});
    } else {
      std::vector<P> expect(18, P(0));
      for (int g = 0; g < 2; ++g)
        for (int c = 0; c < 3; ++c)
          expect[std::size_t((g * 3 + c) * 3 + c)] = st.running_var[std::size_t(c)];
      CHECK(st.posterior_cov == expect);
    }
  }
}

TEST_CASE_TEMPLATE("forward: inference from the moving averages needs no state", P, float, double) {
  // Inference from running statistics does not read or need observed/predicted/posterior.
  const auto x = random_batch<P>(2, 2, 1, 1, 21);
  bkn::layer_storage<P> st(config<P>(2, 1));
  st.running_mean = {P(1), P(-1)};
  st.running_var = {P(3.75), P(0.75)};  // + eps 0.25: sigma 2 and 1
  auto L = st.view();
  L.state = {};
  bkn::options opt;
  opt.training = false;
  opt.epsilon = 0.25;
  std::vector<P> y(4, nan<P>());
  bkn::host_workspace ws(bkn::workspace_size(B{}, opt, {2, 2, 1, 1}));
  bkn::forward(B{}, opt, L, x.view(), x.out_view(y), bkn::gaussian_view<const P>(), ws.bytes());
  for (index_t n = 0; n < 2; ++n) {
    CHECK(y[std::size_t(n * 2)] == (x.at(n, 0, 0) - 1) / 2);
    CHECK(y[std::size_t(n * 2 + 1)] == x.at(n, 1, 0) + 1);
  }
}

TEST_CASE_TEMPLATE("forward: inference from the chain equals a training forward", P, float,
                   double) {
  const auto x = random_batch<P>(6, 2, 2, 2, 23);
  const gaussian<P> prior{{0.5, -1, 1, 2}, {1, 2, 0.5, 0.25}, 2, 2};
  for (bool with_prior : {false, true}) {
    CAPTURE(with_prior);
    bkn::options opt;
    opt.group_size = 3;
    bkn::layer_storage<P> train(config<P>(2, 2)), infer(config<P>(2, 2));
    for (auto* s : {&train, &infer}) {
      random_affine(*s, 24);
      s->gain_logit = {P(-0.5)};
      s->running_mean = {P(0.3), P(0.1)};
      s->running_var = {P(1.5), P(0.5)};
    }
    const auto run_mean = bytes_of(infer.running_mean), run_var = bytes_of(infer.running_var);
    const auto y_train = run_forward(opt, train, x, with_prior ? &prior : nullptr);
    opt.training = false;
    opt.inference = bkn::inference_statistics::chain;
    const auto y_infer = run_forward(opt, infer, x, with_prior ? &prior : nullptr);
    CHECK(y_infer == y_train);
    CHECK(infer.posterior_mean == train.posterior_mean);
    CHECK(infer.posterior_cov == train.posterior_cov);
    CHECK(bytes_of(infer.running_mean) == run_mean);
    CHECK(bytes_of(infer.running_var) == run_var);
  }
}

// ---- a constant channel ----

namespace {

template <class P>
struct grad_run {
  std::vector<P> y, dx;
};

// Forward then backward of one isolated layer (dposterior zero) with the given dy.
template <class P>
grad_run<P> forward_backward(const bkn::options& opt, bkn::layer_storage<P>& st, const batch<P>& x,
                             const std::vector<P>& dy, const gaussian<P>* prior) {
  grad_run<P> r{std::vector<P>(x.data.size(), nan<P>()), std::vector<P>(x.data.size(), nan<P>())};
  bkn::host_workspace ws(bkn::workspace_size(B{}, opt, x.view().shape()));
  const auto pv = prior ? prior->cview() : bkn::gaussian_view<const P>();
  bkn::forward(B{}, opt, st.view(), x.view(), x.out_view(r.y), pv, ws.bytes());
  batch<P> d{x.N, x.C, x.H, x.W, dy};
  bkn::backward(B{}, opt, st.view(), x.view(), d.view(), x.out_view(r.dx), pv,
                bkn::gaussian_view<P>(), ws.bytes());
  return r;
}

}  // namespace

TEST_CASE_TEMPLATE("forward: a constant channel gives finite outputs and gradients", P, float,
                   double) {
  // Channel 0 is 3 everywhere; channel 1 varies. NCHW 4 x 2 x 2 x 2, one group (m = 16).
  auto x = random_batch<P>(4, 2, 2, 2, 25);
  for (index_t n = 0; n < 4; ++n)
    for (index_t s = 0; s < 4; ++s) x.data[x.idx(n, 0, s)] = P(3);
  std::mt19937 gen(26);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<P> dy(x.data.size());
  for (auto& v : dy) v = P(u(gen));
  long double dy_max = 0, dy_mean0 = 0;
  for (index_t n = 0; n < 4; ++n)
    for (index_t s = 0; s < 4; ++s) {
      dy_max = std::max<long double>(dy_max, std::fabs(dy[x.idx(n, 0, s)]));
      dy_mean0 += dy[x.idx(n, 0, s)] / 16.0L;
    }
  const P gamma0 = P(1.5), beta0 = P(0.25);
  const P eps = std::numeric_limits<P>::epsilon();

  auto all_finite = [](const std::vector<P>& v) {
    return std::all_of(v.begin(), v.end(), [](P a) { return std::isfinite(a); });
  };

  for (covariance mode : {covariance::diagonal, covariance::full}) {
    CAPTURE(mode == covariance::full);
    const bool full = mode == covariance::full;
    bkn::options opt;  // epsilon 1e-5
    opt.mode = mode;
    // Index of channel 0's variance in a state's cov array.
    const std::size_t v0 = 0;

    // q = 1 (no prior): y = beta, dx = gamma / sqrt(S + eps) (dy - mean dy).
    {
      bkn::layer_storage<P> st(config<P>(2, 1, mode));
      st.gamma = {gamma0, P(1)};
      st.beta = {beta0, P(0)};
      const auto r = forward_backward<P>(opt, st, x, dy, nullptr);
      CHECK(all_finite(r.y));
      CHECK(all_finite(r.dx));
      CHECK(all_finite(st.dgamma));
      CHECK(all_finite(st.dbeta));
      CHECK(st.observed_cov[v0] >= 0);
      // The gradient is amplified by 1/sqrt(eps) ~ 316, as in BN (math.md). S may be a tiny
      // rounding residue (never test S == 0), negligible against eps. In full mode the
      // gradient matrix G is diagonal here, and x - mu = 0 on the channel: the same dx.
      const long double a =
          gamma0 / std::sqrt(static_cast<long double>(st.observed_cov[v0]) + 1e-5L);
      for (index_t n = 0; n < 4; ++n)
        for (index_t s = 0; s < 4; ++s) {
          const std::size_t i = x.idx(n, 0, s);
          // y = a (x - mu) + beta with x - mu = 0 exactly (the mean of 16 threes is 3 in any
          // summation order): y is beta, exactly.
          CHECK(r.y[i] == beta0);
          const long double expect = a * (dy[i] - dy_mean0);
          CHECK(std::fabs(r.dx[i] - expect) <= 64 * eps * a);
        }
    }
    // q < 1: the gradient stays bounded by the prior's variance.
    {
      // Prior N(0, I), q = p = 1/2: sigma^2 = p v_pred + p q d^2 + q S + eps >= 1/2. With the
      // coefficients of math.md and x - mu = p d on the constant channel,
      // |dx| <= 3 gamma max|dy| / sqrt(p v_pred) (each of the three terms is at most
      // gamma max|dy| / sigma); in full mode G is diagonal here, so the same bound holds.
      const gaussian<P> prior{
          {0, 0}, full ? std::vector<P>{1, 0, 0, 1} : std::vector<P>{1, 1}, 1, 2};
      bkn::layer_storage<P> st(config<P>(2, 1, mode));
      st.gamma = {gamma0, P(1)};
      st.beta = {beta0, P(0)};
      st.gain_logit = {P(0)};
      const auto r = forward_backward<P>(opt, st, x, dy, &prior);
      CHECK(all_finite(r.y));
      CHECK(all_finite(r.dx));
      CHECK(all_finite(st.dgain_logit));
      CHECK(all_finite(st.dgamma));
      const long double bound = 3 * gamma0 * dy_max / std::sqrt(0.5L);
      long double dx_max = 0;
      for (index_t n = 0; n < 4; ++n)
        for (index_t s = 0; s < 4; ++s)
          dx_max = std::max<long double>(dx_max, std::fabs(r.dx[x.idx(n, 0, s)]));
      CHECK(dx_max <= bound);
      // Far below BN's 1/sqrt(eps) amplification.
      CHECK(dx_max < 10 * dy_max);
      // Posterior of the constant channel: mean 3/2, var 1/2 + 1/4 * 9 + 1/2 S = 2.75 (+ S/2).
      CHECK(st.posterior_mean[0] == P(1.5));
      CHECK(std::fabs(st.posterior_cov[v0] - P(2.75)) <= 4 * eps * 3);
    }
  }
}

// ---- m = 1 ----

TEST_CASE_TEMPLATE("forward: m = 1 needs a prior", P, float, double) {
  // NC with groups of one sample: one value per channel and group.
  batch<P> x{4, 2, 1, 1, {1, -2, 3, 0.5, -1, 4, 2, 2}};
  bkn::options opt;
  opt.group_size = 1;

  SUBCASE("without a prior, training is rejected naming x") {
    bkn::layer_storage<P> st(config<P>(2, 4));
    std::vector<P> y(8, P(7));
    bkn::host_workspace ws(bkn::workspace_size(B{}, opt, {4, 2, 1, 1}));
    const auto e = thrown([&] {
      bkn::forward(B{}, opt, st.view(), x.view(), x.out_view(y), bkn::gaussian_view<const P>(),
                   ws.bytes());
    });
    CHECK(std::string(e.routine()) == "bkn::forward");
    CHECK(std::string(e.argument()) == "x");
    CHECK(std::string(e.what()).find("prior") != std::string::npos);
    CHECK(y == std::vector<P>(8, P(7)));
    // Same for the whole batch when N = 1.
    batch<P> one{1, 2, 1, 1, {1, 2}};
    bkn::options whole;
    bkn::layer_storage<P> s1(config<P>(2, 1));
    std::vector<P> y1(2);
    CHECK_THROWS_AS(bkn::forward(B{}, whole, s1.view(), one.view(), one.out_view(y1),
                                 bkn::gaussian_view<const P>(), ws.bytes()),
                    bkn::invalid_argument);
  }
  SUBCASE("with a prior: posterior variance p v_pred + p q (x - mu_pred)^2") {
    // Prior N((0, 1), (2, 0.5)) shared by the 4 groups, q = p = 1/2, R = 0:
    //   mean = (mu_pred + x) / 2, var = v_pred / 2 + (x - mu_pred)^2 / 4 (exact here).
    const gaussian<P> prior{{0, 1}, {2, 0.5}, 1, 2};
    bkn::layer_storage<P> st(config<P>(2, 4));
    st.gain_logit = {P(0)};
    opt.epsilon = 1e-3;
    const auto y = run_forward(opt, st, x, &prior);
    std::vector<long double> mean(8), var(8);
    for (index_t n = 0; n < 4; ++n)
      for (index_t c = 0; c < 2; ++c) {
        const std::size_t i = std::size_t(n * 2 + c);
        const long double mp = c == 0 ? 0 : 1, vp = c == 0 ? 2 : 0.5;
        const long double d = x.data[i] - mp;
        mean[i] = (mp + x.data[i]) / 2;
        var[i] = vp / 2 + d * d / 4;
        CHECK(st.posterior_mean[i] == P(mean[i]));
        CHECK(st.posterior_cov[i] == P(var[i]));
        CHECK(st.posterior_cov[i] > 0);
        CHECK(std::isfinite(st.posterior_cov[i]));
        CHECK(st.observed_cov[i] == 0);
      }
    check_normalized(x, y, 1, mean, var, st.gamma, st.beta, opt.epsilon);
    // Training also updated the moving averages, finitely (m = 1: no Bessel correction).
    CHECK(std::isfinite(st.running_var[0]));
    CHECK(std::isfinite(st.running_var[1]));
    // And it backpropagates: finite, non-zero input gradients.
    std::vector<P> dy(8, P(1)), dx(8, nan<P>());
    dy[0] = P(-0.5);
    bkn::host_workspace ws(bkn::workspace_size(B{}, opt, {4, 2, 1, 1}));
    bkn::backward(B{}, opt, st.view(), x.view(), batch<P>{4, 2, 1, 1, dy}.view(), x.out_view(dx),
                  prior.cview(), bkn::gaussian_view<P>(), ws.bytes());
    CHECK(std::all_of(dx.begin(), dx.end(), [](P v) { return std::isfinite(v) && v != 0; }));
  }
}

// ---- float32 with a large offset ----

TEST_CASE("forward: float32 statistics of 1e4 + N(0, 1) match double within 1e-3") {
  // m = 65536 values per channel with a 1e4 offset: E[x^2] - E[x]^2 in float is useless and a
  // float two-pass is off by ~8x (math.md). The reference target: two-pass in long double over
  // the very same float values.
  const index_t m = 65536;
  std::mt19937_64 gen(27);
  std::normal_distribution<double> z;
  std::vector<float> nc(std::size_t(m * 2));
  for (auto& v : nc) v = float(1e4 + z(gen));

  auto exact = [&](index_t c, long double& mean, long double& var) {
    long double s = 0;
    for (index_t i = 0; i < m; ++i) s += nc[std::size_t(i * 2 + c)];
    mean = s / m;
    long double s2 = 0;
    for (index_t i = 0; i < m; ++i) {
      const long double d = nc[std::size_t(i * 2 + c)] - mean;
      s2 += d * d;
    }
    var = s2 / m;
  };

  // The same values as NCHW 16 x 2 x 64 x 64: channel c of sample n holds rows n*4096 ...
  std::vector<float> nchw(nc.size());
  for (index_t n = 0; n < 16; ++n)
    for (index_t c = 0; c < 2; ++c)
      for (index_t s = 0; s < 4096; ++s)
        nchw[std::size_t((n * 2 + c) * 4096 + s)] = nc[std::size_t((n * 4096 + s) * 2 + c)];

  bkn::options opt;
  bkn::host_workspace ws(bkn::workspace_size(B{}, opt, {m, 2, 1, 1}));
  std::vector<float> mean_nc(2), var_nc(2), mean_im(2), var_im(2);
  bkn::observe(B{}, opt, bkn::tensor_view<const float>(bkn::nc(nc.data(), m, 2)),
               bkn::gaussian_view<float>(mean_nc, var_nc, 1, 2), ws.bytes());
  bkn::observe(B{}, opt, bkn::tensor_view<const float>(bkn::nchw(nchw.data(), 16, 2, 64, 64)),
               bkn::gaussian_view<float>(mean_im, var_im, 1, 2), ws.bytes());
  for (index_t c = 0; c < 2; ++c) {
    long double mean, var;
    exact(c, mean, var);
    CAPTURE(c);
    CHECK(var > 0.9L);  // sanity: the data is what it claims
    CHECK(var < 1.1L);
    CHECK(std::fabs(mean_nc[std::size_t(c)] - mean) <= 1e-3L * std::fabs(mean));
    CHECK(std::fabs(var_nc[std::size_t(c)] - var) <= 1e-3L * var);
    CHECK(std::fabs(mean_im[std::size_t(c)] - mean) <= 1e-3L * std::fabs(mean));
    CHECK(std::fabs(var_im[std::size_t(c)] - var) <= 1e-3L * var);
  }

  // Through forward too: the posterior (no prior) is these statistics, and y is standardized.
  bkn::layer_storage<float> st(config<float>(2, 1));
  batch<float> x{m, 2, 1, 1, nc};
  const auto y = run_forward(opt, st, x);
  for (index_t c = 0; c < 2; ++c) {
    long double mean, var;
    exact(c, mean, var);
    CHECK(std::fabs(st.posterior_cov[std::size_t(c)] - var) <= 1e-3L * var);
    long double s = 0, s2 = 0;
    for (index_t i = 0; i < m; ++i) {
      s += y[std::size_t(i * 2 + c)];
      s2 += static_cast<long double>(y[std::size_t(i * 2 + c)]) * y[std::size_t(i * 2 + c)];
    }
    // Standardized output: mean ~0 and variance ~1 (up to eps / var = 1e-5 from epsilon).
    CHECK(std::fabs(s / m) <= 1e-2L);
    CHECK(std::fabs(s2 / m - 1) <= 1e-2L);
  }
}

// ---- in place ----

TEST_CASE_TEMPLATE("forward: y may be the same view as x", P, float, double) {
  const gaussian<P> prior{{0.5, -1, 0}, {1, 2, 0.5}, 1, 3};
  for (bool with_prior : {false, true}) {
    for (index_t H : {index_t(1), index_t(3)}) {
      CAPTURE(with_prior);
      CAPTURE(H);
      const auto x = random_batch<P>(4, 3, H, 2, 29);
      bkn::options opt;
      opt.group_size = 2;
      bkn::layer_storage<P> a(config<P>(3, 2)), b(config<P>(3, 2));
      random_affine(a, 30);
      random_affine(b, 30);
      a.gain_logit = b.gain_logit = {P(0.3)};
      const auto y = run_forward(opt, a, x, with_prior ? &prior : nullptr);
      auto z = x;  // normalized in place
      bkn::host_workspace ws(bkn::workspace_size(B{}, opt, x.view().shape()));
      bkn::forward(B{}, opt, b.view(), bkn::tensor_view<const P>(z.out_view(z.data)),
                   z.out_view(z.data), with_prior ? prior.cview() : bkn::gaussian_view<const P>(),
                   ws.bytes());
      CHECK(z.data == y);
      CHECK(b.posterior_mean == a.posterior_mean);
      CHECK(b.running_var == a.running_var);
    }
  }
}

// ---- N = 0 ----

TEST_CASE_TEMPLATE("forward: N = 0 changes nothing", P, float, double) {
  for (bool training : {true, false}) {
    CAPTURE(training);
    bkn::layer_storage<P> st(config<P>(3, 1));
    // Sentinel values everywhere the forward could write.
    for (auto* v : {&st.running_mean, &st.running_var, &st.observed_mean, &st.observed_cov,
                    &st.predicted_mean, &st.predicted_cov, &st.posterior_mean, &st.posterior_cov})
      std::fill(v->begin(), v->end(), P(-123.25));
    std::vector<P> ybuf(6, P(42.5));
    std::vector<P> xbuf(6, P(1));
    const auto before = std::vector<std::vector<unsigned char>>{
        bytes_of(st.running_mean),   bytes_of(st.running_var),    bytes_of(st.observed_mean),
        bytes_of(st.observed_cov),   bytes_of(st.predicted_mean), bytes_of(st.predicted_cov),
        bytes_of(st.posterior_mean), bytes_of(st.posterior_cov),  bytes_of(ybuf)};
    bkn::options opt;
    opt.training = training;
    opt.group_size = 4;  // does not matter for N = 0
    const gaussian<P> prior{{0, 0, 0}, {1, 1, 1}, 1, 3};
    for (const gaussian<P>* pr : {static_cast<const gaussian<P>*>(nullptr), &prior}) {
      // NC and NCHW, with data and with null pointers, and without a workspace.
      bkn::forward(B{}, opt, st.view(), bkn::tensor_view<const P>(bkn::nc(xbuf.data(), 0, 3)),
                   bkn::nc(ybuf.data(), 0, 3), pr ? pr->cview() : bkn::gaussian_view<const P>(),
                   span<std::byte>());
      bkn::forward(B{}, opt, st.view(),
                   bkn::tensor_view<const P>(bkn::nchw<P>(nullptr, 0, 3, 4, 4)),
                   bkn::nchw<P>(nullptr, 0, 3, 4, 4),
                   pr ? pr->cview() : bkn::gaussian_view<const P>(), span<std::byte>());
    }
    const auto after = std::vector<std::vector<unsigned char>>{
        bytes_of(st.running_mean),   bytes_of(st.running_var),    bytes_of(st.observed_mean),
        bytes_of(st.observed_cov),   bytes_of(st.predicted_mean), bytes_of(st.predicted_cov),
        bytes_of(st.posterior_mean), bytes_of(st.posterior_cov),  bytes_of(ybuf)};
    CHECK(after == before);
  }
}


// ---- one Kalman pass ----

TEST_CASE_TEMPLATE("forward: one Kalman pass gives the values of the separate steps", P, float,
                   double) {
  // Through an identity or diagonal A (steps.hpp, kalman_step), forward runs predict, the gains,
  // update and the normalization's coefficients as one pass; bkn::predict, bkn::update and
  // bkn::normalize run them one after another. Both must give the same values, for each way the
  // per-channel inputs can be absent, shared or per channel.
  const index_t N = 6, C = 5, H = 2, W = 3, group_size = 2, G = N / group_size;
  const auto x = random_batch<P>(N, C, H, W, 41);
  std::mt19937 gen(42);
  std::normal_distribution<double> z;
  const auto draw = [&](std::vector<P>& v, double offset, double spread) {
    for (auto& e : v) e = P(offset + spread * z(gen));
  };
  int cases = 0;
  for (auto kind : {bkn::transition_kind::identity, bkn::transition_kind::diagonal})
    for (index_t prior_groups : {index_t(1), G})
      for (bool noise : {false, true})
        for (bool per_channel_gain : {false, true})
          for (double fixed_gain : {-1.0, 0.25})
            for (bool affine : {false, true}) {
              CAPTURE(int(kind));
              CAPTURE(prior_groups);
              CAPTURE(noise);
              CAPTURE(per_channel_gain);
              CAPTURE(fixed_gain);
              CAPTURE(affine);
              bkn::layer_config cfg = config<P>(C, G);
              cfg.transition = kind;
              cfg.noise = noise;
              cfg.per_channel_gain = per_channel_gain;
              cfg.affine = affine;
              bkn::layer_storage<P> st(cfg);
              draw(st.gain_logit, 0, 1.5);
              draw(st.transition_weights, 1, 0.3);
              draw(st.noise, -2, 1);
              if (affine) random_affine(st, 43);
              gaussian<P> prior{std::vector<P>(std::size_t(prior_groups * C)),
                                std::vector<P>(std::size_t(prior_groups * C)), prior_groups, C};
              draw(prior.mean, 0.5, 2);
              for (auto& v : prior.cov) v = P(0.2 + std::fabs(z(gen)));
              bkn::options opt;
              opt.group_size = group_size;
              opt.fixed_gain = fixed_gain;
              const auto y = run_forward(opt, st, x, &prior);

              // The steps one by one, from forward's own observed statistics.
              const bkn::layer<P> L = st.view();
              std::vector<P> pm(std::size_t(G * C)), pv(pm.size()), qm(pm.size()), qv(pm.size());
              const bkn::gaussian_view<P> predicted(pm, pv, G, C), posterior(qm, qv, G, C);
              bkn::host_workspace ws(bkn::workspace_size(B{}, opt, x.view().shape()));
              bkn::predict(B{}, opt, L.params.transition, L.params.noise, prior.cview(),
                           predicted, ws.bytes());
              bkn::update(B{}, opt, L.params.gain_logit, bkn::gaussian_view<const P>(predicted),
                          bkn::gaussian_view<const P>(L.state.observed), posterior, ws.bytes());
              std::vector<P> y_steps(y.size());
              bkn::normalize(B{}, opt, x.view(), x.out_view(y_steps), L.params.gamma,
                             L.params.beta, bkn::gaussian_view<const P>(posterior), ws.bytes());
              CHECK(st.predicted_mean == pm);
              CHECK(st.predicted_cov == pv);
              CHECK(st.posterior_mean == qm);
              CHECK(st.posterior_cov == qv);
              CHECK(y == y_steps);
              ++cases;
            }
  CHECK(cases == 64);
}

TEST_CASE_TEMPLATE("forward: the skip rule's path gives the one Kalman pass's values", P, float,
                   double) {
  // A skip threshold no group reaches keeps every gain, but takes the separate steps (the rule
  // needs all of a group's predicted variances before any gain): the same values.
  const auto x = random_batch<P>(8, 4, 3, 3, 44);
  const gaussian<P> prior{{0.5, -1, 0, 2}, {1, 2, 0.5, 3}, 1, 4};
  bkn::layer_config cfg = config<P>(4, 4);
  cfg.noise = true;
  cfg.per_channel_gain = true;
  bkn::layer_storage<P> fused(cfg), stepwise(cfg);
  random_affine(fused, 45);
  random_affine(stepwise, 45);
  fused.gain_logit = stepwise.gain_logit = {P(-1), P(0), P(0.5), P(2)};
  bkn::options opt;
  opt.group_size = 2;
  const auto y = run_forward(opt, fused, x, &prior);
  opt.skip_threshold = 1e30;
  const auto y_steps = run_forward(opt, stepwise, x, &prior);
  CHECK(y == y_steps);
  CHECK(fused.predicted_cov == stepwise.predicted_cov);
  CHECK(fused.posterior_mean == stepwise.posterior_mean);
  CHECK(fused.posterior_cov == stepwise.posterior_cov);
  CHECK(fused.running_var == stepwise.running_var);
}
