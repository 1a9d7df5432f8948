// SPDX-License-Identifier: MIT
// The CUDA backend's passes run on the CPU: the same pass code (bkn::detail::cuda_impl) with an
// executor that loops over every block and thread, calling each thread's share of the work, the
// per-element functors and the merges exactly as the kernels do, and a column-major GEMM in place
// of cuBLAS. Checks the index arithmetic, chunking, merge order, scratch layout and GEMM
// parameters without a GPU; launches, shuffles and cuBLAS itself need one (kernels.cu).
#include "bkn/backends/cuda.hpp"

#include <doctest/doctest.h>

#include <vector>

#include "passes.hpp"

namespace {

using bkn::index_t;
namespace impl = bkn::detail::cuda_impl;

/// Runs the passes' pieces on the calling thread, block by block and thread by thread.
struct host_executor {
  bool blas = false;

  template <class F>
  void for_each(index_t count, const F& f, const char*) const {
    for (index_t i = 0; i < count; ++i) f(i);
  }

  /// The two reduction kernels: every thread's state from the kernels' own per-thread function,
  /// then the kernels' combine order (block_combine's shuffle tree and warp order, or the
  /// channels-last rows in order).
  template <class R>
  void reduce_chunks(const R& reducer, const impl::reduction_shape& rs,
                     const impl::reduction_plan& plan, index_t channels,
                     typename R::state* partial, const char*) const {
    constexpr int threads = impl::block_threads, warp = impl::warp;
    std::vector<typename R::state> s(threads);
    for (index_t bx = 0; bx < plan.blocks_x; ++bx)
      for (index_t by = 0; by < plan.blocks_y; ++by) {
        if (plan.channels_last) {
          std::vector<index_t> channel(threads);
          for (int t = 0; t < threads; ++t)
            s[t] = impl::channels_last_thread(reducer, rs, channels, plan.chunks, bx, by, t,
                                              channel[t]);
          for (int lane = 0; lane < impl::tile_channels; ++lane) {
            if (channel[lane] >= channels) continue;
            for (int row = 1; row < impl::tile_rows; ++row)
              R::combine(s[lane], s[row * impl::tile_channels + lane]);
            partial[bx * channels + channel[lane]] = s[lane];
          }
        } else {
          for (int t = 0; t < threads; ++t)
            s[t] = impl::planes_thread(reducer, rs, channels, plan.chunks, bx, t);
          // __shfl_down_sync(delta) hands lane l the state of lane l + delta; ascending lanes
          // read their partner before it is updated in this round, as the shuffle does.
          for (int w = 0; w < threads / warp; ++w)
            for (int delta = warp / 2; delta > 0; delta /= 2)
              for (int lane = 0; lane + delta < warp; ++lane)
                R::combine(s[w * warp + lane], s[w * warp + lane + delta]);
          for (int w = 1; w < threads / warp; ++w) R::combine(s[0], s[w * warp]);
          partial[bx] = s[0];
        }
      }
  }

  bool has_blas() const { return blas; }

  /// C = op(A) op(B) with A = B = z, column-major, as cublasGemmStridedBatchedEx defines it,
  /// summed in A in order (coarser than cuBLAS's blocked sums: a pessimistic stand-in).
  template <class A>
  void gram(const impl::gram_gemm& p, const A* z, A* gram, const char*) const {
    for (index_t g = 0; g < p.batch; ++g) {
      const A* Z = z + g * p.stride;
      for (index_t col = 0; col < p.columns; ++col)
        for (index_t row = 0; row < p.rows; ++row) {
          A sum = 0;
          for (index_t l = 0; l < p.depth; ++l) {
            const A a = p.transpose_first ? Z[l + row * p.ld] : Z[row + l * p.ld];
            const A b = p.transpose_second ? Z[col + l * p.ld] : Z[l + col * p.ld];
            sum += a * b;
          }
          gram[g * p.stride_gram + row + col * p.ld_gram] = sum;
        }
    }
  }
};

struct emulated_backend {
  bool blas = false;
};

/// A stand-in handle for scratch_bytes, which only asks whether one is given; never used.
cublasHandle_t unused_handle() {
  static unsigned char byte = 0;
  return reinterpret_cast<cublasHandle_t>(&byte);
}

/// The kernels interface of kernels<cuda_backend>, over host_executor.
struct emulated_kernels {
  using B = emulated_backend;
  static bkn::cuda_backend sized_like(const B& b) {
    return {nullptr, b.blas ? unused_handle() : nullptr};
  }
  static std::size_t scratch_bytes(const B& b, const bkn::tensor_shape& x, index_t group_size,
                                   bkn::covariance mode) {
    return bkn::kernels<bkn::cuda_backend>::scratch_bytes(sized_like(b), x, group_size, mode);
  }
  template <class T, class P>
  static void moments(const B& b, bkn::tensor_view<const T> x, index_t group_size,
                      bkn::span<P> mean, bkn::span<P> var, bkn::span<std::byte> scratch) {
    impl::moments(host_executor{b.blas}, x, group_size, mean, var, scratch);
  }
  template <class T, class P>
  static void covariance(const B& b, bkn::tensor_view<const T> x, index_t group_size,
                         bkn::span<const P> mean, bkn::span<P> cov, bkn::span<std::byte> scratch) {
    impl::covariance(host_executor{b.blas}, x, group_size, mean, cov, scratch);
  }
  template <class T, class P>
  static void sums(const B& b, bkn::tensor_view<const T> dy, bkn::tensor_view<const T> x,
                   bkn::span<const P> centre, index_t group_size, bkn::span<P> sum_dy,
                   bkn::span<P> sum_dy_centred, bkn::span<std::byte> scratch) {
    impl::sums(host_executor{b.blas}, dy, x, centre, group_size, sum_dy, sum_dy_centred, scratch);
  }
  template <class T, class P>
  static void affine(const B& b, bkn::tensor_view<T> out, bkn::tensor_view<const T> u,
                     bkn::span<const P> a, bkn::span<const P> centre, bkn::tensor_view<const T> v,
                     bkn::span<const P> coef, bkn::span<const P> k, index_t group_size) {
    impl::affine(host_executor{b.blas}, out, u, a, centre, v, coef, k, group_size);
  }
  template <class T, class P>
  static void mix(const B& b, bkn::tensor_view<T> out, bkn::tensor_view<const T> u,
                  bkn::span<const P> a, bkn::tensor_view<const T> v, bkn::span<const P> matrix,
                  bkn::span<const P> centre, bkn::span<const P> k, index_t group_size) {
    impl::mix(host_executor{b.blas}, out, u, a, v, matrix, centre, k, group_size);
  }
};

using emulation = cuda_passes::runner<emulated_kernels, emulated_backend, cuda_test::host_memory>;


}  // namespace


TEST_CASE_TEMPLATE_DEFINE("cuda backend on the CPU: reductions, with and without cuBLAS, agree "
                          "with the reference",
                          Types, emulated_reductions) {
  using T = typename Types::element;
  using P = typename Types::parameter;
  SUBCASE("covariance kernels") { cuda_passes::check_reductions<T, P>(emulation{{false}, {}}); }
  SUBCASE("covariance through the GEMM") {
    cuda_passes::check_reductions<T, P>(emulation{{true}, {}});
  }
}
TEST_CASE_TEMPLATE_APPLY(emulated_reductions, cuda_passes::pass_types);

TEST_CASE_TEMPLATE_DEFINE("cuda backend on the CPU: elementwise passes agree with the reference",
                          Types, emulated_elementwise) {
  cuda_passes::check_elementwise<typename Types::element, typename Types::parameter>(emulation{});
}
TEST_CASE_TEMPLATE_APPLY(emulated_elementwise, cuda_passes::pass_types);

TEST_CASE_TEMPLATE("cuda backend on the CPU: float statistics far from zero keep their variance",
                   P, float, double) {
  SUBCASE("covariance kernels") { cuda_passes::check_far_from_zero<P>(emulation{{false}, {}}); }
  SUBCASE("covariance through the GEMM") {
    cuda_passes::check_far_from_zero<P>(emulation{{true}, {}});
  }
}

// scratch_bytes is host code: checked here, without a GPU, with and without a handle.
TEST_CASE("cuda backend: scratch for a group size covers its multiples") {
  conformance::check_scratch_covers_multiples(bkn::cuda_backend{});
  conformance::check_scratch_covers_multiples(bkn::cuda_backend{nullptr, unused_handle()});
}
