// SPDX-License-Identifier: MIT
// The CUDA backend's passes one by one on the device against the reference backend, with and
// without cuBLAS, for every storage type; bitwise repeatability; and passes that neither
// synchronize nor allocate. With no CUDA device every case reports "skipped".
#include "bkn/backends/cuda.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "passes.hpp"

// Functors launched as kernels need external linkage (bkn's kernels have hidden visibility).
namespace cuda_kernels_test {

/// Adds 1 to out[i]: every index visited exactly once leaves all ones.
struct visit_op {
  int* out;
  BKN_HOST_DEVICE void operator()(bkn::index_t i) const { out[i] += 1; }
};

}  // namespace cuda_kernels_test

namespace {

using bkn::index_t;
using cuda_kernels_test::visit_op;
using K = bkn::kernels<bkn::cuda_backend>;
using device_runner =
    cuda_passes::runner<K, bkn::cuda_backend, cuda_test::device_memory>;

device_runner on(const cuda_test::stream& stream, cublasHandle_t blas = nullptr) {
  return {{stream, blas}, {stream}};
}


/// A host callback that holds its stream until opened (or 20 s have passed, so that a pass that
/// does wait for the stream fails the test instead of hanging it).
struct gate {
  std::atomic<bool> open{false};
  static void CUDART_CB hold(void* self) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!static_cast<gate*>(self)->open.load() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
};

/// Device buffers for one call of every pass on an (8, 3, 20, 30) float tensor in groups of 2.
struct pass_buffers {
  static constexpr index_t N = 8, C = 3, H = 20, W = 30, group_size = 2, GC = N / 2 * C;
  cuda_test::device_vector<float> x{std::vector<float>(std::size_t(N * C * H * W), 1.5f)},
      dy{std::vector<float>(std::size_t(N * C * H * W), 0.5f)},
      out{std::vector<float>(std::size_t(N * C * H * W), 0.0f)};
  cuda_test::device_vector<double> mean{std::vector<double>(GC, 1.0)},
      var{std::vector<double>(GC, 1.0)}, cov{std::vector<double>(GC * C, -1.0)},
      s1{std::vector<double>(GC, 0.0)}, s2{std::vector<double>(GC, 0.0)},
      a{std::vector<double>(GC, 0.5)}, k{std::vector<double>(GC, 0.25)},
      m{std::vector<double>(GC * C, 0.125)};
  cuda_test::device_vector<int> visited{std::vector<int>(1000, 0)};
  cuda_test::device_vector<std::byte> scratch;
  explicit pass_buffers(std::size_t scratch_bytes) : scratch(scratch_bytes) {}

  bkn::tensor_view<const float> nhwc_x() const { return bkn::nhwc(x.data(), N, C, H, W); }
  bkn::tensor_view<const float> nchw_dy() const { return bkn::nchw(dy.data(), N, C, H, W); }
  bkn::span<double> span(const cuda_test::device_vector<double>& v) const {
    return {v.data(), index_t(v.size())};
  }
  bkn::span<std::byte> work() const { return {scratch.data(), index_t(scratch.size())}; }

  void reductions(const bkn::cuda_backend& b) const {
    K::moments<float, double>(b, nhwc_x(), group_size, span(mean), span(var), work());
    K::sums<float, double>(b, nchw_dy(), nhwc_x(), span(mean), group_size, span(s1), span(s2),
                           work());
  }
  void covariance(const bkn::cuda_backend& b) const {
    K::covariance<float, double>(b, nhwc_x(), group_size, span(mean), span(cov), work());
  }
  void elementwise(const bkn::cuda_backend& b) const {
    const auto o = bkn::nchw(out.data(), N, C, H, W);
    K::affine<float, double>(b, o, nchw_dy(), span(a), span(mean), nhwc_x(), span(a), span(k),
                             group_size);
    K::mix<float, double>(b, o, nchw_dy(), span(a), nhwc_x(), span(m), span(mean), span(k),
                          group_size);
    K::for_each(b, index_t(visited.size()), visit_op{visited.data()});
  }
};

}  // namespace


TEST_CASE_TEMPLATE_DEFINE("cuda backend: every reduction, with and without cuBLAS, agrees with "
                          "the reference",
                          Types, device_reductions) {
  BKN_REQUIRE_CUDA_DEVICE();
  using T = typename Types::element;
  using P = typename Types::parameter;
  MESSAGE("device: " << cuda_test::device_name());
  const cuda_test::stream stream;
  SUBCASE("covariance kernels") { cuda_passes::check_reductions<T, P>(on(stream)); }
  SUBCASE("covariance through cuBLAS") {
    const cuda_test::blas_handle blas(stream);
    cuda_passes::check_reductions<T, P>(on(stream, blas));
  }
}
TEST_CASE_TEMPLATE_APPLY(device_reductions, cuda_passes::pass_types);

TEST_CASE_TEMPLATE_DEFINE("cuda backend: every elementwise pass agrees with the reference", Types,
                          device_elementwise) {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  cuda_passes::check_elementwise<typename Types::element, typename Types::parameter>(on(stream));
}
TEST_CASE_TEMPLATE_APPLY(device_elementwise, cuda_passes::pass_types);

TEST_CASE_TEMPLATE("cuda backend: float statistics far from zero keep their variance", P, float,
                   double) {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  cuda_passes::check_far_from_zero<P>(on(stream));
  const cuda_test::blas_handle blas(stream);
  cuda_passes::check_far_from_zero<P>(on(stream, blas));
}

TEST_CASE("cuda backend: for_each visits every index once") {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  const bkn::cuda_backend b{stream};
  // More than the grid's 65535 blocks of 256 threads cover in one sweep: the grid-stride loop.
  for (index_t count : {index_t(0), index_t(1), index_t(100003), index_t(65535) * 256 + 77}) {
    CAPTURE(count);
    cuda_test::device_vector<int> out(std::vector<int>(std::size_t(count) + 1, 0));
    K::for_each(b, count, visit_op{out.data()});
    stream.synchronize();
    const std::vector<int> got = out.to_host();
    CHECK(std::count(got.begin(), got.end() - 1, 1) == count);
    CHECK(got.back() == 0);
  }
}

TEST_CASE_TEMPLATE("cuda backend: every pass gives the same bits twice", T, float, __half) {
  BKN_REQUIRE_CUDA_DEVICE();
  using P = float;
  const cuda_test::stream stream;
  const cuda_test::blas_handle blas(stream);
  for (const cuda_passes::pass_case& c : cuda_passes::reduction_cases()) {
    const std::string name = cuda_passes::describe(c);
    CAPTURE(name);
    std::mt19937 rng(4);
    const std::vector<double> x = cuda_passes::draw_values<T>(c, rng, 100, 3),
                              dy = cuda_passes::draw_values<T>(c, rng, 0, 1);
    const std::vector<P> centre = cuda_passes::group_means<P>(c, x);
    const auto run = [&](cublasHandle_t handle) {
      return on(stream, handle).template statistics_of<T, P>(
          cuda_passes::make_tensor<T>(c, c.first, 0, x),
          cuda_passes::make_tensor<T>(c, c.second, 0, dy), centre, c.group_size);
    };
    for (cublasHandle_t handle : {cublasHandle_t(nullptr), cublasHandle_t(blas)}) {
      const auto first = run(handle), second = run(handle);
      CHECK(first.mean == second.mean);
      CHECK(first.var == second.var);
      CHECK(first.cov == second.cov);
      CHECK(first.sum_dy == second.sum_dy);
      CHECK(first.sum_dy_centred == second.sum_dy_centred);
    }
  }
}

// A pass that synchronized (the stream or the device), or copied with cudaMemcpy, would wait for
// the gate, which holds the stream until every pass has been issued.
TEST_CASE("cuda backend: passes neither wait for the stream nor allocate") {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream;
  const cuda_test::blas_handle blas(stream);
  const bkn::cuda_backend plain{stream}, with_blas{stream, blas};
  const bkn::tensor_shape shape{pass_buffers::N, pass_buffers::C, pass_buffers::H,
                                pass_buffers::W};
  const pass_buffers buffers(
      std::max(K::scratch_bytes(plain, shape, pass_buffers::group_size, bkn::covariance::full),
               K::scratch_bytes(with_blas, shape, pass_buffers::group_size,
                                bkn::covariance::full)));
  // Once first: module loading and cuBLAS's first-call set-up are not the passes' doing.
  buffers.reductions(plain);
  buffers.covariance(plain);
  buffers.covariance(with_blas);
  buffers.elementwise(plain);
  stream.synchronize();

  gate g;
  BKN_CUDA_CHECK(cudaLaunchHostFunc(stream, gate::hold, &g));
  const auto start = std::chrono::steady_clock::now();
  const long before = cuda_test::allocations();
  buffers.reductions(plain);
  buffers.covariance(plain);
  buffers.elementwise(plain);
  const long bkn_allocations = cuda_test::allocations() - before;
  buffers.covariance(with_blas);
  const long blas_allocations = cuda_test::allocations() - before - bkn_allocations;
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const cudaError_t still_held = cudaStreamQuery(stream);
  g.open = true;
  stream.synchronize();

  CHECK(still_held == cudaErrorNotReady);
  CHECK(seconds < 10);
  CHECK(bkn_allocations == 0);
  MESSAGE("host allocations in the cuBLAS covariance (cuBLAS's own): " << blas_allocations);
  const std::vector<int> visited = buffers.visited.to_host();
  CHECK(std::count(visited.begin(), visited.end(), 2) == index_t(visited.size()));  // twice
}

// bkn binds the caller's handle to the backend's stream, with host pointers, for the call only.
TEST_CASE("cuda backend: a cuBLAS handle on another stream and in device pointer mode is used "
          "and restored") {
  BKN_REQUIRE_CUDA_DEVICE();
  const cuda_test::stream stream, other;
  const cuda_test::blas_handle blas(other);
  BKN_CUDA_CHECK(cublasSetPointerMode(blas, CUBLAS_POINTER_MODE_DEVICE));
  const bkn::cuda_backend with_blas{stream, blas};
  const bkn::tensor_shape shape{pass_buffers::N, pass_buffers::C, pass_buffers::H,
                                pass_buffers::W};
  const pass_buffers buffers(
      K::scratch_bytes(with_blas, shape, pass_buffers::group_size, bkn::covariance::full));
  buffers.reductions(with_blas);
  buffers.covariance(with_blas);
  stream.synchronize();

  cudaStream_t bound = nullptr;
  cublasPointerMode_t mode = CUBLAS_POINTER_MODE_HOST;
  BKN_CUDA_CHECK(cublasGetStream(blas, &bound));
  BKN_CUDA_CHECK(cublasGetPointerMode(blas, &mode));
  CHECK(bound == static_cast<cudaStream_t>(other));
  CHECK(mode == CUBLAS_POINTER_MODE_DEVICE);
  // x is constant: every covariance is 0 (exactly: x - mean is 0 in every product).
  const std::vector<double> cov = buffers.cov.to_host();
  CHECK(std::count(cov.begin(), cov.end(), 0.0) == index_t(cov.size()));
}
