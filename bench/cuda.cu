// SPDX-License-Identifier: MIT
// bkn_bench_cuda: batch normalization and BKN forward and backward on the GPU (cuda_backend),
// next to cuDNN's batch normalization on the same shapes, each also as a fraction of a
// device-to-device copy of the tensor timed in the same process. Without a GPU it prints
// "skipped: no CUDA device" and exits 0.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#ifdef BKN_BENCH_CUDNN
#include <cudnn.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <bkn/backends/cuda.hpp>
#include <bkn/bkn.hpp>

namespace {

using bkn::index_t;

// ---- errors: any failed CUDA, cuBLAS or cuDNN call skips the benchmark with its message ----

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + cublasGetStatusString(s));
}
#ifdef BKN_BENCH_CUDNN
void check(cudnnStatus_t s, const char* what) {
  if (s != CUDNN_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + cudnnGetErrorString(s));
}
#endif
#define BENCH_CHECK(call) check((call), #call)

// ---- shapes: ResNet-like images in both layouts and fully connected rows, over the whole batch
// and in statistics groups of 2 (BKN's micro-batches; cuDNN has no groups) ----

enum class layout { nchw, nhwc, nc };

struct gpu_case {
  layout lay;
  bkn::tensor_shape shape;
  index_t group_size;  // 0: the whole batch

  index_t elements() const { return shape.elements(); }
  index_t groups() const { return group_size > 0 ? shape.batch / group_size : 1; }
  std::string name() const {
    const char* l = lay == layout::nchw ? "NCHW" : lay == layout::nhwc ? "NHWC" : "NC";
    std::string s = std::string(l) + "/" + std::to_string(shape.batch) + "x" +
                    std::to_string(shape.channels);
    if (lay != layout::nc)
      s += "x" + std::to_string(shape.height) + "x" + std::to_string(shape.width);
    return s + "/gs=" + (group_size > 0 ? std::to_string(group_size) : std::string("all"));
  }
};

std::vector<gpu_case> gpu_cases(bool smoke) {
  const std::vector<bkn::tensor_shape> images =
      smoke ? std::vector<bkn::tensor_shape>{{4, 32, 24, 24}}
            : std::vector<bkn::tensor_shape>{{32, 64, 56, 56}, {256, 512, 7, 7},
                                             {8, 256, 14, 14}, {64, 64, 112, 112}};
  const std::vector<bkn::tensor_shape> rows =
      smoke ? std::vector<bkn::tensor_shape>{{64, 256, 1, 1}}
            : std::vector<bkn::tensor_shape>{{1024, 4096, 1, 1}, {128, 1024, 1, 1}};
  std::vector<gpu_case> cases;
  for (const auto& s : images)
    for (layout l : {layout::nchw, layout::nhwc})
      for (index_t gs : {index_t(0), index_t(2)}) cases.push_back({l, s, gs});
  for (const auto& s : rows)
    for (index_t gs : {index_t(0), index_t(2)}) cases.push_back({layout::nc, s, gs});
  return cases;
}

// ---- device memory ----

/// A device array of n floats, filled from the host once; freed on destruction.
class device_floats {
 public:
  explicit device_floats(const std::vector<float>& host) : size_(host.size()) {
    if (size_ == 0) return;
    BENCH_CHECK(cudaMalloc(&data_, size_ * sizeof(float)));
    BENCH_CHECK(cudaMemcpy(data_, host.data(), size_ * sizeof(float), cudaMemcpyHostToDevice));
  }
  device_floats(const device_floats&) = delete;
  device_floats& operator=(const device_floats&) = delete;
  ~device_floats() {
    if (data_ != nullptr) (void)cudaFree(data_);
  }
  float* data() const { return data_; }
  bkn::span<float> span() const { return {data_, index_t(size_)}; }

 private:
  float* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Deterministic inputs with a per-channel offset and scale, so statistics differ by channel.
std::vector<float> inputs(const gpu_case& c, std::uint32_t seed) {
  std::vector<float> v(std::size_t(c.elements()));
  const index_t C = c.shape.channels, S = c.shape.spatial();
  std::uint32_t state = seed;
  for (std::size_t i = 0; i < v.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    const float u = float(state >> 8) * (2.0f / 16777216.0f) - 1.0f;
    const index_t ch = c.lay == layout::nchw ? (index_t(i) / S) % C : index_t(i) % C;
    v[i] = 0.5f + 0.25f * float(ch % 5) + (1.0f + 0.5f * float(ch % 3)) * u;
  }
  return v;
}

/// x, dy, y, dx of one case in device memory.
struct device_tensors {
  explicit device_tensors(const gpu_case& c)
      : tensor_case(c), x(inputs(c, 1)), dy(inputs(c, 2)), y(std::vector<float>(x_size(c))),
        dx(std::vector<float>(x_size(c))) {}
  static std::size_t x_size(const gpu_case& c) { return std::size_t(c.elements()); }
  bkn::tensor_view<float> view(const device_floats& t) const {
    const bkn::tensor_shape& s = tensor_case.shape;
    if (tensor_case.lay == layout::nhwc)
      return bkn::nhwc(t.data(), s.batch, s.channels, s.height, s.width);
    return bkn::nchw(t.data(), s.batch, s.channels, s.height, s.width);
  }
  gpu_case tensor_case;
  device_floats x, dy, y, dx;
};

// ---- timing: CUDA events around each iteration, on the benchmark's own stream ----

class stream_timer {
 public:
  stream_timer() {
    BENCH_CHECK(cudaStreamCreate(&stream));
    BENCH_CHECK(cudaEventCreate(&start_));
    BENCH_CHECK(cudaEventCreate(&stop_));
  }
  stream_timer(const stream_timer&) = delete;
  stream_timer& operator=(const stream_timer&) = delete;
  ~stream_timer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
    (void)cudaStreamDestroy(stream);
  }
  /// Seconds one run of `op` takes on the stream.
  double seconds(const std::function<void()>& op) {
    BENCH_CHECK(cudaEventRecord(start_, stream));
    op();
    BENCH_CHECK(cudaEventRecord(stop_, stream));
    BENCH_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    BENCH_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return double(ms) * 1e-3;
  }
  cudaStream_t stream = nullptr;

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// Bytes per second of a device-to-device cudaMemcpyAsync of `elements` floats (counted as read
/// plus write), measured once per size in this process: the yardstick of every pass.
double copy_bandwidth(index_t elements) {
  static std::map<index_t, double> measured;
  auto it = measured.find(elements);
  if (it != measured.end()) return it->second;
  const std::vector<float> zeros(std::size_t(elements), 0.0f);
  const device_floats from(zeros), to(zeros);
  stream_timer timer;
  const std::size_t bytes = std::size_t(elements) * sizeof(float);
  const auto copy = [&] {
    BENCH_CHECK(cudaMemcpyAsync(to.data(), from.data(), bytes, cudaMemcpyDeviceToDevice,
                                timer.stream));
  };
  for (int i = 0; i < 3; ++i) timer.seconds(copy);
  double best = 1e30;
  for (int i = 0; i < 20; ++i) best = std::min(best, timer.seconds(copy));
  return measured[elements] = 2.0 * double(bytes) / best;
}

/// Runs `body`; an exception (a failed CUDA, cuBLAS or cuDNN call) skips the benchmark with its
/// message.
template <class F>
void guarded(benchmark::State& state, F body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

/// Runs the loop: setup and two untimed calls of `op`, then `op` timed per iteration. Counters:
/// bytes_per_second from the minimal bytes the operation must move, and fraction_of_copy, that
/// rate over the device-to-device copy's.
void time_loop(benchmark::State& state, stream_timer& timer, const gpu_case& c, double bytes,
               const std::function<void()>& setup, const std::function<void()>& op) {
  guarded(state, [&] {
    setup();
    for (int i = 0; i < 2; ++i) timer.seconds(op);
    double total = 0;
    for (auto _ : state) {
      const double s = timer.seconds(op);
      total += s;
      state.SetIterationTime(s);
    }
    state.SetBytesProcessed(std::int64_t(bytes * double(state.iterations())));
    const double rate = bytes * double(state.iterations()) / total;
    state.counters["fraction_of_copy"] = rate / copy_bandwidth(c.elements());
    state.counters["elements"] = double(c.elements());
  });
}

// Minimal bytes, as bench/bench.hpp counts them (E elements, C channels, 4-byte floats): a
// training forward reads x and writes y (2E + 4C), a backward reads x and dy and writes dx
// (3E + 5C). Two-pass implementations read x twice: the count is the yardstick, not a claim.
double forward_bytes(const gpu_case& c) {
  return 4.0 * (2.0 * double(c.elements()) + 4.0 * double(c.shape.channels));
}
double backward_bytes(const gpu_case& c) {
  return 4.0 * (3.0 * double(c.elements()) + 5.0 * double(c.shape.channels));
}

/// Times `forward`, or `backward` after one untimed forward (which gives it its state).
void time_pass(benchmark::State& state, stream_timer& timer, const gpu_case& c, bool backward,
               const std::function<void()>& forward, const std::function<void()>& run_backward) {
  if (backward)
    time_loop(state, timer, c, backward_bytes(c), forward, run_backward);
  else
    time_loop(state, timer, c, forward_bytes(c), [] {}, forward);
}

// ---- bkn: a layer's arrays in device memory ----

enum class method { bn, bkn, bkn_full };

const char* method_name(method m) {
  return m == method::bn ? "BN" : m == method::bkn ? "BKN" : "BKN-full";
}

/// One layer of `how` on device memory: batch normalization (no prior), BKN with A = I and a
/// prior per statistics group, or BKN's full-covariance mode. Initialized like layer_storage.
struct device_layer {
  device_layer(const gpu_case& c, method how) {
    bkn::layer_config cfg;
    cfg.channels = c.shape.channels;
    cfg.groups = c.groups();
    cfg.mode = how == method::bkn_full ? bkn::covariance::full : bkn::covariance::diagonal;
    const bkn::layer_storage<float> s(cfg);
    const index_t G = cfg.groups, C = cfg.channels;
    layer.params = {up(s.gamma), up(s.beta), up(s.gain_logit), bkn::transition<float>::identity(),
                    up(s.noise)};
    layer.grads = {up(s.dgamma), up(s.dbeta), up(s.dgain_logit), up(s.dnoise), {}, {}};
    layer.running = {up(s.running_mean), up(s.running_var), up(s.running_skipped)};
    using gaussian = bkn::gaussian_view<float>;
    layer.state.observed = gaussian(up(s.observed_mean), up(s.observed_cov), G, C);
    layer.state.predicted = gaussian(up(s.predicted_mean), up(s.predicted_cov), G, C);
    layer.state.posterior = gaussian(up(s.posterior_mean), up(s.posterior_cov), G, C);
    if (how == method::bn) return;
    // The previous layer's posterior: mean 0.2, variance 0.8 (full mode: diagonal matrices).
    std::vector<float> var = s.observed_cov;
    for (index_t i = 0; i < G * C; ++i)
      var[std::size_t(how == method::bkn_full ? i * C + i % C : i)] = 0.8f;
    prior = gaussian(up(std::vector<float>(std::size_t(G * C), 0.2f)), up(var), G, C);
    dprior = gaussian(up(s.observed_mean), up(s.observed_cov), G, C);
  }

  bkn::layer<float> layer;
  bkn::gaussian_view<float> prior, dprior;

 private:
  bkn::span<float> up(const std::vector<float>& host) {
    arrays_.push_back(std::make_unique<device_floats>(host));
    return arrays_.back()->span();
  }
  std::vector<std::unique_ptr<device_floats>> arrays_;
};

/// "forward" or "backward" of bkn on cuda_backend, with a cuBLAS handle if `with_blas` (it
/// serves full mode's covariance only).
void bkn_pass(benchmark::State& state, const gpu_case& c, method how, bool with_blas,
              bool backward) {
  guarded(state, [&] {
    stream_timer timer;
    cublasHandle_t blas = nullptr;
    if (with_blas) {
      BENCH_CHECK(cublasCreate(&blas));
      BENCH_CHECK(cublasSetStream(blas, timer.stream));
    }
    const std::unique_ptr<cublasContext, cublasStatus_t (*)(cublasHandle_t)> own_blas(
        blas, cublasDestroy);
    const bkn::cuda_backend backend{timer.stream, blas};
    const device_tensors t(c);
    const device_layer L(c, how);
    bkn::options opt;
    opt.group_size = c.group_size;
    opt.mode = how == method::bkn_full ? bkn::covariance::full : bkn::covariance::diagonal;
    const std::vector<float> zeros(bkn::workspace_size(backend, opt, c.shape) / sizeof(float) + 1);
    const device_floats workspace(zeros);  // cudaMalloc: 256-byte aligned
    const bkn::span<std::byte> ws(reinterpret_cast<std::byte*>(workspace.data()),
                                  index_t(zeros.size() * sizeof(float)));
    const bkn::tensor_view<const float> x = t.view(t.x), dy = t.view(t.dy);
    const bkn::gaussian_view<const float> prior = L.prior;
    const auto forward = [&] { bkn::forward(backend, opt, L.layer, x, t.view(t.y), prior, ws); };
    const auto run_backward = [&] {
      bkn::backward(backend, opt, L.layer, x, dy, t.view(t.dx), prior, L.dprior, ws);
    };
    time_pass(state, timer, c, backward, forward, run_backward);
  });
}

#ifdef BKN_BENCH_CUDNN
/// cuDNN's batch normalization of the same tensor: legacy cudnnBatchNormalizationForwardTraining
/// and cudnnBatchNormalizationBackward (deprecated in cuDNN 9, still shipped), spatial mode.
void cudnn_pass(benchmark::State& state, const gpu_case& c, cudnnBatchNormMode_t mode,
                bool backward) {
  guarded(state, [&] {
    stream_timer timer;
    cudnnHandle_t handle = nullptr;
    BENCH_CHECK(cudnnCreate(&handle));
    const std::unique_ptr<cudnnContext, cudnnStatus_t (*)(cudnnHandle_t)> own_handle(handle,
                                                                                      cudnnDestroy);
    BENCH_CHECK(cudnnSetStream(handle, timer.stream));
    cudnnTensorDescriptor_t x_desc = nullptr, bn_desc = nullptr;
    BENCH_CHECK(cudnnCreateTensorDescriptor(&x_desc));
    BENCH_CHECK(cudnnCreateTensorDescriptor(&bn_desc));
    const std::unique_ptr<cudnnTensorStruct, cudnnStatus_t (*)(cudnnTensorDescriptor_t)>
        own_x(x_desc, cudnnDestroyTensorDescriptor), own_bn(bn_desc, cudnnDestroyTensorDescriptor);
    const bkn::tensor_shape& s = c.shape;
    BENCH_CHECK(cudnnSetTensor4dDescriptor(
        x_desc, c.lay == layout::nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT,
        int(s.batch), int(s.channels), int(s.height), int(s.width)));
    BENCH_CHECK(cudnnDeriveBNTensorDescriptor(bn_desc, x_desc, mode));
    const device_tensors t(c);
    const std::size_t C = std::size_t(s.channels);
    const device_floats scale{std::vector<float>(C, 1.0f)}, bias{std::vector<float>(C, 0.0f)},
        running_mean{std::vector<float>(C, 0.0f)}, running_var{std::vector<float>(C, 1.0f)},
        saved_mean{std::vector<float>(C)}, saved_inv_var{std::vector<float>(C)},
        dscale{std::vector<float>(C)}, dbias{std::vector<float>(C)};
    const float one = 1, zero = 0;
    const double epsilon = 1e-5;
    const auto forward = [&] {
      BENCH_CHECK(cudnnBatchNormalizationForwardTraining(
          handle, mode, &one, &zero, x_desc, t.x.data(), x_desc, t.y.data(), bn_desc,
          scale.data(), bias.data(), 0.1, running_mean.data(), running_var.data(), epsilon,
          saved_mean.data(), saved_inv_var.data()));
    };
    const auto run_backward = [&] {
      BENCH_CHECK(cudnnBatchNormalizationBackward(
          handle, mode, &one, &zero, &one, &zero, x_desc, t.x.data(), x_desc, t.dy.data(),
          x_desc, t.dx.data(), bn_desc, scale.data(), dscale.data(), dbias.data(), epsilon,
          saved_mean.data(), saved_inv_var.data()));
    };
    time_pass(state, timer, c, backward, forward, run_backward);
  });
}
#endif

template <class F>
void add(const std::string& name, F run) {
  benchmark::RegisterBenchmark(name.c_str(), run)->UseManualTime()->Unit(benchmark::kMicrosecond);
}

void register_case(const gpu_case& c) {
  const std::string where = c.name();
  add("copy/" + where, [c](benchmark::State& state) {
    guarded(state, [&] {
      const std::vector<float> zeros(std::size_t(c.elements()), 0.0f);
      const device_floats from(zeros), to(zeros);
      stream_timer timer;
      const std::size_t bytes = zeros.size() * sizeof(float);
      time_loop(state, timer, c, 2.0 * double(bytes), [] {}, [&] {
        BENCH_CHECK(cudaMemcpyAsync(to.data(), from.data(), bytes, cudaMemcpyDeviceToDevice,
                                    timer.stream));
      });
    });
  });
  for (bool backward : {false, true}) {
    const std::string kind = backward ? "backward_" : "forward_";
    std::vector<method> methods = {method::bn, method::bkn};
    if (c.shape.channels <= 256) methods.push_back(method::bkn_full);
    for (method m : methods)
      for (bool blas : {false, true}) {
        if (blas && m != method::bkn_full) continue;
        add(kind + method_name(m) + (blas ? "/bkn-cuda-cublas/" : "/bkn-cuda/") + where,
            [c, m, blas, backward](benchmark::State& state) {
              bkn_pass(state, c, m, blas, backward);
            });
      }
#ifdef BKN_BENCH_CUDNN
    if (c.group_size != 0) continue;  // cuDNN normalizes over the whole batch only
    add(kind + "BN/cudnn/" + where, [c, backward](benchmark::State& state) {
      cudnn_pass(state, c, CUDNN_BATCHNORM_SPATIAL, backward);
    });
    add(kind + "BN/cudnn-persistent/" + where, [c, backward](benchmark::State& state) {
      cudnn_pass(state, c, CUDNN_BATCHNORM_SPATIAL_PERSISTENT, backward);
    });
#endif
  }
}

bool device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

void print_help() {
  std::printf(
      "bkn_bench_cuda: bkn's CUDA backend next to cuDNN (docs/cuda.md).\n"
      "Names: <kind>/<line>/<layout>/<shape>/gs=<samples per group|all>, copy/<...>.\n"
      "  kinds: forward_BN, backward_BN, forward_BKN, backward_BKN, forward_BKN-full, ...\n"
      "  lines: bkn-cuda, bkn-cuda-cublas (full mode's covariance through cuBLAS),\n"
      "         cudnn (CUDNN_BATCHNORM_SPATIAL), cudnn-persistent\n"
      "Counters: bytes_per_second (minimal bytes), fraction_of_copy (of a device-to-device\n"
      "cudaMemcpyAsync of the tensor in this process), elements.\n"
      "bkn_bench_cuda switches:\n"
      "  --smoke        tiny shapes only\n\n");
  benchmark::PrintDefaultHelp();
}

}  // namespace

int main(int argc, char** argv) {
  bool smoke = false, listing = false;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
      continue;
    }
    // Listing touches no device, so it works without one.
    listing |= std::strcmp(argv[i], "--benchmark_list_tests") == 0 ||
               std::strcmp(argv[i], "--benchmark_list_tests=true") == 0;
    argv[kept++] = argv[i];
  }
  argc = kept;
  benchmark::Initialize(&argc, argv, print_help);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  for (const gpu_case& c : gpu_cases(smoke)) register_case(c);
  if (!device_available() && !listing) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp p{};
  int device = 0;
  if (cudaGetDevice(&device) == cudaSuccess && cudaGetDeviceProperties(&p, device) == cudaSuccess)
    benchmark::AddCustomContext("cuda_device", std::string(p.name) + " (sm_" +
                                                   std::to_string(p.major) +
                                                   std::to_string(p.minor) + ")");
  int runtime = 0;
  (void)cudaRuntimeGetVersion(&runtime);
  benchmark::AddCustomContext("cuda_runtime", std::to_string(runtime));
#ifdef BKN_BENCH_CUDNN
  benchmark::AddCustomContext("cudnn", std::to_string(cudnnGetVersion()));
#else
  benchmark::AddCustomContext("cudnn", "not built (cudnn.h or libcudnn not found)");
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
