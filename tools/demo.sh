#!/usr/bin/env bash
# The main job (issue #7): trains the MLP of examples/mlp on Fashion-MNIST with batch
# normalization and with BKN at (gradient batch, statistics batch) = (128, 128) and (128, 2),
# prints the table of test accuracies and says where the table, the log and the plot are.
# Installs what it needs, builds bkn_mlp in Release; safe to run twice. docs/demo.md has the
# full comparison. Extra arguments go to bkn_mlp (e.g. --epochs 10, --seeds 1,2,3).
#   BKN_DEMO_BUILD_DIR  build folder (build-demo)
#   BKN_DEMO_OUT        results folder (<build folder>/results/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup-deps.sh
build=${BKN_DEMO_BUILD_DIR:-build-demo}
out=${BKN_DEMO_OUT:-$build/results/demo}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] ||
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBKN_BUILD_TESTS=OFF \
    -DBKN_BUILD_BENCHMARKS=OFF -DBKN_USE_TORCH=OFF >/dev/null
cmake --build "$build" --target bkn_mlp -j"$(nproc)"
# One thread: on the shared 2-core machine where this was measured, --threads 2 made an epoch
# 5-20 times slower (threads that wait for a descheduled partner); try it on idle cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
"$build/examples/mlp/bkn_mlp" --methods bn,bkn --settings 128x128,128x2 --epochs 3 \
  --threads 1 --out "$out" "$@"
