//! [`Store`]: one member of the replicated store, and the API everything else uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::Error;
use crate::mvcc::Mvcc;
use crate::raft::log_store::LogStore;
use crate::raft::network::NetworkFactory;
use crate::raft::state_machine::StateMachine;
use crate::raft::{CompactRejected, NodeId, Raft, Request, Response};
use crate::types::*;
use crate::watch::{self, Watch, WatchHub, WatchParams};

/// HTTP header marking a request already forwarded once, so members never forward in loops.
pub(crate) const FORWARDED_HEADER: &str = "x-baton-forwarded";
/// How long the client waits for a request's answer, in milliseconds: a member that is
/// still waiting for a leader when that runs out answers "no leader" (nothing was
/// written) rather than leave the client with an unknown outcome.
pub(crate) const TIMEOUT_HEADER: &str = "x-baton-timeout-ms";

tokio::task_local! {
    /// When the client of the request being served stops waiting for it.
    pub(crate) static DEADLINE: tokio::time::Instant;
}

/// Runs `f`, a caller's use of the store, as a request its client waits for until
/// `deadline`: the store's waits for a leader then end in time to answer "no leader,
/// nothing was written", a failure the client may retry, rather than run past the
/// deadline and leave a write's outcome unknown. A remote client's deadline comes in
/// its request's header; an API server in the member's process passes its request's
/// here.
pub async fn with_deadline<F: std::future::Future>(
    deadline: tokio::time::Instant,
    f: F,
) -> F::Output {
    DEADLINE.scope(deadline, f).await
}

/// A leader not heard from for this many heartbeats may be gone: a request is not
/// forwarded to it until it is heard from again, or another is elected.
const SILENT_HEARTBEATS: u32 = 3;
/// What a member keeps of the client's deadline to answer in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// Automatic compaction, as kine and the Kubernetes API server do it.
#[derive(Clone, Debug)]
pub struct AutoCompaction {
    pub interval: Duration,
    /// Revisions kept readable below the current one.
    pub retain: i64,
}

/// How to run one member.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// This member's id, unique in the cluster and fixed for its data dir.
    pub id: NodeId,
    pub data_dir: PathBuf,
    /// host:port where peers and clients reach this member's HTTP server.
    pub advertise_addr: String,
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot after at least this many log entries (and once the log since the
    /// last one is half its size: see `raft::pace`).
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot, for followers that are only a little behind.
    pub keep_logs: u64,
    /// Revisions a watcher may fall behind before it is cut off.
    pub watch_buffer: usize,
    /// How often an idle watch reports progress.
    pub progress_interval: Duration,
    pub auto_compaction: Option<AutoCompaction>,
    /// Most transactions per Raft entry.
    pub max_batch: usize,
    /// Writes are refused while the disk has less free space than this (or than a
    /// twentieth of the disk, if smaller); see [`Store::check_disk`].
    pub disk_reserve_bytes: u64,
    /// This member's identity for mutual TLS ([`crate::tls`]). With one, the member
    /// serves HTTPS, refuses clients without a store certificate, and calls its peers
    /// over HTTPS; without one, it speaks plain HTTP (in-process tests only).
    pub tls: Option<crate::tls::StoreTls>,
    /// The size of each file of the Raft log, allocated when it is made
    /// (`raft::log_file`).
    pub log_segment_bytes: u64,
}

impl StoreConfig {
    /// Defaults for a member with the given id, data dir and address.
    pub fn new(
        id: NodeId,
        data_dir: impl Into<PathBuf>,
        advertise_addr: impl Into<String>,
    ) -> Self {
        Self {
            id,
            data_dir: data_dir.into(),
            advertise_addr: advertise_addr.into(),
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(500), Duration::from_millis(750)),
            snapshot_after_logs: 20_000,
            keep_logs: 2_000,
            watch_buffer: 4096,
            progress_interval: Duration::from_secs(5),
            auto_compaction: Some(AutoCompaction {
                interval: Duration::from_secs(300),
                retain: 1000,
            }),
            max_batch: 1024,
            disk_reserve_bytes: 256 << 20,
            tls: None,
            log_segment_bytes: 64 << 20,
        }
    }
}

/// A transaction waiting to be batched into a Raft entry.
struct Proposal {
    txn: Txn,
    reply: oneshot::Sender<Result<TxnResponse, Proposed>>,
}

/// Why the local member could not commit a proposal itself.
enum Proposed {
    NotLeader(Option<BasicNode>),
    Failed(Error),
}

/// One member of the store: the local state machine, its Raft node, and the client API.
///
/// Cheap to clone; all clones share the member.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

/// Where the data lives: this process's Raft member, or an external etcd.
#[derive(Clone, Debug)]
enum Backend {
    Raft(Arc<Inner>),
    Etcd(Arc<crate::etcd::Etcd>),
}

struct Inner {
    cfg: StoreConfig,
    raft: Raft,
    mvcc: Arc<Mvcc>,
    hub: WatchHub,
    http: crate::tls::Http,
    /// The TLS side of this member's server, if it has an identity.
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    proposals: mpsc::Sender<Proposal>,
    read_barriers: mpsc::Sender<oneshot::Sender<Result<(), Proposed>>>,
    db: Arc<rocksdb::DB>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Leader changes this member has seen, for its metrics.
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    latencies: crate::Latencies,
    /// When a leader last sent this member entries or a heartbeat.
    leader_contact: tokio::sync::watch::Sender<tokio::time::Instant>,
    /// What of the Raft log is on disk.
    log_sync: crate::raft::durable::LogSync,
    /// Where the Raft log ends, for pre-votes.
    log_tail: crate::raft::log_store::LogTail,
}

impl Inner {
    /// How long a request waits for an election before it gives up: an election's
    /// worth, but never past its client's deadline.
    fn election_wait(&self) -> Duration {
        within_deadline(self.cfg.election_timeout.1 * 4)
    }

    /// The term this member is in.
    fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Whether the leader has been silent for a few heartbeats.
    fn leader_silent(&self) -> bool {
        self.leader_contact.borrow().elapsed() > self.cfg.heartbeat * SILENT_HEARTBEATS
    }
}

/// `wait`, or less if the client of the request being served stops waiting before.
fn within_deadline(wait: Duration) -> Duration {
    match DEADLINE.try_with(|d| d.saturating_duration_since(tokio::time::Instant::now())) {
        Ok(left) => wait.min(left.saturating_sub(DEADLINE_MARGIN)),
        Err(_) => wait,
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("id", &self.cfg.id)
            .field("addr", &self.cfg.advertise_addr)
            .finish()
    }
}

impl Store {
    /// Opens (or creates) a member. A new member is not part of any cluster until
    /// [`Store::initialize`] bootstraps one or a leader adds it.
    pub async fn open(cfg: StoreConfig) -> Result<Self, Error> {
        let span = tracing::info_span!("store_open", id = cfg.id, dir = %cfg.data_dir.display());
        async move {
            let db = crate::db::open(&cfg.data_dir, cfg.id)?;
            let latencies = crate::Latencies::default();
            let mvcc = Arc::new(
                Mvcc::open(db.clone())?.with_commit_latency(latencies.backend_commit.clone()),
            );
            let hub = WatchHub::new(cfg.watch_buffer);
            let pace = Arc::new(crate::raft::pace::SnapshotPace::default());
            let log = LogStore::new(
                db.clone(),
                &cfg.data_dir,
                cfg.log_segment_bytes,
                latencies.wal_fsync.clone(),
                pace.clone(),
            )
            .map_err(|e| Error::raft("opening the raft log")(e.into()))?;
            let log_sync = log.sync();
            let log_tail = log.tail();
            let sm = StateMachine::open(
                db.clone(),
                mvcc.clone(),
                hub.clone(),
                &cfg.data_dir,
                pace.clone(),
            )
            .map_err(|e| Error::raft("opening the state machine")(e.into()))?
            .waiting_for(log_sync.clone());
            let raft_cfg = openraft::Config {
                cluster_name: "baton".into(),
                heartbeat_interval: cfg.heartbeat.as_millis() as u64,
                election_timeout_min: cfg.election_timeout.0.as_millis() as u64,
                election_timeout_max: cfg.election_timeout.1.as_millis() as u64,
                // Paced here rather than by openraft's count alone (see `raft::pace`).
                snapshot_policy: SnapshotPolicy::Never,
                // Members stand by `raft::elections`, which asks the others first.
                enable_elect: false,
                max_in_snapshot_log_to_keep: cfg.keep_logs,
                install_snapshot_timeout: 120_000,
                ..Default::default()
            }
            .validate()
            .map_err(|e| Error::InvalidRequest {
                reason: format!("raft settings: {e}"),
            })?;
            let http = crate::tls::Http::new(cfg.tls.as_ref(), |b| {
                b.pool_idle_timeout(Duration::from_secs(30))
            })?;
            let outlogged = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let network = NetworkFactory {
                http: http.clone(),
                log_sync: log_sync.clone(),
                outlogged: outlogged.clone(),
            };
            let acceptor = match &cfg.tls {
                Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                    tls.server_config().map_err(|e| Error::InvalidRequest {
                        reason: format!("TLS server configuration: {e}"),
                    })?,
                ))),
                None => None,
            };
            let raft = Raft::new(cfg.id, Arc::new(raft_cfg), network, log, sm)
                .await
                .map_err(|e| Error::raft("starting raft")(e.into()))?;
            let (ptx, prx) = mpsc::channel(cfg.max_batch * 8);
            let (rtx, rrx) = mpsc::channel(4096);
            let inner = Arc::new(Inner {
                cfg,
                db,
                raft,
                mvcc,
                hub,
                http,
                acceptor,
                proposals: ptx,
                read_barriers: rtx,
                tasks: std::sync::Mutex::new(Vec::new()),
                leader_changes: Arc::default(),
                leader_contact: tokio::sync::watch::Sender::new(tokio::time::Instant::now()),
                latencies,
                log_sync,
                log_tail,
            });
            let mut tasks = vec![
                tokio::spawn(batcher(
                    inner.raft.clone(),
                    inner.cfg.max_batch,
                    prx,
                    inner.latencies.proposal.clone(),
                )),
                tokio::spawn(read_barrier_loop(inner.raft.clone(), rrx)),
                tokio::spawn(count_leader_changes(
                    inner.raft.server_metrics(),
                    inner.leader_changes.clone(),
                )),
                tokio::spawn(crate::raft::elections::pace_elections(
                    inner.raft.clone(),
                    crate::raft::elections::Pacing {
                        id: inner.cfg.id,
                        timeout: inner.cfg.election_timeout,
                        outlogged,
                        metrics: inner.raft.server_metrics(),
                        contact: inner.leader_contact.subscribe(),
                        canvass: crate::raft::elections::Canvass {
                            http: inner.http.clone(),
                            log: inner.log_tail.clone(),
                        },
                    },
                )),
            ];
            tasks.push(tokio::spawn(crate::raft::pace::pace_snapshots(
                inner.raft.clone(),
                pace,
                inner.cfg.snapshot_after_logs,
            )));
            if let Some(ac) = inner.cfg.auto_compaction.clone() {
                tasks.push(tokio::spawn(auto_compact(Arc::downgrade(&inner), ac)));
            }
            *inner.tasks.lock().expect("tasks lock") = tasks;
            Ok(Store {
                backend: Backend::Raft(inner),
            })
        }
        .instrument(span)
        .await
    }

    /// A store kept in an external etcd v3 cluster (see [`crate::etcd`]): every call
    /// maps to etcd's own, and the Raft membership calls fail with [`Error::External`].
    pub async fn open_etcd(cfg: crate::etcd::EtcdConfig) -> Result<Self, Error> {
        Ok(Store {
            backend: Backend::Etcd(crate::etcd::Etcd::connect(cfg).await?),
        })
    }

    /// This process's Raft member, for `what` (which an external etcd cannot do).
    fn member(&self, what: &'static str) -> Result<&Arc<Inner>, Error> {
        match &self.backend {
            Backend::Raft(inner) => Ok(inner),
            Backend::Etcd(_) => Err(Error::External { what }),
        }
    }

    /// Whether the store is an external etcd.
    pub fn is_external(&self) -> bool {
        matches!(self.backend, Backend::Etcd(_))
    }

    /// Opens the embedded default: a single-member cluster in `data_dir`, bootstrapped on
    /// first use, and ready for writes when this returns.
    pub async fn open_embedded(data_dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let cfg = StoreConfig::new(1, data_dir, "127.0.0.1:0");
        Self::open_single(cfg).await
    }

    /// Like [`Store::open_embedded`], with explicit settings.
    pub async fn open_single(mut cfg: StoreConfig) -> Result<Self, Error> {
        // A lone member elects itself at once; nothing to wait for.
        cfg.election_timeout = (Duration::from_millis(150), Duration::from_millis(300));
        let store = Self::open(cfg).await?;
        store.initialize().await?;
        store.wait_for_leader(Duration::from_secs(10)).await?;
        Ok(store)
    }

    /// Bootstraps a new cluster with this member as its only voter. Does nothing if the
    /// member already belongs to a cluster.
    pub async fn initialize(&self) -> Result<(), Error> {
        let Backend::Raft(inner) = &self.backend else {
            // etcd was bootstrapped by whoever runs it.
            return Ok(());
        };
        let raft = &inner.raft;
        if raft
            .is_initialized()
            .await
            .map_err(|e| Error::raft("reading the membership")(e.into()))?
        {
            return Ok(());
        }
        let node = BasicNode::new(&inner.cfg.advertise_addr);
        let members = BTreeMap::from([(inner.cfg.id, node)]);
        raft.initialize(members)
            .await
            .map_err(|e| Error::raft("initializing the cluster")(e.into()))
    }

    /// Waits until this member knows a leader (itself or another).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, Error> {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => {
                return e.status().leader.ok_or_else(|| Error::NoLeader {
                    reason: "etcd has no leader".into(),
                })
            }
        };
        let mut metrics = inner.raft.metrics();
        let wait = async {
            loop {
                if let Some(l) = metrics.borrow().current_leader {
                    return Ok(l);
                }
                if metrics.changed().await.is_err() {
                    return Err(Error::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Unavailable {
                reason: format!("no leader elected within {timeout:?}"),
            })?
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        match &self.backend {
            Backend::Raft(inner) => inner.cfg.id,
            Backend::Etcd(e) => e.status().id,
        }
    }

    /// The TLS side of this member's server, if it serves TLS.
    pub(crate) fn acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.member("serving TLS").ok()?.acceptor.as_ref()
    }

    /// The newest revision applied locally.
    pub fn local_revision(&self) -> Revision {
        match &self.backend {
            Backend::Raft(inner) => inner.mvcc.revision(),
            Backend::Etcd(e) => e.local_revision(),
        }
    }

    /// Runs a transaction. Committed through Raft on a quorum and synced before it returns.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, Error> {
        if let Backend::Etcd(e) = &self.backend {
            validate_txn(&txn)?;
            return e.txn(txn).await;
        }
        self.txn_inner(txn, false).await
    }

    pub(crate) async fn txn_inner(&self, txn: Txn, forwarded: bool) -> Result<TxnResponse, Error> {
        let inner = self.member("a Raft proposal")?;
        validate_txn(&txn)?;
        // Only what adds data is refused on a full disk: reads and deletes go on, so an
        // operator can free space through the API, as etcd allows under its space alarm.
        let writes = txn
            .success
            .iter()
            .chain(&txn.failure)
            .any(|op| matches!(op, Op::Put { .. }));
        if writes {
            self.check_disk()?;
        }
        let mut leader_wait = true;
        loop {
            let (reply, rx) = oneshot::channel();
            let proposal = Proposal {
                txn: txn.clone(),
                reply,
            };
            inner
                .proposals
                .send(proposal)
                .await
                .map_err(|_| Error::Closed)?;
            match rx.await.map_err(|_| Error::Closed)? {
                Ok(resp) => return Ok(resp),
                Err(Proposed::Failed(e)) => return Err(e),
                Err(Proposed::NotLeader(Some(leader))) if !forwarded => {
                    let term = inner.term();
                    // A silent leader may be cut off, and a write sent to it would hang
                    // with an unknown outcome: wait until it is heard from or replaced.
                    if !self
                        .leader_heard_or_replaced(inner, &leader.addr, term)
                        .await?
                    {
                        continue;
                    }
                    match self.forward(&leader.addr, "/store/v1/txn", &txn).await {
                        // Nothing reached the leader, so nothing was written: it died, was
                        // cut off or stepped down. Once, wait for its successor (itself,
                        // perhaps, in a later term) and try again.
                        Err(Error::NoLeader { .. }) if leader_wait => {
                            leader_wait = false;
                            self.wait_for_another_leader(inner, &leader.addr, term)
                                .await?;
                        }
                        other => return other,
                    }
                }
                Err(Proposed::NotLeader(_)) if leader_wait && !forwarded => {
                    // An election is under way: wait for it once, then try again. Nothing
                    // was proposed, so running out of time is a definite failure.
                    leader_wait = false;
                    self.wait_for_leader(inner.election_wait())
                        .await
                        .map_err(|e| Error::NoLeader {
                            reason: e.to_string(),
                        })?;
                }
                Err(Proposed::NotLeader(_)) => {
                    return Err(Error::NoLeader {
                        reason: "this member is not the leader".into(),
                    })
                }
            }
        }
    }

    /// Notes that a leader sent this member entries or a heartbeat.
    pub(crate) fn leader_contact(&self) {
        if let Backend::Raft(inner) = &self.backend {
            inner
                .leader_contact
                .send_replace(tokio::time::Instant::now());
        }
    }

    /// Before a request is forwarded to the leader at `addr`: true at once if it was
    /// heard from within a few heartbeats, or as soon as it is heard from again; false
    /// if another leader is known first (the caller proposes again). Neither within an
    /// election's wait: a definite failure, since nothing was sent.
    async fn leader_heard_or_replaced(
        &self,
        inner: &Inner,
        addr: &str,
        term: u64,
    ) -> Result<bool, Error> {
        if !inner.leader_silent() {
            return Ok(true);
        }
        let mut contact = inner.leader_contact.subscribe();
        let wait = inner.election_wait();
        let heard_or_replaced = async {
            tokio::select! {
                r = contact.changed() => r.map(|()| true).map_err(|_| Error::Closed),
                r = another_leader(inner, addr, term) => r.map(|()| false),
            }
        };
        tokio::time::timeout(wait, heard_or_replaced)
            .await
            .map_err(|_| Error::NoLeader {
                reason: format!(
                    "the leader at {addr} has not been heard from, and no other was elected within {wait:?}; nothing was written"
                ),
            })?
    }

    async fn forward<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Result<Resp, Error> {
        let timeout = Duration::from_secs(30);
        let inner = self.member("forwarding to the leader")?;
        let call = crate::client::post(&inner.http, addr, path, req, timeout, true);
        // Only a change of leader while the request is out counts.
        let moved = async {
            if leader_elsewhere(&inner.raft.metrics().borrow(), addr, u64::MAX) {
                std::future::pending::<()>().await;
            }
            another_leader(inner, addr, u64::MAX).await
        };
        tokio::select! {
            result = call => result.map_err(|e| match e {
                // Nothing reached the leader: a definite failure, unlike a lost answer.
                Error::Transport { source, .. } if source.is_connect() => Error::NoLeader {
                    reason: format!("cannot reach the leader at {addr}: {source}"),
                },
                other => other,
            }),
            // A leader cut off from the rest never answers; once another is elected,
            // waiting on the old one only delays the caller's retry. What it did with
            // the request is unknown.
            Ok(()) = moved => Err(Error::Unavailable {
                reason: format!(
                    "the leader changed while the request was with {addr}; its outcome is unknown"
                ),
            }),
        }
    }

    /// Waits until the local state machine reflects every write committed before this call
    /// (the read index), asking the leader if this member is not it.
    async fn read_barrier(&self, forwarded: bool) -> Result<(), Error> {
        let inner = self.member("a read index")?;
        let mut leader_wait = !forwarded;
        loop {
            let (tx, rx) = oneshot::channel();
            inner
                .read_barriers
                .send(tx)
                .await
                .map_err(|_| Error::Closed)?;
            match rx.await.map_err(|_| Error::Closed)? {
                Ok(()) => return Ok(()),
                Err(Proposed::Failed(e)) => return Err(e),
                Err(Proposed::NotLeader(Some(leader))) if !forwarded => {
                    let term = inner.term();
                    // The leader confirms its read index; waiting for it to be applied
                    // here makes the local read linearizable.
                    let index: u64 = match self
                        .forward(&leader.addr, "/store/v1/read-index", &())
                        .await
                    {
                        Ok(index) => index,
                        Err(Error::NoLeader { .. }) if leader_wait => {
                            leader_wait = false;
                            self.wait_for_another_leader(inner, &leader.addr, term)
                                .await?;
                            continue;
                        }
                        // The leader changed under the request; a read is safe to repeat.
                        Err(Error::Unavailable { .. }) if leader_wait => {
                            leader_wait = false;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let wait = inner
                        .raft
                        .wait(Some(within_deadline(Duration::from_secs(10))));
                    wait.applied_index_at_least(Some(index), "read index")
                        .await
                        .map_err(|e| Error::Unavailable {
                            reason: e.to_string(),
                        })?;
                    return Ok(());
                }
                Err(Proposed::NotLeader(None)) if leader_wait => {
                    // An election is under way: wait for it once, then try again.
                    leader_wait = false;
                    self.wait_for_leader(inner.election_wait()).await?;
                }
                Err(Proposed::NotLeader(_)) => {
                    return Err(Error::NoLeader {
                        reason: "no leader to confirm a linearizable read".into(),
                    })
                }
            }
        }
    }

    /// Waits for a leader other than the one at `unreachable` in `term`, which could not
    /// be reached or no longer leads: if it died, was cut off or stepped down, the
    /// members elect a successor within an election timeout or two (the same member,
    /// perhaps, in a later term), and a request that waits for it need not fail.
    async fn wait_for_another_leader(
        &self,
        inner: &Inner,
        unreachable: &str,
        term: u64,
    ) -> Result<(), Error> {
        let timeout = inner.election_wait();
        tokio::time::timeout(timeout, another_leader(inner, unreachable, term))
            .await
            .map_err(|_| Error::NoLeader {
                reason: format!(
                    "the leader at {unreachable} cannot be reached or no longer leads, and no leader was elected within {timeout:?}"
                ),
            })?
    }

    /// This member's answer to another's pre-vote (see [`crate::raft::elections`]).
    pub(crate) async fn answer_pre_vote(
        &self,
        req: &crate::raft::elections::PreVote,
    ) -> Result<bool, Error> {
        let inner = self.member("a pre-vote")?;
        let mine = inner
            .log_tail
            .read_last_log_id()
            .await
            .map_err(|e| Error::raft("reading the log's end")(e.into()))?;
        let state = inner.raft.metrics().borrow().state;
        let heard_ago = inner.leader_contact.borrow().elapsed();
        let granted = crate::raft::elections::grants_pre_vote(
            state,
            heard_ago,
            inner.cfg.election_timeout.1,
            mine,
            req,
        );
        tracing::info!(
            candidate = req.candidate,
            term = req.term,
            granted,
            ?heard_ago,
            "pre-vote"
        );
        Ok(granted)
    }

    /// The leader's read index (served to followers).
    pub(crate) async fn leader_read_index(&self) -> Result<u64, Error> {
        self.read_barrier(true).await?;
        Ok(self
            .member("a read index")?
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index))
    }

    /// Reads one key. Linearizable unless `opts.serializable`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn get(&self, key: &[u8], opts: ReadOptions) -> Result<Option<KeyValue>, Error> {
        Ok(self.get_with_revision(key, opts).await?.0)
    }

    /// Reads one key, with the store revision the read was made at.
    pub async fn get_with_revision(
        &self,
        key: &[u8],
        opts: ReadOptions,
    ) -> Result<(Option<KeyValue>, Revision), Error> {
        validate_key(key)?;
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => return e.get(key, opts).await,
        };
        if !opts.serializable {
            self.read_barrier(false).await?;
        }
        Ok(inner.mvcc.get(key, opts.revision)?)
    }

    /// Reads the keys under a prefix. Linearizable unless `req.serializable`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => return e.range(req).await,
        };
        if !req.serializable {
            self.read_barrier(false).await?;
        }
        Ok(inner.mvcc.range(&req)?)
    }

    /// Writes a key unconditionally; returns the new revision.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Revision, Error> {
        let resp = self.txn(Txn::new().and_then([Op::put(key, value)])).await?;
        Ok(resp.revision)
    }

    /// Writes a key if the precondition holds, else fails with [`Error::Conflict`].
    pub async fn put_if(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        pre: Precondition,
    ) -> Result<Revision, Error> {
        let key = key.into();
        let txn = Txn::new()
            .when([precondition(&key, pre)])
            .and_then([Op::put(key.clone(), value)])
            .or_else([Op::get(key.clone())]);
        let resp = self.txn(txn).await?;
        conflict_check(&key, &resp)?;
        Ok(resp.revision)
    }

    /// Deletes a key; returns what was deleted.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, Error> {
        let resp = self.txn(Txn::new().and_then([Op::delete(key)])).await?;
        Ok(match resp.results.into_iter().next() {
            Some(OpResult::Delete { prev }) => prev,
            _ => None,
        })
    }

    /// Deletes a key if the precondition holds, else fails with [`Error::Conflict`].
    pub async fn delete_if(
        &self,
        key: impl Into<Vec<u8>>,
        pre: Precondition,
    ) -> Result<Option<KeyValue>, Error> {
        let key = key.into();
        let txn = Txn::new()
            .when([precondition(&key, pre)])
            .and_then([Op::delete(key.clone())])
            .or_else([Op::get(key.clone())]);
        let resp = self.txn(txn).await?;
        conflict_check(&key, &resp)?;
        Ok(match resp.results.into_iter().next() {
            Some(OpResult::Delete { prev }) => prev,
            _ => None,
        })
    }

    /// Watches the keys under `prefix` from revision `from` (0 = from now on).
    ///
    /// Served by this member's state machine, like etcd's watches.
    pub fn watch(&self, prefix: impl Into<Vec<u8>>, from: Revision) -> Result<Watch, Error> {
        self.watch_with(prefix.into(), from, None)
    }

    /// A watch that also reports progress within `within` of any commit, even one that
    /// touched nothing under `prefix`, for a cache that serves "the latest" once it has
    /// seen it. Over etcd, progress comes at the usual idle interval.
    pub fn watch_progressing(
        &self,
        prefix: impl Into<Vec<u8>>,
        from: Revision,
        within: Duration,
    ) -> Result<Watch, Error> {
        self.watch_with(prefix.into(), from, Some(within))
    }

    fn watch_with(
        &self,
        prefix: Vec<u8>,
        from: Revision,
        eager_progress: Option<Duration>,
    ) -> Result<Watch, Error> {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => return Ok(e.watch(prefix, from)),
        };
        let params = WatchParams {
            prefix,
            from,
            progress_interval: inner.cfg.progress_interval,
            buffer: inner.cfg.watch_buffer,
            eager_progress,
        };
        watch::start(inner.mvcc.clone(), &inner.hub, params)
    }

    /// The compaction floor: history below it is gone (0 over etcd, where a watch that
    /// asks for it learns so).
    pub fn compact_revision(&self) -> Revision {
        match &self.backend {
            Backend::Raft(inner) => inner.mvcc.compact_revision(),
            Backend::Etcd(_) => 0,
        }
    }

    /// Drops history below `revision` on every member.
    pub async fn compact(&self, revision: Revision) -> Result<Revision, Error> {
        if let Backend::Etcd(e) = &self.backend {
            return e.compact(revision).await;
        }
        self.compact_inner(revision, false).await
    }

    pub(crate) async fn compact_inner(
        &self,
        revision: Revision,
        forwarded: bool,
    ) -> Result<Revision, Error> {
        match self
            .member("compacting through Raft")?
            .raft
            .client_write(Request::Compact(revision))
            .await
        {
            Ok(resp) => match resp.data {
                Response::Compact(Ok(r)) => Ok(r),
                Response::Compact(Err(CompactRejected::AlreadyCompacted { compact_revision })) => {
                    Err(Error::Compacted {
                        requested: revision,
                        compact_revision,
                    })
                }
                Response::Compact(Err(CompactRejected::FutureRevision { current })) => {
                    Err(Error::FutureRevision {
                        requested: revision,
                        current,
                    })
                }
                other => Err(Error::Unexpected(format!(
                    "unexpected response to compaction: {other:?}"
                ))),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) if !forwarded => {
                match f.leader_node {
                    Some(node) => {
                        self.forward(&node.addr, "/store/v1/compact", &revision)
                            .await
                    }
                    None => Err(Error::NoLeader {
                        reason: "no leader".into(),
                    }),
                }
            }
            Err(e) => Err(Error::Unavailable {
                reason: baton_error_chain::chain(&e),
            }),
        }
    }

    /// Adds a member as a learner and waits until it has caught up.
    pub async fn add_learner(&self, id: NodeId, addr: &str) -> Result<(), Error> {
        self.add_learner_inner(id, addr.to_string(), false).await
    }

    pub(crate) async fn add_learner_inner(
        &self,
        id: NodeId,
        addr: String,
        forwarded: bool,
    ) -> Result<(), Error> {
        let res = self
            .member("adding a member")?
            .raft
            .add_learner(id, BasicNode::new(&addr), true)
            .await;
        self.on_leader(res, forwarded, "/store/v1/members/learner", &(id, addr))
            .await
    }

    /// Makes exactly these members voters (learners not listed are kept as learners, voters
    /// not listed are removed).
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), Error> {
        self.change_membership_inner(voters, false).await
    }

    pub(crate) async fn change_membership_inner(
        &self,
        voters: BTreeSet<NodeId>,
        forwarded: bool,
    ) -> Result<(), Error> {
        let res = self
            .member("changing the members")?
            .raft
            .change_membership(voters.clone(), false)
            .await;
        self.on_leader(res, forwarded, "/store/v1/members/voters", &voters)
            .await
    }

    /// Makes a learner a voter, leaving every other member as it is: unlike
    /// [`Store::change_membership`], two members joining at once cannot undo each other.
    pub async fn add_voter(&self, id: NodeId) -> Result<(), Error> {
        self.add_voter_inner(id, false).await
    }

    pub(crate) async fn add_voter_inner(&self, id: NodeId, forwarded: bool) -> Result<(), Error> {
        let add = openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        let res = self
            .member("adding a voter")?
            .raft
            .change_membership(add, false)
            .await;
        self.on_leader(res, forwarded, "/store/v1/members/voter", &id)
            .await
    }

    /// The outcome of a membership change made here: sent on to the leader if this member
    /// is not it (once; a forwarded request is not forwarded again).
    async fn on_leader<T, Req: Serialize>(
        &self,
        res: Result<T, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>,
        forwarded: bool,
        path: &str,
        req: &Req,
    ) -> Result<(), Error> {
        match res {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) if !forwarded => {
                match f.leader_node {
                    Some(node) => self.forward(&node.addr, path, req).await,
                    None => Err(Error::NoLeader {
                        reason: "no leader".into(),
                    }),
                }
            }
            Err(e) => Err(Error::Unavailable {
                reason: baton_error_chain::chain(&e),
            }),
        }
    }

    /// Removes a member entirely (voter or learner).
    pub async fn remove_member(&self, id: NodeId) -> Result<(), Error> {
        let inner = self.member("removing a member")?;
        let status = self.status();
        let voters: BTreeSet<NodeId> = status
            .members
            .iter()
            .filter(|m| m.voter && m.id != id)
            .map(|m| m.id)
            .collect();
        self.change_membership(voters).await?;
        // change_membership keeps left-over learners; a second change drops the member.
        let mut metrics = inner.raft.metrics().borrow().clone();
        let still_learner = metrics.membership_config.nodes().any(|(n, _)| *n == id);
        if still_learner {
            let res = inner
                .raft
                .change_membership(
                    openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                    false,
                )
                .await;
            if let Err(e) = res {
                metrics = inner.raft.metrics().borrow().clone();
                if metrics.membership_config.nodes().any(|(n, _)| *n == id) {
                    return Err(Error::Unavailable {
                        reason: baton_error_chain::chain(&e),
                    });
                }
            }
        }
        Ok(())
    }

    /// This member's view of the cluster.
    pub fn status(&self) -> Status {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => return e.status(),
        };
        let m = inner.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        Status {
            id: inner.cfg.id,
            leader: m.current_leader,
            term: m.current_term,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            revision: inner.mvcc.revision(),
            compact_revision: inner.mvcc.compact_revision(),
            members,
        }
    }

    /// Refuses writes while the store's disk is below its reserve. RocksDB that meets a
    /// full disk mid-write stops taking writes for good (a background error only a
    /// reopen clears), and Raft stops with it; keeping a reserve, as etcd's space quota
    /// does, means the disk never fills under the store, and writes resume by themselves
    /// once space returns.
    pub fn check_disk(&self) -> Result<(), Error> {
        // etcd keeps its own space quota, and says so in its health.
        let Backend::Raft(inner) = &self.backend else {
            return Ok(());
        };
        let dir = &inner.cfg.data_dir;
        let Ok(st) = rustix::fs::statvfs(dir) else {
            return Ok(());
        };
        let block = st.f_frsize.max(1);
        let free = st.f_bavail.saturating_mul(block);
        let total = st.f_blocks.saturating_mul(block);
        let reserve = (total / 20).min(inner.cfg.disk_reserve_bytes);
        if free < reserve {
            return Err(Error::NoSpace {
                path: dir.clone(),
                free,
                reserve,
            });
        }
        Ok(())
    }

    /// Whether this member can serve: its disk has room and a leader is known. What
    /// `/readyz` reports.
    pub fn health(&self) -> Result<(), Error> {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => return e.health(),
        };
        self.check_disk()?;
        let m = inner.raft.metrics().borrow().clone();
        if let Err(e) = &m.running_state {
            return Err(Error::raft("raft stopped")(Box::new(e.clone())));
        }
        if m.current_leader.is_none() {
            return Err(Error::NoLeader {
                reason: "no leader is known".into(),
            });
        }
        Ok(())
    }

    /// How many live keys this member holds under each of `prefixes` (a local read,
    /// for metrics: it may lag the leader).
    pub fn count_prefixes(&self, prefixes: &[Vec<u8>]) -> Vec<u64> {
        match &self.backend {
            Backend::Raft(inner) => inner.mvcc.count_prefixes(prefixes),
            Backend::Etcd(e) => e.count_prefixes(prefixes),
        }
    }

    /// This member's figures for its metrics: leadership, term, revisions, applied
    /// entries, the database's size, and (on the leader) how far each member's
    /// replication is behind the log.
    pub fn metrics(&self) -> StoreMetrics {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => return e.metrics(),
        };
        let status = self.status();
        let (replication_lag, apply_lag) = {
            let m = inner.raft.metrics();
            let m = m.borrow();
            let last = m.last_log_index.unwrap_or(0);
            let lag = m
                .replication
                .iter()
                .flatten()
                .map(|(id, matched)| (*id, last.saturating_sub(matched.map_or(0, |l| l.index))))
                .collect();
            (
                lag,
                last.saturating_sub(m.last_applied.map_or(0, |l| l.index)),
            )
        };
        let property = |name: &str| {
            inner
                .db
                .property_int_value(name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        StoreMetrics {
            status,
            leader_changes: inner
                .leader_changes
                .load(std::sync::atomic::Ordering::Relaxed),
            db_bytes: property("rocksdb.total-sst-files-size")
                + property("rocksdb.cur-size-all-mem-tables"),
            replication_lag,
            apply_lag,
            latencies: inner.latencies.clone(),
        }
    }

    /// Whether this member currently believes it leads.
    pub fn is_leader(&self) -> bool {
        self.member("leading")
            .is_ok_and(|inner| inner.raft.metrics().borrow().state == ServerState::Leader)
    }

    /// Asks Raft to build a snapshot now (tests, operators).
    pub async fn trigger_snapshot(&self) -> Result<(), Error> {
        self.member("a Raft snapshot")?
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::raft("triggering a snapshot")(e.into()))
    }

    /// Stops the member: Raft, the batcher and background tasks.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let inner = match &self.backend {
            Backend::Raft(inner) => inner,
            Backend::Etcd(e) => {
                e.shutdown();
                return Ok(());
            }
        };
        for t in inner.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
        let res = inner
            .raft
            .shutdown()
            .await
            .map_err(|e| Error::raft("shutting down")(e.into()));
        // Stop RocksDB's flushes and compactions now: left running, they can still be
        // at work when the process exits and its static destructors tear RocksDB down.
        inner.db.cancel_all_background_work(true);
        res
    }

    /// The Raft node, which only a member of the embedded store has.
    /// Waits until every write this member made to its Raft log is on disk; none where
    /// the store is not an embedded member.
    pub(crate) async fn log_synced(&self) -> Option<Result<(), crate::raft::durable::SyncFailed>> {
        let inner = self.member("Raft").ok()?;
        Some(inner.log_sync.all_issued().await)
    }

    #[cfg(test)]
    pub(crate) fn log_sync(&self) -> crate::raft::durable::LogSync {
        self.member("Raft").expect("a member").log_sync.clone()
    }

    pub(crate) fn raft(&self) -> Option<&Raft> {
        self.member("Raft").ok().map(|inner| &inner.raft)
    }

    /// The member's data dir, where snapshots are received.
    pub(crate) fn data_dir(&self) -> Option<&std::path::Path> {
        self.member("Raft")
            .ok()
            .map(|inner| inner.cfg.data_dir.as_path())
    }
}

fn precondition(key: &[u8], pre: Precondition) -> Compare {
    match pre {
        Precondition::Absent => Compare::absent(key),
        Precondition::ModRevision(r) => Compare::mod_revision(key, CompareOp::Equal, r),
    }
}

fn conflict_check(key: &[u8], resp: &TxnResponse) -> Result<(), Error> {
    if resp.succeeded {
        return Ok(());
    }
    let current = match resp.results.first() {
        Some(OpResult::Get { kv: Some(kv) }) => kv.mod_revision,
        _ => 0,
    };
    Err(Error::Conflict {
        key: String::from_utf8_lossy(key).into_owned(),
        current_revision: current,
        store_revision: resp.revision,
    })
}

pub(crate) fn validate_key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "empty key".into(),
        });
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::InvalidKey {
            reason: format!("key of {} bytes exceeds {MAX_KEY_BYTES}", key.len()),
        });
    }
    if key.contains(&0) {
        return Err(Error::InvalidKey {
            reason: "keys may not contain a NUL byte".into(),
        });
    }
    Ok(())
}

fn validate_txn(txn: &Txn) -> Result<(), Error> {
    for c in &txn.compares {
        validate_key(&c.key)?;
    }
    for branch in [&txn.success, &txn.failure] {
        let mut written = BTreeSet::new();
        for op in branch {
            validate_key(op.key())?;
            if let Op::Put { value, .. } = op {
                if value.len() > MAX_VALUE_BYTES {
                    return Err(Error::ValueTooLarge {
                        size: value.len(),
                        limit: MAX_VALUE_BYTES,
                    });
                }
            }
            if !matches!(op, Op::Get { .. }) && !written.insert(op.key()) {
                return Err(Error::InvalidRequest {
                    reason: format!(
                        "key {:?} is written twice in one transaction",
                        String::from_utf8_lossy(op.key())
                    ),
                });
            }
        }
    }
    let size = txn.payload_bytes();
    if size > MAX_TXN_BYTES {
        return Err(Error::RequestTooLarge {
            size,
            limit: MAX_TXN_BYTES,
        });
    }
    Ok(())
}

/// Soft cap on one entry's payload.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Turns queued proposals into Raft entries, one entry in flight at a time. While an entry
/// is being committed, new proposals queue up and go out together in the next one: group
/// commit, as etcd's raft loop handles one Ready at a time, so the fsync rate does not cap
/// the write rate. Measured on two cores at 16 clients: one entry in flight gave 8.3k
/// writes/s; two, four and eight gave 6.3k, 5.2k and 3.7k (more, smaller entries cost
/// more per write than they gain in overlap).
async fn batcher(
    raft: Raft,
    max_batch: usize,
    mut rx: mpsc::Receiver<Proposal>,
    latency: prometheus_client::metrics::histogram::Histogram,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.txn.payload_bytes();
        let mut batch = vec![first];
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.txn.payload_bytes();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let span = tracing::debug_span!("raft_propose", txns = batch.len(), bytes);
        let (txns, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.txn, p.reply)).unzip();
        let started = std::time::Instant::now();
        let res = raft
            .client_write(Request::Txns(txns))
            .instrument(span)
            .await;
        latency.observe(started.elapsed().as_secs_f64());
        match res {
            Ok(resp) => match resp.data {
                Response::Txns(results) if results.len() == replies.len() => {
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(r));
                    }
                }
                other => {
                    let msg = format!("state machine answered {other:?} to a transaction batch");
                    for reply in replies {
                        let _ = reply.send(Err(Proposed::Failed(Error::Unexpected(msg.clone()))));
                    }
                }
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                for reply in replies {
                    let _ = reply.send(Err(Proposed::NotLeader(f.leader_node.clone())));
                }
            }
            Err(e) => {
                let reason = baton_error_chain::chain(&e);
                for reply in replies {
                    let _ = reply.send(Err(Proposed::Failed(Error::Unavailable {
                        reason: reason.clone(),
                    })));
                }
            }
        }
    }
}

/// Serves read barriers: every reader waiting when a round starts shares that round's
/// leadership check, so linearizable reads cost one quorum round per batch, not per read.
async fn read_barrier_loop(
    raft: Raft,
    mut rx: mpsc::Receiver<oneshot::Sender<Result<(), Proposed>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        waiting.extend(std::iter::from_fn(|| rx.try_recv().ok()));
        let res = raft.ensure_linearizable().await;
        for w in waiting {
            let r = match &res {
                Ok(_) => Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(Proposed::NotLeader(f.leader_node.clone()))
                }
                Err(e) => Err(Proposed::Failed(Error::Unavailable {
                    reason: baton_error_chain::chain(e),
                })),
            };
            let _ = w.send(r);
        }
    }
}

/// Resolves once this member knows a leader other than the one at `addr` in `term`:
/// another member (itself, perhaps), or that one elected again in a later term. Fails
/// only when the member shuts down.
async fn another_leader(inner: &Inner, addr: &str, term: u64) -> Result<(), Error> {
    let mut metrics = inner.raft.metrics();
    loop {
        if leader_elsewhere(&metrics.borrow_and_update(), addr, term) {
            return Ok(());
        }
        if metrics.changed().await.is_err() {
            return Err(Error::Closed);
        }
    }
}

/// Whether these metrics name a leader, and not the one at `addr` in `term` or before
/// (`u64::MAX`: in any term).
fn leader_elsewhere(m: &openraft::RaftMetrics<NodeId, BasicNode>, addr: &str, term: u64) -> bool {
    let Some(leader) = m.current_leader else {
        return false;
    };
    if m.current_term > term {
        return true;
    }
    m.membership_config
        .nodes()
        .find(|(id, _)| **id == leader)
        .map(|(_, node)| node.addr.as_str())
        != Some(addr)
}

async fn auto_compact(inner: std::sync::Weak<Inner>, ac: AutoCompaction) {
    let mut tick = tokio::time::interval(ac.interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.raft.metrics().borrow().state != ServerState::Leader {
            continue;
        }
        let target = inner.mvcc.revision() - ac.retain;
        if target <= inner.mvcc.compact_revision() {
            continue;
        }
        match inner.raft.client_write(Request::Compact(target)).await {
            Ok(_) => tracing::info!(revision = target, "compacted history"),
            Err(e) => tracing::warn!(error = %e, "automatic compaction failed"),
        }
    }
}

/// Counts the changes of leader this member sees (the first leader included), as etcd's
/// `etcd_server_leader_changes_seen_total`.
async fn count_leader_changes(
    // The server's metrics change with its role and leader only; the whole metrics
    // change with every write, and woke this task for each.
    mut metrics: tokio::sync::watch::Receiver<
        openraft::metrics::RaftServerMetrics<NodeId, BasicNode>,
    >,
    seen: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut leader = None;
    loop {
        let (now, term) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.vote.leader_id().term)
        };
        if now.is_some() && now != leader {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Rare, and what an operator (or a failed failover test) reads first.
            tracing::info!(leader = ?now, term, "the store has a new leader");
        }
        leader = now;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{Membership, StoredMembership};
    use std::collections::{BTreeMap, BTreeSet};

    /// Metrics of member 1 of members 1 and 2, in `term`, naming `leader`.
    fn metrics(term: u64, leader: Option<NodeId>) -> openraft::RaftMetrics<NodeId, BasicNode> {
        let nodes: BTreeMap<NodeId, BasicNode> = (1..=2)
            .map(|i| (i, BasicNode::new(format!("m{i}:2380"))))
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.current_term = term;
        m.current_leader = leader;
        m.membership_config = Arc::new(StoredMembership::new(None, membership));
        m
    }

    #[test]
    fn a_leader_elected_again_in_a_later_term_counts_as_a_successor() {
        // The leader asked in term 3 is still named in term 3: no successor yet.
        assert!(!leader_elsewhere(&metrics(3, Some(2)), "m2:2380", 3));
        // None is known while an election is under way.
        assert!(!leader_elsewhere(&metrics(4, None), "m2:2380", 3));
        // It stepped down and won again: a request may go to it once more.
        assert!(leader_elsewhere(&metrics(5, Some(2)), "m2:2380", 3));
        // Another member leads, in the same term as far as this member knows.
        assert!(leader_elsewhere(&metrics(3, Some(1)), "m2:2380", 3));
        // Asked for another member only, the term does not matter.
        assert!(!leader_elsewhere(&metrics(5, Some(2)), "m2:2380", u64::MAX));
        assert!(leader_elsewhere(&metrics(5, Some(1)), "m2:2380", u64::MAX));
    }
}
