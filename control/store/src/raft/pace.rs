//! When a member builds a Raft snapshot.
//!
//! A snapshot is a checkpoint of the store ([`super::snapshot`]), cheap to build, but the
//! log it lets Raft purge is what a follower that fell behind catches up from; once that
//! is gone, the follower needs the whole store, dumped and sent (every key and every
//! revision kept since the last compaction: gigabytes at 150,000 pods). A fixed count of
//! entries (openraft's `LogsSinceLast`) would purge a big store's log every few seconds
//! under load, so that a follower a few seconds behind costs a whole dump. So a snapshot
//! is built once both
//! - `after_logs` entries were applied since the last one (the operator's setting, as
//!   etcd's `--snapshot-count`), and
//! - the log written since the last one is at least half the size of that snapshot's
//!   state,
//!
//! which keeps the log on disk within about half the store, and a dump for a lagging
//! follower rarer than writing as much log as the store holds. (Before snapshots were
//! checkpoints, this rule also kept the cost of dumping the store at each build within
//! twice the cost of writing the log.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Raft;

/// What the pacer knows of the log and the last snapshot; shared by the log store (which
/// counts what it appends) and the state machine (which tells of each snapshot).
#[derive(Debug, Default)]
pub(crate) struct SnapshotPace {
    /// Bytes appended to the log since the member opened.
    logged: AtomicU64,
    /// `logged` when the last snapshot was built or installed.
    logged_at_last: AtomicU64,
    /// The last snapshot's size in bytes (0: none yet).
    last_size: AtomicU64,
}

impl SnapshotPace {
    pub(crate) fn appended(&self, bytes: u64) {
        self.logged.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot of `size` bytes is now the member's (built, installed, or found at open).
    pub(crate) fn snapshot(&self, size: u64) {
        self.logged_at_last
            .store(self.logged.load(Ordering::Relaxed), Ordering::Relaxed);
        self.last_size.store(size, Ordering::Relaxed);
    }

    /// Whether a snapshot is due, `entries` entries after the last one.
    pub(crate) fn due(&self, entries: u64, after_logs: u64) -> bool {
        let since = self
            .logged
            .load(Ordering::Relaxed)
            .saturating_sub(self.logged_at_last.load(Ordering::Relaxed));
        entries >= after_logs && since >= self.last_size.load(Ordering::Relaxed) / 2
    }
}

/// How long after asking for a snapshot the pacer asks again if none came (a build can
/// fail).
const ASK_AGAIN: Duration = Duration::from_secs(10);

/// How long the pacer lets metrics changes gather before it looks again: each applied
/// entry changes them, and a look per entry was a wake-up per write on every member.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// Asks `raft` for a snapshot whenever one is due, looking at the changes of its metrics
/// (every applied entry) at most every [`LOOK_EVERY`]; ends when Raft stops. After
/// asking, it waits for the new snapshot before asking again.
pub(crate) async fn pace_snapshots(raft: Raft, pace: Arc<SnapshotPace>, after_logs: u64) {
    let mut metrics = raft.metrics();
    // The snapshot in place when one was last asked for, and when.
    let mut asked: Option<(Option<u64>, tokio::time::Instant)> = None;
    while metrics.changed().await.is_ok() {
        tokio::time::sleep(LOOK_EVERY).await;
        let (entries, snapshot) = {
            let m = metrics.borrow_and_update();
            if m.running_state.is_err() {
                return;
            }
            let applied = m.last_applied.map_or(0, |l| l.index + 1);
            let snapshot = m.snapshot.map(|l| l.index);
            (
                applied.saturating_sub(snapshot.map_or(0, |i| i + 1)),
                snapshot,
            )
        };
        if asked.is_some_and(|(at, when)| at == snapshot && when.elapsed() < ASK_AGAIN) {
            continue;
        }
        if pace.due(entries, after_logs) {
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
            asked = Some((snapshot, tokio::time::Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_snapshot_comes_after_the_entries_alone() {
        let pace = SnapshotPace::default();
        pace.appended(10);
        assert!(!pace.due(99, 100));
        assert!(pace.due(100, 100));
    }

    #[test]
    fn a_big_store_waits_until_half_its_size_was_logged() {
        let pace = SnapshotPace::default();
        pace.appended(1_000);
        pace.snapshot(1 << 20);
        pace.appended(100_000);
        assert!(
            !pace.due(50_000, 100),
            "100 KB logged against a 1 MiB snapshot"
        );
        pace.appended((1 << 19) - 100_000);
        assert!(pace.due(50_000, 100), "half a snapshot logged");
        assert!(!pace.due(99, 100), "the entries still count");
    }
}
