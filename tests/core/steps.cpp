// Tests of bkn/steps.hpp: the public steps observe, predict, update and normalize on the
// reference backend, on small cases computed by hand (in the comments) or by naive loops here.
// Inputs are dyadic and built so that every statistic is exact in any summation order; those
// comparisons use zero tolerance.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"

#include "support/thrown.hpp"

namespace {

using bkn::covariance;
using bkn::index_t;
using bkn::span;
using B = bkn::reference_backend;

constexpr covariance diag = covariance::diagonal;
constexpr covariance full = covariance::full;

template <class P>
P nan() {
  return std::numeric_limits<P>::quiet_NaN();
}

/// Owns a gaussian_view's arrays; starts as NaN so an entry left unwritten shows.
template <class P>
struct gaussian {
  std::vector<P> mean, cov;
  index_t groups, channels;
  gaussian(index_t g, index_t c, covariance mode)
      : mean(std::size_t(g * c), nan<P>()),
        cov(std::size_t(g * bkn::covariance_elements(c, mode)), nan<P>()),
        groups(g),
        channels(c) {}
  gaussian(index_t g, index_t c, std::vector<P> m, std::vector<P> v)
      : mean(std::move(m)), cov(std::move(v)), groups(g), channels(c) {}
  bkn::gaussian_view<P> view() { return {mean, cov, groups, channels}; }
  bkn::gaussian_view<const P> cview() const {
    return {span<const P>(mean.data(), index_t(mean.size())),
            span<const P>(cov.data(), index_t(cov.size())), groups, channels};
  }
};

/// Options of a step call: the mode, the statistics group size (0: the whole batch), epsilon.
inline bkn::options opts(covariance mode, index_t group_size = 0, double epsilon = 1e-5) {
  bkn::options o;
  o.mode = mode;
  o.group_size = group_size;
  o.epsilon = epsilon;
  return o;
}

/// Enough workspace for update() on up to 8 groups of 8 channels.
inline bkn::host_workspace update_workspace() {
  return bkn::host_workspace(bkn::workspace_size(B{}, opts(covariance::full), {8, 8, 1, 1}));
}

/// A workspace that fits the layer routines for inputs of `shape` (and so the steps).
inline bkn::host_workspace workspace_for(covariance mode, bkn::tensor_shape shape,
                                         index_t group_size, index_t in_channels = 0) {
  bkn::options opt;
  opt.mode = mode;
  opt.group_size = group_size;
  return bkn::host_workspace(bkn::workspace_size(B{}, opt, shape, in_channels));
}

template <class P>
std::vector<P> softplus_naive(const std::vector<P>& rho) {
  std::vector<P> r;
  for (P v : rho) r.push_back(P(std::log1p(std::exp(static_cast<long double>(v)))));
  return r;
}

using bkn_test::thrown;

// Observe on an NC tensor through the public step, into a fresh (NaN) gaussian.
template <class T, class P>
gaussian<P> observe_nc(const std::vector<T>& x, index_t N, index_t C, index_t group_size,
                       covariance mode) {
  gaussian<P> obs(N / group_size, C, mode);
  auto ws = workspace_for(mode, {N, C, 1, 1}, group_size);
  bkn::observe(B{}, opts(mode, group_size), bkn::nc(x.data(), N, C), obs.view(), ws.bytes());
  return obs;
}

// x (N = 4, C = 2) in NC rows:
//   channel 0: 1, 3, -2, 6      channel 1: 0.5, 0.5, 10, -10
// Groups of 2: ch0 (1, 3) mean 2 var 1, (-2, 6) mean 2 var 16;
//              ch1 (0.5, 0.5) mean 0.5 var 0, (10, -10) mean 0 var 100.
// One group:   ch0 mean 2, deviations -1 1 -4 4, var (1 + 1 + 16 + 16) / 4 = 8.5;
//              ch1 mean 0.25, deviations .25 .25 9.75 -10.25,
//              var (.0625 + .0625 + 95.0625 + 105.0625) / 4 = 50.0625.
//              cov01 = (-.25 + .25 - 39 - 41) / 4 = -20.
// Groups of 2, cov01: group 0 deviations (-1, 1) x (0, 0) = 0; group 1 (-4, 4) x (10, -10):
//              (-40 - 40) / 2 = -40.
template <class T>
std::vector<T> small_x() {
  return {T(1), T(0.5), T(3), T(0.5), T(-2), T(10), T(6), T(-10)};
}

}  // namespace

TEST_CASE_TEMPLATE("steps: observe diag, group sizes 1, 2 and N (hand-computed)", P, float,
                   double) {
  const auto x = small_x<P>();
  SUBCASE("group size N") {
    const auto o = observe_nc<P, P>(x, 4, 2, 4, diag);
    CHECK(o.mean == std::vector<P>{2, 0.25});
    CHECK(o.cov == std::vector<P>{8.5, 50.0625});
  }
  SUBCASE("group size 2") {
    const auto o = observe_nc<P, P>(x, 4, 2, 2, diag);
    CHECK(o.mean == std::vector<P>{2, 0.5, 2, 0});
    CHECK(o.cov == std::vector<P>{1, 0, 16, 100});
  }
  SUBCASE("group size 1: each sample its own group, variance 0") {
    const auto o = observe_nc<P, P>(x, 4, 2, 1, diag);
    CHECK(o.mean == x);
    CHECK(o.cov == std::vector<P>(8, P(0)));
  }
}

TEST_CASE("steps: observe float tensors into double statistics") {
  const auto x = small_x<float>();
  const auto o = observe_nc<float, double>(x, 4, 2, 4, diag);
  CHECK(o.mean == std::vector<double>{2, 0.25});
  CHECK(o.cov == std::vector<double>{8.5, 50.0625});
}

TEST_CASE_TEMPLATE("steps: observe full covariance (hand-computed)", P, float, double) {
  const auto x = small_x<P>();
  SUBCASE("group size N") {
    const auto o = observe_nc<P, P>(x, 4, 2, 4, full);
    CHECK(o.mean == std::vector<P>{2, 0.25});
    CHECK(o.cov == std::vector<P>{8.5, -20, -20, 50.0625});
  }
  SUBCASE("group size 2") {
    const auto o = observe_nc<P, P>(x, 4, 2, 2, full);
    CHECK(o.mean == std::vector<P>{2, 0.5, 2, 0});
    CHECK(o.cov == std::vector<P>{1, 0, 0, 0, 16, -40, -40, 100});
  }
  SUBCASE("group size 1") {
    const auto o = observe_nc<P, P>(x, 4, 2, 1, full);
    CHECK(o.mean == x);
    CHECK(o.cov == std::vector<P>(16, P(0)));
  }
}

namespace {

// N = 4, C = 3, H = 2, W = 3 images in NCHW order, built so that for every (sample, channel)
// the 6 pixels come in pairs symmetric about a dyadic mean (a quarter-integer); the pairs are
// placed at shuffled pixels. Then every group's mean is dyadic and every deviation, square and
// sum is exact in double whatever the summation order: statistics of any layout and group size
// are exact, and equal bit for bit.
struct image_batch {
  static constexpr index_t N = 4, C = 3, H = 2, W = 3, S = H * W;
  std::vector<double> nchw;  // [n][c][h][w]

  explicit image_batch(unsigned seed) : nchw(std::size_t(N * C * S)) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int> mean_q(-40, 40), dev_h(0, 12);
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c) {
        const double mu = mean_q(gen) / 4.0;
        std::vector<double> v;
        for (index_t k = 0; k < S / 2; ++k) {
          const double d = dev_h(gen) / 2.0;
          v.push_back(mu + d);
          v.push_back(mu - d);
        }
        std::shuffle(v.begin(), v.end(), gen);
        for (index_t s = 0; s < S; ++s) nchw[std::size_t((n * C + c) * S + s)] = v[std::size_t(s)];
      }
  }
  double at(index_t n, index_t c, index_t s) const {
    return nchw[std::size_t((n * C + c) * S + s)];
  }
  template <class T>
  std::vector<T> as_nchw() const {
    return std::vector<T>(nchw.begin(), nchw.end());
  }
  template <class T>
  std::vector<T> as_nhwc() const {
    std::vector<T> out(nchw.size());
    for (index_t n = 0; n < N; ++n)
      for (index_t c = 0; c < C; ++c)
        for (index_t s = 0; s < S; ++s) out[std::size_t((n * S + s) * C + c)] = T(at(n, c, s));
    return out;
  }
  // Naive statistics in long double: mean and biased (co)variance per group.
  void naive(index_t group_size, std::vector<long double>& mean,
             std::vector<long double>& cov) const {
    const index_t G = N / group_size;
    mean.assign(std::size_t(G * C), 0);
    cov.assign(std::size_t(G * C * C), 0);
    const long double m = static_cast<long double>(group_size * S);
    for (index_t g = 0; g < G; ++g) {
      for (index_t c = 0; c < C; ++c) {
        long double s = 0;
        for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
          for (index_t p = 0; p < S; ++p) s += at(n, c, p);
        mean[std::size_t(g * C + c)] = s / m;
      }
      for (index_t i = 0; i < C; ++i)
        for (index_t j = 0; j < C; ++j) {
          long double s = 0;
          for (index_t n = g * group_size; n < (g + 1) * group_size; ++n)
            for (index_t p = 0; p < S; ++p)
              s += (at(n, i, p) - mean[std::size_t(g * C + i)]) *
                   (at(n, j, p) - mean[std::size_t(g * C + j)]);
          cov[std::size_t((g * C + i) * C + j)] = s / m;
        }
    }
  }
};

}  // namespace

TEST_CASE_TEMPLATE("steps: observe gives the same statistics in NC, NCHW, NHWC and strided", P,
                   float, double) {
  const image_batch b(17);
  constexpr index_t N = image_batch::N, C = image_batch::C, H = image_batch::H, W = image_batch::W,
                    S = image_batch::S;
  const auto x_nchw = b.as_nchw<P>();
  const auto x_nhwc = b.as_nhwc<P>();
  // The same values in a wider NHWC buffer of 5 channels (channels 1..3 are ours).
  std::vector<P> wide(std::size_t(N * S * 5), P(1e30));
  for (index_t p = 0; p < N * S; ++p)
    for (index_t c = 0; c < C; ++c)
      wide[std::size_t(p * 5 + 1 + c)] = x_nhwc[std::size_t(p * C + c)];

  for (covariance mode : {diag, full}) {
    for (index_t gs : {index_t(1), index_t(2), index_t(4)}) {
      CAPTURE(gs);
      CAPTURE(mode == full);
      const index_t G = N / gs;
      auto ws = workspace_for(mode, {N * S, C, 1, 1}, gs * S);
      gaussian<P> a(G, C, mode), c(G, C, mode), d(G, C, mode), e(G, C, mode);
      bkn::observe(B{}, opts(mode, gs), bkn::nchw(x_nchw.data(), N, C, H, W), a.view(), ws.bytes());
      bkn::observe(B{}, opts(mode, gs), bkn::nhwc(x_nhwc.data(), N, C, H, W), c.view(), ws.bytes());
      // An NHWC buffer is an (N*H*W) x C matrix of pixels: as NC with groups of gs*H*W rows.
      bkn::observe(B{}, opts(mode, gs * S), bkn::nc(x_nhwc.data(), N * S, C), d.view(), ws.bytes());
      bkn::observe(B{}, opts(mode, gs),
                   bkn::strided(wide.data() + 1, {N, C, H, W}, {S * 5, 1, W * 5, 5}), e.view(),
                   ws.bytes());
      // Bit-identical across layouts (exact sums), and equal to the naive statistics to within
      // the final rounding to P (one rounding of an exactly known value: eps/2 relative).
      CHECK(a.mean == c.mean);
      CHECK(a.cov == c.cov);
      CHECK(a.mean == d.mean);
      CHECK(a.cov == d.cov);
      CHECK(a.mean == e.mean);
      CHECK(a.cov == e.cov);
      std::vector<long double> mean, cov;
      b.naive(gs, mean, cov);
      for (index_t i = 0; i < G * C; ++i) CHECK(a.mean[std::size_t(i)] == P(mean[std::size_t(i)]));
      for (index_t g = 0; g < G; ++g)
        for (index_t i = 0; i < C; ++i)
          for (index_t j = 0; j < C; ++j) {
            if (mode == diag && i != j) continue;
            const long double expect = cov[std::size_t((g * C + i) * C + j)];
            const P got = mode == diag ? a.cov[std::size_t(g * C + i)]
                                       : a.cov[std::size_t((g * C + i) * C + j)];
            CHECK(std::fabs(got - expect) <= std::numeric_limits<P>::epsilon() * std::fabs(expect));
          }
    }
  }
}

TEST_CASE("steps: observe rejects a group size that does not divide N") {
  const auto x = small_x<double>();
  gaussian<double> o(1, 2, diag);
  auto ws = workspace_for(diag, {4, 2, 1, 1}, 4);
  const auto e = thrown(
      [&] { bkn::observe(B{}, opts(diag, 3), bkn::nc(x.data(), 4, 2), o.view(), ws.bytes()); });
  CHECK(std::string(e.routine()) == "bkn::observe");
  CHECK(std::string(e.argument()) == "options.group_size");
  CHECK(std::isnan(o.mean[0]));  // nothing written
}

// ---- predict ----

TEST_CASE_TEMPLATE("steps: predict identity (diag and full, no noise)", P, float, double) {
  // mu_pred = mu_prev, Sigma_pred = Sigma_prev exactly.
  gaussian<P> prior_d(2, 2, {1.5, -2, 0.25, 8}, {0.5, 3, 1, 0.125});
  gaussian<P> pred_d(2, 2, diag);
  auto ws = workspace_for(full, {2, 2, 1, 1}, 1);
  bkn::predict(B{}, opts(diag), bkn::transition<P>::identity(), span<const P>(), prior_d.cview(),
               pred_d.view(), ws.bytes());
  CHECK(pred_d.mean == prior_d.mean);
  CHECK(pred_d.cov == prior_d.cov);

  gaussian<P> prior_f(1, 2, {1.5, -2}, {0.5, 0.25, 0.25, 3});
  gaussian<P> pred_f(1, 2, full);
  bkn::predict(B{}, opts(full), bkn::transition<P>::identity(), span<const P>(), prior_f.cview(),
               pred_f.view(), ws.bytes());
  CHECK(pred_f.mean == prior_f.mean);
  CHECK(pred_f.cov == prior_f.cov);
}

TEST_CASE_TEMPLATE("steps: predict diagonal transition (hand-computed)", P, float, double) {
  // a = (2, -0.5): mu = (2 * 1.5, -0.5 * -2) = (3, 1); v = (4 * 0.5, 0.25 * 3) = (2, 0.75).
  const std::vector<P> a{2, -0.5};
  gaussian<P> prior(1, 2, {1.5, -2}, {0.5, 3});
  gaussian<P> pred(1, 2, diag);
  auto ws = workspace_for(full, {1, 2, 1, 1}, 1);
  bkn::predict(B{}, opts(diag), bkn::transition<P>::diagonal(a), span<const P>(), prior.cview(),
               pred.view(), ws.bytes());
  CHECK(pred.mean == std::vector<P>{3, 1});
  CHECK(pred.cov == std::vector<P>{2, 0.75});

  // Full: Sigma_prev = [[0.5, 0.25], [0.25, 3]] -> diag(a) Sigma diag(a)
  //   = [[4 * 0.5, 2 * -0.5 * 0.25], [same, 0.25 * 3]] = [[2, -0.25], [-0.25, 0.75]].
  gaussian<P> prior_f(1, 2, {1.5, -2}, {0.5, 0.25, 0.25, 3});
  gaussian<P> pred_f(1, 2, full);
  bkn::predict(B{}, opts(full), bkn::transition<P>::diagonal(a), span<const P>(), prior_f.cview(),
               pred_f.view(), ws.bytes());
  CHECK(pred_f.mean == std::vector<P>{3, 1});
  CHECK(pred_f.cov == std::vector<P>{2, -0.25, -0.25, 0.75});
}

namespace {

// Naive A Sigma A^T (C x C' times C' x C' times C' x C) in long double.
std::vector<long double> sandwich(const std::vector<double>& A, const std::vector<double>& S,
                                  index_t C, index_t Cin) {
  std::vector<long double> out(std::size_t(C * C), 0);
  for (index_t i = 0; i < C; ++i)
    for (index_t j = 0; j < C; ++j)
      for (index_t k = 0; k < Cin; ++k)
        for (index_t l = 0; l < Cin; ++l)
          out[std::size_t(i * C + j)] += static_cast<long double>(A[std::size_t(i * Cin + k)]) *
                                         S[std::size_t(k * Cin + l)] * A[std::size_t(j * Cin + l)];
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("steps: predict dense C x C' with C' != C", P, float, double) {
  SUBCASE("C = 2, C' = 3, diag (hand-computed)") {
    // A = [[1, 2, -1], [0.5, 0, 3]], mu_prev = (1, -2, 4), v_prev = (1, 0.25, 2):
    //   mu = (1 - 4 - 4, 0.5 + 0 + 12) = (-7, 12.5)
    //   v  = (1 * 1 + 4 * 0.25 + 1 * 2, 0.25 * 1 + 0 + 9 * 2) = (4, 18.25)
    const std::vector<P> A{1, 2, -1, 0.5, 0, 3};
    gaussian<P> prior(1, 3, {1, -2, 4}, {1, 0.25, 2});
    gaussian<P> pred(1, 2, diag);
    auto ws = workspace_for(diag, {1, 2, 1, 1}, 1, 3);
    bkn::predict(B{}, opts(diag), bkn::transition<P>::dense(A, 3), span<const P>(), prior.cview(),
                 pred.view(), ws.bytes());
    CHECK(pred.mean == std::vector<P>{-7, 12.5});
    CHECK(pred.cov == std::vector<P>{4, 18.25});
  }
  for (index_t Cin : {index_t(2), index_t(5)}) {
    CAPTURE(Cin);
    const index_t C = 3;
    std::mt19937 gen{unsigned(Cin)};
    std::uniform_int_distribution<int> q(-8, 8);
    std::vector<double> A(std::size_t(C * Cin));
    for (auto& v : A) v = q(gen) / 4.0;
    // Two prior groups, full covariances (symmetric, dyadic).
    const index_t G = 2;
    std::vector<double> mean(std::size_t(G * Cin)), cov(std::size_t(G * Cin * Cin));
    for (auto& v : mean) v = q(gen) / 2.0;
    for (index_t g = 0; g < G; ++g)
      for (index_t i = 0; i < Cin; ++i)
        for (index_t j = 0; j <= i; ++j) {
          const double v = i == j ? 4 + q(gen) / 4.0 : q(gen) / 8.0;
          cov[std::size_t((g * Cin + i) * Cin + j)] = v;
          cov[std::size_t((g * Cin + j) * Cin + i)] = v;
        }
    const std::vector<P> Ap(A.begin(), A.end());
    const auto Atr = bkn::transition<P>::dense(Ap, Cin);
    auto ws = workspace_for(full, {G, C, 1, 1}, 1, Cin);

    // Full mode, one prior group per group and a shared prior (group 0 for everyone).
    for (index_t prior_groups : {G, index_t(1)}) {
      CAPTURE(prior_groups);
      gaussian<P> prior(prior_groups, Cin,
                        std::vector<P>(mean.begin(), mean.begin() + prior_groups * Cin),
                        std::vector<P>(cov.begin(), cov.begin() + prior_groups * Cin * Cin));
      gaussian<P> pred(G, C, full);
      bkn::predict(B{}, opts(full), Atr, span<const P>(), prior.cview(), pred.view(), ws.bytes());
      gaussian<P> pred_d(G, C, diag);
      std::vector<P> prior_var;
      for (index_t g = 0; g < prior_groups; ++g)
        for (index_t k = 0; k < Cin; ++k)
          prior_var.push_back(P(cov[std::size_t((g * Cin + k) * Cin + k)]));
      gaussian<P> prior_d(prior_groups, Cin, prior.mean, prior_var);
      bkn::predict(B{}, opts(diag), Atr, span<const P>(), prior_d.cview(), pred_d.view(),
                   ws.bytes());

      for (index_t g = 0; g < G; ++g) {
        const index_t pg = prior_groups == 1 ? 0 : g;
        const std::vector<double> Sg(cov.begin() + pg * Cin * Cin,
                                     cov.begin() + (pg + 1) * Cin * Cin);
        const auto expect = sandwich(A, Sg, C, Cin);
        for (index_t i = 0; i < C; ++i) {
          long double m = 0, v = 0;
          for (index_t k = 0; k < Cin; ++k) {
            m += static_cast<long double>(A[std::size_t(i * Cin + k)]) *
                 mean[std::size_t(pg * Cin + k)];
            v += static_cast<long double>(A[std::size_t(i * Cin + k)]) *
                 A[std::size_t(i * Cin + k)] * cov[std::size_t((pg * Cin + k) * Cin + k)];
          }
          // Quarter-integers times halves, a few terms: exact in double and in float.
          CHECK(pred.mean[std::size_t(g * C + i)] == P(m));
          CHECK(pred_d.mean[std::size_t(g * C + i)] == P(m));
          CHECK(pred_d.cov[std::size_t(g * C + i)] == P(v));
          for (index_t j = 0; j < C; ++j)
            CHECK(pred.cov[std::size_t((g * C + i) * C + j)] == P(expect[std::size_t(i * C + j)]));
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("steps: predict dense, whole and edge tiles, against long double", P, float,
                   double) {
  // The dense prediction runs in tiles of 4 rows of A by 2 groups and 8-column vectors: C = 9
  // rows, C' in {8, 19, 37} columns and 5 groups leave edges in every direction. Random
  // operands; every output within a few roundings of its long double value, relative to the
  // sum of its terms' magnitudes.
  const index_t C = 9, G = 5;
  for (const index_t Cin : {index_t(8), index_t(19), index_t(37)})
    for (const index_t prior_groups : {G, index_t(1)}) {
      CAPTURE(Cin);
      CAPTURE(prior_groups);
      std::mt19937 gen{unsigned(Cin * 7 + prior_groups)};
      std::uniform_real_distribution<double> u(-1, 1);
      std::vector<P> A(static_cast<std::size_t>(C * Cin)), rho(static_cast<std::size_t>(C));
      std::vector<P> mean(static_cast<std::size_t>(prior_groups * Cin)), var(mean.size());
      for (auto& v : A) v = P(u(gen));
      for (auto& v : rho) v = P(u(gen));
      for (auto& v : mean) v = P(u(gen));
      for (auto& v : var) v = P(1.5 + u(gen));
      gaussian<P> prior(prior_groups, Cin, mean, var);
      gaussian<P> pred(G, C, diag);
      auto ws = workspace_for(diag, {G, C, 1, 1}, 1, Cin);
      bkn::predict(B{}, opts(diag, 1), bkn::transition<P>::dense(A, Cin), span<const P>(rho),
                   prior.cview(), pred.view(), ws.bytes());
      // float: the output's rounding; double: the bound of 8 interleaved sums of Cin / 8 terms
      // each, their pairwise total and the noise's softplus (about 2 ulps).
      const double eps = std::numeric_limits<P>::epsilon();
      const bool single = std::is_same_v<P, float>;
      const double mean_ulps = single ? 1 : double(Cin / 8 + 4);
      const double var_ulps = single ? 2 : double(Cin / 8 + 8);
      for (index_t g = 0; g < G; ++g)
        for (index_t c = 0; c < C; ++c) {
          CAPTURE(g);
          CAPTURE(c);
          const index_t base = (prior_groups == 1 ? 0 : g) * Cin;
          long double m = 0, v = 0, m_abs = 0;
          for (index_t k = 0; k < Cin; ++k) {
            const long double a = A[std::size_t(c * Cin + k)];
            m += a * mean[std::size_t(base + k)];
            m_abs += std::fabs(a * mean[std::size_t(base + k)]);
            v += a * a * var[std::size_t(base + k)];
          }
          v += std::log1p(std::exp(static_cast<long double>(rho[std::size_t(c)])));
          const std::size_t i = std::size_t(g * C + c);
          CHECK(std::fabs(double(pred.mean[i]) - double(m)) <= mean_ulps * eps * double(m_abs));
          CHECK(std::fabs(double(pred.cov[i]) - double(v)) <= var_ulps * eps * double(v));
        }
    }
}

TEST_CASE_TEMPLATE("steps: predict adds the noise through softplus", P, float, double) {
  // r = softplus(rho) = log(1 + e^rho), computed naively here; one rounding in the step plus
  // the sum: 4 eps relative.
  const std::vector<P> rho{0, -3, 2.5};
  const auto r = softplus_naive(rho);
  gaussian<P> prior(1, 3, {1, 2, 3}, {0.5, 0, 4});
  auto ws = workspace_for(full, {1, 3, 1, 1}, 1);
  const P eps = std::numeric_limits<P>::epsilon();

  gaussian<P> pred(1, 3, diag);
  bkn::predict(B{}, opts(diag), bkn::transition<P>::identity(), span<const P>(rho), prior.cview(),
               pred.view(), ws.bytes());
  CHECK(pred.mean == prior.mean);
  for (int c = 0; c < 3; ++c) {
    const P expect = prior.cov[std::size_t(c)] + r[std::size_t(c)];
    CHECK(std::fabs(pred.cov[std::size_t(c)] - expect) <= 4 * eps * expect);
  }
  CHECK(std::fabs(pred.cov[0] - P(0.5 + std::log(2.0))) <= 4 * eps);  // softplus(0) = log 2

  // Full mode: R is diagonal; off-diagonal entries are untouched by it.
  std::vector<P> S{0.5, 0.25, -1, 0.25, 0, 0.125, -1, 0.125, 4};
  gaussian<P> prior_f(1, 3, {1, 2, 3}, S);
  gaussian<P> pred_f(1, 3, full);
  bkn::predict(B{}, opts(full), bkn::transition<P>::identity(), span<const P>(rho), prior_f.cview(),
               pred_f.view(), ws.bytes());
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const P got = pred_f.cov[std::size_t(i * 3 + j)];
      if (i != j) {
        CHECK(got == S[std::size_t(i * 3 + j)]);
      } else {
        const P expect = S[std::size_t(i * 4)] + r[std::size_t(i)];
        CHECK(std::fabs(got - expect) <= 4 * eps * expect);
      }
    }
}

TEST_CASE_TEMPLATE("steps: predict with a prior shared by every group", P, float, double) {
  // One prior group, three predicted groups: each is the same prediction.
  const std::vector<P> a{2, -1};
  gaussian<P> prior(1, 2, {0.5, 3}, {1, 0.25});
  gaussian<P> pred(3, 2, diag);
  auto ws = workspace_for(full, {3, 2, 1, 1}, 1);
  bkn::predict(B{}, opts(diag), bkn::transition<P>::diagonal(a), span<const P>(), prior.cview(),
               pred.view(), ws.bytes());
  CHECK(pred.mean == std::vector<P>{1, -3, 1, -3, 1, -3});
  CHECK(pred.cov == std::vector<P>{4, 0.25, 4, 0.25, 4, 0.25});

  // A prior with a number of groups that is neither 1 nor the predicted count is rejected.
  gaussian<P> prior2(2, 2, {0.5, 3, 0, 0}, {1, 0.25, 1, 1});
  const auto e = thrown([&] {
    bkn::predict(B{}, opts(diag), bkn::transition<P>::diagonal(a), span<const P>(), prior2.cview(),
                 pred.view(), ws.bytes());
  });
  CHECK(std::string(e.routine()) == "bkn::predict");
  CHECK(std::string(e.argument()) == "prior");
}

// ---- update ----

TEST_CASE_TEMPLATE("steps: update diag with a per-layer gain (hand-computed)", P, float, double) {
  // gain logit 0: q = p = 1/2. Group 0, channel 0: pred N(1, 2), obs N(3, 4): d = 2,
  //   mean 2, var 1 + 2 + 1/4 * 4 = 4. Channel 1: pred N(0, 1), obs N(-1, 0): d = -1,
  //   mean -0.5, var 0.5 + 0 + 0.25 = 0.75. Group 1: pred N(4, 0), obs N(4, 8): d = 0,
  //   mean 4, var 4; channel 1 pred N(-2, 0.5), obs N(2, 0.5): mean 0, var 0.5 + 4 = 4.5.
  const std::vector<P> gain{0};
  gaussian<P> pred(2, 2, {1, 0, 4, -2}, {2, 1, 0, 0.5});
  gaussian<P> obs(2, 2, {3, -1, 4, 2}, {4, 0, 8, 0.5});
  gaussian<P> post(2, 2, diag);
  auto uws = update_workspace();
  bkn::update(B{}, opts(diag), span<const P>(gain), pred.cview(), obs.cview(), post.view(),
              uws.bytes());
  CHECK(post.mean == std::vector<P>{2, -0.5, 4, 0});
  CHECK(post.cov == std::vector<P>{4, 0.75, 4, 4.5});
}

TEST_CASE_TEMPLATE("steps: update diag with a per-channel gain", P, float, double) {
  // Logits (100, 0, -100, log 3): q = 1 (exactly, in double), 1/2, ~4e-44 (~0), 3/4.
  //   q = 1 gives the observed moments, q ~ 0 the predicted ones (q * obs is far below an ulp).
  const std::vector<P> gain{100, 0, -100, P(std::log(3.0))};
  gaussian<P> pred(1, 4, {1, 1, 1, 1}, {2, 2, 2, 2});
  gaussian<P> obs(1, 4, {3, 3, 3, 3}, {4, 4, 4, 4});
  gaussian<P> post(1, 4, diag);
  auto uws = update_workspace();
  bkn::update(B{}, opts(diag), span<const P>(gain), pred.cview(), obs.cview(), post.view(),
              uws.bytes());
  CHECK(post.mean[0] == 3);
  CHECK(post.cov[0] == 4);
  CHECK(post.mean[1] == 2);
  CHECK(post.cov[1] == 4);  // 1 + 2 + 1/4 * 4
  CHECK(post.mean[2] == 1);
  CHECK(post.cov[2] == 2);
  // q = 3/4 (to rounding of log 3 in P and of the sigmoid): mean 1/4 + 9/4 = 2.5,
  // var 1/2 + 3 + 3/16 * 4 = 4.25. dq/dlogit = q p = 3/16, so a logit error of eps/2 * log 3
  // moves q by ~0.1 eps; 8 eps covers it and the rounding of the update.
  const P eps = std::numeric_limits<P>::epsilon();
  CHECK(std::fabs(post.mean[3] - P(2.5)) <= 8 * eps * 2.5);
  CHECK(std::fabs(post.cov[3] - P(4.25)) <= 8 * eps * 4.25);
}

TEST_CASE_TEMPLATE("steps: update with options.fixed_gain", P, float, double) {
  // q = 1/4 whatever the logit (none, or 100): pred N(1, 2), obs N(3, 4), d = 2:
  //   mean 3/4 + 3/4 = 1.5, var 3/4 * 2 + 1/4 * 4 + 3/16 * 4 = 3.25.
  gaussian<P> pred(1, 1, {1}, {2});
  gaussian<P> obs(1, 1, {3}, {4});
  auto uws = update_workspace();
  bkn::options o = opts(diag);
  o.fixed_gain = 0.25;
  for (const std::vector<P>& logit : {std::vector<P>{}, std::vector<P>{100}}) {
    gaussian<P> post(1, 1, diag);
    bkn::update(B{}, o, span<const P>(logit), pred.cview(), obs.cview(), post.view(), uws.bytes());
    CHECK(post.mean == std::vector<P>{1.5});
    CHECK(post.cov == std::vector<P>{3.25});
  }
}

TEST_CASE_TEMPLATE("steps: update with options.skip_threshold", P, float, double) {
  // Threshold 10, epsilon 1. A group keeps its batch statistics (q = 1) when
  // mean_c v_pred / (S + eps) >= 10.
  //   group 0: v_pred (20, 40), S (1, 3): ratios 10, 10 -> mean 10 -> skipped: the observed.
  //   group 1: v_pred (2, 2), S (1, 1): ratios 1, 1 -> fused with q = 1/2:
  //     pred means (1, 1), obs means (3, -1): mean (2, 0), var 1 + 1/2 + 1/4 * 4 = 2.5 (both).
  gaussian<P> pred(2, 2, {0, 0, 1, 1}, {20, 40, 2, 2});
  gaussian<P> obs(2, 2, {2, -2, 3, -1}, {1, 3, 1, 1});
  gaussian<P> post(2, 2, diag);
  const std::vector<P> logit{0};
  auto uws = update_workspace();
  bkn::options o = opts(diag, 0, 1.0);
  o.skip_threshold = 10;
  bkn::update(B{}, o, span<const P>(logit), pred.cview(), obs.cview(), post.view(), uws.bytes());
  CHECK(post.mean == std::vector<P>{2, -2, 2, 0});
  CHECK(post.cov == std::vector<P>{1, 3, 2.5, 2.5});
  // Above 10 the first group is fused too: mean (1, -1), var 10 + 0.5 + 1 = 11.5 and
  // 20 + 1.5 + 1 = 22.5.
  o.skip_threshold = 10.5;
  bkn::update(B{}, o, span<const P>(logit), pred.cview(), obs.cview(), post.view(), uws.bytes());
  CHECK(post.mean == std::vector<P>{1, -1, 2, 0});
  CHECK(post.cov == std::vector<P>{11.5, 22.5, 2.5, 2.5});
}

TEST_CASE_TEMPLATE("steps: update full covariance (hand-computed)", P, float, double) {
  // q = 1/2, C = 2. pred mean (1, 0), Sigma_pred [[2, 1], [1, 4]]; obs mean (3, -2),
  // S [[4, -1], [-1, 0]]. d = (2, -2), d d^T = [[4, -4], [-4, 4]].
  //   mean  = (2, -1)
  //   Sigma = 1/2 [[2, 1], [1, 4]] + 1/2 [[4, -1], [-1, 0]] + 1/4 [[4, -4], [-4, 4]]
  //         = [[1 + 2 + 1, 0.5 - 0.5 - 1], [same, 2 + 0 + 1]] = [[4, -1], [-1, 3]]
  const std::vector<P> gain{0};
  gaussian<P> pred(1, 2, {1, 0}, {2, 1, 1, 4});
  gaussian<P> obs(1, 2, {3, -2}, {4, -1, -1, 0});
  gaussian<P> post(1, 2, full);
  auto uws = update_workspace();
  bkn::update(B{}, opts(full), span<const P>(gain), pred.cview(), obs.cview(), post.view(),
              uws.bytes());
  CHECK(post.mean == std::vector<P>{2, -1});
  CHECK(post.cov == std::vector<P>{4, -1, -1, 3});

  // Full mode takes one gain: C gains are rejected, naming gain_logit.
  const std::vector<P> two{0, 0};
  const auto e = thrown([&] {
    bkn::update(B{}, opts(full), span<const P>(two), pred.cview(), obs.cview(), post.view(),
                uws.bytes());
  });
  CHECK(std::string(e.routine()) == "bkn::update");
  CHECK(std::string(e.what()).find("got 2") != std::string::npos);
}

TEST_CASE("steps: update names its own argument, gain_logit") {
  const std::vector<double> two{0, 0};
  gaussian<double> pred(1, 2, {1, 0}, {2, 1, 1, 4});
  gaussian<double> obs(1, 2, {3, -2}, {4, -1, -1, 0});
  gaussian<double> post(1, 2, full);
  auto uws = update_workspace();
  const auto e = thrown([&] {
    bkn::update(B{}, opts(full), span<const double>(two), pred.cview(), obs.cview(), post.view(),
                uws.bytes());
  });
  CHECK(std::string(e.argument()) == "gain_logit");
}

// ---- normalize ----

TEST_CASE_TEMPLATE("steps: normalize (hand-computed y)", P, float, double) {
  // var + eps is a perfect square (3.75 + 0.25 = 4, 8.75 + 0.25 = 9), so every y is exact:
  //   channel 0: gamma 2, beta 1, mu 1:   y = 2 (x - 1) / 2 + 1 = x
  //   channel 1: gamma 3, beta -1, mu -2: y = 3 (x + 2) / 3 - 1 = x + 1
  // Checked on x = NC rows (0, -2), (4, 1), (1, 7), (-3, -0.5).
  const std::vector<P> x{0, -2, 4, 1, 1, 7, -3, -0.5};
  const std::vector<P> gamma{2, 3}, beta{1, -1};
  gaussian<P> est(1, 2, {1, -2}, {3.75, 8.75});
  std::vector<P> y(8, nan<P>());
  auto ws = workspace_for(full, {4, 2, 1, 1}, 4);
  bkn::normalize(B{}, opts(diag, 0, 0.25), bkn::tensor_view<const P>(bkn::nc(x.data(), 4, 2)),
                 bkn::nc(y.data(), 4, 2), span<const P>(gamma), span<const P>(beta), est.cview(),
                 ws.bytes());
  CHECK(y == std::vector<P>{0, -1, 4, 2, 1, 8, -3, 0.5});

  SUBCASE("without gamma and beta: (x - mu) / sigma") {
    // sigma = (2, 4): channel 0: (x - 1) / 2 on {0, 4, 1, -3} -> -0.5, 1.5, 0, -2;
    // channel 1: (x + 2) / 4 on {-2, 1, 7, -0.5} -> 0, 0.75, 2.25, 0.375.
    gaussian<P> est2(1, 2, {1, -2}, {3.75, 15.75});
    bkn::normalize(B{}, opts(diag, 0, 0.25), bkn::tensor_view<const P>(bkn::nc(x.data(), 4, 2)),
                   bkn::nc(y.data(), 4, 2), span<const P>(), span<const P>(), est2.cview(),
                   ws.bytes());
    CHECK(y == std::vector<P>{-0.5, 0, 1.5, 0.75, 0, 2.25, -2, 0.375});
  }
  SUBCASE("full mode reads the diagonal of the covariance") {
    gaussian<P> est_f(1, 2, {1, -2}, {3.75, 123, -7, 8.75});
    bkn::normalize(B{}, opts(full, 0, 0.25), bkn::tensor_view<const P>(bkn::nc(x.data(), 4, 2)),
                   bkn::nc(y.data(), 4, 2), span<const P>(gamma), span<const P>(beta),
                   est_f.cview(), ws.bytes());
    CHECK(y == std::vector<P>{0, -1, 4, 2, 1, 8, -3, 0.5});
  }
  SUBCASE("in place") {
    std::vector<P> z = x;
    bkn::normalize(B{}, opts(diag, 0, 0.25), bkn::tensor_view<const P>(bkn::nc(z.data(), 4, 2)),
                   bkn::nc(z.data(), 4, 2), span<const P>(gamma), span<const P>(beta), est.cview(),
                   ws.bytes());
    CHECK(z == std::vector<P>{0, -1, 4, 2, 1, 8, -3, 0.5});
  }
}

TEST_CASE_TEMPLATE("steps: normalize with groups, NCHW and NHWC", P, float, double) {
  // N = 2 samples, 2 groups of 1, C = 2, 1 x 2 images. Group 0: mu (0, 1), var + eps (1, 4);
  // group 1: mu (2, -1), var + eps (16, 0.25). gamma = 1, beta = 0.
  //   sample 0: ch0 (x - 0) / 1, ch1 (x - 1) / 2; sample 1: ch0 (x - 2) / 4, ch1 (x + 1) / 0.5
  const P e = P(0.0625);
  gaussian<P> est(2, 2, {0, 1, 2, -1}, {1 - e, 4 - e, 16 - e, P(0.25) - e});
  // NCHW x[n][c][w]: sample 0: ch0 (3, -1), ch1 (5, 0); sample 1: ch0 (6, -2), ch1 (0, -1.5).
  const std::vector<P> x_nchw{3, -1, 5, 0, 6, -2, 0, -1.5};
  const std::vector<P> y_expect{3, -1, 2, -0.5, 1, -1, 2, -1};
  auto ws = workspace_for(diag, {2, 2, 1, 2}, 1);
  std::vector<P> y(8, nan<P>());
  bkn::normalize(B{}, opts(diag, 0, double(e)),
                 bkn::tensor_view<const P>(bkn::nchw(x_nchw.data(), 2, 2, 1, 2)),
                 bkn::nchw(y.data(), 2, 2, 1, 2), span<const P>(), span<const P>(), est.cview(),
                 ws.bytes());
  CHECK(y == y_expect);

  // The same tensors in NHWC: x[n][w][c].
  std::vector<P> x_nhwc(8), yh(8, nan<P>()), y_expect_nhwc(8);
  for (int n = 0; n < 2; ++n)
    for (int c = 0; c < 2; ++c)
      for (int w = 0; w < 2; ++w) {
        x_nhwc[std::size_t((n * 2 + w) * 2 + c)] = x_nchw[std::size_t((n * 2 + c) * 2 + w)];
        y_expect_nhwc[std::size_t((n * 2 + w) * 2 + c)] =
            y_expect[std::size_t((n * 2 + c) * 2 + w)];
      }
  bkn::normalize(B{}, opts(diag, 0, double(e)),
                 bkn::tensor_view<const P>(bkn::nhwc(x_nhwc.data(), 2, 2, 1, 2)),
                 bkn::nhwc(yh.data(), 2, 2, 1, 2), span<const P>(), span<const P>(), est.cview(),
                 ws.bytes());
  CHECK(yh == y_expect_nhwc);
}

TEST_CASE_TEMPLATE("steps: normalize on general numbers", P, float, double) {
  // Random inputs against y = gamma (x - mu) / sqrt(var + eps) + beta in long double. The step
  // rounds a = gamma / sigma and k = beta - a mu to P and y once more: |error| <= ~3 eps
  // (|a x| + |a mu| + |beta|); 8 eps leaves margin.
  std::mt19937 gen(5);
  std::uniform_real_distribution<double> u(-3, 3), pos(0.1, 5);
  const index_t N = 6, C = 3, G = 2;
  std::vector<P> x(std::size_t(N * C)), gamma(3), beta(3);
  for (auto& v : x) v = P(u(gen));
  for (auto& v : gamma) v = P(pos(gen));
  for (auto& v : beta) v = P(u(gen));
  gaussian<P> est(G, C, diag);
  for (auto& v : est.mean) v = P(u(gen));
  for (auto& v : est.cov) v = P(pos(gen));
  const double epsilon = 1e-3;
  std::vector<P> y(x.size(), nan<P>());
  auto ws = workspace_for(diag, {N, C, 1, 1}, N / G);
  bkn::normalize(B{}, opts(diag, 0, epsilon), bkn::tensor_view<const P>(bkn::nc(x.data(), N, C)),
                 bkn::nc(y.data(), N, C), span<const P>(gamma), span<const P>(beta), est.cview(),
                 ws.bytes());
  const long double eps = std::numeric_limits<P>::epsilon();
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c) {
      const std::size_t g = std::size_t((n / (N / G)) * C + c);
      const long double a =
          gamma[std::size_t(c)] / std::sqrt(static_cast<long double>(est.cov[g]) + epsilon);
      const long double xv = x[std::size_t(n * C + c)];
      const long double expect = a * (xv - est.mean[g]) + beta[std::size_t(c)];
      const long double scale =
          std::fabs(a * xv) + std::fabs(a * est.mean[g]) + std::fabs(beta[std::size_t(c)]);
      CHECK(std::fabs(y[std::size_t(n * C + c)] - expect) <= 8 * eps * scale);
    }
}

TEST_CASE("steps: normalize rejects a non-positive epsilon and a bad estimate") {
  const std::vector<double> x{1, 2, 3, 4};
  std::vector<double> y(4, 7.0);
  gaussian<double> est(1, 2, {0, 0}, {1, 1});
  auto ws = workspace_for(diag, {2, 2, 1, 1}, 2);
  const bkn::tensor_view<const double> xv = bkn::nc(x.data(), 2, 2);
  auto e = thrown([&] {
    bkn::normalize(B{}, opts(diag, 0, 0.0), xv, bkn::nc(y.data(), 2, 2), span<const double>(),
                   span<const double>(), est.cview(), ws.bytes());
  });
  CHECK(std::string(e.routine()) == "bkn::normalize");
  CHECK(std::string(e.argument()) == "options.epsilon");
  gaussian<double> est3(3, 2, {0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1});
  e = thrown([&] {
    bkn::normalize(B{}, opts(diag, 0, 1e-5), xv, bkn::nc(y.data(), 2, 2), span<const double>(),
                   span<const double>(), est3.cview(), ws.bytes());
  });
  CHECK(std::string(e.argument()) == "estimate");
  CHECK(y == std::vector<double>(4, 7.0));
}

TEST_CASE_TEMPLATE("steps: observe, predict, update, normalize compose like forward", P, float,
                   double) {
  // The four public steps in sequence give the same posterior and y as bkn::forward on the
  // same layer (forward is documented as exactly these steps).
  const image_batch b(3);
  constexpr index_t N = image_batch::N, C = image_batch::C, H = image_batch::H, W = image_batch::W;
  const auto x = b.as_nchw<P>();
  const index_t gs = 2, G = N / gs;
  bkn::layer_config cfg;
  cfg.channels = C;
  cfg.groups = G;
  cfg.transition = bkn::transition_kind::diagonal;
  bkn::layer_storage<P> st(cfg);
  st.gain_logit = {P(0.5)};
  st.transition_weights = {2, 0.5, -1};
  st.gamma = {1.5, 0.5, 2};
  st.beta = {0, 1, -1};
  gaussian<P> prior(1, C, {1, 2, 3}, {0.5, 1, 2});
  bkn::options opt;
  opt.group_size = gs;
  auto ws = bkn::host_workspace(bkn::workspace_size(B{}, opt, {N, C, H, W}));
  const auto xv = bkn::tensor_view<const P>(bkn::nchw(x.data(), N, C, H, W));
  std::vector<P> y1(x.size()), y2(x.size());
  const auto L = st.view();
  bkn::forward(B{}, opt, L, xv, bkn::nchw(y1.data(), N, C, H, W), prior.cview(), ws.bytes());

  gaussian<P> obs(G, C, diag), pred(G, C, diag), post(G, C, diag);
  bkn::observe(B{}, opt, xv, obs.view(), ws.bytes());
  bkn::predict(B{}, opt, L.params.transition, L.params.noise, prior.cview(), pred.view(),
               ws.bytes());
  bkn::update(B{}, opt, L.params.gain_logit, pred.cview(), obs.cview(), post.view(), ws.bytes());
  bkn::normalize(B{}, opt, xv, bkn::nchw(y2.data(), N, C, H, W), L.params.gamma, L.params.beta,
                 post.cview(), ws.bytes());
  CHECK(obs.mean == st.observed_mean);
  CHECK(obs.cov == st.observed_cov);
  CHECK(pred.mean == st.predicted_mean);
  CHECK(pred.cov == st.predicted_cov);
  CHECK(post.mean == st.posterior_mean);
  CHECK(post.cov == st.posterior_cov);
  CHECK(y1 == y2);
}

