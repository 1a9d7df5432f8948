// SPDX-License-Identifier: MIT
// Helpers of the CUDA backend's tests: whether a device is there, streams, cuBLAS handles,
// buffers that mirror host vectors and views, and the check of every CUDA call a test makes.
#pragma once

#include <doctest/doctest.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "bkn/tensor.hpp"

namespace cuda_test {

/// operator new calls so far on the calling thread (main.cpp replaces operator new to count
/// them; the CUDA runtime's own threads are not counted).
long allocations() noexcept;

/// The element type a reference run uses for device storage T, and the per-channel type of the
/// runs: float for float and 16-bit storage, double for double.
template <class T>
using wide_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// True when the CUDA runtime sees at least one device. No driver, no device and a driver too
/// old for this runtime all count as none.
inline bool device_available() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error of a missing driver
    return false;
  }
  return count > 0;
}

/// The device a test runs on, in words.
inline std::string device_name() {
  cudaDeviceProp p{};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&p, device) != cudaSuccess)
    return "?";
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ")";
}

inline bool succeeded(cudaError_t e) { return e == cudaSuccess; }
inline bool succeeded(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }
inline const char* describe(cudaError_t e) { return cudaGetErrorString(e); }
inline const char* describe(cublasStatus_t s) { return cublasGetStatusString(s); }

/// Requires a CUDA runtime or cuBLAS call to succeed, naming it and its error otherwise.
#define BKN_CUDA_CHECK(call)                                                        \
  do {                                                                              \
    const auto bkn_cuda_check_result = (call);                                      \
    REQUIRE_MESSAGE(cuda_test::succeeded(bkn_cuda_check_result), #call ": ",        \
                    cuda_test::describe(bkn_cuda_check_result));                    \
  } while (0)

/// A stream of the test's own; destroyed with it. A blocking stream (not cudaStreamNonBlocking):
/// the tests' cudaMemcpy run on the legacy default stream, which then orders them with the
/// stream's kernels (a pageable host-to-device copy may return before its DMA is done).
class stream {
 public:
  stream() { BKN_CUDA_CHECK(cudaStreamCreate(&stream_)); }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }
  operator cudaStream_t() const noexcept { return stream_; }  // NOLINT: used as a stream
  void synchronize() const { BKN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_ = nullptr;
};

/// A cuBLAS handle bound to `s`, as bkn's documentation asks callers to give it.
class blas_handle {
 public:
  explicit blas_handle(cudaStream_t s) {
    BKN_CUDA_CHECK(cublasCreate(&handle_));
    BKN_CUDA_CHECK(cublasSetStream(handle_, s));
  }
  blas_handle(const blas_handle&) = delete;
  blas_handle& operator=(const blas_handle&) = delete;
  ~blas_handle() {
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
  }
  operator cublasHandle_t() const noexcept { return handle_; }  // NOLINT: used as a handle

 private:
  cublasHandle_t handle_ = nullptr;
};

/// Device memory holding a copy of a host vector; freed on destruction.
template <class T>
class device_vector {
 public:
  device_vector() = default;
  explicit device_vector(std::size_t size) : size_(size) {
    if (size_ > 0) BKN_CUDA_CHECK(cudaMalloc(&data_, size_ * sizeof(T)));
  }
  explicit device_vector(const std::vector<T>& host) : device_vector(host.size()) {
    if (size_ > 0)
      BKN_CUDA_CHECK(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  device_vector(const device_vector&) = delete;
  device_vector& operator=(const device_vector&) = delete;
  device_vector(device_vector&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  ~device_vector() {
    if (data_ != nullptr) (void)cudaFree(data_);
  }

  T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::vector<T> to_host() const {
    std::vector<T> host(size_);
    if (size_ > 0)
      BKN_CUDA_CHECK(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// The host counterpart of device_vector: a copy of a host vector behind the same interface, for
/// test code written once over both memories.
template <class T>
class host_vector {
 public:
  explicit host_vector(const std::vector<T>& host) : data_(host) {}
  T* data() noexcept { return data_.data(); }
  std::size_t size() const noexcept { return data_.size(); }
  std::vector<T> to_host() const { return data_; }

 private:
  std::vector<T> data_;
};

/// Where a test's buffers live: host_vector or device_vector, and how to wait for the passes.
struct host_memory {
  template <class T>
  using buffer = host_vector<T>;
  void synchronize() const {}
};
struct device_memory {
  cudaStream_t stream = nullptr;
  template <class T>
  using buffer = device_vector<T>;
  void synchronize() const { BKN_CUDA_CHECK(cudaStreamSynchronize(stream)); }
};

/// A copy of a host view and the memory around it in `Buffer` (device memory by default): the
/// same shape, strides and offset into its memory, so that a pass writing the gaps between the
/// view's elements is seen.
template <class T, class Buffer = device_vector<T>>
struct mirrored_tensor {
  Buffer memory;
  bkn::tensor_view<T> view;
  mirrored_tensor(const std::vector<T>& host_memory, const bkn::tensor_view<T>& host_view)
      : memory(host_memory),
        view(memory.data() + (host_view.data() - host_memory.data()), host_view.shape(),
             host_view.strides()) {}
  bkn::tensor_view<const T> cview() const { return view; }
};

}  // namespace cuda_test

/// The first statement of every test case that needs a GPU: with none, the case reports
/// "skipped: no CUDA device" (ctest shows it as Skipped) and returns.
#define BKN_REQUIRE_CUDA_DEVICE()               \
  do {                                          \
    if (!cuda_test::device_available()) {       \
      MESSAGE("skipped: no CUDA device");       \
      return;                                   \
    }                                           \
  } while (0)
