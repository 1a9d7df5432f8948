#!/usr/bin/env bash
# The main job: builds and runs the example program. Installs what it needs; safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup-deps.sh
build=${BKN_BUILD_DIR:-build}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] || cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target bkn_quickstart -j"$(nproc)"
"$build/examples/bkn_quickstart"
