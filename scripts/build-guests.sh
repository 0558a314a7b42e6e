#!/usr/bin/env bash
# Builds the guest components in examples-wasm/ for wasm32-wasip2 (installing the target
# if needed) and copies them to examples-wasm/dist/NAME.wasm, where tests find them.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked --target wasm32-wasip2 --manifest-path examples-wasm/Cargo.toml
mkdir -p examples-wasm/dist
for name in hello http-hello http-frontend http-hostile tcp-echo tcp-client udp-echo job hostile kube-lister admission-labeller toolbox config-watch kv-counter kv-cas otel-probe; do
  cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/$name.wasm" "examples-wasm/dist/$name.wasm"
done
# WASI 0.3 components are libraries (cdylib), whose files are named with underscores.
for name in p3-hello p3-http-hello p3-tcp spin-probe spin2-probe; do
  cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/${name//-/_}.wasm" "examples-wasm/dist/$name.wasm"
done
ls -la examples-wasm/dist
