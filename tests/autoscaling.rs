//! The HorizontalPodAutoscaler, end to end: `kubectl autoscale` of a CPU-bound
//! Deployment under a load loop, scaled up by its CPU and back down once the load stops,
//! each step told in its status and events; an autoscaler whose target is missing; and a
//! function scaled to zero by its request rate, woken by its next requests through an
//! Ingress and through a Service.

#[path = "support/baton.rs"]
mod baton;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::Duration;

use baton::{http_get, http_get_within, jsonpath, wait_for, Baton};

fn busy() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: busy
spec:
  replicas: 1
  selector:
    matchLabels: {{app: busy}}
  template:
    metadata:
      labels: {{app: busy}}
    spec:
      containers:
      - name: work
        image: {image}
        ports: [{{containerPort: 8080}}]
        resources:
          requests: {{cpu: 100m}}
---
apiVersion: v1
kind: Service
metadata:
  name: busy
spec:
  type: NodePort
  selector: {{app: busy}}
  ports:
  - {{port: 80, targetPort: 8080}}
"#,
        image = baton::guest("http-hostile")
    )
}

#[test]
fn a_cpu_bound_deployment_scales_up_under_load_and_back_down_after_the_window() {
    let b = Baton::start_with(&["--horizontal-pod-autoscaler-sync-period", "1"]);
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&busy()));
    wait_for(&b, 60, "the first replica ready", || {
        (jsonpath(&b, &["deploy", "busy"], "{.status.readyReplicas}") == "1").then_some(())
    });
    // What users type, then short windows for a test.
    b.ok(&[
        "autoscale",
        "deployment",
        "busy",
        "--cpu-percent=50",
        "--min=1",
        "--max=3",
    ]);
    b.ok(&[
        "patch",
        "hpa",
        "busy",
        "--type=merge",
        "-p",
        r#"{"spec":{"behavior":{"scaleDown":{"stabilizationWindowSeconds":5,"policies":[{"type":"Percent","value":100,"periodSeconds":1}]},"scaleUp":{"stabilizationWindowSeconds":0}}}}"#,
    ]);
    let port: u16 = jsonpath(&b, &["svc", "busy"], "{.spec.ports[0].nodePort}")
        .parse()
        .unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // Idle, it stays at one.
    wait_for(&b, 30, "the autoscaler's first reading", || {
        let m = jsonpath(
            &b,
            &["hpa", "busy"],
            "{.status.currentMetrics[0].resource.current.averageUtilization}",
        );
        (!m.is_empty()).then_some(())
    });
    assert_eq!(jsonpath(&b, &["deploy", "busy"], "{.spec.replicas}"), "1");

    // A load loop of 20 ms of CPU per request, from four clients.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = http_get(addr, "/work");
                }
            })
        })
        .collect();
    wait_for(&b, 90, "scaled up to 3 under load", || {
        (jsonpath(&b, &["deploy", "busy"], "{.spec.replicas}") == "3").then_some(())
    });
    let described = b.ok(&["describe", "hpa", "busy"]);
    for text in [
        "SuccessfulRescale",
        "cpu resource utilization (percentage of request) above target",
        "ValidMetricFound",
    ] {
        assert!(described.contains(text), "no {text:?} in:\n{described}");
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    // Idle again: back to one after the 5 s window.
    wait_for(&b, 120, "scaled back down to 1", || {
        (jsonpath(&b, &["deploy", "busy"], "{.spec.replicas}") == "1").then_some(())
    });
    let events = b.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=HorizontalPodAutoscaler,reason=SuccessfulRescale",
    ]);
    assert!(
        events.contains("New size: 1; reason: All metrics below target"),
        "{events}"
    );
    let status = jsonpath(
        &b,
        &["hpa", "busy"],
        "{.status.currentReplicas}/{.status.desiredReplicas}",
    );
    assert!(status.ends_with("/1"), "{status}");
    assert!(!jsonpath(&b, &["hpa", "busy"], "{.status.lastScaleTime}").is_empty());

    // An autoscaler whose target does not exist says so, and scales nothing.
    let missing = r#"apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: orphan
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: nowhere}
  minReplicas: 1
  maxReplicas: 4
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
"#;
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(missing));
    let reason = wait_for(&b, 30, "the missing target in the conditions", || {
        let r = jsonpath(
            &b,
            &["hpa", "orphan"],
            "{.status.conditions[?(@.type==\"AbleToScale\")].reason}",
        );
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(reason, "FailedGetScale");
    let described = b.ok(&["describe", "hpa", "orphan"]);
    assert!(described.contains("FailedGetScale"), "{described}");
    assert!(described.contains("nowhere"), "{described}");
}

fn function() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: fn
spec:
  replicas: 1
  selector:
    matchLabels: {{app: fn}}
  template:
    metadata:
      labels: {{app: fn}}
    spec:
      containers:
      - name: handler
        image: {image}
        ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata:
  name: fn
spec:
  type: NodePort
  selector: {{app: fn}}
  ports:
  - {{port: 80, targetPort: 8080}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: fn
spec:
  rules:
  - http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: fn, port: {{number: 80}}}}}}}}
"#,
        image = baton::guest("http-hostile")
    )
}

/// The function's autoscaler: to zero after 3 s without a request.
const FUNCTION_HPA: &str = r#"apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: fn
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: fn}
  minReplicas: 0
  maxReplicas: 3
  metrics:
  - type: Pods
    pods:
      metric: {name: http_requests_per_second}
      target: {type: AverageValue, averageValue: "100"}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 3
      policies: [{type: Percent, value: 100, periodSeconds: 1}]
"#;

/// The first directory called `name` under `root`, at most `depth` levels down.
fn find_dir(root: &std::path::Path, name: &str, depth: usize) -> Option<std::path::PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    let dirs: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    if let Some(found) = dirs
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == name))
    {
        return Some(found.clone());
    }
    if depth == 0 {
        return None;
    }
    dirs.iter().find_map(|d| find_dir(d, name, depth - 1))
}

#[test]
fn an_idle_function_scales_to_zero_and_its_first_requests_wake_it_once() {
    let b = Baton::start_with(&[
        "--horizontal-pod-autoscaler-sync-period",
        "1",
        "--ingress-http-port",
        "0",
        "--ingress-https-port",
        "0",
    ]);
    let ingress = baton::ingress_http_addr(&b);

    // Scale to zero needs a metric that still means something at zero.
    let cpu_only = r#"apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: cpu-only
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: fn}
  minReplicas: 0
  maxReplicas: 3
"#;
    let refused = b.fails(&["apply", "-f", "-"], Some(cpu_only));
    assert!(refused.contains("spec.minReplicas"), "{refused}");

    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&function()));
    wait_for(&b, 60, "the first replica ready", || {
        (jsonpath(&b, &["deploy", "fn"], "{.status.readyReplicas}") == "1").then_some(())
    });
    // The Deployment counts the replica ready before its EndpointSlice reaches the
    // node's routes, as in Kubernetes: the Ingress answers once it has.
    wait_for(&b, 30, "the Ingress to route to the replica", || {
        let (code, body) = http_get(ingress, "/").ok()?;
        ((code, body.as_str()) == (200, "ok\n")).then_some(())
    });

    // The request rate, counted in the sandbox, served as a custom metric.
    let discovery = b.ok(&["get", "--raw", "/apis/custom.metrics.k8s.io/v1beta2"]);
    assert!(
        discovery.contains("pods/http_requests_per_second")
            && discovery.contains("pods/http_requests_in_flight"),
        "{discovery}"
    );
    let list = wait_for(&b, 30, "the pod's request rate", || {
        let raw = b.ok(&[
            "get",
            "--raw",
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/http_requests_per_second?labelSelector=app%3Dfn",
        ]);
        raw.contains("describedObject").then_some(raw)
    });
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["kind"], "MetricValueList");
    assert_eq!(list["items"][0]["describedObject"]["kind"], "Pod");
    assert_eq!(
        list["items"][0]["metric"]["name"],
        "http_requests_per_second"
    );
    let missing = b.fails(
        &[
            "get",
            "--raw",
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/nowhere/http_requests_per_second",
        ],
        None,
    );
    assert!(
        missing.contains("NotFound") || missing.contains("not found"),
        "{missing}"
    );

    // The autoscaler, once the function has served (one with minReplicas 0 takes even a
    // function that never served to zero after its window).
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(FUNCTION_HPA));

    // Idle: after the 3 s window with no request, to zero.
    wait_for(&b, 90, "scaled to zero when idle", || {
        (jsonpath(&b, &["deploy", "fn"], "{.spec.replicas}") == "0").then_some(())
    });
    wait_for(&b, 60, "its pod gone", || {
        b.ok(&["get", "pods", "-l", "app=fn", "-o", "name"])
            .trim()
            .is_empty()
            .then_some(())
    });
    let reason = wait_for(&b, 30, "the autoscaler at zero", || {
        let r = jsonpath(
            &b,
            &["hpa", "fn"],
            "{.status.conditions[?(@.type==\"ScalingActive\")].reason}",
        );
        (r == "ScaledToZero").then_some(r)
    });
    assert_eq!(reason, "ScaledToZero");
    let generation = jsonpath(&b, &["deploy", "fn"], "{.metadata.generation}");

    // Fifty first requests at once through the Ingress: each is held while the node
    // wakes the function, and all are answered.
    let answers: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(move || http_get_within(ingress, "/", Duration::from_secs(40))))
        .collect();
    for a in answers {
        let (code, body) = a.join().unwrap().expect("an answer from zero");
        assert_eq!((code, body.as_str()), (200, "ok\n"));
    }
    assert_eq!(jsonpath(&b, &["deploy", "fn"], "{.spec.replicas}"), "1");
    let woken = jsonpath(&b, &["deploy", "fn"], "{.metadata.generation}");
    assert_eq!(
        woken.parse::<u64>().unwrap(),
        generation.parse::<u64>().unwrap() + 1,
        "the burst scaled the Deployment once"
    );
    // The component was on the node, so the held requests were answered from a standby
    // of the template while the pod came up: it kept the container's output apart.
    let standby = find_dir(&b.dir.path().join("data"), "standby", 4)
        .expect("the node ran a standby of the function");
    assert!(
        standby
            .join("default_Deployment_fn")
            .join("handler.log")
            .exists(),
        "{}",
        standby.display()
    );

    // Idle again, then a raw connection to the Service's NodePort wakes it the same way.
    wait_for(&b, 90, "back to zero", || {
        (jsonpath(&b, &["deploy", "fn"], "{.spec.replicas}") == "0").then_some(())
    });
    let node_port: u16 = jsonpath(&b, &["svc", "fn"], "{.spec.ports[0].nodePort}")
        .parse()
        .unwrap();
    let (code, _) = http_get_within(
        ([127, 0, 0, 1], node_port).into(),
        "/",
        Duration::from_secs(40),
    )
    .expect("an answer from zero through the Service");
    assert_eq!(code, 200);
    // Woken again, though a standby may have answered before the pod was up.
    wait_for(&b, 60, "woken again through the Service", || {
        (jsonpath(&b, &["deploy", "fn"], "{.status.readyReplicas}") == "1").then_some(())
    });

    // A workload scaled to zero by hand (no autoscaler may wake it) stays off: the
    // Ingress answers 503 at once.
    b.ok(&["delete", "hpa", "fn"]);
    b.ok(&["scale", "deploy", "fn", "--replicas=0"]);
    wait_for(&b, 60, "no endpoint left", || {
        let (code, _) = http_get(ingress, "/").ok()?;
        (code == 503).then_some(())
    });
    assert_eq!(jsonpath(&b, &["deploy", "fn"], "{.spec.replicas}"), "0");
}
