// SPDX-License-Identifier: MIT
// tensor_view: a non-owning (batch, channel, height, width) view with explicit element strides,
// the layout factories nc / nchw / nhwc / strided, and the host-side checks of a view.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <utility>

#include "bkn/config.hpp"
#include "bkn/error.hpp"

BKN_BEGIN_NAMESPACE

/// Extents of an activation tensor: batch N, channels C, spatial H x W (1 x 1 for NC).
struct tensor_shape {
  index_t batch = 0;
  index_t channels = 0;
  index_t height = 1;
  index_t width = 1;

  BKN_HOST_DEVICE constexpr index_t spatial() const noexcept { return height * width; }
  BKN_HOST_DEVICE constexpr index_t elements() const noexcept {
    return batch * channels * height * width;
  }
  friend constexpr bool operator==(const tensor_shape& a, const tensor_shape& b) noexcept {
    return a.batch == b.batch && a.channels == b.channels && a.height == b.height &&
           a.width == b.width;
  }
  friend constexpr bool operator!=(const tensor_shape& a, const tensor_shape& b) noexcept {
    return !(a == b);
  }
};

/// Element strides of the four axes, in elements (not bytes). Non-negative.
struct tensor_strides {
  index_t batch = 0;
  index_t channel = 0;
  index_t height = 0;
  index_t width = 0;
};

/// Non-owning view of caller memory in the backend's memory space. Element (n, c, h, w) is at
/// data()[n*strides.batch + c*strides.channel + h*strides.height + w*strides.width].
/// `T` may be const for inputs. Trivially copyable: kernels take it by value.
template <class T>
class tensor_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  constexpr tensor_view() noexcept = default;
  constexpr tensor_view(T* data, tensor_shape shape, tensor_strides strides) noexcept
      : data_(data), shape_(shape), strides_(strides) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
  constexpr tensor_view(const tensor_view<U>& other) noexcept  // NOLINT: T -> const T
      : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  BKN_HOST_DEVICE constexpr T* data() const noexcept { return data_; }
  BKN_HOST_DEVICE constexpr const tensor_shape& shape() const noexcept { return shape_; }
  BKN_HOST_DEVICE constexpr const tensor_strides& strides() const noexcept { return strides_; }
  BKN_HOST_DEVICE constexpr index_t batch() const noexcept { return shape_.batch; }
  BKN_HOST_DEVICE constexpr index_t channels() const noexcept { return shape_.channels; }
  BKN_HOST_DEVICE constexpr index_t spatial() const noexcept { return shape_.spatial(); }
  BKN_HOST_DEVICE constexpr bool empty() const noexcept { return shape_.elements() == 0; }

  BKN_HOST_DEVICE constexpr index_t offset(index_t n, index_t c, index_t h,
                                           index_t w) const noexcept {
    return n * strides_.batch + c * strides_.channel + h * strides_.height + w * strides_.width;
  }
  BKN_HOST_DEVICE constexpr T& operator()(index_t n, index_t c, index_t h,
                                          index_t w) const noexcept {
    return data_[offset(n, c, h, w)];
  }
  /// Element (n, c, s) with s = h * width + w, the flattened spatial index.
  BKN_HOST_DEVICE constexpr T& at(index_t n, index_t c, index_t s) const noexcept {
    return data_[offset(n, c, s / shape_.width, s % shape_.width)];
  }

  /// True when each (n, c) plane of H*W elements is contiguous (NCHW and NC storage).
  constexpr bool planes_contiguous() const noexcept {
    return (shape_.width == 1 || strides_.width == 1) &&
           (shape_.height == 1 || strides_.height == shape_.width);
  }
  /// True when the C channels of each pixel are contiguous (NHWC and NC storage).
  constexpr bool channels_contiguous() const noexcept {
    return shape_.channels == 1 || strides_.channel == 1;
  }
  /// True when each pixel's channel vectors follow each other without gaps, so the whole
  /// tensor is an (N*H*W) x C row-major matrix (dense NHWC and NC).
  constexpr bool pixels_dense() const noexcept {
    return channels_contiguous() &&
           (shape_.width == 1 || strides_.width == shape_.channels) &&
           (shape_.height == 1 || strides_.height == shape_.width * shape_.channels) &&
           (shape_.batch == 1 || strides_.batch == shape_.spatial() * shape_.channels);
  }

 private:
  T* data_ = nullptr;
  tensor_shape shape_{};
  tensor_strides strides_{};
};

/// Dense (N, C) rows: a fully connected layer's activations.
template <class T>
constexpr tensor_view<T> nc(T* data, index_t batch, index_t channels) noexcept {
  return {data, {batch, channels, 1, 1}, {channels, 1, 1, 1}};
}

/// Dense channels-first images, PyTorch's default layout.
template <class T>
constexpr tensor_view<T> nchw(T* data, index_t batch, index_t channels, index_t height,
                              index_t width) noexcept {
  return {data,
          {batch, channels, height, width},
          {channels * height * width, height * width, width, 1}};
}

/// Dense channels-last images (TensorFlow's default, PyTorch's channels_last).
template <class T>
constexpr tensor_view<T> nhwc(T* data, index_t batch, index_t channels, index_t height,
                              index_t width) noexcept {
  return {data,
          {batch, channels, height, width},
          {height * width * channels, 1, width * channels, channels}};
}

/// Any non-negative element strides, e.g. a slice of a larger tensor.
template <class T>
constexpr tensor_view<T> strided(T* data, tensor_shape shape, tensor_strides strides) noexcept {
  return {data, shape, strides};
}

namespace detail {

/// Host-side checks of a view passed as `name` to `routine`: non-negative strides, a non-null
/// pointer when non-empty, and, for views that are written (`written`), no two elements at the
/// same address (a zero or overlapping stride would make the result depend on write order).
template <class T>
void check_view(const char* routine, const char* name, const tensor_view<T>& v, bool written) {
  const tensor_shape& s = v.shape();
  const tensor_strides& st = v.strides();
  require(s.batch >= 0 && s.channels >= 0 && s.height >= 0 && s.width >= 0, routine, name,
          "extents must be non-negative, got (", s.batch, ", ", s.channels, ", ", s.height, ", ",
          s.width, ")");
  require(st.batch >= 0 && st.channel >= 0 && st.height >= 0 && st.width >= 0, routine, name,
          "strides must be non-negative, got (", st.batch, ", ", st.channel, ", ", st.height,
          ", ", st.width, ")");
  if (v.empty()) return;
  require(v.data() != nullptr, routine, name, "null data pointer for a non-empty tensor");
  if (!written) return;
  // Sufficient condition for distinct addresses: ordered by stride, each axis steps over the
  // whole span of the axes inside it.
  std::array<std::array<index_t, 2>, 4> axes{{{st.batch, s.batch},
                                              {st.channel, s.channels},
                                              {st.height, s.height},
                                              {st.width, s.width}}};
  std::sort(axes.begin(), axes.end());
  index_t span_inside = 1;
  for (const auto& [stride, extent] : axes) {
    if (extent == 1) continue;
    require(stride >= span_inside, routine, name,
            "output strides (", st.batch, ", ", st.channel, ", ", st.height, ", ", st.width,
            ") make elements overlap for extents (", s.batch, ", ", s.channels, ", ", s.height,
            ", ", s.width, ")");
    span_inside = stride * (extent - 1) + span_inside;
  }
}

/// The bytes [first, last) a view can touch.
template <class T>
std::pair<const char*, const char*> byte_range(const tensor_view<T>& v) {
  const tensor_shape& s = v.shape();
  const tensor_strides& st = v.strides();
  const index_t last = (s.batch - 1) * st.batch + (s.channels - 1) * st.channel +
                       (s.height - 1) * st.height + (s.width - 1) * st.width;
  const char* first = reinterpret_cast<const char*>(v.data());
  return {first, first + (last + 1) * index_t(sizeof(T))};
}

/// Requires the written view `out` either to be the same view as the read view `in` (when
/// `identical_ok`) or to share no memory with it: a partial overlap would make results depend
/// on the order the elements are written.
template <class T, class U>
void check_no_overlap(const char* routine, const char* out_name, const tensor_view<T>& out,
                      const char* in_name, const tensor_view<U>& in, bool identical_ok) {
  if (out.empty() || in.empty()) return;
  const bool identical = static_cast<const void*>(out.data()) == static_cast<const void*>(in.data()) &&
                         out.shape() == in.shape() && out.strides().batch == in.strides().batch &&
                         out.strides().channel == in.strides().channel &&
                         out.strides().height == in.strides().height &&
                         out.strides().width == in.strides().width;
  if (identical && identical_ok) return;
  const auto a = byte_range(out), b = byte_range(in);
  require(a.second <= b.first || b.second <= a.first, routine, out_name,
          identical ? "must not be the same memory as " : "overlaps ", in_name,
          identical ? "" : identical_ok ? " without being the same view" : "");
}

/// Finds the first non-finite element of a view in host memory, in (n, c, h, w) order, and
/// throws nonfinite_input naming it.
template <class T>
void check_finite(const char* routine, const char* name, const tensor_view<T>& v) {
  using std::isfinite;
  const tensor_shape& s = v.shape();
  for (index_t n = 0; n < s.batch; ++n)
    for (index_t c = 0; c < s.channels; ++c)
      for (index_t h = 0; h < s.height; ++h)
        for (index_t w = 0; w < s.width; ++w) {
          const double value = double(v(n, c, h, w));
          if (!isfinite(value)) throw nonfinite_input(routine, name, n, c, h, w, value);
        }
}

/// Requires `v` to have exactly `expected` extents.
template <class T>
void check_shape(const char* routine, const char* name, const tensor_view<T>& v,
                 const tensor_shape& expected) {
  const tensor_shape& s = v.shape();
  require(s == expected, routine, name, "expected shape (", expected.batch, ", ",
          expected.channels, ", ", expected.height, ", ", expected.width, "), got (", s.batch,
          ", ", s.channels, ", ", s.height, ", ", s.width, ")");
}

}  // namespace detail

BKN_END_NAMESPACE
