//! Several clients run concurrent put, compare-and-set and get against a three-member
//! cluster while a nemesis kills (-9), pauses (SIGSTOP) and restarts members, the leader
//! included. The recorded history must be linearizable.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/linearizability.rs"]
mod linearizability;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::Cluster;
use linearizability::{check, client_loop, final_reads};
use rand::{Rng, SeedableRng};

#[test]
fn the_checker_rejects_non_linearizable_histories() {
    linearizability::self_test::run();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_kills_pauses_and_restarts_is_linearizable() {
    let mut c = Cluster::start(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    let addrs = c.addrs();
    let start = Instant::now();
    let run_for = Duration::from_secs(20);
    let until = start + run_for;
    let history = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..5 {
        // Each client starts at a different member, so forwarding is exercised too.
        let mut eps = addrs.clone();
        eps.rotate_left(id % 3);
        let client = c.client_of(eps).with_timeout(Duration::from_secs(2));
        clients.push(tokio::spawn(client_loop(
            id,
            client,
            start,
            stop.clone(),
            history.clone(),
        )));
    }
    // The nemesis: a fault schedule, alternating kills and pauses, leader first.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut round = 0;
    while Instant::now() + Duration::from_secs(3) < until {
        round += 1;
        let leader = c.wait_for_leader().await;
        let victim = if round % 2 == 1 {
            c.index_of(leader)
        } else {
            rng.gen_range(0..3)
        };
        if round % 3 == 0 {
            c.signal(victim, "-STOP");
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c.signal(victim, "-CONT");
        } else {
            c.kill(victim);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c.restart(victim);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep_until(until.into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    // Final reads once the cluster is whole: every acknowledged write must still be there.
    c.wait_for_leader().await;
    final_reads(&c.client(), start, &history).await;
    let history = history.lock().unwrap().clone();
    let ok = history.iter().filter(|o| o.output.is_some()).count();
    let unknown = history.len() - ok;
    eprintln!(
        "history: {} operations, {ok} answered, {unknown} unknown, {round} faults",
        history.len()
    );
    assert!(
        ok > 200,
        "the workload made progress through the faults ({ok} answered)"
    );
    if let Err(e) = check(&history) {
        panic!("history is not linearizable: {e}");
    }
}
