// SPDX-License-Identifier: MIT
// batch_norm, batch_renorm and memorized_batch_norm on the Eigen backend (1 and 2 threads)
// against the reference backend: training steps, a refresh, both inference modes, every output.
#include "../methods_batch.hpp"
#include "bkn/backends/eigen.hpp"

TEST_CASE_TEMPLATE("eigen backend: batch-statistics methods agree with the reference", T, float,
                   double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    methods_batch::check_against_reference<T>(bkn::eigen_backend{threads, 1}, 60);
  }
}
