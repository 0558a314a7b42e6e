//! Several clients run concurrent put, compare-and-set and get against a three-member
//! cluster while a nemesis kills (-9), pauses (SIGSTOP) and restarts members, the leader
//! included. The recorded history must be linearizable.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/linearizability.rs"]
mod linearizability;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_store::{Compare, Error, Op, ReadOptions, StoreClient, Txn};
use cluster::Cluster;
use linearizability::{check, Input, Operation, Output};
use rand::{Rng, SeedableRng};

#[test]
fn the_checker_rejects_non_linearizable_histories() {
    linearizability::self_test::run();
}

const KEYS: [&str; 3] = ["lin/a", "lin/b", "lin/c"];

async fn client_loop(
    id: usize,
    client: StoreClient,
    start: Instant,
    until: Instant,
    history: Arc<Mutex<Vec<Operation>>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    let mut n = 0;
    let mut last_seen: Option<String> = None;
    while Instant::now() < until {
        n += 1;
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        let value = format!("c{id}-{n}");
        let choice = rng.gen_range(0..10);
        let call = start.elapsed().as_micros();
        let (input, result): (Input, Result<Output, Error>) = if choice < 4 {
            let r = client.put(key, value.clone()).await.map(|_| Output::Put);
            (Input::Put(value), r)
        } else if choice < 6 {
            let expected = last_seen.clone().unwrap_or_else(|| "none".into());
            let txn = Txn::new()
                .when([Compare::value(key, expected.clone())])
                .and_then([Op::put(key, value.clone())]);
            let r = client
                .txn(&txn)
                .await
                .map(|resp| Output::Cas(resp.succeeded));
            (
                Input::Cas {
                    expected,
                    new: value,
                },
                r,
            )
        } else {
            let r = client.get(key.as_bytes(), ReadOptions::default()).await;
            let r = r.map(|kv| Output::Get(kv.map(|kv| String::from_utf8(kv.value).unwrap())));
            if let Ok(Output::Get(Some(v))) = &r {
                last_seen = Some(v.clone());
            }
            (Input::Get, r)
        };
        let ret = start.elapsed().as_micros();
        let op = match result {
            Ok(output) => Operation {
                client: id,
                key: key.into(),
                input,
                output: Some(output),
                call,
                ret: Some(ret),
            },
            // Refused before anything was proposed: the operation did not happen.
            Err(Error::NoLeader { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(Error::Transport { source, .. }) if source.is_connect() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // Failed or timed out: the write may or may not have happened.
            Err(_) => Operation {
                client: id,
                key: key.into(),
                input,
                output: None,
                call,
                ret: None,
            },
        };
        let failed = op.output.is_none();
        history.lock().unwrap().push(op);
        if failed {
            // A crashed member's connections fail at once; do not spin on them.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_kills_pauses_and_restarts_is_linearizable() {
    let mut c = Cluster::start(3, &["--heartbeat-ms", "50", "--election-ms", "300"]).await;
    let addrs = c.addrs();
    let start = Instant::now();
    let run_for = Duration::from_secs(20);
    let until = start + run_for;
    let history = Arc::new(Mutex::new(Vec::new()));
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
            until,
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
    for t in clients {
        t.await.unwrap();
    }
    // Final reads once the cluster is whole: every acknowledged write must still be there.
    c.wait_for_leader().await;
    let client = c.client();
    let call = start.elapsed().as_micros();
    for key in KEYS {
        let kv = client
            .get(key.as_bytes(), ReadOptions::default())
            .await
            .unwrap();
        let ret = start.elapsed().as_micros();
        let output = Some(Output::Get(
            kv.map(|kv| String::from_utf8(kv.value).unwrap()),
        ));
        history.lock().unwrap().push(Operation {
            client: 99,
            key: key.into(),
            input: Input::Get,
            output,
            call,
            ret: Some(ret),
        });
    }
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
