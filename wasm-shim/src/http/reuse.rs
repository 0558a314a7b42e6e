//! WASI 0.3 handlers serving several requests per instance, for workloads that opt in
//! ([`InstanceReuse`]): a 0.3 handler is async, and one instance can serve requests
//! concurrently, as `wasmtime serve` does by default.
//!
//! Each instance is a *worker*: a guest task that owns the store and runs every request
//! it is given inside one `run_concurrent`, so their bodies flow while others are served.
//! The [`Pool`] hands a request to a worker with room (fewer than `concurrent` answers
//! pending, fewer than `requests` taken), or starts a worker. A worker ends once it has
//! taken its `requests` and answered them all, after [`IDLE`] without a request, or when
//! its server stops; a trap ends it with every request it holds (each answered 500),
//! as it would end a request's own instance.
//!
//! The trade-off is the reason it is opt-in: what a request leaves in the instance's
//! memory, the next one can see.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt as _};
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::p3::Request as P3Request;

use super::{Answer, Serving};
use crate::host::Host;

/// How long a worker with nothing to do keeps its instance.
const IDLE: Duration = Duration::from_secs(10);

/// How a WASI 0.3 handler's instances are reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceReuse {
    /// Requests one instance serves in its life (at least 1).
    pub requests: u32,
    /// Requests one instance serves at once (at least 1).
    pub concurrent: u32,
}

/// One request for a worker: the request as the guest reads it, the future that feeds
/// its body, and where its answer goes.
pub(super) struct Job {
    pub req: P3Request,
    pub io: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    >,
    pub answer: tokio::sync::oneshot::Sender<Answer>,
}

/// What the pool and a worker share of it.
#[derive(Debug, Default)]
struct WorkerState {
    /// Requests given to it.
    taken: AtomicU32,
    /// Requests given to it and not yet answered.
    open: AtomicU32,
    /// Cleared when it ends: it takes nothing more.
    ended: AtomicBool,
}

struct Worker {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    state: Arc<WorkerState>,
}

/// A server's workers.
pub(super) struct Pool {
    reuse: InstanceReuse,
    workers: Mutex<Vec<Worker>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("reuse", &self.reuse).finish()
    }
}

impl Pool {
    pub fn new(reuse: InstanceReuse) -> Self {
        Self {
            reuse: InstanceReuse {
                requests: reuse.requests.max(1),
                concurrent: reuse.concurrent.max(1),
            },
            workers: Mutex::default(),
        }
    }

    /// Gives `job` to a worker with room, starting one if none has.
    pub fn dispatch(&self, serving: &Serving, pre: &ServicePre<Host>, mut job: Job) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| {
            !w.state.ended.load(Ordering::Acquire)
                && w.state.taken.load(Ordering::Acquire) < self.reuse.requests
        });
        for w in workers.iter() {
            if w.state.open.load(Ordering::Acquire) >= self.reuse.concurrent {
                continue;
            }
            w.state.taken.fetch_add(1, Ordering::AcqRel);
            w.state.open.fetch_add(1, Ordering::AcqRel);
            match w.jobs.send(job) {
                Ok(()) => return,
                // It ended since the check: the next one, or a new one.
                Err(e) => {
                    w.state.ended.store(true, Ordering::Release);
                    job = e.0;
                }
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(WorkerState {
            taken: AtomicU32::new(1),
            open: AtomicU32::new(1),
            ended: AtomicBool::new(false),
        });
        let _ = tx.send(job);
        serving.start_worker(pre.clone(), rx, state.clone(), self.reuse);
        workers.push(Worker { jobs: tx, state });
    }
}

impl Serving {
    /// Starts a worker: an instance of `pre` serving the jobs of `jobs`.
    fn start_worker(
        &self,
        pre: ServicePre<Host>,
        mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
        state: Arc<WorkerState>,
        reuse: InstanceReuse,
    ) {
        let task = self.container.as_ref().map(|c| {
            self.net.usage.task(
                c,
                crate::usage::TaskKind::Request,
                crate::usage::TaskCommand::Argv(vec!["(reused instance)".into()]),
            )
        });
        let store = match self.request_store(task.clone(), None) {
            Ok(s) => s,
            Err(e) => {
                // Every job it was given is answered with the reason.
                state.ended.store(true, Ordering::Release);
                while let Ok(job) = jobs.try_recv() {
                    let _ = job.answer.send(Err(e.clone()));
                }
                return;
            }
        };
        let (mut store, _oom) = store;
        let ended = state.clone();
        let (stats, began) = (self.runtime.stats.clone(), std::time::Instant::now());
        let worker = async move {
            let service = pre.instantiate_async(&mut store).await?;
            stats.instance_started(began.elapsed());
            let state = ended.clone();
            store
                .run_concurrent(async move |acc| -> wasmtime::Result<()> {
                    let mut inflight = FuturesUnordered::new();
                    let mut taken = 0u32;
                    let mut closed = false;
                    loop {
                        tokio::select! {
                            biased;
                            job = jobs.recv(), if !closed => match job {
                                Some(job) => {
                                    taken += 1;
                                    inflight.push(serve(acc, &service, job, &state));
                                }
                                None => closed = true,
                            },
                            done = inflight.next(), if !inflight.is_empty() => {
                                if let Some(r) = done {
                                    r?;
                                }
                            }
                            () = tokio::time::sleep(IDLE), if inflight.is_empty() => break,
                        }
                        if inflight.is_empty() && (closed || taken >= reuse.requests) {
                            break;
                        }
                    }
                    // Taken by the pool while this one was deciding to end: still served.
                    state.ended.store(true, Ordering::Release);
                    jobs.close();
                    while let Ok(job) = jobs.try_recv() {
                        inflight.push(serve(acc, &service, job, &state));
                    }
                    while let Some(r) = inflight.next().await {
                        r?;
                    }
                    // Bodies still being written flow until the guest's tasks are done.
                    std::future::poll_fn(|cx| acc.poll_no_interesting_tasks(cx)).await;
                    Ok(())
                })
                .await?
        };
        let done = async move {
            let r = worker.await;
            state.ended.store(true, Ordering::Release);
            if let Err(e) = &r {
                tracing::debug!(error = %crate::error::chain(e), "a reused instance ended");
            }
        };
        // Detached: it ends by itself (its requests taken, idle, or its server stopped).
        drop(self.runtime.spawn_guest(
            &self.net.usage,
            task,
            tracing::Instrument::instrument(done, tracing::debug_span!("wasm_http_instance")),
        ));
    }
}

/// Serves one job in a worker's instance.
async fn serve(
    acc: &wasmtime::component::Accessor<Host>,
    service: &wasmtime_wasi_http::p3::bindings::Service,
    job: Job,
    state: &WorkerState,
) -> wasmtime::Result<()> {
    let Job { req, io, answer } = job;
    let handled = service.handle(acc, req).await;
    state.open.fetch_sub(1, Ordering::AcqRel);
    let out = match handled? {
        Ok(resp) => Ok(acc.with(|mut s| resp.into_http(&mut s, io))?),
        Err(code) => Err(format!("{code:?}")),
    };
    let _ = answer.send(out);
    Ok(())
}
