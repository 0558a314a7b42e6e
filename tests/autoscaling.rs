//! The HorizontalPodAutoscaler, end to end: `kubectl autoscale` of a CPU-bound
//! Deployment under a load loop, scaled up by its CPU and back down once the load stops,
//! each step told in its status and events; and an autoscaler whose target is missing.

#[path = "support/baton.rs"]
mod baton;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use baton::{http_get, jsonpath, wait_for, Baton};

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
