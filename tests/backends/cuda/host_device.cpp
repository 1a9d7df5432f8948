// SPDX-License-Identifier: MIT
// The core's host/device functors (the per-channel math cuda_backend runs in for_each_kernel)
// and the Welford combine tree of its reductions, exercised on the CPU: runs without a GPU.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "bkn/backends/reference.hpp"
#include "bkn/bkn.hpp"
#include "bkn/math/welford.hpp"

namespace {

using bkn::index_t;
using K = bkn::kernels<bkn::reference_backend>;

}  // namespace

TEST_CASE("cuda backend host/device functors: copy, fill and coefficients on the host") {
  const bkn::reference_backend b{};
  std::vector<double> from{1, 2, 3, 4, 5, 6}, to(6, 0);
  K::for_each(b, 6, bkn::detail::copy_op<double>{from.data(), to.data()});
  CHECK(to == from);
  K::for_each(b, 6, bkn::detail::fill_op<double>{to.data(), -1.0});
  CHECK(to == std::vector<double>(6, -1.0));

  // Two groups of three channels, diagonal covariance: a = gamma / sqrt(var + eps), k = beta.
  const std::vector<float> gamma{1, 2, 3}, beta{0.5f, 0, -1}, mean(6, 0), var{1, 4, 9, 0, 3, 15};
  std::vector<float> a(6), k(6);
  K::for_each(b, 6,
              bkn::detail::normalize_coefficients_op<float>{gamma.data(), beta.data(), mean.data(),
                                                            var.data(), 3, 1, 1.0, a.data(),
                                                            k.data()});
  for (index_t i = 0; i < 6; ++i) {
    CAPTURE(i);
    CHECK(a[std::size_t(i)] == doctest::Approx(gamma[std::size_t(i % 3)] /
                                               std::sqrt(var[std::size_t(i)] + 1.0)));
    CHECK(k[std::size_t(i)] == beta[std::size_t(i % 3)]);
  }
}

// cuda_backend reduces a (group, channel) as per-thread Welford states combined by a warp
// shuffle tree (lane l takes l + delta, delta = 16, 8, 4, 2, 1), then warps in order, then
// chunks in order. The same tree on the CPU, in float, against a long double two-pass.
TEST_CASE("cuda backend host/device functors: the shuffle-tree Welford combine keeps float accuracy") {
  std::mt19937 rng(3);
  std::normal_distribution<double> normal;
  const int threads = 256, warp = 32;
  const index_t chunk = 4096, values = 3 * chunk + 1000;
  std::vector<float> x(static_cast<std::size_t>(values));
  for (auto& v : x) v = float(1e4 + normal(rng));

  bkn::welford<float> total;
  for (index_t first = 0; first < values; first += chunk) {
    std::vector<bkn::welford<float>> state(threads);
    for (index_t j = first; j < std::min(first + chunk, values); ++j)
      state[std::size_t((j - first) % threads)].add(x[std::size_t(j)]);
    for (int w = 0; w < threads / warp; ++w)
      for (int delta = warp / 2; delta > 0; delta /= 2)
        for (int lane = 0; lane + delta < warp; ++lane)
          state[std::size_t(w * warp + lane)].combine(state[std::size_t(w * warp + lane + delta)]);
    bkn::welford<float> block = state[0];
    for (int w = 1; w < threads / warp; ++w) block.combine(state[std::size_t(w * warp)]);
    total.combine(block);
  }

  long double sum = 0, m2 = 0;
  for (float v : x) sum += v;
  const long double mean = sum / values;
  for (float v : x) m2 += (v - mean) * (v - mean);
  const double want_mean = double(mean), want_var = double(m2 / values);
  CHECK(std::abs(double(total.mean) - want_mean) <= 1e-6 * want_mean);
  CHECK(std::abs(double(total.variance()) - want_var) <= 1e-3 * want_var);
}
