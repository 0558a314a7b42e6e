#!/usr/bin/env bash
# Runs Baton: `baton up` on the embedded single-member store, then a small workload
# through the CLI, then a clean stop and a restart that finds the data again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked -p baton
BATON="$CARGO_TARGET_DIR/release/baton"
DATA="$(mktemp -d)"
ADDR="127.0.0.1:${BATON_PORT:-2380}"
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT

start() {
  "$BATON" up --data-dir "$DATA" --store-listen "$ADDR" &
  PID=$!
  for _ in $(seq 1 100); do
    if "$BATON" store --endpoints "$ADDR" status >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "baton up did not become ready" >&2
  exit 1
}

start
"$BATON" store --endpoints "$ADDR" status
for i in 1 2 3; do "$BATON" store --endpoints "$ADDR" put "/demo/key-$i" "value-$i"; done
"$BATON" store --endpoints "$ADDR" list /demo/
"$BATON" store --endpoints "$ADDR" get /demo/key-2
kill -INT "$PID"; wait "$PID" || true
echo "--- restarted: the data is still there"
start
"$BATON" store --endpoints "$ADDR" get /demo/key-3
