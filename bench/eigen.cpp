// SPDX-License-Identifier: MIT
// The Eigen backend's lines: 1 thread, and settings::threads OpenMP threads when built with
// OpenMP (eigen_backend runs tensors under 64 Ki elements on the calling thread regardless).
#ifdef BKN_BENCH_EIGEN
#include <string>

#include <bkn/backends/eigen.hpp>

#include "suite.hpp"

namespace bkn_bench {

void register_eigen(const shape_case& c, const benchmark_kind& k, const settings& s) {
  static const backend_line<bkn::eigen_backend> one{"eigen:t1", bkn::eigen_backend{1}, 1, false,
                                                    nullptr};
  add(one, c, k);
#ifdef _OPENMP
  if (s.threads > 1) {
    static const backend_line<bkn::eigen_backend> team{"eigen:t" + std::to_string(s.threads),
                                                       bkn::eigen_backend{s.threads}, s.threads,
                                                       false, nullptr};
    add(team, c, k);
  }
#else
  (void)s;
#endif
}

}  // namespace bkn_bench
#endif
