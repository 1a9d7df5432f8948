// SPDX-License-Identifier: MIT
// cuda_backend: bkn's tensor passes as CUDA kernels on a caller's stream, with reductions split
// and merged in an order fixed by the shape alone (no atomics), so results are deterministic.
#pragma once

#if !defined(__CUDACC__)
#error "bkn/backends/cuda.hpp must be compiled by nvcc (a .cu file, or LANGUAGE CUDA): it defines CUDA kernels. Plain C++ translation units include <bkn/bkn.hpp> only."
#endif

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
/// stream). The stream is copied, never owned, created or destroyed by bkn.
///
/// Tensors, per-channel arrays and the workspace must be device memory (or managed memory) of
/// the current device. Every pass is one or two kernel launches on `stream`, asynchronous with
/// respect to the host and ordered with the other passes on the same stream: synchronize the
/// stream before reading results on the host. No pass allocates or synchronizes.
///
/// Element types T: float, double, __half, __nv_bfloat16 (storage), accumulated in float
/// (double for double); per-channel type P: float or double. Each sum is split into chunks and
/// merged in an order fixed by the shape (and the layout) alone, never with atomics: results
/// are bitwise the same run to run and on any GPU of the same architecture (docs/cuda.md).
///
/// Errors: a launch that fails (bad configuration, no device, a kernel image missing for this
/// GPU) is reported by cudaGetLastError right after the launch, which does not synchronize;
/// the pass then throws bkn::cuda_error. Faults inside a kernel surface asynchronously, at the
/// caller's next synchronizing CUDA call.
struct cuda_backend {
  cudaStream_t stream = nullptr;
};

/// A CUDA runtime error seen by a pass of cuda_backend (a failed launch).
class cuda_error : public std::runtime_error {
 public:
  cuda_error(const char* pass, cudaError_t code)
      : std::runtime_error(std::string("bkn: CUDA error in ") + pass + ": " +
                           cudaGetErrorName(code) + ": " + cudaGetErrorString(code)),
        code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
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

/// The wider of accum_t<T> and P: the elementwise passes form u - centre in it.
template <class T, class P>
using arith_t = std::conditional_t<std::is_same_v<accum_t<T>, double> || std::is_same_v<P, double>,
                                   double, float>;

template <class A>
__device__ __forceinline__ A load(const float& v) { return A(v); }
template <class A>
__device__ __forceinline__ A load(const double& v) { return A(v); }
template <class A>
__device__ __forceinline__ A load(const __half& v) { return A(__half2float(v)); }
template <class A>
__device__ __forceinline__ A load(const __nv_bfloat16& v) { return A(__bfloat162float(v)); }

template <class T>
struct store_as;
template <>
struct store_as<float> {
  template <class R>
  __device__ __forceinline__ static float from(R r) { return float(r); }
};
template <>
struct store_as<double> {
  template <class R>
  __device__ __forceinline__ static double from(R r) { return double(r); }
};
template <>
struct store_as<__half> {
  template <class R>
  __device__ __forceinline__ static __half from(R r) { return __float2half_rn(float(r)); }
};
template <>
struct store_as<__nv_bfloat16> {
  template <class R>
  __device__ __forceinline__ static __nv_bfloat16 from(R r) { return __float2bfloat16_rn(float(r)); }
};

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
// Grid-stride kernels (elementwise, for_each) use at most this many blocks.
inline constexpr index_t max_blocks = 65535;

inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

inline void check_launch(const char* pass) {
  // cudaGetLastError returns (and clears) launch errors without waiting for the stream.
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw cuda_error(pass, e);
}

inline unsigned grid_for(index_t count) {
  const index_t blocks = ceil_div(count, block_threads);
  return unsigned(blocks < max_blocks ? blocks : max_blocks);
}

/// The values of one (group, channel) reduction: j in [0, m) with m = group_size * H * W, in the
/// reference backend's order: sample n = g * group_size + j / (H W), pixel s = j % (H W).
struct reduction_shape {
  index_t group_size, height, width, spatial, values;  // values = group_size * spatial
};
inline reduction_shape shape_of(const tensor_shape& x, index_t group_size) {
  return {group_size, x.height, x.width, x.height * x.width, group_size * x.height * x.width};
}

// ---- reducers: a state, its identity, adding one element, and the combine. The combine is
// applied in a fixed tree (warp shuffles, then warps in order, then chunks in order) ----

template <class A>
struct welford_state_ops {
  using state = welford<A>;
  __device__ static state shuffle_down(const state& s, int delta) {
    state o;
    o.count = __shfl_down_sync(0xffffffffu, s.count, delta);
    o.mean = __shfl_down_sync(0xffffffffu, s.mean, delta);
    o.m2 = __shfl_down_sync(0xffffffffu, s.m2, delta);
    return o;
  }
  __device__ static void combine(state& a, const state& b) { a.combine(b); }
};

template <class T>
struct moments_reducer : welford_state_ops<accum_t<T>> {
  using A = accum_t<T>;
  using state = welford<A>;
  tensor_view<const T> x;
  __device__ void add(state& s, index_t n, index_t c, index_t h, index_t w, index_t) const {
    s.add(load<A>(x(n, c, h, w)));
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
  __device__ void add(state& s, index_t n, index_t c, index_t h, index_t w, index_t gc) const {
    const A d = load<A>(dy(n, c, h, w));
    s.first += d;
    s.second += d * (load<A>(x(n, c, h, w)) - A(centre[gc]));
  }
  __device__ static state shuffle_down(const state& s, int delta) {
    state o;
    o.first = __shfl_down_sync(0xffffffffu, s.first, delta);
    o.second = __shfl_down_sync(0xffffffffu, s.second, delta);
    return o;
  }
  __device__ static void combine(state& a, const state& b) {
    a.first += b.first;
    a.second += b.second;
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

/// Planes path (NCHW, NC, and any strides): block b reduces chunk k of (g, c), with
/// b = (g * chunks + k) * C + c; thread t takes the chunk's values t, t + 256, ... (consecutive
/// threads read consecutive pixels of a plane). partial[b] is the chunk's state.
template <class R>
BKN_KERNEL void reduce_planes_kernel(R reducer, reduction_shape rs, index_t channels,
                                     index_t chunks, typename R::state* partial) {
  using state = typename R::state;
  const index_t b = index_t(blockIdx.x);
  const index_t c = b % channels, k = (b / channels) % chunks, g = b / (channels * chunks);
  const index_t first = k * plane_chunk;
  const index_t end = first + plane_chunk < rs.values ? first + plane_chunk : rs.values;
  state s{};
  for (index_t j = first + threadIdx.x; j < end; j += block_threads) {
    const index_t n = g * rs.group_size + j / rs.spatial, p = j % rs.spatial;
    reducer.add(s, n, c, p / rs.width, p % rs.width, g * channels + c);
  }
  s = block_combine<R>(s);
  if (threadIdx.x == 0) partial[b] = s;
}

/// Channels-last path (NHWC): block (x = g * chunks + k, y = channel tile) reduces pixels
/// [k * pixel_chunk, ...) of group g for 32 channels; thread (lane, row) takes channel
/// tile * 32 + lane and the chunk's pixels row, row + 8, ... The 8 rows of a channel are then
/// combined in row order. partial[(g * chunks + k) * C + c].
template <class R>
BKN_KERNEL void reduce_channels_last_kernel(R reducer, reduction_shape rs, index_t channels,
                                            index_t chunks, typename R::state* partial) {
  using state = typename R::state;
  __shared__ alignas(state) unsigned char raw[sizeof(state) * tile_rows * tile_channels];
  state (*rows)[tile_channels] = reinterpret_cast<state (*)[tile_channels]>(raw);
  const int lane = int(threadIdx.x) % tile_channels, row = int(threadIdx.x) / tile_channels;
  const index_t gk = index_t(blockIdx.x), k = gk % chunks, g = gk / chunks;
  const index_t c = index_t(blockIdx.y) * tile_channels + lane;
  const index_t pixels = rs.values;  // group_size * H * W pixels per group
  const index_t first = k * pixel_chunk;
  const index_t end = first + pixel_chunk < pixels ? first + pixel_chunk : pixels;
  state s{};
  if (c < channels) {
    for (index_t j = first + row; j < end; j += tile_rows) {
      const index_t n = g * rs.group_size + j / rs.spatial, p = j % rs.spatial;
      reducer.add(s, n, c, p / rs.width, p % rs.width, g * channels + c);
    }
  }
  rows[row][lane] = s;
  __syncthreads();
  if (row == 0 && c < channels) {
    for (int r = 1; r < tile_rows; ++r) R::combine(s, rows[r][lane]);
    partial[gk * channels + c] = s;
  }
}

/// Merges chunk states per (g, c) in chunk order; i = g * C + c.
template <class T, class P>
BKN_KERNEL void moments_merge_kernel(const welford<accum_t<T>>* partial, index_t groups,
                                     index_t channels, index_t chunks, P* mean, P* var) {
  const index_t count = groups * channels;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t g = i / channels, c = i % channels;
    welford<accum_t<T>> total;
    for (index_t k = 0; k < chunks; ++k) total.combine(partial[(g * chunks + k) * channels + c]);
    mean[i] = P(total.mean);
    var[i] = P(total.variance());
  }
}

template <class T, class P>
BKN_KERNEL void sums_merge_kernel(const sum_pair<accum_t<T>>* partial, index_t groups,
                                  index_t channels, index_t chunks, P* sum_dy, P* sum_dy_centred) {
  const index_t count = groups * channels;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += index_t(gridDim.x) * blockDim.x) {
    const index_t g = i / channels, c = i % channels;
    sum_pair<accum_t<T>> total;
    for (index_t k = 0; k < chunks; ++k) {
      const sum_pair<accum_t<T>>& p = partial[(g * chunks + k) * channels + c];
      total.first += p.first;
      total.second += p.second;
    }
    sum_dy[i] = P(total.first);
    sum_dy_centred[i] = P(total.second);
  }
}

/// Which kernel reduces a view, and into how many chunks per (group, channel).
struct reduction_plan {
  bool channels_last;
  index_t chunks;
};
inline reduction_plan plan_reduction(bool channels_last, const reduction_shape& rs) {
  return {channels_last, ceil_div(rs.values, channels_last ? pixel_chunk : plane_chunk)};
}

/// Runs reducer over every (g, c) into partials [(g * chunks + k) * C + c].
template <class R>
void launch_reduction(cudaStream_t stream, const R& reducer, const reduction_shape& rs,
                      index_t groups, index_t channels, const reduction_plan& plan,
                      typename R::state* partial, const char* pass) {
  if (plan.chunks == 0 || groups * channels == 0) return;
  if (plan.channels_last) {
    const dim3 grid(unsigned(groups * plan.chunks), unsigned(ceil_div(channels, tile_channels)));
    reduce_channels_last_kernel<R><<<grid, block_threads, 0, stream>>>(reducer, rs, channels,
                                                                       plan.chunks, partial);
  } else {
    reduce_planes_kernel<R><<<unsigned(groups * plan.chunks * channels), block_threads, 0,
                              stream>>>(reducer, rs, channels, plan.chunks, partial);
  }
  check_launch(pass);
}

// ---- covariance: per (g, chunk, i <= j) a sum of centred products (the mean is given, so
// chunks add), then per (g, i, j) the chunks summed in order; (i, j) and (j, i) read the same
// partials, so the result is exactly symmetric ----

template <class T, class P>
BKN_KERNEL void covariance_chunk_kernel(tensor_view<const T> x, reduction_shape rs, index_t groups,
                                        index_t chunks, const P* mean, accum_t<T>* partial) {
  using A = accum_t<T>;
  const index_t C = x.channels(), count = groups * chunks * C * C;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t j = e % C, i = (e / C) % C;
    if (j < i) continue;
    const index_t k = (e / (C * C)) % chunks, g = e / (C * C * chunks);
    const A mi = A(mean[g * C + i]), mj = A(mean[g * C + j]);
    const index_t first = k * covariance_chunk;
    const index_t end = first + covariance_chunk < rs.values ? first + covariance_chunk : rs.values;
    A sum = 0;
    for (index_t v = first; v < end; ++v) {
      const index_t n = g * rs.group_size + v / rs.spatial, p = v % rs.spatial;
      const index_t h = p / rs.width, w = p % rs.width;
      sum += (load<A>(x(n, i, h, w)) - mi) * (load<A>(x(n, j, h, w)) - mj);
    }
    partial[e] = sum;
  }
}

template <class A, class P>
BKN_KERNEL void covariance_merge_kernel(const A* partial, index_t groups, index_t channels,
                                        index_t chunks, index_t values, P* cov) {
  const index_t C = channels, count = groups * C * C;
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += index_t(gridDim.x) * blockDim.x) {
    const index_t j = e % C, i = (e / C) % C, g = e / (C * C);
    const index_t lo = i < j ? i : j, hi = i < j ? j : i;
    A sum = 0;
    for (index_t k = 0; k < chunks; ++k) sum += partial[((g * chunks + k) * C + lo) * C + hi];
    cov[e] = P(values > 0 ? sum / A(values) : A(0));
  }
}

// ---- elementwise passes: one thread per element, the unit-stride axis fastest ----

/// Element e of a view in an order where consecutive e are (for dense layouts) consecutive
/// addresses: channels fastest for channels-last, width fastest otherwise.
struct element_order {
  bool channels_last;
  __device__ void decompose(const tensor_shape& s, index_t e, index_t& n, index_t& c, index_t& h,
                            index_t& w) const {
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
BKN_KERNEL void affine_kernel(tensor_view<T> out, tensor_view<const T> u, tensor_view<const T> v,
                              const P* a, const P* centre, const P* b, const P* k,
                              index_t group_size, element_order order) {
  using R = arith_t<T, P>;
  const tensor_shape s = out.shape();
  const index_t count = s.elements();
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += index_t(gridDim.x) * blockDim.x) {
    index_t n, c, h, w;
    order.decompose(s, e, n, c, h, w);
    const index_t j = (n / group_size) * s.channels + c;
    R r = R(a[j]) * (load<R>(u(n, c, h, w)) - R(centre[j])) + R(k[j]);
    if (b != nullptr) r += R(b[j]) * load<R>(v(n, c, h, w));
    out(n, c, h, w) = store_as<T>::from(r);
  }
}

/// out[i] = a[i] u[i] + k[i] + sum_j M[i][j] (v[j] - centre[j]) on each pixel's channel vector;
/// one thread per output element, channels fastest so a warp shares its pixel's v.
template <class T, class P>
BKN_KERNEL void mix_kernel(tensor_view<T> out, tensor_view<const T> u, tensor_view<const T> v,
                           const P* a, const P* matrix, const P* centre, const P* k,
                           index_t group_size) {
  using R = arith_t<T, P>;
  const tensor_shape s = out.shape();
  const index_t C = s.channels, count = s.elements();
  for (index_t e = index_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += index_t(gridDim.x) * blockDim.x) {
    index_t n, i, h, w;
    element_order{true}.decompose(s, e, n, i, h, w);
    const index_t g = n / group_size;
    const P* row = matrix + (g * C + i) * C;
    const P* m = centre + g * C;
    R r = R(a[g * C + i]) * load<R>(u(n, i, h, w)) + R(k[g * C + i]);
    for (index_t j = 0; j < C; ++j) r += R(row[j]) * (load<R>(v(n, j, h, w)) - R(m[j]));
    out(n, i, h, w) = store_as<T>::from(r);
  }
}

/// Calls f(i) for i in [0, count): the core's BKN_HOST_DEVICE per-channel functors.
template <class F>
BKN_KERNEL void for_each_kernel(F f, index_t count) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += index_t(gridDim.x) * blockDim.x)
    f(i);
}

template <class U>
U* partials(span<std::byte> scratch, index_t count) {
  // The core sizes the scratch with scratch_bytes(); a miss here is a bug in bkn, not misuse.
  assert(static_cast<std::size_t>(scratch.size()) >= static_cast<std::size_t>(count) * sizeof(U));
  (void)count;
  return reinterpret_cast<U*>(scratch.data());
}

/// The channels-last kernel for views whose channels are adjacent (NHWC; NC with C > 1).
template <class T>
bool channels_last(const tensor_view<T>& x) {
  return x.channels() > 1 && x.channels_contiguous();
}

}  // namespace cuda_impl
}  // namespace detail

template <>
struct kernels<cuda_backend> {
  using B = cuda_backend;

  /// Bytes of the per-chunk partial states of one pass (the passes run one after another on the
  /// stream, so they share them), for either reduction kernel and the widest accumulator. Enough
  /// for any group size that is a multiple of `group_size` (a sum of ceilings is at least the
  /// ceiling of the sum). Alignment: 64 bytes, as every bkn workspace.
  static std::size_t scratch_bytes(const B&, const tensor_shape& x, index_t group_size,
                                   bkn::covariance mode) {
    using namespace detail::cuda_impl;
    if (group_size <= 0) return 0;
    const index_t G = x.batch / group_size, C = x.channels;
    const reduction_shape rs = shape_of(x, group_size);
    const index_t chunks = ceil_div(rs.values, pixel_chunk < plane_chunk ? pixel_chunk : plane_chunk);
    const std::size_t state = sizeof(welford<double>) > sizeof(sum_pair<double>)
                                  ? sizeof(welford<double>)
                                  : sizeof(sum_pair<double>);
    std::size_t bytes = std::size_t(G * C * chunks) * state;
    if (mode == bkn::covariance::full) {
      const std::size_t cov =
          std::size_t(G * ceil_div(rs.values, covariance_chunk) * C * C) * sizeof(double);
      if (cov > bytes) bytes = cov;
    }
    return bytes;
  }

  template <class T, class P>
  static void moments(const B& backend, tensor_view<const T> x, index_t group_size, span<P> mean,
                      span<P> var, span<std::byte> scratch) {
    using namespace detail::cuda_impl;
    check_types<T, P>();
    const index_t C = x.channels(), G = x.batch() / group_size;
    if (G * C == 0) return;
    const reduction_shape rs = shape_of(x.shape(), group_size);
    const reduction_plan plan = plan_reduction(channels_last(x), rs);
    using R = moments_reducer<T>;
    auto* partial = partials<typename R::state>(scratch, G * C * plan.chunks);
    launch_reduction(backend.stream, R{{}, x}, rs, G, C, plan, partial, "bkn::moments");
    moments_merge_kernel<T, P><<<grid_for(G * C), block_threads, 0, backend.stream>>>(
        partial, G, C, plan.chunks, mean.data(), var.data());
    check_launch("bkn::moments");
  }

  template <class T, class P>
  static void covariance(const B& backend, tensor_view<const T> x, index_t group_size,
                         span<const P> mean, span<P> cov, span<std::byte> scratch) {
    using namespace detail::cuda_impl;
    check_types<T, P>();
    const index_t C = x.channels(), G = x.batch() / group_size;
    if (G * C == 0) return;
    const reduction_shape rs = shape_of(x.shape(), group_size);
    const index_t chunks = ceil_div(rs.values, covariance_chunk);
    using A = accum_t<T>;
    A* partial = partials<A>(scratch, G * chunks * C * C);
    if (chunks > 0) {
      covariance_chunk_kernel<T, P><<<grid_for(G * chunks * C * C), block_threads, 0,
                                      backend.stream>>>(x, rs, G, chunks, mean.data(), partial);
      check_launch("bkn::covariance");
    }
    covariance_merge_kernel<A, P><<<grid_for(G * C * C), block_threads, 0, backend.stream>>>(
        partial, G, C, chunks, rs.values, cov.data());
    check_launch("bkn::covariance");
  }

  template <class T, class P>
  static void sums(const B& backend, tensor_view<const T> dy, tensor_view<const T> x,
                   span<const P> centre, index_t group_size, span<P> sum_dy,
                   span<P> sum_dy_centred, span<std::byte> scratch) {
    using namespace detail::cuda_impl;
    check_types<T, P>();
    const index_t C = x.channels(), G = x.batch() / group_size;
    if (G * C == 0) return;
    const reduction_shape rs = shape_of(x.shape(), group_size);
    // Channels-last only when both tensors are: each kernel is correct for any strides, this
    // picks the one whose reads coalesce.
    const reduction_plan plan = plan_reduction(channels_last(x) && channels_last(dy), rs);
    using R = sums_reducer<T, P>;
    auto* partial = partials<typename R::state>(scratch, G * C * plan.chunks);
    launch_reduction(backend.stream, R{dy, x, centre.data()}, rs, G, C, plan, partial, "bkn::sums");
    sums_merge_kernel<T, P><<<grid_for(G * C), block_threads, 0, backend.stream>>>(
        partial, G, C, plan.chunks, sum_dy.data(), sum_dy_centred.data());
    check_launch("bkn::sums");
  }

  template <class T, class P>
  static void affine(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                     span<const P> centre, tensor_view<const T> v, span<const P> b,
                     span<const P> k, index_t group_size) {
    using namespace detail::cuda_impl;
    check_types<T, P>();
    const index_t count = out.shape().elements();
    if (count == 0) return;
    affine_kernel<T, P><<<grid_for(count), block_threads, 0, backend.stream>>>(
        out, u, v, a.data(), centre.data(), b.empty() ? nullptr : b.data(), k.data(), group_size,
        element_order{channels_last(out)});
    check_launch("bkn::affine");
  }

  template <class T, class P>
  static void mix(const B& backend, tensor_view<T> out, tensor_view<const T> u, span<const P> a,
                  tensor_view<const T> v, span<const P> matrix, span<const P> centre,
                  span<const P> k, index_t group_size) {
    using namespace detail::cuda_impl;
    check_types<T, P>();
    const index_t count = out.shape().elements();
    if (count == 0) return;
    mix_kernel<T, P><<<grid_for(count), block_threads, 0, backend.stream>>>(
        out, u, v, a.data(), matrix.data(), centre.data(), k.data(), group_size);
    check_launch("bkn::mix");
  }

  /// f is the core's BKN_HOST_DEVICE functor, copied to the device as a kernel argument.
  template <class F>
  static void for_each(const B& backend, index_t count, F f) {
    using namespace detail::cuda_impl;
    if (count <= 0) return;
    for_each_kernel<F><<<grid_for(count), block_threads, 0, backend.stream>>>(f, count);
    check_launch("bkn::for_each");
  }

 private:
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
