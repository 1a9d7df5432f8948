// SPDX-License-Identifier: MIT
// The cases the batch methods' tests (batch norm, batch renorm, memorized batch norm) run on:
// every layout, N = 1, odd C, 1x1 and non-square images, one statistics group and several.
#pragma once

#include <bkn/tensor.hpp>
#include <string>
#include <vector>

#include "support/host_tensor.hpp"

namespace bkn_test {

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

}  // namespace bkn_test
