//! How much of the Raft log has reached the disk, for the places that must not get ahead
//! of it.
//!
//! # Why the log is acknowledged before its sync
//! openraft 0.9 waits for an append's acknowledgement before it sends the entry to the
//! followers. Acknowledging after the sync put the leader's fsync and the followers'
//! (plus a round trip) one after the other, so a lone writer on three members waited
//! for two syncs where etcd waits for one. etcd's leader sends entries before it saves
//! them (the Raft thesis, section 10.2.1) and keeps it safe by what it lets out before
//! the save. Baton does the same: [`LogStore::append`](super::log_store::LogStore)
//! acknowledges once the entry is written (readable, not yet synced), and three exits
//! wait here instead:
//! - a follower answers an AppendEntries only after every write it made is synced, so a
//!   leader never counts a follower's copy that a power loss could take back;
//! - a leader sends a commit index only once its own log is synced that far, so an entry
//!   that any member learns is committed is on the disks of a majority;
//! - the state machine applies an entry only once it is synced locally, so no client
//!   sees a write (and no snapshot holds one) that this member could lose.
//!
//! A leader may count its own copy before the sync, as etcd's does. That commit stays
//! inside the leader until the sync completes, so a crash before it loses nothing that
//! was acknowledged or applied anywhere.
//!
//! # What is tracked
//! Each log write gets a sequence number and the log's last index after it. When a sync
//! covers writes up to a number, every entry the log held after that write is on disk:
//! later writes only append (a truncation is synced at once, so it is never pending).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The sync of the log failed: the member must stop, as nothing after it can be made
/// durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the raft log could not be synced: {0}")]
pub(crate) struct SyncFailed(pub(crate) String);

/// What is on disk: every write up to `seq`, and the current log up to `index`.
#[derive(Debug, Clone, Default)]
struct Mark {
    seq: u64,
    index: Option<u64>,
    failed: Option<SyncFailed>,
}

#[derive(Debug)]
struct Ledger {
    issued: u64,
    /// Writes not yet known to be synced, with the log's last index after each.
    pending: VecDeque<(u64, Option<u64>)>,
}

/// Shared by the log store (which records writes and syncs) and the exits that wait.
#[derive(Debug, Clone)]
pub(crate) struct LogSync {
    ledger: Arc<Mutex<Ledger>>,
    mark: watch::Sender<Mark>,
    /// Held by a test to stop this member's syncs.
    #[cfg(test)]
    pub(crate) hold: Arc<Mutex<()>>,
}

impl LogSync {
    /// A log whose entries up to `last_index` are already on disk.
    pub(crate) fn new(last_index: Option<u64>) -> Self {
        Self {
            ledger: Arc::new(Mutex::new(Ledger {
                issued: 0,
                pending: VecDeque::new(),
            })),
            mark: watch::Sender::new(Mark {
                seq: 0,
                index: last_index,
                failed: None,
            }),
            #[cfg(test)]
            hold: Arc::default(),
        }
    }

    /// Records a write, made in this order with every other one (openraft calls the log
    /// store from one task), after which the log ends at `last_index`.
    pub(crate) fn issue(&self, last_index: Option<u64>) -> u64 {
        let mut ledger = self.ledger.lock().expect("log sync ledger");
        ledger.issued += 1;
        let seq = ledger.issued;
        ledger.pending.push_back((seq, last_index));
        seq
    }

    /// Every write up to `seq` is on disk.
    pub(crate) fn synced(&self, seq: u64) {
        let mut ledger = self.ledger.lock().expect("log sync ledger");
        let mut index = None;
        while ledger.pending.front().is_some_and(|&(s, _)| s <= seq) {
            index = ledger.pending.pop_front().map(|(_, i)| i);
        }
        // Taken under the ledger's lock, so two syncs finishing together cannot
        // publish out of order.
        self.mark.send_if_modified(|m| {
            if seq <= m.seq {
                return false;
            }
            m.seq = seq;
            if let Some(index) = index {
                m.index = index;
            }
            true
        });
    }

    /// A sync failed; every waiter gets the error from now on.
    pub(crate) fn failed(&self, why: String) {
        self.mark.send_modify(|m| m.failed = Some(SyncFailed(why)));
    }

    /// The last write's number.
    pub(crate) fn issued(&self) -> u64 {
        self.ledger.lock().expect("log sync ledger").issued
    }

    /// Waits until every write made so far is on disk.
    pub(crate) async fn all_issued(&self) -> Result<(), SyncFailed> {
        let seq = self.issued();
        self.wait(|m| m.seq >= seq).await
    }

    /// Waits until the log is on disk up to `index`.
    pub(crate) async fn index(&self, index: u64) -> Result<(), SyncFailed> {
        self.wait(|m| m.index.is_some_and(|i| i >= index)).await
    }

    async fn wait(&self, done: impl Fn(&Mark) -> bool) -> Result<(), SyncFailed> {
        let mut rx = self.mark.subscribe();
        let mark = rx
            .wait_for(|m| m.failed.is_some() || done(m))
            .await
            .expect("the sender lives in self");
        match &mark.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn pending<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn waits_end_when_the_sync_covers_them_and_not_before() {
        let log = LogSync::new(Some(4));
        assert!(log.index(4).await.is_ok(), "what was on disk at open");
        log.all_issued().await.unwrap();

        let a = log.issue(Some(6));
        let b = log.issue(Some(9));
        assert!(pending(log.index(5)).await);
        assert!(pending(log.all_issued()).await);

        log.synced(a);
        log.index(6).await.unwrap();
        assert!(pending(log.index(7)).await, "entries 7..9 are b's");
        assert!(pending(log.all_issued()).await);

        log.synced(b);
        log.index(9).await.unwrap();
        log.all_issued().await.unwrap();
    }

    #[tokio::test]
    async fn a_synced_truncation_lowers_the_mark_and_a_late_older_sync_does_not_raise_it() {
        let log = LogSync::new(Some(10));
        let append = log.issue(Some(12));
        // The truncation was written with a sync, which covers the append before it.
        let truncate = log.issue(Some(7));
        log.synced(truncate);
        assert!(pending(log.index(8)).await);
        // The flusher's own sync of the append finishes after: it changes nothing.
        log.synced(append);
        assert!(pending(log.index(8)).await);
        log.index(7).await.unwrap();
        let again = log.issue(Some(11));
        assert!(pending(log.index(8)).await);
        log.synced(again);
        log.index(11).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_sync_fails_every_waiter() {
        let log = LogSync::new(None);
        log.issue(Some(0));
        let waiter = tokio::spawn({
            let log = log.clone();
            async move { log.index(0).await }
        });
        log.failed("disk gone".into());
        assert!(waiter.await.unwrap().is_err());
        assert!(log.all_issued().await.is_err());
    }
}

/// The exits, seen on three in-process members whose leader cannot sync.
#[cfg(test)]
// A test holds a member's sync lock while it awaits: the lock stops the member's sync
// thread, never a task.
#[allow(clippy::await_holding_lock)]
mod cluster_tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use crate::{Store, StoreConfig};

    const WAIT: Duration = Duration::from_secs(10);

    async fn member(id: u64, dir: &std::path::Path) -> (Store, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let store = Store::open(StoreConfig::new(id, dir.join(id.to_string()), addr.clone()))
            .await
            .unwrap();
        store.serve(listener);
        (store, addr)
    }

    fn last_log(s: &Store) -> u64 {
        let m = s.raft().unwrap().metrics().borrow().clone();
        m.last_log_index.unwrap_or(0)
    }

    fn applied(s: &Store) -> u64 {
        let m = s.raft().unwrap().metrics().borrow().clone();
        m.last_applied.map_or(0, |l| l.index)
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        tokio::time::timeout(WAIT, async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"));
    }

    /// Three members, member 1 leading, every one having applied all there is; and the
    /// index the next write will take.
    async fn three(dir: &std::path::Path) -> ([Store; 3], u64) {
        let (leader, _) = member(1, dir).await;
        let (f2, a2) = member(2, dir).await;
        let (f3, a3) = member(3, dir).await;
        leader.initialize().await.unwrap();
        leader.wait_for_leader(WAIT).await.unwrap();
        leader.add_learner(2, &a2).await.unwrap();
        leader.add_learner(3, &a3).await.unwrap();
        leader
            .change_membership(BTreeSet::from([1, 2, 3]))
            .await
            .unwrap();
        leader.put("warm", "up").await.unwrap();
        let before = last_log(&leader);
        until("the followers apply what came before", || {
            applied(&f2) >= before && applied(&f3) >= before
        })
        .await;
        ([leader, f2, f3], before + 1)
    }

    /// A window in which a write that leaked past a held sync would show: nothing may
    /// answer the client or reach a state machine.
    async fn nothing_leaks(
        put: &tokio::task::JoinHandle<Result<i64, crate::Error>>,
        all: &[Store; 3],
        n: u64,
    ) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!put.is_finished(), "answered before a quorum synced it");
        for s in all {
            assert!(applied(s) < n, "member {} applied it", s.id());
        }
    }

    async fn answered_and_applied(
        put: tokio::task::JoinHandle<Result<i64, crate::Error>>,
        all: &[Store; 3],
        n: u64,
    ) {
        tokio::time::timeout(WAIT, put)
            .await
            .expect("answered once synced")
            .unwrap()
            .unwrap();
        until("every member applies it", || {
            all.iter().all(|s| applied(s) >= n)
        })
        .await;
    }

    fn put(leader: &Store) -> tokio::task::JoinHandle<Result<i64, crate::Error>> {
        let leader = leader.clone();
        tokio::spawn(async move { leader.put("k", "v").await })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_is_answered_and_applied_anywhere_only_after_the_leader_synced_it() {
        let dir = tempfile::tempdir().unwrap();
        let (all, n) = three(dir.path()).await;
        let [leader, f2, f3] = &all;
        let hold = leader.log_sync().hold.clone();
        let held = hold.lock().unwrap();
        let put = put(leader);
        until("the leader appends the write", || last_log(leader) >= n).await;
        // The followers get the entry at once (the leader's append was acknowledged
        // before its sync), and sync it themselves: the leader has a quorum of copies.
        for f in [f2, f3] {
            tokio::time::timeout(WAIT, f.log_sync().index(n))
                .await
                .expect("a follower syncs the entry")
                .unwrap();
        }
        nothing_leaks(&put, &all, n).await;
        drop(held);
        answered_and_applied(put, &all, n).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_answers_for_an_entry_only_once_it_synced_it() {
        let dir = tempfile::tempdir().unwrap();
        let (all, n) = three(dir.path()).await;
        let [leader, f2, f3] = &all;
        let holds = [f2.log_sync().hold.clone(), f3.log_sync().hold.clone()];
        let held: Vec<_> = holds.iter().map(|h| h.lock().unwrap()).collect();
        let put = put(leader);
        until("the followers write the entry", || {
            last_log(f2) >= n && last_log(f3) >= n
        })
        .await;
        tokio::time::timeout(WAIT, leader.log_sync().index(n))
            .await
            .expect("the leader syncs the entry")
            .unwrap();
        nothing_leaks(&put, &all, n).await;
        drop(held);
        answered_and_applied(put, &all, n).await;
    }
}
