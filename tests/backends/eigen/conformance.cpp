// SPDX-License-Identifier: MIT
// The conformance suite on the Eigen backend, with 1 and 2 threads.
#include "bkn/backends/eigen.hpp"

#include "../conformance.hpp"

TEST_CASE_TEMPLATE("eigen backend: whole layer agrees with the reference", T, float, double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    conformance::check_against_reference<T>(bkn::eigen_backend{threads}, 200);
  }
}

TEST_CASE_TEMPLATE("eigen backend: repeated runs are bitwise identical", T, float, double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    conformance::check_deterministic<T>(bkn::eigen_backend{threads}, 60);
  }
}
