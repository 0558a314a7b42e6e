//! Logging to stderr, and with `--otlp-endpoint` trace export over OTLP/HTTP (protobuf).
//!
//! Only the spans of target [`baton_kube::trace::TARGET`] are exported, one per unit of
//! work (an API request, a store commit, a reconcile, a scheduling attempt, a pod
//! start), with the warnings and errors logged inside them as span events. The rest of
//! the process's spans (Raft's, the HTTP stacks', long-lived per-pod ones) stay out: a
//! trace should read as the story of one change, not of the process.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use baton_wasm_shim::platform::otel::{GuestSpan, SpanSink};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanData, SpanProcessor as _};

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The OTLP/HTTP path of traces, appended to a base endpoint as the OpenTelemetry
/// specification says for `OTEL_EXPORTER_OTLP_ENDPOINT`.
const TRACES_PATH: &str = "/v1/traces";

/// What has to outlive the async runtime: the exporter's batch, flushed at the end.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still batched. Called after the runtime is gone, since the
    /// exporter's blocking HTTP client must not run on it.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces: {e}");
            }
        }
        if let Some(g) = GUEST_SPANS.get() {
            if let Err(e) = g.shutdown() {
                eprintln!("warning: flushing components' traces: {e}");
            }
        }
    }
}

/// The batch that components' own spans (wasi:otel) are exported through, to the same
/// collector as the process's: set when traces are exported.
static GUEST_SPANS: OnceLock<BatchSpanProcessor> = OnceLock::new();

/// Where a node sends its components' spans: None when the process exports no traces
/// (the node then drops and counts them).
pub fn guest_spans() -> Option<SpanSink> {
    GUEST_SPANS.get()?;
    Some(SpanSink(Arc::new(|span| {
        if let Some(g) = GUEST_SPANS.get() {
            g.on_end(span_data(span));
        }
    })))
}

/// A component's span as the OpenTelemetry SDK exports it.
fn span_data(s: GuestSpan) -> SpanData {
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
    let flags = if s.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(s.trace_id),
            SpanId::from_bytes(s.span_id),
            flags,
            false,
            Default::default(),
        ),
        parent_span_id: s.parent_span_id.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: false,
        span_kind: match s.kind.as_str() {
            "client" => SpanKind::Client,
            "server" => SpanKind::Server,
            "producer" => SpanKind::Producer,
            "consumer" => SpanKind::Consumer,
            _ => SpanKind::Internal,
        },
        name: s.name.into(),
        start_time: s.start,
        end_time: s.end,
        attributes: s
            .attributes
            .into_iter()
            .map(|(k, v)| opentelemetry::KeyValue::new(k, attribute_value(v)))
            .collect(),
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status: match s.status {
            None => Status::Unset,
            Some(None) => Status::Ok,
            Some(Some(m)) => Status::error(m),
        },
        instrumentation_scope: opentelemetry::InstrumentationScope::builder(s.scope).build(),
    }
}

/// wasi:otel sends attribute values JSON-encoded: a JSON string is its text, a number
/// or a boolean is itself, anything else stays as its JSON.
fn attribute_value(json: String) -> opentelemetry::Value {
    match serde_json::from_str::<serde_json::Value>(&json) {
        Ok(serde_json::Value::String(s)) => s.into(),
        Ok(serde_json::Value::Bool(b)) => b.into(),
        Ok(serde_json::Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into(),
            (None, Some(f)) => f.into(),
            _ => json.into(),
        },
        _ => json.into(),
    }
}

/// The full traces URL for a base endpoint (`http://collector:4318`), or the endpoint
/// itself if it already names the traces path.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{TRACES_PATH}")
    }
}

/// Starts logging, and trace export to `otlp_endpoint` if one is given, as `service`.
/// Must run outside the async runtime (the exporter makes a blocking HTTP client).
pub fn init(otlp_endpoint: Option<&str>, service: &str) -> Result<Telemetry> {
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour for a terminal only: a log file or a pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,baton::trace=off".into()),
        );
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let url = traces_url(endpoint);
    // The exporter's HTTP client speaks TLS to an `https://` collector with rustls, whose
    // crypto is ring here as everywhere in Baton.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = || {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(&url)
            .with_timeout(Duration::from_secs(10))
            .build()
            .with_context(|| format!("setting up the OTLP exporter to {url}"))
    };
    let resource = Resource::builder()
        .with_service_name(service.to_string())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter()?)
        .build();
    // Components' spans go to the same collector, through an exporter of their own:
    // the provider's batch takes only spans its own tracer made.
    let mut guests = BatchSpanProcessor::builder(exporter()?).build();
    guests.set_resource(
        &Resource::builder()
            .with_service_name(format!("{service}-components"))
            .build(),
    );
    let _ = GUEST_SPANS.set(guests);
    let traced = Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target(baton_kube::trace::TARGET, LevelFilter::INFO)
        .with_target("openraft", LevelFilter::OFF);
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("baton"))
        .with_tracked_inactivity(false)
        .with_filter(traced);
    tracing_subscriber::registry().with(logs).with(spans).init();
    tracing::info!(endpoint = %url, service, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn a_base_endpoint_gets_the_traces_path_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/v1/traces"),
            "https://otel.example/v1/traces"
        );
    }
}
