#!/usr/bin/env bash
# Installs what Baton's build and tests need on a fresh Debian machine. Idempotent: it
# installs only what is missing, so a second run does nothing.
set -euo pipefail

# clang/libclang: bindgen for the RocksDB bindings. librocksdb-dev: the RocksDB we link
# (see .cargo/config.toml). protobuf-compiler: etcd-client's gRPC code (the external-etcd
# store, and the benchmarks). etcd-server: the external etcd the store and API tests run
# against, and the peer the store benchmark runs against. docker-registry and
# apache2-utils (htpasswd): the real OCI registry the image tests push to and pull from.
# runc and busybox-static: OCI containers, and the tiny Linux image their tests pack.
# chromium and nodejs/npm: the dashboard's browser tests (Playwright drives Chromium).
# redis-server: the Redis that wasi:keyvalue's Redis buckets are tested against.
PACKAGES=(clang libclang-dev librocksdb-dev protobuf-compiler etcd-server docker-registry apache2-utils runc busybox-static chromium redis-server)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
# Guest components are built for wasm32-wasip2 (scripts/build-guests.sh).
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
# Playwright for the dashboard's browser tests, at the version the lockfile pins. npm
# comes with the machine's Node.js; Debian's npm is the fallback.
if ! command -v npm >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm
fi
ui_tests="$(dirname "$0")/../tests/ui"
if ! (cd "$ui_tests" && npm ls --depth=0 >/dev/null 2>&1); then
  (cd "$ui_tests" && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup: done"
