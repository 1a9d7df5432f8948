// Tests of bkn/math/welford.hpp: the mergeable (count, mean, m2) state, against two-pass
// statistics computed independently in long double.
#include "bkn/math/welford.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using bkn::welford;

struct two_pass {
  long double mean;
  long double var;  // biased
  long double m2;
};

template <class A>
two_pass exact_stats(const std::vector<A>& v, std::size_t first, std::size_t last) {
  long double sum = 0;
  for (std::size_t i = first; i < last; ++i) sum += v[i];
  const long double n = static_cast<long double>(last - first);
  const long double mean = sum / n;
  long double m2 = 0;
  for (std::size_t i = first; i < last; ++i) m2 += (v[i] - mean) * (v[i] - mean);
  return {mean, m2 / n, m2};
}

// A rounding-error bound for Welford's recurrence and Chan's combine over n values
// (Chan, Golub & LeVeque 1983): relative error of m2 at most about n * kappa * eps with
// kappa = sqrt(1 + mean^2 / var) the condition number of the data. For the mean, n * eps.
template <class A>
long double var_tolerance(std::size_t n, const two_pass& ref) {
  const long double kappa = std::sqrt(1 + ref.mean * ref.mean / ref.var);
  return static_cast<long double>(n) * kappa * std::numeric_limits<A>::epsilon() * ref.var;
}

template <class A>
welford<A> accumulate(const std::vector<A>& v, std::size_t first, std::size_t last) {
  welford<A> w;
  for (std::size_t i = first; i < last; ++i) w.add(v[i]);
  return w;
}

// n values offset + N(0, 1), rounded to A.
template <class A>
std::vector<A> gaussian_values(std::size_t n, double offset, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<A> v(n);
  for (auto& x : v) x = static_cast<A>(offset + normal(gen));
  return v;
}

template <class A>
bool bitwise_equal(const welford<A>& a, const welford<A>& b) {
  // Same value and same sign of zero; NaN never appears here.
  return a.count == b.count && a.mean == b.mean && a.m2 == b.m2 &&
         std::signbit(a.m2) == std::signbit(b.m2);
}

}  // namespace

TEST_CASE_TEMPLATE("welford: exact small cases", A, float, double) {
  welford<A> w;
  CHECK(w.count == 0);
  CHECK(w.variance() == 0);

  w.add(A(5));
  CHECK(w.count == 1);
  CHECK(w.mean == 5);
  CHECK(w.m2 == 0);
  CHECK(w.variance() == 0);

  // {1, 3, 5, 7}: mean 4, deviations -3 -1 1 3, m2 = 20, biased variance 5. Each step of
  // Welford's recurrence is exact on these dyadic values.
  welford<A> v;
  for (A x : {A(1), A(3), A(5), A(7)}) v.add(x);
  CHECK(v.count == 4);
  CHECK(v.mean == 4);
  CHECK(v.m2 == 20);
  CHECK(v.variance() == 5);
}

TEST_CASE("welford: usable in constant expressions") {
  constexpr auto w = [] {
    welford<double> s;
    s.add(2.0);
    s.add(6.0);
    welford<double> t;
    t.add(10.0);
    s.combine(t);
    return s;
  }();
  // {2, 6, 10}: mean 6, m2 = 16 + 0 + 16 = 32.
  static_assert(w.count == 3);
  static_assert(w.mean == 6.0);
  static_assert(w.m2 == 32.0);
  CHECK(w.variance() == doctest::Approx(32.0 / 3.0));
}

TEST_CASE_TEMPLATE("welford: add matches two-pass statistics", A, float, double) {
  // The offset makes E[x^2] - E[x]^2 useless (in float it loses every digit); Welford's
  // recurrence stays accurate: within var_tolerance (n * kappa * eps), typically far inside.
  const std::size_t n = 4096;
  const double offset = std::is_same<A, float>::value ? 100.0 : 1e4;
  const auto v = gaussian_values<A>(n, offset, 42);
  const auto ref = exact_stats(v, 0, n);
  const auto w = accumulate(v, 0, n);
  const long double eps = std::numeric_limits<A>::epsilon();

  CHECK(w.count == A(n));
  CHECK(std::fabs(w.mean - ref.mean) <= n * eps * std::fabs(ref.mean));
  CHECK(std::fabs(w.variance() - ref.var) <= var_tolerance<A>(n, ref));
  // Much tighter in practice: guard against a silently degraded formula (a naive sum of
  // squares in float gives relative errors of order 1 at this offset).
  CHECK(std::fabs(w.variance() - ref.var) <= 1e-2L * ref.var);
}

TEST_CASE_TEMPLATE("welford: combine matches two-pass statistics of the union", A, float, double) {
  const std::size_t n = 1000;
  const auto v = gaussian_values<A>(n, 10.0, 7);
  const auto ref = exact_stats(v, 0, n);
  const long double eps = std::numeric_limits<A>::epsilon();
  // Split points, including the empty prefix and suffix and very unbalanced splits.
  for (std::size_t split : {std::size_t(0), std::size_t(1), std::size_t(2), std::size_t(333),
                            std::size_t(500), std::size_t(999), n}) {
    CAPTURE(split);
    auto a = accumulate(v, 0, split);
    const auto b = accumulate(v, split, n);
    // The parts themselves agree with two-pass statistics of the parts.
    if (split > 1) {
      const auto ra = exact_stats(v, 0, split);
      CHECK(std::fabs(a.variance() - ra.var) <= var_tolerance<A>(split, ra));
    }
    a.combine(b);
    CHECK(a.count == A(n));
    // Same bounds as for add (the combine adds O(kappa eps) relative to the parts).
    CHECK(std::fabs(a.mean - ref.mean) <= n * eps * std::fabs(ref.mean));
    CHECK(std::fabs(a.variance() - ref.var) <= var_tolerance<A>(n, ref));
    CHECK(std::fabs(a.m2 - ref.m2) <= var_tolerance<A>(n, ref) * n);
  }
}

TEST_CASE_TEMPLATE("welford: combine exact on dyadic parts", A, float, double) {
  // a = {1, 3}: mean 2, m2 2; b = {5, 7}: mean 6, m2 2. Union {1, 3, 5, 7}: mean 4, m2 20.
  // Chan: delta 4, weight 1/2, mean 2 + 2 = 4, m2 = 2 + 2 + 16 * 2 * 1/2 = 20; all exact.
  welford<A> a, b;
  a.add(1);
  a.add(3);
  b.add(5);
  b.add(7);
  welford<A> ab = a, ba = b;
  ab.combine(b);
  ba.combine(a);
  CHECK(ab.count == 4);
  CHECK(ab.mean == 4);
  CHECK(ab.m2 == 20);
  CHECK(bitwise_equal(ab, ba));

  // Unequal counts: a = {1, 3} and c = {10}: union {1, 3, 10}, mean 14/3, m2 = 134/3
  // (two-pass: (1 - 14/3)^2 + (3 - 14/3)^2 + (10 - 14/3)^2 = (121 + 25 + 256) / 9 = 402/9).
  welford<A> c;
  c.add(10);
  welford<A> ac = a;
  ac.combine(c);
  const A eps = std::numeric_limits<A>::epsilon();
  CHECK(ac.count == 3);
  CHECK(std::fabs(ac.mean - A(14.0L / 3)) <= 2 * eps * A(14.0L / 3));
  CHECK(std::fabs(ac.m2 - A(402.0L / 9)) <= 4 * eps * A(402.0L / 9));
}

TEST_CASE_TEMPLATE("welford: combine with empty states", A, float, double) {
  welford<A> a;
  for (A x : {A(0.5), A(-2), A(7.25)}) a.add(x);
  const welford<A> empty;

  SUBCASE("state.combine(empty) changes nothing") {
    welford<A> s = a;
    s.combine(empty);
    CHECK(bitwise_equal(s, a));
  }
  SUBCASE("empty.combine(state) copies the state") {
    welford<A> s;
    s.combine(a);
    CHECK(bitwise_equal(s, a));
  }
  SUBCASE("empty.combine(empty) stays empty") {
    welford<A> s;
    s.combine(empty);
    CHECK(s.count == 0);
    CHECK(s.mean == 0);
    CHECK(s.m2 == 0);
    CHECK(s.variance() == 0);
  }
  SUBCASE("from_sums with count 0 is the empty state") {
    const auto s = bkn::welford_from_sums<A>(A(0), A(3), A(5));
    CHECK(s.count == 0);
    CHECK(s.mean == 0);
    CHECK(s.m2 == 0);
    welford<A> t = a;
    t.combine(s);
    CHECK(bitwise_equal(t, a));
  }
}

TEST_CASE_TEMPLATE("welford: order independence", A, float, double) {
  // Eight blocks merged sequentially left to right, right to left, and as a balanced tree,
  // and the values added in a shuffled order: all agree with the two-pass statistics and with
  // each other to rounding (the bounds above, n = 2048).
  const std::size_t n = 2048, blocks = 8, size = n / blocks;
  const auto v = gaussian_values<A>(n, 3.0, 11);
  const auto ref = exact_stats(v, 0, n);
  std::vector<welford<A>> part;
  for (std::size_t b = 0; b < blocks; ++b) part.push_back(accumulate(v, b * size, (b + 1) * size));

  welford<A> left;
  for (std::size_t b = 0; b < blocks; ++b) left.combine(part[b]);
  welford<A> right;
  for (std::size_t b = blocks; b-- > 0;) right.combine(part[b]);
  std::vector<welford<A>> level = part;
  while (level.size() > 1) {
    std::vector<welford<A>> next;
    for (std::size_t i = 0; i < level.size(); i += 2) {
      welford<A> s = level[i];
      s.combine(level[i + 1]);
      next.push_back(s);
    }
    level = next;
  }
  auto shuffled = v;
  std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937_64(5));
  const auto sequential = accumulate(shuffled, 0, n);

  const long double eps = std::numeric_limits<A>::epsilon();
  for (const auto& w : {left, right, level[0], sequential}) {
    CHECK(w.count == A(n));
    CHECK(std::fabs(w.mean - ref.mean) <= n * eps * std::fabs(ref.mean));
    CHECK(std::fabs(w.variance() - ref.var) <= var_tolerance<A>(n, ref));
  }

  // On values whose every partial statistic is exact (integers symmetric about 0 in blocks of
  // pairs {-k, k}, so each block's mean is 0), every order gives bit-identical results.
  std::vector<A> sym;
  for (int k = 1; k <= 8; ++k) {
    sym.push_back(A(k));
    sym.push_back(A(-k));
  }
  welford<A> fwd, rev;
  for (std::size_t i = 0; i < sym.size(); i += 2) {
    welford<A> pair = accumulate(sym, i, i + 2);
    fwd.combine(pair);
  }
  for (std::size_t i = sym.size(); i > 0; i -= 2) {
    welford<A> pair = accumulate(sym, i - 2, i);
    rev.combine(pair);
  }
  // sum k^2 for k = 1..8 is 204; m2 = 2 * 204 = 408 over 16 values.
  CHECK(fwd.mean == 0);
  CHECK(fwd.m2 == 408);
  CHECK(bitwise_equal(fwd, rev));
}

TEST_CASE_TEMPLATE("welford: variance is clamped at zero", A, float, double) {
  welford<A> w;
  w.count = 4;
  w.mean = 1;
  w.m2 = A(-1e-30);  // what rounding can leave behind
  CHECK(w.variance() == 0);
  CHECK_FALSE(std::signbit(w.variance()));

  w.m2 = -std::numeric_limits<A>::denorm_min();
  CHECK(w.variance() == 0);

  // m2 > 0 with count 0 (not a valid state, but must not divide by zero).
  welford<A> z;
  z.m2 = 1;
  CHECK(z.variance() == 0);

  // A constant channel: every value equal, far from 0; the variance is 0 (exact here), never
  // negative.
  welford<A> c;
  for (int i = 0; i < 1000; ++i) c.add(A(1e4) + A(0.1));
  CHECK(c.variance() >= 0);
  CHECK(c.variance() <= std::numeric_limits<A>::epsilon());
}

TEST_CASE_TEMPLATE("welford: from sums", A, float, double) {
  // {1, 3, 5, 7}: sum 16, centred m2 20.
  const auto w = bkn::welford_from_sums<A>(A(4), A(16), A(20));
  CHECK(w.count == 4);
  CHECK(w.mean == 4);
  CHECK(w.m2 == 20);
  CHECK(w.variance() == 5);

  // Merging block summaries equals the summary of the union: {1, 3} (sum 4, m2 2) and
  // {5, 7} (sum 12, m2 2) give mean 4 and m2 20 exactly.
  auto a = bkn::welford_from_sums<A>(A(2), A(4), A(2));
  a.combine(bkn::welford_from_sums<A>(A(2), A(12), A(2)));
  CHECK(a.count == 4);
  CHECK(a.mean == 4);
  CHECK(a.m2 == 20);
}
