//! `otel-probe NAME`: ends one span named NAME through wasi:otel, a child of the context
//! the host calls outer (a request's, if any), with an attribute and an error status;
//! emits a log record; exports an (empty) batch of metrics. Prints the span's ids.
wit_bindgen::generate!({ path: "wit", world: "baton:probe/otel-probe", generate_all });

use wasi::clocks::wall_clock;
use wasi::otel::types::{InstrumentationScope, KeyValue};
use wasi::otel::{logs, metrics, tracing};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "probe".into());
    let outer = tracing::outer_span_context();
    // A fresh trace if there is no outer one.
    let trace_id = if outer.trace_id.chars().all(|c| c == '0') {
        "4bf92f3577b34da6a3ce929d0e0e4736".to_string()
    } else {
        outer.trace_id.clone()
    };
    let context = tracing::SpanContext {
        trace_id: trace_id.clone(),
        span_id: "00f067aa0ba902b7".into(),
        trace_flags: tracing::TraceFlags::SAMPLED,
        is_remote: false,
        trace_state: vec![],
    };
    tracing::on_start(&context);
    let start = wall_clock::now();
    let scope = InstrumentationScope {
        name: "otel-probe".into(),
        version: None,
        schema_url: None,
        attributes: vec![],
    };
    tracing::on_end(&tracing::SpanData {
        span_context: context,
        parent_span_id: outer.span_id.clone(),
        span_kind: tracing::SpanKind::Internal,
        name: name.clone(),
        start_time: start,
        end_time: wall_clock::now(),
        attributes: vec![KeyValue {
            key: "probe.answer".into(),
            value: "42".into(),
        }],
        events: vec![],
        links: vec![],
        status: tracing::Status::Error("on purpose".into()),
        instrumentation_scope: scope.clone(),
        dropped_attributes: 0,
        dropped_events: 0,
        dropped_links: 0,
    });
    logs::on_emit(&logs::LogRecord {
        timestamp: Some(wall_clock::now()),
        observed_timestamp: None,
        severity_text: Some("WARN".into()),
        severity_number: Some(13),
        body: Some(format!("span {name} ended")),
        attributes: None,
        event_name: None,
        resource: None,
        instrumentation_scope: Some(scope),
        trace_id: Some(trace_id.clone()),
        span_id: None,
        trace_flags: None,
    });
    let exported = metrics::export(&metrics::ResourceMetrics {
        resource: wasi::otel::types::Resource {
            attributes: vec![],
            schema_url: None,
        },
        scope_metrics: vec![],
    });
    println!(
        "trace={trace_id} parent={} metrics={exported:?}",
        outer.span_id
    );
}
