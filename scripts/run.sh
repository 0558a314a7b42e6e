#!/usr/bin/env bash
# Runs Baton: `baton up` on the embedded store, then a workload through the real kubectl:
# a Deployment, a Service and a ConfigMap applied, listed, scaled and deleted; then a clean
# stop and a restart that finds every object where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked -p baton
BATON="$CARGO_TARGET_DIR/release/baton"
DATA="$(mktemp -d)"
LISTEN="127.0.0.1:${BATON_PORT:-6443}"
export KUBECONFIG="$DATA/kubeconfig"
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT

start() {
  "$BATON" up --data-dir "$DATA" --listen "$LISTEN" &
  PID=$!
  for _ in $(seq 1 100); do
    if [ -f "$KUBECONFIG" ] && kubectl get --raw /readyz >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "baton up did not become ready" >&2
  exit 1
}

start
kubectl version
kubectl get namespaces
kubectl apply -f examples/hello/deployment.yaml
kubectl get deployments,services,configmaps -o wide
kubectl scale deployment hello --replicas=3
kubectl get deployment hello -o jsonpath='{.spec.replicas}{"\n"}'
kill -INT "$PID"; wait "$PID" || true
echo "--- restarted: every object is where it was"
start
kubectl get deployments,services,configmaps
kubectl delete -f examples/hello/deployment.yaml
