#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (their bodies are in fuzzing/src/lib.rs), each for
# FUZZ_SECS seconds (600 by default), growing fuzz/corpus/TARGET. A crash stops the run
# and leaves its input in fuzz/artifacts/TARGET/; add it to the corpus once fixed, so the
# ordinary test run (cargo test -p baton-fuzzing) replays it from then on.
#   scripts/fuzz.sh                 every target
#   scripts/fuzz.sh quantity patch  some of them
#   FUZZ_SECS=60 scripts/fuzz.sh    a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
tools="$HOME/.cache/baton/tools"
if ! "$tools/bin/cargo-fuzz" --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
# libFuzzer's instrumentation uses flags of the nightly compiler; the stable one accepts
# them with RUSTC_BOOTSTRAP. No sanitizer: the targets are safe Rust, and a panic is the
# crash that matters.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}/fuzz"
secs="${FUZZ_SECS:-600}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(body patch selectors quantity oci_manifest component)
fi
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s" >&2
  cargo fuzz run --fuzz-dir fuzz --sanitizer none "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048
done
