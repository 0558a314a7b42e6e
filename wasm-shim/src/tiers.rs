//! The guest threads, in two tiers: short work first, long-running work behind it.
//!
//! Guests run on tokio runtimes of their own, apart from the node's work. A single queue
//! of guest tasks makes a request that arrives while every guest thread runs a spinning
//! guest wait for a slice to end and for the queue ahead of it. So there are two runtimes:
//!
//! - the **fresh** tier, where every guest task starts (a request, a process starting, an
//!   HTTP server's accept loop), at the runtime's guest priority;
//! - the **long** tier, a few nice levels lower, for tasks that showed themselves to be
//!   CPU-bound: a task that the epoch callback had to preempt (it ran through a tick after
//!   its first milliseconds, or was parked for its quota) moves there.
//!
//! The kernel then does the rest: a request that wakes on the fresh tier preempts a
//! spinner on the long tier at once, instead of queueing behind it inside tokio. A task on
//! the long tier that goes back to short polls (a server that computed for a while and
//! now waits for I/O) moves back after [`PROMOTE_AFTER`] polls in a row that ended on
//! their own.
//!
//! A task moves by handing its future to a task on the other runtime: the task first
//! spawned keeps its `JoinHandle`, and waits for the future's output, or for the future to
//! be handed back. I/O objects and timers stay registered with the runtime that made them,
//! which tokio allows while that runtime runs; both live as long as the [`GuestThreads`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::usage::Metered;

/// Polls in a row that ended without a preemption before a task on the long tier moves
/// back to the fresh one.
const PROMOTE_AFTER: u32 = 16;

/// How many nice levels the long tier runs below the fresh one: a weight about 7 times
/// smaller, so that a request preempts a spinner as soon as it wakes, while a spinner
/// still gets its share of an idle machine.
const LONG_NICE_STEP: i32 = 9;

/// The two tiers of guest threads.
pub(crate) struct GuestThreads {
    fresh: Option<tokio::runtime::Runtime>,
    long: Option<tokio::runtime::Runtime>,
    /// Threads per tier.
    pub threads: usize,
}

impl Drop for GuestThreads {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside another runtime; the
        // guests' tasks are cancelled either way.
        for rt in [self.fresh.take(), self.long.take()].into_iter().flatten() {
            rt.shutdown_background();
        }
    }
}

fn tier(name: &str, threads: usize, nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .on_thread_start(move || {
            // A thread's nice value on Linux is per thread (setpriority on its tid).
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
                tracing::warn!(error = %e, "could not lower the guest thread's priority");
            }
        })
        .enable_all()
        .build()
}

impl GuestThreads {
    /// `threads` per tier (0: one per CPU); the fresh tier at `nice`.
    pub fn new(threads: usize, nice: i32) -> std::io::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let long_nice = (nice + LONG_NICE_STEP).min(19);
        Ok(Self {
            fresh: Some(tier("wasm-guest", threads, nice)?),
            long: Some(tier("wasm-guest-long", threads, long_nice)?),
            threads,
        })
    }

    /// Runs a metered guest task, starting on the fresh tier.
    pub fn spawn<F>(&self, task: Metered<F>) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (Some(fresh), Some(long)) = (&self.fresh, &self.long) else {
            return tokio::spawn(task);
        };
        fresh.spawn(Tiered {
            state: State::Fresh(task),
            long: long.handle().clone(),
        })
    }

    /// The fresh tier's runtime.
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.fresh.as_ref().map(|rt| rt.handle().clone())
    }

    /// Enters the fresh tier's runtime, so that I/O objects made now register there.
    pub fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        self.fresh.as_ref().map(|rt| rt.enter())
    }
}

/// A guest task as seen from the tier it started on.
struct Tiered<F: Future> {
    state: State<F>,
    long: tokio::runtime::Handle,
}

enum State<F: Future> {
    /// Polled here.
    Fresh(Metered<F>),
    /// Handed to the long tier; it answers with the output, or with the future back.
    Long(tokio::task::JoinHandle<Result<F::Output, Metered<F>>>),
    /// Finished.
    Done,
}

impl<F: Future> Drop for Tiered<F> {
    fn drop(&mut self) {
        // Aborting the task first spawned (a pod stopping) stops the future wherever it is.
        if let State::Long(handle) = &self.state {
            handle.abort();
        }
    }
}

impl<F> Future for Tiered<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        loop {
            match &mut self.state {
                State::Fresh(task) => {
                    if let Poll::Ready(out) = Pin::new(&mut *task).poll(cx) {
                        self.state = State::Done;
                        return Poll::Ready(out);
                    }
                    if !task.preempted() {
                        return Poll::Pending;
                    }
                    let State::Fresh(task) = std::mem::replace(&mut self.state, State::Done) else {
                        unreachable!("matched above")
                    };
                    // The wake the preemption left behind reaches this task, which finds
                    // the handle pending; the long tier's first poll registers its own.
                    let handle = self.long.spawn(OnLong {
                        task: Some(task),
                        calm: 0,
                    });
                    self.state = State::Long(handle);
                }
                State::Long(handle) => {
                    let back = match Pin::new(handle).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(Ok(out))) => {
                            self.state = State::Done;
                            return Poll::Ready(out);
                        }
                        Poll::Ready(Ok(Err(task))) => task,
                        Poll::Ready(Err(e)) if e.is_panic() => {
                            self.state = State::Done;
                            std::panic::resume_unwind(e.into_panic())
                        }
                        // Cancelled: only when the guest threads shut down, and this
                        // task with them.
                        Poll::Ready(Err(_)) => {
                            self.state = State::Done;
                            return Poll::Pending;
                        }
                    };
                    // Back from the long tier: polled here at once, so that its wakers
                    // point at this task rather than at the finished one.
                    self.state = State::Fresh(back);
                }
                State::Done => return Poll::Pending,
            }
        }
    }
}

/// A guest task's future while it runs on the long tier.
struct OnLong<F: Future> {
    task: Option<Metered<F>>,
    /// Polls in a row that ended without a preemption.
    calm: u32,
}

impl<F: Future> Future for OnLong<F> {
    type Output = Result<F::Output, Metered<F>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Pending;
        };
        if let Poll::Ready(out) = Pin::new(&mut *task).poll(cx) {
            self.task = None;
            return Poll::Ready(Ok(out));
        }
        if task.preempted() {
            self.calm = 0;
            return Poll::Pending;
        }
        self.calm += 1;
        if self.calm < PROMOTE_AFTER {
            return Poll::Pending;
        }
        Poll::Ready(Err(self.task.take().expect("checked above")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A future that reports a preemption for its first `preempt` polls, then waits
    /// `calm` polls, then ends; it records the thread names it was polled on.
    struct Script {
        preempt: u32,
        calm: u32,
        seen: Vec<String>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Future for Script {
        type Output = Vec<String>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<String>> {
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.polls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.seen.push(name);
            if self.preempt > 0 {
                self.preempt -= 1;
                crate::usage::mark_preempted();
            } else if self.calm > 0 {
                self.calm -= 1;
            } else {
                return Poll::Ready(std::mem::take(&mut self.seen));
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn spawn_script(preempt: u32, calm: u32) -> Vec<String> {
        let threads = GuestThreads::new(1, 0).unwrap();
        let usage = Arc::new(crate::usage::Usage::default());
        let task = Metered::new(
            usage,
            Script {
                preempt,
                calm,
                seen: Vec::new(),
                polls: Arc::default(),
            },
        );
        let handle = threads.spawn(task);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), handle).await })
            .expect("in time")
            .expect("no panic")
    }

    #[test]
    fn a_task_that_is_never_preempted_stays_on_the_fresh_tier() {
        let seen = spawn_script(0, 3);
        assert!(seen.iter().all(|t| t == "wasm-guest"), "{seen:?}");
    }

    #[test]
    fn a_preempted_task_moves_to_the_long_tier_and_back_when_calm() {
        let seen = spawn_script(3, PROMOTE_AFTER + 4);
        assert_eq!(seen[0], "wasm-guest");
        assert!(
            seen[1..4].iter().all(|t| t == "wasm-guest-long"),
            "{seen:?}"
        );
        assert_eq!(
            seen.last().map(String::as_str),
            Some("wasm-guest"),
            "back on the fresh tier after calm polls: {seen:?}"
        );
    }

    #[test]
    fn aborting_a_moved_task_drops_its_future() {
        let threads = GuestThreads::new(1, 0).unwrap();
        let usage = Arc::new(crate::usage::Usage::default());
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = Metered::new(
            usage.clone(),
            Script {
                preempt: u32::MAX,
                calm: 0,
                seen: Vec::new(),
                polls: polls.clone(),
            },
        );
        let handle = threads.spawn(task);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let tasks = || usage.snapshot("p", 0).tasks;
        assert_eq!(tasks(), 1);
        // Past its first poll, the future lives on the long tier.
        while polls.load(std::sync::atomic::Ordering::Relaxed) < 3 {
            assert!(std::time::Instant::now() < deadline, "never polled");
            std::thread::yield_now();
        }
        handle.abort();
        while tasks() != 0 {
            assert!(std::time::Instant::now() < deadline, "the task lives on");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
