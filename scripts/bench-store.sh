#!/usr/bin/env bash
# Store benchmark: Baton against etcd 3.4 in the same run; prints one table with ratios.
# Usage: scripts/bench-store.sh   (BENCH_SECS=N sets seconds per cell, default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked -p baton -p baton-bench
"$CARGO_TARGET_DIR/release/store-bench" "$CARGO_TARGET_DIR/release/baton"
