//! Platform interfaces end to end: `baton up`, the real kubectl, and components that use
//! wasi:config, wasi:keyvalue and wasi:logging, backed by ConfigMaps, the node's local
//! store and Debian's redis-server.

#[path = "support/baton.rs"]
mod baton;

use std::sync::{Mutex, MutexGuard};

use baton::{guest, jsonpath, wait_for, Baton};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn waiting_reason(b: &Baton, pod: &str) -> String {
    jsonpath(
        b,
        &["pod", pod],
        "{.status.containerStatuses[0].state.waiting.reason} {.status.containerStatuses[0].state.waiting.message}",
    )
}

/// A component reads its configuration from a ConfigMap through wasi:config, follows an
/// edit without a restart, and keeps its last values when the ConfigMap is deleted; its
/// wasi:logging records are in `kubectl logs`. A component importing an interface its
/// container was not granted does not start, and says which.
#[test]
fn wasi_config_follows_a_configmap_without_a_restart() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let manifest = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  greeting: hello
---
apiVersion: v1
kind: Pod
metadata:
  name: watcher
  annotations:
    baton.dev/capabilities: config,logging
    baton.dev/config-from: settings
spec:
  containers:
  - name: watch
    image: {image}
    args: ["greeting", "100"]
    env:
    - {{name: MODE, value: "from-env"}}
---
apiVersion: v1
kind: Pod
metadata:
  name: ungranted
  annotations:
    baton.dev/capabilities: logging
spec:
  containers:
  - name: watch
    image: {image}
"#,
        image = guest("config-watch")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    let logs = |b: &Baton| b.run("kubectl", &["logs", "watcher"], None);
    let shows = |b: &Baton, what: &str| {
        let out = logs(b);
        String::from_utf8_lossy(&out.stdout)
            .contains(what)
            .then_some(())
    };
    wait_for(&b, 60, "the first value in the logs", || {
        shows(&b, "greeting=hello")
    });
    wait_for(&b, 10, "the wasi:logging record in the logs", || {
        shows(&b, "INFO config-watch: greeting changed")
    });
    b.ok(&[
        "patch",
        "configmap",
        "settings",
        "-p",
        r#"{"data":{"greeting":"bye"}}"#,
    ]);
    wait_for(
        &b,
        60,
        "the new value, read by the running component",
        || shows(&b, "greeting=bye"),
    );
    assert_eq!(
        jsonpath(
            &b,
            &["pod", "watcher"],
            "{.status.containerStatuses[0].restartCount}"
        ),
        "0"
    );
    // Deleted while in use: the pod runs on with the last values, and says so.
    b.ok(&["delete", "configmap", "settings"]);
    wait_for(&b, 60, "a warning that the values are kept", || {
        let events = b.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=watcher",
        ]);
        events.contains("ConfigUnavailable").then_some(())
    });
    assert_eq!(
        jsonpath(&b, &["pod", "watcher"], "{.status.phase}"),
        "Running"
    );
    let out = String::from_utf8_lossy(&logs(&b).stdout).to_string();
    assert!(!out.contains("greeting is not set"), "{out}");
    // Not granted: CreateContainerError, naming the interface and the grant.
    wait_for(&b, 30, "the ungranted pod's reason", || {
        let w = waiting_reason(&b, "ungranted");
        (w.starts_with("CreateContainerError")
            && w.contains("wasi:config/store@0.2.0-draft-2024-09-27")
            && w.contains("baton.dev/capabilities"))
        .then_some(())
    });
}

/// A node-local bucket keeps its counter across pods on the same node; a bucket over
/// its cap refuses the write with a clear error and the pod goes on; a Redis bucket is
/// shared by two replicas.
#[test]
fn keyvalue_counters_survive_pods_and_redis_is_shared_by_replicas() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let counter = |name: &str, args: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations:
    baton.dev/capabilities: keyvalue
    baton.dev/keyvalue-buckets: counters
    baton.dev/keyvalue-bucket-bytes: "4096"
spec:
  restartPolicy: Never
  containers:
  - name: count
    image: {image}
    args: {args}
"#,
            image = guest("kv-counter")
        )
    };
    let run = |name: &str, args: &str| -> String {
        b.ok_with("kubectl", &["apply", "-f", "-"], Some(&counter(name, args)));
        b.ok(&[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            &format!("pod/{name}"),
            "--timeout=60s",
        ]);
        let logs = b.ok(&["logs", name]);
        b.ok(&["delete", "pod", name, "--wait=true"]);
        logs
    };
    assert_eq!(run("first", r#"["counters"]"#).trim(), "hits=1");
    // The pod is gone; its successor finds the counter where it was.
    assert_eq!(run("second", r#"["counters"]"#).trim(), "hits=2");
    // Past the bucket's 4 KiB: refused with a reason, and the counter still counts.
    let out = run("filler", r#"["counters", "fill"]"#);
    assert!(out.contains("refused after"), "{out}");
    assert!(out.contains("is full"), "{out}");
    assert!(out.trim_end().ends_with("hits=3"), "{out}");

    let redis = baton_testkit::redis::Redis::start().unwrap();
    let shared = format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: kv-redis
stringData:
  url: {url}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: counters
spec:
  replicas: 2
  selector:
    matchLabels: {{app: counters}}
  template:
    metadata:
      labels: {{app: counters}}
      annotations:
        baton.dev/capabilities: keyvalue
        baton.dev/keyvalue-buckets: shared=redis:kv-redis
    spec:
      containers:
      - name: count
        image: {image}
        args: ["shared", "stay"]
"#,
        url = redis.url(),
        image = guest("kv-counter")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&shared));
    let counts = wait_for(&b, 60, "both replicas to count", || {
        let pods = jsonpath(
            &b,
            &["pods", "-l", "app=counters"],
            "{.items[*].metadata.name}",
        );
        let mut counts: Vec<String> = pods
            .split_whitespace()
            .map(|p| {
                let out = b.run("kubectl", &["logs", p], None);
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            })
            .collect();
        counts.sort();
        (counts.len() == 2 && counts.iter().all(|c| c.starts_with("hits="))).then_some(counts)
    });
    assert_eq!(counts, ["hits=1", "hits=2"]);
}

/// `baton inspect` tells what a component is, the capabilities it needs, and whether it
/// links here, without a cluster.
#[test]
fn inspect_tells_kind_version_and_capabilities() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("inspect")
        .args([
            guest("p3-http-hello"),
            guest("config-watch"),
            guest("kv-cas"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "p3-http-hello.wasm: runs: wasi:http proxy, WASI 0.3, capabilities: none",
        "config-watch.wasm: runs: wasi:cli command, WASI 0.2, capabilities: config,logging",
        "kv-cas.wasm: runs: wasi:cli command, WASI 0.2, capabilities: keyvalue",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    // Not a component: said so, and the exit code counts it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["inspect", file!()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not loadable"));
}
