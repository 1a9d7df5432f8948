// SPDX-License-Identifier: MIT
// The Eigen backend on views whose samples lie more than 2^31 elements apart (64-bit offsets).
#include "bkn/backends/eigen.hpp"

#include "support/large_offsets.hpp"

TEST_CASE("eigen backend: offsets beyond 2^31 elements") {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    bkn_test::check_offsets_beyond_2_31(bkn::eigen_backend{threads, 1});
  }
}
