//! wasi:otel (`0.2.0-rc.2`, as Spin's SDK imports it): a component's own telemetry.
//!
//! - **Spans** a component ends (`tracing.on-end`) go to the node's trace exporter, as a
//!   [`GuestSpan`] handed to the runtime's [`SpanSink`]; a node that exports no traces
//!   drops them and counts them.
//! - **`outer-span-context`** is the trace context of the request the instance serves
//!   (its `traceparent`), so a component's spans join the trace the request came with.
//! - **Metrics** are dropped and counted: the node has no metrics exporter yet.
//! - **Log records** become lines of the container's log (`SEVERITY otel: body`), as
//!   wasi:logging's do, and are counted.
//!
//! The functions are defined with dynamic types ([`Val`]) rather than generated ones:
//! the interface's records are large and change between drafts, and the host reads
//! only a few fields. A value of another shape than expected is ignored, not trusted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use wasmtime::component::{Linker, Val};

use crate::host::Host;

const VERSIONS: &[&str] = &["0.2.0-rc.2"];

/// Attributes kept per span: the rest are counted as dropped by the span itself.
const MAX_ATTRIBUTES: usize = 128;
/// Bytes of a span's name, an attribute's key or value, or a log body kept.
const MAX_TEXT: usize = 4096;

/// One span a component ended.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// None for a root span.
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    /// `client`, `server`, `producer`, `consumer` or `internal`.
    pub kind: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Attribute values as the guest sent them (JSON-encoded OpenTelemetry values).
    pub attributes: Vec<(String, String)>,
    /// None: unset; Some(None): ok; Some(Some(message)): error.
    pub status: Option<Option<String>>,
    pub sampled: bool,
    /// The instrumentation scope's name.
    pub scope: String,
}

/// Where the spans of components go.
#[derive(Clone)]
pub struct SpanSink(pub Arc<dyn Fn(GuestSpan) + Send + Sync>);

impl std::fmt::Debug for SpanSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanSink")
    }
}

/// The node-wide state of wasi:otel: the sink, and what was forwarded or dropped.
#[derive(Default)]
pub(crate) struct Otel {
    pub sink: Option<SpanSink>,
    forwarded_spans: AtomicU64,
    dropped_spans: AtomicU64,
    dropped_metrics: AtomicU64,
    log_records: AtomicU64,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel")
            .field("sink", &self.sink.is_some())
            .finish_non_exhaustive()
    }
}

/// What wasi:otel handled, node-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OtelUsage {
    pub forwarded_spans: u64,
    pub dropped_spans: u64,
    /// Metric exports dropped (each with all its data points).
    pub dropped_metrics: u64,
    pub log_records: u64,
}

impl Otel {
    pub fn new(sink: Option<SpanSink>) -> Self {
        Self {
            sink,
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> OtelUsage {
        OtelUsage {
            forwarded_spans: self.forwarded_spans.load(Ordering::Relaxed),
            dropped_spans: self.dropped_spans.load(Ordering::Relaxed),
            dropped_metrics: self.dropped_metrics.load(Ordering::Relaxed),
            log_records: self.log_records.load(Ordering::Relaxed),
        }
    }

    fn span(&self, span: Option<GuestSpan>) {
        match (span, &self.sink) {
            (Some(span), Some(sink)) => {
                (sink.0)(span);
                self.forwarded_spans.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.dropped_spans.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn field<'a>(v: &'a Val, name: &str) -> Option<&'a Val> {
    match v {
        Val::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

fn text(v: Option<&Val>) -> Option<String> {
    match v {
        Some(Val::String(s)) => Some(bounded(s)),
        _ => None,
    }
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn time(v: Option<&Val>) -> Option<SystemTime> {
    let v = v?;
    let (Some(Val::U64(s)), Some(Val::U32(n))) = (field(v, "seconds"), field(v, "nanoseconds"))
    else {
        return None;
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(*s, *n))
}

fn attributes(v: Option<&Val>) -> Vec<(String, String)> {
    let Some(Val::List(items)) = v else {
        return Vec::new();
    };
    items
        .iter()
        .take(MAX_ATTRIBUTES)
        .filter_map(|kv| Some((text(field(kv, "key"))?, text(field(kv, "value"))?)))
        .collect()
}

/// Reads a `span-data` record; None if it is not one.
fn guest_span(v: &Val) -> Option<GuestSpan> {
    let ctx = field(v, "span-context")?;
    let trace_id = hex::<16>(&text(field(ctx, "trace-id"))?)?;
    let span_id = hex::<8>(&text(field(ctx, "span-id"))?)?;
    let parent = text(field(v, "parent-span-id")).unwrap_or_default();
    let parent_span_id = hex::<8>(&parent).filter(|p| *p != [0; 8]);
    let sampled = matches!(field(ctx, "trace-flags"), Some(Val::Flags(f)) if f.iter().any(|f| f == "sampled"));
    let kind = match field(v, "span-kind") {
        Some(Val::Enum(k)) => k.clone(),
        _ => "internal".into(),
    };
    let status = match field(v, "status") {
        Some(Val::Variant(name, payload)) => match name.as_str() {
            "ok" => Some(None),
            "error" => Some(Some(match payload.as_deref() {
                Some(Val::String(m)) => bounded(m),
                _ => String::new(),
            })),
            _ => None,
        },
        _ => None,
    };
    let scope = field(v, "instrumentation-scope")
        .and_then(|s| text(field(s, "name")))
        .unwrap_or_default();
    Some(GuestSpan {
        trace_id,
        span_id,
        parent_span_id,
        name: text(field(v, "name"))?,
        kind,
        start: time(field(v, "start-time"))?,
        end: time(field(v, "end-time"))?,
        attributes: attributes(field(v, "attributes")),
        status,
        sampled,
        scope,
    })
}

/// A `span-context` record for the trace context (`traceparent`) the instance serves,
/// or the invalid (all-zero) context if it has none.
fn span_context(traceparent: Option<&str>) -> Val {
    // version-traceid-spanid-flags
    let parts: Option<(String, String, bool)> = traceparent.and_then(|t| {
        let mut it = t.trim().split('-');
        let (_, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
        hex::<16>(trace)?;
        hex::<8>(span)?;
        let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
        Some((trace.to_string(), span.to_string(), sampled))
    });
    // A context that came with the request is, to the component, a remote one.
    let remote = parts.is_some();
    let (trace, span, sampled) = parts.unwrap_or_else(|| ("0".repeat(32), "0".repeat(16), false));
    Val::Record(vec![
        ("trace-id".into(), Val::String(trace)),
        ("span-id".into(), Val::String(span)),
        (
            "trace-flags".into(),
            Val::Flags(if sampled {
                vec!["sampled".into()]
            } else {
                vec![]
            }),
        ),
        ("is-remote".into(), Val::Bool(remote)),
        ("trace-state".into(), Val::List(Vec::new())),
    ])
}

/// A log record as a line of the container's log.
fn log_line(v: &Val) -> String {
    let opt = |name: &str| match field(v, name) {
        Some(Val::Option(Some(inner))) => Some(inner.as_ref()),
        _ => None,
    };
    let severity = match opt("severity-text") {
        Some(Val::String(s)) => bounded(s),
        _ => "INFO".into(),
    };
    let body = match opt("body") {
        Some(Val::String(s)) => bounded(s),
        _ => String::new(),
    };
    let mut line: String = format!("{severity} otel: {body}")
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    line.push('\n');
    line
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    for version in VERSIONS {
        let mut tracing = linker.instance(&format!("wasi:otel/tracing@{version}"))?;
        tracing.func_new("on-start", |_store, _ty, _params, _results| Ok(()))?;
        tracing.func_new("on-end", |store, _ty, params, _results| {
            let span = params.first().and_then(guest_span);
            store.data().otel.span(span);
            Ok(())
        })?;
        tracing.func_new("outer-span-context", |store, _ty, _params, results| {
            let parent = store
                .data()
                .hooks
                .trace
                .as_ref()
                .and_then(|t| t.parent().to_str().ok().map(str::to_string));
            if let Some(r) = results.first_mut() {
                *r = span_context(parent.as_deref());
            }
            Ok(())
        })?;
        let mut metrics = linker.instance(&format!("wasi:otel/metrics@{version}"))?;
        metrics.func_new("export", |store, _ty, _params, results| {
            store
                .data()
                .otel
                .dropped_metrics
                .fetch_add(1, Ordering::Relaxed);
            if let Some(r) = results.first_mut() {
                *r = Val::Result(Ok(None));
            }
            Ok(())
        })?;
        let mut logs = linker.instance(&format!("wasi:otel/logs@{version}"))?;
        logs.func_new_async("on-emit", |store, _ty, params, _results| {
            Box::new(async move {
                store
                    .data()
                    .otel
                    .log_records
                    .fetch_add(1, Ordering::Relaxed);
                let line = params.first().map(log_line).unwrap_or_default();
                let write = super::write_log_line(store.data(), &line);
                write.await;
                Ok(())
            })
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(trace: &str, span: &str) -> Val {
        Val::Record(vec![
            ("trace-id".into(), Val::String(trace.into())),
            ("span-id".into(), Val::String(span.into())),
            ("trace-flags".into(), Val::Flags(vec!["sampled".into()])),
            ("is-remote".into(), Val::Bool(false)),
            ("trace-state".into(), Val::List(vec![])),
        ])
    }

    fn at(s: u64) -> Val {
        Val::Record(vec![
            ("seconds".into(), Val::U64(s)),
            ("nanoseconds".into(), Val::U32(5)),
        ])
    }

    #[test]
    fn a_span_is_read_from_its_record_and_a_bad_one_is_not() {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let record = Val::Record(vec![
            ("span-context".into(), ctx(trace, "b7ad6b7169203331")),
            (
                "parent-span-id".into(),
                Val::String("00f067aa0ba902b7".into()),
            ),
            ("span-kind".into(), Val::Enum("server".into())),
            ("name".into(), Val::String("GET /".into())),
            ("start-time".into(), at(10)),
            ("end-time".into(), at(11)),
            (
                "attributes".into(),
                Val::List(vec![Val::Record(vec![
                    ("key".into(), Val::String("http.route".into())),
                    ("value".into(), Val::String("\"/\"".into())),
                ])]),
            ),
            ("events".into(), Val::List(vec![])),
            ("links".into(), Val::List(vec![])),
            (
                "status".into(),
                Val::Variant("error".into(), Some(Box::new(Val::String("boom".into())))),
            ),
        ]);
        let span = guest_span(&record).unwrap();
        assert_eq!(span.trace_id, hex::<16>(trace).unwrap());
        assert_eq!(span.parent_span_id, hex::<8>("00f067aa0ba902b7"));
        assert_eq!(span.kind, "server");
        assert_eq!(
            span.end.duration_since(span.start).unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(span.attributes, [("http.route".into(), "\"/\"".into())]);
        assert_eq!(span.status, Some(Some("boom".into())));
        assert!(span.sampled);
        // A trace id that is not 32 hex digits: not a span.
        let bad = Val::Record(vec![(
            "span-context".into(),
            ctx("xyz", "b7ad6b7169203331"),
        )]);
        assert_eq!(guest_span(&bad), None);
    }

    #[test]
    fn the_outer_context_is_the_requests_traceparent() {
        let v = span_context(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        assert!(
            matches!(field(&v, "trace-id"), Some(Val::String(t)) if t == "0af7651916cd43dd8448eb211c80319c")
        );
        assert!(matches!(field(&v, "trace-flags"), Some(Val::Flags(f)) if f == &["sampled"]));
        let none = span_context(None);
        assert!(matches!(field(&none, "span-id"), Some(Val::String(s)) if s == "0000000000000000"));
        let garbage = span_context(Some("nonsense"));
        assert!(matches!(
            field(&garbage, "is-remote"),
            Some(Val::Bool(false))
        ));
    }
}
