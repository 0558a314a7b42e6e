#!/usr/bin/env bash
# Runs one benchmark in release mode and prints its table.
#   scripts/bench.sh store   Baton's store against etcd 3.4 (BENCH_SECS=N per cell)
#   scripts/bench.sh api     the API server through kube-rs (BENCH_OPS=N per client)
#   scripts/bench.sh wasm    the pod sandbox against `wasmtime serve` 48, cold start and
#                            density (BENCH_SECS=N per cell, BENCH_PODS=N for density);
#                            installs wasmtime-cli 48.0.8 on first use (a long build)
#   scripts/bench.sh ingress http-hello through a node's Ingress, beside its NodePort and
#                            `wasmtime serve` (BENCH_SECS=N per cell)
#   scripts/bench.sh cluster pod start latency, scheduler throughput on 1,000 hollow nodes,
#                            idle memory (BENCH_PARTS=idle,start,sched; BENCH_NODES, BENCH_PODS)
#   scripts/bench.sh debug   `kubectl exec -- true` round trip and port-forward throughput
#                            against a direct connection (BENCH_OPS runs, BENCH_MIB MiB)
#   scripts/bench.sh ui      the dashboard's time to interactive with 1,000 running pods
#                            in headless Chromium (BENCH_PODS, BENCH_RUNS)
#   scripts/bench.sh failover  writes stopped by the Raft leader's partition, three
#                            members on network namespaces, against etcd 3.4 (as root;
#                            BENCH_TRIALS per system, default 20)
#   scripts/bench.sh scale   Kubernetes' SLOs on hollow nodes: Deployments at a steady
#                            rate, then churn, at 100, 1,000 and 5,000 nodes (BENCH_SCALE,
#                            BENCH_PODS_PER_NODE=30, BENCH_RATE pods/s)
#   scripts/bench.sh tunnel  a Service endpoint on another host through a node-to-node
#                            tunnel, against the same endpoint's own node (as root;
#                            BENCH_SECS per cell)
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:?usage: scripts/bench.sh store|api|wasm|ingress|cluster|debug|container|ui|failover|scale|tunnel}"
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
# Two builds, so that `baton` is the same binary `scripts/run.sh` builds (one build of
# both would unify their dependencies' features and make another).
cargo build --release --locked -p baton
cargo build --release --locked -p baton-bench
case "$which" in
  wasm|ingress)
    tools="$HOME/.cache/baton/tools"
    if ! "$tools/bin/wasmtime" --version 2>/dev/null | grep -q '^wasmtime 48\.0\.8'; then
      cargo install wasmtime-cli --version 48.0.8 --locked --root "$tools"
    fi
    ./scripts/build-guests.sh >/dev/null
    "$CARGO_TARGET_DIR/release/$which-bench" "$CARGO_TARGET_DIR/release/baton" \
      "$tools/bin/wasmtime" examples-wasm/dist
    ;;
  cluster|debug|container|ui|tunnel)
    ./scripts/build-guests.sh >/dev/null
    if [ "$which" = cluster ]; then
      "$CARGO_TARGET_DIR/release/cluster-bench" "$CARGO_TARGET_DIR/release/baton" examples-wasm/dist
    else
      "$CARGO_TARGET_DIR/release/$which-bench" "$CARGO_TARGET_DIR/release/baton"
    fi
    ;;
  *)
    "$CARGO_TARGET_DIR/release/$which-bench" "$CARGO_TARGET_DIR/release/baton"
    ;;
esac
