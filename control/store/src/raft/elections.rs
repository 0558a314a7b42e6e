//! When this member stands for election: as Raft says, after a timeout drawn afresh for
//! every round.
//!
//! openraft 0.9 has a timer of its own, with two habits that made the failover benchmark
//! (a leader's host cut off, three members) stop writes for 3 to 4.7 s in some trials,
//! against 1.4 s in most:
//! - It draws a member's timeout once, when the member starts, and looks at it on a tick
//!   every 1.5 heartbeats. Two members whose ticks fall close together stand together,
//!   split the vote, and stand together again the same number of ticks later, round
//!   after round.
//! - A member that was refused a vote for having a shorter log waits 1.5 s more before
//!   it stands again, so that the member with the longer log can win. It forgets that
//!   only when it next stands by the timer, so the wait also delays its first election
//!   after the next leader is lost, when logs may be the other way round. With both
//!   remaining members so marked, the first election of a failover came 3 s after the
//!   leader's last heartbeat instead of 1.25–1.5 s.
//!
//! [`pace_elections`] stands first, by its own clock, and leaves openraft's timer as the
//! fallback:
//! - a follower whose leader has been silent for the leader lease (the maximum election
//!   timeout, openraft's) and then a draw from the election timeout stands, as openraft
//!   would without the extra wait;
//! - a member with no leader (a candidate, or a follower that took another candidate's
//!   vote) stands again after a draw from the lower half of the minimum timeout, so
//!   before openraft's timer, unless a member refused it for a longer log in this term
//!   (`outlogged`, set by [`super::network`] from the vote answers). Then it waits for
//!   openraft's longer wait, so that it does not raise the term faster than the member
//!   able to win can stand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::metrics::RaftServerMetrics;
use openraft::{BasicNode, ServerState};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{NodeId, Raft};

/// What this member waits for before it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    /// A leader is known: stand if it stays silent.
    Following { term: u64 },
    /// No leader is known: stand again if none appears.
    Leaderless { term: u64 },
}

fn round(m: &RaftServerMetrics<NodeId, BasicNode>, id: NodeId) -> Option<Round> {
    let voter = m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == id);
    if !voter || m.state == ServerState::Leader {
        return None;
    }
    let term = m.vote.leader_id().term;
    Some(
        if m.vote.is_committed() && m.current_leader.is_some_and(|l| l != id) {
            Round::Following { term }
        } else {
            Round::Leaderless { term }
        },
    )
}

/// A draw from `from..to`.
fn draw(from: Duration, to: Duration) -> Duration {
    from + (to.saturating_sub(from)).mul_f64(rand::thread_rng().gen_range(0.0..1.0))
}

/// Runs for as long as the member: `timeout` is its election timeout's bounds, `contact`
/// when a leader last sent it entries or a heartbeat.
pub(crate) async fn pace_elections(
    raft: Raft,
    id: NodeId,
    timeout: (Duration, Duration),
    outlogged: Arc<AtomicU64>,
    mut metrics: watch::Receiver<RaftServerMetrics<NodeId, BasicNode>>,
    contact: watch::Receiver<Instant>,
) {
    let (min, max) = timeout;
    // The round waited for, and its draw: drawn once per round, not per wake-up.
    let mut armed: Option<(Round, Duration, Instant)> = None;
    // Until the round changes, once this member has stood in it.
    let mut stood = false;
    loop {
        let now = round(&metrics.borrow_and_update(), id);
        // Read, not waited on: a leader's every message changes it, and waking for each
        // would cost a busy follower a wake-up per append.
        let heard = *contact.borrow();
        if armed.map(|(r, ..)| Some(r)) != Some(now) {
            stood = false;
            armed = now.map(|r| match r {
                Round::Following { .. } => (r, draw(min, max), Instant::now()),
                Round::Leaderless { .. } => (r, draw(min / 2, min), Instant::now()),
            });
        }
        let due = match armed {
            _ if stood => None,
            Some((Round::Following { .. }, wait, _)) => Some(heard + max + wait),
            Some((Round::Leaderless { .. }, wait, since)) => Some(since + wait),
            None => None,
        };
        let sleep = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                if let Some((Round::Following { .. }, wait, _)) = armed {
                    if *contact.borrow() + max + wait > Instant::now() {
                        continue; // heard from since
                    }
                }
                stood = true;
                let refused = match armed {
                    Some((Round::Leaderless { term }, ..)) => {
                        outlogged.load(Ordering::Relaxed) >= term
                    }
                    _ => false,
                };
                if !refused {
                    tracing::info!(round = ?armed.map(|(r, ..)| r), "no leader in time; standing for election");
                    if raft.trigger().elect().await.is_err() {
                        return;
                    }
                }
            }
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{Membership, StoredMembership, Vote};
    use std::collections::BTreeSet;

    fn metrics(
        state: ServerState,
        vote: Vote<NodeId>,
        leader: Option<NodeId>,
    ) -> RaftServerMetrics<NodeId, BasicNode> {
        // Members 1 and 2 vote; 3 is a learner.
        let nodes: std::collections::BTreeMap<NodeId, BasicNode> = (1..=3)
            .map(|i| (i, BasicNode::new(format!("m{i}"))))
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        RaftServerMetrics {
            id: 1,
            vote,
            state,
            current_leader: leader,
            membership_config: Arc::new(StoredMembership::new(None, membership)),
        }
    }

    #[test]
    fn what_a_member_waits_for() {
        let committed = Vote::new_committed(4, 2);
        let follower = metrics(ServerState::Follower, committed, Some(2));
        assert_eq!(round(&follower, 1), Some(Round::Following { term: 4 }));
        // A learner never stands, and a leader has nothing to wait for.
        assert_eq!(round(&follower, 3), None);
        let leader = metrics(ServerState::Leader, Vote::new_committed(4, 1), Some(1));
        assert_eq!(round(&leader, 1), None);
        // A candidate, and a follower that took another candidate's vote, know no leader.
        let candidate = metrics(ServerState::Candidate, Vote::new(5, 1), None);
        assert_eq!(round(&candidate, 1), Some(Round::Leaderless { term: 5 }));
        let took = metrics(ServerState::Follower, Vote::new(5, 2), None);
        assert_eq!(round(&took, 1), Some(Round::Leaderless { term: 5 }));
    }

    #[test]
    fn draws_stay_in_their_bounds_and_differ() {
        let (from, to) = (Duration::from_millis(250), Duration::from_millis(500));
        let draws: Vec<Duration> = (0..100).map(|_| draw(from, to)).collect();
        assert!(draws.iter().all(|d| (from..to).contains(d)));
        let distinct: BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 50, "each round draws afresh");
    }
}
