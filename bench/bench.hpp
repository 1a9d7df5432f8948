// SPDX-License-Identifier: MIT
// The benchmark suite's vocabulary: shape cases, what is timed, the minimal bytes each pass must
// move, and the host buffers (allocated and touched once per shape case, outside timing).
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <bkn/bkn.hpp>

namespace bkn_bench {

using bkn::index_t;

/// The buffers' alignment: 64 bytes, as frameworks align their tensors (PyTorch, oneDNN), the
/// buffers wherever the heap puts them; with --page-aligned, 4096, each at the start of a page.
/// glibc serves a fresh allocation of more than 128 KiB from mmap, 64 bytes into a page, so a
/// framework's new large tensors sit at one offset in their pages: rows of a multiple of 4 KiB,
/// of any of them, then share sets of L1 (docs/benchmarks.md, "What limits bkn"). Set before
/// the first allocation.
inline std::size_t buffer_alignment = 64;

template <class T>
struct aligned_allocator {
  using value_type = T;
  aligned_allocator() = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(buffer_alignment)));
  }
  void deallocate(T* p, std::size_t) noexcept {
    ::operator delete(p, std::align_val_t(buffer_alignment));
  }
  template <class U>
  bool operator==(const aligned_allocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const aligned_allocator<U>&) const noexcept { return false; }
};

/// A tensor's or a per-channel array's host buffer.
using buffer = std::vector<float, aligned_allocator<float>>;

/// Command-line switches of bkn_bench (everything else goes to Google Benchmark).
struct settings {
  bool smoke = false;      ///< --smoke: a few tiny shapes that still reach every code path
  bool huge = false;       ///< --huge: also the shapes and transitions marked huge
  /// --threads=N: the threads of the multi-threaded lines, Eigen's second line and the Kokkos
  /// OpenMP pool (whose size Kokkos fixes at initialization). The 1-thread lines are Eigen at 1
  /// thread and Kokkos::Serial.
  int threads = 2;
};

enum class layout { nchw, nhwc, nc };

/// One tensor shape of the suite, with its layout and statistics grouping.
struct shape_case {
  layout lay = layout::nchw;
  bkn::tensor_shape shape{};
  index_t group_size = 0;  ///< samples per statistics group; 0: the whole batch
  bool huge = false;       ///< registered only with --huge

  index_t elements() const { return shape.elements(); }
  index_t channels() const { return shape.channels; }
  /// Samples per group as the routines resolve it (0 -> N).
  index_t samples_per_group() const { return group_size > 0 ? group_size : shape.batch; }
  index_t groups() const { return shape.batch / samples_per_group(); }
  /// Only these run on the (slow, serial) reference backend.
  bool small() const { return elements() <= (index_t(1) << 19); }
  /// "32x64x56x56" or "128x1024" (NC).
  std::string shape_name() const;
  /// "NCHW/32x64x56x56/gs=2", "NC/128x1024/gs=all".
  std::string name() const;
};

/// The shape cases to register, in order (the table is in cases.cpp).
std::vector<shape_case> shape_cases(const settings& s);

/// What a benchmark times.
enum class op {
  moments,           ///< kernel: per-(group, channel) mean and variance (forward's observe)
  affine,            ///< kernel: y = a (x - centre) + k (forward's normalize)
  sums,              ///< kernel: sum dy, sum dy (x - centre) (backward's reduction)
  affine_v,          ///< kernel: dx = a (x - centre) + b dy + k (backward's elementwise pass)
  inference,         ///< bkn::forward with training = false, from the running statistics
  forward,           ///< bkn::forward, training
  backward,          ///< bkn::backward (after one untimed forward)
  forward_backward,  ///< bkn::forward then bkn::backward
};

/// How the layer of a forward/backward benchmark normalizes.
enum class method {
  bn,            ///< no prior: batch normalization (q = 1)
  bkn_identity,  ///< BKN, diagonal mode, A = I, prior = the previous layer's posterior
  bkn_dense,     ///< BKN, diagonal mode, dense C x C' A (C' = C)
  bkn_linear,    ///< BKN, diagonal mode, A through the host's linear layer + ReLU (NC only)
  bkn_conv,      ///< BKN, diagonal mode, A through the host's 3x3 convolution + ReLU (images)
  bkn_full,      ///< BKN, full covariance mode, A = I (C <= 256 only)
};

struct benchmark_kind {
  op what;
  method how = method::bn;  ///< used by forward, backward, forward_backward
};

/// The kinds registered for one case: the four kernels, inference, and forward, backward and
/// forward_backward for each method that applies (NC shapes add BKN-linear, images BKN-conv,
/// C <= 256 BKN-full).
std::vector<benchmark_kind> benchmark_kinds(const shape_case& c, const settings& s);

/// "moments", "inference", "forward_BN", "fwdbwd_BKN-dense", ...
std::string kind_name(const benchmark_kind& k);

/// Minimal bytes the operation must move, with E = elements, C = channels, G = groups and every
/// value a 4-byte float: each tensor read or written once, each per-channel array once.
///   forward (training), inference : 2E + 4C    read x, write y; gamma, beta, mean, var
///   backward                      : 3E + 5C    read x and dy, write dx; per-channel state
///   forward + backward            : 5E + 9C    the sum of the two
///   moments                       : E + 2GC    read x; write mean, var
///   affine                        : 2E + 3GC   read x, write y; read a, centre, k
///   sums                          : 2E + 3GC   read dy, x; read centre; write two sums
///   affine_v                      : 3E + 4GC   read dy, x, write dx; read a, centre, b, k
/// A forward that is two passes (statistics, then normalize) reads x twice, so once a tensor
/// outgrows the caches it moves 3E, not 2E: the minimal count is the yardstick, not a claim.
double minimal_bytes(op what, const shape_case& c);

/// Whether a peer library (oneDNN, libtorch) times kind `k`: batch normalization only, i.e.
/// inference and the BN forward, backward and forward + backward.
bool peer_kind(const benchmark_kind& k);

/// Elements of the STREAM-like baselines of a shape: a copy that moves the training forward's
/// minimal bytes (2n = 2E + 4C floats) and a triad that moves the backward's (3n ~ 3E + 5C).
index_t copy_elements(const shape_case& c);
index_t triad_elements(const shape_case& c);

/// A layer of one method for one shape case: its storage and, for BKN, a prior (the previous
/// layer's posterior, one per statistics group) and the gradient buffers for it.
struct layer_setup {
  layer_setup(const shape_case& c, method how);

  bkn::layer_storage<float> storage;
  bkn::layer<float> layer;
  std::vector<float> prior_mean, prior_var, dprior_mean, dprior_var;
  index_t prior_groups = 0, prior_channels = 0;

  /// Empty for BN.
  bkn::gaussian_view<const float> prior() const;
  bkn::gaussian_view<float> dprior();
  const bkn::transition<float>& transition() const { return layer.params.transition; }
};

/// Host buffers for one shape case: the tensors, per-(group, channel) coefficient arrays for
/// the kernels, a grow-only workspace and the layers, all touched before any timing.
class tensors {
 public:
  explicit tensors(const shape_case& c);

  const shape_case& shape() const { return case_; }
  /// Bytes held now (tensors, arrays, workspace, layers), for the cache's budget.
  std::size_t bytes() const;
  bkn::tensor_view<float> view(buffer& data) const;

  /// x, dy: inputs with a per-channel offset and scale; y, dx: outputs.
  buffer x, y, dy, dx;
  /// G*C arrays: statistics and coefficients of the kernel benchmarks.
  buffer mean, var, a, centre, b, k;

  /// `bytes` of 64-byte aligned workspace, reused (and grown) across the case's benchmarks.
  bkn::span<std::byte> workspace(std::size_t bytes);
  /// The case's layer of method `how`, made on first use.
  layer_setup& layer(method how);

 private:
  shape_case case_;
  std::size_t workspace_bytes_ = 0;
  std::unique_ptr<bkn::host_workspace> workspace_;
  std::map<method, std::unique_ptr<layer_setup>> layers_;
};

/// The buffers of case `c`, valid until the next call. Recently used cases are kept up to
/// cache_budget_bytes in all (always at least the current one), least recently used freed first
/// (the copy and triad buffers have a cache of their own):
/// benchmarks of one case are registered next to each other, and a run with
/// --benchmark_enable_random_interleaving over a filtered set rarely allocates again.
tensors& tensors_for(const shape_case& c);

inline constexpr std::size_t cache_budget_bytes = std::size_t(1) << 30;

/// Registers copy/<shape> and triad/<shape>, the STREAM-like baselines.
void register_baselines(const shape_case& c);

/// Registers read/<size>: a read-only sweep of working sets from L1 to memory (the bandwidth of
/// each level of the hierarchy).
void register_memory_sweep(const settings& s);

/// Adds the counters every benchmark reports: bytes_per_second (from `bytes` per iteration),
/// elements, threads.
void set_counters(benchmark::State& state, double bytes, index_t elements, int threads);

/// Times `op`: `setup` and two untimed calls first (the first validates the arguments and
/// touches every buffer, the second finds warm caches and an awake thread pool), then the loop,
/// with `sync` after each call (a fence, for asynchronous backends). `check`, run after the
/// untimed calls, returns an empty string or why the results are wrong (the benchmark then
/// reports that error instead of a time). Exceptions are reported the same way.
template <class Setup, class Op, class Sync, class Check>
void time_calls(benchmark::State& state, double bytes, index_t elements, int threads,
                Setup&& setup, Op&& op, Sync&& sync, Check&& check) {
  try {
    setup();
    sync();
    op();
    sync();
    op();
    sync();
    const std::string wrong = check();
    if (!wrong.empty()) {
      state.SkipWithError(wrong.c_str());
      return;
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  for (auto _ : state) {
    op();
    sync();
    benchmark::ClobberMemory();
  }
  set_counters(state, bytes, elements, threads);
}

/// Checks a peer's batch normalization on case `c` against bkn's reference backend (gamma 1,
/// beta 0, epsilon `epsilon`), on shapes small enough for it (shape_case::small(); larger ones
/// pass unchecked). The arrays are in the case's layout. Returns "" or what differs.
std::string check_bn_forward(const shape_case& c, double epsilon, const float* y);
/// dx of the BN backward for the dy of tensors_for(c), as bkn::backward computes it.
std::string check_bn_backward(const shape_case& c, double epsilon, const float* dx);
/// The moving mean and variance of channel `ch` the peers' inference benchmarks are given: the
/// distribution the inputs are drawn from (the kernel benchmarks overwrite tensors::mean, var).
float running_mean_of(index_t ch);
float running_var_of(index_t ch);
/// y = (x - running_mean_of(c)) / sqrt(running_var_of(c) + epsilon).
std::string check_bn_inference(const shape_case& c, double epsilon, const float* y);

// One function per backend file: registers the benchmark `k` of case `c` on that backend's
// lines (thread counts). Declared here, defined only where the backend is built.
void register_reference(const shape_case& c, const benchmark_kind& k, const settings& s);
#ifdef BKN_BENCH_EIGEN
void register_eigen(const shape_case& c, const benchmark_kind& k, const settings& s);
#endif
#ifdef BKN_BENCH_KOKKOS
void register_kokkos(const shape_case& c, const benchmark_kind& k, const settings& s);
#endif
// The peers: batch normalization of other libraries, on the kinds where peer_kind() holds.
#ifdef BKN_BENCH_ONEDNN
void register_onednn(const shape_case& c, const benchmark_kind& k, const settings& s);
std::string onednn_version();  ///< "2.6.3, JIT ISA avx512_core_bf16"
#endif
#ifdef BKN_BENCH_TORCH
void register_torch(const shape_case& c, const benchmark_kind& k, const settings& s);
std::string torch_version();  ///< "1.13.0, ATen parallel backend: OpenMP"
#endif

}  // namespace bkn_bench
