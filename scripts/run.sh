#!/usr/bin/env bash
# Runs Baton: `baton up` on the embedded store, then a workload through the real kubectl:
# the http-hello component pushed to a local registry, its Deployment pulled from there and
# put behind a NodePort Service and an Ingress, answered by its replicas, debugged (exec, debug with the
# toolbox, port-forward, top), scaled; a pod of a component and an OCI container (runc)
# sharing localhost;
# then a clean stop and a restart that finds every object where it was, and serves again;
# then an autoscaler takes the idle function to zero, and a request wakes it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
cargo build --release --locked -p baton
./scripts/build-guests.sh >/dev/null
BATON="$CARGO_TARGET_DIR/release/baton"
DATA="$(mktemp -d)"
LISTEN="127.0.0.1:${BATON_PORT:-6443}"
export KUBECONFIG="$DATA/kubeconfig"
PID=""
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT

# The node serves Ingresses on port 80 (443 for TLS), or on free ports if those are taken.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
port_or_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then free_port; else echo "$1"; fi
}
INGRESS_PORT="$(port_or_free 80)"
INGRESS_TLS_PORT="$(port_or_free 443)"

start() {
  "$BATON" up --data-dir "$DATA" --listen "$LISTEN" --insecure-registry "$REGISTRY" \
    --ingress-http-port "$INGRESS_PORT" --ingress-https-port "$INGRESS_TLS_PORT" &
  PID=$!
  for _ in $(seq 1 100); do
    if [ -f "$KUBECONFIG" ] && kubectl get --raw /readyz >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "baton up did not become ready" >&2
  exit 1
}

# A local registry (Debian's docker-registry) holds the component, as a user's would: the
# example's image is 127.0.0.1:5000/baton/http-hello:1.0 (another port if 5000 is taken).
REGISTRY_PORT="${REGISTRY_PORT:-5000}"
if (exec 3<>"/dev/tcp/127.0.0.1/$REGISTRY_PORT") 2>/dev/null; then
  REGISTRY_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
fi
REGISTRY="127.0.0.1:$REGISTRY_PORT"
printf 'version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: %s}\n' \
  "$DATA/registry" "$REGISTRY" >"$DATA/registry.yml"
docker-registry serve "$DATA/registry.yml" &
REGISTRY_PID=$!
trap 'kill "$PID" "$REGISTRY_PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
  if curl -sf "http://$REGISTRY/v2/" >/dev/null; then break; fi
  sleep 0.1
done
"$BATON" push examples-wasm/dist/http-hello.wasm "$REGISTRY/baton/http-hello:1.0" --insecure-registry "$REGISTRY"
# The debug toolbox, for `kubectl debug` (a small shell as a wasi:cli component).
"$BATON" push examples-wasm/dist/toolbox.wasm "$REGISTRY/baton/toolbox:1" --insecure-registry "$REGISTRY"
# A tiny Linux image, for an OCI container beside a component.
./scripts/push-busybox.sh "$REGISTRY" baton/busybox:1

manifest() {
  sed "s#image: 127.0.0.1:5000/#image: $REGISTRY/#" examples/hello/deployment.yaml
}

# Asks the Service through its NodePort until it answers.
ask() {
  local port
  port="$(kubectl get service hello -o jsonpath='{.spec.ports[0].nodePort}')"
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/from-run-sh"; then return 0; fi
    sleep 0.1
  done
  echo "the hello Service did not answer on node port $port" >&2
  exit 1
}

# The same Service by host name, through the node's Ingress.
ask_ingress() {
  for _ in $(seq 1 100); do
    if curl -sf -H 'Host: hello.localhost' "http://127.0.0.1:$INGRESS_PORT/through-ingress"; then
      kubectl get ingress hello
      return 0
    fi
    sleep 0.1
  done
  echo "the hello Ingress did not answer on port $INGRESS_PORT" >&2
  exit 1
}

start
kubectl version
kubectl get nodes -o wide
manifest | kubectl apply -f -
kubectl apply -f examples/hello/ingress.yaml
kubectl rollout status deployment hello --timeout=60s
kubectl get deployments,replicasets,pods,services,endpointslices -o wide
ask; ask
ask_ingress
# Debugging a Wasm pod with the usual verbs.
debug_session() {
  local pod port pf
  pod="$(kubectl get pods -l app=hello -o jsonpath='{.items[0].metadata.name}')"
  echo "--- kubectl exec into an HTTP-only component says what to do instead"
  kubectl exec "$pod" -- ls || true
  echo "--- kubectl debug: a toolbox beside it, on the pod's localhost"
  printf 'get localhost:8080/from-debug\nenv\nexit\n' |
    kubectl debug -i "$pod" --image="$REGISTRY/baton/toolbox:1" --target=hello
  echo "--- kubectl port-forward"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  kubectl port-forward "pod/$pod" "$port:8080" &
  pf=$!
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/through-port-forward"; then break; fi
    sleep 0.1
  done
  kill -INT "$pf"; wait "$pf" || true
  echo "--- kubectl top (the node measures; no add-on)"
  for _ in $(seq 1 100); do
    if kubectl top pods 2>/dev/null; then break; fi
    sleep 0.2
  done
  kubectl top nodes
}
debug_session
# A component and an OCI container in one pod, on one localhost.
mixed_pod() {
  sed "s#image: 127.0.0.1:5000/#image: $REGISTRY/#" examples/mixed/pod.yaml | kubectl apply -f -
  kubectl wait --for=condition=Ready pod/mixed --timeout=120s
  echo "--- the container calls the component at localhost:8080"
  for _ in $(seq 1 100); do
    if kubectl logs mixed -c side 2>/dev/null | grep 'hello from http-hello' >/dev/null; then break; fi
    sleep 0.2
  done
  kubectl logs mixed -c side --tail=2
  echo "--- a sibling component calls the container at localhost:9090, with kubectl debug"
  printf 'get localhost:9090/index.html\nexit\n' |
    kubectl debug -i mixed --image="$REGISTRY/baton/toolbox:1" --target=web
  echo "--- kubectl exec into the container runs in it (runc exec)"
  kubectl exec mixed -c side -- sh -c 'hostname; id'
  kubectl delete pod mixed --wait=true
}
mixed_pod
kubectl scale deployment hello --replicas=3
kubectl rollout status deployment hello --timeout=60s
kubectl get pods -o wide
kill -INT "$PID"; wait "$PID" || true
echo "--- restarted: every object is where it was, and the pods serve again"
start
kubectl get deployments,services,configmaps
kubectl rollout status deployment hello --timeout=60s
ask
ask_ingress
# Scale to zero: an autoscaler on the request rate takes the idle function to zero, and
# its next request through the Ingress wakes it.
scale_to_zero() {
  kubectl apply -f examples/hello/autoscaler.yaml
  echo "--- the request rate, per pod, counted in the sandbox (no metrics adapter)"
  for _ in $(seq 1 100); do
    if kubectl get --raw '/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/http_requests_per_second?labelSelector=app%3Dhello' 2>/dev/null | grep describedObject; then break; fi
    sleep 0.2
  done
  echo "--- idle: the autoscaler takes it to zero replicas"
  kubectl wait --for=jsonpath='{.spec.replicas}'=0 deployment/hello --timeout=180s
  for _ in $(seq 1 300); do
    if [ -z "$(kubectl get pods -l app=hello -o name)" ]; then break; fi
    sleep 0.2
  done
  kubectl get hpa hello
  kubectl get deployment hello
  echo "--- a request from zero through the Ingress: held while the node wakes it, then answered"
  curl -sf --max-time 30 -w 'answered from zero in %{time_total} s\n' -H 'Host: hello.localhost' \
    "http://127.0.0.1:$INGRESS_PORT/from-zero"
  kubectl get deployment hello
  kubectl delete -f examples/hello/autoscaler.yaml
}
scale_to_zero
manifest | kubectl delete -f -
