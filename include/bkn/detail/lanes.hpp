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
#endif

/// Element-wise +=, * and a splat. The vector is wrapped in a struct: a struct of 64 bytes is
/// passed in memory whatever the instruction set, so translation units built with and without
/// AVX-512 agree on these functions' ABI; inlined, the struct lives in a register. (A local
/// array of doubles indexed in loops is instead often left in memory by GCC.)
struct lanes {
#ifdef BKN_VECTOR_LANES
  using vector = double __attribute__((vector_size(lane_count * sizeof(double))));
  vector v;
  lanes& operator+=(const lanes& o) {
    v += o.v;
    return *this;
  }
  friend lanes operator*(const lanes& a, const lanes& b) { return {a.v * b.v}; }
  static lanes splat(double x) { return {vector{x, x, x, x, x, x, x, x}}; }
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
#endif
  BKN_HOST_DEVICE double operator[](index_t l) const { return v[l]; }
};

BKN_HOST_DEVICE inline lanes splat(double x) { return lanes::splat(x); }

/// Eight consecutive values, widened to double.
template <class P>
BKN_HOST_DEVICE inline lanes load_lanes(const P* p) {
  lanes d;
#ifdef BKN_VECTOR_LANES
  if constexpr (std::is_same_v<P, float>) {
    // Eight widened floats as an initializer: GCC 12 compiles it to one vcvtps2pd from memory
    // under AVX-512, but __builtin_convertvector of a vector of eight floats to two halves
    // widened apart and an insert (four instructions a load, next to the tiles' FMAs).
    d.v = lanes::vector{double(p[0]), double(p[1]), double(p[2]), double(p[3]),
                        double(p[4]), double(p[5]), double(p[6]), double(p[7])};
    return d;
  } else if constexpr (std::is_same_v<P, double>) {
    std::memcpy(&d.v, p, sizeof d.v);
    return d;
  }
#endif
  for (index_t l = 0; l < lane_count; ++l) d.v[l] = double(p[l]);
  return d;
}

/// The eight values narrowed to P and stored at p.
template <class P>
BKN_HOST_DEVICE inline void store_lanes(P* p, const lanes& d) {
#ifdef BKN_VECTOR_LANES
  if constexpr (std::is_same_v<P, float>) {
    using floats = float __attribute__((vector_size(lane_count * sizeof(float))));
    const floats f = __builtin_convertvector(d.v, floats);
    std::memcpy(p, &f, sizeof f);
    return;
  } else if constexpr (std::is_same_v<P, double>) {
    std::memcpy(p, &d.v, sizeof d.v);
    return;
  }
#endif
  for (index_t l = 0; l < lane_count; ++l) p[l] = P(d[l]);
}

BKN_HOST_DEVICE inline double lane(const lanes& v, index_t l) { return v[l]; }

/// The eight lanes summed pairwise: ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)).
BKN_HOST_DEVICE inline double lane_sum(const lanes& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

}  // namespace detail
BKN_END_NAMESPACE
