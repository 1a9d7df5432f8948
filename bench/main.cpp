// SPDX-License-Identifier: MIT
// bkn_bench's main(): its own switches, Kokkos initialized around the run, and the benchmarks
// registered case by case so that one case's benchmarks, on every backend, run back to back.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

#include <benchmark/benchmark.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#ifdef BKN_BENCH_KOKKOS
#include <Kokkos_Core.hpp>
#endif

#include "bench.hpp"

namespace {

void print_help() {
  std::printf(
      "bkn_bench: Google Benchmark suite of bkn's backends (docs/benchmarks.md).\n"
      "Names: <kind>/<line>:t<threads>/<layout>/<shape>/gs=<samples per group|all>,\n"
      "       copy/<shape> and triad/<shape> (STREAM-like baselines), read/<size> (a read-only\n"
      "       sweep of working sets). Lines: bkn's backends, and the peers onednn and\n"
      "       libtorch on the batch-normalization kinds.\n"
      "bkn_bench switches:\n"
      "  --smoke        tiny shapes only (every benchmark family, seconds in all)\n"
      "  --huge         also the huge shapes and O(G C C') transitions\n"
      "  --threads=N    threads of the multi-threaded lines: Eigen's and the peers' second\n"
      "                 line and the Kokkos OpenMP pool (default 2; BKN_BENCH_THREADS too)\n"
      "  --page-aligned every buffer at the start of a page (default: 64-byte aligned)\n\n");
  benchmark::PrintDefaultHelp();
}

}  // namespace

int main(int argc, char** argv) {
  bkn_bench::settings s;
  if (const char* env = std::getenv("BKN_BENCH_THREADS")) s.threads = std::atoi(env);
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0)
      s.smoke = true;
    else if (std::strcmp(argv[i], "--huge") == 0)
      s.huge = true;
    else if (std::strcmp(argv[i], "--page-aligned") == 0)
      bkn_bench::buffer_alignment = 4096;
    else if (std::strncmp(argv[i], "--threads=", 10) == 0)
      s.threads = std::atoi(argv[i] + 10);
    else
      argv[kept++] = argv[i];
  }
  argc = kept;
#if defined(__GLIBC__)
  // libtorch allocates every output per call. glibc would map large blocks fresh each time
  // (and return freed memory to the system), so each call would pay a page fault per 4 KiB
  // (about 11 us here): the peer would be timed on the kernel's page faults. Keep freed memory
  // instead, as the caching allocators PyTorch's CPU tuning guide recommends would. bkn and
  // oneDNN allocate nothing in the timed loops.
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, -1);
#endif
  if (s.threads < 1) {
    std::fprintf(stderr, "bkn_bench: --threads must be at least 1\n");
    return 2;
  }

#ifdef BKN_BENCH_KOKKOS
  // Kokkos prints its OMP_PROC_BIND advice on stdout, where the results go: warnings off.
#if KOKKOS_VERSION >= 30700
  Kokkos::InitializationSettings kokkos_settings;
  kokkos_settings.set_disable_warnings(true);
  kokkos_settings.set_num_threads(s.threads);
#else
  Kokkos::InitArguments kokkos_settings;
  kokkos_settings.num_threads = s.threads;
  kokkos_settings.disable_warnings = true;
#endif
  Kokkos::ScopeGuard kokkos(kokkos_settings);
  benchmark::AddCustomContext(
      "kokkos", std::to_string(KOKKOS_VERSION / 10000) + "." +
                    std::to_string(KOKKOS_VERSION / 100 % 100) + "." +
                    std::to_string(KOKKOS_VERSION % 100)
#ifdef KOKKOS_ENABLE_OPENMP
                    + ", OpenMP pool of " + std::to_string(Kokkos::OpenMP().concurrency()) +
                    " threads"
#endif
  );
#endif

  benchmark::Initialize(&argc, argv, print_help);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("bkn_shapes", s.smoke ? "smoke" : s.huge ? "all, huge included"
                                                                       : "default");
  benchmark::AddCustomContext("bkn_threads", std::to_string(s.threads));
  benchmark::AddCustomContext("bkn_buffer_alignment",
                              std::to_string(bkn_bench::buffer_alignment));
  benchmark::AddCustomContext("bkn_build", BKN_BENCH_FLAGS);
  std::string backends = "reference";
#ifdef BKN_BENCH_EIGEN
  backends += ", eigen";
#ifdef _OPENMP
  backends += " (OpenMP)";
#endif
#endif
#ifdef BKN_BENCH_KOKKOS
  backends += ", kokkos";
#endif
  benchmark::AddCustomContext("bkn_backends", backends);
  std::string peers;
#ifdef BKN_BENCH_ONEDNN
  benchmark::AddCustomContext("onednn", bkn_bench::onednn_version());
  peers += "onednn";
#endif
#ifdef BKN_BENCH_TORCH
  benchmark::AddCustomContext("libtorch", bkn_bench::torch_version());
  peers += peers.empty() ? "libtorch" : ", libtorch";
#endif
  benchmark::AddCustomContext("bkn_peers", peers.empty() ? "none" : peers);

  // Case by case, kind by kind, backend by backend: the same benchmark on every backend runs
  // back to back, on buffers allocated once per case (bench.hpp, tensors_for).
  bkn_bench::register_memory_sweep(s);
  std::set<std::string> baselines;
  for (const bkn_bench::shape_case& c : bkn_bench::shape_cases(s)) {
    if (baselines.insert(c.shape_name()).second) bkn_bench::register_baselines(c);
    for (const bkn_bench::benchmark_kind& k : bkn_bench::benchmark_kinds(c, s)) {
      bkn_bench::register_reference(c, k, s);
#ifdef BKN_BENCH_EIGEN
      bkn_bench::register_eigen(c, k, s);
#endif
#ifdef BKN_BENCH_KOKKOS
      bkn_bench::register_kokkos(c, k, s);
#endif
#ifdef BKN_BENCH_ONEDNN
      bkn_bench::register_onednn(c, k, s);
#endif
#ifdef BKN_BENCH_TORCH
      bkn_bench::register_torch(c, k, s);
#endif
    }
  }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
