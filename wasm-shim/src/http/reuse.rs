//! WASI 0.3 handlers serving several requests per instance, for workloads that opt in
//! ([`InstanceReuse`]): a 0.3 handler is async, and one instance can serve requests
//! concurrently, as `wasmtime serve` does by default.
//!
//! Each instance is a *worker*: a guest task that owns the store and runs every request
//! it is given inside one `run_concurrent`, so their bodies flow while others are served.
//! An instance runs on one thread at a time, so the [`Pool`] gives a request to a worker
//! whose requests all wait on I/O (its `run_concurrent` returned pending) before one
//! whose guest is running; while fewer workers run than there are guest threads, it
//! starts another rather than queue behind a running one, as `wasmtime serve`'s handler
//! does. Sixteen clients on one instance had the two cores' guest work on one thread.
//! Within that, a worker takes no more than `concurrent` answers pending and `requests`
//! in its life. A worker ends once it has taken its `requests` and answered them all,
//! after [`IDLE`] without a request, or when its server stops; a trap ends it with
//! every request it holds (each answered 500), as it would end a request's own
//! instance.
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
    /// Set when it ends: it takes nothing more.
    ended: AtomicBool,
    /// Set when it is given a request, cleared when its instance has nothing left to
    /// run but waits (every request it holds waits on I/O, or it holds none).
    running: AtomicBool,
}

struct Worker {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    state: Arc<WorkerState>,
}

/// A server's workers.
pub(super) struct Pool {
    reuse: InstanceReuse,
    /// How many workers may run at once: the guest threads.
    parallel: usize,
    workers: Mutex<Vec<Worker>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("reuse", &self.reuse).finish()
    }
}

impl Pool {
    /// `parallel`: the guest threads that can run instances at once.
    pub fn new(reuse: InstanceReuse, parallel: usize) -> Self {
        Self {
            reuse: InstanceReuse {
                requests: reuse.requests.max(1),
                concurrent: reuse.concurrent.max(1),
            },
            parallel: parallel.max(1),
            workers: Mutex::default(),
        }
    }

    /// Gives `job` to the worker [`choose`] picks, starting one if it picks none.
    pub fn dispatch(&self, serving: &Serving, pre: &ServicePre<Host>, mut job: Job) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| {
            !w.state.ended.load(Ordering::Acquire)
                && w.state.taken.load(Ordering::Acquire) < self.reuse.requests
        });
        loop {
            let seen = workers.iter().map(|w| Seen {
                running: w.state.running.load(Ordering::Acquire),
                open: w.state.open.load(Ordering::Acquire),
            });
            let Some(i) = choose(seen, self.reuse.concurrent, self.parallel) else {
                break;
            };
            let w = &workers[i];
            w.state.running.store(true, Ordering::Release);
            w.state.taken.fetch_add(1, Ordering::AcqRel);
            w.state.open.fetch_add(1, Ordering::AcqRel);
            match w.jobs.send(job) {
                Ok(()) => return,
                // It ended since the check: choose again without it.
                Err(e) => {
                    job = e.0;
                    workers.swap_remove(i);
                }
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(WorkerState {
            taken: AtomicU32::new(1),
            open: AtomicU32::new(1),
            ended: AtomicBool::new(false),
            running: AtomicBool::new(true),
        });
        let _ = tx.send(job);
        serving.start_worker(pre.clone(), rx, state.clone(), self.reuse);
        workers.push(Worker { jobs: tx, state });
    }
}

/// A worker as [`choose`] sees it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    running: bool,
    open: u32,
}

/// Which worker takes the next request (`None`: a new one): the first with room whose
/// instance waits; else, when fewer than `parallel` run, none, so that a new instance
/// runs beside them on a free thread; else the running one with room holding the fewest.
fn choose(
    workers: impl Iterator<Item = Seen> + Clone,
    concurrent: u32,
    parallel: usize,
) -> Option<usize> {
    let room = |w: &Seen| w.open < concurrent;
    if let Some(i) = workers.clone().position(|w| !w.running && room(&w)) {
        return Some(i);
    }
    if workers.clone().filter(|w| w.running).count() < parallel {
        return None;
    }
    workers
        .enumerate()
        .filter(|(_, w)| room(w))
        .min_by_key(|(_, w)| w.open)
        .map(|(i, _)| i)
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
            let running = ended.clone();
            let run = store.run_concurrent(async move |acc| -> wasmtime::Result<()> {
                let mut inflight = FuturesUnordered::new();
                let mut taken = 0u32;
                let mut closed = false;
                // One timer for the worker's life, moved on only when it fires, rather
                // than one made per request.
                let mut last_done = tokio::time::Instant::now();
                let idle = tokio::time::sleep(IDLE);
                tokio::pin!(idle);
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
                            last_done = tokio::time::Instant::now();
                        }
                        () = &mut idle, if inflight.is_empty() => {
                            let due = last_done + IDLE;
                            if tokio::time::Instant::now() >= due {
                                break;
                            }
                            idle.as_mut().reset(due);
                        }
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
            });
            // Pending means every request the instance holds waits (or it holds none):
            // it may take another without one queueing behind a running guest.
            let mut run = std::pin::pin!(run);
            std::future::poll_fn(|cx| {
                let polled = std::future::Future::poll(run.as_mut(), cx);
                if polled.is_pending() {
                    running.running.store(false, Ordering::Release);
                }
                polled
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(workers: &[(bool, u32)]) -> impl Iterator<Item = Seen> + Clone + '_ {
        workers
            .iter()
            .map(|&(running, open)| Seen { running, open })
    }

    #[test]
    fn a_request_goes_to_a_waiting_instance_then_beside_running_ones_then_behind_them() {
        // A waiting instance with room takes it, even behind a running one.
        assert_eq!(choose(seen(&[(true, 1), (false, 3)]), 16, 2), Some(1));
        // A waiting instance that is full does not.
        assert_eq!(choose(seen(&[(true, 1), (false, 16)]), 16, 2), None);
        // One instance runs and a second thread is free: a new one, beside it.
        assert_eq!(choose(seen(&[(true, 1)]), 16, 2), None);
        // As many run as there are threads: the one holding the fewest.
        assert_eq!(choose(seen(&[(true, 5), (true, 2)]), 16, 2), Some(1));
        // Every running one full: a new one.
        assert_eq!(choose(seen(&[(true, 16), (true, 16)]), 16, 2), None);
        // None yet.
        assert_eq!(choose(seen(&[]), 16, 2), None);
    }
}
