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
  // Many small groups of few pixels: kernels<eigen_backend>::group_chunk cuts them into several
  // chunks (the last one shorter) at 1 and 2 threads.
  const layer_case cases[] = {
      {2050, 128, 1, 1, 2, layout::nc, diag, bkn::transition_kind::identity, false, false, true},
      {2050, 128, 1, 1, 2, layout::nc, diag, bkn::transition_kind::dense, true, true, true},
      {1040, 128, 2, 1, 2, layout::nhwc, diag, bkn::transition_kind::diagonal, true, false, true},
      {1032, 128, 2, 2, 1, layout::nchw, diag, bkn::transition_kind::identity, true, true, true},
      {1040, 128, 1, 2, 2, layout::strided, diag, bkn::transition_kind::identity, false, false,
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
  const bkn::tensor_shape shapes[] = {{1024, 4096, 1, 1}, {128, 1024, 1, 1}, {4096, 96, 2, 2},
                                      {2048, 96, 1, 3},   {256, 512, 7, 7},  {64, 96, 9, 9}};
  int chunked = 0;
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
        const bkn::index_t pixels = group_size * x.height * x.width;
        const bkn::index_t per_group = pixels * x.channels;
        const bkn::index_t budget = std::max(
            backend.parallel_min_elements,
            bkn::index_t(bkn::detail::eigen_chunk_bytes / sizeof(double)) * backend.threads);
        // No chunks: a group has many pixels, or is more than half the budget.
        if (chunk == 0) {
          CHECK((pixels > bkn::detail::eigen_chunk_pixels || 2 * per_group > budget));
          continue;
        }
        ++chunked;
        CHECK(pixels <= bkn::detail::eigen_chunk_pixels);
        CHECK(chunk >= 2);
        CHECK(chunk % backend.threads == 0);
        CHECK(chunk * per_group >= backend.parallel_min_elements);
        CHECK((chunk - backend.threads) * per_group < budget);
      }
  CHECK(chunked >= 10);
}

TEST_CASE("eigen backend: chunks of groups only for groups of few pixels, of a size in bytes") {
  // Chunks pay where a group's per-channel arrays are of the size of its share of the tensor
  // (NC 8192x512 in groups of 2: forward + backward 0.75-0.86 of the time all at once takes),
  // and cost groups of many pixels (NCHW and NHWC 256x512x7x7 in groups of 2 and 4 at two
  // threads: 1.12-1.48), whatever the layout or the values' size.
  using K = bkn::kernels<bkn::eigen_backend>;
  for (const bkn::eigen_backend backend : {bkn::eigen_backend{1}, bkn::eigen_backend{2}}) {
    CAPTURE(backend.threads);
    for (bkn::index_t group_size : {1, 2, 4}) {
      CAPTURE(group_size);
      for (std::size_t bytes : {sizeof(float), sizeof(double)}) {
        CAPTURE(bytes);
        CHECK(K::group_chunk(backend, {256, 512, 7, 7}, group_size, bytes) == 0);
        CHECK(K::group_chunk(backend, {16, 512, 7, 7}, group_size, bytes) == 0);
      }
      // 16 MB of floats in rows of 2 KiB, a group's arrays as large as its rows.
      CHECK(K::group_chunk(backend, {8192, 512, 1, 1}, group_size, sizeof(float)) > 0);
    }
    CHECK(K::group_chunk(backend, {4096, 512, 2, 2}, 1, sizeof(float)) > 0);  // 4 pixels
    CHECK(K::group_chunk(backend, {4096, 512, 2, 2}, 2, sizeof(float)) == 0);  // 8
  }
  // The budget is in bytes: half as many groups of doubles as of floats.
  const bkn::eigen_backend one{1};
  const bkn::tensor_shape fc{1024, 4096, 1, 1};
  CHECK(K::group_chunk(one, fc, 2, sizeof(float)) == 8);
  CHECK(K::group_chunk(one, fc, 2, sizeof(double)) == 4);
}
