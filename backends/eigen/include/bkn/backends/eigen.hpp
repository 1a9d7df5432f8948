// SPDX-License-Identifier: MIT
// eigen_backend: the CPU backend, Eigen array expressions over maps of the caller's tensors,
// threaded with OpenMP (when compiled with it) under a thread count set per backend value.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

// GCC before 13 warns that the AVX-512 intrinsics under Eigen's packet math (the 256-bit
// halves of a 512-bit packet: _mm512_extractf32x8_ps and kin) read an uninitialized value,
// since their _mm256_undefined_* is `__m256 __Y = __Y;` (GCC bug 105593). The warning names
// the code the intrinsic was inlined into: bkn's, or Eigen's own products where bkn's header
// is the first to include Eigen. It is silenced from here to the end of this header (and in
// the headers it is the first to include), nowhere else.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13 && defined(__AVX512F__)
#define BKN_EIGEN_GCC_AVX512_PRAGMAS 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <Eigen/Core>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "bkn/backend.hpp"
#include "bkn/math/welford.hpp"

BKN_BEGIN_NAMESPACE

/// CPU backend over Eigen. A pass runs on up to `threads` OpenMP threads (on the calling thread
/// when compiled without OpenMP, or when the tensor is too small to repay a fork) and has
/// returned when it returns. Work is split statically by `threads` alone and partial results
/// are merged in a fixed order, so for a given `threads` repeated calls are bitwise identical,
/// with or without OpenMP. No pass allocates: the reductions use the scratch of scratch_bytes;
/// `affine` and `mix`, which get no scratch, use stack tiles of at most 24 KiB; the Gram
/// products of `covariance` let Eigen pack operands on the stack (2 x 64 KiB at most, up to
/// C = 8192; beyond C = 16384 Eigen's packing buffers would go to the heap).
///
/// Speed: the statistics passes keep several SIMD accumulators (Eigen's packets, so the
/// instruction set is the one the host compiles for) and prefetch short channels-last rows of
/// tensors of 12 MiB and more, `affine` writes outputs of 8 MiB and more with streaming stores,
/// and for_each runs the core's 2-D functors row by row so that the compiler vectorizes the
/// per-channel math: compile with -fno-math-errno and -fno-trapping-math (GCC) for that to
/// include square roots and finiteness tests.
struct eigen_backend {
  int threads = 1;
  /// Tensors of fewer elements run on the calling thread: an OpenMP fork/join costs a few
  /// microseconds with spinning threads (tens with sleeping ones, OMP_WAIT_POLICY=passive), as
  /// long as a pass over 1 MiB takes. Tensors whose statistics pool 64 values or more (group
  /// size times pixels) fork from a quarter of it: measured here, NC 128x1024 is faster on two
  /// threads over the whole batch, and on one in statistics groups of 2 and 4.
  index_t parallel_min_elements = index_t(1) << 18;
};

namespace detail {

// Bytes of tensor per thread in a chunk of statistics groups (kernels::group_chunk), which stay
// in a core's L2 from one pass to the next; a chunk for several threads is at least the
// backend's parallel_min_elements, so that its passes are shared.
inline constexpr std::size_t eigen_chunk_bytes = std::size_t(256) << 10;
// Groups are cut into chunks only when a group has at most this many pixels (samples times
// pixels per sample): its per-channel arrays and math are then of the size of its share of the
// tensor, and over all groups at once they would spill from cache. Groups of more pixels have
// per-channel work that is small beside the tensor passes, and chunks cost them forks and
// passes too short for the rows to stream or be prefetched. Measured here, the time of forward
// plus backward in chunks over that of all at once (1 and 2 threads): 2 pixels (NC 8192x512 in
// groups of 2) 0.75-0.86; 4 (the same in groups of 4) 0.94-0.99; 8 and 16 (NCHW and NHWC
// 4096x512x2x2 in groups of 2 and 4) 0.99-1.15; 98 and 196 (NCHW and NHWC 256x512x7x7 in
// groups of 2 and 4, two threads) 1.12-1.48.
inline constexpr index_t eigen_chunk_pixels = 4;
// Statistics are summed in the element type over blocks of at most this many values per
// channel, then merged in double. Float rounding then grows with sqrt(block), not with the
// tensor, and a long plane's block stays in L1 between its two passes.
inline constexpr index_t eigen_block_values = 4096;
// Values of one Gram product in `covariance`. Eigen packs each operand into a buffer of at most
// this many doubles; under EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) it lives on the stack.
inline constexpr index_t eigen_gram_values = 8192;
// Pixel and channel tile of `mix`: three tiles of doubles are 24 KiB of stack.
inline constexpr int eigen_mix_tile = 32;
// Channel tile of the coefficient rows of `affine` on channels-last tensors (the conversion
// path, where the coefficients' type is not the tensor's).
inline constexpr int eigen_affine_tile = 64;

inline int eigen_team(const eigen_backend& backend, index_t elements) noexcept {
  return backend.threads > 1 && elements >= backend.parallel_min_elements ? backend.threads : 1;
}

// A pass over a tensor whose statistics each pool at least this many values (group size times
// pixels) forks from a quarter of parallel_min_elements: its per-(group, channel) arrays, which
// the calling thread fills and reads between the passes, are then at most 1/64 of the tensor.
// Measured here at 2 threads (interleaved A/B, medians of 5 runs): tensors of 2^16 to 2^18
// values pooling 128 or more were 1.2-1.9x faster forked (NC 128x1024, 256x512 and 64x2048;
// NCHW and NHWC 8x128x14x14, 2x128x28x28, 4x32x24x24); NC 128x1024 in groups of 2 and 4
// (pooling 2 and 4 values) was 1.05-1.6x slower forked. A floor of an eighth of
// parallel_min_elements lost on NHWC 2x512x7x7 (forward 1.06-1.09x slower).
inline constexpr index_t eigen_parallel_pooled_values = 64;

/// The team of a pass over `x` in statistics groups of `group_size` samples.
inline int eigen_team(const eigen_backend& backend, const tensor_shape& x,
                      index_t group_size) noexcept {
  const bool pools_many = group_size * x.height * x.width >= eigen_parallel_pooled_values;
  const index_t floor = pools_many ? backend.parallel_min_elements / 4
                                   : backend.parallel_min_elements;
  return backend.threads > 1 && x.elements() >= floor ? backend.threads : 1;
}

/// Calls f(part) for every part in [0, team), on `team` threads when OpenMP is there. The parts,
/// not the threads the runtime grants, define the partition: results never depend on the latter.
template <class F>
void eigen_parallel(int team, F&& f) {
#ifdef _OPENMP
  if (team > 1) {
#pragma omp parallel for num_threads(team) schedule(static, 1)
    for (int part = 0; part < team; ++part) f(part);
    return;
  }
#endif
  for (int part = 0; part < team; ++part) f(part);
}

/// Whether F has the 2-D form of the core's per-channel functors: grid_width() and at(row, col).
template <class F, class = void>
struct eigen_has_grid : std::false_type {};
template <class F>
struct eigen_has_grid<F, std::void_t<decltype(std::declval<const F&>().grid_width()),
                                     decltype(std::declval<const F&>().at(index_t(0), index_t(0)))>>
    : std::true_type {};

/// Whether F's items are large (work_per_item(), steps.hpp): worth sharing among threads.
template <class F, class = void>
struct eigen_has_item_work : std::false_type {};
template <class F>
struct eigen_has_item_work<F, std::void_t<decltype(std::declval<const F&>().work_per_item())>>
    : std::true_type {};

/// Whether F is a group-sum functor (steps.hpp): sums, group_count(), add(g, c, acc, stride)
/// and finish(c, acc, stride).
template <class F, class = void>
struct eigen_has_group_sums : std::false_type {};
template <class F>
struct eigen_has_group_sums<
    F, std::void_t<decltype(F::sums), decltype(std::declval<const F&>().group_count()),
                   decltype(std::declval<const F&>().add(index_t(0), index_t(0),
                                                         static_cast<double*>(nullptr), index_t(0))),
                   decltype(std::declval<const F&>().finish(
                       index_t(0), static_cast<const double*>(nullptr), index_t(0)))>>
    : std::true_type {};

// Accumulators of a block of columns of a group-sum functor (sums per column x columns): 16 KiB
// of doubles, which stay in L1 while the rows stream past (2 KiB of floats per row and array at
// four sums, 8 KiB at one).
inline constexpr index_t eigen_group_sums_values = 2048;

// The inner loop over a row of a 2-D functor: each column writes its own outputs, so its
// iterations carry no dependences. GCC is told just that (ivdep), not to vectorize at any cost
// (OpenMP's simd): a forced loop is not unswitched on the functors' optional (null) pointers,
// and its masked loads through a null pointer cost a microcode assist per vector on AMD.
// Clang gets no hint: its only one (loop vectorize) is a demand, and a loop it then cannot
// vectorize (under sanitizers, say) is a warning at the caller that -Werror turns fatal.
#if defined(__GNUC__) && !defined(__clang__)
#define BKN_EIGEN_SIMD_LOOP _Pragma("GCC ivdep")
#else
#define BKN_EIGEN_SIMD_LOOP
#endif
// A lambda whose packets must stay in registers across its caller's loop: inlined even where
// the compiler's size heuristics would make it a call (GCC did so for tiles of four packets,
// and under AVX-512 for eigen_column_tile's, whose sums then went through the stack).
#if defined(__GNUC__)
#define BKN_EIGEN_INLINE_LAMBDA __attribute__((always_inline))
#else
#define BKN_EIGEN_INLINE_LAMBDA
#endif

/// First of the units [0, units) that `part` of `team` owns: contiguous static ranges.
inline index_t eigen_first_unit(index_t units, int part, int team) noexcept {
  return units * part / team;
}

/// Chunks each group's pixels are cut into for a reduction: one when the groups alone keep the
/// team busy; otherwise enough that groups * chunks <= team, so every chunk has a slot.
inline index_t eigen_chunks(index_t groups, int team) noexcept {
  return groups >= team ? 1 : team / groups;
}

/// Eigen's widest packet of T (T itself where Eigen does not vectorize T).
template <class T>
using eigen_packet = typename Eigen::internal::packet_traits<T>::type;
template <class T>
inline constexpr index_t eigen_lanes = Eigen::internal::unpacket_traits<eigen_packet<T>>::size;

/// Carves 64-byte aligned arrays out of a slot of the scratch; over no memory, only measures.
class eigen_carver {
 public:
  explicit eigen_carver(std::byte* base = nullptr) noexcept : base_(base) {}

  template <class U>
  U* take(index_t count) noexcept {
    U* result = base_ != nullptr ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += (static_cast<std::size_t>(count) * sizeof(U) + 63) / 64 * 64;
    return result;
  }
  std::size_t used() const noexcept { return used_; }

 private:
  std::byte* base_;
  std::size_t used_ = 0;
};

template <class Slot>
std::size_t eigen_slot_bytes(index_t channels) {
  eigen_carver measure;
  Slot::carve(measure, channels);
  return measure.used();
}

/// Slot `index` of the scratch: one per part of the team (and per chunk of a split group).
template <class Slot>
Slot eigen_slot(span<std::byte> scratch, index_t index, index_t channels) {
  const std::size_t bytes = eigen_slot_bytes<Slot>(channels);
  eigen_assert(static_cast<std::size_t>(scratch.size()) >= (index + 1) * bytes &&
               "bkn: eigen_backend scratch smaller than scratch_bytes()");
  eigen_carver carver(scratch.data() + index * bytes);
  return Slot::carve(carver, channels);
}

/// The units of a channels-last reduction: each of G groups cut into `chunks` chunks, unit
/// g * chunks + j, shared out over the team. reduce(g, j, state, work) reduces chunk j of group
/// g into `state`, with `work` (the thread's slot) for its partials. A whole group (one chunk)
/// reduces into the thread's slot and is stored, store(g, state), unless reduce returns true
/// (it stored the group itself). A split group's chunks reduce into slots of their own, merged
/// (Slot::merge) into the group's first after the parallel part, then stored.
template <class Slot, class Reduce, class Store>
void eigen_reduce_units(span<std::byte> scratch, index_t C, index_t G, index_t chunks, int team,
                        Reduce&& reduce, Store&& store) {
  const index_t units = G * chunks;
  eigen_parallel(team, [&](int part) {
    const Slot work = eigen_slot<Slot>(scratch, part, C);
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / chunks, j = unit % chunks;
      const Slot state = chunks > 1 ? eigen_slot<Slot>(scratch, unit, C) : work;
      bool stored = false;
      if constexpr (std::is_void_v<decltype(reduce(g, j, state, work))>)
        reduce(g, j, state, work);
      else
        stored = reduce(g, j, state, work);
      if (chunks == 1 && !stored) store(g, state);
    }
  });
  if (chunks == 1) return;
  for (index_t g = 0; g < G; ++g) {
    const Slot first = eigen_slot<Slot>(scratch, g * chunks, C);
    for (index_t j = 1; j < chunks; ++j)
      first.merge(eigen_slot<Slot>(scratch, g * chunks + j, C), C);
    store(g, first);
  }
}

/// Chan's combine, channel by channel, of a block of n values per channel (means block_mean,
/// sums of squared deviations block_m2) into a unit's state of `count` values per channel:
/// welford::combine's arithmetic, as vectors.
inline void eigen_combine(double& count, double* mean, double* m2, double n,
                          const double* block_mean, const double* block_m2, index_t C) {
  using vector = Eigen::Map<Eigen::ArrayXd>;
  using const_vector = Eigen::Map<const Eigen::ArrayXd>;
  if (n == 0) return;
  vector m(mean, C), s(m2, C);
  const const_vector bm(block_mean, C), bs(block_m2, C);
  if (count == 0) {
    m = bm;
    s = bs;
    count = n;
    return;
  }
  const double total = count + n, weight = n / total;
  s += bs + (bm - m).square() * count * weight;  // before the mean moves: delta = bm - m
  m += (bm - m) * weight;
  count = total;
}

/// Channels-last `moments`: a unit's running statistics, channel by channel (structure of
/// arrays, so that blocks merge as vectors), and the current block's partials.
template <class T>
struct eigen_moments_slot {
  double* count;       // 1: the unit's values so far, the same for every channel
  double* mean;        // per channel, the unit's mean so far
  double* m2;          // per channel, its sum of squared deviations
  double* block_mean;  // per channel, the block's mean
  double* block_m2;    // per channel, the block's sum of squared deviations
  T* sum;              // per channel, the block's sum about `centre`
  T* centre;           // the block's shift, near its mean
  T* squares;          // the block's sum of squares about `centre`

  static eigen_moments_slot carve(eigen_carver& c, index_t channels) {
    eigen_moments_slot s;
    s.count = c.take<double>(1);
    s.mean = c.take<double>(channels);
    s.m2 = c.take<double>(channels);
    s.block_mean = c.take<double>(channels);
    s.block_m2 = c.take<double>(channels);
    s.sum = c.take<T>(channels);
    s.centre = c.take<T>(channels);
    s.squares = c.take<T>(channels);
    return s;
  }
  /// Another chunk of the same group, folded into this one.
  void merge(const eigen_moments_slot& other, index_t C) const {
    eigen_combine(count[0], mean, m2, other.count[0], other.mean, other.m2, C);
  }
};

/// A unit's statistics as the mean and the biased variance (plain loops for the conversions
/// between T, P and double: the compiler vectorizes them, where Eigen 3.4 converts one scalar
/// at a time).
template <class T, class P>
void eigen_moments_store(const eigen_moments_slot<T>& unit, P* mean, P* var, index_t C) {
  const double count = unit.count[0];
  for (index_t c = 0; c < C; ++c) {
    mean[c] = P(unit.mean[c]);
    var[c] = P(unit.m2[c] > 0 ? unit.m2[c] / count : 0.0);  // welford::variance()
  }
}

/// Channels-last `sums`: a unit's sums and the current block's partials.
template <class T>
struct eigen_sums_slot {
  double* sum_dy;           // per channel, the unit's sums so far
  double* sum_dy_centred;
  double* gap;              // centre rounded to T, minus centre
  T* centre;                // centre rounded to T
  T* block_dy;              // per channel, the block's sums
  T* block_dy_centred;

  static eigen_sums_slot carve(eigen_carver& c, index_t channels) {
    eigen_sums_slot s;
    s.sum_dy = c.take<double>(channels);
    s.sum_dy_centred = c.take<double>(channels);
    s.gap = c.take<double>(channels);
    s.centre = c.take<T>(channels);
    s.block_dy = c.take<T>(channels);
    s.block_dy_centred = c.take<T>(channels);
    return s;
  }
  /// Another chunk of the same group, added to this one.
  void merge(const eigen_sums_slot& other, index_t C) const {
    for (index_t c = 0; c < C; ++c) {
      sum_dy[c] += other.sum_dy[c];
      sum_dy_centred[c] += other.sum_dy_centred[c];
    }
  }
};

/// A sums unit's start: its sums at zero, and each centre rounded to T with the rounding's gap,
/// for dy (x - centre) = dy (x - rounded) + dy (rounded - centre): the first term in T, the
/// correction in double.
template <class T, class P>
void eigen_sums_begin(const eigen_sums_slot<T>& unit, const eigen_sums_slot<T>& work,
                      const P* centre, index_t C) {
  for (index_t c = 0; c < C; ++c) {
    unit.sum_dy[c] = 0;
    unit.sum_dy_centred[c] = 0;
    const double exact = double(centre[c]);
    work.centre[c] = T(exact);
    work.gap[c] = double(work.centre[c]) - exact;
  }
}

/// A block's sums in T, added to its unit's in double with the centre's correction.
template <class T>
void eigen_sums_fold(const eigen_sums_slot<T>& unit, const eigen_sums_slot<T>& work,
                     index_t C) {
  for (index_t c = 0; c < C; ++c) {  // a loop the compiler vectorizes
    unit.sum_dy[c] += double(work.block_dy[c]);
    unit.sum_dy_centred[c] +=
        double(work.block_dy_centred[c]) + work.gap[c] * double(work.block_dy[c]);
  }
}

/// A unit's sums, rounded to P.
template <class T, class P>
void eigen_sums_store(const eigen_sums_slot<T>& unit, P* sum_dy, P* sum_dy_centred, index_t C) {
  for (index_t c = 0; c < C; ++c) {
    sum_dy[c] = P(unit.sum_dy[c]);
    sum_dy_centred[c] = P(unit.sum_dy_centred[c]);
  }
}

/// `covariance`: a unit's Gram matrix and the block of centred rows gathered for the next
/// product.
struct eigen_covariance_slot {
  double* gram;  // C x C, column-major, lower triangle
  double* mean;  // per channel, the group's mean
  double* rows;  // rows_per_block(C) x C, column-major

  static index_t rows_per_block(index_t channels) noexcept {
    return std::clamp<index_t>(eigen_gram_values / channels, 1, 512);
  }
  static eigen_covariance_slot carve(eigen_carver& c, index_t channels) {
    eigen_covariance_slot s;
    s.gram = c.take<double>(channels * channels);
    s.mean = c.take<double>(channels);
    s.rows = c.take<double>(rows_per_block(channels) * channels);
    return s;
  }
  /// Another chunk of the same group, added to this one.
  void merge(const eigen_covariance_slot& other, index_t C) const {
    Eigen::Map<Eigen::MatrixXd>(gram, C, C) += Eigen::Map<const Eigen::MatrixXd>(other.gram, C, C);
  }
};

/// Where the pixels of a view lie. Pixel p = n * H * W + h * W + w; the pixels of
/// [p, run_end(p)) follow one another `pixel_stride` elements apart, so a run of them and their
/// channels is one strided matrix.
template <class T>
struct eigen_pixels {
  T* data;
  index_t batch_stride, channel_stride, height_stride, width_stride;
  index_t spatial, width, channels;
  index_t pixel_stride;
  index_t run;  // runs end at multiples of `run` (a line, a sample); 0: they never end

  /// `keep_samples_apart`: runs never cross samples, even where the strides would allow it
  /// (planes layouts, whose runs must be contiguous).
  eigen_pixels(const tensor_view<T>& v, bool keep_samples_apart) noexcept
      : data(v.data()),
        batch_stride(v.strides().batch),
        channel_stride(v.strides().channel),
        height_stride(v.strides().height),
        width_stride(v.strides().width),
        spatial(v.spatial()),
        width(v.shape().width),
        channels(v.channels()) {
    const index_t H = v.shape().height;
    pixel_stride = width > 1 ? width_stride : H > 1 ? height_stride : batch_stride;
    const bool lines_join = width == 1 || H == 1 || height_stride == width * width_stride;
    const bool samples_join = lines_join && !keep_samples_apart &&
                              (v.batch() == 1 || batch_stride == spatial * pixel_stride);
    run = samples_join ? 0 : lines_join ? spatial : width;
  }

  T* at(index_t p) const noexcept {
    const index_t n = p / spatial, s = p - n * spatial;
    return data + n * batch_stride + (s / width) * height_stride + (s % width) * width_stride;
  }
  index_t run_end(index_t p) const noexcept {
    return run == 0 ? std::numeric_limits<index_t>::max() : (p / run + 1) * run;
  }
};

/// Calls f(p, length) over [begin, end) cut into runs of at most `max_length` pixels that are
/// uniformly strided in every view.
template <class F, class... Pixels>
void eigen_for_each_run(index_t begin, index_t end, index_t max_length, F&& f,
                        const Pixels&... pixels) {
  for (index_t p = begin; p < end;) {
    const index_t stop = std::min({end, p + max_length, pixels.run_end(p)...});
    f(p, stop - p);
    p = stop;
  }
}

/// How a pass walks its tensors. planes: each (n, c) plane is contiguous (NCHW); rows: each
/// pixel's channels are (NHWC, NC); strided: neither, the generic fallback.
enum class eigen_path { planes, rows, strided };

template <class... Views>
eigen_path eigen_choose_path(index_t spatial, const Views&... views) {
  const bool planes = (views.planes_contiguous() && ...);
  const bool rows = (views.channels_contiguous() && ...);
  // Planes of a few pixels make short vectors: rows are better when both layouts apply.
  if (spatial > 1 && planes && (spatial >= 16 || !rows)) return eigen_path::planes;
  return rows ? eigen_path::rows : eigen_path::strided;
}

template <class T>
using eigen_row_major =
    Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using eigen_row_major_of =
    std::conditional_t<std::is_const_v<T>, const eigen_row_major<T>, eigen_row_major<T>>;
template <class T>
using eigen_values =
    Eigen::Map<std::conditional_t<std::is_const_v<T>,
                                  const Eigen::Array<std::remove_const_t<T>, Eigen::Dynamic, 1>,
                                  Eigen::Array<std::remove_const_t<T>, Eigen::Dynamic, 1>>>;
template <class T>
using eigen_channel_row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
template <class T>
using eigen_const_channel_row = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;

/// The `length` x C matrix of pixels `pixel_stride` apart from `data`: rows of contiguous
/// channels, rows of strided channels, or, on planes, the transpose of C plane segments.
template <eigen_path Path, class T>
auto eigen_rows_at(T* data, index_t length, index_t channels, index_t pixel_stride,
                   index_t channel_stride) {
  using Eigen::Dynamic;
  if constexpr (Path == eigen_path::rows) {
    return Eigen::Map<eigen_row_major_of<T>, Eigen::Unaligned, Eigen::OuterStride<>>(
        data, length, channels, Eigen::OuterStride<>(pixel_stride));
  } else if constexpr (Path == eigen_path::strided) {
    return Eigen::Map<eigen_row_major_of<T>, Eigen::Unaligned, Eigen::Stride<Dynamic, Dynamic>>(
        data, length, channels, Eigen::Stride<Dynamic, Dynamic>(pixel_stride, channel_stride));
  } else {
    return Eigen::Map<eigen_row_major_of<T>, Eigen::Unaligned, Eigen::OuterStride<>>(
               data, channels, length, Eigen::OuterStride<>(channel_stride))
        .transpose();
  }
}

/// The run of `length` pixels from p, as a `length` x C matrix.
template <eigen_path Path, class T>
auto eigen_rows(const eigen_pixels<T>& x, index_t p, index_t length) {
  return eigen_rows_at<Path>(x.at(p), length, x.channels, x.pixel_stride, x.channel_stride);
}

/// A row of C contiguous values seen as `length` equal rows (outer stride 0). Eigen vectorizes
/// this map, where its rowwise() broadcast (a Replicate) is evaluated one scalar at a time.
template <class T>
auto eigen_repeated_row(const T* row, index_t length, index_t channels) {
  return eigen_rows_at<eigen_path::rows>(row, length, channels, 0, 1);
}

// ---- SIMD reductions. Eigen's own redux keeps two packet accumulators, so a float sum waits
// on the adder's latency; these keep four, or one per packet of a tile of channels, and add
// them up in a fixed order: the result depends on the data and its length alone. ----

/// Packets of channels that the channels-last kernels keep in registers over a block of rows;
/// wider rows go over eigen_row_group rows at a time instead (in tiles of eigen_wide_tile
/// packets or fewer).
inline constexpr index_t eigen_register_tile = 4;
/// Rows that the wide-row kernels read side by side: each accumulator (or coefficient) is
/// loaded once per this many rows, not once per row. Row by row, each packet's running sum
/// would go through memory every row, and a 64-byte store that the next row's load must wait
/// for (split in two by some CPUs, so not forwarded) costs more than the arithmetic.
inline constexpr index_t eigen_row_group = 8;
/// Addresses a multiple of this many bytes apart share a set of L1 (x86's 32-48 KiB of 8 or 12
/// ways), which then holds at most that many of their lines.
inline constexpr std::size_t eigen_l1_set_period = std::size_t(4) << 10;
/// Whether rows `row_stride` elements of T apart all fall in one set of L1.
template <class T>
constexpr bool eigen_rows_share_l1_set(index_t row_stride) noexcept {
  return std::size_t(row_stride) * sizeof(T) % eigen_l1_set_period == 0;
}
/// Packets of channels that the wide-row sums read side by side over a group of rows: two sums
/// per packet fill AVX2's 16 vector registers (the centres are read from L1).
inline constexpr index_t eigen_wide_tile = 8;
/// How far past an input, in their pages, an output's rows stay within reach of the input's
/// next loads: loads wait on earlier stores whose addresses match theirs in the low 12 bits.
/// Measured (affine, NC 1024x4096, one thread): out 64 to 192 bytes past x took 1.1-1.5x as
/// long walked forward as backward; 256 bytes and more, the same either way within the noise.
inline constexpr std::size_t eigen_store_lead_bytes = 192;
/// Per-channel coefficients of up to this many bytes stay in L1 while rows stream past.
inline constexpr std::size_t eigen_l1_coefficient_bytes = std::size_t(16) << 10;

// ---- Prefetching short rows. Eight rows of at most 2 KiB side by side are eight streams a few
// dozen lines long, each begun anew every eight rows: the hardware prefetchers barely start
// on them before they end. Measured here (AVX2, one thread, rows from memory), the walk read
// 512-channel rows at 12-19 GB/s against 36-44 GB/s for a sequential read, and at 31-40 GB/s
// with the rows about 16 KiB ahead prefetched; rows of 4 KiB and more (1024 floats) lost
// nothing to the walk and a little to the prefetches, and so did tensors that fit in cache
// (8 MiB: 0.19 -> 0.23 ms). ----

/// Rows of at most this many bytes are prefetched when the tensor is read from memory.
inline constexpr std::size_t eigen_prefetch_row_bytes = std::size_t(2) << 10;
/// Tensors of at least this many bytes are read from memory rather than from cache.
inline constexpr std::size_t eigen_prefetch_min_bytes = std::size_t(12) << 20;
/// How far ahead the rows are prefetched.
inline constexpr std::size_t eigen_prefetch_distance_bytes = std::size_t(16) << 10;

/// What the wide-row sums prefetch: the rows `ahead` rows on from each group of rows, while
/// those lie among the first `readable` rows of the matrix (which may run past the rows summed).
struct eigen_lookahead {
  index_t ahead = 0;  // 0: nothing
  index_t readable = 0;
};

/// Rows ahead that the wide-row sums prefetch over a tensor of `elements` values of
/// `element_bytes` bytes in rows of `channels`: 0 (none) for long rows or a tensor in cache.
inline index_t eigen_prefetch_rows(index_t channels, index_t elements,
                                   std::size_t element_bytes) noexcept {
  const std::size_t row_bytes = std::size_t(channels) * element_bytes;
  if (row_bytes > eigen_prefetch_row_bytes ||
      std::size_t(elements) * element_bytes < eigen_prefetch_min_bytes)
    return 0;
  return std::max<index_t>(eigen_row_group, index_t(eigen_prefetch_distance_bytes / row_bytes));
}

/// Asks for the cache line of p in L2 (a hint: no fault, no effect on results).
EIGEN_ALWAYS_INLINE void eigen_prefetch(const void* p) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

/// Calls f(std::integral_constant<int, j>()) for j < count: indices that are constants, so
/// arrays of packets indexed by them stay in registers.
template <int count, class F>
EIGEN_ALWAYS_INLINE void eigen_unrolled(F&& f) {
  if constexpr (count > 0) {
    eigen_unrolled<count - 1>(f);
    f(std::integral_constant<int, count - 1>());
  }
}

/// Planes that the short-plane reductions read side by side: independent accumulator chains
/// and one loop's control for all of them (a 7x7 plane is three AVX-512 packets and a value),
/// as many as the vector registers hold.
inline constexpr int eigen_side_planes = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;

/// Packets under which a plane is short: its four-chain loop runs at most once with 16 vector
/// registers (AVX2), never with 32 (AVX-512), and the loop's control and horizontal sums
/// dominate a plane read alone.
inline constexpr index_t eigen_short_plane_packets =
    EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 8;

/// Whether planes of `spatial` values are read eigen_side_planes at a time. Measured with 32
/// registers: 7x7 planes about 13% faster in cache, 14x14 planes (four chains filled) slower
/// side by side. On AVX2, 7x7 planes (six packets and a value) side by side: moments on the
/// NCHW 7x7 lines 0.63-0.78x the time, forward_BN 0.65-0.90x (one thread).
template <class T>
constexpr bool eigen_short_plane(index_t spatial) noexcept {
  return spatial < eigen_short_plane_packets * eigen_lanes<T>;
}

/// For each of `planes` planes j of n values, plane j at x + j * stride:
/// out[j] += sum (x_j[i] - shift[j]), and with `squares` sum (x_j[i] - shift[j])^2. Each plane
/// is summed in the same order whatever `planes` is (four packet accumulators, then the scalar
/// tail): the bits do not depend on how many planes are read together.
template <bool squares, int planes, class T>
EIGEN_ALWAYS_INLINE void eigen_sums_about(const T* x, index_t stride, index_t n, const T* shift,
                                          T* out) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  packet s[planes], a0[planes], a1[planes], a2[planes], a3[planes];
  eigen_unrolled<planes>([&](auto j) {
    s[j] = pset1<packet>(shift[j]);
    a0[j] = pset1<packet>(T(0));
    a1[j] = a0[j], a2[j] = a0[j], a3[j] = a0[j];
  });
  const auto add = [&](packet& acc, index_t j, index_t i, const packet& shift_j) {
    const packet d = psub(ploadu<packet>(x + j * stride + i), shift_j);
    acc = squares ? pmadd(d, d, acc) : padd(acc, d);
  };
  index_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L)
    eigen_unrolled<planes>([&](auto j) {
      add(a0[j], j, i, s[j]);
      add(a1[j], j, i + L, s[j]);
      add(a2[j], j, i + 2 * L, s[j]);
      add(a3[j], j, i + 3 * L, s[j]);
    });
  for (; i + L <= n; i += L) eigen_unrolled<planes>([&](auto j) { add(a0[j], j, i, s[j]); });
  T sum[planes];
  eigen_unrolled<planes>(
      [&](auto j) { sum[j] = predux(padd(padd(a0[j], a1[j]), padd(a2[j], a3[j]))); });
  for (; i < n; ++i)
    eigen_unrolled<planes>([&](auto j) {
      const T d = x[j * stride + i] - shift[j];
      sum[j] += squares ? d * d : d;
    });
  eigen_unrolled<planes>([&](auto j) { out[j] += sum[j]; });
}

/// sum (x[i] - shift) over i < n, and with `squares` sum (x[i] - shift)^2.
template <bool squares, class T>
EIGEN_ALWAYS_INLINE T eigen_sum_about(const T* x, index_t n, T shift) {
  T sum = T(0);
  eigen_sums_about<squares, 1>(x, 0, n, &shift, &sum);
  return sum;
}

/// For each of `planes` planes j of n values, plane j at x + j * stride:
/// sum[j] += sum (x_j[i] - shift[j]) and squares[j] += sum (x_j[i] - shift[j])^2, in one pass;
/// like eigen_sums_about, each plane summed in the same order whatever `planes` is.
template <int planes, class T>
EIGEN_ALWAYS_INLINE void eigen_moments_about(const T* x, index_t stride, index_t n,
                                             const T* shift, T* sum, T* squares) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  packet s[planes], a0[planes], a1[planes], a2[planes], a3[planes];
  packet q0[planes], q1[planes], q2[planes], q3[planes];
  eigen_unrolled<planes>([&](auto j) {
    s[j] = pset1<packet>(shift[j]);
    a0[j] = pset1<packet>(T(0));
    a1[j] = a0[j], a2[j] = a0[j], a3[j] = a0[j];
    q0[j] = a0[j], q1[j] = a0[j], q2[j] = a0[j], q3[j] = a0[j];
  });
  const auto add = [&](packet& acc, packet& sq, index_t j, index_t i, const packet& shift_j) {
    const packet d = psub(ploadu<packet>(x + j * stride + i), shift_j);
    acc = padd(acc, d);
    sq = pmadd(d, d, sq);
  };
  index_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L)
    eigen_unrolled<planes>([&](auto j) {
      add(a0[j], q0[j], j, i, s[j]);
      add(a1[j], q1[j], j, i + L, s[j]);
      add(a2[j], q2[j], j, i + 2 * L, s[j]);
      add(a3[j], q3[j], j, i + 3 * L, s[j]);
    });
  for (; i + L <= n; i += L)
    eigen_unrolled<planes>([&](auto j) { add(a0[j], q0[j], j, i, s[j]); });
  T total[planes], total_squares[planes];
  eigen_unrolled<planes>([&](auto j) {
    total[j] = predux(padd(padd(a0[j], a1[j]), padd(a2[j], a3[j])));
    total_squares[j] = predux(padd(padd(q0[j], q1[j]), padd(q2[j], q3[j])));
  });
  for (; i < n; ++i)
    eigen_unrolled<planes>([&](auto j) {
      const T d = x[j * stride + i] - shift[j];
      total[j] += d;
      total_squares[j] += d * d;
    });
  eigen_unrolled<planes>([&](auto j) {
    sum[j] += total[j];
    squares[j] += total_squares[j];
  });
}

/// For each of `planes` planes j (dy's at dy + j * dy_stride, x's at x + j * x_stride):
/// sum_dy[j] += sum dy_j[i] and sum_dy_centred[j] += sum dy_j[i] (x_j[i] - centre[j]), each
/// plane in the same order whatever `planes` is.
template <int planes, class T>
EIGEN_ALWAYS_INLINE void eigen_sums_products(const T* dy, index_t dy_stride, const T* x,
                                             index_t x_stride, index_t n, const T* centre,
                                             T* sum_dy, T* sum_dy_centred) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  packet m[planes], d0[planes], d1[planes], p0[planes], p1[planes];
  eigen_unrolled<planes>([&](auto j) {
    m[j] = pset1<packet>(centre[j]);
    d0[j] = pset1<packet>(T(0));
    d1[j] = d0[j], p0[j] = d0[j], p1[j] = d0[j];
  });
  const auto add = [&](packet& d_acc, packet& p_acc, index_t j, index_t i, const packet& m_j) {
    const packet d = ploadu<packet>(dy + j * dy_stride + i);
    d_acc = padd(d_acc, d);
    p_acc = pmadd(d, psub(ploadu<packet>(x + j * x_stride + i), m_j), p_acc);
  };
  index_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L)
    eigen_unrolled<planes>([&](auto j) {
      add(d0[j], p0[j], j, i, m[j]);
      add(d1[j], p1[j], j, i + L, m[j]);
    });
  for (; i + L <= n; i += L)
    eigen_unrolled<planes>([&](auto j) { add(d0[j], p0[j], j, i, m[j]); });
  T s_dy[planes], s_dyc[planes];
  eigen_unrolled<planes>([&](auto j) {
    s_dy[j] = predux(padd(d0[j], d1[j]));
    s_dyc[j] = predux(padd(p0[j], p1[j]));
  });
  for (; i < n; ++i)
    eigen_unrolled<planes>([&](auto j) {
      const T d = dy[j * dy_stride + i];
      s_dy[j] += d;
      s_dyc[j] += d * (x[j * x_stride + i] - centre[j]);
    });
  eigen_unrolled<planes>([&](auto j) {
    sum_dy[j] += s_dy[j];
    sum_dy_centred[j] += s_dyc[j];
  });
}

/// sum dy[i] and sum dy[i] (x[i] - centre) over i < n, added to `sum_dy`, `sum_dy_centred`.
template <class T>
void eigen_sum_products(const T* dy, const T* x, index_t n, T centre, T& sum_dy,
                        T& sum_dy_centred) {
  eigen_sums_products<1>(dy, 0, x, 0, n, &centre, &sum_dy, &sum_dy_centred);
}

/// The terms that eigen_column_sums adds up, at row i and channel j of one matrix or two (row
/// i at + i * stride, channel j at + j * step; packets need step 1) about a centre c: u, and a
/// v that multiplies it. A reduction keeps sum u, sum u v, or both.
/// Deviations, u = v = x - c: sum u and sum u^2 are the moments about c.
template <class T>
struct eigen_deviations {
  const T* x;
  index_t stride, step = 1;
  /// The matrix from row i on.
  eigen_deviations from_row(index_t i) const noexcept { return {x + i * stride, stride, step}; }

  bool contiguous() const noexcept { return step == 1; }
  /// Eight rows of one matrix are as many lines as a set of L1 holds: side by side even a
  /// multiple of eigen_l1_set_period apart (in halves, moments on NC 1024x4096 in page-aligned
  /// rows took 1.23-1.37x the time).
  static constexpr bool rows_crowd_l1() noexcept { return false; }
  template <class Packet>
  EIGEN_ALWAYS_INLINE void packet(index_t i, index_t j, const Packet& c, Packet& u,
                                  Packet& v) const {
    u = Eigen::internal::psub(Eigen::internal::ploadu<Packet>(x + i * stride + j), c);
    v = u;
  }
  EIGEN_ALWAYS_INLINE void scalar(index_t i, index_t j, T c, T& u, T& v) const {
    u = x[i * stride + j * step] - c;
    v = u;
  }
  EIGEN_ALWAYS_INLINE void prefetch(index_t i, index_t j) const {
    eigen_prefetch(x + i * stride + j);
  }
};

/// Products, u = dy and v = x - c: backward's sum dy and sum dy (x - c).
template <class T>
struct eigen_products {
  const T* dy;
  index_t dy_stride, dy_step;
  const T* x;
  index_t x_stride, x_step;
  /// The matrices from row i on.
  eigen_products from_row(index_t i) const noexcept {
    return {dy + i * dy_stride, dy_stride, dy_step, x + i * x_stride, x_stride, x_step};
  }

  bool contiguous() const noexcept { return dy_step == 1 && x_step == 1; }
  /// Whether either matrix's rows lie a multiple of eigen_l1_set_period apart: eight of them
  /// and eight of the other's are more lines than a set of L1 holds.
  bool rows_crowd_l1() const noexcept {
    return eigen_rows_share_l1_set<T>(dy_stride) || eigen_rows_share_l1_set<T>(x_stride);
  }
  template <class Packet>
  EIGEN_ALWAYS_INLINE void packet(index_t i, index_t j, const Packet& c, Packet& u,
                                  Packet& v) const {
    using namespace Eigen::internal;
    u = ploadu<Packet>(dy + i * dy_stride + j);
    v = psub(ploadu<Packet>(x + i * x_stride + j), c);
  }
  EIGEN_ALWAYS_INLINE void scalar(index_t i, index_t j, T c, T& u, T& v) const {
    u = dy[i * dy_stride + j * dy_step];
    v = x[i * x_stride + j * x_step] - c;
  }
  EIGEN_ALWAYS_INLINE void prefetch(index_t i, index_t j) const {
    eigen_prefetch(dy + i * dy_stride + j);
    eigen_prefetch(x + i * x_stride + j);
  }
};

/// first += u (with sum_u) and second += u v (with sum_uv), on packets or scalars.
template <bool sum_u, bool sum_uv, class V>
EIGEN_ALWAYS_INLINE void eigen_accumulate(V& first, V& second, const V& u, const V& v) {
  if constexpr (sum_u) first = Eigen::internal::padd(first, u);
  if constexpr (sum_uv) second = Eigen::internal::pmadd(u, v, second);
}

/// One tile of P packets from channel j, over `count` rows of a term: each packet's sums
/// about centre accumulate in registers over all the rows. Seeded, they go on from first and
/// second and are stored back (the wide rows' blocks of rows, in place); otherwise they start
/// from zero and are added to first and second at the end. Each keeps its callers' bits.
template <int P, bool seeded, bool sum_u, bool sum_uv, class T, class Term>
EIGEN_ALWAYS_INLINE void eigen_column_tile(const Term& term, index_t count, index_t j,
                                           const T* centre, T* first, T* second) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  packet m[P], f[P], s[P];
  eigen_unrolled<P>([&](auto t) BKN_EIGEN_INLINE_LAMBDA {
    m[t] = ploadu<packet>(centre + j + t * L);
    f[t] = s[t] = pset1<packet>(T(0));
    if constexpr (seeded && sum_u) f[t] = ploadu<packet>(first + j + t * L);
    if constexpr (seeded && sum_uv) s[t] = ploadu<packet>(second + j + t * L);
  });
  for (index_t r = 0; r < count; ++r)
    eigen_unrolled<P>([&](auto t) BKN_EIGEN_INLINE_LAMBDA {
      packet u, v;
      term.packet(r, j + t * L, m[t], u, v);
      eigen_accumulate<sum_u, sum_uv>(f[t], s[t], u, v);
    });
  eigen_unrolled<P>([&](auto t) BKN_EIGEN_INLINE_LAMBDA {
    T* const to_first = first + j + t * L;
    T* const to_second = second + j + t * L;
    if constexpr (!seeded) {
      if constexpr (sum_u) f[t] = padd(ploadu<packet>(to_first), f[t]);
      if constexpr (sum_uv) s[t] = padd(ploadu<packet>(to_second), s[t]);
    }
    if constexpr (sum_u) pstoreu(to_first, f[t]);
    if constexpr (sum_uv) pstoreu(to_second, s[t]);
  });
}

/// eigen_column_sums' wide rows from channel 0, eigen_row_group rows of `block` packet by packet
/// as far as whole cache lines go, the same channels `ahead` rows on prefetched a line of each
/// row per line read; returns the channel where it stopped. Out of line: inlined, it changed
/// how GCC built the loop without prefetches (1.2-1.3x slower in cache). `block` by value, so
/// that its pointers stay in registers across the stores (by reference: NHWC 256x512x7x7 sums
/// 0.79 of the time without prefetches, against 0.52).
template <bool sum_u, bool sum_uv, class T, class Term>
EIGEN_DONT_INLINE index_t eigen_column_packets_prefetched(const Term block, index_t C,
                                                          index_t ahead, const T* centre,
                                                          T* first, T* second) {
  constexpr index_t R = eigen_row_group, L = eigen_lanes<T>;
  constexpr index_t line = std::max<index_t>(1, 64 / index_t(sizeof(T) * L));
  index_t j = 0;
  for (; j + line * L <= C; j += line * L) {
    // Forced inline: GCC takes a call whose only effect is a prefetch for a call to a const
    // function, and drops it.
    eigen_unrolled<int(R)>(
        [&](auto r) BKN_EIGEN_INLINE_LAMBDA { block.prefetch(ahead + r, j); });
    eigen_unrolled<int(line)>([&](auto t) BKN_EIGEN_INLINE_LAMBDA {
      eigen_column_tile<1, true, sum_u, sum_uv>(block, R, j + t * L, centre, first, second);
    });
  }
  return j;
}

/// eigen_column_sums' wide rows from channel 0 where they crowd sets of L1 (rows_crowd_l1): the
/// `n` rows of `block` packet by packet, half of eigen_row_group rows at a time; returns the
/// channel where it stopped. Sixteen rows of two matrices side by side are more lines than a set
/// holds: each line was evicted before its second packet was read. The sums are added in the
/// same order, so to the same bits.
template <bool sum_u, bool sum_uv, class T, class Term>
EIGEN_DONT_INLINE index_t eigen_column_packets_halves(const Term block, index_t n, index_t C,
                                                      const T* centre, T* first, T* second) {
  constexpr index_t H = eigen_row_group / 2, L = eigen_lanes<T>;
  index_t j = 0;
  for (index_t h = 0; h < n; h += H) {
    const Term half = block.from_row(h);
    const index_t m = std::min(H, n - h);
    for (j = 0; j + L <= C; j += L)
      if (m == H)
        eigen_column_tile<1, true, sum_u, sum_uv>(half, H, j, centre, first, second);
      else
        eigen_column_tile<1, true, sum_u, sum_uv>(half, m, j, centre, first, second);
  }
  return j;
}

/// Per column c < C of a term's `rows` x C matrix (rows of channels): first[c] += sum_r u
/// (with sum_u) and second[c] += sum_r u v (with sum_uv), about centre[c]. Both outputs are
/// arrays of C; the one not kept is neither read nor written (the other may stand in for it).
/// Wide rows are prefetched as `lookahead` says.
template <bool sum_u, bool sum_uv, class T, class Term>
void eigen_column_sums(const Term& term, index_t rows, index_t C, const T* centre, T* first,
                       T* second, eigen_lookahead lookahead = {}) {
  constexpr index_t L = eigen_lanes<T>;
  index_t c = 0;
  if (term.contiguous() && C > eigen_register_tile * L) {
    // Wide rows: eigen_row_group rows side by side, packet by packet, the sums accumulating in
    // place (L1). A tile of channels over all rows would read the rows a few cache lines at a
    // time, a pattern memory streams poorly.
    constexpr index_t R = eigen_row_group;
    for (index_t r0 = 0; r0 < rows; r0 += R) {
      const index_t n = std::min(R, rows - r0);
      // A copy from row r0: its pointers stay in registers (not reloaded after each store),
      // and the rows' offsets are loop-invariant products.
      const Term block = term.from_row(r0);
      index_t j = 0;
      const auto tile = [&](auto packets) BKN_EIGEN_INLINE_LAMBDA {
        constexpr int P = decltype(packets)::value;
        if (n == R)
          eigen_column_tile<P, true, sum_u, sum_uv>(block, R, j, centre, first, second);
        else
          eigen_column_tile<P, true, sum_u, sum_uv>(block, n, j, centre, first, second);
        j += P * L;
      };
      if (C <= eigen_wide_tile * L) {
        // Rows of at most eight packets go whole, tiles of eight, four, two and one packets
        // side by side: the rows are read in memory order, and each packet's two chains of
        // additions (one per row) overlap the others' adder latency. Measured on moments
        // NHWC 32x64x56x56 (rows of eight packets on AVX2, from memory): 2.7x faster than
        // packet by packet and 1.6x faster than half rows.
        const auto fits = [&](auto packets) BKN_EIGEN_INLINE_LAMBDA {
          if (j + decltype(packets)::value * L <= C) tile(packets);
        };
        fits(std::integral_constant<int, int(eigen_wide_tile)>());
        fits(std::integral_constant<int, 4>());
        fits(std::integral_constant<int, 2>());
        fits(std::integral_constant<int, 1>());
      } else {
        // Wider rows packet by packet: the centres stay in registers, and successive packets'
        // chains overlap out of order. Tiles of eight gained nothing from memory (NHWC
        // 256x512x7x7, NC 1024x4096) and lost up to 1.25x in cache (NC 128x1024).
        if (lookahead.ahead > 0 && n == R && r0 + R + lookahead.ahead <= lookahead.readable)
          j = eigen_column_packets_prefetched<sum_u, sum_uv>(block, C, lookahead.ahead, centre,
                                                             first, second);
        else if (block.rows_crowd_l1())
          j = eigen_column_packets_halves<sum_u, sum_uv>(block, n, C, centre, first, second);
        while (j + L <= C) tile(std::integral_constant<int, 1>());
      }
      for (; j < C; ++j)
        for (index_t r = 0; r < n; ++r) {
          T u, v;
          block.scalar(r, j, centre[j], u, v);
          eigen_accumulate<sum_u, sum_uv>(first[j], second[j], u, v);
        }
    }
    return;
  }
  if (term.contiguous()) {
    // Tiles of four packets, then two, then one: every accumulator in a register over all rows.
    const auto tile = [&](auto packets) BKN_EIGEN_INLINE_LAMBDA {
      constexpr int P = decltype(packets)::value;
      eigen_column_tile<P, false, sum_u, sum_uv>(term, rows, c, centre, first, second);
      c += P * L;
    };
    while (c + 4 * L <= C) tile(std::integral_constant<int, 4>());
    while (c + 2 * L <= C) tile(std::integral_constant<int, 2>());
    while (c + L <= C) tile(std::integral_constant<int, 1>());
  }
  for (; c < C; ++c) {
    T f = T(0), s = T(0);
    for (index_t r = 0; r < rows; ++r) {
      T u, v;
      term.scalar(r, c, centre[c], u, v);
      eigen_accumulate<sum_u, sum_uv>(f, s, u, v);
    }
    if constexpr (sum_u) first[c] += f;
    if constexpr (sum_uv) second[c] += s;
  }
}

/// Rows of a unit's first block whose mean is the shift of the block's one-pass sums: the
/// shift then lies within sqrt(rows / eigen_pilot_rows) standard deviations of the block's
/// mean whatever the data (the pilot rows' own deviations count in the variance), and on
/// independent rows within one (eigen_cancels) but for a few channels in 10^5. With 8 rows it
/// was a few in 10^3, and finding and summing them again cost NC 128x1024 5% of moments.
inline constexpr index_t eigen_pilot_rows = 16;
/// Whether a block's one-pass sums about a shift, sum = n (mean - shift) and squares, lost
/// more than one bit to the cancellation squares - sum^2 / n (its rounding error then exceeds
/// twice that of squares about the mean): such channels are summed again about their mean.
template <class T>
inline bool eigen_cancels(T sum, T squares, double count) noexcept {
  return double(sum) * double(sum) > 0.5 * count * double(squares);
}
/// A block's sum of squared deviations from squares about `centre` (T), exactly corrected for
/// the gap to its mean: sum (x - c)^2 = sum (x - mean)^2 + n (c - mean)^2.
template <class T>
inline double eigen_m2_about(T squares, T centre, double mean, double count) noexcept {
  const double gap = double(centre) - mean;
  const double m2 = double(squares) - count * gap * gap;
  return m2 > 0 ? m2 : 0.0;
}
/// Per channel, a block's mean and sum of squared deviations from its one-pass sums about
/// `shift`, m2 = -1 where eigen_cancels (to be summed again); returns how many.
template <class T>
index_t eigen_block_moments(const T* shift, const T* sum, const T* squares, double count,
                            double* mean, double* m2, index_t C) {
  index_t cancelled = 0;
  for (index_t c = 0; c < C; ++c) {
    const double s = double(sum[c]), q = double(squares[c]), offset = s * s / count;
    const bool cancels = eigen_cancels(sum[c], squares[c], count);
    mean[c] = double(shift[c]) + s / count;
    m2[c] = cancels ? -1.0 : q - offset > 0 ? q - offset : 0.0;
    cancelled += cancels;
  }
  return cancelled;
}
/// f(c) for each channel c marked cancelled (m2[c] < 0) by eigen_block_moments, found a tile
/// of channels at a time (a scalar test of every channel took a tenth of moments on
/// NC 128x1024 whenever one channel cancelled).
template <class F>
void eigen_for_each_cancelled(const double* m2, index_t C, F&& f) {
  constexpr index_t tile = 64;
  for (index_t c0 = 0; c0 < C; c0 += tile) {
    const index_t n = std::min(tile, C - c0);
    if (Eigen::Map<const Eigen::ArrayXd>(m2 + c0, n).minCoeff() >= 0) continue;
    for (index_t c = c0; c < c0 + n; ++c)
      if (m2[c] < 0) f(c);
  }
}
/// More than one channel in this many cancelled: the whole block is summed again.
inline constexpr index_t eigen_cancelled_pass = 8;

/// The statistics of a block of values of one channel, given as segments: `segments(f)` calls
/// f(pointer, length) for each contiguous run, the same runs each time. The sum is taken about
/// the first value, so float partial sums stay near the spread of the data rather than its
/// offset; the squares are centred on the block mean rounded to T, and the rounding is
/// corrected exactly (sum (x - c)^2 = sum (x - mean)^2 + n (c - mean)^2). A second pass over a
/// block of at most eigen_block_values values reads L1.
template <class T, class Segments>
welford<double> eigen_block_statistics(const Segments& segments) {
  T first = T(0), sum = T(0);
  index_t n = 0;
  segments([&](const T* x, index_t length) {
    if (n == 0) first = x[0];
    sum += eigen_sum_about<false>(x, length, first);
    n += length;
  });
  const double mean = double(first) + double(sum) / double(n);
  const T centre = T(mean);
  T squares = T(0);
  segments([&](const T* x, index_t length) { squares += eigen_sum_about<true>(x, length, centre); });
  return welford<double>{double(n), mean, eigen_m2_about(squares, centre, mean, double(n))};
}

/// Rows per block of the channels-last statistics: about eigen_rows_block_values values (a
/// block's per-channel merge, in double, is paid once per block), 128 to eigen_block_values
/// rows (float sums of at most that many values per channel). Rows of more than 512 channels
/// take 128: at 32 rows of 4096 channels the merges took a fifth of moments (perf), and
/// moments NC 1024x4096 was 1.3-1.5x slower; larger blocks of narrow rows were slower when
/// each block was read twice (NHWC 32x64x56x56).
inline constexpr index_t eigen_rows_block_values = index_t(1) << 16;
inline index_t eigen_rows_block(index_t channels) noexcept {
  return std::clamp<index_t>(eigen_rows_block_values / std::max<index_t>(channels, 1), 128,
                             eigen_block_values);
}
/// Values of a tensor per block of whole samples on short planes (moments and sums; sums read
/// two tensors). Blocks of 2 samples of 512 7x7 planes spent 19% of moments in their merges.
inline constexpr index_t eigen_samples_block_values = index_t(1) << 17;

/// Whole sample planes per block (at least one; a longer plane is cut into blocks of its own).
inline index_t eigen_planes_per_block(index_t spatial) noexcept {
  return std::max<index_t>(1, eigen_block_values / std::max<index_t>(spatial, 1));
}

template <class T, class P>
void eigen_moments_planes(tensor_view<const T> x, index_t group_size, span<P> mean, span<P> var,
                          int team) {
  const index_t C = x.channels(), S = x.spatial(), units = x.batch() / group_size * C;
  const index_t per_block = eigen_planes_per_block(S);
  eigen_parallel(team, [&](int part) {
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / C, c = unit % C, end = (g + 1) * group_size;
      welford<double> w;
      for (index_t n0 = g * group_size; n0 < end; n0 += per_block) {
        const index_t n1 = std::min(n0 + per_block, end);
        const T* plane = x.data() + x.offset(n0, c, 0, 0);
        if (S > eigen_block_values) {
          for (index_t s = 0; s < S; s += eigen_block_values)
            w.combine(eigen_block_statistics<T>([&](auto&& f) {
              f(plane + s, std::min(eigen_block_values, S - s));
            }));
        } else {
          w.combine(eigen_block_statistics<T>([&](auto&& f) {
            for (index_t n = n0; n < n1; ++n) f(x.data() + x.offset(n, c, 0, 0), S);
          }));
        }
      }
      mean[unit] = P(w.mean);
      var[unit] = P(w.variance());
    }
  });
}

/// Planes of at most this many values are read sample by sample (all of a sample's planes in
/// memory order), not channel by channel: memory streams one long run better than a channel's
/// planes, a whole sample apart (measured: about 1.5x on 56x56 planes). Longer planes are cut
/// into blocks of their own.
inline constexpr index_t eigen_short_planes = eigen_block_values;

/// moments on short planes: a unit is a group (or a chunk of one), read in blocks of whole
/// samples, each block once (eigen_moments_about) about a shift near each channel's mean.
template <class T, class P>
void eigen_moments_samples(tensor_view<const T> x, index_t group_size, span<P> mean,
                           span<P> var, span<std::byte> scratch, int team) {
  using slot = eigen_moments_slot<T>;
  const index_t C = x.channels(), S = x.spatial(), G = x.batch() / group_size;
  const index_t chunks = std::min<index_t>(eigen_chunks(G, team), group_size);
  const index_t per_block =
      std::clamp<index_t>(eigen_samples_block_values / (C * S), 1, eigen_block_values / S);
  const auto plane = [&](index_t n, index_t c) { return x.data() + x.offset(n, c, 0, 0); };
  const auto store = [&](index_t g, const slot& s) {
    eigen_moments_store(s, mean.data() + g * C, var.data() + g * C, C);
  };
  const auto reduce = [&](index_t g, index_t j, const slot& state, const slot& work) {
    state.count[0] = 0;
    const index_t end = g * group_size + group_size * (j + 1) / chunks;
    for (index_t n0 = g * group_size + group_size * j / chunks; n0 < end; n0 += per_block) {
      const index_t n1 = std::min(n0 + per_block, end);
      const index_t cs = x.strides().channel;
      const bool short_planes = eigen_short_plane<T>(S), first_block = state.count[0] == 0;
      const auto each_plane = [&](auto&& f) {  // f(n, c, planes read side by side)
        for (index_t n = n0; n < n1; ++n) {
          constexpr int side = eigen_side_planes;
          index_t c = 0;
          if (short_planes)
            for (; c + side <= C; c += side) f(n, c, std::integral_constant<int, side>());
          for (; c < C; ++c) f(n, c, std::integral_constant<int, 1>());
        }
      };
      const double count = double((n1 - n0) * S);
      if (first_block && short_planes) {
        // A unit's first block of short planes: the sum about each channel's first value,
        // then the squares about the block's mean. A pilot for one pass (below) would add a
        // third horizontal sum per plane: NCHW 2x512x7x7, one block, was 1.12x slower.
        for (index_t c = 0; c < C; ++c) {
          work.centre[c] = plane(n0, c)[0];
          work.sum[c] = work.squares[c] = T(0);
        }
        each_plane([&](index_t n, index_t c, auto planes) {
          eigen_sums_about<false, decltype(planes)::value>(plane(n, c), cs, S,
                                                           work.centre + c, work.sum + c);
        });
        for (index_t c = 0; c < C; ++c) {
          work.block_mean[c] = double(work.centre[c]) + double(work.sum[c]) / count;
          work.centre[c] = T(work.block_mean[c]);
        }
        each_plane([&](index_t n, index_t c, auto planes) {
          eigen_sums_about<true, decltype(planes)::value>(plane(n, c), cs, S,
                                                          work.centre + c, work.squares + c);
        });
        for (index_t c = 0; c < C; ++c)
          work.block_m2[c] =
              eigen_m2_about(work.squares[c], work.centre[c], work.block_mean[c], count);
      } else {
        // One pass about a shift close to each channel's mean: the unit's mean so far or, in
        // its first block, the mean of a packet at the start of the block's first plane.
        for (index_t c = 0; c < C; ++c) {
          work.centre[c] = first_block ? plane(n0, c)[0] : T(state.mean[c]);
          work.sum[c] = work.squares[c] = T(0);
        }
        each_plane([&](index_t n, index_t c, auto planes) {
          constexpr int k = decltype(planes)::value;
          if (first_block && n == n0) {
            T head[k] = {};
            const index_t m = std::min(S, eigen_lanes<T>);
            eigen_sums_about<false, k>(plane(n, c), cs, m, work.centre + c, head);
            for (int i = 0; i < k; ++i)
              work.centre[c + i] = T(double(work.centre[c + i]) + double(head[i]) / double(m));
          }
          eigen_moments_about<k>(plane(n, c), cs, S, work.centre + c, work.sum + c,
                                 work.squares + c);
        });
        if (eigen_block_moments(work.centre, work.sum, work.squares, count, work.block_mean,
                                work.block_m2, C) > 0)
          eigen_for_each_cancelled(work.block_m2, C, [&](index_t c) {
            // The shift lay far from the mean: the channel's squares again, about its mean.
            const T centre = T(work.block_mean[c]);
            T squares = T(0);
            for (index_t n = n0; n < n1; ++n)
              squares += eigen_sum_about<true>(plane(n, c), S, centre);
            work.block_m2[c] = eigen_m2_about(squares, centre, work.block_mean[c], count);
          });
      }
      eigen_combine(state.count[0], state.mean, state.m2, count, work.block_mean,
                    work.block_m2, C);
    }
  };
  eigen_reduce_units<slot>(scratch, C, G, chunks, team, reduce, store);
}

/// Statistics groups of at most this many pixels (rows of channels) are reduced in registers,
/// packet by packet of channels: a micro-batch's statistics (NC in groups of 2, say) would
/// otherwise pay several passes over per-channel scratch for every few rows of data.
inline constexpr index_t eigen_few_rows = 16;

/// The mean and biased variance per channel of `n` rows (row r at rows[r], C contiguous
/// channels): the sum about the first row, then the squares about the mean.
template <class T>
void eigen_few_rows_moments(const T* const* rows, index_t n, index_t C, T* mean, T* var) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  const packet inverse_count = pset1<packet>(T(1) / T(n));
  index_t c = 0;
  for (; c + L <= C; c += L) {
    const packet first = ploadu<packet>(rows[0] + c);
    packet sum = pset1<packet>(T(0));
    for (index_t r = 1; r < n; ++r) sum = padd(sum, psub(ploadu<packet>(rows[r] + c), first));
    const packet m = pmadd(sum, inverse_count, first);
    packet squares = pset1<packet>(T(0));
    for (index_t r = 0; r < n; ++r) {
      const packet d = psub(ploadu<packet>(rows[r] + c), m);
      squares = pmadd(d, d, squares);
    }
    pstoreu(mean + c, m);
    pstoreu(var + c, pmul(squares, inverse_count));
  }
  for (; c < C; ++c) {
    const T first = rows[0][c];
    T sum = T(0);
    for (index_t r = 1; r < n; ++r) sum += rows[r][c] - first;
    const T m = first + sum / T(n);
    T squares = T(0);
    for (index_t r = 0; r < n; ++r) squares += (rows[r][c] - m) * (rows[r][c] - m);
    mean[c] = m;
    var[c] = squares / T(n);
  }
}

/// sum dy and sum dy (x - centre) per channel of `n` rows, centre in the element type.
template <class T>
void eigen_few_rows_sums(const T* const* dy, const T* const* x, index_t n, index_t C,
                         const T* centre, T* sum_dy, T* sum_dy_centred) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  index_t c = 0;
  for (; c + L <= C; c += L) {
    const packet m = ploadu<packet>(centre + c);
    packet sd = pset1<packet>(T(0)), sp = sd;
    for (index_t r = 0; r < n; ++r) {
      const packet d = ploadu<packet>(dy[r] + c);
      sd = padd(sd, d);
      sp = pmadd(d, psub(ploadu<packet>(x[r] + c), m), sp);
    }
    pstoreu(sum_dy + c, sd);
    pstoreu(sum_dy_centred + c, sp);
  }
  for (; c < C; ++c) {
    T sd = T(0), sp = T(0);
    for (index_t r = 0; r < n; ++r) {
      sd += dy[r][c];
      sp += dy[r][c] * (x[r][c] - centre[c]);
    }
    sum_dy[c] = sd;
    sum_dy_centred[c] = sp;
  }
}

template <eigen_path Path, class T, class P>
void eigen_moments_rows(tensor_view<const T> x, index_t group_size, span<P> mean, span<P> var,
                        span<std::byte> scratch, int team) {
  using slot = eigen_moments_slot<T>;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const index_t pixels = group_size * x.spatial(), chunks = eigen_chunks(G, team);
  const index_t block = eigen_rows_block(C);
  const index_t ahead = eigen_prefetch_rows(C, x.shape().elements(), sizeof(T));
  const eigen_pixels<const T> px(x, false);
  if constexpr (std::is_same_v<T, P> && Path == eigen_path::rows) {
    if (pixels <= eigen_few_rows) {
      eigen_parallel(team, [&](int part) {
        const T* rows[eigen_few_rows];
        const index_t last = eigen_first_unit(G, part + 1, team);
        for (index_t g = eigen_first_unit(G, part, team); g < last; ++g) {
          for (index_t r = 0; r < pixels; ++r) rows[r] = px.at(g * pixels + r);
          eigen_few_rows_moments(rows, pixels, C, mean.data() + g * C, var.data() + g * C);
        }
      });
      return;
    }
  }
  const auto store = [&](index_t g, const slot& s) {
    eigen_moments_store(s, mean.data() + g * C, var.data() + g * C, C);
  };
  const auto reduce = [&](index_t g, index_t j, const slot& state, const slot& work) {
    state.count[0] = 0;
    bool stored = false;
    const index_t end = g * pixels + pixels * (j + 1) / chunks;
    eigen_for_each_run(
        g * pixels + pixels * j / chunks, end, block,
        [&](index_t p, index_t n) {
          const T* first = px.at(p);
          const index_t cs = px.channel_stride, ps = px.pixel_stride;
          const eigen_deviations<T> rows{first, ps, cs};
          const double count = double(n);
          std::fill(work.sum, work.sum + C, T(0));
          std::fill(work.squares, work.squares + C, T(0));
          // One pass: the block's sum and squares about a shift close to its mean, the
          // unit's mean so far or, for its first block, the mean of the block's first rows.
          if (state.count[0] == 0) {
            const index_t m = std::min(n, eigen_pilot_rows);
            for (index_t c = 0; c < C; ++c) work.centre[c] = first[c * cs];
            eigen_column_sums<true, false>(rows, m, C, work.centre, work.sum, work.sum);
            for (index_t c = 0; c < C; ++c) {
              work.centre[c] = T(double(work.centre[c]) + double(work.sum[c]) / double(m));
              work.sum[c] = T(0);
            }
          } else {
            for (index_t c = 0; c < C; ++c) work.centre[c] = T(state.mean[c]);
          }
          eigen_column_sums<true, true>(rows, n, C, work.centre, work.sum, work.squares,
                                        {ahead, std::min(end, px.run_end(p)) - p});
          const index_t cancelled = eigen_block_moments(
              work.centre, work.sum, work.squares, count, work.block_mean, work.block_m2, C);
          if (cancelled * eigen_cancelled_pass > C) {
            // Many shifts lay far from their means: every channel's squares again, about its
            // mean (a second pass over the block).
            for (index_t c = 0; c < C; ++c) {
              work.centre[c] = T(work.block_mean[c]);
              work.squares[c] = T(0);
            }
            eigen_column_sums<false, true>(rows, n, C, work.centre, work.squares, work.squares);
            for (index_t c = 0; c < C; ++c)
              work.block_m2[c] =
                  eigen_m2_about(work.squares[c], work.centre[c], work.block_mean[c], count);
          } else if (cancelled > 0) {
            eigen_for_each_cancelled(work.block_m2, C, [&](index_t c) {
              const T centre = T(work.block_mean[c]);
              T squares = T(0);
              eigen_column_sums<false, true>(eigen_deviations<T>{first + c * cs, ps}, n, 1,
                                             &centre, &squares, &squares);
              work.block_m2[c] = eigen_m2_about(squares, centre, work.block_mean[c], count);
            });
          }
          double* m2 = work.block_m2;
          const bool alone = chunks == 1 && n == pixels;
          if (alone) {
            P* m = mean.data() + g * C;
            P* v = var.data() + g * C;
            for (index_t c = 0; c < C; ++c) {
              m[c] = P(work.block_mean[c]);
              v[c] = P(m2[c] > 0 ? m2[c] / count : 0.0);
            }
            stored = true;
            return;
          }
          eigen_combine(state.count[0], state.mean, state.m2, count, work.block_mean,
                        work.block_m2, C);
        },
        px);
    return stored;
  };
  eigen_reduce_units<slot>(scratch, C, G, chunks, team, reduce, store);
}

template <eigen_path Path, class T, class P>
void eigen_covariance(tensor_view<const T> x, index_t group_size, span<const P> mean,
                      span<P> cov, span<std::byte> scratch, int team) {
  using slot = eigen_covariance_slot;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const index_t pixels = group_size * x.spatial(), chunks = eigen_chunks(G, team);
  const index_t block = slot::rows_per_block(C);
  const eigen_pixels<const T> px(x, Path == eigen_path::planes);
  const auto store = [&](index_t g, const slot& s) {
    const double count = double(pixels);
    for (index_t i = 0; i < C; ++i)
      for (index_t j = 0; j < C; ++j)
        cov[(g * C + i) * C + j] = P(s.gram[std::min(i, j) * C + std::max(i, j)] / count);
  };
  const auto reduce = [&](index_t g, index_t j, const slot& state, const slot& work) {
    Eigen::Map<Eigen::RowVectorXd> centre(work.mean, C);
    Eigen::Map<Eigen::MatrixXd> rows(work.rows, block, C), gram(state.gram, C, C);
    gram.setZero();
    centre = eigen_const_channel_row<P>(mean.data() + g * C, C).template cast<double>().matrix();
    index_t filled = 0;
    auto flush = [&] {
      // Rank-k update of the lower triangle: half the flops of B^T B, and unlike Eigen's
      // general product it never starts threads of its own.
      if (filled > 0)
        gram.selfadjointView<Eigen::Lower>().rankUpdate(rows.topRows(filled).transpose());
      filled = 0;
    };
    eigen_for_each_run(
        g * pixels + pixels * j / chunks, g * pixels + pixels * (j + 1) / chunks, block,
        [&](index_t p, index_t length) {
          while (length > 0) {
            const index_t take = std::min(length, block - filled);
            rows.middleRows(filled, take).noalias() =
                eigen_rows<Path>(px, p, take).template cast<double>() -
                eigen_repeated_row(work.mean, take, C);
            filled += take;
            p += take;
            length -= take;
            if (filled == block) flush();
          }
        },
        px);
    flush();
  };
  eigen_reduce_units<slot>(scratch, C, G, chunks, team, reduce, store);
}

template <class T, class P>
void eigen_sums_planes(tensor_view<const T> dy, tensor_view<const T> x, span<const P> centre,
                       index_t group_size, span<P> sum_dy, span<P> sum_dy_centred, int team) {
  const index_t C = x.channels(), S = x.spatial(), units = x.batch() / group_size * C;
  const index_t per_block = eigen_planes_per_block(S);
  eigen_parallel(team, [&](int part) {
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / C, c = unit % C, end = (g + 1) * group_size;
      // dy (x - centre) = dy (x - rounded) + dy (rounded - centre): the first term in T, the
      // correction in double.
      const double exact = double(centre[unit]);
      const T rounded = T(exact);
      const double gap = double(rounded) - exact;
      double s_dy = 0, s_dy_centred = 0;
      // Float sums over blocks of at most eigen_block_values values, merged in double.
      const auto add_block = [&](auto&& segments) {
        T block_dy = T(0), block_dy_centred = T(0);
        segments([&](index_t offset_dy, index_t offset_x, index_t length) {
          eigen_sum_products(dy.data() + offset_dy, x.data() + offset_x, length, rounded,
                             block_dy, block_dy_centred);
        });
        s_dy += double(block_dy);
        s_dy_centred += double(block_dy_centred) + gap * double(block_dy);
      };
      for (index_t n0 = g * group_size; n0 < end; n0 += per_block) {
        const index_t n1 = std::min(n0 + per_block, end);
        if (S > eigen_block_values) {
          for (index_t s = 0; s < S; s += eigen_block_values)
            add_block([&](auto&& f) {
              f(dy.offset(n0, c, 0, 0) + s, x.offset(n0, c, 0, 0) + s,
                std::min(eigen_block_values, S - s));
            });
        } else {
          add_block([&](auto&& f) {
            for (index_t n = n0; n < n1; ++n) f(dy.offset(n, c, 0, 0), x.offset(n, c, 0, 0), S);
          });
        }
      }
      sum_dy[unit] = P(s_dy);
      sum_dy_centred[unit] = P(s_dy_centred);
    }
  });
}

/// sums on short planes, sample by sample (see eigen_moments_samples).
template <class T, class P>
void eigen_sums_samples(tensor_view<const T> dy, tensor_view<const T> x, span<const P> centre,
                        index_t group_size, span<P> sum_dy, span<P> sum_dy_centred,
                        span<std::byte> scratch, int team) {
  using slot = eigen_sums_slot<T>;
  const index_t C = x.channels(), S = x.spatial(), G = x.batch() / group_size;
  const index_t chunks = std::min<index_t>(eigen_chunks(G, team), group_size);
  const index_t per_block =
      std::clamp<index_t>(eigen_samples_block_values / 2 / (C * S), 1, eigen_block_values / S);
  const auto reduce = [&](index_t g, index_t j, const slot& out, const slot& work) {
    eigen_sums_begin(out, work, centre.data() + g * C, C);
    const index_t end = g * group_size + group_size * (j + 1) / chunks;
    for (index_t n0 = g * group_size + group_size * j / chunks; n0 < end; n0 += per_block) {
      const index_t n1 = std::min(n0 + per_block, end);
      std::fill(work.block_dy, work.block_dy + C, T(0));
      std::fill(work.block_dy_centred, work.block_dy_centred + C, T(0));
      constexpr int side = eigen_side_planes;
      for (index_t n = n0; n < n1; ++n) {
        index_t c = 0;
        if (eigen_short_plane<T>(S))
          for (; c + side <= C; c += side)
            eigen_sums_products<side>(dy.data() + dy.offset(n, c, 0, 0),
                                      dy.strides().channel, x.data() + x.offset(n, c, 0, 0),
                                      x.strides().channel, S, work.centre + c,
                                      work.block_dy + c, work.block_dy_centred + c);
        for (; c < C; ++c)
          eigen_sum_products(dy.data() + dy.offset(n, c, 0, 0), x.data() + x.offset(n, c, 0, 0),
                             S, work.centre[c], work.block_dy[c], work.block_dy_centred[c]);
      }
      eigen_sums_fold(out, work, C);
    }
  };
  const auto store = [&](index_t g, const slot& s) {
    eigen_sums_store(s, sum_dy.data() + g * C, sum_dy_centred.data() + g * C, C);
  };
  eigen_reduce_units<slot>(scratch, C, G, chunks, team, reduce, store);
}

template <eigen_path Path, class T, class P>
void eigen_sums_rows(tensor_view<const T> dy, tensor_view<const T> x, span<const P> centre,
                     index_t group_size, span<P> sum_dy, span<P> sum_dy_centred,
                     span<std::byte> scratch, int team) {
  using slot = eigen_sums_slot<T>;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const index_t pixels = group_size * x.spatial(), chunks = eigen_chunks(G, team);
  const index_t block = eigen_rows_block(C);
  const index_t ahead = eigen_prefetch_rows(C, x.shape().elements(), sizeof(T));
  const eigen_pixels<const T> pdy(dy, false), px(x, false);
  if constexpr (std::is_same_v<T, P> && Path == eigen_path::rows) {
    if (pixels <= eigen_few_rows) {  // centre is exact in T: no correction
      eigen_parallel(team, [&](int part) {
        const T *dy_rows[eigen_few_rows], *x_rows[eigen_few_rows];
        const index_t last = eigen_first_unit(G, part + 1, team);
        for (index_t g = eigen_first_unit(G, part, team); g < last; ++g) {
          for (index_t r = 0; r < pixels; ++r) {
            dy_rows[r] = pdy.at(g * pixels + r);
            x_rows[r] = px.at(g * pixels + r);
          }
          eigen_few_rows_sums(dy_rows, x_rows, pixels, C, centre.data() + g * C,
                              sum_dy.data() + g * C, sum_dy_centred.data() + g * C);
        }
      });
      return;
    }
  }
  const auto reduce = [&](index_t g, index_t j, const slot& out, const slot& work) {
    eigen_sums_begin(out, work, centre.data() + g * C, C);
    const index_t end = g * pixels + pixels * (j + 1) / chunks;
    eigen_for_each_run(
        g * pixels + pixels * j / chunks, end, block,
        [&](index_t p, index_t length) {
          std::fill(work.block_dy, work.block_dy + C, T(0));
          std::fill(work.block_dy_centred, work.block_dy_centred + C, T(0));
          const eigen_products<T> rows{pdy.at(p), pdy.pixel_stride, pdy.channel_stride,
                                       px.at(p), px.pixel_stride, px.channel_stride};
          const index_t readable = std::min({end, pdy.run_end(p), px.run_end(p)}) - p;
          eigen_column_sums<true, true>(rows, length, C, work.centre, work.block_dy,
                                        work.block_dy_centred, {ahead, readable});
          eigen_sums_fold(out, work, C);
        },
        pdy, px);
  };
  const auto store = [&](index_t g, const slot& s) {
    eigen_sums_store(s, sum_dy.data() + g * C, sum_dy_centred.data() + g * C, C);
  };
  eigen_reduce_units<slot>(scratch, C, G, chunks, team, reduce, store);
}

/// Pixels per unit of work of the elementwise passes; units never straddle groups, so a unit
/// has one set of coefficients.
inline index_t eigen_elementwise_block(index_t channels) noexcept {
  return std::clamp<index_t>(eigen_block_values / channels, 16, eigen_block_values);
}

// ---- Streaming stores. An output too large to stay in cache is written around it: a plain
// store first reads the line it writes (for ownership), so y = f(x) would move three tensors
// where it needs two (memcpy on large sizes does the same). ----

/// Outputs of at least this many bytes are written with non-temporal stores, in runs of at
/// least eigen_stream_min_run values.
inline constexpr std::size_t eigen_stream_min_bytes = std::size_t(8) << 20;
inline constexpr index_t eigen_stream_min_run = 1024;

template <class T, class Packet>
inline void eigen_stream_store(T* to, const Packet& p) {  // no streaming store for this packet
  Eigen::internal::pstoreu(to, p);
}
#if defined(__AVX512F__)
inline void eigen_stream_store(float* to, const __m512& p) { _mm512_stream_ps(to, p); }
inline void eigen_stream_store(double* to, const __m512d& p) { _mm512_stream_pd(to, p); }
#endif
#if defined(__AVX__)
inline void eigen_stream_store(float* to, const __m256& p) { _mm256_stream_ps(to, p); }
inline void eigen_stream_store(double* to, const __m256d& p) { _mm256_stream_pd(to, p); }
#endif
#if defined(__SSE2__)
inline void eigen_stream_store(float* to, const __m128& p) { _mm_stream_ps(to, p); }
inline void eigen_stream_store(double* to, const __m128d& p) { _mm_stream_pd(to, p); }
#endif

/// Orders a thread's streaming stores before whatever it does next (they are weakly ordered).
inline void eigen_stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Whether `p` is aligned to a whole packet of T (what a streaming store needs).
template <class T>
inline bool eigen_packet_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * eigen_lanes<T>) == 0;
}

/// Stores packet `r` at `to`: streaming when asked (`to` is then packet aligned).
template <bool stream, class T, class Packet>
inline void eigen_store(T* to, const Packet& r) {
  if constexpr (stream)
    eigen_stream_store(to, r);
  else
    Eigen::internal::pstoreu(to, r);
}

/// out[i] = (u[i] - m) a + k (+ v[i] b) over i < n, coefficients broadcast (planes). u and v
/// are read before out is written: out may be either.
template <bool stream, class T>
void eigen_affine_segment(T* out, const T* u, const T* v, index_t n, T a, T m, T k, T b) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  const packet pa = pset1<packet>(a), pm = pset1<packet>(m), pk = pset1<packet>(k),
               pb = pset1<packet>(b);
  const auto at = [&](index_t i) {
    const packet r = pmadd(psub(ploadu<packet>(u + i), pm), pa, pk);
    return v ? padd(r, pmul(ploadu<packet>(v + i), pb)) : r;
  };
  const auto one = [&](index_t i) {
    out[i] = v ? (u[i] - m) * a + k + v[i] * b : (u[i] - m) * a + k;
  };
  index_t i = 0;
  if constexpr (stream)
    for (; i < n && !eigen_packet_aligned(out + i); ++i) one(i);
  for (; i + 2 * L <= n; i += 2 * L) {
    const packet r0 = at(i), r1 = at(i + L);
    eigen_store<stream>(out + i, r0);
    eigen_store<stream>(out + i + L, r1);
  }
  for (; i + L <= n; i += L) eigen_store<stream>(out + i, at(i));
  for (; i < n; ++i) one(i);
}

/// eigen_affine_segment over `planes` contiguous planes of n >= eigen_lanes<T> values each
/// (plane c at out + c * n, u + c * n, v + c * n), plane c with coefficients a[c], m[c], k[c],
/// b[c], as one streamed run: the packets that straddle two planes take each lane from its own
/// plane's result. Planes too short to stream alone (a 7x7 plane is 196 bytes) then write whole
/// cache lines without reading them first.
template <class T>
void eigen_affine_planes_streamed(T* out, const T* u, const T* v, index_t planes, index_t n,
                                  const T* a, const T* m, const T* k, const T* b) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  const index_t total = planes * n;
  const packet lane = plset<packet>(T(0));
  packet pa, pm, pk, pb;
  const auto load = [&](index_t plane) {
    pa = pset1<packet>(a[plane]);
    pm = pset1<packet>(m[plane]);
    pk = pset1<packet>(k[plane]);
    pb = pset1<packet>(v ? b[plane] : T(0));
  };
  const auto at = [&](index_t i) {
    const packet r = pmadd(psub(ploadu<packet>(u + i), pm), pa, pk);
    return v ? padd(r, pmul(ploadu<packet>(v + i), pb)) : r;
  };
  const auto one = [&](index_t i) {
    const index_t p = i / n;
    out[i] = v ? (u[i] - m[p]) * a[p] + k[p] + v[i] * b[p] : (u[i] - m[p]) * a[p] + k[p];
  };
  index_t i = 0;
  for (; i < total && !eigen_packet_aligned(out + i); ++i) one(i);
  if (i >= total) return;
  index_t c = i / n, plane_end = (c + 1) * n;  // the plane of element i, and where it ends
  load(c);
  for (; i + L <= total; i += L) {
    if (i + L <= plane_end) {
      eigen_stream_store(out + i, at(i));
      if (i + L == plane_end && c + 1 < planes) {
        plane_end += n;
        load(++c);
      }
      continue;
    }
    // Lanes below plane_end - i are plane c's, the others plane c + 1's (n >= L: no third).
    const packet first = at(i);
    const packet inside = pcmp_lt(lane, pset1<packet>(T(plane_end - i)));
    plane_end += n;
    load(++c);
    eigen_stream_store(out + i, pselect(inside, first, at(i)));
  }
  for (; i < total; ++i) one(i);
}

/// Whether `out` sits 1 to eigen_store_lead_bytes past `in` in its page: walked forward, the
/// loads of in's next lines would wait on the stores just issued to out, whose low 12 bits
/// match theirs; walked from the end, as memmove walks such copies, they do not.
template <class T>
inline bool eigen_store_leads(const T* out, const T* in) {
  const std::size_t d =
      (reinterpret_cast<std::uintptr_t>(out) - reinterpret_cast<std::uintptr_t>(in)) %
      eigen_l1_set_period;
  return d != 0 && d <= eigen_store_lead_bytes;
}

/// eigen_affine_rows over rows whose coefficients outgrow L1: R rows side by side, each packet's
/// coefficients loaded once for all of them.
template <index_t R, bool stream, class T>
void eigen_affine_row_groups(T* out, index_t out_row, const T* u, index_t u_row, const T* v,
                             index_t v_row, index_t rows, index_t C, const T* a, const T* m,
                             const T* k, const T* b) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  // Rows walked from their ends where out sits just past u or v in its page.
  const bool backward = eigen_store_leads(out, u) || (v && eigen_store_leads(out, v));
  for (index_t r0 = 0; r0 < rows; r0 += R) {
    const index_t n = std::min(R, rows - r0);
    const T* ur = u + r0 * u_row;
    const T* vr = v ? v + r0 * v_row : nullptr;
    T* o = out + r0 * out_row;
    // `count` packets of each row from channel j, then of the next row, each packet's
    // coefficients loaded once for all of them.
    const auto packets = [&](auto count, index_t j) {
      constexpr index_t w = decltype(count)::value;
      packet pa[w], pm[w], pk[w], pb[w];
      for (index_t q = 0; q < w; ++q) {
        pa[q] = ploadu<packet>(a + j + q * L);
        pm[q] = ploadu<packet>(m + j + q * L);
        pk[q] = ploadu<packet>(k + j + q * L);
        pb[q] = vr ? ploadu<packet>(b + j + q * L) : pk[q];
      }
      for (index_t r = 0; r < n; ++r)
        for (index_t q = 0; q < w; ++q) {
          const index_t i = j + q * L;
          packet res = pmadd(psub(ploadu<packet>(ur + r * u_row + i), pm[q]), pa[q], pk[q]);
          if (vr) res = padd(res, pmul(ploadu<packet>(vr + r * v_row + i), pb[q]));
          eigen_store<stream>(o + r * out_row + i, res);
        }
    };
    const auto scalars = [&](index_t j) {
      for (index_t r = 0; r < n; ++r) {
        const T t = (ur[r * u_row + j] - m[j]) * a[j] + k[j];
        o[r * out_row + j] = vr ? t + vr[r * v_row + j] * b[j] : t;
      }
    };
    // A whole cache line of a row before the next row: streaming stores of half a line
    // (AVX2's 32-byte packets) that moved on to the next row left the eight rows'
    // write-combining buffers half full, and affine on NC 1024x4096 took twice copy's time.
    // So single packets up to a line boundary, whole lines, then packets and values.
    constexpr index_t line = std::max<index_t>(1, index_t(64 / (L * sizeof(T)))) * L;
    index_t lines_begin = 0;
    while (lines_begin + L <= C && reinterpret_cast<std::uintptr_t>(o + lines_begin) % 64 != 0)
      lines_begin += L;
    const index_t lines_end = lines_begin + (C - lines_begin) / line * line;
    const index_t packets_end = lines_end + (C - lines_end) / L * L;
    const std::integral_constant<index_t, 1> one;
    const std::integral_constant<index_t, line / L> whole_line;
    if (!backward) {
      for (index_t j = 0; j < lines_begin; j += L) packets(one, j);
      for (index_t j = lines_begin; j < lines_end; j += line) packets(whole_line, j);
      for (index_t j = lines_end; j < packets_end; j += L) packets(one, j);
      for (index_t j = packets_end; j < C; ++j) scalars(j);
    } else {
      for (index_t j = C; j-- > packets_end;) scalars(j);
      for (index_t j = packets_end; j > lines_end;) packets(one, j -= L);
      for (index_t j = lines_end; j > lines_begin;) packets(whole_line, j -= line);
      for (index_t j = lines_begin; j > 0;) packets(one, j -= L);
    }
  }
}

/// The same over `rows` rows of C contiguous channels (row r of out at out + r * out_row, ...),
/// with per-channel coefficients; a tile of channels keeps its coefficients in registers over
/// every row. b is null without v.
template <bool stream, class T>
void eigen_affine_rows(T* out, index_t out_row, const T* u, index_t u_row, const T* v,
                       index_t v_row, index_t rows, index_t C, const T* a, const T* m,
                       const T* k, const T* b) {
  using namespace Eigen::internal;
  using packet = eigen_packet<T>;
  constexpr index_t L = eigen_lanes<T>;
  // Rows whose coefficients outgrow L1 (and whose packets all align alike, or that do not
  // stream): eigen_row_group rows side by side, each packet's coefficients loaded once for all
  // of them. Rows whose coefficients fit stream faster one after another (measured).
  const std::size_t coefficient_bytes = std::size_t(C) * sizeof(T) * (v ? 4 : 3);
  if (coefficient_bytes > eigen_l1_coefficient_bytes &&
      (!stream || (eigen_packet_aligned(out) && out_row % L == 0))) {
    // Rows a multiple of eigen_l1_set_period apart all fall in one set of L1: eight of them
    // there, beside the streaming stores, took 1.5x the time of four (page-aligned NC
    // 1024x4096, one thread); rows that spread over the sets are faster eight at a time.
    const bool crowd =
        eigen_rows_share_l1_set<T>(u_row) || (v && eigen_rows_share_l1_set<T>(v_row));
    if (crowd)
      return eigen_affine_row_groups<eigen_row_group / 2, stream>(out, out_row, u, u_row, v, v_row,
                                                                  rows, C, a, m, k, b);
    return eigen_affine_row_groups<eigen_row_group, stream>(out, out_row, u, u_row, v, v_row,
                                                            rows, C, a, m, k, b);
  }
  if (C > eigen_register_tile * L) {
    // Wide rows, unevenly aligned: row after row, the coefficients read from L1.
    for (index_t r = 0; r < rows; ++r) {
      const T* ur = u + r * u_row;
      const T* vr = v ? v + r * v_row : nullptr;
      T* o = out + r * out_row;
      const auto one = [&](index_t j) {
        const T t = (ur[j] - m[j]) * a[j] + k[j];
        o[j] = vr ? t + vr[j] * b[j] : t;
      };
      index_t j = 0;
      if constexpr (stream)
        for (; j < C && !eigen_packet_aligned(o + j); ++j) one(j);
      for (; j + L <= C; j += L) {
        packet res = pmadd(psub(ploadu<packet>(ur + j), ploadu<packet>(m + j)),
                           ploadu<packet>(a + j), ploadu<packet>(k + j));
        if (vr) res = padd(res, pmul(ploadu<packet>(vr + j), ploadu<packet>(b + j)));
        eigen_store<stream>(o + j, res);
      }
      for (; j < C; ++j) one(j);
    }
    return;
  }
  // Short rows keep their coefficients in registers; they stream only when every packet of
  // every row is aligned.
  if constexpr (stream) {
    if (!eigen_packet_aligned(out) || (out_row * index_t(sizeof(T))) % (L * index_t(sizeof(T))))
      return eigen_affine_rows<false>(out, out_row, u, u_row, v, v_row, rows, C, a, m, k, b);
  }
  index_t c = 0;
  const auto tile = [&](auto lanes) {
    constexpr index_t n = decltype(lanes)::value;  // packets per tile
    packet pa[n], pm[n], pk[n], pb[n];
    for (index_t j = 0; j < n; ++j) {
      pa[j] = ploadu<packet>(a + c + j * L);
      pm[j] = ploadu<packet>(m + c + j * L);
      pk[j] = ploadu<packet>(k + c + j * L);
      pb[j] = b ? ploadu<packet>(b + c + j * L) : pset1<packet>(T(0));
    }
    for (index_t r = 0; r < rows; ++r) {
      const T* ur = u + r * u_row + c;
      const T* vr = v ? v + r * v_row + c : nullptr;
      T* o = out + r * out_row + c;
      packet res[n];
      for (index_t j = 0; j < n; ++j) {
        res[j] = pmadd(psub(ploadu<packet>(ur + j * L), pm[j]), pa[j], pk[j]);
        if (vr) res[j] = padd(res[j], pmul(ploadu<packet>(vr + j * L), pb[j]));
      }
      for (index_t j = 0; j < n; ++j) eigen_store<stream>(o + j * L, res[j]);
    }
    c += n * L;
  };
  // Four packets of coefficients (16 registers) fit beside the row's only with 32 vector
  // registers (AVX-512): then rows of up to 4 packets (64 channels of float) are one pass.
  if constexpr (L * sizeof(T) >= 64)
    while (c + eigen_register_tile * L <= C)
      tile(std::integral_constant<index_t, eigen_register_tile>());
  while (c + 2 * L <= C) tile(std::integral_constant<index_t, 2>());
  while (c + L <= C) tile(std::integral_constant<index_t, 1>());
  for (; c < C; ++c)
    for (index_t r = 0; r < rows; ++r) {
      const T t = (u[r * u_row + c] - m[c]) * a[c] + k[c];
      out[r * out_row + c] = v ? t + v[r * v_row + c] * b[c] : t;
    }
}

template <eigen_path Path, class T, class P>
void eigen_affine(tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                  span<const P> centre, tensor_view<const T> v, span<const P> b, span<const P> k,
                  index_t group_size, bool has_v, int team) {
  // Computed in the wider of the two types, in the reference's order
  // ((a (u - centre) + k) + b v); u - centre first, so it is exact for nearby values.
  using W = std::common_type_t<T, P>;
  constexpr int tile = eigen_affine_tile;
  using coefficients = Eigen::Array<W, 1, Eigen::Dynamic, Eigen::RowMajor, 1, tile>;
  constexpr bool apart = Path == eigen_path::planes;
  const index_t C = out.channels(), G = out.batch() / group_size;
  // On planes a run is a segment of each of the C planes: keep the segments long. A group's
  // pixels are cut into blocks of equal length (at most `block`), and on planes, when the
  // blocks cannot be shared evenly by the team, each block into slices of channels too
  // (NCHW 8x256x14x14 is a single block: the second thread had nothing to do).
  const index_t pixels = group_size * out.spatial(),
                block = apart ? eigen_block_values : eigen_elementwise_block(C);
  // Planes no longer than a block: blocks of whole planes, so that no run is cut short where a
  // block would end inside a plane (a short run is not streamed; NCHW 32x64x56x56's blocks of
  // 4096 pixels cut one plane of 3136 in two every 4096).
  const index_t whole_planes =
      apart && out.spatial() <= block ? eigen_planes_per_block(out.spatial()) : 0;
  const index_t per_group = whole_planes > 0 ? (group_size + whole_planes - 1) / whole_planes
                                             : (pixels + block - 1) / block;
  // The first pixel of block j of a group (of block per_group: the group's end).
  const auto block_start = [&](index_t j) {
    return whole_planes > 0 ? out.spatial() * (group_size * j / per_group)
                            : pixels * j / per_group;
  };
  const index_t slices = apart && (G * per_group) % team != 0 ? std::min<index_t>(team, C) : 1;
  const index_t units = G * per_group * slices;
  const eigen_pixels<T> po(out, apart);
  const eigen_pixels<const T> pu(u, apart), pv(has_v ? v : u, apart);
  const bool stream =
      std::size_t(out.shape().elements()) * sizeof(T) >= eigen_stream_min_bytes;
  eigen_parallel(team, [&](int part) {
    coefficients at, bt, kt, mt;
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t slice = unit % slices, pixel_block = unit / slices;
      const index_t g = pixel_block / per_group, j = pixel_block % per_group;
      const index_t c_begin = C * slice / slices, c_end = C * (slice + 1) / slices;
      const P* ag = a.data() + g * C;
      const P* mg = centre.data() + g * C;
      const P* kg = k.data() + g * C;
      const P* bg = has_v ? b.data() + g * C : nullptr;
      eigen_for_each_run(
          g * pixels + block_start(j), g * pixels + block_start(j + 1), block,
          [&](index_t p, index_t length) {
            if constexpr (std::is_same_v<T, P> && Path != eigen_path::strided) {
              // Packets of T, coefficients as they are: no conversions.
              T* o = po.at(p);
              const T* uu = pu.at(p);
              const T* vv = has_v ? pv.at(p) : nullptr;
              const auto pass = [&](auto streaming) {
                constexpr bool s = decltype(streaming)::value;
                if constexpr (Path == eigen_path::planes) {
                  for (index_t c = c_begin; c < c_end; ++c)
                    eigen_affine_segment<s>(o + c * po.channel_stride, uu + c * pu.channel_stride,
                                            has_v ? vv + c * pv.channel_stride : nullptr, length,
                                            ag[c], mg[c], kg[c], has_v ? bg[c] : T(0));
                } else {
                  eigen_affine_rows<s>(o, po.pixel_stride, uu, pu.pixel_stride, vv,
                                       pv.pixel_stride, length, C, ag, mg, kg, bg);
                }
              };
              if constexpr (Path == eigen_path::planes) {
                // Whole short planes, one after another in memory (NCHW): a streamed run over
                // the slice's planes of the sample. Written plane by plane, 7x7 planes were not
                // streamed, and every output line was read before it was written: affine and
                // inference NCHW 256x512x7x7 0.60-0.66x the time this way (one thread).
                if (stream && length < eigen_stream_min_run && length == out.spatial() &&
                    length >= eigen_lanes<T> && po.channel_stride == length &&
                    pu.channel_stride == length && (!has_v || pv.channel_stride == length)) {
                  const index_t first = c_begin * length;
                  eigen_affine_planes_streamed(o + first, uu + first,
                                               has_v ? vv + first : nullptr, c_end - c_begin,
                                               length, ag + c_begin, mg + c_begin, kg + c_begin,
                                               has_v ? bg + c_begin : nullptr);
                  return;
                }
              }
              // Streaming stores pay off on whole cache lines: long plane segments only.
              if (stream && (Path != eigen_path::planes || length >= eigen_stream_min_run))
                pass(std::true_type());
              else
                pass(std::false_type());
            } else if constexpr (Path == eigen_path::planes) {
              T* o = po.at(p);
              const T* uu = pu.at(p);
              const T* vv = pv.at(p);
              for (index_t c = c_begin; c < c_end; ++c) {
                eigen_values<T> oc(o + c * po.channel_stride, length);
                const auto uc =
                    eigen_values<const T>(uu + c * pu.channel_stride, length).template cast<W>() -
                    W(mg[c]);
                if (has_v) {
                  const auto vc = eigen_values<const T>(vv + c * pv.channel_stride, length)
                                      .template cast<W>();
                  oc = ((uc * W(ag[c]) + W(kg[c])) + vc * W(bg[c])).template cast<T>();
                } else {
                  oc = (uc * W(ag[c]) + W(kg[c])).template cast<T>();
                }
              }
            } else {
              auto o = eigen_rows<Path>(po, p, length);
              const auto uu = eigen_rows<Path>(pu, p, length);
              const auto vv = eigen_rows<Path>(pv, p, length);
              for (index_t c0 = 0; c0 < C; c0 += tile) {
                const index_t width = std::min<index_t>(tile, C - c0);
                at = eigen_const_channel_row<P>(ag + c0, width).template cast<W>();
                kt = eigen_const_channel_row<P>(kg + c0, width).template cast<W>();
                mt = eigen_const_channel_row<P>(mg + c0, width).template cast<W>();
                const auto ar = eigen_repeated_row(at.data(), length, width).array();
                const auto kr = eigen_repeated_row(kt.data(), length, width).array();
                const auto mr = eigen_repeated_row(mt.data(), length, width).array();
                const auto uc = uu.middleCols(c0, width).array().template cast<W>() - mr;
                if (has_v) {
                  bt = eigen_const_channel_row<P>(bg + c0, width).template cast<W>();
                  const auto br = eigen_repeated_row(bt.data(), length, width).array();
                  const auto vc = vv.middleCols(c0, width).array().template cast<W>();
                  o.middleCols(c0, width).array() = ((uc * ar + kr) + vc * br).template cast<T>();
                } else {
                  o.middleCols(c0, width).array() = (uc * ar + kr).template cast<T>();
                }
              }
            }
          },
          po, pu, pv);
    }
    if (stream) eigen_stream_fence();
  });
}

template <eigen_path Path, class T, class P>
void eigen_mix(tensor_view<T> out, tensor_view<const T> u, span<const P> a,
               tensor_view<const T> v, span<const P> matrix, span<const P> centre,
               span<const P> k, index_t group_size, int team) {
  // Tiles of v and M^T are copied in the wider type W onto the stack, so every product is a
  // same-type lazy product of plain operands: no temporaries, and none of the threads that
  // Eigen's general product would start.
  using W = std::common_type_t<T, P>;
  constexpr int tile = eigen_mix_tile;
  using tile_matrix =
      Eigen::Matrix<W, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor, tile, tile>;
  using coefficients = Eigen::Array<W, 1, Eigen::Dynamic, Eigen::RowMajor, 1, tile>;
  const index_t C = out.channels(), G = out.batch() / group_size;
  const index_t pixels = group_size * out.spatial(), block = 8 * tile;
  const index_t per_group = (pixels + block - 1) / block, units = G * per_group;
  constexpr bool apart = Path == eigen_path::planes;
  const eigen_pixels<T> po(out, apart);
  const eigen_pixels<const T> pu(u, apart), pv(v, apart);
  eigen_parallel(team, [&](int part) {
    tile_matrix vt, mt, sum;
    coefficients at, kt, ct;
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / per_group;
      const index_t begin = g * pixels + unit % per_group * block;
      const Eigen::Map<const eigen_row_major<P>> M(matrix.data() + g * C * C, C, C);
      eigen_for_each_run(
          begin, std::min(begin + block, (g + 1) * pixels), block,
          [&](index_t p, index_t length) {
            auto o = eigen_rows<Path>(po, p, length);
            const auto uu = eigen_rows<Path>(pu, p, length);
            const auto vv = eigen_rows<Path>(pv, p, length);
            for (index_t s0 = 0; s0 < length; s0 += tile) {
              const index_t rows = std::min<index_t>(tile, length - s0);
              for (index_t i0 = 0; i0 < C; i0 += tile) {
                const index_t cols = std::min<index_t>(tile, C - i0);
                sum.setZero(rows, cols);
                for (index_t j0 = 0; j0 < C; j0 += tile) {
                  const index_t inner = std::min<index_t>(tile, C - j0);
                  ct = eigen_const_channel_row<P>(centre.data() + g * C + j0, inner)
                           .template cast<W>();
                  // v - centre in W, before the product: exact for nearby values.
                  vt = vv.block(s0, j0, rows, inner).template cast<W>() -
                       eigen_repeated_row(ct.data(), rows, inner);
                  mt = M.block(i0, j0, cols, inner).transpose().template cast<W>();
                  sum.noalias() += vt.lazyProduct(mt);
                }
                at = eigen_const_channel_row<P>(a.data() + g * C + i0, cols).template cast<W>();
                kt = eigen_const_channel_row<P>(k.data() + g * C + i0, cols).template cast<W>();
                // Reads u only at the positions it writes: `out` may be `u`.
                o.block(s0, i0, rows, cols).array() =
                    ((uu.block(s0, i0, rows, cols).array().template cast<W>() *
                          eigen_repeated_row(at.data(), rows, cols).array() +
                      eigen_repeated_row(kt.data(), rows, cols).array()) +
                     sum.array())
                        .template cast<T>();
              }
            }
          },
          po, pu, pv);
    }
  });
}

}  // namespace detail

template <>
struct kernels<eigen_backend> {
  using B = eigen_backend;

  /// Per part of the team: the channels-last statistics of moments and sums (O(C)), and in
  /// full mode the C x C Gram accumulator and block of centred rows of covariance.
  static std::size_t scratch_bytes(const B& backend, const tensor_shape& x, index_t group_size,
                                   covariance mode) {
    if (x.elements() == 0) return 0;
    const index_t C = x.channels;
    std::size_t slot = std::max(detail::eigen_slot_bytes<detail::eigen_moments_slot<double>>(C),
                                detail::eigen_slot_bytes<detail::eigen_sums_slot<double>>(C));
    if (mode == covariance::full)
      slot = std::max(slot, detail::eigen_slot_bytes<detail::eigen_covariance_slot>(C));
    return static_cast<std::size_t>(detail::eigen_team(backend, x, group_size)) * slot;
  }

  /// Chunks of groups of about eigen_chunk_bytes per thread, when groups have few pixels
  /// (eigen_chunk_pixels) and are well under that: forward and backward then read each chunk's
  /// tensors again from L2 and keep its per-group arrays in cache. Larger groups gain nothing
  /// from it and would lose the streaming stores of whole large outputs: 0, all at once.
  static index_t group_chunk(const B& backend, const tensor_shape& x, index_t group_size,
                             std::size_t element_bytes) {
    const index_t pixels = group_size * x.height * x.width;
    const index_t per_group = pixels * x.channels;
    if (per_group <= 0 || element_bytes == 0 || pixels > detail::eigen_chunk_pixels) return 0;
    const index_t per_thread = index_t(detail::eigen_chunk_bytes / element_bytes);
    const index_t budget =
        backend.threads > 1 ? std::max(per_thread * backend.threads, backend.parallel_min_elements)
                            : per_thread;
    if (2 * per_group > budget) return 0;
    // Rounded up: a chunk for several threads must reach parallel_min_elements, or its passes
    // would all run on the calling thread; and to whole groups per thread, or the reductions,
    // which give each thread whole groups, would keep one thread waiting (3 groups on 2
    // threads: 2 and 1).
    const index_t threads = std::max(backend.threads, 1);
    const index_t chunk = (budget + per_group - 1) / per_group;
    return (chunk + threads - 1) / threads * threads;
  }

  template <class T, class P>
  static void moments(const B& backend, tensor_view<const T> x, index_t group_size,
                      span<P> mean, span<P> var, span<std::byte> scratch) {
    using detail::eigen_path;
    if (group_size <= 0 || x.channels() == 0 || x.batch() < group_size) return;
    if (x.empty()) {
      std::fill(mean.begin(), mean.end(), P(0));
      std::fill(var.begin(), var.end(), P(0));
      return;
    }
    const int team = detail::eigen_team(backend, x.shape(), group_size);
    switch (detail::eigen_choose_path(x.spatial(), x)) {
      case eigen_path::planes:
        if (x.spatial() <= detail::eigen_short_planes)
          return detail::eigen_moments_samples(x, group_size, mean, var, scratch, team);
        return detail::eigen_moments_planes(x, group_size, mean, var, team);
      case eigen_path::rows:
        return detail::eigen_moments_rows<eigen_path::rows>(x, group_size, mean, var, scratch,
                                                            team);
      case eigen_path::strided:
        return detail::eigen_moments_rows<eigen_path::strided>(x, group_size, mean, var,
                                                               scratch, team);
    }
  }

  template <class T, class P>
  static void covariance(const B& backend, tensor_view<const T> x, index_t group_size,
                         span<const P> mean, span<P> cov, span<std::byte> scratch) {
    using detail::eigen_path;
    if (group_size <= 0 || x.channels() == 0 || x.batch() < group_size) return;
    if (x.empty()) {
      std::fill(cov.begin(), cov.end(), P(0));
      return;
    }
    const int team = detail::eigen_team(backend, x.shape(), group_size);
    switch (detail::eigen_choose_path(x.spatial(), x)) {
      case eigen_path::planes:
        return detail::eigen_covariance<eigen_path::planes>(x, group_size, mean, cov, scratch,
                                                            team);
      case eigen_path::rows:
        return detail::eigen_covariance<eigen_path::rows>(x, group_size, mean, cov, scratch,
                                                          team);
      case eigen_path::strided:
        return detail::eigen_covariance<eigen_path::strided>(x, group_size, mean, cov, scratch,
                                                             team);
    }
  }

  template <class T, class P>
  static void sums(const B& backend, tensor_view<const T> dy, tensor_view<const T> x,
                   span<const P> centre, index_t group_size, span<P> sum_dy,
                   span<P> sum_dy_centred, span<std::byte> scratch) {
    using detail::eigen_path;
    if (group_size <= 0 || x.channels() == 0 || x.batch() < group_size) return;
    if (x.empty()) {
      std::fill(sum_dy.begin(), sum_dy.end(), P(0));
      std::fill(sum_dy_centred.begin(), sum_dy_centred.end(), P(0));
      return;
    }
    const int team = detail::eigen_team(backend, x.shape(), group_size);
    switch (detail::eigen_choose_path(x.spatial(), dy, x)) {
      case eigen_path::planes:
        if (x.spatial() <= detail::eigen_short_planes)
          return detail::eigen_sums_samples(dy, x, centre, group_size, sum_dy, sum_dy_centred,
                                            scratch, team);
        return detail::eigen_sums_planes(dy, x, centre, group_size, sum_dy, sum_dy_centred,
                                         team);
      case eigen_path::rows:
        return detail::eigen_sums_rows<eigen_path::rows>(dy, x, centre, group_size, sum_dy,
                                                         sum_dy_centred, scratch, team);
      case eigen_path::strided:
        return detail::eigen_sums_rows<eigen_path::strided>(dy, x, centre, group_size, sum_dy,
                                                            sum_dy_centred, scratch, team);
    }
  }

  template <class T, class P>
  static void affine(const B& backend, tensor_view<T> out, tensor_view<const T> u,
                     span<const P> a, span<const P> centre, tensor_view<const T> v,
                     span<const P> b, span<const P> k, index_t group_size) {
    using detail::eigen_path;
    if (group_size <= 0 || out.empty()) return;
    const bool has_v = !b.empty() && !v.empty();
    const int team = detail::eigen_team(backend, out.shape(), group_size);
    const eigen_path path = has_v ? detail::eigen_choose_path(out.spatial(), out, u, v)
                                  : detail::eigen_choose_path(out.spatial(), out, u);
    switch (path) {
      case eigen_path::planes:
        return detail::eigen_affine<eigen_path::planes>(out, u, a, centre, v, b, k, group_size,
                                                        has_v, team);
      case eigen_path::rows:
        return detail::eigen_affine<eigen_path::rows>(out, u, a, centre, v, b, k, group_size,
                                                      has_v, team);
      case eigen_path::strided:
        return detail::eigen_affine<eigen_path::strided>(out, u, a, centre, v, b, k, group_size,
                                                         has_v, team);
    }
  }

  template <class T, class P>
  static void mix(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                  tensor_view<const T> v, span<const P> matrix, span<const P> centre,
                  span<const P> k, index_t group_size) {
    using detail::eigen_path;
    if (group_size <= 0 || out.empty()) return;
    const int team = detail::eigen_team(backend, out.shape(), group_size);
    switch (detail::eigen_choose_path(out.spatial(), out, u, v)) {
      case eigen_path::planes:
        return detail::eigen_mix<eigen_path::planes>(out, u, a, v, matrix, centre, k, group_size,
                                                     team);
      case eigen_path::rows:
        return detail::eigen_mix<eigen_path::rows>(out, u, a, v, matrix, centre, k, group_size,
                                                   team);
      case eigen_path::strided:
        return detail::eigen_mix<eigen_path::strided>(out, u, a, v, matrix, centre, k,
                                                      group_size, team);
    }
  }

  /// The per-channel math, on the calling thread: counts of G * C or G * C * C, too small to
  /// repay a fork; functors with large items (work_per_item()) on the backend's threads when
  /// their work reaches parallel_min_elements. A functor with a 2-D form (grid_width(),
  /// at(row, col); see steps.hpp) runs row by row, its inner loop free of divisions so the
  /// compiler can vectorize it; a group-sum functor runs group by group over blocks of channels
  /// (the same sums in the same order).
  template <class F>
  static void for_each(const B& backend, index_t count, F f) {
    if constexpr (detail::eigen_has_item_work<F>::value) {
      // Large items (the dense transition's tiles): contiguous ranges of them per thread.
      const int team = detail::eigen_team(backend, count * f.work_per_item());
      detail::eigen_parallel(team, [&](int part) {
        const index_t last = detail::eigen_first_unit(count, part + 1, team);
        for (index_t i = detail::eigen_first_unit(count, part, team); i < last; ++i) f(i);
      });
      return;
    }
    if constexpr (detail::eigen_has_group_sums<F>::value) {
      // Group after group over a block of channels: each row is read contiguously.
      constexpr index_t block = detail::eigen_group_sums_values / F::sums;
      double acc[F::sums * block];
      const index_t groups = f.group_count();
      if (groups == 1) {  // one row: channel by channel, as a vector (measured faster)
        BKN_EIGEN_SIMD_LOOP
        for (index_t c = 0; c < count; ++c) f(c);
        return;
      }
      for (index_t c0 = 0; c0 < count; c0 += block) {
        const index_t n = std::min(block, count - c0);
        if constexpr (detail::has_group_start<F>::value) {
          BKN_EIGEN_SIMD_LOOP
          for (index_t j = 0; j < n; ++j) f.start(c0 + j, acc + j, block);
        } else {
          for (int s = 0; s < F::sums; ++s) std::fill(acc + s * block, acc + s * block + n, 0.0);
        }
        for (index_t g = 0; g < groups; ++g) {
          BKN_EIGEN_SIMD_LOOP
          for (index_t j = 0; j < n; ++j) f.add(g, c0 + j, acc + j, block);
        }
        BKN_EIGEN_SIMD_LOOP
        for (index_t j = 0; j < n; ++j) {
          // The channel's sums as a local array: GCC vectorizes this loop, not one that hands
          // finish() strided pointers into acc.
          double sums[F::sums];
          for (int s = 0; s < F::sums; ++s) sums[s] = acc[s * block + j];
          f.finish(c0 + j, sums, 1);
        }
      }
      return;
    }
    index_t i = 0;
    if constexpr (detail::eigen_has_grid<F>::value) {
      const index_t width = f.grid_width();
      if (width > 0) {
        for (; i + width <= count; i += width) {
          const index_t row = i / width;
          BKN_EIGEN_SIMD_LOOP
          for (index_t col = 0; col < width; ++col) f.at(row, col);
        }
      }
    }
    for (; i < count; ++i) f(i);
  }
};

BKN_END_NAMESPACE

#if defined(BKN_EIGEN_GCC_AVX512_PRAGMAS)
#pragma GCC diagnostic pop
#undef BKN_EIGEN_GCC_AVX512_PRAGMAS
#endif

#undef BKN_EIGEN_SIMD_LOOP
#undef BKN_EIGEN_INLINE_LAMBDA
