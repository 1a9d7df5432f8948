#!/usr/bin/env bash
# The extra CI jobs (issue #9), run after the main suite of tools/test.sh:
#   asan  the test suite built with Clang under AddressSanitizer + UndefinedBehaviorSanitizer,
#         in build-asan/
#   fuzz  the libFuzzer target fuzz/layer_fuzzer.cpp built in build-fuzz/ and run for a bounded
#         time from a copy of the committed corpus fuzz/corpus/ (never written to)
# Both rebuild incrementally. Budget: about 15 minutes on 2 cores from scratch (fuzz/README.md
# has the measured times).
#
#   ./tools/ci-extra.sh
#
# Environment:
#   BKN_SKIP_ASAN=1, BKN_SKIP_FUZZ=1   skip a job (for local use)
#   BKN_FUZZ_SECONDS=60                how long the fuzzer runs
#   BKN_ASAN_CTEST_ARGS="-LE packaging" which tests run under the sanitizers (ctest arguments)
#   BKN_KOKKOS_PREFIX=...              Kokkos install prefix (default: tools/install-kokkos.sh)
#   BKN_ASAN_DIR=build-asan, BKN_FUZZ_DIR=build-fuzz   build directories
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=$(nproc 2>/dev/null || echo 2)
# Threads that sleep rather than spin keep ctest -j fast on 2 cores (as in tools/test.sh).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

section() { printf '\n==== ci-extra: %s ====\n' "$*"; }
elapsed() { echo $((SECONDS - $1)); }
summary=()

# Clang, its sanitizer and libFuzzer runtimes, and its OpenMP runtime (Debian 12 package names).
install_clang() {
  local packages=(clang libclang-rt-14-dev libomp-14-dev) missing=() pkg status sudo=""
  command -v dpkg-query >/dev/null || return 0
  for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  ((EUID == 0)) || sudo=sudo
  echo "ci-extra: installing ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
}

# configure <dir> [cmake -D args...]: Ninja when available and the tree is new.
configure() {
  local dir=$1
  shift
  local args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ "$@")
  if [[ ! -f $dir/CMakeCache.txt ]] && command -v ninja >/dev/null; then
    args+=(-G Ninja)
  fi
  cmake -S . -B "$dir" "${args[@]}"
}

if [[ ${BKN_SKIP_ASAN:-0} == 1 && ${BKN_SKIP_FUZZ:-0} == 1 ]]; then
  echo "ci-extra: BKN_SKIP_ASAN=1 and BKN_SKIP_FUZZ=1: nothing to do"
  exit 0
fi
./tools/setup-deps.sh
install_clang

# ---- asan: the test suite under AddressSanitizer + UndefinedBehaviorSanitizer -------------
# Warnings are not errors here: the main build (g++) enforces them, and a Clang-only warning
# in a test must not hide the sanitizers' verdict (Clang's warnings still show in the log).
# Off under the sanitizers: the packaging tests (they configure and build separate consumer
# projects with no sanitizer flags: only CMake logic runs, in ~15 s of the budget) and the CUDA
# backend (device code is not instrumented, and the CUDA runtime needs ASan's shadow gap).
if [[ ${BKN_SKIP_ASAN:-0} == 1 ]]; then
  section "asan: skipped (BKN_SKIP_ASAN=1)"
  summary+=("asan skipped")
else
  section "asan: configure and build ${BKN_ASAN_DIR:-build-asan} (clang++, address,undefined)"
  start=$SECONDS
  kokkos_prefix=${BKN_KOKKOS_PREFIX:-$(./tools/install-kokkos.sh | tail -1)}
  asan_dir=${BKN_ASAN_DIR:-build-asan}
  configure "$asan_dir" -DBKN_SANITIZE=address,undefined -DBKN_BUILD_BENCHMARKS=OFF \
    -DBKN_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$kokkos_prefix" -DBKN_ENABLE_KOKKOS=ON \
    -DBKN_ENABLE_CUDA=OFF -DBKN_USE_TORCH=OFF -DBKN_WARNINGS_AS_ERRORS=OFF
  cmake --build "$asan_dir" -j "$jobs"
  built=$(elapsed "$start")
  section "asan: ctest ${BKN_ASAN_CTEST_ARGS--LE packaging}"
  # detect_leaks: the tests free what they allocate. halt_on_error and the build's
  # -fno-sanitize-recover=all make every report a failure.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
  # shellcheck disable=SC2086  # the arguments are a list on purpose
  ctest --test-dir "$asan_dir" --output-on-failure -j "$jobs" ${BKN_ASAN_CTEST_ARGS--LE packaging}
  summary+=("asan passed in $(elapsed "$start") s (build ${built} s)")
fi

# ---- fuzz: the layer fuzzer, bounded, from a copy of the committed corpus -----------------
if [[ ${BKN_SKIP_FUZZ:-0} == 1 ]]; then
  section "fuzz: skipped (BKN_SKIP_FUZZ=1)"
  summary+=("fuzz skipped")
else
  section "fuzz: configure and build ${BKN_FUZZ_DIR:-build-fuzz}"
  start=$SECONDS
  fuzz_dir=${BKN_FUZZ_DIR:-build-fuzz}
  fuzz_source=$PWD/fuzz
  grep -Eq '^[^#]*add_subdirectory\(fuzz\)' CMakeLists.txt && fuzz_source=$PWD
  # A tree configured the other way (before or after fuzz/ joined the top level) starts anew.
  if [[ -f $fuzz_dir/CMakeCache.txt ]] &&
    ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$fuzz_source" "$fuzz_dir/CMakeCache.txt"; then
    rm -rf "$fuzz_dir"
  fi
  if [[ $fuzz_source == "$PWD" ]]; then
    configure "$fuzz_dir" -DBKN_BUILD_FUZZERS=ON -DBKN_BUILD_TESTS=OFF \
      -DBKN_BUILD_BENCHMARKS=OFF -DBKN_BUILD_EXAMPLES=OFF -DBKN_INSTALL=OFF \
      -DBKN_ENABLE_KOKKOS=OFF -DBKN_ENABLE_CUDA=OFF -DBKN_USE_TORCH=OFF
  else
    # Until the top-level CMakeLists.txt adds fuzz/, fuzz/ builds as its own project.
    args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++)
    [[ ! -f $fuzz_dir/CMakeCache.txt ]] && command -v ninja >/dev/null && args+=(-G Ninja)
    cmake -S fuzz -B "$fuzz_dir" "${args[@]}"
  fi
  cmake --build "$fuzz_dir" -j "$jobs" --target bkn_layer_fuzzer
  fuzzer=$(find "$fuzz_dir" -name layer_fuzzer -type f -perm -u+x | head -1)
  [[ -n $fuzzer ]] || { echo "ci-extra: no layer_fuzzer in $fuzz_dir" >&2; exit 1; }
  built=$(elapsed "$start")

  seconds=${BKN_FUZZ_SECONDS:-60}
  section "fuzz: $fuzzer for ${seconds} s on a copy of fuzz/corpus"
  work="$fuzz_dir/fuzz-run"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp fuzz/corpus/* "$work/corpus/"
  # The committed corpus first, once: a regression there fails at once with its file name.
  # Then fuzzing; any crash, sanitizer report or failed check stops it with a non-zero status
  # and leaves the input in $work/artifacts.
  # -rss_limit_mb: ASan's shadow memory makes 2 GB (the default) tight on small machines.
  fuzz_args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096
             -artifact_prefix="$work/artifacts/" -print_final_stats=1)
  log="$work/fuzz.log"
  if ! BKN_FUZZ_STATS=1 "$fuzzer" "${fuzz_args[@]}" "$work/corpus" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo
    echo "ci-extra: the fuzzer failed; reproducer(s):" >&2
    ls -l "$work/artifacts" >&2
    for crash in "$work/artifacts"/*; do
      [[ -f $crash ]] && echo "  base64: $(base64 -w0 "$crash")  ($crash)" >&2
    done
    echo "Replay with: BKN_FUZZ_VERBOSE=1 $fuzzer <file> (fuzz/README.md)" >&2
    exit 1
  fi
  grep -E '^(INFO: seed corpus|#[0-9]+[[:space:]]+(INITED|DONE))|^stat::|stats:' "$log" || true
  summary+=("fuzz passed in $(elapsed "$start") s (build ${built} s, fuzzing ${seconds} s)")
fi

section "summary"
printf '  %s\n' "${summary[@]}"
echo "ci-extra: all extra jobs passed"
