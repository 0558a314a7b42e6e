//! Serving `wasi:http/incoming-handler` components: a fresh instance per request, from one
//! pre-instantiated component.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use tokio::net::TcpListener;
use tokio::sync::oneshot::error::RecvError;
use tokio::task::JoinHandle;
use tracing::Instrument;
use wasmtime::component::Component;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::p3::Request as P3Request;
use wasmtime_wasi_http::WasiHttpView;

use crate::cli::{exit_of, wasi_ctx};

mod reuse;
use crate::error::{chain, ShimError};
use crate::host::Host;
use crate::runtime::{ComponentKind, Runtime};
use crate::usage::{AbortOnDrop, TaskCommand, TaskKind};
pub use reuse::InstanceReuse;

/// How long a client of an HTTPS component has to finish its TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// How to serve one HTTP component.
#[derive(Clone, Debug, Default)]
pub struct HttpSpec {
    pub env: Vec<(String, String)>,
    /// Node directories each request instance sees (opened afresh per request, so that a
    /// volume's update is seen by the next request).
    pub mounts: Vec<crate::cli::Mount>,
    /// Serve HTTPS with this certificate instead of plain HTTP: a component cannot
    /// terminate TLS itself, so the sandbox does it for it (an admission webhook, which
    /// the API server calls only over HTTPS, is the case in point).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Linear memory cap per request instance; 0 means the runtime's maximum.
    pub memory_bytes: usize,
    /// Budget of one request; None lets a request run as long as its client waits.
    pub request_timeout: Option<Duration>,
    /// Where the request instances' stdout and stderr go; None discards them.
    pub log: Option<crate::logs::ContainerLog>,
    /// The platform interfaces it is granted, and their backing.
    pub platform: crate::platform::Platform,
    /// For a WASI 0.3 handler: serve several requests per instance, several at once.
    /// None (the default): a fresh instance per request, whatever the version.
    pub reuse: Option<InstanceReuse>,
}

/// A running HTTP component; stops serving when dropped (at once) or shut down (after
/// finishing its requests).
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    /// Its entry among the runtime's local servers, removed with it.
    _local: Option<Registration>,
    task: JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<Duration>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// Fires when the server's future, listener and connections included, is dropped.
    gone: Option<crate::pod::Gone>,
}

impl HttpServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops taking connections and lets the requests in flight finish, for at most
    /// `grace`; what is still running then is cut off. Returns once the listener and the
    /// connections are closed, so that the port can be bound again at once (a restart, or
    /// another pod given the same address).
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            if stop.send(grace).is_ok() {
                let _ = tokio::time::timeout(grace + Duration::from_secs(1), &mut self.task).await;
            }
        }
        self.task.abort();
        if let Some(gone) = self.gone.take() {
            gone.wait().await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Serving {
    /// Set when the server stops: every request instance still running (one whose
    /// response was already sent included) ends at its next tick.
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// Set when a graceful stop begins: no new in-process call is taken.
    draining: std::sync::atomic::AtomicBool,
    /// In-process calls under way, to the end of their response bodies: a graceful stop
    /// waits for them as it waits for its connections.
    local_calls: tokio::sync::watch::Sender<usize>,
    net: Arc<crate::net::PodNet>,
    runtime: Runtime,
    pre: HttpPre,
    spec: HttpSpec,
    /// The container it serves for: its requests are counted there, as tasks of their own.
    container: Option<String>,
    /// That container's account, where its requests and failures are counted (one of
    /// its own for a component served alone).
    tally: Arc<crate::usage::Tally>,
    /// The instances serving several requests each, for a 0.3 handler that reuses them.
    pool: Option<reuse::Pool>,
}

/// A future to await where its kind depends on the component's WASI version.
type Boxed<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// A component's answer to a request: its response, or the error code it gave instead.
type Answer = Result<hyper::Response<HyperOutgoingBody>, String>;

/// A component's handler, ready to instantiate: WASI 0.2's `incoming-handler` or 0.3's
/// `handler`.
#[derive(Clone)]
enum HttpPre {
    P2(ProxyPre<Host>),
    P3(ServicePre<Host>),
}

/// A request as a WASI 0.3 handler reads it: 0.3 takes the scheme and authority from the
/// request target only, where a server's request has a path and a `Host` header (0.2
/// reads the header itself).
fn absolute_form(
    req: hyper::Request<hyper::body::Incoming>,
    scheme: &str,
) -> Result<hyper::Request<hyper::body::Incoming>, String> {
    let (mut parts, body) = req.into_parts();
    if parts.uri.authority().is_none() {
        let host = parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or("no Host header")?;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("{scheme}://{host}{path}")
            .parse()
            .map_err(|e| format!("request target: {e}"))?;
    }
    Ok(hyper::Request::from_parts(parts, body))
}

fn text(status: u16, body: String) -> hyper::Response<HyperOutgoingBody> {
    use http_body_util::BodyExt;
    let body = http_body_util::Full::new(Bytes::from(body))
        .map_err(|e: Infallible| match e {})
        .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp
}

/// How much of a request body the server still reads, and for how long, after the guest
/// answered without reading all of it. A client may still be sending the body when the
/// answer comes (wasi:http clients send the head first and the body after); if the
/// server closed at once, that client would see its connection reset instead of the
/// answer. Go's net/http reads on in the same way, up to 256 KiB.
const DRAIN_BYTES: usize = 256 << 10;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A request body that, dropped before its end, reads the rest (within [`DRAIN_BYTES`]
/// and [`DRAIN_TIME`]) so that hyper keeps the connection. The read goes through the
/// connection, so a pod that is dropped ends it at once; a graceful stop waits for it, as
/// for any request in flight, at most [`DRAIN_TIME`]. (hyper cannot tell that a chunked
/// body has ended before its last read, so such a body gets the task even when the guest
/// read it all; the task then ends at its first poll.)
struct DrainOnDrop {
    body: Option<hyper::body::Incoming>,
    /// A client that sent `Expect: 100-continue` waits to be told to send its body: reading
    /// it would tell it so, after the guest turned it away. Such a body is not drained:
    /// hyper closes the connection instead.
    drain: bool,
}

impl DrainOnDrop {
    fn wrap(req: hyper::Request<hyper::body::Incoming>) -> hyper::Request<Self> {
        let expects = req
            .headers()
            .get(hyper::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        req.map(|body| Self {
            body: Some(body),
            drain: !expects,
        })
    }
}

impl hyper::body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.body.as_mut() {
            Some(body) => std::pin::Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if !self.drain || hyper::body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Past a bound the body is dropped, and hyper closes the connection.
        rt.spawn(drain(body, DRAIN_BYTES, DRAIN_TIME));
    }
}

/// Reads a body to its end and discards it. Gives up at the first error, after `limit`
/// bytes, after `limit / 1024` frames (so that empty writes cannot keep it busy), or
/// after `time`.
pub(crate) async fn drain<B>(mut body: B, limit: usize, time: Duration)
where
    B: hyper::body::Body + Unpin,
{
    use bytes::Buf;
    use http_body_util::BodyExt;
    let read = async {
        let mut bytes = limit;
        let mut frames = limit / 1024;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.remaining());
            match (bytes.checked_sub(n), frames.checked_sub(1)) {
                (Some(b), Some(f)) => (bytes, frames) = (b, f),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(time, read).await;
}

/// A response body that owns the request's instance: dropped before its end (the client
/// went away), it stops the instance; read to its end, it lets the instance finish.
struct GuardedBody {
    inner: HyperOutgoingBody,
    guard: Option<AbortOnDrop<crate::Exit>>,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = <HyperOutgoingBody as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let out = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = out {
            // The whole body was sent: the instance may finish its work after it.
            if let Some(g) = self.guard.take() {
                g.detach();
            }
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a response waits for its body's first bytes before its head goes alone.
const COALESCE: Duration = Duration::from_micros(500);

/// The response, with its body's first frame read, and its end if that follows, waiting
/// at most [`COALESCE`] for both. A guest answers with the head and then writes
/// the body from a task of its own, on the guest's thread, while hyper runs on the
/// connection's: read at once, the body is often not there yet, and hyper flushes the
/// head alone and the bytes in a second write (1.5 writes a response were measured on
/// WASI 0.3, against `wasmtime serve`'s 1.0). With the first frame in hand, the head,
/// the bytes and the end leave in one. A body with nothing within the wait (a stream
/// that starts later) goes out as it is, head first.
///
/// Used for reused instances, whose worker serves many connections at once. For an
/// instance per request it was measured to cost the first request about 50 µs at the
/// median (the head's write no longer overlaps the guest writing its body).
async fn coalesced(resp: hyper::Response<HyperOutgoingBody>) -> hyper::Response<HyperOutgoingBody> {
    use http_body_util::BodyExt as _;
    let (parts, mut body) = resp.into_parts();
    if hyper::body::Body::is_end_stream(&body) {
        return hyper::Response::from_parts(parts, body);
    }
    let mut ahead = std::collections::VecDeque::new();
    let mut ended = false;
    // One timer for both waits: a timer is a lock of the runtime's timer wheel to set
    // and another to clear, which many connections at once contend on.
    let wait = tokio::time::sleep(COALESCE);
    tokio::pin!(wait);
    tokio::select! {
        biased;
        first = body.frame() => match first {
            None => ended = true,
            Some(first) => {
                let failed = first.is_err();
                ahead.push_back(first);
                // The end, when it follows within the wait: then the response has a
                // length, and no last chunk goes in a write of its own.
                if !failed {
                    tokio::select! {
                        biased;
                        next = body.frame() => match next {
                            None => ended = true,
                            Some(next) => ahead.push_back(next),
                        },
                        () = &mut wait => {}
                    }
                }
            }
        },
        () = &mut wait => return hyper::Response::from_parts(parts, body),
    }
    let body = ReadAhead {
        ahead,
        ended,
        rest: body,
    };
    hyper::Response::from_parts(parts, body.boxed_unsync())
}

/// A body whose first frames were read ahead ([`coalesced`]).
struct ReadAhead {
    ahead: std::collections::VecDeque<
        Result<hyper::body::Frame<Bytes>, <HyperOutgoingBody as hyper::body::Body>::Error>,
    >,
    /// The body ended right after them.
    ended: bool,
    rest: HyperOutgoingBody,
}

impl hyper::body::Body for ReadAhead {
    type Data = Bytes;
    type Error = <HyperOutgoingBody as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.ahead.pop_front() {
            return std::task::Poll::Ready(Some(frame));
        }
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && (self.ended || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let ahead: u64 = self
            .ahead
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref().map(|d| d.len() as u64))
            .sum();
        if self.ended {
            return hyper::body::SizeHint::with_exact(ahead);
        }
        let rest = self.rest.size_hint();
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// A response body that holds something (an in-process call's count) until it ends.
struct Holding<G> {
    inner: HyperOutgoingBody,
    _held: G,
}

impl<G: Send + Unpin + 'static> hyper::body::Body for Holding<G> {
    type Data = Bytes;
    type Error = <HyperOutgoingBody as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One in-process call under way ([`Serving::local_calls`]).
struct LocalCall(Arc<Serving>);

impl LocalCall {
    fn new(serving: Arc<Serving>) -> Self {
        serving.local_calls.send_modify(|n| *n += 1);
        LocalCall(serving)
    }
}

impl Drop for LocalCall {
    fn drop(&mut self) {
        self.0.local_calls.send_modify(|n| *n -= 1);
    }
}

impl Serving {
    /// Returns once no in-process call is under way.
    async fn local_calls_done(&self) {
        let _ = self.local_calls.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Serves one request, counted (and timed, to its response's head) in the container's
    /// metrics.
    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<HyperOutgoingBody>, Infallible> {
        let started = self.runtime.clock();
        let in_flight = self.tally.http.begin();
        let resp = self.respond(req, started).await;
        drop(in_flight);
        self.tally
            .http
            .answered(resp.status().as_u16(), started.map(|t| t.elapsed()));
        Ok(resp)
    }

    /// A store for an instance of the component, with its WASI context, its logs and its
    /// platform interfaces, charged to `task`, and with `budget` of wall-clock time.
    fn request_store(
        &self,
        task: Option<Arc<crate::usage::Task>>,
        budget: Option<Duration>,
    ) -> Result<(wasmtime::Store<Host>, Arc<std::sync::atomic::AtomicBool>), String> {
        let args = ["http".to_string()];
        let mut wasi = wasi_ctx(&self.spec.env, &args, &self.spec.mounts, Some(&self.net))
            .map_err(|e| format!("sandbox setup failed: {e}\n"))?;
        let log_sink: Box<dyn wasmtime_wasi::cli::StdoutStream> = match &self.spec.log {
            Some(log) => {
                wasi.stdout(log.stdout()).stderr(log.stderr());
                Box::new(log.stderr())
            }
            None => {
                let sink = MemoryOutputPipe::new(64 << 10);
                wasi.stdout(sink.clone()).stderr(sink.clone());
                Box::new(sink)
            }
        };
        let platform = crate::platform::StorePlatform {
            platform: self.spec.platform.clone(),
            log_sink: Some(log_sink),
        };
        Ok(self.runtime.store(
            (wasi.build(), platform),
            self.spec.memory_bytes,
            budget,
            self.net.clone(),
            Some(self.stopped.clone()),
            task,
        ))
    }

    /// A request to a 0.3 handler whose instances are reused: given to a worker, and
    /// answered within the request timeout.
    async fn respond_reused(
        &self,
        pool: &reuse::Pool,
        pre: &ServicePre<Host>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        let scheme = if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let req = match absolute_form(req, scheme) {
            Ok(r) => r,
            Err(e) => return text(400, format!("bad request: {e}\n")),
        };
        let mut hooks = crate::net::PodHooks::of(self.net.clone());
        let (req, io) = P3Request::from_http(&mut hooks, DrainOnDrop::wrap(req));
        let (answer, answered) = tokio::sync::oneshot::channel();
        pool.dispatch(
            self,
            pre,
            reuse::Job {
                req,
                io: Box::pin(io),
                answer,
            },
        );
        let answered = async {
            match self.spec.request_timeout {
                Some(t) => tokio::time::timeout(t, answered).await.ok(),
                None => Some(answered.await),
            }
        };
        match answered.await {
            Some(Ok(Ok(resp))) => coalesced(resp).await,
            Some(Ok(Err(e))) => text(500, format!("the component failed the request: {e}\n")),
            Some(Err(_)) => text(500, "the instance serving the request failed\n".into()),
            None => text(504, "the component did not answer in time\n".into()),
        }
    }

    /// `started`: when the request arrived, if requests are timed; its instance's start
    /// is counted from then (the cold start the request paid).
    async fn respond(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        started: Option<std::time::Instant>,
    ) -> hyper::Response<HyperOutgoingBody> {
        if let (HttpPre::P3(pre), Some(pool)) = (&self.pre, &self.pool) {
            return self.respond_reused(pool, pre, req).await;
        }
        let task = self.container.as_ref().map(|c| {
            self.net.usage.task(
                c,
                TaskKind::Request,
                TaskCommand::Request(req.method().clone(), req.uri().clone()),
            )
        });
        let (mut store, oom) = match self.request_store(task.clone(), self.spec.request_timeout) {
            Ok(s) => s,
            Err(e) => return text(500, e),
        };
        store.data_mut().hooks.trace = crate::net::TraceContext::of(req.headers());
        let scheme = if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let stats = self.runtime.stats.clone();
        // The instance, and the answer it gives: each version's own channel, read as
        // one type without a task in between.
        let (instance, answer): (
            Boxed<wasmtime::Result<()>>,
            Boxed<Result<Answer, RecvError>>,
        ) = match &self.pre {
            HttpPre::P2(pre) => {
                let (p2_sender, p2_receiver) = tokio::sync::oneshot::channel();
                let prepared = (|| -> wasmtime::Result<_> {
                    let scheme = if scheme == "https" {
                        Scheme::Https
                    } else {
                        Scheme::Http
                    };
                    let req = store
                        .data_mut()
                        .http()
                        .new_incoming_request(scheme, DrainOnDrop::wrap(req))?;
                    let out = store.data_mut().http().new_response_outparam(p2_sender)?;
                    Ok((req, out))
                })();
                let (req, out) = match prepared {
                    Ok(x) => x,
                    Err(e) => return text(400, format!("bad request: {}\n", chain(&e))),
                };
                let pre = pre.clone();
                let answer = async move {
                    let answer = p2_receiver.await?;
                    Ok(answer.map_err(|e| format!("{e:?}")))
                };
                let instance = async move {
                    let proxy = pre.instantiate_async(&mut store).await?;
                    if let Some(t) = started {
                        stats.instance_started(t.elapsed());
                    }
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, req, out)
                        .await
                };
                (Box::pin(instance), Box::pin(answer))
            }
            HttpPre::P3(pre) => {
                let req = match absolute_form(req, scheme) {
                    Ok(r) => r,
                    Err(e) => return text(400, format!("bad request: {e}\n")),
                };
                let (req, req_io) =
                    P3Request::from_http(store.data_mut().http().hooks, DrainOnDrop::wrap(req));
                let pre = pre.clone();
                let (sender, receiver) = tokio::sync::oneshot::channel::<Answer>();
                let instance = async move {
                    let service = pre.instantiate_async(&mut store).await?;
                    if let Some(t) = started {
                        stats.instance_started(t.elapsed());
                    }
                    store
                        .run_concurrent(async move |acc| -> wasmtime::Result<()> {
                            let answer = match service.handle(acc, req).await? {
                                Ok(resp) => Ok(acc.with(|mut s| resp.into_http(&mut s, req_io))?),
                                Err(code) => Err(format!("{code:?}")),
                            };
                            let _ = sender.send(answer);
                            // The body flows only while the store's event loop runs: it
                            // runs until every task of the guest (its body writer) is done.
                            std::future::poll_fn(|cx| acc.poll_no_interesting_tasks(cx)).await;
                            Ok(())
                        })
                        .await?
                };
                (Box::pin(instance), Box::pin(receiver))
            }
        };
        let oom_flag = oom.clone();
        let task = self.runtime.spawn_guest(
            &self.net.usage,
            task,
            async move { exit_of(instance.await, oom_flag.load(Ordering::Relaxed)) }
                .instrument(tracing::debug_span!("wasm_http_request")),
        );
        // If the client goes away, hyper drops this future, and with it the guard: the
        // instance stops at its next epoch tick instead of running on for no one.
        let mut task = AbortOnDrop::new(task);
        match answer.await {
            // The guest may still be writing the body: it runs while the body is read,
            // and is stopped if the body is dropped before its end.
            Ok(Ok(resp)) => resp.map(|body| {
                http_body_util::BodyExt::boxed_unsync(GuardedBody {
                    inner: body,
                    guard: Some(task),
                })
            }),
            Ok(Err(e)) => text(500, format!("the component failed the request: {e}\n")),
            Err(_) => {
                // The guest never answered: it trapped, ran out of memory or time.
                let exit = task.join().await.unwrap_or(crate::Exit {
                    code: 1,
                    reason: "Error",
                    message: "request task panicked".into(),
                });
                self.tally.exits.record(exit.reason);
                let status = if exit.reason == "DeadlineExceeded" {
                    504
                } else {
                    500
                };
                text(status, format!("{}: {}\n", exit.reason, exit.message))
            }
        }
    }
}

/// The plain-HTTP components served on one runtime, by the address they listen on: what
/// a node's Ingress calls in process, skipping a socket and an HTTP encoding each way.
#[derive(Debug, Default)]
pub(crate) struct LocalServers {
    by_addr: std::sync::RwLock<std::collections::HashMap<SocketAddr, std::sync::Weak<Serving>>>,
}

impl LocalServers {
    fn register(self: &Arc<Self>, addr: SocketAddr, serving: &Arc<Serving>) -> Registration {
        self.by_addr
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, Arc::downgrade(serving));
        Registration {
            servers: self.clone(),
            addr,
            serving: Arc::downgrade(serving),
        }
    }
}

/// A server's entry in [`LocalServers`]; dropped with the server, it leaves.
#[derive(Debug)]
struct Registration {
    servers: Arc<LocalServers>,
    addr: SocketAddr,
    serving: std::sync::Weak<Serving>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self
            .servers
            .by_addr
            .write()
            .unwrap_or_else(|e| e.into_inner());
        // Only its own: another server may have the address by now.
        if map.get(&self.addr).is_some_and(|w| w.ptr_eq(&self.serving)) {
            map.remove(&self.addr);
        }
    }
}

/// An HTTP component of this runtime, called in process ([`Runtime::local_http`]).
#[derive(Clone)]
pub struct LocalHttp {
    serving: Arc<Serving>,
}

impl std::fmt::Debug for LocalHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHttp").finish_non_exhaustive()
    }
}

impl LocalHttp {
    /// Serves one request as the component's own server would (an instance of its own,
    /// on the guest threads, charged to its pod, counted in its metrics): the request in
    /// origin form with its `Host` header, as a server receives it.
    pub async fn call(
        self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        let call = LocalCall::new(self.serving.clone());
        // The instance is a guest task of its own, as for a request over the socket; a
        // caller that gives up (its client went away, its deadline passed) drops this
        // future and with it the instance, as a closed connection does.
        match self.serving.handle(req).await {
            Ok(resp) => resp
                .map(|inner| http_body_util::BodyExt::boxed_unsync(Holding { inner, _held: call })),
            Err(never) => match never {},
        }
    }
}

impl Runtime {
    /// The plain-HTTP component this runtime serves at `addr`, if any, to be called
    /// without a connection: the same requests, instances and limits as over its socket.
    pub fn local_http(&self, addr: SocketAddr) -> Option<LocalHttp> {
        let serving = self
            .local_http
            .by_addr
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)?
            .upgrade()?;
        if serving.stopped.load(Ordering::Relaxed) || serving.draining.load(Ordering::Relaxed) {
            return None;
        }
        Some(LocalHttp { serving })
    }

    /// Serves an HTTP component on `listener`, an instance per request.
    pub fn serve_http(
        &self,
        component: &Component,
        spec: HttpSpec,
        listener: TcpListener,
    ) -> Result<HttpServer, ShimError> {
        self.serve_http_with(component, spec, listener, self.loopback_net(), None)
    }

    pub(crate) fn serve_http_with(
        &self,
        component: &Component,
        spec: HttpSpec,
        listener: TcpListener,
        net: Arc<crate::net::PodNet>,
        container: Option<&str>,
    ) -> Result<HttpServer, ShimError> {
        self.expect_kind(component, ComponentKind::Http)?;
        spec.platform.admit(&self.imports(component))?;
        let instance_pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| ShimError::Unlinkable(chain(&e)))?;
        let pre = if self.is_wasi_03(component) {
            ServicePre::new(instance_pre).map(HttpPre::P3)
        } else {
            ProxyPre::new(instance_pre).map(HttpPre::P2)
        }
        .map_err(|e| ShimError::Setup(chain(&e)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ShimError::Setup(e.to_string()))?;
        let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tally = match container {
            Some(c) => net.usage.tally(c),
            None => crate::usage::Tally::detached(""),
        };
        let pool = match (&pre, spec.reuse) {
            (HttpPre::P3(_), Some(reuse)) => Some(reuse::Pool::new(reuse, self.guest_threads())),
            _ => None,
        };
        let serving = Arc::new(Serving {
            stopped: killed.clone(),
            draining: Default::default(),
            local_calls: tokio::sync::watch::channel(0).0,
            net,
            runtime: self.clone(),
            pre,
            spec,
            tally,
            container: container.map(str::to_string),
            pool,
        });
        // A plain-HTTP server can also be called in process ([`Runtime::local_http`]).
        let local = serving
            .spec
            .tls
            .is_none()
            .then(|| self.local_http.register(addr, &serving));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<Duration>();
        // The listener moves to the guest threads' reactor, where all of the server runs.
        let listener = {
            let _guests = self.enter_guests();
            listener
                .into_std()
                .and_then(TcpListener::from_std)
                .map_err(|e| ShimError::Setup(format!("listener on {addr}: {e}")))?
        };
        let usage = serving.net.usage.clone();
        let tls = serving
            .spec
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from);
        let server_task =
            container.map(|c| usage.task(c, TaskKind::Server, TaskCommand::Listen(addr.port())));
        let (task, gone) = self.spawn_guest_tracked(&usage, server_task, async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            // The connections belong to the server: when it is dropped, they are too, so
            // a stopped pod answers nothing more, even on a kept-alive connection.
            let mut conns = tokio::task::JoinSet::new();
            let grace = loop {
                let (tcp, _peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                    grace = &mut stopped => break grace.unwrap_or_default(),
                };
                let _ = tcp.set_nodelay(true);
                let serving = serving.clone();
                let svc = hyper::service::service_fn(move |req| serving.clone().handle(req));
                let Some(tls) = &tls else {
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(tcp), svc);
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        let _ = conn.await;
                    });
                    continue;
                };
                let (tls, watcher) = (tls.clone(), graceful.watcher());
                conns.spawn(async move {
                    // A client that never finishes its handshake is let go.
                    let Ok(Ok(stream)) = tokio::time::timeout(TLS_HANDSHAKE, tls.accept(tcp)).await
                    else {
                        return;
                    };
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn).await;
                });
            };
            drop(listener);
            serving.draining.store(true, Ordering::Relaxed);
            // Idle keep-alive connections close now; busy ones, and calls in process,
            // after their response.
            let _ = tokio::time::timeout(grace, async {
                graceful.shutdown().await;
                serving.local_calls_done().await;
            })
            .await;
        });
        Ok(HttpServer {
            addr,
            _local: local,
            task,
            stop: Some(stop),
            stopped: killed,
            gone: Some(gone),
        })
    }
}
