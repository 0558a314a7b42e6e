//! Three real store members on 127.0.0.1: leader failover, catch-up through a snapshot,
//! whole-cluster restart, and membership changes.

#[path = "support/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::time::Duration;

use baton_store::{RangeRequest, ReadOptions, StoreClient};
use cluster::{wait_for, Cluster};

async fn count_keys(client: &StoreClient, prefix: &str, serializable: bool) -> Option<usize> {
    let mut req = RangeRequest {
        serializable,
        ..RangeRequest::prefix(prefix)
    };
    let mut n = 0;
    loop {
        let page = client.range(&req).await.ok()?;
        n += page.kvs.len();
        if !page.more {
            return Some(n);
        }
        req.start_after = page.kvs.last().map(|kv| kv.key.clone());
        req.revision = page.revision;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_writes_continue() {
    let mut c = Cluster::start(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    let client = c.client();
    for i in 0..100 {
        client.put(format!("a/{i:03}"), "before").await.unwrap();
    }
    let old = c.wait_for_leader().await;
    let old_idx = c.index_of(old);
    c.kill(old_idx);
    let new = c.wait_for_leader().await;
    assert_ne!(new, old, "a new leader among the survivors");
    for i in 100..200 {
        client.put(format!("a/{i:03}"), "after").await.unwrap();
    }
    assert_eq!(count_keys(&client, "a/", false).await, Some(200));

    // The old leader comes back as a follower and catches up.
    c.restart(old_idx);
    let pinned = client.pinned(&c.members[old_idx].addr);
    wait_for(
        Duration::from_secs(60),
        "the old leader to catch up",
        || async { (count_keys(&pinned, "a/", true).await? == 200).then_some(()) },
    )
    .await;
    // A linearizable read through a follower is forwarded for its read index.
    let kv = pinned
        .get(b"a/150", ReadOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kv.value, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_purged_log_catches_up_through_a_snapshot() {
    let tuning = [
        "--heartbeat-ms",
        "50",
        "--election-ms",
        "300",
        "--snapshot-after-logs",
        "40",
        "--keep-logs",
        "5",
    ];
    let mut c = Cluster::start(3, &tuning).await;
    let client = c.client();
    let leader = c.wait_for_leader().await;
    // Stop a follower, then write far past what the leader keeps in its log.
    let lagger = (0..3).find(|&i| c.members[i].id != leader).unwrap();
    c.kill(lagger);
    for i in 0..300 {
        client
            .put(format!("s/{i:03}"), format!("{i}"))
            .await
            .unwrap();
    }
    let want = client.status().await.unwrap();
    c.restart(lagger);
    let pinned = client.pinned(&c.members[lagger].addr);
    wait_for(
        Duration::from_secs(60),
        "the lagging member to catch up",
        || async {
            let s = pinned.status().await.ok()?;
            (s.revision >= want.revision).then_some(())
        },
    )
    .await;
    assert_eq!(count_keys(&pinned, "s/", true).await, Some(300));
    let kv = pinned
        .get(
            b"s/123",
            ReadOptions {
                revision: 0,
                serializable: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(kv.unwrap().value, b"123");
    assert!(
        c.members[lagger].log().contains("installing snapshot"),
        "the member caught up through a snapshot install:\n{}",
        c.members[lagger].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_whole_cluster_keeps_every_acknowledged_write() {
    let mut c = Cluster::start(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    let client = c.client();
    let mut last = 0;
    for i in 0..300 {
        last = client
            .put(format!("d/{i:03}"), format!("{i}"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.restart(i);
    }
    c.wait_for_leader().await;
    let client = c.client();
    assert_eq!(count_keys(&client, "d/", false).await, Some(300));
    let s = client.status().await.unwrap();
    assert!(
        s.revision >= last,
        "revision went backwards: {} < {last}",
        s.revision
    );
    assert!(client.put("d/next", "x").await.unwrap() > last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_promoted_and_removed() {
    let c = Cluster::start(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    let client = c.client();
    let s = client.status().await.unwrap();
    let voters: BTreeSet<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    client.put("m/1", "x").await.unwrap();
    // Remove the leader itself: the others go on.
    let leader = c.wait_for_leader().await;
    client.remove_member(leader).await.unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&i| c.members[i].id != leader).collect();
    let pinned = client.pinned(&c.members[survivors[0]].addr);
    wait_for(
        Duration::from_secs(30),
        "a two-member cluster with a new leader",
        || async {
            let s = pinned.status().await.ok()?;
            let ok = s.members.len() == 2 && s.leader.is_some_and(|l| l != leader);
            ok.then_some(())
        },
    )
    .await;
    let client = c.client_of(survivors.iter().map(|&i| c.members[i].addr.clone()));
    client.put("m/2", "y").await.unwrap();
    assert_eq!(count_keys(&client, "m/", false).await, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_in_any_order_and_at_the_same_moment() {
    let c = Cluster::start_at_once(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    for (i, m) in c.members.iter().enumerate() {
        assert!(m.is_running(), "member {i} exited: {}", m.log());
    }
    // Each joiner got in as a voter, whether or not its seed was up when it asked (when it
    // was not, or another change was under way, it logged why it waited; which of them
    // had to wait is a race, so it is not asserted).
    for m in &c.members[1..] {
        wait_for(
            Duration::from_secs(30),
            "a joiner to say it joined",
            || async {
                m.log()
                    .contains("joined the cluster as a voter")
                    .then_some(())
            },
        )
        .await;
    }
    let client = c.client();
    client.put("j/1", "x").await.unwrap();
    assert_eq!(count_keys(&client, "j/", false).await, Some(1));
}

/// A follower does not forward a write to a leader it has not heard from for a few
/// heartbeats (stopped, here, as a cut-off host would be): it waits for the leader or its
/// successor, and when the client's deadline comes first it answers "no leader", a
/// definite failure that the client may retry elsewhere, instead of leaving the write's
/// outcome unknown. Once the leader is back, the follower forwards again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_a_silent_leader_fails_writes_definitely_before_the_clients_deadline() {
    // Elections take seconds here, far beyond the client's 800 ms.
    let c = Cluster::start(3, &["--heartbeat-ms", "100", "--election-ms", "3000"]).await;
    let leader = c.wait_for_leader().await;
    let leader_idx = c.index_of(leader);
    let follower_idx = (leader_idx + 1) % 3;
    let follower = c
        .client()
        .pinned(&c.members[follower_idx].addr)
        .with_timeout(Duration::from_millis(800));
    follower.put("silent/before", "v").await.unwrap();
    c.signal(leader_idx, "-STOP");
    // The first writes may leave before the follower has missed enough heartbeats; one
    // of the next fails definitely. None succeeds: nobody can commit.
    let start = std::time::Instant::now();
    let mut outcomes = Vec::new();
    let definite = loop {
        let r = follower.put("silent/during", "v").await;
        match r {
            Ok(rev) => panic!("a write committed without a leader: {rev}"),
            Err(baton_store::Error::NoLeader { reason }) => break reason,
            Err(e) => outcomes.push(e.to_string()),
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "no definite failure: {outcomes:?}"
        );
    };
    assert!(definite.contains("nothing was written"), "{definite}");
    assert!(outcomes.len() <= 2, "{outcomes:?}");
    c.signal(leader_idx, "-CONT");
    wait_for(
        Duration::from_secs(30),
        "writes through the follower again",
        || async { follower.put("silent/after", "v").await.ok() },
    )
    .await;
}

/// A member that missed the leader's heartbeats (stopped here, as a long pause or a cut
/// link would) finds its election timer long past when it runs again, and stands before
/// the next heartbeat reaches it. Its pre-vote finds the others still hearing the
/// leader, so it raises no term, and the leader keeps leading: the members' terms stay
/// as they were while it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_from_a_pause_does_not_unseat_the_leader() {
    let c = Cluster::start(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    let leader = c.wait_for_leader().await;
    let leader_idx = c.index_of(leader);
    let term = c.status_of(leader_idx).await.unwrap().term;
    let paused = (leader_idx + 1) % 3;
    c.signal(paused, "-STOP");
    // The fault itself: long enough for any draw of its election timeout to pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader_client = c.client().pinned(&c.members[leader_idx].addr);
    let rev = leader_client.put("pause/during", "v").await.unwrap();
    c.signal(paused, "-CONT");
    let after = leader_client.put("pause/after", "v").await.unwrap();
    assert!(after > rev);
    let back = wait_for(
        Duration::from_secs(30),
        "the paused member to apply the write made after it resumed",
        || async {
            let s = c.status_of(paused).await?;
            (s.revision >= after).then_some(s)
        },
    )
    .await;
    for i in 0..3 {
        let s = c.status_of(i).await.unwrap();
        assert_eq!(
            (s.leader, s.term),
            (Some(leader), term),
            "member {i} after the pause (the paused one: {back:?})"
        );
    }
}
