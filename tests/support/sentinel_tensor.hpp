// SPDX-License-Identifier: MIT
// A tensor inside a larger buffer filled with a sentinel, in dense layouts and in padded ones
// that decide which of its axes a kernel can merge: writes outside the view change the buffer.
#pragma once

#include <bkn/tensor.hpp>
#include <cstddef>
#include <vector>

namespace bkn_test {

enum class padded_layout {
  nc,
  nchw,
  nhwc,
  rows,         // padded lines: H and W do not merge, a group's channels and H do
  padded,       // every axis padded: no exact re-view, the per-channel fallback
  padded_last,  // channels-last with padded pixels and lines: the fallback too
};

inline const char* padded_layout_name(padded_layout l) {
  switch (l) {
    case padded_layout::nc: return "NC";
    case padded_layout::nchw: return "NCHW";
    case padded_layout::nhwc: return "NHWC";
    case padded_layout::rows: return "rows";
    case padded_layout::padded: return "padded";
    case padded_layout::padded_last: return "padded_last";
  }
  return "?";
}

/// An (N, C, H, W) view in layout l, one element into a buffer that holds `sentinel` everywhere
/// else (before, between and after the view's elements). A copy views its own buffer.
template <class T>
struct sentinel_tensor {
  std::vector<T> memory;
  bkn::tensor_view<T> view;

  sentinel_tensor(const sentinel_tensor& other)
      : memory(other.memory), view(other.rebased(memory)) {}
  sentinel_tensor& operator=(const sentinel_tensor& other) {
    memory = other.memory;
    view = other.rebased(memory);
    return *this;
  }

  sentinel_tensor(padded_layout l, bkn::index_t N, bkn::index_t C, bkn::index_t H,
                  bkn::index_t W, T sentinel) {
    bkn::tensor_strides s{};
    switch (l) {
      case padded_layout::nc:
      case padded_layout::nchw: s = {C * H * W, H * W, W, 1}; break;
      case padded_layout::nhwc: s = {H * W * C, 1, W * C, C}; break;
      case padded_layout::rows: s = {C * H * (W + 2) + 3, H * (W + 2), W + 2, 1}; break;
      case padded_layout::padded:
        s = {(C + 1) * (H + 1) * (W + 2), (H + 1) * (W + 2), W + 2, 1};
        break;
      case padded_layout::padded_last:
        s = {(H * (W * (C + 1) + 1)) + 2, 1, W * (C + 1) + 1, C + 1};
        break;
    }
    memory.assign(std::size_t(N * s.batch + C * s.channel + H * s.height + W * s.width + 4),
                  sentinel);
    view = bkn::strided(memory.data() + 1, {N, C, H, W}, s);
  }
  bkn::tensor_view<const T> cview() const { return view; }
  /// This view's layout over another buffer of the same size.
  bkn::tensor_view<T> rebased(std::vector<T>& buffer) const {
    return {buffer.data() + (view.data() - memory.data()), view.shape(), view.strides()};
  }
  T& at(bkn::index_t n, bkn::index_t c, bkn::index_t h, bkn::index_t w) const {
    return view(n, c, h, w);
  }
};

}  // namespace bkn_test
