#!/usr/bin/env bash
# Installs the Debian packages that building and testing bkn needs. Silent when all are there.
set -euo pipefail

packages=(
  cmake
  g++
  ninja-build
  libeigen3-dev    # eigen backend
  doctest-dev      # tests
  libbenchmark-dev # bench/
  gnuplot-nox      # plots of the examples
  zlib1g-dev       # examples/mlp reads the gzipped IDX files
  dataset-fashion-mnist # examples/mlp: the real data the demo trains on by default
  libtorch-dev     # peer: cross-check tests, examples/libtorch, benchmarks
  libdnnl-dev      # peer: oneDNN's batch normalization in bench/
)

if ! command -v dpkg-query >/dev/null; then
  echo "setup-deps: not a Debian-based system; install these yourself: ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$pkg")
done
((${#missing[@]} == 0)) && exit 0

sudo=""
if ((EUID != 0)); then
  if ! command -v sudo >/dev/null; then
    echo "setup-deps: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
  sudo="sudo"
fi

echo "setup-deps: installing ${missing[*]}" >&2
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
