#!/usr/bin/env bash
# Builds bkn and runs every test. Usage: ./tools/test.sh   (BKN_BUILD_DIR overrides build/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=$(nproc 2>/dev/null || echo 2)

# run_suite <build dir> [extra cmake -D args...]: configure, build and ctest one build tree.
run_suite() {
  local dir=$1
  shift
  local args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "$@")
  # The generator can only be chosen when the tree is first configured.
  if [[ ! -f $dir/CMakeCache.txt ]] && command -v ninja >/dev/null; then
    args+=(-G Ninja)
  fi
  cmake -S . -B "$dir" "${args[@]}"
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

./tools/setup-deps.sh
# Kokkos 3.4.1 with Serial + OpenMP for the kokkos backend: built once into /var/cache/bkn, then instant.
kokkos_prefix=$(./tools/install-kokkos.sh | tail -1)
# Each Kokkos pass is one OpenMP region: threads that sleep rather than spin keep ctest -j fast.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
# CUDA: compiled and linked for Ampere and Hopper; its device tests report "skipped: no CUDA
# device" on machines without a GPU.
run_suite "${BKN_BUILD_DIR:-build}" -DCMAKE_PREFIX_PATH="$kokkos_prefix" -DBKN_ENABLE_KOKKOS=ON \
  -DBKN_ENABLE_CUDA=ON

# The reliability jobs (issue #9): the same suite under AddressSanitizer + UndefinedBehavior-
# Sanitizer (clang, build-asan/), then the libFuzzer target for a bounded time from the
# committed corpus (build-fuzz/). BKN_SKIP_ASAN=1 / BKN_SKIP_FUZZ=1 skip them locally.
BKN_KOKKOS_PREFIX="$kokkos_prefix" ./tools/ci-extra.sh
