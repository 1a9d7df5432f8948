// SPDX-License-Identifier: MIT
// eigen_backend: the CPU backend, Eigen array expressions over maps of the caller's tensors,
// threaded with OpenMP (when compiled with it) under a thread count set per backend value.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

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
struct eigen_backend {
  int threads = 1;
};

namespace detail {

// Tensors with fewer elements run on the calling thread: an OpenMP fork/join costs a few
// microseconds, as long as a pass over 256 KiB takes.
inline constexpr index_t eigen_parallel_min_elements = index_t(1) << 16;
// Statistics are summed in the element type over blocks of at most this many values per
// channel, then merged in double. Float rounding then grows with sqrt(block), not with the
// tensor, and a block stays in L1 between its two passes.
inline constexpr index_t eigen_block_values = 4096;
// Values of one Gram product in `covariance`. Eigen packs each operand into a buffer of at most
// this many doubles; under EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) it lives on the stack.
inline constexpr index_t eigen_gram_values = 8192;
// Pixel and channel tile of `mix`: three tiles of doubles are 24 KiB of stack.
inline constexpr int eigen_mix_tile = 32;
// Channel tile of the coefficient rows of `affine` on channels-last tensors.
inline constexpr int eigen_affine_tile = 64;

inline int eigen_team(const eigen_backend& backend, index_t elements) noexcept {
  return backend.threads > 1 && elements >= eigen_parallel_min_elements ? backend.threads : 1;
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

/// First of the units [0, units) that `part` of `team` owns: contiguous static ranges.
inline index_t eigen_first_unit(index_t units, int part, int team) noexcept {
  return units * part / team;
}

/// Chunks each group's pixels are cut into for a reduction: one when the groups alone keep the
/// team busy; otherwise enough that groups * chunks <= team, so every chunk has a slot.
inline index_t eigen_chunks(index_t groups, int team) noexcept {
  return groups >= team ? 1 : team / groups;
}

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

/// Channels-last `moments`: a unit's running statistics and the current block's partials.
template <class T>
struct eigen_moments_slot {
  welford<double>* state;  // per channel, the unit's statistics so far
  double* mean;            // per channel, the block's mean
  T* sum;                  // per channel, the block's sum about its first row
  T* centre;               // the block's mean rounded to T
  T* m2;                   // the block's sum of squares about `centre`

  static eigen_moments_slot carve(eigen_carver& c, index_t channels) {
    eigen_moments_slot s;
    s.state = c.take<welford<double>>(channels);
    s.mean = c.take<double>(channels);
    s.sum = c.take<T>(channels);
    s.centre = c.take<T>(channels);
    s.m2 = c.take<T>(channels);
    return s;
  }
};

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
};

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

/// Statistics of one block of values of one channel. The sum is taken about the first value,
/// so float partial sums stay near the spread of the data rather than its offset; the squares
/// are centred on the block mean rounded to T, and the rounding is corrected exactly
/// (sum (x - c)^2 = sum (x - mean)^2 + n (c - mean)^2).
template <class Values>
welford<double> eigen_block_statistics(const Eigen::ArrayBase<Values>& x) {
  using T = typename Values::Scalar;
  const index_t n = x.size();
  const T first = x.coeff(0);
  const double mean = double(first) + double((x - first).sum()) / double(n);
  const T centre = T(mean);
  const double gap = double(centre) - mean;
  const double m2 = double((x - centre).square().sum()) - double(n) * gap * gap;
  return welford<double>{double(n), mean, m2 > 0 ? m2 : 0.0};
}

/// Folds one block of rows (length x C) into per-channel statistics, as eigen_block_statistics
/// does for one channel, all channels at once.
template <class Rows, class First, class T>
void eigen_accumulate_rows(const Rows& rows, const First& first, const eigen_moments_slot<T>& s,
                           welford<double>* state) {
  const index_t n = rows.rows(), C = rows.cols();
  eigen_channel_row<T> sum(s.sum, C), centre(s.centre, C), m2(s.m2, C);
  sum = (rows - first).array().colwise().sum();
  for (index_t c = 0; c < C; ++c) {
    s.mean[c] = double(rows.coeff(0, c)) + double(sum[c]) / double(n);
    centre[c] = T(s.mean[c]);
  }
  m2 = (rows - eigen_repeated_row(s.centre, n, C)).array().square().colwise().sum();
  for (index_t c = 0; c < C; ++c) {
    const double gap = double(centre[c]) - s.mean[c];
    const double block_m2 = double(m2[c]) - double(n) * gap * gap;
    state[c].combine(welford<double>{double(n), s.mean[c], block_m2 > 0 ? block_m2 : 0.0});
  }
}

template <class T, class P>
void eigen_moments_planes(tensor_view<const T> x, index_t group_size, span<P> mean, span<P> var,
                          int team) {
  const index_t C = x.channels(), S = x.spatial(), units = x.batch() / group_size * C;
  eigen_parallel(team, [&](int part) {
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / C, c = unit % C;
      welford<double> w;
      for (index_t n = g * group_size; n < (g + 1) * group_size; ++n) {
        const T* plane = x.data() + x.offset(n, c, 0, 0);
        for (index_t s = 0; s < S; s += eigen_block_values)
          w.combine(eigen_block_statistics(
              eigen_values<const T>(plane + s, std::min(eigen_block_values, S - s))));
      }
      mean[unit] = P(w.mean);
      var[unit] = P(w.variance());
    }
  });
}

template <eigen_path Path, class T, class P>
void eigen_moments_rows(tensor_view<const T> x, index_t group_size, span<P> mean, span<P> var,
                        span<std::byte> scratch, int team) {
  using slot = eigen_moments_slot<T>;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const index_t pixels = group_size * x.spatial(), chunks = eigen_chunks(G, team);
  const index_t units = G * chunks;
  const index_t block = std::clamp<index_t>(eigen_block_values / C, 16, eigen_block_values);
  const eigen_pixels<const T> px(x, false);
  auto store = [&](index_t g, const welford<double>* state) {
    for (index_t c = 0; c < C; ++c) {
      mean[g * C + c] = P(state[c].mean);
      var[g * C + c] = P(state[c].variance());
    }
  };
  eigen_parallel(team, [&](int part) {
    const slot work = eigen_slot<slot>(scratch, part, C);
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / chunks, j = unit % chunks;
      // A split group keeps each chunk's statistics in the chunk's own slot until the merge.
      welford<double>* state = chunks > 1 ? eigen_slot<slot>(scratch, unit, C).state : work.state;
      std::fill(state, state + C, welford<double>{});
      eigen_for_each_run(
          g * pixels + pixels * j / chunks, g * pixels + pixels * (j + 1) / chunks, block,
          [&](index_t p, index_t length) {
            // The block's first row, repeated: its sum is taken about it.
            const auto first =
                eigen_rows_at<Path>(px.at(p), length, C, index_t(0), px.channel_stride);
            eigen_accumulate_rows(eigen_rows<Path>(px, p, length), first, work, state);
          },
          px);
      if (chunks == 1) store(g, state);
    }
  });
  if (chunks == 1) return;
  for (index_t g = 0; g < G; ++g) {
    welford<double>* first = eigen_slot<slot>(scratch, g * chunks, C).state;
    for (index_t j = 1; j < chunks; ++j) {
      const welford<double>* other = eigen_slot<slot>(scratch, g * chunks + j, C).state;
      for (index_t c = 0; c < C; ++c) first[c].combine(other[c]);
    }
    store(g, first);
  }
}

template <eigen_path Path, class T, class P>
void eigen_covariance(tensor_view<const T> x, index_t group_size, span<const P> mean,
                      span<P> cov, span<std::byte> scratch, int team) {
  using slot = eigen_covariance_slot;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const index_t pixels = group_size * x.spatial(), chunks = eigen_chunks(G, team);
  const index_t units = G * chunks, block = slot::rows_per_block(C);
  const eigen_pixels<const T> px(x, Path == eigen_path::planes);
  auto store = [&](index_t g, const double* gram) {
    const double count = double(pixels);
    for (index_t i = 0; i < C; ++i)
      for (index_t j = 0; j < C; ++j)
        cov[(g * C + i) * C + j] = P(gram[std::min(i, j) * C + std::max(i, j)] / count);
  };
  eigen_parallel(team, [&](int part) {
    const slot work = eigen_slot<slot>(scratch, part, C);
    Eigen::Map<Eigen::RowVectorXd> centre(work.mean, C);
    Eigen::Map<Eigen::MatrixXd> rows(work.rows, block, C);
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / chunks, j = unit % chunks;
      Eigen::Map<Eigen::MatrixXd> gram(
          chunks > 1 ? eigen_slot<slot>(scratch, unit, C).gram : work.gram, C, C);
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
      if (chunks == 1) store(g, gram.data());
    }
  });
  if (chunks == 1) return;
  for (index_t g = 0; g < G; ++g) {
    Eigen::Map<Eigen::MatrixXd> first(eigen_slot<slot>(scratch, g * chunks, C).gram, C, C);
    for (index_t j = 1; j < chunks; ++j)
      first += Eigen::Map<const Eigen::MatrixXd>(
          eigen_slot<slot>(scratch, g * chunks + j, C).gram, C, C);
    store(g, first.data());
  }
}

template <class T, class P>
void eigen_sums_planes(tensor_view<const T> dy, tensor_view<const T> x, span<const P> centre,
                       index_t group_size, span<P> sum_dy, span<P> sum_dy_centred, int team) {
  const index_t C = x.channels(), S = x.spatial(), units = x.batch() / group_size * C;
  eigen_parallel(team, [&](int part) {
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / C, c = unit % C;
      // dy (x - centre) = dy (x - rounded) + dy (rounded - centre): the first term in T, the
      // correction in double.
      const double exact = double(centre[unit]);
      const T rounded = T(exact);
      const double gap = double(rounded) - exact;
      double s_dy = 0, s_dy_centred = 0;
      for (index_t n = g * group_size; n < (g + 1) * group_size; ++n) {
        const T* dy_plane = dy.data() + dy.offset(n, c, 0, 0);
        const T* x_plane = x.data() + x.offset(n, c, 0, 0);
        for (index_t s = 0; s < S; s += eigen_block_values) {
          const index_t length = std::min(eigen_block_values, S - s);
          const eigen_values<const T> d(dy_plane + s, length), v(x_plane + s, length);
          const double block_dy = double(d.sum());
          s_dy += block_dy;
          s_dy_centred += double((d * (v - rounded)).sum()) + gap * block_dy;
        }
      }
      sum_dy[unit] = P(s_dy);
      sum_dy_centred[unit] = P(s_dy_centred);
    }
  });
}

template <eigen_path Path, class T, class P>
void eigen_sums_rows(tensor_view<const T> dy, tensor_view<const T> x, span<const P> centre,
                     index_t group_size, span<P> sum_dy, span<P> sum_dy_centred,
                     span<std::byte> scratch, int team) {
  using slot = eigen_sums_slot<T>;
  const index_t C = x.channels(), G = x.batch() / group_size;
  const index_t pixels = group_size * x.spatial(), chunks = eigen_chunks(G, team);
  const index_t units = G * chunks;
  const index_t block = std::clamp<index_t>(eigen_block_values / C, 16, eigen_block_values);
  const eigen_pixels<const T> pdy(dy, false), px(x, false);
  auto store = [&](index_t g, const slot& s) {
    for (index_t c = 0; c < C; ++c) {
      sum_dy[g * C + c] = P(s.sum_dy[c]);
      sum_dy_centred[g * C + c] = P(s.sum_dy_centred[c]);
    }
  };
  eigen_parallel(team, [&](int part) {
    const slot work = eigen_slot<slot>(scratch, part, C);
    eigen_channel_row<T> rounded(work.centre, C), block_dy(work.block_dy, C),
        block_dy_centred(work.block_dy_centred, C);
    eigen_channel_row<double> gap(work.gap, C);
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / chunks, j = unit % chunks;
      const slot out = chunks > 1 ? eigen_slot<slot>(scratch, unit, C) : work;
      eigen_channel_row<double> total_dy(out.sum_dy, C), total_dy_centred(out.sum_dy_centred, C);
      total_dy.setZero();
      total_dy_centred.setZero();
      for (index_t c = 0; c < C; ++c) {
        const double exact = double(centre[g * C + c]);
        rounded[c] = T(exact);
        gap[c] = double(rounded[c]) - exact;
      }
      eigen_for_each_run(
          g * pixels + pixels * j / chunks, g * pixels + pixels * (j + 1) / chunks, block,
          [&](index_t p, index_t length) {
            const auto d = eigen_rows<Path>(pdy, p, length).array();
            const auto v = eigen_rows<Path>(px, p, length);
            block_dy = d.colwise().sum();
            block_dy_centred =
                (d * (v - eigen_repeated_row(work.centre, length, C)).array()).colwise().sum();
            total_dy += block_dy.template cast<double>();
            total_dy_centred +=
                block_dy_centred.template cast<double>() + gap * block_dy.template cast<double>();
          },
          pdy, px);
      if (chunks == 1) store(g, out);
    }
  });
  if (chunks == 1) return;
  for (index_t g = 0; g < G; ++g) {
    const slot first = eigen_slot<slot>(scratch, g * chunks, C);
    for (index_t j = 1; j < chunks; ++j) {
      const slot other = eigen_slot<slot>(scratch, g * chunks + j, C);
      eigen_channel_row<double>(first.sum_dy, C) += eigen_channel_row<double>(other.sum_dy, C);
      eigen_channel_row<double>(first.sum_dy_centred, C) +=
          eigen_channel_row<double>(other.sum_dy_centred, C);
    }
    store(g, first);
  }
}

/// Pixels per unit of work of the elementwise passes; units never straddle groups, so a unit
/// has one set of coefficients.
inline index_t eigen_elementwise_block(index_t channels) noexcept {
  return std::clamp<index_t>(eigen_block_values / channels, 16, eigen_block_values);
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
  // On planes a run is a segment of each of the C planes: keep the segments long.
  const index_t pixels = group_size * out.spatial(),
                block = apart ? eigen_block_values : eigen_elementwise_block(C);
  const index_t per_group = (pixels + block - 1) / block, units = G * per_group;
  const eigen_pixels<T> po(out, apart);
  const eigen_pixels<const T> pu(u, apart), pv(has_v ? v : u, apart);
  eigen_parallel(team, [&](int part) {
    coefficients at, bt, kt, mt;
    const index_t last = eigen_first_unit(units, part + 1, team);
    for (index_t unit = eigen_first_unit(units, part, team); unit < last; ++unit) {
      const index_t g = unit / per_group;
      const index_t begin = g * pixels + unit % per_group * block;
      const P* ag = a.data() + g * C;
      const P* mg = centre.data() + g * C;
      const P* kg = k.data() + g * C;
      const P* bg = has_v ? b.data() + g * C : nullptr;
      eigen_for_each_run(
          begin, std::min(begin + block, (g + 1) * pixels), block,
          [&](index_t p, index_t length) {
            if constexpr (Path == eigen_path::planes) {
              T* o = po.at(p);
              const T* uu = pu.at(p);
              const T* vv = pv.at(p);
              for (index_t c = 0; c < C; ++c) {
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
  static std::size_t scratch_bytes(const B& backend, const tensor_shape& x, index_t,
                                   covariance mode) {
    if (x.elements() == 0) return 0;
    const index_t C = x.channels;
    std::size_t slot = std::max(detail::eigen_slot_bytes<detail::eigen_moments_slot<double>>(C),
                                detail::eigen_slot_bytes<detail::eigen_sums_slot<double>>(C));
    if (mode == covariance::full)
      slot = std::max(slot, detail::eigen_slot_bytes<detail::eigen_covariance_slot>(C));
    return static_cast<std::size_t>(detail::eigen_team(backend, x.elements())) * slot;
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
    const int team = detail::eigen_team(backend, x.shape().elements());
    switch (detail::eigen_choose_path(x.spatial(), x)) {
      case eigen_path::planes:
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
    const int team = detail::eigen_team(backend, x.shape().elements());
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
    const int team = detail::eigen_team(backend, x.shape().elements());
    switch (detail::eigen_choose_path(x.spatial(), dy, x)) {
      case eigen_path::planes:
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
    const int team = detail::eigen_team(backend, out.shape().elements());
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
    const int team = detail::eigen_team(backend, out.shape().elements());
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

  /// The per-channel math: counts of G * C or G * C * C, too small to repay a fork.
  template <class F>
  static void for_each(const B&, index_t count, F f) {
    for (index_t i = 0; i < count; ++i) f(i);
  }
};

BKN_END_NAMESPACE
