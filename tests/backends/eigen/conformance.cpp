// SPDX-License-Identifier: MIT
// The conformance suite on the Eigen backend, with 1 and 2 threads (parallel_min_elements = 1:
// the small shapes of the sweep take the threaded paths too).
#include "bkn/backends/eigen.hpp"

#include "../conformance.hpp"

TEST_CASE_TEMPLATE("eigen backend: whole layer agrees with the reference", T, float, double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    conformance::check_against_reference<T>(bkn::eigen_backend{threads, 1}, 200);
  }
}

TEST_CASE_TEMPLATE("eigen backend: repeated runs are bitwise identical", T, float, double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    conformance::check_deterministic<T>(bkn::eigen_backend{threads, 1}, 60);
  }
}

TEST_CASE_TEMPLATE("eigen backend: layers run in chunks of groups agree with the reference", T,
                   float, double) {
  using conformance::layer_case;
  using conformance::layout;
  const auto diag = bkn::covariance::diagonal;
  // Many small groups: kernels<eigen_backend>::group_chunk cuts them into several chunks (the
  // last one shorter) at 1 and 2 threads.
  const layer_case cases[] = {
      {2050, 128, 1, 1, 2, layout::nc, diag, bkn::transition_kind::identity, false, false, true},
      {2050, 128, 1, 1, 2, layout::nc, diag, bkn::transition_kind::dense, true, true, true},
      {1040, 16, 4, 4, 2, layout::nhwc, diag, bkn::transition_kind::diagonal, true, false, true},
      {1032, 16, 4, 4, 4, layout::nchw, diag, bkn::transition_kind::identity, true, true, true},
      {1040, 16, 4, 4, 2, layout::strided, diag, bkn::transition_kind::identity, false, false,
       true},
  };
  const double tolerance = std::is_same_v<T, double> ? 1e-10 : 2e-4;
  for (const layer_case& c : cases)
    for (int threads : {1, 2}) {
      const std::string name = conformance::describe(c);
      CAPTURE(name);
      CAPTURE(threads);
      const bkn::eigen_backend backend{threads};
      const bkn::index_t G = c.batch / c.group_size;
      const bkn::index_t chunk = bkn::kernels<bkn::eigen_backend>::group_chunk(
          backend, {c.batch, c.channels, c.height, c.width}, c.group_size, sizeof(T));
      REQUIRE(chunk > 0);
      REQUIRE(chunk < G);
      conformance::check_close(
          conformance::run_layer<bkn::eigen_backend, T, T>(backend, c, 17),
          conformance::run_layer<bkn::reference_backend, T, T>(bkn::reference_backend{}, c, 17),
          tolerance);
    }
}

TEST_CASE("eigen backend: a chunk of groups for two threads is large enough to be shared") {
  // A chunk under parallel_min_elements would run every pass on the calling thread: two
  // threads would then be no faster than one (NHWC 256x512x7x7 in groups of 2 was, before the
  // chunk was rounded up). An odd chunk would leave one thread of the reductions idle part of
  // the time (NHWC 256x512x7x7 in groups of 4 had chunks of 3 groups).
  // Doubles: the rows of 256x512x7x7 are then 4 KiB, which the statistics do not prefetch,
  // so that it is cut into chunks (see the next test).
  const bkn::tensor_shape shapes[] = {
      {256, 512, 7, 7}, {32, 64, 56, 56}, {1024, 4096, 1, 1}, {128, 1024, 1, 1}, {64, 96, 9, 9}};
  for (const bkn::eigen_backend backend : {bkn::eigen_backend{2}, bkn::eigen_backend{2, 100000}})
    for (const bkn::tensor_shape& x : shapes)
      for (bkn::index_t group_size : {1, 2, 4}) {
        CAPTURE(x.batch);
        CAPTURE(x.channels);
        CAPTURE(x.height);
        CAPTURE(group_size);
        CAPTURE(backend.parallel_min_elements);
        const bkn::index_t chunk =
            bkn::kernels<bkn::eigen_backend>::group_chunk(backend, x, group_size, sizeof(double));
        const bkn::index_t per_group = group_size * x.channels * x.height * x.width;
        // No chunks: a group is more than half the budget, or the rows are prefetched.
        if (chunk == 0) {
          CHECK((2 * per_group > backend.parallel_min_elements ||
                 bkn::detail::eigen_prefetch_rows(x.channels, x.elements(), sizeof(double)) > 0));
          continue;
        }
        CHECK(chunk >= 2);
        CHECK(chunk % backend.threads == 0);
        CHECK(chunk * per_group >= backend.parallel_min_elements);
        const bkn::index_t budget = std::max(backend.parallel_min_elements,
                                             bkn::detail::eigen_chunk_values * backend.threads);
        CHECK((chunk - backend.threads) * per_group < budget);
      }
}

TEST_CASE("eigen backend: no chunks of groups where the statistics prefetch short rows") {
  // A chunk is too small for its rows to be prefetched; the whole tensor, prefetched, is faster
  // (NHWC 256x512x7x7 in groups of 2 and 4 at two threads: forward 0.60-0.61, backward
  // 0.68-0.72 of the time in chunks).
  using K = bkn::kernels<bkn::eigen_backend>;
  const bkn::eigen_backend backend{2};
  const bkn::tensor_shape large{256, 512, 7, 7}, small{16, 512, 7, 7};
  for (bkn::index_t group_size : {1, 2, 4}) {
    CAPTURE(group_size);
    CHECK(K::group_chunk(backend, large, group_size, sizeof(float)) == 0);  // 2 KiB rows, 25 MB
    CHECK(K::group_chunk(backend, large, group_size, sizeof(double)) > 0);  // 4 KiB rows
    CHECK(K::group_chunk(backend, small, group_size, sizeof(float)) > 0);   // 1.6 MB: in cache
  }
}
