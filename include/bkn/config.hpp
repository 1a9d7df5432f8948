// SPDX-License-Identifier: MIT
// Version, the versioned inline namespace, and the few macros every bkn header shares.
// Nothing here depends on anything but the standard library.
#pragma once

#include <cstdint>

#define BKN_VERSION_MAJOR 0
#define BKN_VERSION_MINOR 1
#define BKN_VERSION_PATCH 0

// Two frameworks that embed different bkn versions link into one process: every symbol lives
// in bkn::v<major>_<minor>, and `bkn::` still names it.
#define BKN_BEGIN_NAMESPACE \
  namespace bkn {           \
  inline namespace v0_1 {
#define BKN_END_NAMESPACE \
  }                       \
  }

// Per-channel math is compiled for the host and, under nvcc/hipcc, for the device too.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define BKN_HOST_DEVICE __host__ __device__
#else
#define BKN_HOST_DEVICE
#endif

// Small math the per-channel loops call (exp, log1p): inlined however large the routine that
// calls the loop grows, so that the loop still vectorizes (GCC stops inlining into routines
// past its growth limits, and a call per value is several times slower).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define BKN_FORCE_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define BKN_FORCE_INLINE inline __attribute__((always_inline))
#else
#define BKN_FORCE_INLINE inline
#endif

// A short loop over an array of vectors (detail::lanes) unrolled whole, so that each element
// keeps its register: GCC leaves the array in stack memory otherwise. Other compilers, and
// nvcc's front end, get no pragma (an unknown one is a warning that -Werror turns fatal).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define BKN_UNROLL_LANES _Pragma("GCC unroll 8")
#else
#define BKN_UNROLL_LANES
#endif

BKN_BEGIN_NAMESPACE

/// Signed 64-bit index for every extent, stride and offset: tensors past 2^31 elements are
/// addressed correctly, and negative differences never wrap.
using index_t = std::int64_t;

namespace detail {
template <class T>
struct type_identity {
  using type = T;
};
/// Excludes a parameter from template argument deduction, so a view of T converts to a view
/// of const T where the routine's element type is deduced from its outputs.
template <class T>
using nondeduced = typename type_identity<T>::type;
}  // namespace detail

BKN_END_NAMESPACE
