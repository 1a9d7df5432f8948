// SPDX-License-Identifier: MIT
// cuda_backend: bkn's tensor passes as CUDA kernels on a caller's stream, with reductions split
// and merged in an order fixed by the shape alone (no atomics), so results are deterministic.
#pragma once

#if !defined(__CUDACC__)
#error "bkn/backends/cuda.hpp must be compiled by nvcc (a .cu file, or LANGUAGE CUDA): it defines CUDA kernels. Plain C++ translation units include <bkn/bkn.hpp> only."
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "bkn/backend.hpp"
#include "bkn/math/welford.hpp"

// Template kernels are weak symbols: hidden visibility keeps two shared libraries that embed
// bkn (possibly different versions) from resolving each other's kernels. Defined here unless
// config.hpp (or the includer) already has it, and undefined at the end if defined here.
#ifndef BKN_KERNEL
#define BKN_CUDA_DEFINED_KERNEL_MACRO
#if defined(_WIN32)
#define BKN_KERNEL __global__
#else
#define BKN_KERNEL __global__ __attribute__((visibility("hidden")))
#endif
#endif

BKN_BEGIN_NAMESPACE

/// Runs bkn on a CUDA stream: `cuda_backend{stream}` (`cuda_backend{}` is the legacy default
/// stream), or `cuda_backend{stream, blas}` to compute full-covariance mode's Gram matrix with
/// cuBLAS. The stream and the handle are copied, never owned, created or destroyed by bkn.
///
/// Tensors, per-channel arrays and the workspace must be device memory (or managed memory) of
/// the current device. Every pass is kernel launches (and, with a handle, one cuBLAS call) on
/// `stream`, asynchronous with respect to the host and ordered with the other passes on the
/// same stream: synchronize the stream before reading results on the host. No pass allocates
/// or synchronizes.
///
/// Element types T: float, double, __half, __nv_bfloat16 (storage), accumulated in float
/// (double for double); per-channel type P: float or double. Each sum is split into chunks and
/// merged in an order fixed by the shape (and the layout) alone, never with atomics: results
/// are bitwise the same run to run and on any GPU of the same architecture (docs/cuda.md); a
/// covariance through cuBLAS is cuBLAS's, reproducible on GPUs with the same number of SMs.
///
/// Errors: a launch that fails (bad configuration, no device, a kernel image missing for this
/// GPU) is reported by cudaGetLastError right after the launch, which does not synchronize;
/// the pass then throws bkn::cuda_error (also for a failed cuBLAS call). Faults inside a kernel
/// surface asynchronously, at the caller's next synchronizing CUDA call.
struct cuda_backend {
  cudaStream_t stream = nullptr;
  /// Optional cuBLAS handle of the current device. Given, the `covariance` pass centres x into
  /// the workspace and forms each group's Gram matrix with one strided batched GEMM (float or
  /// double, cuBLAS's pedantic compute types: no TF32, no emulation, whatever the handle's math
  /// mode). Bind it to `stream` yourself (cublasSetStream): otherwise bkn binds it for the call
  /// and restores the previous stream, and cuBLAS resets a workspace set with cublasSetWorkspace
  /// when its stream changes. Null: bkn's own covariance kernels.
  cublasHandle_t blas = nullptr;
};

/// An error a pass of cuda_backend saw: a failed kernel launch (code()), or a failed cuBLAS call
/// in full-covariance mode with a handle (status(); code() is then cudaSuccess).
class cuda_error : public std::runtime_error {
 public:
  cuda_error(const char* pass, cudaError_t code)
      : std::runtime_error(message(pass, "CUDA", cudaGetErrorName(code), cudaGetErrorString(code))),
        code_(code) {}
  cuda_error(const char* pass, cublasStatus_t status)
      : std::runtime_error(message(pass, "cuBLAS", cublasGetStatusName(status),
                                   cublasGetStatusString(status))),
        status_(status) {}
  cudaError_t code() const noexcept { return code_; }
  cublasStatus_t status() const noexcept { return status_; }

 private:
  static std::string message(const char* pass, const char* library, const char* name,
                             const char* description) {
    return std::string("bkn: ") + library + " error in " + pass + ": " + name + ": " + description;
  }
  cudaError_t code_ = cudaSuccess;
  cublasStatus_t status_ = CUBLAS_STATUS_SUCCESS;
};

namespace detail {
namespace cuda_impl {

// ---- element types: storage T, accumulation A, elementwise arithmetic R ----

template <class T>
struct accumulation {
  using type = float;
};
template <>
struct accumulation<double> {
  using type = double;
};
/// float for float, __half and __nv_bfloat16 data; double for double.
template <class T>
using accum_t = typename accumulation<T>::type;

/// The wider of accum_t<T> and P: every pass forms u - centre in it (exact for nearby values),
/// then sums or scales the difference.
template <class T, class P>
using arith_t = std::conditional_t<std::is_same_v<accum_t<T>, double> || std::is_same_v<P, double>,
                                   double, float>;

// Everything below that is not a kernel or a shuffle is also host code, so that
// tests/backends/cuda/host_emulation.cu can run each thread's share of a pass on the CPU.

template <class A, class T>
BKN_HOST_DEVICE inline A load(const T& v) {
  if constexpr (std::is_same_v<T, __half>) return A(__half2float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return A(__bfloat162float(v));
  else return A(v);
}

/// r rounded to the storage type once (16-bit types from float).
template <class T, class R>
BKN_HOST_DEVICE inline T store(R r) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(r));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(r));
  else return T(r);
}

template <class T>
inline constexpr bool supported_element =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, __half> ||
    std::is_same_v<T, __nv_bfloat16>;
template <class P>
inline constexpr bool supported_parameter = std::is_same_v<P, float> || std::is_same_v<P, double>;

// ---- launch configuration: constants, never queried from the device, so that how every sum
// is split and merged (and so every bit of the result) depends on the shape alone ----

inline constexpr int block_threads = 256;
inline constexpr int warp = 32;
// Planes path: one block reduces `plane_chunk` consecutive values of one (group, channel).
inline constexpr index_t plane_chunk = 4096;
// Channels-last path: a block is 32 channels x 8 pixel lanes; it reduces `pixel_chunk` pixels
// of a group for its 32 channels, reading each pixel's channels in one coalesced access.
inline constexpr int tile_channels = 32;
inline constexpr int tile_rows = block_threads / tile_channels;
inline constexpr index_t pixel_chunk = 512;
// Covariance: one thread sums the centred products of one (i, j) over `covariance_chunk` values.
inline constexpr index_t covariance_chunk = 2048;
// Grid-stride kernels (elementwise, merges, for_each) use at most this many blocks.
inline constexpr index_t max_blocks = 65535;
// Where the centred copy starts after the Gram matrices in the cuBLAS covariance's scratch.
inline constexpr std::size_t blas_alignment = 256;

inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

inline void check_launch(const char* pass) {
  // cudaGetLastError returns (and clears) launch errors without waiting for the stream.
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw cuda_error(pass, e);
}

inline void check_blas(cublasStatus_t status, const char* pass) {
  if (status != CUBLAS_STATUS_SUCCESS) throw cuda_error(pass, status);
}

inline unsigned grid_for(index_t count) {
  const index_t blocks = ceil_div(count, block_threads);
  return unsigned(blocks < max_blocks ? blocks : max_blocks);
}

/// Calls f(i) for i in [0, count): the core's BKN_HOST_DEVICE per-channel functors, and this
/// header's elementwise passes and merges.
template <class F>
BKN_KERNEL void for_each_kernel(F f, index_t count) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += index_t(gridDim.x) * blockDim.x)
    f(i);
}

/// The values of one (group, channel) reduction: j in [0, m) with m = group_size * H * W, in the
/// reference backend's order: sample n = g * group_size + j / (H W), pixel s = j % (H W).
struct reduction_shape {
  index_t group_size, height, width, spatial, values;  // values = group_size * spatial
};
inline reduction_shape shape_of(const tensor_shape& x, index_t group_size) {
  return {group_size, x.height, x.width, x.height * x.width, group_size * x.height * x.width};
}

// ---- reducers: a state, adding one element, the combine, and writing a merged state. The
// combine is applied in a fixed tree (warp shuffles, then warps in order, then chunks in
// order) ----

template <class T, class P>
struct moments_reducer {
  using A = accum_t<T>;
  using state = welford<A>;
  tensor_view<const T> x;
  P *mean, *var;
  BKN_HOST_DEVICE void add(state& s, index_t n, index_t c, index_t h, index_t w, index_t) const {
    s.add(load<A>(x(n, c, h, w)));
  }
  __device__ static state shuffle_down(const state& s, int delta) {
    state o;
    o.count = __shfl_down_sync(0xffffffffu, s.count, delta);
    o.mean = __shfl_down_sync(0xffffffffu, s.mean, delta);
    o.m2 = __shfl_down_sync(0xffffffffu, s.m2, delta);
    return o;
  }
  BKN_HOST_DEVICE static void combine(state& a, const state& b) { a.combine(b); }
  BKN_HOST_DEVICE void finish(const state& s, index_t i) const {
    mean[i] = P(s.mean);
    var[i] = P(s.variance());
  }
};

template <class A>
struct sum_pair {
  A first = 0, second = 0;
};

template <class T, class P>
struct sums_reducer {
  using A = accum_t<T>;
  using state = sum_pair<A>;
  tensor_view<const T> dy, x;
  const P* centre;
  P *sum_dy, *sum_dy_centred;
  BKN_HOST_DEVICE void add(state& s, index_t n, index_t c, index_t h, index_t w,
                           index_t gc) const {
    using W = arith_t<T, P>;
    const A d = load<A>(dy(n, c, h, w));
    s.first += d;
    s.second += d * A(load<W>(x(n, c, h, w)) - W(centre[gc]));
  }
  __device__ static state shuffle_down(const state& s, int delta) {
    state o;
    o.first = __shfl_down_sync(0xffffffffu, s.first, delta);
    o.second = __shfl_down_sync(0xffffffffu, s.second, delta);
    return o;
  }
  BKN_HOST_DEVICE static void combine(state& a, const state& b) {
    a.first += b.first;
    a.second += b.second;
  }
  BKN_HOST_DEVICE void finish(const state& s, index_t i) const {
    sum_dy[i] = P(s.first);
    sum_dy_centred[i] = P(s.second);
  }
};

/// Combines the states of a block of block_threads threads: a shuffle tree in each warp, then
/// warp 0 combines the warps' results in warp order. The result is valid in thread 0.
template <class R>
__device__ typename R::state block_combine(typename R::state s) {
  using state = typename R::state;
  // Raw shared storage: a __shared__ array may not have a non-trivial constructor.
  __shared__ alignas(state) unsigned char raw[sizeof(state) * (block_threads / warp)];
  state* warps = reinterpret_cast<state*>(raw);
  for (int delta = warp / 2; delta > 0; delta /= 2) R::combine(s, R::shuffle_down(s, delta));
  const int lane = int(threadIdx.x) % warp, id = int(threadIdx.x) / warp;
  if (lane == 0) warps[id] = s;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int k = 1; k < block_threads / warp; ++k) R::combine(s, warps[k]);
  return s;
}

/// The end of chunk k of `size` values out of `values`.
BKN_HOST_DEVICE inline index_t chunk_end(index_t k, index_t size, index_t values) {
  return (k + 1) * size < values ? (k + 1) * size : values;
}

/// Adds values j = start, start + step, ... < end of (g, channel) (j as in reduction_shape).
template <class R>
BKN_HOST_DEVICE void add_values(const R& reducer, typename R::state& s, const reduction_shape& rs,
                                index_t g, index_t channel, index_t channels, index_t start,
                                index_t end, index_t step) {
  for (index_t j = start; j < end; j += step) {
    const index_t n = g * rs.group_size + j / rs.spatial, p = j % rs.spatial;
    reducer.add(s, n, channel, p / rs.width, p % rs.width, g * channels + channel);
  }
}

/// Planes path (NCHW, NC, and any strides): block b reduces chunk k of (g, c), with
/// b = (g * chunks + k) * C + c; thread t takes the chunk's values t, t + 256, ... (consecutive
/// threads read consecutive pixels of a plane). The block's combined state is partial[b].
template <class R>
BKN_HOST_DEVICE typename R::state planes_thread(const R& reducer, const reduction_shape& rs,
                                                index_t channels, index_t chunks, index_t b,
                                                int thread) {
  const index_t c = b % channels, k = (b / channels) % chunks, g = b / (channels * chunks);
  typename R::state s{};
  add_values(reducer, s, rs, g, c, channels, k * plane_chunk + thread,
             chunk_end(k, plane_chunk, rs.values), block_threads);
  return s;
}

template <class R>
BKN_KERNEL void reduce_planes_kernel(R reducer, reduction_shape rs, index_t channels,
                                     index_t chunks, typename R::state* partial) {
  const index_t b = index_t(blockIdx.x);
  const typename R::state s =
      block_combine<R>(planes_thread(reducer, rs, channels, chunks, b, int(threadIdx.x)));
  if (threadIdx.x == 0) partial[b] = s;
}

/// Channels-last path (NHWC): block (x = g * chunks + k, y = channel tile) reduces pixels
/// [k * pixel_chunk, ...) of group g for 32 channels; thread (lane, row) takes channel
/// tile * 32 + lane (its `channel`, which may be past C) and the chunk's pixels row, row + 8,
/// ... The 8 rows of a channel are then combined in row order into partial[x * C + channel].
template <class R>
BKN_HOST_DEVICE typename R::state channels_last_thread(const R& reducer, const reduction_shape& rs,
                                                       index_t channels, index_t chunks,
                                                       index_t block_x, index_t block_y,
                                                       int thread, index_t& channel) {
  const int lane = thread % tile_channels, row = thread / tile_channels;
  const index_t k = block_x % chunks, g = block_x / chunks;
  channel = block_y * tile_channels + lane;
  typename R::state s{};
  if (channel < channels)  // values of a group are its group_size * H * W pixels
    add_values(reducer, s, rs, g, channel, channels, k * pixel_chunk + row,
               chunk_end(k, pixel_chunk, rs.values), tile_rows);
  return s;
}

template <class R>
BKN_KERNEL void reduce_channels_last_kernel(R reducer, reduction_shape rs, index_t channels,
                                            index_t chunks, typename R::state* partial) {
  using state = typename R::state;
  __shared__ alignas(state) unsigned char raw[sizeof(state) * tile_rows * tile_channels];
  state (*rows)[tile_channels] = reinterpret_cast<state (*)[tile_channels]>(raw);
  const int lane = int(threadIdx.x) % tile_channels, row = int(threadIdx.x) / tile_channels;
  index_t c = 0;
  state s = channels_last_thread(reducer, rs, channels, chunks, index_t(blockIdx.x),
                                 index_t(blockIdx.y), int(threadIdx.x), c);
  rows[row][lane] = s;
  __syncthreads();
  if (row == 0 && c < channels) {
    for (int r = 1; r < tile_rows; ++r) R::combine(s, rows[r][lane]);
    partial[index_t(blockIdx.x) * channels + c] = s;
  }
}

/// Merges the chunk states of (g, c) = (i / C, i % C) in chunk order and writes the result.
template <class R>
struct merge_op {
  R reducer;
  const typename R::state* partial;
  index_t channels, chunks;
  BKN_HOST_DEVICE void operator()(index_t i) const {
    const index_t g = i / channels, c = i % channels;
    typename R::state total{};
    for (index_t k = 0; k < chunks; ++k)
      R::combine(total, partial[(g * chunks + k) * channels + c]);
    reducer.finish(total, i);
  }
};

/// Which kernel reduces a view, into how many chunks per (group, channel), and its grid: planes
/// blocks in x only, channels-last blocks (g * chunks + k, channel tile).
struct reduction_plan {
  bool channels_last;
  index_t chunks;
  index_t blocks_x, blocks_y;
};
inline reduction_plan plan_reduction(bool channels_last, const reduction_shape& rs,
                                     index_t groups, index_t channels) {
  const index_t chunks = ceil_div(rs.values, channels_last ? pixel_chunk : plane_chunk);
  if (channels_last) return {true, chunks, groups * chunks, ceil_div(channels, tile_channels)};
  return {false, chunks, groups * chunks * channels, 1};
}

template <class U>
U* partials(span<std::byte> scratch, std::size_t offset, index_t count) {
  // The core sizes the scratch with scratch_bytes(); a miss here is a bug in bkn, not misuse.
  assert(static_cast<std::size_t>(scratch.size()) >=
         offset + static_cast<std::size_t>(count) * sizeof(U));
  (void)count;
  return reinterpret_cast<U*>(scratch.data() + offset);
}

// ---- covariance: per (g, chunk, i <= j) a sum of centred products (the mean is given, so
// chunks add), then per (g, i, j) the chunks summed in order; (i, j) and (j, i) read the same
// partial sums, so the result is exactly symmetric. With cuBLAS: one chunk, the Gram matrix ----

template <class T, class P>
struct covariance_chunk_op {
  using A = accum_t<T>;
  tensor_view<const T> x;
  reduction_shape rs;
  index_t chunks;
  const P* mean;
  A* partial;  // [((g * chunks + k) * C + i) * C + j], i <= j
  BKN_HOST_DEVICE void operator()(index_t e) const {
    using W = arith_t<T, P>;
    const index_t C = x.channels();
    const index_t j = e % C, i = (e / C) % C;
    if (j < i) return;
    const index_t k = (e / (C * C)) % chunks, g = e / (C * C * chunks);
    const W mi = W(mean[g * C + i]), mj = W(mean[g * C + j]);
    const index_t end = chunk_end(k, covariance_chunk, rs.values);
    A sum = 0;
    for (index_t v = k * covariance_chunk; v < end; ++v) {
      const index_t n = g * rs.group_size + v / rs.spatial, p = v % rs.spatial;
      const index_t h = p / rs.width, w = p % rs.width;
      sum += A(load<W>(x(n, i, h, w)) - mi) * A(load<W>(x(n, j, h, w)) - mj);
    }
    partial[e] = sum;
  }
};

/// cov[g, i, j] = (sum over chunks of partial[g, k, min(i, j), max(i, j)]) / values.
template <class A, class P>
struct covariance_merge_op {
  const A* partial;
  index_t channels, chunks, values;
  P* cov;
  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = channels;
    const index_t j = e % C, i = (e / C) % C, g = e / (C * C);
    const index_t lo = i < j ? i : j, hi = i < j ? j : i;
    A sum = 0;
    for (index_t k = 0; k < chunks; ++k) sum += partial[((g * chunks + k) * C + lo) * C + hi];
    cov[e] = P(values > 0 ? sum / A(values) : A(0));
  }
};

/// The centred copy z = x - mean[g, c] that cuBLAS multiplies, one column-major matrix per
/// group: for planes views m x C, each channel's m values contiguous (z[(g C + c) m + j]); for
/// channels-last views C x m, each pixel's C channels contiguous (z[(n H W + s) C + c]). Either
/// way consecutive e read and write consecutive addresses of dense views.
template <class T, class P>
struct centre_op {
  using A = accum_t<T>;
  tensor_view<const T> x;
  reduction_shape rs;
  bool channels_last;
  const P* mean;
  A* z;
  BKN_HOST_DEVICE void operator()(index_t e) const {
    const index_t C = x.channels();
    index_t n, c, s;
    if (channels_last) {
      c = e % C;
      n = e / C / rs.spatial;
      s = e / C % rs.spatial;
    } else {
      const index_t j = e % rs.values, g = e / rs.values / C;
      c = e / rs.values % C;
      n = g * rs.group_size + j / rs.spatial;
      s = j % rs.spatial;
    }
    using W = arith_t<T, P>;
    const index_t g = n / rs.group_size;
    z[e] = A(load<W>(x(n, c, s / rs.width, s % rs.width)) - W(mean[g * C + c]));
  }
};

/// Where the cuBLAS covariance keeps its G C x C Gram matrices and the centred copy of x, for
/// an accumulator of `element` bytes. scratch_bytes sizes it for double.
struct blas_scratch {
  std::size_t gram, centred, total;
};
inline blas_scratch blas_layout(index_t groups, index_t channels, index_t values,
                                std::size_t element) {
  const std::size_t gram = std::size_t(groups * channels * channels) * element;
  const std::size_t centred = (gram + blas_alignment - 1) / blas_alignment * blas_alignment;
  return {0, centred, centred + std::size_t(groups * values * channels) * element};
}

template <class A>
struct blas_types;
template <>
struct blas_types<float> {
  static constexpr cudaDataType data = CUDA_R_32F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
};
template <>
struct blas_types<double> {
  static constexpr cudaDataType data = CUDA_R_64F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_64F_PEDANTIC;
};

/// Binds a caller's handle to the backend's stream with host pointers for alpha and beta, for
/// one call, and restores what it changed. Host-side state only: nothing synchronizes.
class blas_binding {
 public:
  blas_binding(cublasHandle_t handle, cudaStream_t stream, const char* pass) : handle_(handle) {
    check_blas(cublasGetStream(handle, &stream_), pass);
    check_blas(cublasGetPointerMode(handle, &mode_), pass);
    if (stream_ != stream) {
      check_blas(cublasSetStream(handle, stream), pass);
      restore_stream_ = true;
    }
    if (mode_ != CUBLAS_POINTER_MODE_HOST) {
      const cublasStatus_t status = cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST);
      if (status != CUBLAS_STATUS_SUCCESS) {
        restore();
        throw cuda_error(pass, status);
      }
      restore_mode_ = true;
    }
  }
  blas_binding(const blas_binding&) = delete;
  blas_binding& operator=(const blas_binding&) = delete;
  ~blas_binding() { restore(); }

 private:
  void restore() noexcept {
    if (restore_mode_) (void)cublasSetPointerMode(handle_, mode_);
    if (restore_stream_) (void)cublasSetStream(handle_, stream_);
    restore_mode_ = restore_stream_ = false;
  }
  cublasHandle_t handle_;
  cudaStream_t stream_ = nullptr;
  cublasPointerMode_t mode_ = CUBLAS_POINTER_MODE_HOST;
  bool restore_stream_ = false, restore_mode_ = false;
};

/// The strided batched GEMM that forms each group's Gram matrix from the centred copy, in BLAS's
/// column-major terms. Planes: group g's copy is m x C (ld m), gram = Z^T Z; channels-last: it is
/// C x m (ld C), gram = Z Z^T. Both triangles are computed; the merge reads one.
struct gram_gemm {
  bool transpose_first, transpose_second;
  index_t rows, columns, depth;  // BLAS m, n, k: C, C, values
  index_t ld, stride;            // of the centred copy, both operands
  index_t ld_gram, stride_gram;
  index_t batch;
};
inline gram_gemm gram_parameters(index_t groups, index_t channels, index_t values,
                                 bool channels_last) {
  gram_gemm p{};
  p.transpose_first = !channels_last;
  p.transpose_second = channels_last;
  p.rows = p.columns = channels;
  p.depth = values;
  p.ld = channels_last ? channels : values;
  p.stride = values * channels;
  p.ld_gram = channels;
  p.stride_gram = channels * channels;
  p.batch = groups;
  return p;
}

// ---- elementwise passes: one thread per element, the unit-stride axis fastest ----

/// Element e of a view in an order where consecutive e are (for dense layouts) consecutive
/// addresses: channels fastest for channels-last, width fastest otherwise.
struct element_order {
  bool channels_last;
  BKN_HOST_DEVICE void decompose(const tensor_shape& s, index_t e, index_t& n, index_t& c,
                                 index_t& h, index_t& w) const {
    if (channels_last) {
      c = e % s.channels;
      e /= s.channels;
      w = e % s.width;
      e /= s.width;
      h = e % s.height;
      n = e / s.height;
    } else {
      w = e % s.width;
      e /= s.width;
      h = e % s.height;
      e /= s.height;
      c = e % s.channels;
      n = e / s.channels;
    }
  }
};

/// out = a (u - centre) (+ b v) + k, in arith_t<T, P>, rounded once. Each thread reads u and v
/// before writing its own element, so out may be the same view as u or v.
template <class T, class P>
struct affine_op {
  tensor_view<T> out;
  tensor_view<const T> u, v;
  const P *a, *centre, *b, *k;  // b: null without v
  index_t group_size;
  element_order order;
  BKN_HOST_DEVICE void operator()(index_t e) const {
    using R = arith_t<T, P>;
    const tensor_shape& s = out.shape();
    index_t n, c, h, w;
    order.decompose(s, e, n, c, h, w);
    const index_t j = (n / group_size) * s.channels + c;
    R r = R(a[j]) * (load<R>(u(n, c, h, w)) - R(centre[j])) + R(k[j]);
    if (b != nullptr) r += R(b[j]) * load<R>(v(n, c, h, w));
    out(n, c, h, w) = store<T>(r);
  }
};

/// out[i] = a[i] u[i] + k[i] + sum_j M[i][j] (v[j] - centre[j]) on each pixel's channel vector;
/// one thread per output element, channels fastest so a warp shares its pixel's v.
template <class T, class P>
struct mix_op {
  tensor_view<T> out;
  tensor_view<const T> u, v;
  const P *a, *matrix, *centre, *k;
  index_t group_size;
  BKN_HOST_DEVICE void operator()(index_t e) const {
    using R = arith_t<T, P>;
    const tensor_shape& s = out.shape();
    const index_t C = s.channels;
    index_t n, i, h, w;
    element_order{true}.decompose(s, e, n, i, h, w);
    const index_t g = n / group_size;
    const P* row = matrix + (g * C + i) * C;
    const P* m = centre + g * C;
    R r = R(a[g * C + i]) * load<R>(u(n, i, h, w)) + R(k[g * C + i]);
    for (index_t j = 0; j < C; ++j) r += R(row[j]) * (load<R>(v(n, j, h, w)) - R(m[j]));
    out(n, i, h, w) = store<T>(r);
  }
};

/// The channels-last kernel for views whose channels are adjacent (NHWC; NC with C > 1).
template <class T>
bool channels_last(const tensor_view<T>& x) {
  return x.channels() > 1 && x.channels_contiguous();
}

// ---- the passes, written once over an executor: device_executor below launches kernels and
// calls cuBLAS on the backend's stream; tests/backends/cuda/host_emulation.cu runs the same
// passes with an executor that loops on the CPU. An executor provides
//   for_each(count, f, pass)                    f(i) for i in [0, count)
//   reduce_chunks(reducer, rs, plan, C, partial, pass)   the chunk states of every (g, c)
//   has_blas(), gram(gram_gemm, z, gram, pass)  the cuBLAS GEMM ----

/// Every (g, c) reduced: chunk states into the scratch at [(g * chunks + k) * C + c], then one
/// merge per (g, c) in chunk order, which writes the outputs.
template <class Exec, class R>
void reduce_groups(const Exec& exec, const R& reducer, const reduction_shape& rs, index_t groups,
                   index_t channels, bool channels_last, span<std::byte> scratch,
                   const char* pass) {
  using state = typename R::state;
  const reduction_plan plan = plan_reduction(channels_last, rs, groups, channels);
  state* partial = partials<state>(scratch, 0, groups * channels * plan.chunks);
  if (plan.chunks > 0) exec.reduce_chunks(reducer, rs, plan, channels, partial, pass);
  exec.for_each(groups * channels, merge_op<R>{reducer, partial, channels, plan.chunks}, pass);
}

template <class Exec, class T, class P>
void moments(const Exec& exec, tensor_view<const T> x, index_t group_size, span<P> mean,
             span<P> var, span<std::byte> scratch) {
  const index_t C = x.channels(), G = x.batch() / group_size;
  if (G * C == 0) return;
  reduce_groups(exec, moments_reducer<T, P>{x, mean.data(), var.data()},
                shape_of(x.shape(), group_size), G, C, channels_last(x), scratch, "bkn::moments");
}

template <class Exec, class T, class P>
void covariance(const Exec& exec, tensor_view<const T> x, index_t group_size, span<const P> mean,
                span<P> cov, span<std::byte> scratch) {
  using A = accum_t<T>;
  const char* pass = "bkn::covariance";
  const index_t C = x.channels(), G = x.batch() / group_size;
  if (G * C == 0) return;
  const reduction_shape rs = shape_of(x.shape(), group_size);
  if (!exec.has_blas()) {
    const index_t chunks = ceil_div(rs.values, covariance_chunk);
    A* partial = partials<A>(scratch, 0, G * chunks * C * C);
    exec.for_each(G * chunks * C * C,
                  covariance_chunk_op<T, P>{x, rs, chunks, mean.data(), partial}, pass);
    exec.for_each(G * C * C, covariance_merge_op<A, P>{partial, C, chunks, rs.values, cov.data()},
                  pass);
    return;
  }
  // Centred first: u - m is exact for nearby values, so |mean| >> sigma costs no digits (the
  // Gram-minus-outer-product form would lose them), then the Gram matrices, then the merge of
  // one chunk.
  const blas_scratch layout = blas_layout(G, C, rs.values, sizeof(A));
  A* gram = partials<A>(scratch, layout.gram, G * C * C);
  A* z = partials<A>(scratch, layout.centred, G * rs.values * C);
  const bool cl = channels_last(x);
  const index_t chunks = rs.values > 0 ? 1 : 0;
  if (chunks > 0) {
    exec.for_each(G * rs.values * C, centre_op<T, P>{x, rs, cl, mean.data(), z}, pass);
    exec.gram(gram_parameters(G, C, rs.values, cl), z, gram, pass);
  }
  exec.for_each(G * C * C, covariance_merge_op<A, P>{gram, C, chunks, rs.values, cov.data()},
                pass);
}

template <class Exec, class T, class P>
void sums(const Exec& exec, tensor_view<const T> dy, tensor_view<const T> x, span<const P> centre,
          index_t group_size, span<P> sum_dy, span<P> sum_dy_centred, span<std::byte> scratch) {
  const index_t C = x.channels(), G = x.batch() / group_size;
  if (G * C == 0) return;
  // Channels-last only when both tensors are: each kernel is correct for any strides, this
  // picks the one whose reads coalesce.
  reduce_groups(exec,
                sums_reducer<T, P>{dy, x, centre.data(), sum_dy.data(), sum_dy_centred.data()},
                shape_of(x.shape(), group_size), G, C, channels_last(x) && channels_last(dy),
                scratch, "bkn::sums");
}

template <class Exec, class T, class P>
void affine(const Exec& exec, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
            span<const P> centre, tensor_view<const T> v, span<const P> b, span<const P> k,
            index_t group_size) {
  exec.for_each(out.shape().elements(),
                affine_op<T, P>{out, u, v, a.data(), centre.data(), b.empty() ? nullptr : b.data(),
                                k.data(), group_size, element_order{channels_last(out)}},
                "bkn::affine");
}

template <class Exec, class T, class P>
void mix(const Exec& exec, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
         tensor_view<const T> v, span<const P> matrix, span<const P> centre, span<const P> k,
         index_t group_size) {
  exec.for_each(out.shape().elements(),
                mix_op<T, P>{out, u, v, a.data(), matrix.data(), centre.data(), k.data(),
                             group_size},
                "bkn::mix");
}

/// The passes' pieces on the backend's stream.
struct device_executor {
  const cuda_backend& backend;

  template <class F>
  void for_each(index_t count, const F& f, const char* pass) const {
    if (count <= 0) return;
    for_each_kernel<F><<<grid_for(count), block_threads, 0, backend.stream>>>(f, count);
    check_launch(pass);
  }

  template <class R>
  void reduce_chunks(const R& reducer, const reduction_shape& rs, const reduction_plan& plan,
                     index_t channels, typename R::state* partial, const char* pass) const {
    const dim3 grid(unsigned(plan.blocks_x), unsigned(plan.blocks_y));
    if (plan.channels_last)
      reduce_channels_last_kernel<R><<<grid, block_threads, 0, backend.stream>>>(
          reducer, rs, channels, plan.chunks, partial);
    else
      reduce_planes_kernel<R><<<grid, block_threads, 0, backend.stream>>>(reducer, rs, channels,
                                                                          plan.chunks, partial);
    check_launch(pass);
  }

  bool has_blas() const { return backend.blas != nullptr; }

  template <class A>
  void gram(const gram_gemm& p, const A* z, A* gram, const char* pass) const {
    const blas_binding binding(backend.blas, backend.stream, pass);
    const A one = 1, zero = 0;
    const auto op = [](bool transpose) { return transpose ? CUBLAS_OP_T : CUBLAS_OP_N; };
    check_blas(cublasGemmStridedBatchedEx_64(
                   backend.blas, op(p.transpose_first), op(p.transpose_second), p.rows,
                   p.columns, p.depth, &one, z, blas_types<A>::data, p.ld, p.stride, z,
                   blas_types<A>::data, p.ld, p.stride, &zero, gram, blas_types<A>::data,
                   p.ld_gram, p.stride_gram, p.batch, blas_types<A>::compute,
                   CUBLAS_GEMM_DEFAULT),
               pass);
  }
};

}  // namespace cuda_impl
}  // namespace detail

template <>
struct kernels<cuda_backend> {
  using B = cuda_backend;

  /// Bytes of the per-chunk partial states of one pass (the passes run one after another on the
  /// stream, so they share them), for either reduction kernel and the widest accumulator; in
  /// full mode also the covariance's partial sums, or, with a cuBLAS handle, its Gram matrices
  /// and the centred copy of x (8 bytes an element: sized for double). Enough for any group size
  /// that is a multiple of `group_size` (a sum of ceilings is at least the ceiling of the sum).
  /// Alignment: 64 bytes, as every bkn workspace.
  static std::size_t scratch_bytes(const B& backend, const tensor_shape& x, index_t group_size,
                                   bkn::covariance mode) {
    using namespace detail::cuda_impl;
    if (group_size <= 0) return 0;
    const index_t G = x.batch / group_size, C = x.channels;
    const reduction_shape rs = shape_of(x, group_size);
    const index_t chunks =
        ceil_div(rs.values, pixel_chunk < plane_chunk ? pixel_chunk : plane_chunk);
    const std::size_t state = sizeof(welford<double>) > sizeof(sum_pair<double>)
                                  ? sizeof(welford<double>)
                                  : sizeof(sum_pair<double>);
    std::size_t bytes = std::size_t(G * C * chunks) * state;
    if (mode == bkn::covariance::full) {
      const std::size_t cov =
          backend.blas != nullptr
              ? blas_layout(G, C, rs.values, sizeof(double)).total
              : std::size_t(G * ceil_div(rs.values, covariance_chunk) * C * C) * sizeof(double);
      if (cov > bytes) bytes = cov;
    }
    return bytes;
  }

  template <class T, class P>
  static void moments(const B& backend, tensor_view<const T> x, index_t group_size, span<P> mean,
                      span<P> var, span<std::byte> scratch) {
    check_types<T, P>();
    detail::cuda_impl::moments(executor(backend), x, group_size, mean, var, scratch);
  }

  template <class T, class P>
  static void covariance(const B& backend, tensor_view<const T> x, index_t group_size,
                         span<const P> mean, span<P> cov, span<std::byte> scratch) {
    check_types<T, P>();
    detail::cuda_impl::covariance(executor(backend), x, group_size, mean, cov, scratch);
  }

  template <class T, class P>
  static void sums(const B& backend, tensor_view<const T> dy, tensor_view<const T> x,
                   span<const P> centre, index_t group_size, span<P> sum_dy,
                   span<P> sum_dy_centred, span<std::byte> scratch) {
    check_types<T, P>();
    detail::cuda_impl::sums(executor(backend), dy, x, centre, group_size, sum_dy, sum_dy_centred,
                            scratch);
  }

  template <class T, class P>
  static void affine(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                     span<const P> centre, tensor_view<const T> v, span<const P> b,
                     span<const P> k, index_t group_size) {
    check_types<T, P>();
    detail::cuda_impl::affine(executor(backend), out, u, a, centre, v, b, k, group_size);
  }

  template <class T, class P>
  static void mix(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                  tensor_view<const T> v, span<const P> matrix, span<const P> centre,
                  span<const P> k, index_t group_size) {
    check_types<T, P>();
    detail::cuda_impl::mix(executor(backend), out, u, a, v, matrix, centre, k, group_size);
  }

  /// f is the core's BKN_HOST_DEVICE functor, copied to the device as a kernel argument.
  template <class F>
  static void for_each(const B& backend, index_t count, F f) {
    executor(backend).for_each(count, f, "bkn::for_each");
  }

 private:
  static detail::cuda_impl::device_executor executor(const B& backend) { return {backend}; }

  template <class T, class P>
  static constexpr void check_types() {
    static_assert(detail::cuda_impl::supported_element<T>,
                  "bkn::cuda_backend: T must be float, double, __half or __nv_bfloat16");
    static_assert(detail::cuda_impl::supported_parameter<P>,
                  "bkn::cuda_backend: P must be float or double");
  }
};

BKN_END_NAMESPACE

#ifdef BKN_CUDA_DEFINED_KERNEL_MACRO
#undef BKN_KERNEL
#undef BKN_CUDA_DEFINED_KERNEL_MACRO
#endif
