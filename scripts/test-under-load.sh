#!/usr/bin/env bash
# Runs tests while a CPU hog keeps every core busy, as on a production machine that is
# doing other work. The hogs run at normal priority and stop when the tests end.
#   scripts/test-under-load.sh                  the end-to-end suite (tests/e2e.rs)
#   scripts/test-under-load.sh --test kubectl   any `cargo test` arguments
#   HOGS_PER_CORE=2 scripts/test-under-load.sh  a heavier load (load average ~2x cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--test e2e)
fi
# Build first, without the hogs: the load is for the tests, not for the compiler.
cargo test --workspace --locked --no-run "${args[@]}"
cores=$(nproc)
per=${HOGS_PER_CORE:-2}
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq $((cores * per))); do
  sh -c 'while :; do :; done' &
  pids+=($!)
done
echo "running with $((cores * per)) CPU hogs on $cores cores" >&2
cargo test --workspace --locked "${args[@]}"
