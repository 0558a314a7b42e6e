//! Watches: ordered, gap-free, atomic and resumable streams of committed events.
//!
//! # How a watcher runs
//! The state machine publishes every applied batch of revisions on one broadcast channel
//! (the hub). A watcher task subscribes to the hub *before* it reads the current revision, so
//! every revision is either old enough to be read from the `rev` history or new enough to
//! arrive on the channel; it skips anything it has already sent. A watcher that starts in the
//! past first replays history from RocksDB, in pages, then follows the channel.
//!
//! # Guarantees
//! - Ordered and unique: the task tracks the next revision it owes and drops older ones.
//! - Gap-free: if the channel ever skips ahead, or a snapshot replaced the state, the task
//!   goes back to the history to fill the hole; if the hole was compacted away, the watch
//!   ends with [`Error::Compacted`].
//! - Atomic: one revision's events travel as one [`RevisionEvents`].
//! - Never silently lossy: a consumer that stops reading fills its buffer, the task then
//!   falls behind the hub, and the watch ends with [`Error::SlowWatcher`].
//! - Progress: when idle, the watcher reports the revision up to which everything has been
//!   delivered, like etcd's progress notifications.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;

use crate::error::Error;
use crate::mvcc::Mvcc;
use crate::types::{Revision, RevisionEvents, WatchEvent};

/// What the state machine publishes after each apply.
#[derive(Clone, Debug)]
pub(crate) enum HubMsg {
    /// Revisions just committed, in order.
    Events(Arc<Vec<RevisionEvents>>),
    /// The state was replaced by a snapshot: watchers must re-read history.
    Reset,
}

/// The fan-out point between the state machine and the watchers.
#[derive(Clone, Debug)]
pub(crate) struct WatchHub {
    tx: broadcast::Sender<HubMsg>,
    capacity: usize,
}

impl WatchHub {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self { tx, capacity }
    }

    pub(crate) fn publish(&self, msg: HubMsg) {
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(msg);
    }
}

/// Settings of one watch.
#[derive(Clone, Debug)]
pub(crate) struct WatchParams {
    pub prefix: Vec<u8>,
    /// First revision to deliver; 0 means "from now on".
    pub from: Revision,
    pub progress_interval: Duration,
    /// Revisions the consumer may leave unread before it counts as slow.
    pub buffer: usize,
    /// Also report progress this soon after revisions that held nothing under the prefix,
    /// however busy the store is: for a cache that must know how current it is (the API
    /// server's watch cache answers "the latest" from memory once it has seen it).
    pub eager_progress: Option<Duration>,
}

/// A running watch. Yields events and progress notifications until it ends with an error
/// (compaction, slowness, shutdown) or is dropped.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Result<WatchEvent, Error>>,
}

impl Watch {
    /// The next event, or None after the watch has ended (an error is delivered first).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        self.rx.recv().await
    }

    pub(crate) fn from_receiver(rx: mpsc::Receiver<Result<WatchEvent, Error>>) -> Self {
        Self { rx }
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Starts a watcher task over the local state machine.
pub(crate) fn start(mvcc: Arc<Mvcc>, hub: &WatchHub, params: WatchParams) -> Result<Watch, Error> {
    let sub = hub.tx.subscribe();
    let current = mvcc.revision();
    let from = if params.from == 0 {
        current + 1
    } else {
        params.from
    };
    if from <= current {
        let compact_revision = mvcc.compact_revision();
        if from < compact_revision {
            return Err(Error::Compacted {
                requested: from,
                compact_revision,
            });
        }
    }
    let (tx, rx) = mpsc::channel(params.buffer.max(1));
    let span =
        tracing::debug_span!("watch", prefix = %String::from_utf8_lossy(&params.prefix), from);
    let task = Watcher {
        mvcc,
        sub,
        hub_capacity: hub.capacity,
        next: from,
        sent: 0,
        params,
        out: tx,
    };
    tokio::spawn(task.run().instrument(span));
    Ok(Watch { rx })
}

struct Watcher {
    mvcc: Arc<Mvcc>,
    sub: broadcast::Receiver<HubMsg>,
    hub_capacity: usize,
    /// The next revision owed to the consumer.
    next: Revision,
    /// The newest revision whose events were sent.
    sent: Revision,
    params: WatchParams,
    out: mpsc::Sender<Result<WatchEvent, Error>>,
}

/// Why a watcher stops.
enum Stop {
    /// The consumer went away.
    Gone,
    Failed(Error),
}

impl Watcher {
    async fn run(mut self) {
        match self.follow().await {
            Stop::Gone => {}
            Stop::Failed(e) => {
                tracing::debug!(error = %e, "watch ended");
                let _ = self.out.send(Err(e)).await;
            }
        }
    }

    async fn send_revision(&mut self, re: &RevisionEvents) -> Result<(), Stop> {
        if re.revision < self.next {
            return Ok(());
        }
        let events: Vec<_> = re
            .events
            .iter()
            .filter(|e| e.kv.key.starts_with(&self.params.prefix))
            .cloned()
            .collect();
        self.next = re.revision + 1;
        if events.is_empty() {
            return Ok(());
        }
        self.sent = re.revision;
        let ev = WatchEvent::Events(RevisionEvents {
            revision: re.revision,
            events,
        });
        self.out.send(Ok(ev)).await.map_err(|_| Stop::Gone)
    }

    /// Replays history from RocksDB until caught up with the applied revision.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        while self.next <= self.mvcc.revision() {
            let page = self
                .mvcc
                .events_since(self.next, 256)
                .map_err(|e| Stop::Failed(e.into()))?;
            for re in page.iter() {
                self.send_revision(re).await?;
            }
        }
        Ok(())
    }

    async fn follow(&mut self) -> Stop {
        if let Err(stop) = self.catch_up().await {
            return stop;
        }
        let mut idle = tokio::time::interval(self.params.progress_interval);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.tick().await;
        // The newest revision the consumer knows it has seen, and when an eager report of
        // a newer one is due.
        let mut told = self.next - 1;
        let mut report_at: Option<tokio::time::Instant> = None;
        loop {
            let report = async {
                match report_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = report => {
                    report_at = None;
                    if self.next - 1 > told {
                        told = self.next - 1;
                        if self.out.send(Ok(WatchEvent::Progress(told))).await.is_err() {
                            return Stop::Gone;
                        }
                    }
                }
                msg = self.sub.recv() => {
                    let step = match msg {
                        Ok(HubMsg::Events(batch)) => {
                            let mut r = Ok(());
                            for re in batch.iter() {
                                if re.revision > self.next {
                                    // A hole: read it from history instead.
                                    r = self.catch_up().await;
                                    if r.is_err() { break; }
                                }
                                r = self.send_revision(re).await;
                                if r.is_err() { break; }
                            }
                            r
                        }
                        Ok(HubMsg::Reset) => self.catch_up().await,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            Err(Stop::Failed(Error::SlowWatcher { buffer: self.hub_capacity }))
                        }
                        Err(broadcast::error::RecvError::Closed) => Err(Stop::Failed(Error::Closed)),
                    };
                    if let Err(stop) = step {
                        return stop;
                    }
                    idle.reset();
                    if let Some(within) = self.params.eager_progress {
                        if self.sent > told {
                            told = self.sent;
                        }
                        if self.next - 1 > told && report_at.is_none() {
                            report_at = Some(tokio::time::Instant::now() + within);
                        }
                    }
                }
                _ = idle.tick() => {
                    told = self.next - 1;
                    let progress = WatchEvent::Progress(self.next - 1);
                    if self.out.send(Ok(progress)).await.is_err() {
                        return Stop::Gone;
                    }
                }
                _ = self.out.closed() => return Stop::Gone,
            }
        }
    }
}
