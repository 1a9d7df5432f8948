// SPDX-License-Identifier: MIT
// The backend concept: the few passes over big tensors that a backend implements, declared
// as one dispatch point, bkn::kernels<Backend>, which each backend's header specializes.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "bkn/config.hpp"
#include "bkn/span.hpp"
#include "bkn/tensor.hpp"

BKN_BEGIN_NAMESPACE

namespace detail {
template <class>
inline constexpr bool always_false = false;

/// Whether group-sum functor F (steps.hpp) sets its sums' starting values with
/// start(c, acc, stride); otherwise they start at zero. sum_over_groups and a backend's own
/// group-sum loop ask it.
template <class F, class = void>
struct has_group_start : std::false_type {};
template <class F>
struct has_group_start<F, std::void_t<decltype(std::declval<const F&>().start(
                              index_t(0), static_cast<double*>(nullptr), index_t(1)))>>
    : std::true_type {};
}  // namespace detail

/// Kernels of one backend. Every routine of bkn is written over these passes; a backend
/// specializes this template in its own header. The specialization provides, with `B` the
/// backend, `T` the tensor element type and `P` the per-channel type (float or double):
///
///   static std::size_t scratch_bytes(const B&, const tensor_shape& x, index_t group_size,
///                                    covariance mode);
///       scratch the passes below need, in bytes, for tensors of shape `x`.
///   static void moments(const B&, tensor_view<const T> x, index_t group_size,
///                       span<P> mean, span<P> var, span<std::byte> scratch);
///       per (group g, channel c), at [g * C + c]: the mean and the biased variance over the
///       group's group_size * H * W values; centred before squaring, accumulated in double
///       (or combined pairwise), var >= 0.
///   static void covariance(const B&, tensor_view<const T> x, index_t group_size,
///                          span<const P> mean, span<P> cov, span<std::byte> scratch);
///       per group, the C x C biased covariance about `mean` at [g * C * C + i * C + j].
///   static void sums(const B&, tensor_view<const T> dy, tensor_view<const T> x,
///                    span<const P> centre, index_t group_size, span<P> sum_dy,
///                    span<P> sum_dy_centred, span<std::byte> scratch);
///       per (g, c): sum dy and sum dy * (x - centre[g * C + c]).
///   static void affine(const B&, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
///                      span<const P> centre, tensor_view<const T> v, span<const P> b,
///                      span<const P> k, index_t group_size);
///       out = a[g, c] * (u - centre[g, c]) + b[g, c] * v + k[g, c] elementwise,
///       g = n / group_size; `v` and `b` may be empty (the term is dropped). u - centre is
///       formed first, in the wider of T and P: it is exact for nearby values, so outputs keep
///       their precision when |mean| >> sigma. `out` may be the same view as `u` or `v`.
///   static void mix(const B&, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
///                   tensor_view<const T> v, span<const P> matrix, span<const P> centre,
///                   span<const P> k, index_t group_size);
///       per sample and pixel, on the channel vectors:
///       out = a[g] .* u + M[g] (v - centre[g]) + k[g], with M[g] the C x C row-major matrix at
///       matrix[g * C * C] (the full-covariance backward). `out` may be the same view as `u`;
///       it must not overlap `v`.
///   template <class F> static void for_each(const B&, index_t count, F f);
///       calls f(i) for every i in [0, count) where the backend's memory lives (f is a
///       BKN_HOST_DEVICE functor writing disjoint outputs): the per-channel math.
///
/// and optionally
///
///   static index_t group_chunk(const B&, const tensor_shape& x, index_t group_size,
///                              std::size_t element_bytes);
///       how many statistics groups forward and backward should take through their steps at a
///       time (each chunk's passes and per-channel math one after another, so that a chunk's
///       tensors and per-group arrays are read again from cache), for a tensor x of values of
///       element_bytes bytes; absent or 0: all at once.
///
/// Every pass is asynchronous with respect to the host on backends that have a stream, and
/// ordered with the others on the same backend value. The host-side checks are done by the
/// core routines before any pass runs; kernels assume valid arguments.
template <class Backend>
struct kernels {
  static_assert(detail::always_false<Backend>,
                "bkn: no kernels for this backend type. Include the backend's header, e.g. "
                "<bkn/backends/reference.hpp> or <bkn/backends/eigen.hpp>.");
};

/// Diagonal mode (per-channel variances, O(C)) or the paper's full covariance (O(C^2)).
enum class covariance { diagonal, full };

BKN_END_NAMESPACE
