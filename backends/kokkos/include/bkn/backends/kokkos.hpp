// SPDX-License-Identifier: MIT
// kokkos_backend: bkn's tensor passes as Kokkos parallel_for kernels on a caller's execution
// space instance, with chunked fixed-order reductions whose bits do not depend on thread count.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <Kokkos_Core.hpp>

#include "bkn/backend.hpp"
#include "bkn/math/welford.hpp"

BKN_BEGIN_NAMESPACE

/// Runs bkn on a Kokkos execution space instance, e.g. `kokkos_backend<Kokkos::OpenMP>{}` or
/// `kokkos_backend<Kokkos::Cuda>{stream_instance}`. The instance is copied, never owned: Kokkos
/// must be initialized before the first routine and finalized after the last, by the caller.
///
/// Every pass is one or two `parallel_for`s on `space`, asynchronous with respect to the host
/// and ordered with the other passes on the same instance: fence `space` before reading the
/// results on the host (on Serial and OpenMP a pass has finished when it returns). Tensors,
/// per-channel arrays and the workspace must live in `MemorySpace`, which `ExecutionSpace` must
/// be able to access. No pass allocates. Every sum is split and merged in an order fixed by the
/// shape alone, so results are bitwise the same run to run, on any OpenMP thread count, and on
/// Serial as on OpenMP (docs/kokkos.md).
template <class ExecutionSpace, class MemorySpace = typename ExecutionSpace::memory_space>
struct kokkos_backend {
  static_assert(Kokkos::is_execution_space<ExecutionSpace>::value,
                "bkn::kokkos_backend: ExecutionSpace must be a Kokkos execution space");
  static_assert(Kokkos::is_memory_space<MemorySpace>::value,
                "bkn::kokkos_backend: MemorySpace must be a Kokkos memory space");
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "bkn::kokkos_backend: ExecutionSpace cannot access MemorySpace");

  using execution_space = ExecutionSpace;
  using memory_space = MemorySpace;

  ExecutionSpace space;
};

namespace detail {
namespace kokkos_impl {

// Values one work item of a statistics pass reduces. A compile-time constant, never derived from
// the thread count or the execution space: it fixes how every sum is split and merged, and so
// every bit of the result, from the shape alone. 512 values keep a chunk in L1 for its second
// (centred) pass, and give G*C*ceil(m/512) work items, enough to fill the threads when G*C is
// small (one group of a few channels over a large batch).
inline constexpr index_t chunk_values = 512;
// The covariance pass has C work items per value already; bigger chunks keep its scratch, one
// double per (group, i, j, chunk), small.
inline constexpr index_t covariance_chunk_values = 2048;
// Channels one work item of moments or sums reduces on a host execution space when the channels
// are contiguous (NC, NHWC): independent sums side by side, which the compiler vectorizes,
// where one channel per item is a chain of dependent double additions. Each channel is still
// summed alone, in the same order, so the bits are those of one channel per item. Device spaces
// keep one channel per item: neighbouring threads then read neighbouring channels.
inline constexpr index_t host_channel_tile = 16;

/// Channels per work item of moments and sums on ExecutionSpace for these views.
template <class ExecutionSpace, class... Views>
index_t channel_tile(const Views&... views) {
  constexpr bool host =
      std::is_same_v<typename ExecutionSpace::memory_space, Kokkos::HostSpace>;
  return host && (views.channels_contiguous() && ...) ? host_channel_tile : 1;
}

/// How a per-(group, channel) reduction over group_size * H * W values is split. The values are
/// taken as rows r = (n - g * group_size) * H + h of W values each, in the reference backend's
/// order (n, then h, then w); a chunk is rows_per_chunk consecutive rows (the last may be short).
struct chunk_plan {
  index_t group_size = 0, height = 0, width = 0;
  index_t rows = 0;  // per (group, channel)
  index_t rows_per_chunk = 1;
  index_t chunks = 0;

  KOKKOS_INLINE_FUNCTION index_t first_row(index_t k) const { return k * rows_per_chunk; }
  KOKKOS_INLINE_FUNCTION index_t end_row(index_t k) const {
    const index_t end = (k + 1) * rows_per_chunk;
    return end < rows ? end : rows;
  }
  /// Number of values in chunk k.
  KOKKOS_INLINE_FUNCTION index_t values(index_t k) const {
    return (end_row(k) - first_row(k)) * width;
  }
  /// Offset of row r of group g, channel c, in a view of this plan's shape.
  template <class T>
  KOKKOS_INLINE_FUNCTION index_t row_offset(const tensor_view<T>& t, index_t g, index_t c,
                                            index_t r) const {
    return t.offset(g * group_size + r / height, c, r % height, 0);
  }
};

inline chunk_plan plan_chunks(const tensor_shape& x, index_t group_size, index_t chunk_target) {
  chunk_plan p;
  if (group_size <= 0 || x.height <= 0 || x.width <= 0) return p;
  p.group_size = group_size;
  p.height = x.height;
  p.width = x.width;
  p.rows = group_size * x.height;
  p.rows_per_chunk = chunk_target / x.width > 0 ? chunk_target / x.width : 1;
  p.chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  return p;
}

/// Runs f(i) for i in [0, count) on `space`. 64-bit indices: RangePolicy's default index type
/// is unsigned and may be 32 bits.
template <class ExecutionSpace, class F>
void launch(const ExecutionSpace& space, const char* label, index_t count, const F& f) {
  if (count <= 0) return;
  // Labels are at most 15 characters so that the std::string Kokkos makes of them stays in
  // the small-string buffer: no pass allocates.
  Kokkos::parallel_for(
      label, Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::int64_t>>(space, 0, count),
      f);
}

// ---- moments: per (g, c) chunk, a sum and a sum of squares about the chunk's own mean; then
// per (g, c), Chan's combine of the chunks in chunk order ----

/// Work item `item` of a reduction over `tile` channels per item: its group, chunk and first
/// channel, and how many channels it has.
struct reduction_item {
  index_t g, k, c0, count;

  KOKKOS_INLINE_FUNCTION reduction_item(index_t item, index_t C, index_t chunks, index_t tile) {
    const index_t tiles = (C + tile - 1) / tile, t = item % tiles;
    k = (item / tiles) % chunks;
    g = item / (tiles * chunks);
    c0 = t * tile;
    count = C - c0 < tile ? C - c0 : tile;
  }
};

/// Work items of a reduction over `groups` groups in `chunks` chunks, `tile` channels each.
inline index_t reduction_items(index_t groups, index_t chunks, index_t C, index_t tile) {
  return groups * chunks * ((C + tile - 1) / tile);
}

/// Work item `item` of reduction `op`: op.channels<width>(it, count), width 1 for one channel
/// per item, else the host tile, whose trip count is a constant when the tile is full.
template <class Op>
KOKKOS_INLINE_FUNCTION void reduce_item(const Op& op, index_t item, index_t C, index_t chunks,
                                        index_t tile) {
  const reduction_item it(item, C, chunks, tile);
  if (tile == 1)
    op.template channels<1>(it, 1);
  else if (it.count == host_channel_tile)
    op.template channels<host_channel_tile>(it, host_channel_tile);
  else
    op.template channels<host_channel_tile>(it, it.count);
}

template <class T>
struct moments_chunk_op {
  tensor_view<const T> x;
  chunk_plan plan;
  double* partial;  // [((g * chunks + k) * C + c) * 2 + {0: sum, 1: centred m2}]
  index_t tile;     // channels per work item (channel_tile)

  KOKKOS_INLINE_FUNCTION void operator()(index_t item) const {
    reduce_item(*this, item, x.channels(), plan.chunks, tile);
  }

  /// Channels c0 .. c0 + count (count <= width, a constant when the tile is full), each summed
  /// alone in the reference's order.
  template <int width>
  KOKKOS_INLINE_FUNCTION void channels(const reduction_item& it, index_t count) const {
    const index_t W = plan.width, step = x.strides().width, cs = x.strides().channel;
    double sum[width], mean[width], m2[width];
    for (index_t j = 0; j < count; ++j) sum[j] = 0, m2[j] = 0;
    for (index_t r = plan.first_row(it.k); r < plan.end_row(it.k); ++r) {
      const T* row = x.data() + plan.row_offset(x, it.g, it.c0, r);
      for (index_t w = 0; w < W; ++w)
        for (index_t j = 0; j < count; ++j) sum[j] += double(row[w * step + j * cs]);
    }
    // Centred before squaring: float32 data around 1e4 keeps its variance.
    for (index_t j = 0; j < count; ++j) mean[j] = sum[j] / double(plan.values(it.k));
    for (index_t r = plan.first_row(it.k); r < plan.end_row(it.k); ++r) {
      const T* row = x.data() + plan.row_offset(x, it.g, it.c0, r);
      for (index_t w = 0; w < W; ++w)
        for (index_t j = 0; j < count; ++j) {
          const double d = double(row[w * step + j * cs]) - mean[j];
          m2[j] += d * d;
        }
    }
    const index_t first = (it.g * plan.chunks + it.k) * x.channels() + it.c0;
    for (index_t j = 0; j < count; ++j) {
      partial[2 * (first + j)] = sum[j];
      partial[2 * (first + j) + 1] = m2[j];
    }
  }
};

template <class P>
struct moments_merge_op {
  chunk_plan plan;
  index_t channels;
  const double* partial;
  P* mean;
  P* var;

  KOKKOS_INLINE_FUNCTION void operator()(index_t i) const {  // i = g * C + c
    const index_t g = i / channels, c = i % channels;
    welford<double> total;
    for (index_t k = 0; k < plan.chunks; ++k) {
      const double* p = partial + 2 * ((g * plan.chunks + k) * channels + c);
      total.combine(welford_from_sums(double(plan.values(k)), p[0], p[1]));
    }
    mean[i] = P(total.mean);
    var[i] = P(total.variance());
  }
};

// ---- covariance: per (g, i <= j, chunk) a plain sum of centred products (the mean is given,
// so chunks add); per (g, i, j) the chunks summed in order. (i, j) and (j, i) read the same
// partials, so the result is exactly symmetric ----

template <class T, class P>
struct covariance_chunk_op {
  tensor_view<const T> x;
  chunk_plan plan;
  const P* mean;
  double* partial;  // [((g * chunks + k) * C + i) * C + j], j >= i

  KOKKOS_INLINE_FUNCTION void operator()(index_t e) const {
    const index_t C = x.channels(), j = e % C, i = (e / C) % C;
    if (j < i) return;
    const index_t k = (e / (C * C)) % plan.chunks, g = e / (C * C * plan.chunks);
    const index_t W = plan.width, step = x.strides().width;
    const double mi = double(mean[g * C + i]), mj = double(mean[g * C + j]);
    double sum = 0;
    for (index_t r = plan.first_row(k); r < plan.end_row(k); ++r) {
      const T* row_i = x.data() + plan.row_offset(x, g, i, r);
      const T* row_j = x.data() + plan.row_offset(x, g, j, r);
      for (index_t w = 0; w < W; ++w)
        sum += (double(row_i[w * step]) - mi) * (double(row_j[w * step]) - mj);
    }
    partial[e] = sum;
  }
};

template <class P>
struct covariance_merge_op {
  chunk_plan plan;
  index_t channels;
  const double* partial;
  P* cov;

  KOKKOS_INLINE_FUNCTION void operator()(index_t e) const {  // e = (g * C + i) * C + j
    const index_t C = channels, j = e % C, i = (e / C) % C, g = e / (C * C);
    const index_t lo = i < j ? i : j, hi = i < j ? j : i;
    double sum = 0;
    for (index_t k = 0; k < plan.chunks; ++k)
      sum += partial[((g * plan.chunks + k) * C + lo) * C + hi];
    cov[e] = P(sum / double(plan.rows * plan.width));
  }
};

// ---- sums: per (g, c, chunk) sum dy and sum dy (x - centre); per (g, c) the chunks summed in
// order ----

template <class T, class P>
struct sums_chunk_op {
  tensor_view<const T> dy, x;
  chunk_plan plan;
  const P* centre;
  double* partial;  // [((g * chunks + k) * C + c) * 2 + {0: sum dy, 1: sum dy (x - centre)}]
  index_t tile;     // channels per work item (channel_tile)

  KOKKOS_INLINE_FUNCTION void operator()(index_t item) const {
    reduce_item(*this, item, x.channels(), plan.chunks, tile);
  }

  /// As moments_chunk_op::channels.
  template <int width>
  KOKKOS_INLINE_FUNCTION void channels(const reduction_item& it, index_t count) const {
    const index_t C = x.channels(), W = plan.width;
    const index_t dy_step = dy.strides().width, x_step = x.strides().width;
    const index_t dy_cs = dy.strides().channel, x_cs = x.strides().channel;
    double m[width], s_dy[width], s_dyx[width];
    for (index_t j = 0; j < count; ++j)
      m[j] = double(centre[it.g * C + it.c0 + j]), s_dy[j] = 0, s_dyx[j] = 0;
    for (index_t r = plan.first_row(it.k); r < plan.end_row(it.k); ++r) {
      const T* dy_row = dy.data() + plan.row_offset(dy, it.g, it.c0, r);
      const T* x_row = x.data() + plan.row_offset(x, it.g, it.c0, r);
      for (index_t w = 0; w < W; ++w)
        for (index_t j = 0; j < count; ++j) {
          const double d = double(dy_row[w * dy_step + j * dy_cs]);
          s_dy[j] += d;
          s_dyx[j] += d * (double(x_row[w * x_step + j * x_cs]) - m[j]);
        }
    }
    const index_t first = (it.g * plan.chunks + it.k) * C + it.c0;
    for (index_t j = 0; j < count; ++j) {
      partial[2 * (first + j)] = s_dy[j];
      partial[2 * (first + j) + 1] = s_dyx[j];
    }
  }
};

template <class P>
struct sums_merge_op {
  chunk_plan plan;
  index_t channels;
  const double* partial;
  P* sum_dy;
  P* sum_dy_centred;

  KOKKOS_INLINE_FUNCTION void operator()(index_t i) const {  // i = g * C + c
    const index_t g = i / channels, c = i % channels;
    double s_dy = 0, s_dyx = 0;
    for (index_t k = 0; k < plan.chunks; ++k) {
      const double* p = partial + 2 * ((g * plan.chunks + k) * channels + c);
      s_dy += p[0];
      s_dyx += p[1];
    }
    sum_dy[i] = P(s_dy);
    sum_dy_centred[i] = P(s_dyx);
  }
};

// ---- elementwise passes ----

/// How affine_op cuts `out` into work items, each a run along its unit-stride axis.
enum class affine_lines {
  channels,  ///< the channels of a pixel (NHWC, NC)
  planes,    ///< a whole (n, c) plane, where every view's planes are contiguous (NCHW)
  rows,      ///< a row of a plane (strided channels-first)
};

/// out = a (u - centre) (+ b v) + k, a work item per line (affine_lines).
template <class T, class P>
struct affine_op {
  tensor_view<T> out;
  tensor_view<const T> u, v;
  const P *a, *centre, *b, *k;  // b null: no v term
  index_t group_size;
  affine_lines lines;

  KOKKOS_INLINE_FUNCTION void operator()(index_t i) const {
    const index_t C = out.channels(), H = out.shape().height, W = out.shape().width;
    if (lines == affine_lines::channels) {  // i = (n * H + h) * W + w
      const index_t w = i % W, h = (i / W) % H, n = i / (W * H);
      const index_t base = (n / group_size) * C;
      for (index_t c = 0; c < C; ++c) element(n, c, h, w, base + c);
    } else if (lines == affine_lines::planes) {  // i = n * C + c
      const index_t c = i % C, n = i / C, j = (n / group_size) * C + c;
      // Planes of a few values (7x7) would otherwise be seven work items of seven values.
      T* o = out.data() + out.offset(n, c, 0, 0);
      const T* uu = u.data() + u.offset(n, c, 0, 0);
      const T* vv = b ? v.data() + v.offset(n, c, 0, 0) : uu;
      const double aj = double(a[j]), mj = double(centre[j]), kj = double(k[j]);
      const double bj = b ? double(b[j]) : 0.0;
      for (index_t s = 0; s < H * W; ++s) {
        double r = aj * (double(uu[s]) - mj) + kj;  // element's expression
        if (b) r += bj * double(vv[s]);
        o[s] = T(r);
      }
    } else {  // i = (n * C + c) * H + h
      const index_t h = i % H, c = (i / H) % C, n = i / (H * C);
      const index_t j = (n / group_size) * C + c;
      for (index_t w = 0; w < W; ++w) element(n, c, h, w, j);
    }
  }

  // The reference backend's expression, in double, rounded once. Reads u and v before writing
  // out, so out may be the same view as either.
  KOKKOS_INLINE_FUNCTION void element(index_t n, index_t c, index_t h, index_t w, index_t j) const {
    double r = double(a[j]) * (double(u(n, c, h, w)) - double(centre[j])) + double(k[j]);
    if (b) r += double(b[j]) * double(v(n, c, h, w));
    out(n, c, h, w) = T(r);
  }
};

/// out[i] = a[i] u[i] + k[i] + sum_j M[i][j] (v[j] - centre[j]) on each pixel's channel
/// vectors; one work item
/// per output element, e = ((n * H + h) * W + w) * C + i, so a pixel's v is read by neighbours.
template <class T, class P>
struct mix_op {
  tensor_view<T> out;
  tensor_view<const T> u, v;
  const P *a, *matrix, *centre, *k;
  index_t group_size;

  KOKKOS_INLINE_FUNCTION void operator()(index_t e) const {
    const index_t C = out.channels(), H = out.shape().height, W = out.shape().width;
    const index_t i = e % C, w = (e / C) % W, h = (e / (C * W)) % H, n = e / (C * W * H);
    const index_t g = n / group_size;
    const P* row = matrix + (g * C + i) * C;
    const T* v_pixel = v.data() + v.offset(n, 0, h, w);
    const index_t v_step = v.strides().channel;
    double r = double(a[g * C + i]) * double(u(n, i, h, w)) + double(k[g * C + i]);
    const P* m = centre + g * C;
    for (index_t j = 0; j < C; ++j)
      r += double(row[j]) * (double(v_pixel[j * v_step]) - double(m[j]));
    out(n, i, h, w) = T(r);
  }
};

}  // namespace kokkos_impl
}  // namespace detail

template <class E, class M>
struct kernels<kokkos_backend<E, M>> {
  using B = kokkos_backend<E, M>;

  /// Doubles for the per-chunk partials of one pass; the passes run one after another on the
  /// instance, so they share it. Enough for any group size that is a multiple of `group_size`
  /// (backward sums over the whole batch in inference): a sum of ceilings is at least the
  /// ceiling of the sum.
  static std::size_t scratch_bytes(const B&, const tensor_shape& x, index_t group_size,
                                   bkn::covariance mode) {
    if (group_size <= 0) return 0;
    const index_t G = x.batch / group_size, C = x.channels;
    index_t doubles = 2 * G * C * plan(x, group_size).chunks;  // moments, sums
    if (mode == bkn::covariance::full) {
      const index_t cov = G * C * C * covariance_plan(x, group_size).chunks;
      if (cov > doubles) doubles = cov;
    }
    return static_cast<std::size_t>(doubles) * sizeof(double);
  }

  template <class T, class P>
  static void moments(const B& backend, tensor_view<const T> x, index_t group_size, span<P> mean,
                      span<P> var, span<std::byte> scratch) {
    using namespace detail::kokkos_impl;
    const index_t C = x.channels(), G = x.batch() / group_size;
    const chunk_plan p = plan(x.shape(), group_size);
    double* partial = partials(scratch, 2 * G * C * p.chunks);
    const index_t tile = channel_tile<E>(x);
    launch(backend.space, "bkn::moments", reduction_items(G, p.chunks, C, tile),
           moments_chunk_op<T>{x, p, partial, tile});
    launch(backend.space, "bkn::moments.2", G * C,
           moments_merge_op<P>{p, C, partial, mean.data(), var.data()});
  }

  template <class T, class P>
  static void covariance(const B& backend, tensor_view<const T> x, index_t group_size,
                         span<const P> mean, span<P> cov, span<std::byte> scratch) {
    using namespace detail::kokkos_impl;
    const index_t C = x.channels(), G = x.batch() / group_size;
    const chunk_plan p = covariance_plan(x.shape(), group_size);
    double* partial = partials(scratch, G * p.chunks * C * C);
    launch(backend.space, "bkn::cov", G * p.chunks * C * C,
           covariance_chunk_op<T, P>{x, p, mean.data(), partial});
    launch(backend.space, "bkn::cov.2", G * C * C,
           covariance_merge_op<P>{p, C, partial, cov.data()});
  }

  template <class T, class P>
  static void sums(const B& backend, tensor_view<const T> dy, tensor_view<const T> x,
                   span<const P> centre, index_t group_size, span<P> sum_dy, span<P> sum_dy_centred,
                   span<std::byte> scratch) {
    using namespace detail::kokkos_impl;
    const index_t C = x.channels(), G = x.batch() / group_size;
    const chunk_plan p = plan(x.shape(), group_size);
    double* partial = partials(scratch, 2 * G * C * p.chunks);
    const index_t tile = channel_tile<E>(dy, x);
    launch(backend.space, "bkn::sums", reduction_items(G, p.chunks, C, tile),
           sums_chunk_op<T, P>{dy, x, p, centre.data(), partial, tile});
    launch(backend.space, "bkn::sums.2", G * C,
           sums_merge_op<P>{p, C, partial, sum_dy.data(), sum_dy_centred.data()});
  }

  template <class T, class P>
  static void affine(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                     span<const P> centre, tensor_view<const T> v, span<const P> b,
                     span<const P> k, index_t group_size) {
    using namespace detail::kokkos_impl;
    const tensor_shape& s = out.shape();
    const bool has_v = !b.empty();
    // Lines along the axis with unit stride, so a work item streams through memory.
    const affine_lines lines =
        out.channels_contiguous() && s.channels > 1 ? affine_lines::channels
        : out.planes_contiguous() && u.planes_contiguous() && (!has_v || v.planes_contiguous())
            ? affine_lines::planes
            : affine_lines::rows;
    const index_t count = lines == affine_lines::channels ? s.batch * s.height * s.width
                          : lines == affine_lines::planes ? s.batch * s.channels
                                                          : s.batch * s.channels * s.height;
    launch(backend.space, "bkn::affine", count,
           affine_op<T, P>{out, u, v, a.data(), centre.data(), has_v ? b.data() : nullptr,
                           k.data(), group_size, lines});
  }

  template <class T, class P>
  static void mix(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                  tensor_view<const T> v, span<const P> matrix, span<const P> centre,
                  span<const P> k, index_t group_size) {
    using namespace detail::kokkos_impl;
    launch(backend.space, "bkn::mix", out.shape().elements(),
           mix_op<T, P>{out, u, v, a.data(), matrix.data(), centre.data(), k.data(), group_size});
  }

  /// f is the core's BKN_HOST_DEVICE functor; Kokkos copies it to where `space` runs.
  template <class F>
  static void for_each(const B& backend, index_t count, F f) {
    detail::kokkos_impl::launch(backend.space, "bkn::for_each", count, f);
  }

 private:
  static detail::kokkos_impl::chunk_plan plan(const tensor_shape& x, index_t group_size) {
    return detail::kokkos_impl::plan_chunks(x, group_size, detail::kokkos_impl::chunk_values);
  }
  static detail::kokkos_impl::chunk_plan covariance_plan(const tensor_shape& x,
                                                         index_t group_size) {
    return detail::kokkos_impl::plan_chunks(x, group_size,
                                            detail::kokkos_impl::covariance_chunk_values);
  }
  static double* partials(span<std::byte> scratch, index_t doubles) {
    // The core sizes the scratch with scratch_bytes(); a miss here is a bug in bkn, not misuse.
    assert(static_cast<std::size_t>(scratch.size()) >=
           static_cast<std::size_t>(doubles) * sizeof(double));
    (void)doubles;
    return reinterpret_cast<double*>(scratch.data());
  }
};

BKN_END_NAMESPACE
