// SPDX-License-Identifier: MIT
// The cases the batch methods' tests (batch norm, batch renorm, memorized batch norm) run on,
// every layout and grouping, and the checks they share: statistics from their definition, errors.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <bkn/tensor.hpp>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/host_tensor.hpp"

namespace bkn_test::batch_cases {

using bkn_test::host_tensor;
using bkn_test::layout;

struct shape_case {
  layout lay;
  bkn::tensor_shape shape;
  bkn::index_t group_size;  // 0: the whole batch
};

inline std::string describe(const shape_case& c) {
  return std::string(layout_name(c.lay)) + " N=" + std::to_string(c.shape.batch) +
         " C=" + std::to_string(c.shape.channels) + " HxW=" + std::to_string(c.shape.height) +
         "x" + std::to_string(c.shape.width) + " group=" + std::to_string(c.group_size);
}

inline std::vector<shape_case> shape_cases() {
  return {{layout::nc, {6, 3, 1, 1}, 2},      {layout::nc, {5, 1, 1, 1}, 0},
          {layout::nc, {8, 5, 1, 1}, 4},      {layout::nchw, {4, 3, 2, 3}, 2},
          {layout::nchw, {1, 3, 2, 2}, 0},    {layout::nchw, {3, 2, 1, 1}, 3},
          {layout::nhwc, {4, 5, 3, 2}, 1},    {layout::nhwc, {2, 3, 1, 2}, 0},
          {layout::strided, {4, 3, 2, 2}, 2}, {layout::strided, {3, 1, 3, 1}, 1}};
}

/// Two values per channel and group normalize to -1 and +1 whatever they are, so a gradient
/// through batch statistics is only epsilon's effect there and may vanish.
inline bool two_values(const shape_case& c) {
  const bkn::index_t n = c.group_size == 0 ? c.shape.batch : c.group_size;
  return n * c.shape.spatial() == 2;
}

/// Mean and biased variance of group g, channel c, straight from the definition, in double.
template <class T>
std::pair<double, double> group_statistics(host_tensor<T>& x, bkn::index_t group_size,
                                           bkn::index_t g, bkn::index_t c, bkn::index_t spatial) {
  double sum = 0, count = 0;
  for (bkn::index_t n = g * group_size; n < (g + 1) * group_size; ++n)
    for (bkn::index_t s = 0; s < spatial; ++s, ++count) sum += double(x.at(n, c, s));
  const double mean = sum / count;
  double m2 = 0;
  for (bkn::index_t n = g * group_size; n < (g + 1) * group_size; ++n)
    for (bkn::index_t s = 0; s < spatial; ++s) m2 += std::pow(double(x.at(n, c, s)) - mean, 2);
  return {mean, m2 / count};
}

/// The agreement expected of results computed two ways in T.
template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 2e-5;
}

/// max |a - b| relative to max(1, max |b|).
template <class U, class V>
double max_error(const std::vector<U>& a, const std::vector<V>& b) {
  REQUIRE(a.size() == b.size());
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return err / scale;
}

}  // namespace bkn_test::batch_cases
