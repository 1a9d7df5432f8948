#!/usr/bin/env bash
# Provides Kokkos 3.4.1 with the Serial and OpenMP execution spaces on Debian 12 (bookworm).
# Debian's libtrilinos-kokkos-dev ships the Serial backend only, so this builds the Kokkos
# that Debian's own trilinos source package embeds, once, into a cache prefix.
#
#   prefix=$(tools/install-kokkos.sh | tail -1)
#   cmake -DCMAKE_PREFIX_PATH="$prefix" ...
#
# Progress goes to stderr; the last line of stdout is the prefix. BKN_DEPS_DIR moves the cache.
set -euo pipefail

version=3.4.1
prefix="${BKN_DEPS_DIR:-/var/cache/bkn}/kokkos-${version}-serial-openmp"
log() { printf 'install-kokkos: %s\n' "$*" >&2; }

# The install only ever appears complete (see the final mv), so a config file means a full cache.
for config in "$prefix"/lib*/cmake/Kokkos/KokkosConfig.cmake; do
  if [[ -f $config ]]; then
    log "cached: $config"
    echo "$prefix"
    exit 0
  fi
done

sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
updated=false
apt_update() {
  $updated && return
  log "apt-get update"
  $sudo apt-get update -q >&2
  updated=true
}

missing=()
for pkg in cmake g++ make dpkg-dev tar xz-utils gzip; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt_update
  log "installing ${missing[*]}"
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! apt-cache showsrc trilinos 2>/dev/null | grep -q '^Package: trilinos'; then
  # Any existing deb-src entry is left to do the job; a second one only makes apt warn.
  if ! grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
    --include='*.list' --include='*.sources' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding /etc/apt/sources.list.d/bkn-deb-src.sources"
    $sudo tee /etc/apt/sources.list.d/bkn-deb-src.sources >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  updated=false # the index may predate the deb-src entry
  apt_update
fi

work=$(mktemp -d)
staging=""
trap 'rm -rf "$work" ${staging:+"$staging"}' EXIT
# apt drops to the _apt user to download; let it write here instead of warning.
chown _apt "$work" 2>/dev/null || true
cd "$work"

log "downloading the trilinos source package"
apt-get source -q --download-only trilinos >&2
orig=(trilinos_*.orig.tar.*)
log "extracting packages/kokkos from ${orig[0]}"
tar -xf "${orig[0]}" --wildcards '*/packages/kokkos/*'
src=$(echo */packages/kokkos)
found=$(sed -nE 's/^ *set\(Kokkos_VERSION_(MAJOR|MINOR|PATCH) ([0-9]+)\)/\2/p' "$src/CMakeLists.txt" |
  sed 's/^0*\([0-9]\)/\1/' | paste -sd.)
if [[ $found != "$version" ]]; then
  log "expected Kokkos $version in the trilinos source, found '$found'"
  exit 1
fi

# C++17, bkn's standard (Kokkos 3.4 defaults to C++14): KokkosCore_config.h then says
# KOKKOS_ENABLE_CXX17, matching how consumers compile its headers.
log "building Kokkos $found (Serial + OpenMP)"
cmake -S "$src" -B build -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=17 -DCMAKE_CXX_EXTENSIONS=OFF \
  -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DBUILD_SHARED_LIBS=OFF \
  -DKokkos_ENABLE_SERIAL=ON -DKokkos_ENABLE_OPENMP=ON \
  -DKokkos_ENABLE_TESTS=OFF -DKokkos_ENABLE_EXAMPLES=OFF -DCMAKE_INSTALL_MESSAGE=NEVER >&2
cmake --build build -j "$(nproc)" >&2

# Stage beside the prefix, so the final rename stays on one filesystem and is atomic.
mkdir -p "$(dirname "$prefix")"
staging=$(mktemp -d "$prefix.partial.XXXXXX")
DESTDIR="$staging" cmake --install build >&2
rm -rf "$prefix" # a leftover without KokkosConfig.cmake, not made by this script
mv -T "$staging$prefix" "$prefix"
log "installed into $prefix"
echo "$prefix"
