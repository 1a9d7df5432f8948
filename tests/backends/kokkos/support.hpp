// SPDX-License-Identifier: MIT
// Helpers of the Kokkos backend's tests: the OpenMP team size a pass really runs on, and the
// process's count of operator new calls (the counting operator new lives in main.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <Kokkos_Core.hpp>

#ifdef KOKKOS_ENABLE_OPENMP
#include <omp.h>
#endif

namespace kokkos_test {

/// operator new calls so far in this process; main.cpp replaces operator new to count them.
long allocations() noexcept;

#ifdef KOKKOS_ENABLE_OPENMP
struct team_size_probe {
  int* team;
  void operator()(std::int64_t i) const { team[i] = omp_get_num_threads(); }
};

/// Threads of the OpenMP team that runs a parallel_for on the calling thread's default OpenMP
/// instance (the whole pool, or a partition of it inside partition_master): measured, not asked,
/// so a test's output shows the thread count it exercised.
inline int openmp_team_size() {
  std::vector<int> team(64, 0);
  Kokkos::parallel_for(Kokkos::RangePolicy<Kokkos::OpenMP, Kokkos::IndexType<std::int64_t>>(0, 64),
                       team_size_probe{team.data()});
  return *std::max_element(team.begin(), team.end());
}
#endif

}  // namespace kokkos_test
