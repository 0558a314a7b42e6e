//! Trace context across Baton's hops, so that one `kubectl apply` can be followed as one
//! trace: kubectl → API server → store commit → watch → controllers → scheduler bind →
//! node start.
//!
//! Spans are `tracing` spans; the binary exports them over OTLP when `--otlp-endpoint` is
//! given, and only spans of target [`TARGET`] (one per unit of work: an API request, a
//! store commit, a reconcile, a scheduling attempt, a pod start). Without an exporter
//! every function here is a cheap no-op: there is no OpenTelemetry context to read.
//!
//! Context crosses two kinds of hop:
//! - **HTTP**, as W3C `traceparent`: kube clients made by [`client`](crate::client) add
//!   the current span's context to each request ([`layer`]), and the API server parents
//!   its request span on it ([`set_parent_from_headers`]).
//! - **Watch.** A watch event carries no headers, so the API server writes the context of
//!   the write that last set an object's desired state into its annotation [`ANNOTATION`]
//!   ([`current_traceparent`]), and whoever acts on the object later (a controller, the
//!   scheduler, the node) parents its span on it ([`follow`]). Kubernetes' own tracing
//!   stops at each process; this annotation is what joins them.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The annotation holding the W3C `traceparent` of the write that last set an object's
/// desired state (a create, an update of the object itself, a scale, a binding).
pub const ANNOTATION: &str = "baton.dev/traceparent";

/// The `tracing` target of the spans that are exported: one per unit of work.
pub const TARGET: &str = "baton::trace";

const HEADER: &str = "traceparent";

/// The `traceparent` of `span`, if it is being traced and sampled.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() || !sc.is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(HEADER)
}

/// The `traceparent` of the current span, if it is being traced and sampled.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the remote span `traceparent` names. A missing or malformed
/// value leaves the span where it was: a bad header must not break a request.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let Some(tp) = traceparent.filter(|t| !t.is_empty() && t.len() <= 128) else {
        return;
    };
    let carrier = HashMap::from([(HEADER.to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        // Fails only once the span has been entered, which ours never are yet.
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of the request that carried `headers`' `traceparent`.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    set_parent(span, headers.get(HEADER).and_then(|v| v.to_str().ok()));
}

/// Makes `span` a child of the write that last set `meta`'s object's desired state.
pub fn follow(span: &tracing::Span, meta: &ObjectMeta) {
    set_parent(
        span,
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION))
            .map(String::as_str),
    );
}

/// Adds the current span's `traceparent` to a request's headers, replacing any.
pub fn inject(headers: &mut http::HeaderMap) {
    if let Some(tp) = current_traceparent() {
        if let Ok(v) = http::HeaderValue::from_str(&tp) {
            headers.insert(HEADER, v);
        }
    }
}

/// A kube client layer that sends the calling span's context with every request. kube's
/// client runs requests on a buffer task, which enters the caller's span first, so the
/// current span here is the caller's.
pub fn layer<B>() -> tower::util::MapRequestLayer<fn(http::Request<B>) -> http::Request<B>> {
    fn add<B>(mut req: http::Request<B>) -> http::Request<B> {
        inject(req.headers_mut());
        req
    }
    tower::util::MapRequestLayer::new(add::<B>)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    const REMOTE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn nothing_is_stamped_without_an_exporter() {
        let span = tracing::info_span!(target: TARGET, "work");
        set_parent(&span, Some(REMOTE));
        let _g = span.enter();
        assert_eq!(current_traceparent(), None);
        let mut headers = http::HeaderMap::new();
        inject(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_span_continues_the_trace_it_is_given() {
        traced(|| {
            let span = tracing::info_span!(target: TARGET, "work");
            set_parent(&span, Some(REMOTE));
            let _g = span.enter();
            let tp = current_traceparent().unwrap();
            // Same trace, a new span of its own, sampled.
            assert!(
                tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{tp}"
            );
            assert!(!tp.contains("00f067aa0ba902b7"), "{tp}");
            assert!(tp.ends_with("-01"), "{tp}");
            let mut headers = http::HeaderMap::new();
            inject(&mut headers);
            assert_eq!(headers.get("traceparent").unwrap(), tp.as_str());
        });
    }

    #[test]
    fn an_object_annotation_is_followed_and_junk_ignored() {
        traced(|| {
            let meta = ObjectMeta {
                annotations: Some([(ANNOTATION.to_string(), REMOTE.to_string())].into()),
                ..Default::default()
            };
            let span = tracing::info_span!(target: TARGET, "reconcile");
            follow(&span, &meta);
            assert!(traceparent_of(&span)
                .unwrap()
                .contains("4bf92f3577b34da6a3ce929d0e0e4736"));
            for junk in ["", "00-zz-yy-01", &"0".repeat(4096)] {
                let span = tracing::info_span!(target: TARGET, "root");
                set_parent(&span, Some(junk));
                // A root of its own trace, not the junk's.
                let tp = traceparent_of(&span).unwrap();
                assert!(!tp.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{tp}");
            }
        });
    }
}
