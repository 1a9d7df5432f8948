// SPDX-License-Identifier: MIT
// The per-sample methods (group, layer and instance normalization, filter response
// normalization) on the Eigen backend against the reference backend: outputs, saved statistics
// and every gradient over shapes, layouts (strided views included), group counts, float and
// double, 1 and 2 threads; bitwise repeatable; the workspace is never overrun.

#include "../methods_sample.hpp"
#include "bkn/backends/eigen.hpp"

using namespace methods_sample;

TEST_CASE_TEMPLATE("eigen backend: group / layer / instance norm and FRN agree with the reference",
                   T, float, double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    check_against_reference<T>(bkn::eigen_backend{threads, 1}, 200);
  }
}

TEST_CASE_TEMPLATE("eigen backend: the per-sample methods are bitwise repeatable", T, float,
                   double) {
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    check_deterministic<T>(bkn::eigen_backend{threads, 1}, 60);
  }
}

TEST_CASE("eigen backend: the sweep covers every layout, group count and FRN variant") {
  const std::vector<sample_case> cases = sweep(200);
  auto count = [&](auto predicate) { return std::count_if(cases.begin(), cases.end(), predicate); };
  for (layout l : {layout::nc, layout::nchw, layout::nhwc, layout::rows, layout::padded,
                   layout::padded_last})
    CHECK(count([&](const sample_case& c) { return c.storage == l; }) >= 5);
  CHECK(count([](const sample_case& c) { return c.groups == 1 && c.C > 1; }) >= 5);
  CHECK(count([](const sample_case& c) { return c.groups == c.C && c.C > 1; }) >= 5);
  CHECK(count([](const sample_case& c) { return c.groups > 1 && c.groups < c.C; }) >= 5);
  CHECK(count([](const sample_case& c) { return c.N == 1; }) >= 5);
  for (int learned : {0, 1, 2})
    for (bool tlu : {false, true})
      CHECK(count([&](const sample_case& c) { return c.learned == learned && c.tlu == tlu; }) >= 5);
}
