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
//! [`pace_elections`] decides instead, by its own clock (openraft's timer is turned off):
//! - a follower whose leader has been silent for the leader lease (the maximum election
//!   timeout, openraft's) and then a draw from the election timeout stands, as openraft
//!   would without the extra wait;
//! - a member with no leader (a candidate, or a follower that took another candidate's
//!   vote) stands again after a draw from the lower half of the minimum timeout, unless
//!   a member refused it for a longer log in this term (`outlogged`, set by
//!   [`super::network`] from the vote answers). Then it waits longer, so that it does
//!   not raise the term faster than the member able to win can stand;
//! - a sole voter stands at once.
//!
//! Before it stands, a member asks the other voters whether they would vote for it (a
//! pre-vote, as etcd does). A member grants one if it is not the leader, has not heard
//! from a leader for the leader lease, and the asker's log is at least as long as its
//! own; the asker stands only with a quorum of grants. Without it, a member that missed
//! a few heartbeats raised the term, and the leader stepped down on seeing it. That is
//! what an old leader did when its cut link came back: a vote request held back by the
//! partition reached it seconds late, so it took that candidate's vote (now stale), and
//! stood 0.1–0.25 s later, before the leader's replication, backing off from the
//! partition, reached it. The leader stepped down and won again in a later term, and the
//! cluster took no writes for 0.6 s.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use openraft::metrics::RaftServerMetrics;
use openraft::{BasicNode, ServerState};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::log_store::LogTail;
use super::network::{self, CallError, Route};
use super::{LogId, NodeId, Raft};

/// A member's question before it stands: would the others vote for it?
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PreVote {
    pub(crate) candidate: NodeId,
    /// The term it would stand in.
    pub(crate) term: u64,
    pub(crate) last_log_id: Option<LogId>,
}

/// Whether a member in `state`, that last heard from a leader `heard_ago`, with its log
/// ending at `mine`, grants `req`. A leader, or a follower within the leader lease, knows
/// a live leader: an election would only unseat it.
pub(crate) fn grants_pre_vote(
    state: ServerState,
    heard_ago: Duration,
    lease: Duration,
    mine: Option<LogId>,
    req: &PreVote,
) -> bool {
    state != ServerState::Leader && heard_ago > lease && req.last_log_id >= mine
}

/// Whether `granted` holds a majority of every voter set of the (perhaps joint)
/// membership.
fn quorum(joint: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    joint
        .iter()
        .all(|voters| voters.intersection(granted).count() * 2 > voters.len())
}

/// Sends this member's pre-votes.
#[derive(Clone, Debug)]
pub(crate) struct Canvass {
    pub(crate) http: crate::tls::Http,
    pub(crate) log: LogTail,
}

impl Canvass {
    /// Whether a quorum of the voters in `m` would vote for member `id` in the next term.
    /// Stops asking as soon as the answers decide it; a member that does not answer
    /// within `wait` refuses.
    async fn ask(
        &self,
        m: &RaftServerMetrics<NodeId, BasicNode>,
        id: NodeId,
        wait: Duration,
    ) -> bool {
        let last_log_id = match self.log.read_last_log_id().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %baton_error_chain::chain(&e), "cannot read the log's end; not standing");
                return false;
            }
        };
        let req = PreVote {
            candidate: id,
            term: m.vote.leader_id().term + 1,
            last_log_id,
        };
        let Ok(body) = postcard::to_stdvec(&req) else {
            return false;
        };
        let membership = m.membership_config.membership();
        let joint = membership.get_joint_config().clone();
        let mut granted = BTreeSet::from([id]);
        let mut refused = BTreeSet::new();
        let mut asks: FuturesUnordered<_> = membership
            .voter_ids()
            .filter(|v| *v != id)
            .filter_map(|v| membership.get_node(&v).map(|n| (v, n.addr.clone())))
            .map(|(v, addr)| {
                let body = body.clone();
                async move { (v, self.ask_one(&addr, body, wait).await) }
            })
            .collect();
        let everyone: BTreeSet<NodeId> = joint.iter().flatten().copied().collect();
        loop {
            if quorum(&joint, &granted) {
                return true;
            }
            // Decided against once the refusals leave no quorum possible.
            let still = everyone.difference(&refused).copied().collect();
            if !quorum(&joint, &still) {
                return false;
            }
            let Some((voter, answer)) = asks.next().await else {
                return false;
            };
            match answer {
                Ok(true) => {
                    granted.insert(voter);
                }
                Ok(false) => {
                    refused.insert(voter);
                }
                Err(why) => {
                    tracing::debug!(voter, why, "no answer to a pre-vote");
                    refused.insert(voter);
                }
            }
        }
    }

    /// One member's answer. A member that does not know pre-votes (an older version,
    /// during an upgrade) answers 404 and counts as granting: its vote decides.
    async fn ask_one(&self, addr: &str, body: Vec<u8>, wait: Duration) -> Result<bool, String> {
        let route = Route::of(self.http.url(addr, "/raft/pre-vote"));
        match network::post(&self.http.client, addr, &route, body.into(), wait).await {
            Err(CallError::Status { status: 404, .. }) => Ok(true),
            answer => answer.map_err(|e| baton_error_chain::chain(&e)),
        }
    }
}

/// What [`pace_elections`] works from.
pub(crate) struct Pacing {
    pub(crate) id: NodeId,
    /// The election timeout's bounds.
    pub(crate) timeout: (Duration, Duration),
    pub(crate) outlogged: Arc<AtomicU64>,
    pub(crate) metrics: watch::Receiver<RaftServerMetrics<NodeId, BasicNode>>,
    /// When a leader last sent this member entries or a heartbeat.
    pub(crate) contact: watch::Receiver<Instant>,
    pub(crate) canvass: Canvass,
}

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

/// How much longer than its draw a member waits to stand again in a term in which a
/// member refused its vote for a longer log, in multiples of the maximum election
/// timeout (openraft waits 1.5 s more, twice the default maximum).
const OUTLOGGED_WAIT: u32 = 2;

/// Whether `id` is the only voter: it has no one to ask or wait for.
fn sole_voter(m: &RaftServerMetrics<NodeId, BasicNode>, id: NodeId) -> bool {
    let mut voters = m.membership_config.membership().voter_ids();
    voters.next() == Some(id) && voters.next().is_none()
}

/// Runs for as long as the member.
pub(crate) async fn pace_elections(raft: Raft, pacing: Pacing) {
    let Pacing {
        id,
        timeout: (min, max),
        outlogged,
        mut metrics,
        contact,
        canvass,
    } = pacing;
    let outlogged_wait = max * OUTLOGGED_WAIT;
    // When a leaderless round drawn `wait` at `since` is due. A refusal for a longer log
    // can come after the sleep is set, so the sleep's end looks again.
    let leaderless_due = |term: u64, wait: Duration, since: Instant| {
        let outlogged = outlogged.load(Ordering::Relaxed) >= term;
        since
            + wait
            + if outlogged {
                outlogged_wait
            } else {
                Duration::ZERO
            }
    };
    // The round waited for, and its draw: drawn once per round, not per wake-up.
    let mut armed: Option<(Round, Duration, Instant)> = None;
    // Until the round changes, once this member has stood in it.
    let mut stood = false;
    // When to ask again in this round, after a pre-vote without a quorum.
    let mut again: Option<Instant> = None;
    loop {
        let (now, sole) = {
            let m = metrics.borrow_and_update();
            (round(&m, id), sole_voter(&m, id))
        };
        // Read, not waited on: a leader's every message changes it, and waking for each
        // would cost a busy follower a wake-up per append.
        let heard = *contact.borrow();
        if armed.map(|(r, ..)| Some(r)) != Some(now) {
            stood = false;
            again = None;
            armed = now.map(|r| match r {
                Round::Following { .. } => (r, draw(min, max), Instant::now()),
                Round::Leaderless { .. } => (r, draw(min / 2, min), Instant::now()),
            });
        }
        let due = match armed {
            _ if stood => None,
            Some(_) if sole => Some(Instant::now()),
            Some(_) if again.is_some() => again,
            Some((Round::Following { .. }, wait, _)) => Some(heard + max + wait),
            Some((Round::Leaderless { term }, wait, since)) => {
                Some(leaderless_due(term, wait, since))
            }
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
                match armed {
                    Some((Round::Following { .. }, wait, _))
                        if *contact.borrow() + max + wait > Instant::now() =>
                    {
                        again = None;
                        continue; // heard from since
                    }
                    // Refused for a longer log since the wait was set.
                    Some((Round::Leaderless { term }, wait, since))
                        if again.is_none() && leaderless_due(term, wait, since) > Instant::now() =>
                    {
                        continue;
                    }
                    _ => {}
                }
                if !sole {
                    let m = metrics.borrow().clone();
                    if !canvass.ask(&m, id, min).await {
                        tracing::debug!(round = ?armed.map(|(r, ..)| r), "no quorum would vote for this member; not standing");
                        again = Some(Instant::now() + draw(min, max));
                        continue;
                    }
                    // A leader may have been heard from while the answers came.
                    let following = matches!(armed, Some((Round::Following { .. }, ..)));
                    if round(&metrics.borrow(), id) != armed.map(|(r, ..)| r)
                        || (following && contact.borrow().elapsed() < max)
                    {
                        continue;
                    }
                }
                stood = true;
                tracing::info!(round = ?armed.map(|(r, ..)| r), "no leader in time; standing for election");
                if raft.trigger().elect().await.is_err() {
                    return;
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
    fn a_pre_vote_is_granted_only_without_a_live_leader_and_for_a_log_as_long() {
        let lease = Duration::from_millis(750);
        let log = |term, index| {
            Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(term, 2),
                index,
            ))
        };
        let req = PreVote {
            candidate: 3,
            term: 5,
            last_log_id: log(4, 100),
        };
        let silent = Duration::from_secs(1);
        assert!(grants_pre_vote(
            ServerState::Follower,
            silent,
            lease,
            log(4, 100),
            &req
        ));
        assert!(grants_pre_vote(
            ServerState::Candidate,
            silent,
            lease,
            log(3, 200),
            &req
        ));
        assert!(grants_pre_vote(
            ServerState::Follower,
            silent,
            lease,
            None,
            &req
        ));
        // A leader, or a follower that heard one within the lease, knows it lives.
        assert!(!grants_pre_vote(
            ServerState::Leader,
            silent,
            lease,
            log(4, 100),
            &req
        ));
        let heard = Duration::from_millis(100);
        assert!(!grants_pre_vote(
            ServerState::Follower,
            heard,
            lease,
            log(4, 100),
            &req
        ));
        // A longer log, by index or by term, would refuse the real vote too.
        assert!(!grants_pre_vote(
            ServerState::Follower,
            silent,
            lease,
            log(4, 101),
            &req
        ));
        assert!(!grants_pre_vote(
            ServerState::Follower,
            silent,
            lease,
            log(5, 1),
            &req
        ));
    }

    #[test]
    fn a_quorum_is_a_majority_of_every_voter_set() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
        let three = vec![set(&[1, 2, 3])];
        assert!(quorum(&three, &set(&[1, 2])));
        assert!(!quorum(&three, &set(&[1])));
        assert!(!quorum(&[set(&[1, 2, 3, 4])], &set(&[1, 2])));
        // Joint: the old set and the new one each need their majority.
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!quorum(&joint, &set(&[1, 2, 3])));
        assert!(quorum(&joint, &set(&[1, 3, 4])));
    }

    #[test]
    fn a_sole_voter_has_no_one_to_ask() {
        let m = metrics(ServerState::Follower, Vote::new(1, 1), None);
        // Members 1 and 2 vote.
        assert!(!sole_voter(&m, 1));
        let nodes: std::collections::BTreeMap<NodeId, BasicNode> =
            [(1, BasicNode::new("m1"))].into_iter().collect();
        let alone = RaftServerMetrics {
            membership_config: Arc::new(StoredMembership::new(
                None,
                Membership::new(vec![BTreeSet::from([1])], nodes),
            )),
            ..m
        };
        assert!(sole_voter(&alone, 1));
        assert!(!sole_voter(&alone, 2));
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
