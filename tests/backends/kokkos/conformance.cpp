// SPDX-License-Identifier: MIT
// The conformance suite on the Kokkos backend (Serial; OpenMP when Kokkos has it), and the
// bitwise independence of its results from the execution space and the OpenMP thread count.
#include "bkn/backends/kokkos.hpp"

#include <cstring>

#include "../conformance.hpp"
#include "support.hpp"

namespace {

template <class T>
using results = std::vector<conformance::run_result<T, T>>;

template <class T, class Backend>
results<T> run_sweep(const Backend& backend, std::size_t count) {
  results<T> r;
  for (const conformance::layer_case& c : conformance::sweep(count))
    r.push_back(conformance::run_layer<Backend, T, T>(backend, c, 7));
  return r;
}

// memcmp, not ==: -0.0 == 0.0, and "the same result" here means the same bits.
template <class V>
bool same_bits(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0);
}

template <class T>
void check_same_bits(const results<T>& got, const results<T>& want) {
  REQUIRE(got.size() == want.size());
  const std::vector<conformance::layer_case> cases = conformance::sweep(got.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(conformance::describe(cases[i]));
    CHECK(same_bits(got[i].y, want[i].y));
    CHECK(same_bits(got[i].dx, want[i].dx));
    REQUIRE(got[i].per_channel.size() == want[i].per_channel.size());
    for (std::size_t k = 0; k < got[i].per_channel.size(); ++k) {
      CAPTURE(k);
      CHECK(same_bits(got[i].per_channel[k], want[i].per_channel[k]));
    }
  }
}

}  // namespace

#ifdef KOKKOS_ENABLE_SERIAL
using serial_backend = bkn::kokkos_backend<Kokkos::Serial>;
#endif
#ifdef KOKKOS_ENABLE_OPENMP
using openmp_backend = bkn::kokkos_backend<Kokkos::OpenMP>;
#endif

TEST_CASE_TEMPLATE("kokkos backend (Serial): whole layer agrees with the reference", T, float,
                   double) {
#ifdef KOKKOS_ENABLE_SERIAL
  conformance::check_against_reference<T>(serial_backend{}, 200);
#else
  MESSAGE("skipped: this Kokkos has no Serial execution space");
#endif
}

TEST_CASE_TEMPLATE("kokkos backend (Serial): repeated runs are bitwise identical", T, float,
                   double) {
#ifdef KOKKOS_ENABLE_SERIAL
  conformance::check_deterministic<T>(serial_backend{}, 60);
#else
  MESSAGE("skipped: this Kokkos has no Serial execution space");
#endif
}

TEST_CASE_TEMPLATE("kokkos backend (OpenMP): whole layer agrees with the reference", T, float,
                   double) {
#ifdef KOKKOS_ENABLE_OPENMP
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads");
  conformance::check_against_reference<T>(openmp_backend{}, 200);
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space");
#endif
}

TEST_CASE_TEMPLATE("kokkos backend (OpenMP): repeated runs are bitwise identical", T, float,
                   double) {
#ifdef KOKKOS_ENABLE_OPENMP
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads");
  conformance::check_deterministic<T>(openmp_backend{}, 60);
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space");
#endif
}

// Serial runs every work item on one thread in index order; OpenMP splits them over its pool.
// Equal bits show that no result depends on how work items are scheduled.
TEST_CASE_TEMPLATE("kokkos backend: OpenMP gives the bits of Serial", T, float, double) {
#if defined(KOKKOS_ENABLE_OPENMP) && defined(KOKKOS_ENABLE_SERIAL)
  MESSAGE("OpenMP execution space, " << kokkos_test::openmp_team_size() << " threads, vs Serial");
  check_same_bits<T>(run_sweep<T>(openmp_backend{}, 120), run_sweep<T>(serial_backend{}, 120));
#else
  MESSAGE("skipped: this Kokkos lacks the OpenMP or the Serial execution space");
#endif
}

// Thread-count independence inside one process: a one-thread OpenMP partition of the pool
// (nested OpenMP, enabled by main.cpp) against the whole pool. Kokkos 4 dropped
// partition_master; there the --threads=1 and --threads=2 runs of the file cover it.
TEST_CASE_TEMPLATE("kokkos backend: OpenMP on one thread gives the bits of the whole pool", T,
                   float, double) {
#if defined(KOKKOS_ENABLE_OPENMP) && KOKKOS_VERSION < 40000
  const int pool = kokkos_test::openmp_team_size();
  const results<T> whole = run_sweep<T>(openmp_backend{}, 120);
  results<T> single;
  int partition = 0;
  Kokkos::OpenMP::partition_master(
      [&](int, int) {
        partition = kokkos_test::openmp_team_size();
        single = run_sweep<T>(openmp_backend{}, 120);
      },
      1, 1);
  MESSAGE("OpenMP execution space: a partition of " << partition << " thread(s) vs the pool of "
                                                    << pool << " thread(s)");
  REQUIRE(partition == 1);
  check_same_bits<T>(single, whole);
#else
  MESSAGE("skipped: this Kokkos has no OpenMP execution space, or no partition_master (Kokkos 4)");
#endif
}
