// SPDX-License-Identifier: MIT
// Helpers of the CUDA backend's tests: whether a device is there, device buffers that mirror
// host vectors, and the check of every CUDA call a test makes.
#pragma once

#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <vector>

namespace cuda_test {

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

#define BKN_CUDA_CHECK(call)                                                       \
  do {                                                                             \
    const cudaError_t bkn_cuda_check_e = (call);                                   \
    REQUIRE_MESSAGE(bkn_cuda_check_e == cudaSuccess, #call ": ",                   \
                    cudaGetErrorString(bkn_cuda_check_e));                         \
  } while (0)

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
