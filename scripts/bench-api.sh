#!/usr/bin/env bash
# API server benchmark: create/get/list/watch latency through kube-rs against `baton up`.
# Usage: scripts/bench-api.sh   (BENCH_OPS=N operations per client per cell, default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked -p baton -p baton-bench
"$CARGO_TARGET_DIR/release/api-bench" "$CARGO_TARGET_DIR/release/baton"
