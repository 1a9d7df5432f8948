// SPDX-License-Identifier: MIT
// workspace_arena: carves typed, aligned arrays out of the caller's workspace, and measures
// the bytes a routine needs by running the same carving over no memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bkn/config.hpp"
#include "bkn/error.hpp"
#include "bkn/span.hpp"

BKN_BEGIN_NAMESPACE

/// Alignment of every array bkn carves from a workspace, and the alignment a workspace's
/// start must have.
inline constexpr std::size_t workspace_alignment = 64;

namespace detail {

/// A bump allocator over a caller-owned byte range. Built with no memory, it only counts, so
/// a routine's workspace_size() and the routine itself share one layout.
class workspace_arena {
 public:
  workspace_arena() = default;  // measuring
  explicit workspace_arena(span<std::byte> memory) : base_(memory.data()), capacity_(memory.size()) {}

  template <class U>
  span<U> take(index_t count) {
    used_ = round_up(used_);
    const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(U);
    span<U> result;
    if (base_ != nullptr && count > 0)
      result = span<U>(reinterpret_cast<U*>(base_ + used_), count);
    used_ += bytes;
    return result;
  }
  span<std::byte> take_bytes(std::size_t bytes) { return take<std::byte>(static_cast<index_t>(bytes)); }

  bool measuring() const noexcept { return base_ == nullptr; }
  std::size_t used() const noexcept { return round_up(used_); }
  index_t capacity() const noexcept { return capacity_; }

 private:
  static std::size_t round_up(std::size_t n) {
    return (n + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
  }
  std::byte* base_ = nullptr;
  index_t capacity_ = 0;
  std::size_t used_ = 0;
};

/// Requires `workspace` to hold `needed` bytes and start aligned.
inline void check_workspace(const char* routine, span<std::byte> workspace, std::size_t needed) {
  require(static_cast<std::size_t>(workspace.size()) >= needed, routine, "workspace",
          "expected at least ", needed, " bytes (see workspace_size), got ", workspace.size());
  if (needed == 0) return;
  require(workspace.data() != nullptr, routine, "workspace",
          "null data pointer for a workspace of ", workspace.size(), " bytes");
  const std::uintptr_t misalignment =
      reinterpret_cast<std::uintptr_t>(workspace.data()) % workspace_alignment;
  require(misalignment == 0, routine, "workspace", "expected a start aligned to ",
          workspace_alignment, " bytes, got an address ", misalignment, " bytes past a multiple");
}

}  // namespace detail

BKN_END_NAMESPACE
