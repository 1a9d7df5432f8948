// SPDX-License-Identifier: MIT
// lanes: eight doubles that a CPU compiler keeps in vector registers (GCC and Clang vector
// extensions), or a plain array elsewhere (device code, other compilers); the same arithmetic.
#pragma once

#include <cstring>
#include <type_traits>

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE
namespace detail {

inline constexpr index_t lane_count = 8;

#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDA_ARCH__) && \
    !defined(__HIP_DEVICE_COMPILE__)
#define BKN_VECTOR_LANES 1
// The width of detail::lanes' parts, in doubles: the target's vectors (tests force each).
#if defined(BKN_LANES_PART_WIDTH)
#elif defined(__AVX512F__)
#define BKN_LANES_PART_WIDTH 8
#elif defined(__AVX__)
#define BKN_LANES_PART_WIDTH 4
#else
#define BKN_LANES_PART_WIDTH 2
#endif
#endif

/// Element-wise +=, * and a splat. On the host the eight doubles are held as vectors of the
/// widest width the target has (one of 8 under AVX-512, two of 4 under AVX, four of 2
/// otherwise): GCC keeps a vector of its target's width in a register, but a 64-byte vector
/// without AVX-512 has no machine mode, and GCC kept it in stack memory, moving its halves
/// through general registers (BKN-dense's predict on NC 2x1024 several times slower on AVX2).
/// The struct is 64 bytes whatever the instruction set, and is passed in memory, so
/// translation units built with and without AVX-512 agree on these functions' ABI; inlined,
/// its parts live in registers. (A local array of doubles indexed in loops is instead often
/// left in memory by GCC.)
struct lanes {
#ifdef BKN_VECTOR_LANES
  static constexpr index_t part_width = BKN_LANES_PART_WIDTH;
  static constexpr index_t part_count = lane_count / part_width;
  using part = double __attribute__((vector_size(part_width * sizeof(double))));
  part parts[part_count];

  BKN_FORCE_INLINE lanes& operator+=(const lanes& o) {
    BKN_UNROLL_LANES
    for (index_t i = 0; i < part_count; ++i) parts[i] += o.parts[i];
    return *this;
  }
  friend BKN_FORCE_INLINE lanes operator*(const lanes& a, const lanes& b) {
    lanes r;
    BKN_UNROLL_LANES
    for (index_t i = 0; i < part_count; ++i) r.parts[i] = a.parts[i] * b.parts[i];
    return r;
  }
  static BKN_FORCE_INLINE lanes splat(double x) {
    lanes r;
    BKN_UNROLL_LANES
    for (index_t i = 0; i < part_count; ++i) r.parts[i] = part{} + x;
    return r;
  }
  double operator[](index_t l) const { return parts[l / part_width][l % part_width]; }
#else
  double v[lane_count];
  BKN_HOST_DEVICE lanes& operator+=(const lanes& o) {
    for (index_t l = 0; l < lane_count; ++l) v[l] += o.v[l];
    return *this;
  }
  BKN_HOST_DEVICE friend lanes operator*(const lanes& a, const lanes& b) {
    lanes r;
    for (index_t l = 0; l < lane_count; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  BKN_HOST_DEVICE static lanes splat(double x) {
    lanes r;
    for (index_t l = 0; l < lane_count; ++l) r.v[l] = x;
    return r;
  }
  BKN_HOST_DEVICE double operator[](index_t l) const { return v[l]; }
#endif
};

BKN_HOST_DEVICE inline lanes splat(double x) { return lanes::splat(x); }

/// Eight consecutive values, widened to double.
template <class P>
BKN_HOST_DEVICE inline lanes load_lanes(const P* p) {
  lanes d;
#ifdef BKN_VECTOR_LANES
  constexpr index_t width = lanes::part_width;
  if constexpr (std::is_same_v<P, float>) {
    // Widened floats as an initializer: GCC 12 compiles it to one vcvtps2pd from memory per
    // part, but __builtin_convertvector of a vector of floats to two halves widened apart and
    // an insert (four instructions a load, next to the tiles' FMAs).
    BKN_UNROLL_LANES
    for (index_t i = 0; i < lanes::part_count; ++i) {
      const float* q = p + i * width;
#if BKN_LANES_PART_WIDTH == 8
      d.parts[i] = lanes::part{double(q[0]), double(q[1]), double(q[2]), double(q[3]),
                               double(q[4]), double(q[5]), double(q[6]), double(q[7])};
#elif BKN_LANES_PART_WIDTH == 4
      d.parts[i] = lanes::part{double(q[0]), double(q[1]), double(q[2]), double(q[3])};
#else
      d.parts[i] = lanes::part{double(q[0]), double(q[1])};
#endif
    }
    return d;
  } else if constexpr (std::is_same_v<P, double>) {
    std::memcpy(&d.parts, p, sizeof d.parts);
    return d;
  } else {
    BKN_UNROLL_LANES
    for (index_t l = 0; l < lane_count; ++l) d.parts[l / width][l % width] = double(p[l]);
    return d;
  }
#else
  for (index_t l = 0; l < lane_count; ++l) d.v[l] = double(p[l]);
  return d;
#endif
}

/// The eight values narrowed to P and stored at p.
template <class P>
BKN_HOST_DEVICE inline void store_lanes(P* p, const lanes& d) {
#ifdef BKN_VECTOR_LANES
  constexpr index_t width = lanes::part_width;
  if constexpr (std::is_same_v<P, float>) {
    using floats = float __attribute__((vector_size(width * sizeof(float))));
    BKN_UNROLL_LANES
    for (index_t i = 0; i < lanes::part_count; ++i) {
      const floats f = __builtin_convertvector(d.parts[i], floats);
      std::memcpy(p + i * width, &f, sizeof f);
    }
    return;
  } else if constexpr (std::is_same_v<P, double>) {
    std::memcpy(p, &d.parts, sizeof d.parts);
    return;
  }
#endif
  for (index_t l = 0; l < lane_count; ++l) p[l] = P(d[l]);
}

BKN_HOST_DEVICE inline double lane(const lanes& v, index_t l) { return v[l]; }

/// The eight lanes (of `lanes`, or of a plain array of eight doubles) summed pairwise:
/// ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)).
template <class Eight>
BKN_HOST_DEVICE inline double lane_sum(const Eight& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

}  // namespace detail
BKN_END_NAMESPACE
