#!/usr/bin/env bash
# Builds bkn_bench (Release), runs it with its peers oneDNN and libtorch, keeps the JSON, and
# renders docs/benchmarks.md and docs/benchmarks.png from it (bench/report.py).
#
#   ./tools/bench.sh            # the whole default suite, 3 repetitions (about an hour on 2 cores)
#   ./tools/bench.sh --quick    # BN and BKN-identity on eigen and the peers, 1 repetition (minutes)
#
# Options: --build-dir DIR (default build-bench), --results DIR (default <build dir>/results),
# --threads N (the multi-threaded lines, default 2), --repetitions N, --min-time SECONDS,
# --filter REGEX (replaces the suite's selection), --note TEXT (written into the document: the
# conditions of the run), --no-build, --no-docs (JSON only). OMP_WAIT_POLICY is passed through
# when set and recorded; unset, OpenMP's threads spin a while before they sleep (libgomp's
# default), which keeps the two-thread lines from paying a wake-up per parallel pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=build-bench
results=""
threads=2
quick=false
repetitions=""
min_time=""
filter=""
note=""
do_build=true
do_docs=true
while (($#)); do
  case $1 in
    --quick) quick=true ;;
    --build-dir) build=$2; shift ;;
    --results) results=$2; shift ;;
    --threads) threads=$2; shift ;;
    --repetitions) repetitions=$2; shift ;;
    --min-time) min_time=$2; shift ;;
    --filter) filter=$2; shift ;;
    --note) note=$2; shift ;;
    --no-build) do_build=false ;;
    --no-docs) do_docs=false ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done

if $quick; then
  : "${repetitions:=1}" "${min_time:=0.05}"
  : "${filter:=^(copy/|(inference|forward_BN|backward_BN|fwdbwd_BN|forward_BKN-identity|backward_BKN-identity)/(eigen|onednn|libtorch):)}"
else
  : "${repetitions:=3}" "${min_time:=0.1}"
fi
results=${results:-$build/results}
log() { printf 'bench.sh: %s\n' "$*" >&2; }

if $do_build; then
  ./tools/setup-deps.sh
  kokkos_prefix=$(./tools/install-kokkos.sh | tail -1) || kokkos_prefix=""
  args=(-DCMAKE_BUILD_TYPE=Release -DBKN_BUILD_BENCHMARKS=ON -DBKN_BUILD_TESTS=OFF
        -DBKN_BUILD_EXAMPLES=OFF -DBKN_INSTALL=OFF -DBKN_ENABLE_CUDA=OFF)
  [[ -n $kokkos_prefix ]] && args+=(-DCMAKE_PREFIX_PATH="$kokkos_prefix")
  if [[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null; then args+=(-G Ninja); fi
  cmake -S . -B "$build" "${args[@]}" >&2
  cmake --build "$build" --target bkn_bench -j "$(nproc 2>/dev/null || echo 2)" >&2
fi
bench=$build/bench/bkn_bench
[[ -x $bench ]] || { echo "bench.sh: $bench not built (drop --no-build)" >&2; exit 1; }

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$results/$stamp
mkdir -p "$out"
cmd=("$bench" --threads="$threads" --benchmark_repetitions="$repetitions"
     --benchmark_min_time="$min_time" --benchmark_report_aggregates_only=true
     --benchmark_enable_random_interleaving=true --benchmark_out="$out/run.json"
     --benchmark_out_format=json)
[[ -n $filter ]] && cmd+=(--benchmark_filter="$filter")
count=$("${cmd[@]}" --benchmark_list_tests 2>/dev/null | wc -l)
log "$count benchmarks x $repetitions repetitions -> $out/run.json"

load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
start=$(date +%s)
"${cmd[@]}" > "$out/console.txt"
seconds=$(($(date +%s) - start))
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")

commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  commit="$commit plus uncommitted changes"
fi
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
# The widest vector instructions the CPU exposes (-march=native builds for them): a VM may hide
# AVX-512 on a CPU that has it, and bkn's vectors and the peers' kernels follow.
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
isa=?
for candidate in avx512f avx2 avx sse2; do
  if [[ $flags == *" $candidate "* ]]; then isa=$candidate; break; fi
done
caches="L1d $(getconf LEVEL1_DCACHE_SIZE 2>/dev/null || echo ?) B, L2 $(getconf LEVEL2_CACHE_SIZE 2>/dev/null || echo ?) B, L3 $(getconf LEVEL3_CACHE_SIZE 2>/dev/null || echo ?) B (getconf)"
compiler=$(c++ --version 2>/dev/null | head -1)
invocation="./tools/bench.sh"
$quick && invocation+=" --quick"
shown=$(printf '%q ' "${cmd[@]}")
BKN_META_COMMAND="$invocation, which runs: ${OMP_WAIT_POLICY:+OMP_WAIT_POLICY=$OMP_WAIT_POLICY }${shown% }" \
BKN_META_COMMIT="$commit" BKN_META_CPU="${cpu:-?}" BKN_META_ISA="$isa" BKN_META_CACHES="$caches" \
BKN_META_COMPILER="${compiler:-?}" BKN_META_LOAD_BEFORE="$load_before" \
BKN_META_LOAD_AFTER="$load_after" BKN_META_SECONDS="$seconds" BKN_META_COUNT="$count" \
BKN_META_REPETITIONS="$repetitions" BKN_META_MIN_TIME="$min_time" BKN_META_NOTE="$note" \
  python3 - "$out/meta.json" <<'EOF'
import datetime, json, os, sys
e = os.environ
s = int(e["BKN_META_SECONDS"])
meta = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": e["BKN_META_COMMAND"], "commit": e["BKN_META_COMMIT"],
    "machine": {"cpu": e["BKN_META_CPU"], "isa": e["BKN_META_ISA"], "caches": e["BKN_META_CACHES"],
                "compiler": e["BKN_META_COMPILER"]},
    "load_before": e["BKN_META_LOAD_BEFORE"], "load_after": e["BKN_META_LOAD_AFTER"],
    "duration": f"{s // 60} min {s % 60} s", "count": int(e["BKN_META_COUNT"]),
    "repetitions": e["BKN_META_REPETITIONS"], "min_time": e["BKN_META_MIN_TIME"],
    "omp_wait_policy": e.get("OMP_WAIT_POLICY", "unset"), "note": e["BKN_META_NOTE"],
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=2)
EOF
log "ran in ${seconds} s; results in $out"

if $do_docs; then
  python3 bench/report.py "$out/run.json" --meta "$out/meta.json" --out docs/benchmarks.md \
    --png docs/benchmarks.png
fi
