#!/usr/bin/env bash
# Runs one benchmark in release mode and prints its table.
#   scripts/bench.sh store   Baton's store against etcd 3.4 (BENCH_SECS=N per cell)
#   scripts/bench.sh api     the API server through kube-rs (BENCH_OPS=N per client)
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:?usage: scripts/bench.sh store|api}"
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked -p baton -p baton-bench
"$CARGO_TARGET_DIR/release/$which-bench" "$CARGO_TARGET_DIR/release/baton"
