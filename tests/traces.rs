//! OpenTelemetry traces: `baton up --otlp-endpoint` against a stand-in OTLP/HTTP
//! collector, and one `kubectl apply` of a Deployment followed as one trace from the API
//! server through the controllers and the scheduler to the node.

#[path = "support/baton.rs"]
mod baton;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use baton::{wait_for, Baton};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One span as the collector received it.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    attrs: HashMap<String, String>,
}

impl Span {
    fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map(String::as_str).unwrap_or("")
    }
}

/// A stand-in OTLP/HTTP collector: takes `POST /v1/traces` (protobuf) and keeps the spans.
struct Collector {
    addr: String,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &s, &r));
            }
        });
        Collector {
            addr,
            spans,
            requests,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// Answers the requests of one connection (the exporter keeps it alive).
fn serve(conn: TcpStream, spans: &Mutex<Vec<Span>>, requests: &Mutex<Vec<String>>) {
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request_line = line.trim().to_string();
        let mut length = 0usize;
        let mut content_type = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim();
            if header.is_empty() {
                break;
            }
            let (k, v) = header.split_once(':').unwrap_or((header, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap(),
                "content-type" => content_type = v.trim().to_string(),
                _ => {}
            }
        }
        assert!(length < 64 << 20, "an export of {length} bytes");
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        requests
            .lock()
            .unwrap()
            .push(format!("{request_line} {content_type}"));
        let export = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let mut got = Vec::new();
        for rs in export.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(a.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        service: service.clone(),
                        trace: s.trace_id,
                        id: s.span_id,
                        parent: s.parent_span_id,
                        name: s.name,
                        attrs: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(a.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
        spans.lock().unwrap().extend(got);
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// The chain of spans from `leaf` up to its trace's root, leaf first, or None while a
/// span of it has not arrived yet.
fn ancestry(spans: &[Span], leaf: &Span) -> Option<Vec<Span>> {
    let by_id: HashMap<&[u8], &Span> = spans
        .iter()
        .filter(|s| s.trace == leaf.trace)
        .map(|s| (s.id.as_slice(), s))
        .collect();
    let mut chain = vec![leaf.clone()];
    let mut at = leaf;
    while !at.parent.is_empty() {
        at = by_id.get(at.parent.as_slice())?;
        chain.push(at.clone());
        assert!(chain.len() < 100, "a cycle of spans: {chain:#?}");
    }
    Some(chain)
}

fn describe(chain: &[Span]) -> Vec<String> {
    chain
        .iter()
        .map(|s| {
            let mut what: Vec<_> = ["verb", "resource", "subresource", "controller", "name"]
                .iter()
                .filter(|k| !s.attr(k).is_empty())
                .map(|k| format!("{k}={}", s.attr(k)))
                .collect();
            what.sort();
            format!("{} {}", s.name, what.join(" "))
        })
        .collect()
}

#[test]
fn one_kubectl_apply_is_one_trace_from_the_api_server_to_the_node() {
    let collector = Collector::start();
    let endpoint = format!("http://{}", collector.addr);
    let b = Baton::start_with(&["--otlp-endpoint", &endpoint]);
    let manifest = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: traced
spec:
  replicas: 1
  selector:
    matchLabels: {{app: traced}}
  template:
    metadata:
      labels: {{app: traced}}
    spec:
      containers:
      - name: hello
        image: {}
        ports:
        - containerPort: 8080
"#,
        baton::guest("http-hello")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    // The node's start span ends once the API has been told the pod is Ready; the
    // exporter sends it within its batch delay.
    let (chain, spans) = wait_for(
        &b,
        90,
        "the node's start span and all its ancestors",
        || {
            let spans = collector.spans();
            let start = spans
                .iter()
                .find(|s| s.name == "start_pod" && s.attr("name").starts_with("traced-"))?;
            let chain = ancestry(&spans, start)?;
            Some((chain, spans))
        },
    );
    let story = describe(&chain);
    let root = chain.last().unwrap();
    assert_eq!(root.name, "api_request", "{story:#?}");
    assert_eq!(root.attr("verb"), "POST", "{story:#?}");
    assert_eq!(root.attr("resource"), "deployments", "{story:#?}");
    assert_eq!(root.service, "baton");
    // Each hop of the change, in order from the node back to kubectl's request: the
    // binding, the scheduling attempt, the pod's create by the ReplicaSet controller,
    // the ReplicaSet's create by the Deployment controller.
    let steps: Vec<&str> = story.iter().map(String::as_str).collect();
    let position = |want: &dyn Fn(&Span) -> bool, what: &str| {
        chain
            .iter()
            .position(want)
            .unwrap_or_else(|| panic!("no {what} in the chain: {steps:#?}"))
    };
    let bind = position(
        &|s| s.name == "api_request" && s.attr("subresource") == "binding",
        "binding",
    );
    let schedule = position(&|s| s.name == "schedule", "scheduling attempt");
    let pod_create = position(
        &|s| {
            s.name == "api_request"
                && s.attr("verb") == "POST"
                && s.attr("resource") == "pods"
                && s.attr("subresource").is_empty()
        },
        "pod create",
    );
    let rs = position(
        &|s| s.name == "reconcile" && s.attr("controller") == "replicaset",
        "ReplicaSet reconcile",
    );
    let deploy = position(
        &|s| s.name == "reconcile" && s.attr("controller") == "deployment",
        "Deployment reconcile",
    );
    assert!(
        bind < schedule && schedule < pod_create && pod_create < rs && rs < deploy,
        "out of order: {steps:#?}"
    );
    // Inside the node's start: the image and the container; inside the first request:
    // its store commit.
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace == root.trace).collect();
    let start = &chain[0];
    for name in ["pull_image", "start_container"] {
        assert!(
            trace.iter().any(|s| s.name == name && s.parent == start.id),
            "no {name} under the pod's start: {:#?}",
            describe(&trace.iter().map(|s| (*s).clone()).collect::<Vec<_>>())
        );
    }
    assert!(
        trace
            .iter()
            .any(|s| s.name == "store_commit" && s.parent == root.id && s.attr("op") == "create"),
        "no store commit under the create"
    );
    // The exporter spoke OTLP/HTTP with protobuf, to the traces path.
    let requests = collector.requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("POST /v1/traces ") && r.ends_with("application/x-protobuf")),
        "{requests:?}"
    );
    // The Deployment carries the context its controllers continued.
    let annotation = baton::jsonpath(
        &b,
        &["deploy", "traced"],
        "{.metadata.annotations.baton\\.dev/traceparent}",
    );
    let hex: String = root.trace.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        annotation.contains(&hex),
        "{annotation} is not in trace {hex}"
    );
}

/// A component's own span (wasi:otel) reaches the same collector, as a span of the
/// node's components; its log record is in `kubectl logs`.
#[test]
fn a_components_spans_reach_the_collector() {
    let collector = Collector::start();
    let endpoint = format!("http://{}", collector.addr);
    let b = Baton::start_with(&["--otlp-endpoint", &endpoint]);
    let manifest = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: probe
  annotations:
    baton.dev/capabilities: otel
spec:
  restartPolicy: Never
  containers:
  - name: probe
    image: {}
    args: ["from-a-pod"]
"#,
        baton::guest("otel-probe")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    let span = wait_for(&b, 60, "the component's span at the collector", || {
        collector
            .spans()
            .into_iter()
            .find(|s| s.name == "from-a-pod")
    });
    assert!(span.service.ends_with("-components"), "{span:?}");
    assert_eq!(span.attr("probe.answer"), "42");
    assert_eq!(hex(&span.trace), "4bf92f3577b34da6a3ce929d0e0e4736");
    let logs = b.ok(&["logs", "probe"]);
    assert!(logs.contains("WARN otel: span from-a-pod ended"), "{logs}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
