// SPDX-License-Identifier: MIT
// welford: the mergeable (count, mean, m2) statistics state and Chan's combine formula,
// used between SIMD lanes, threads, blocks, groups and devices alike.
#pragma once

#include "bkn/config.hpp"

BKN_BEGIN_NAMESPACE

/// Count, mean and sum of squared deviations of a set of values. Two states merge exactly
/// (up to rounding) with `combine`, so partial statistics can be computed in any order.
/// Accumulate in double (or float on devices where double is slow): never E[x^2] - E[x]^2.
template <class A>
struct welford {
  A count = 0;
  A mean = 0;
  A m2 = 0;

  BKN_HOST_DEVICE constexpr void add(A x) noexcept {
    count += 1;
    const A delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  /// Chan et al.'s parallel combine.
  BKN_HOST_DEVICE constexpr void combine(const welford& other) noexcept {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const A total = count + other.count;
    const A delta = other.mean - mean;
    const A weight = other.count / total;
    mean += delta * weight;
    m2 += other.m2 + delta * delta * count * weight;
    count = total;
  }

  /// Biased variance m2 / count, clamped at 0 (rounding can leave m2 at -1e-30).
  BKN_HOST_DEVICE constexpr A variance() const noexcept {
    return count > 0 && m2 > 0 ? m2 / count : A(0);
  }
};

/// Statistics of a block of values summarized as a sum and a centred sum of squares
/// (sum (x - sum/count)^2), as SIMD and GPU reductions produce them.
template <class A>
BKN_HOST_DEVICE constexpr welford<A> welford_from_sums(A count, A sum, A centred_m2) noexcept {
  welford<A> w;
  if (count > 0) {
    w.count = count;
    w.mean = sum / count;
    w.m2 = centred_m2;
  }
  return w;
}

BKN_END_NAMESPACE
