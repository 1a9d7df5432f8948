// SPDX-License-Identifier: MIT
// The main() of the Kokkos backend's test executables: doctest inside a Kokkos::ScopeGuard, with
// the OpenMP thread count from --threads=N or BKN_KOKKOS_THREADS (else Kokkos's default).
// Also the operator new that counts allocations, for the test that passes allocate nothing.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include <Kokkos_Core.hpp>

#include "support.hpp"

namespace {
std::atomic<long> allocation_count{0};
}  // namespace

long kokkos_test::allocations() noexcept { return allocation_count.load(); }

void* operator new(std::size_t bytes) {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(bytes > 0 ? bytes : 1)) return p;
  throw std::bad_alloc();
}
// GCC inlines these into std::allocator code and then sees free() meet a new-expression: the
// pairing is right (both replaced), the warning a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

int main(int argc, char** argv) {
  // One binary runs on any thread count: ctest registers it with --threads=1 and --threads=2.
  int threads = -1;  // Kokkos's default: OMP_NUM_THREADS, else every core
  if (const char* env = std::getenv("BKN_KOKKOS_THREADS")) threads = std::atoi(env);
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0)
      threads = std::atoi(argv[i] + 10);
    else
      argv[kept++] = argv[i];
  }
  argc = kept;

#ifdef KOKKOS_ENABLE_OPENMP
  // Lets a test carve a one-thread OpenMP partition out of the pool (partition_master) and
  // compare its bits with the whole pool's, inside one process.
  omp_set_max_active_levels(2);
#endif
  // Warnings off: Kokkos prints its OMP_PROC_BIND advice on stdout, where ctest parses listings.
#if KOKKOS_VERSION >= 30700
  Kokkos::InitializationSettings settings;
  settings.set_disable_warnings(true);
  if (threads > 0) settings.set_num_threads(threads);
#else
  Kokkos::InitArguments settings;
  settings.num_threads = threads;
  settings.disable_warnings = true;
#endif
  Kokkos::ScopeGuard kokkos(settings);

  doctest::Context context(argc, argv);
  bool listing = false;
  // As tests/doctest_main.cpp: list doctest::skip() cases too, so that ctest reports them as
  // skipped rather than not at all.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--list-test-cases") == 0 || std::strcmp(argv[i], "-ltc") == 0) {
      context.setOption("no-skip", true);
      listing = true;
    }
  }
  // ctest parses the listing: nothing else may be printed then.
  if (!listing) {
#ifdef KOKKOS_ENABLE_OPENMP
    std::printf("kokkos %d.%d.%d: OpenMP pool of %d threads\n", KOKKOS_VERSION / 10000,
                KOKKOS_VERSION / 100 % 100, KOKKOS_VERSION % 100, kokkos_test::openmp_team_size());
#else
    std::printf("kokkos %d.%d.%d: no OpenMP execution space\n", KOKKOS_VERSION / 10000,
                KOKKOS_VERSION / 100 % 100, KOKKOS_VERSION % 100);
#endif
  }
  return context.run();
}
