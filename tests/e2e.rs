//! End to end: `baton up` with its scheduler, controllers and local node, driven by the
//! real kubectl, running the guests of examples-wasm.
//!
//! The tests run one at a time (each holds [`serial`]): every cluster's node serves pods
//! and Services on the same loopback ranges and node ports.

#[path = "support/baton.rs"]
mod baton;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use baton::{http_get, jsonpath, wait_for, Baton};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn guest(name: &str) -> String {
    let p = baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .join("examples-wasm/dist")
        .join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-guests.sh",
        p.display()
    );
    p.display().to_string()
}

fn web(greeting: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: hello
        image: {image}
        ports:
        - containerPort: 8080
        env:
        - {{name: GREETING, value: "{greeting}"}}
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - port: 80
    targetPort: 8080
"#,
        image = guest("http-hello")
    )
}

/// Applies a Job and waits until it has completed.
fn complete_job(b: &Baton, yaml: &str, name: &str) {
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(yaml));
    b.ok(&[
        "wait",
        "--for=condition=complete",
        &format!("job/{name}"),
        "--timeout=60s",
    ]);
}

fn ready_replicas(b: &Baton, deploy: &str) -> String {
    jsonpath(b, &["deploy", deploy], "{.status.readyReplicas}")
}

/// The live (not terminating) pods with a label.
fn live_pods(b: &Baton, selector: &str) -> Vec<String> {
    let out = jsonpath(
        b,
        &["pods", "-l", selector],
        "{range .items[?(@.metadata.deletionTimestamp)]}{.metadata.name}{\"\\n\"}{end}",
    );
    let terminating: BTreeSet<&str> = out.lines().collect();
    let all = jsonpath(b, &["pods", "-l", selector], "{.items[*].metadata.name}");
    all.split_whitespace()
        .filter(|p| !terminating.contains(p))
        .map(String::from)
        .collect()
}

#[test]
fn a_deployment_behind_a_nodeport_scales_rolls_without_errors_and_rolls_back() {
    let _serial = serial();
    let b = Baton::start_cluster();
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&web("v1", 3)));
    wait_for(&b, 60, "3 ready replicas", || {
        (ready_replicas(&b, "web") == "3").then_some(())
    });
    let port: u16 = jsonpath(&b, &["svc", "web"], "{.spec.ports[0].nodePort}")
        .parse()
        .expect("a node port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Every replica answers through the node port.
    let mut seen = BTreeSet::new();
    wait_for(&b, 30, "answers from all 3 replicas", || {
        if let Ok((200, body)) = http_get(addr, "/hi") {
            assert!(body.starts_with("v1 from web-"), "{body}");
            seen.insert(body.split_whitespace().nth(2).unwrap_or("").to_string());
        }
        (seen.len() == 3).then_some(())
    });

    // Scale up and down.
    b.ok(&["scale", "deploy/web", "--replicas=5"]);
    wait_for(&b, 60, "5 ready replicas", || {
        (ready_replicas(&b, "web") == "5").then_some(())
    });
    b.ok(&["scale", "deploy/web", "--replicas=1"]);
    wait_for(&b, 60, "1 live pod", || {
        (live_pods(&b, "app=web").len() == 1 && ready_replicas(&b, "web") == "1").then_some(())
    });
    b.ok(&["scale", "deploy/web", "--replicas=3"]);
    wait_for(&b, 60, "3 ready replicas again", || {
        (ready_replicas(&b, "web") == "3").then_some(())
    });

    // A rolling update under load: not one request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, failures, bodies) = (stop.clone(), failures.clone(), bodies.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get(addr, "/load") {
                    Ok((200, body)) => bodies.lock().unwrap().push(body),
                    other => {
                        eprintln!("failed request during the rollout: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    wait_for(&b, 10, "the load loop to run", || {
        (bodies.lock().unwrap().len() > 10).then_some(())
    });
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&web("v2", 3)));
    b.ok(&["rollout", "status", "deploy/web", "--timeout=120s"]);
    wait_for(&b, 30, "only v2 answers", || {
        let b = bodies.lock().unwrap();
        (b.len() > 20 && b[b.len() - 10..].iter().all(|x| x.starts_with("v2"))).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let n = bodies.lock().unwrap().len();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests out of {n}"
    );
    assert!(bodies.lock().unwrap().iter().any(|x| x.starts_with("v1")));

    // And back.
    b.ok(&["rollout", "undo", "deploy/web"]);
    b.ok(&["rollout", "status", "deploy/web", "--timeout=120s"]);
    wait_for(&b, 30, "v1 answers again", || {
        let ok = (0..10)
            .all(|_| matches!(http_get(addr, "/"), Ok((200, body)) if body.starts_with("v1")));
        ok.then_some(())
    });
    let history = b.ok(&["rollout", "history", "deploy/web"]);
    assert!(history.contains('2') && history.contains('3'), "{history}");
}

#[test]
fn pods_are_replaced_jobs_complete_and_crashes_back_off() {
    let _serial = serial();
    let b = Baton::start_cluster();
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&web("hi", 2)));
    wait_for(&b, 60, "2 ready replicas", || {
        (ready_replicas(&b, "web") == "2").then_some(())
    });
    // A deleted pod is replaced.
    let before = live_pods(&b, "app=web");
    b.ok(&["delete", "pod", &before[0], "--wait=true"]);
    wait_for(&b, 60, "a replacement pod", || {
        let now = live_pods(&b, "app=web");
        (now.len() == 2 && !now.contains(&before[0]) && ready_replicas(&b, "web") == "2")
            .then_some(())
    });
    let events = b.ok(&["describe", "pod", &live_pods(&b, "app=web")[0]]);
    assert!(
        events.contains("Scheduled") && events.contains("Started"),
        "{events}"
    );

    // A Job runs to completion, twice, writing to its volume.
    let job = format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: primes
spec:
  completions: 2
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: job
        image: {image}
        env:
        - {{name: "N", value: "50000"}}
        volumeMounts:
        - {{name: out, mountPath: /data}}
      volumes:
      - {{name: out, emptyDir: {{}}}}
"#,
        image = guest("job")
    );
    complete_job(&b, &job, "primes");
    assert_eq!(jsonpath(&b, &["job", "primes"], "{.status.succeeded}"), "2");
    // Its output, through the API server from the node.
    let logs = b.ok(&["logs", "job/primes"]);
    assert!(logs.contains("primes below 50000: 5133"), "{logs}");

    // `kubectl logs -f` streams lines as they are written, and ends with the container.
    let ticker = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: ticker
spec:
  restartPolicy: Never
  containers:
  - name: tick
    image: {image}
    env:
    - {{name: TICKS, value: "20"}}
    - {{name: TICK_MS, value: "150"}}
"#,
        image = guest("hello")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&ticker));
    wait_for(&b, 60, "the ticker to run", || {
        (jsonpath(&b, &["pod", "ticker"], "{.status.phase}") == "Running").then_some(())
    });
    let mut follow = b.spawn(&["logs", "-f", "ticker"]);
    let lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut ticks = Vec::new();
    for line in lines {
        let line = line.unwrap();
        if line.starts_with("tick ") {
            // The first line arrives while the container is still writing the rest.
            if ticks.is_empty() {
                assert_ne!(
                    jsonpath(&b, &["pod", "ticker"], "{.status.phase}"),
                    "Succeeded"
                );
            }
            ticks.push(line);
        }
    }
    assert!(follow.wait().unwrap().success(), "kubectl logs -f failed");
    assert_eq!(ticks.len(), 20, "{ticks:?}");
    let tail = b.ok(&["logs", "ticker", "--tail=2", "--timestamps"]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.lines().all(|l| l.contains("Z tick ")), "{tail}");

    // A crashing pod backs off, longer each time.
    let crasher = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: crasher
spec:
  containers:
  - name: crash
    image: {image}
    args: ["trap"]
"#,
        image = guest("hostile")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&crasher));
    let waiting = |b: &Baton| {
        jsonpath(
            b,
            &["pod", "crasher"],
            "{.status.containerStatuses[0].state.waiting.message}",
        )
    };
    wait_for(&b, 60, "a 10 s back-off", || {
        waiting(&b).contains("back-off 10s").then_some(())
    });
    wait_for(&b, 60, "a 20 s back-off", || {
        waiting(&b).contains("back-off 20s").then_some(())
    });
    let table = b.ok(&["get", "pod", "crasher"]);
    assert!(table.contains("CrashLoopBackOff"), "{table}");
    let restarts: u32 = jsonpath(
        &b,
        &["pod", "crasher"],
        "{.status.containerStatuses[0].restartCount}",
    )
    .parse()
    .unwrap();
    assert!(restarts >= 2, "{restarts}");
    let last = jsonpath(
        &b,
        &["pod", "crasher"],
        "{.status.containerStatuses[0].lastState.terminated.reason}",
    );
    assert_eq!(last, "Error");
    let previous = b.ok(&["logs", "crasher", "--previous"]);
    assert!(
        previous.contains("hostile guest panics on purpose"),
        "{previous}"
    );
}

#[test]
fn components_reach_their_siblings_and_other_services_by_name() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: duo
spec:
  containers:
  - name: frontend
    image: {frontend}
    ports: [{{containerPort: 8080}}]
  - name: backend
    image: {hello}
    ports: [{{containerPort: 8081}}]
    env: [{{name: GREETING, value: sibling}}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: backend
spec:
  replicas: 2
  selector:
    matchLabels: {{app: backend}}
  template:
    metadata:
      labels: {{app: backend}}
    spec:
      containers:
      - name: hello
        image: {hello}
        ports: [{{containerPort: 8080}}]
        env: [{{name: GREETING, value: service}}]
---
apiVersion: v1
kind: Service
metadata:
  name: backend
spec:
  selector: {{app: backend}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: caller
spec:
  containers:
  - name: frontend
    image: {frontend}
    ports: [{{containerPort: 8080}}]
    env: [{{name: BACKEND_URL, value: "http://backend"}}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 1
  selector:
    matchLabels: {{app: echo}}
  template:
    metadata:
      labels: {{app: echo}}
    spec:
      containers:
      - name: echo
        image: {echo}
        env: [{{name: PORT, value: "7000"}}]
        readinessProbe:
          tcpSocket: {{port: 7000}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector: {{app: echo}}
  ports: [{{port: 7000}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: tcp-client
spec:
  restartPolicy: OnFailure
  containers:
  - name: client
    image: {client}
    env:
    - {{name: TARGET, value: echo.default.svc.cluster.local}}
    - {{name: PORT, value: "7000"}}
"#,
        frontend = guest("http-frontend"),
        hello = guest("http-hello"),
        echo = guest("tcp-echo"),
        client = guest("tcp-client"),
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    b.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/duo",
        "pod/caller",
        "--timeout=60s",
    ]);
    let ip = |pod: &str| -> SocketAddr {
        let ip = jsonpath(&b, &["pod", pod], "{.status.podIP}");
        format!("{ip}:8080").parse().unwrap()
    };
    let (code, body) = http_get(ip("duo"), "/x").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("frontend got 200 OK from backend: sibling from"),
        "{body}"
    );
    wait_for(
        &b,
        60,
        "the backend Service to answer by name",
        || match http_get(ip("caller"), "/y") {
            Ok((200, body)) if body.contains("from backend: service from") => Some(()),
            _ => None,
        },
    );
    // wasi:sockets across pods, by the Service's fully qualified name.
    b.ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/tcp-client",
        "--timeout=90s",
    ]);
}

/// WASI 0.3 components run as 0.2 ones do: a handler behind a Service (the same
/// Deployment YAML, another image) answers through its NodePort and an Ingress, a command runs as a
/// Job to completion, its output in `kubectl logs`, a 0.3 and a 0.2 component share a
/// pod's localhost, and `kubectl exec` runs a 0.3 command.
#[test]
fn wasi_03_components_serve_behind_a_service_and_complete_as_jobs() {
    let _serial = serial();
    let b = Baton::start_with(&["--ingress-http-port", "0", "--ingress-https-port", "0"]);
    let app = web("hi", 2).replace(&guest("http-hello"), &guest("p3-http-hello"));
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&app));
    wait_for(&b, 60, "2 ready replicas", || {
        (ready_replicas(&b, "web") == "2").then_some(())
    });
    let port: u16 = jsonpath(&b, &["svc", "web"], "{.spec.ports[0].nodePort}")
        .parse()
        .expect("a node port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(
        &b,
        30,
        "an answer through the node port",
        || match http_get(addr, "/p3?x=1") {
            Ok((200, body)) => {
                assert!(
                    body.starts_with("hi from web-") && body.ends_with("path=/p3?x=1 wasi=0.3\n"),
                    "{body}"
                );
                Some(())
            }
            _ => None,
        },
    );
    // And through an Ingress, which calls the 0.3 handler in process.
    let ingress = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
spec:
  rules:
  - host: test
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service: {name: web, port: {number: 80}}
"#;
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(ingress));
    let ingress = baton::ingress_http_addr(&b);
    wait_for(&b, 30, "an answer through the Ingress", || {
        match http_get(ingress, "/in") {
            Ok((200, body)) if body.ends_with("path=/in wasi=0.3\n") => Some(()),
            _ => None,
        }
    });
    let job = format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: p3
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: job
        image: {image}
        args: ["x", "y"]
"#,
        image = guest("p3-hello")
    );
    complete_job(&b, &job, "p3");
    let logs = b.ok(&["logs", "job/p3"]);
    assert!(
        logs.contains(r#"hello from wasi 0.3, args=["x", "y"]"#),
        "{logs}"
    );
    // A 0.3 server and a 0.2 client in one pod, over its localhost; then `kubectl exec`
    // runs the 0.3 component as a client of its own server.
    let mixed = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: mixed
spec:
  restartPolicy: Never
  containers:
  - name: echo
    image: {p3}
    args: ["echo", "7000"]
  - name: client
    image: {p2}
    env:
    - {{name: PORT, value: "7000"}}
    - {{name: WAIT_MS, value: "20000"}}
"#,
        p3 = guest("p3-tcp"),
        p2 = guest("tcp-client")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&mixed));
    let exit_code = r#"{.status.containerStatuses[?(@.name=="client")].state.terminated.exitCode}"#;
    wait_for(&b, 60, "the 0.2 client to finish", || {
        let code = jsonpath(&b, &["pod", "mixed"], exit_code);
        (!code.is_empty()).then_some(code)
    });
    assert_eq!(jsonpath(&b, &["pod", "mixed"], exit_code), "0");
    let out = b.ok(&[
        "exec",
        "mixed",
        "-c",
        "echo",
        "--",
        "p3-tcp",
        "client",
        "localhost",
        "7000",
        "5000",
    ]);
    assert!(out.contains("echo ok from localhost:7000"), "{out}");
}

/// (pod, node) of the live pods with a label.
fn placements(b: &Baton, selector: &str) -> Vec<(String, String)> {
    let out = jsonpath(
        b,
        &["pods", "-l", selector],
        "{range .items[*]}{.metadata.name} {.spec.nodeName} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    );
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (pod, node) = (f.next()?, f.next()?);
            // A third field is a deletion timestamp: the pod is going.
            f.next()
                .is_none()
                .then(|| (pod.to_string(), node.to_string()))
        })
        .collect()
}

#[test]
fn a_lost_nodes_pods_come_back_on_the_other_node() {
    let _serial = serial();
    let b = Baton::start_with(&["--node-monitor-grace", "3"]);
    // A Lease shorter than the control plane's 3 s grace, renewed every 0.5 s.
    let mut n2 = second_node(&b, "n2", &["--node-lease-duration", "2"]);
    two_ready_nodes(&b);
    let manifest = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: spread
spec:
  replicas: 4
  selector:
    matchLabels: {{app: spread}}
  template:
    metadata:
      labels: {{app: spread}}
    spec:
      tolerations:
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      containers:
      - name: hello
        image: {image}
        ports: [{{containerPort: 8080}}]
"#,
        image = guest("http-hello")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    wait_for(&b, 60, "4 ready replicas on both nodes", || {
        let p = placements(&b, "app=spread");
        let on_n2 = p.iter().filter(|(_, n)| n == "n2").count();
        (ready_replicas(&b, "spread") == "4" && on_n2 > 0 && on_n2 < 4).then_some(())
    });
    // The node is lost without a word.
    n2.0.kill().unwrap();
    n2.0.wait().unwrap();
    wait_for(&b, 90, "every replica back, on the remaining node", || {
        let p = placements(&b, "app=spread");
        let all_local = p.len() == 4 && p.iter().all(|(_, n)| n == "local");
        (all_local && ready_replicas(&b, "spread") == "4").then_some(())
    });
    let ready = jsonpath(
        &b,
        &["node", "n2"],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    );
    assert_eq!(ready, "Unknown");
    let taints = jsonpath(&b, &["node", "n2"], "{.spec.taints[*].key}");
    assert!(
        taints.contains("node.kubernetes.io/unreachable"),
        "{taints}"
    );
    // The node's story as `kubectl describe` tells it: the kubelet's start (its events
    // name the node by name), the controller's registration and loss (by uid).
    let described = b.ok(&["describe", "node", "n2"]);
    for line in [
        "Starting kubelet.",
        "Node n2 status is now: NodeHasSufficientMemory",
        "Node n2 status is now: NodeReady",
        "Registered Node n2 in Controller",
        "Node n2 status is now: NodeNotReady",
    ] {
        assert!(described.contains(line), "no {line:?} in:\n{described}");
    }
}

#[test]
fn bad_input_is_reported_and_objects_are_collected() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let hello = guest("http-hello");
    let broken = b.dir.path().join("images/broken.wasm");
    std::fs::write(&broken, b"\0asm\x01\0\0\0not a component").unwrap();
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: needs-config
spec:
  containers:
  - name: web
    image: {hello}
    env:
    - name: GREETING
      valueFrom: {{configMapKeyRef: {{name: settings, key: greeting}}}}
    volumeMounts: [{{name: cfg, mountPath: /cfg}}]
  volumes:
  - {{name: cfg, configMap: {{name: settings}}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: broken
spec:
  containers:
  - name: web
    image: {broken}
---
apiVersion: v1
kind: Pod
metadata:
  name: nowhere
spec:
  nodeSelector: {{disk: floppy}}
  containers:
  - name: web
    image: {hello}
---
apiVersion: v1
kind: Pod
metadata:
  name: unhealthy
spec:
  containers:
  - name: web
    image: {hello}
    ports: [{{containerPort: 8080}}]
    livenessProbe:
      httpGet: {{path: /, port: 9999}}
      periodSeconds: 1
      failureThreshold: 2
"#,
        broken = broken.display()
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    let waiting = |b: &Baton, pod: &str| {
        jsonpath(
            b,
            &["pod", pod],
            "{.status.containerStatuses[0].state.waiting.reason} {.status.containerStatuses[0].state.waiting.message}",
        )
    };
    // A missing ConfigMap is named, and the pod starts once it exists.
    wait_for(&b, 60, "CreateContainerConfigError", || {
        let w = waiting(&b, "needs-config");
        (w.starts_with("CreateContainerConfigError") && w.contains("settings")).then_some(())
    });
    b.ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=greeting=configured",
    ]);
    b.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/needs-config",
        "--timeout=60s",
    ]);
    let ip = jsonpath(&b, &["pod", "needs-config"], "{.status.podIP}");
    let (_, body) = http_get(format!("{ip}:8080").parse().unwrap(), "/").unwrap();
    assert!(body.starts_with("configured from"), "{body}");
    // A component that is not one is refused with the reason.
    wait_for(&b, 60, "the broken image refused", || {
        let w = waiting(&b, "broken");
        (w.starts_with("CreateContainerError") && w.contains("not a")).then_some(())
    });
    // A pod that fits no node says why.
    wait_for(&b, 60, "FailedScheduling", || {
        let d = b.ok(&["describe", "pod", "nowhere"]);
        d.contains("FailedScheduling").then_some(d)
    });
    let msg = jsonpath(&b, &["pod", "nowhere"], "{.status.conditions[0].message}");
    assert!(
        msg.contains("didn't match Pod's node affinity/selector"),
        "{msg}"
    );
    // A failing liveness probe restarts the container.
    wait_for(&b, 60, "a liveness restart", || {
        let n: u32 = jsonpath(
            &b,
            &["pod", "unhealthy"],
            "{.status.containerStatuses[0].restartCount}",
        )
        .parse()
        .unwrap_or(0);
        (n >= 1).then_some(())
    });
    let events = b.ok(&["describe", "pod", "unhealthy"]);
    assert!(
        events.contains("Unhealthy") && events.contains("failed liveness probe"),
        "{events}"
    );

    // Cascading deletion: background takes the ReplicaSets and pods, orphan leaves them.
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&web("gc", 2)));
    wait_for(&b, 60, "2 ready replicas", || {
        (ready_replicas(&b, "web") == "2").then_some(())
    });
    b.ok(&[
        "delete",
        "deployment",
        "web",
        "--cascade=orphan",
        "--wait=false",
    ]);
    wait_for(&b, 30, "the Deployment gone", || {
        jsonpath(&b, &["deploy"], "{.items[*].metadata.name}")
            .is_empty()
            .then_some(())
    });
    let rs = jsonpath(&b, &["rs", "-l", "app=web"], "{.items[*].metadata.name}");
    assert!(!rs.is_empty(), "the orphaned ReplicaSet must stay");
    assert_eq!(live_pods(&b, "app=web").len(), 2);
    b.ok(&["delete", "rs", "-l", "app=web"]);
    wait_for(&b, 60, "the orphaned ReplicaSet's pods collected", || {
        live_pods(&b, "app=web").is_empty().then_some(())
    });

    // A namespace is emptied and removed; every namespace gets its default ServiceAccount.
    b.ok(&["create", "namespace", "scratch"]);
    wait_for(&b, 30, "a default ServiceAccount", || {
        b.run("kubectl", &["get", "sa", "default", "-n", "scratch"], None)
            .status
            .success()
            .then_some(())
    });
    b.ok(&[
        "create",
        "configmap",
        "c1",
        "-n",
        "scratch",
        "--from-literal=a=b",
    ]);
    b.ok(&["delete", "namespace", "scratch", "--wait=false"]);
    wait_for(&b, 60, "the namespace gone", || {
        (!b.run("kubectl", &["get", "namespace", "scratch"], None)
            .status
            .success())
        .then_some(())
    });
}

/// Old clients and charts still create ReplicationControllers: served, run as a
/// ReplicaSet is, scaled, and their pods collected with them.
#[test]
fn a_replication_controller_runs_scales_and_takes_its_pods_along() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let rc = format!(
        r#"apiVersion: v1
kind: ReplicationController
metadata:
  name: old
spec:
  replicas: 2
  template:
    metadata:
      labels: {{app: old}}
    spec:
      containers:
      - name: web
        image: {image}
"#,
        image = guest("http-hello")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&rc));
    // The selector defaults to the template's labels.
    assert_eq!(jsonpath(&b, &["rc", "old"], "{.spec.selector.app}"), "old");
    wait_for(&b, 60, "2 ready replicas", || {
        (jsonpath(&b, &["rc", "old"], "{.status.readyReplicas}") == "2").then_some(())
    });
    let table = b.ok(&["get", "rc", "old"]);
    assert!(
        table.contains("DESIRED") && table.contains("old"),
        "{table}"
    );
    b.ok(&["scale", "rc", "old", "--replicas=3"]);
    wait_for(&b, 60, "3 live pods", || {
        (live_pods(&b, "app=old").len() == 3).then_some(())
    });
    b.ok(&["delete", "rc", "old"]);
    wait_for(&b, 60, "its pods collected", || {
        live_pods(&b, "app=old").is_empty().then_some(())
    });
}

#[test]
fn kubectl_drain_stops_at_a_disruption_budget_and_goes_on_when_it_allows() {
    let _serial = serial();
    let b = Baton::start_cluster();
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&web("v1", 2)));
    let pdb = r#"{"apiVersion":"policy/v1","kind":"PodDisruptionBudget","metadata":{"name":"web"},"spec":{"minAvailable":2,"selector":{"matchLabels":{"app":"web"}}}}"#;
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(pdb));
    wait_for(&b, 60, "2 healthy pods under the budget", || {
        (jsonpath(&b, &["pdb", "web"], "{.status.currentHealthy}") == "2").then_some(())
    });
    let out = b.ok(&["get", "pdb", "web"]);
    assert!(
        out.contains("MIN AVAILABLE") && out.contains("ALLOWED DISRUPTIONS"),
        "{out}"
    );
    let node = b.ok(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
    // The budget allows no disruption: drain cordons, then keeps being refused.
    let out = b.run("kubectl", &["drain", &node, "--timeout=6s"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "drain should have stopped");
    assert!(err.contains("disruption budget"), "{err}");
    assert_eq!(live_pods(&b, "app=web").len(), 2, "nothing was evicted");
    let unschedulable = jsonpath(&b, &["node", &node], "{.spec.unschedulable}");
    assert_eq!(unschedulable, "true");

    // Once the budget allows both to go, the drain completes.
    b.ok(&[
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":null,"maxUnavailable":2}}"#,
    ]);
    wait_for(&b, 30, "the budget to allow 2 disruptions", || {
        (jsonpath(&b, &["pdb", "web"], "{.status.disruptionsAllowed}") == "2").then_some(())
    });
    let out = b.ok(&["drain", &node, "--timeout=60s"]);
    assert!(
        out.contains("evicting pod") || out.contains("evicted"),
        "{out}"
    );
    assert!(out.contains("drained"), "{out}");
    // Their replacements wait for a schedulable node, and run once it is back.
    b.ok(&["uncordon", &node]);
    wait_for(&b, 60, "2 ready replicas again", || {
        (ready_replicas(&b, "web") == "2").then_some(())
    });
}

/// Kills a second node agent when the test ends, however it ends.
struct NodeProcess(std::process::Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn two_ready_nodes(b: &Baton) {
    wait_for(b, 60, "two Ready nodes", || {
        let ready = jsonpath(
            b,
            &["nodes"],
            "{range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        );
        (ready.lines().filter(|s| *s == "True").count() == 2).then_some(())
    });
}

fn second_node(b: &Baton, name: &str, extra: &[&str]) -> NodeProcess {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["node", "--node-name", name])
        .args(extra)
        .arg("--kubeconfig")
        .arg(&b.kubeconfig)
        .arg("--data-dir")
        .arg(b.dir.path().join(name))
        .arg("--local-images")
        .arg(baton::guests_dir())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("baton node");
    NodeProcess(child)
}

#[test]
fn a_daemonset_lands_on_both_nodes_and_follows_their_labels() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let _n2 = second_node(&b, "n2", &[]);
    two_ready_nodes(&b);
    let manifest = format!(
        r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
spec:
  selector:
    matchLabels: {{app: agent}}
  template:
    metadata:
      labels: {{app: agent}}
    spec:
      containers:
      - name: agent
        image: {image}
        env:
        - {{name: TICKS, value: "100000"}}
        - {{name: TICK_MS, value: "1000"}}
"#,
        image = guest("hello")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    wait_for(&b, 90, "an agent running on each node", || {
        let mut nodes: Vec<String> = placements(&b, "app=agent")
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        nodes.sort();
        let ready = jsonpath(&b, &["ds", "agent"], "{.status.numberReady}");
        (nodes == ["local", "n2"] && ready == "2").then_some(())
    });
    let out = b.ok(&["get", "ds", "agent"]);
    assert!(out.contains("DESIRED") && out.contains("agent"), "{out}");

    // A node selector that only n2 matches: the other agent goes.
    b.ok(&["label", "node", "n2", "role=edge"]);
    b.ok(&[
        "patch",
        "ds",
        "agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"role":"edge"}}}}}"#,
    ]);
    wait_for(&b, 90, "one agent, on n2", || {
        let p = placements(&b, "app=agent");
        let desired = jsonpath(&b, &["ds", "agent"], "{.status.desiredNumberScheduled}");
        (p.len() == 1 && p[0].1 == "n2" && desired == "1").then_some(())
    });

    // The API server reaches n2's endpoint over the node link's mutual TLS (its own node
    // it calls in-process): the agent's logs and an exec come back from there.
    let pod = placements(&b, "app=agent")[0].0.clone();
    wait_for(&b, 60, "the agent's logs from n2", || {
        let out = b.ok(&["logs", &pod]);
        out.contains("hello from a baton pod").then_some(())
    });
    // The agent's command ticks on: the exec is read until its first line, then stopped.
    let mut exec = b.spawn(&["exec", &pod, "--", "hello", "from-exec"]);
    // The reader stays open until the end: kubectl would die of a closed pipe at its
    // next line.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(exec.stdout.take().unwrap()));
    let first = lines.next().and_then(Result::ok);
    // The API server's splice to n2 holds the session's count while it lasts.
    wait_for(&b, 30, "the exec to n2 counted as long-running", || {
        (b.streams_running("exec") == 1).then_some(())
    });
    let _ = exec.kill();
    let _ = exec.wait();
    drop(lines);
    assert_eq!(
        first.as_deref(),
        Some(r#"hello from a baton pod: args=["from-exec"]"#)
    );
    wait_for(&b, 30, "the exec to n2 no longer counted", || {
        (b.streams_running("exec") == 0).then_some(())
    });
}

#[test]
fn a_statefulset_scales_in_order_and_keeps_its_volume_across_a_pod_deletion() {
    let _serial = serial();
    let b = Baton::start_cluster();
    let manifest = format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: db
spec:
  clusterIP: None
  selector: {{app: db}}
  ports: [{{port: 80}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  serviceName: db
  replicas: 2
  selector:
    matchLabels: {{app: db}}
  template:
    metadata:
      labels: {{app: db}}
    spec:
      containers:
      - name: db
        image: {image}
        env:
        - {{name: TICKS, value: "100000"}}
        - {{name: TICK_MS, value: "1000"}}
        - {{name: STATE_FILE, value: /data/state}}
        - name: STATE
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        volumeMounts:
        - {{name: data, mountPath: /data}}
      - name: echo
        image: {echo}
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{requests: {{storage: 1Gi}}}}
"#,
        image = guest("hello"),
        echo = guest("tcp-echo"),
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    wait_for(&b, 120, "two ready replicas", || {
        (jsonpath(&b, &["sts", "db"], "{.status.readyReplicas}") == "2").then_some(())
    });
    // In order: db-1 was made only once db-0 was ready.
    let ready_at = jsonpath(
        &b,
        &["pod", "db-0"],
        "{.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
    );
    let made_at = jsonpath(&b, &["pod", "db-1"], "{.metadata.creationTimestamp}");
    assert!(
        made_at >= ready_at,
        "db-1 made at {made_at}, db-0 ready at {ready_at}"
    );
    let claims = b.ok(&["get", "pvc"]);
    assert!(
        claims.contains("data-db-0") && claims.contains("data-db-1") && claims.contains("Bound"),
        "{claims}"
    );
    assert!(
        b.ok(&["logs", "db-0"]).contains("state written: db-0"),
        "db-0 did not write its state"
    );

    // A deleted replica comes back under its name, and finds what it wrote.
    let uid = jsonpath(&b, &["pod", "db-0"], "{.metadata.uid}");
    b.ok(&["delete", "pod", "db-0"]);
    wait_for(&b, 90, "db-0 back and ready", || {
        let now = jsonpath(&b, &["pod", "db-0"], "{.metadata.uid}");
        let ready = jsonpath(
            &b,
            &["pod", "db-0"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        );
        (!now.is_empty() && now != uid && ready == "True").then_some(())
    });
    let logs = b.ok(&["logs", "db-0"]);
    assert!(logs.contains("state found: db-0"), "{logs}");

    // Each replica has a name of its own under the headless Service.
    let client = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: db-client
spec:
  restartPolicy: Never
  containers:
  - name: client
    image: {client}
    env:
    - {{name: TARGET, value: db-1.db.default.svc.cluster.local}}
    - {{name: PORT, value: "7000"}}
"#,
        client = guest("tcp-client")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&client));
    b.ok(&[
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        "pod/db-client",
        "--timeout=60s",
    ]);

    // Scaling down removes the highest replica; its claim stays for a later scale-up.
    b.ok(&["scale", "sts", "db", "--replicas=1"]);
    wait_for(&b, 90, "db-1 gone", || {
        let pods = live_pods(&b, "app=db");
        (pods == ["db-0"]).then_some(())
    });
    let claims = b.ok(&["get", "pvc", "data-db-1"]);
    assert!(claims.contains("Bound"), "{claims}");

    // A claim in use is kept until its pod is gone; then its volume and data go.
    let in_use_pv = jsonpath(&b, &["pvc", "data-db-0"], "{.spec.volumeName}");
    b.ok(&["delete", "pvc", "data-db-0", "--wait=false"]);
    let kept = jsonpath(&b, &["pvc", "data-db-0"], "{.metadata.finalizers}");
    assert!(kept.contains("kubernetes.io/pvc-protection"), "{kept}");
    let pv = jsonpath(&b, &["pvc", "data-db-1"], "{.spec.volumeName}");
    let data = b.dir.path().join("data/node/local-volumes").join(&pv);
    assert!(
        data.join("state").exists(),
        "{} has no state",
        data.display()
    );
    b.ok(&["delete", "pvc", "data-db-1"]);
    wait_for(&b, 90, "the released volume and its data gone", || {
        let left = b.ok(&["get", "pv", "-o", "name"]);
        (!left.contains(&pv) && !data.exists()).then_some(())
    });
    assert!(
        b.ok(&["get", "pv", "-o", "name"]).contains(&in_use_pv),
        "the volume of a claim in use went"
    );
}
