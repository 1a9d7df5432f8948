// SPDX-License-Identifier: MIT
// The Kokkos backend's lines: Kokkos::Serial (the 1-thread line) and Kokkos::OpenMP on the pool
// main() initialized (settings::threads threads; Kokkos fixes the pool size at initialization,
// so one process cannot time an OpenMP pool of 1 and of 2).
#ifdef BKN_BENCH_KOKKOS
#include <string>

#include <bkn/backends/kokkos.hpp>

#include "suite.hpp"

namespace bkn_bench {
namespace {

template <class Space>
void fence(const bkn::kokkos_backend<Space>& backend) {
  backend.space.fence();
}

}  // namespace

void register_kokkos(const shape_case& c, const benchmark_kind& k, const settings&) {
#ifdef KOKKOS_ENABLE_SERIAL
  static const backend_line<bkn::kokkos_backend<Kokkos::Serial>> serial{
      "kokkos-serial:t1", {}, 1, false, &fence<Kokkos::Serial>};
  add(serial, c, k);
#endif
#ifdef KOKKOS_ENABLE_OPENMP
  static const int pool = Kokkos::OpenMP().concurrency();
  static const backend_line<bkn::kokkos_backend<Kokkos::OpenMP>> openmp{
      "kokkos-openmp:t" + std::to_string(pool), {}, pool, false, &fence<Kokkos::OpenMP>};
  add(openmp, c, k);
#endif
  (void)c;
  (void)k;
}

}  // namespace bkn_bench
#endif
