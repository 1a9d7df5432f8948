// SPDX-License-Identifier: MIT
// The C++ half of the link test, with the program's main(): a host translation unit that
// includes bkn, linked with link.cu into one program. Runs without a GPU: it checks that the
// program links (no duplicate or missing symbols between nvcc's and the host compiler's objects)
// and that both halves compute the same thing on the host.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstring>

#include "link.hpp"

TEST_CASE("cuda link: a .cu and a .cpp translation unit including bkn link into one program") {
  const bkn::index_t N = 4, C = 3;
  std::vector<float> x(std::size_t(N * C));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i % 5) - 1.5f * float(i % 3);
  const std::vector<float> from_cpp = link_test::forward_on_reference(x, N, C);
  const std::vector<float> from_cu = link_test::forward_cu(x, N, C);
  CHECK(from_cu == from_cpp);
  CHECK(link_test::cuda_workspace_bytes(N, C) > 0);
}

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  return context.run();
}
