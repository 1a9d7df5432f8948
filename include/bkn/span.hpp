// SPDX-License-Identifier: MIT
// span: a non-owning pointer and length, for per-channel vectors and workspaces.
// C++17 has no std::span; this one is trivially copyable so it can be passed to device code.
#pragma once

#include <cstddef>
#include <type_traits>

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE

/// Non-owning view of `size` contiguous elements in the backend's memory space.
/// An empty span (size 0) means "not given" wherever an argument is optional.
template <class T>
class span {
 public:
  using element_type = T;

  constexpr span() noexcept = default;
  constexpr span(T* data, index_t size) noexcept : data_(data), size_(size) {}
  template <class Container,
            class = decltype(static_cast<T*>(std::declval<Container&>().data()))>
  constexpr span(Container& c) noexcept  // NOLINT: implicit like std::span
      : data_(c.data()), size_(static_cast<index_t>(c.size())) {}
  template <class U, std::size_t N, class = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
  constexpr span(U (&array)[N]) noexcept  // NOLINT: implicit like std::span
      : data_(array), size_(index_t(N)) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
  constexpr span(span<U> other) noexcept  // NOLINT: span<T> -> span<const T>
      : data_(other.data()), size_(other.size()) {}

  BKN_HOST_DEVICE constexpr T* data() const noexcept { return data_; }
  BKN_HOST_DEVICE constexpr index_t size() const noexcept { return size_; }
  BKN_HOST_DEVICE constexpr bool empty() const noexcept { return size_ == 0; }
  BKN_HOST_DEVICE constexpr T& operator[](index_t i) const noexcept { return data_[i]; }
  BKN_HOST_DEVICE constexpr T* begin() const noexcept { return data_; }
  BKN_HOST_DEVICE constexpr T* end() const noexcept { return data_ + size_; }

  /// Elements [offset, offset + count).
  constexpr span subspan(index_t offset, index_t count) const noexcept {
    return span(data_ + offset, count);
  }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
};

template <class Container>
span(Container&) -> span<std::remove_pointer_t<decltype(std::declval<Container&>().data())>>;

BKN_END_NAMESPACE
