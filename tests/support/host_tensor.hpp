// SPDX-License-Identifier: MIT
// A tensor over its own host memory in each layout the tests run (NC, NCHW, NHWC, and a strided
// one with gaps that hold NaN, so that a pass reading or writing outside the view is caught).
#pragma once

#include <doctest/doctest.h>

#include <bkn/tensor.hpp>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace bkn_test {

enum class layout { nc, nchw, nhwc, strided };

inline const char* layout_name(layout l) {
  switch (l) {
    case layout::nc: return "NC";
    case layout::nchw: return "NCHW";
    case layout::nhwc: return "NHWC";
    case layout::strided: return "strided";
  }
  return "?";
}

/// A tensor over its own memory, zero inside the view. The strided layout spaces every element
/// (width stride 2, padded rows, planes and samples); its gaps hold NaN, so a kernel that reads
/// outside the view poisons the result, and a kernel that writes there is caught by
/// gaps_untouched().
template <class T>
class host_tensor {
 public:
  host_tensor(layout l, bkn::tensor_shape shape) : shape_(shape) {
    using bkn::index_t;
    const index_t C = shape.channels, H = shape.height, W = shape.width;
    switch (l) {
      case layout::nc:
        REQUIRE(shape.spatial() == 1);
        strides_ = {C, 1, 1, 1};
        break;
      case layout::nchw: strides_ = {C * H * W, H * W, W, 1}; break;
      case layout::nhwc: strides_ = {H * W * C, 1, W * C, C}; break;
      case layout::strided: {
        const index_t row = 2 * W + 1, plane = H * row + 1;
        strides_ = {C * plane + 3, plane, row, 2};
        break;
      }
    }
    const index_t last = shape.elements() == 0
                             ? 0
                             : (shape.batch - 1) * strides_.batch +
                                   (C - 1) * strides_.channel + (H - 1) * strides_.height +
                                   (W - 1) * strides_.width + 1;
    memory_.assign(std::size_t(last), std::numeric_limits<T>::quiet_NaN());
    for (T* e : entries()) *e = 0;
  }

  bkn::tensor_view<T> view() { return {memory_.data(), shape_, strides_}; }
  bkn::tensor_view<const T> cview() const { return {memory_.data(), shape_, strides_}; }
  const bkn::tensor_shape& shape() const { return shape_; }
  T& at(bkn::index_t n, bkn::index_t c, bkn::index_t s) { return view().at(n, c, s); }
  /// All of the memory, the gaps included.
  std::vector<T>& memory() { return memory_; }

  /// The elements of the view, in (n, c, h, w) order.
  std::vector<T*> entries() {
    std::vector<T*> out;
    const auto v = view();
    for (bkn::index_t n = 0; n < shape_.batch; ++n)
      for (bkn::index_t c = 0; c < shape_.channels; ++c)
        for (bkn::index_t s = 0; s < shape_.spatial(); ++s) out.push_back(&v.at(n, c, s));
    return out;
  }
  std::vector<T> values() {
    std::vector<T> out;
    for (T* e : entries()) out.push_back(*e);
    return out;
  }
  /// Every element mean + deviation * rng.normal().
  template <class Random>
  void fill(Random& rng, double mean, double deviation) {
    for (T* e : entries()) *e = T(mean + deviation * rng.normal());
  }
  /// True when every element outside the view is still NaN.
  bool gaps_untouched() {
    std::vector<bool> inside(memory_.size(), false);
    for (T* e : entries()) inside[std::size_t(e - memory_.data())] = true;
    for (std::size_t i = 0; i < memory_.size(); ++i)
      if (!inside[i] && !std::isnan(memory_[i])) return false;
    return true;
  }

 private:
  bkn::tensor_shape shape_;
  bkn::tensor_strides strides_{};
  std::vector<T> memory_;
};

}  // namespace bkn_test
