#!/usr/bin/env bash
# Sets up a fresh machine and runs every gate and test: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

# One target dir outside the clone, so that CI runs on one machine reuse the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
export CARGO_TERM_COLOR=never

cargo fmt --all --check
cargo fmt --all --check --manifest-path examples-wasm/Cargo.toml
# The guest components the tests run.
./scripts/build-guests.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The API tests again, over Debian's etcd as the store (`baton server --store etcd://`).
BATON_TEST_STORE=etcd cargo test --locked -p baton-apiserver --tests
