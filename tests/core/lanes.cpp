// Tests of bkn/detail/lanes.hpp: eight doubles held as vectors of the target's width (or of
// BKN_LANES_PART_WIDTH, which tests/CMakeLists.txt forces to each width), lane by lane.
#include "bkn/detail/lanes.hpp"

#include <doctest/doctest.h>

#include <array>
#include <cstdint>

namespace {

using bkn::index_t;
namespace d = bkn::detail;

// Distinct values, none a sum or product of two others, exact in float.
template <class P>
std::array<P, 16> values() {
  std::array<P, 16> v{};
  for (index_t i = 0; i < 16; ++i) v[std::size_t(i)] = P(3 * i + 1) * P(i % 2 ? -1 : 1) / P(4);
  return v;
}

}  // namespace

TEST_CASE_TEMPLATE("lanes: load_lanes widens the eight values in order", P, float, double,
                   std::int16_t) {
  const auto v = values<P>();
  for (const index_t start : {index_t(0), index_t(3), index_t(8)}) {
    const d::lanes x = d::load_lanes(v.data() + start);
    for (index_t l = 0; l < d::lane_count; ++l) {
      CAPTURE(start);
      CAPTURE(l);
      CHECK(d::lane(x, l) == double(v[std::size_t(start + l)]));
    }
  }
}

TEST_CASE_TEMPLATE("lanes: store_lanes narrows the eight values in order", P, float, double,
                   std::int16_t) {
  const auto v = values<double>();
  const d::lanes x = d::load_lanes(v.data() + 5);
  std::array<P, 10> out{};
  out.fill(P(99));
  d::store_lanes(out.data() + 1, x);
  CHECK(out[0] == P(99));
  CHECK(out[9] == P(99));
  for (index_t l = 0; l < d::lane_count; ++l) {
    CAPTURE(l);
    CHECK(out[std::size_t(l + 1)] == P(v[std::size_t(5 + l)]));
  }
}

TEST_CASE("lanes: +=, * and splat act lane by lane") {
  const auto v = values<double>();
  const d::lanes a = d::load_lanes(v.data()), b = d::load_lanes(v.data() + 8);
  d::lanes sum = a;
  sum += b;
  const d::lanes product = a * b;
  const d::lanes scaled = d::splat(0.375) * a;
  for (index_t l = 0; l < d::lane_count; ++l) {
    CAPTURE(l);
    const double x = v[std::size_t(l)], y = v[std::size_t(l + 8)];
    CHECK(d::lane(d::splat(-2.5), l) == -2.5);
    CHECK(d::lane(sum, l) == x + y);
    CHECK(d::lane(product, l) == x * y);
    CHECK(d::lane(scaled, l) == 0.375 * x);
  }
}

TEST_CASE("lanes: lane_sum adds the lanes pairwise, in one order") {
  // Values whose sum depends on the order of the additions: left to right, 6 + 1e17 rounds
  // to 1e17 and the total is 0; pairwise, 1e17 - 1e17 cancels first and the total is 6.
  const double v[8] = {1, 1, 1, 1, 1, 1, 1e17, -1e17};
  const d::lanes x = d::load_lanes(v);
  const double pairwise = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  CHECK(d::lane_sum(x) == pairwise);
  CHECK(d::lane_sum(v) == pairwise);  // a plain array of eight, in the same order
  double left_to_right = 0;
  for (const double value : v) left_to_right += value;
  CHECK(pairwise != left_to_right);  // the case tells the orders apart
}
