//! Leader election on a Lease against `baton up`'s API server: one leader at a time, and
//! a successor once the leader stops renewing.

#[path = "support/baton.rs"]
mod baton;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::Baton;
use baton_kube::leader::{self, Election};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_successor_when_it_stops() {
    let b = Baton::start();
    let yaml = std::fs::read_to_string(&b.kubeconfig).unwrap();
    let client = baton_kube::client::from_yaml(&yaml).await.unwrap();
    let leading = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let leaders: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut stops = Vec::new();
    for id in ["a", "b"] {
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        stops.push((id, stop_tx));
        let e = Election {
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(300),
            ..Election::new("kube-system", "test-election", id)
        };
        let (leading, most, leaders) = (leading.clone(), most.clone(), leaders.clone());
        let client = client.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            leader::run(client, e, shutdown, move |mut lost| {
                let (leading, most, leaders) = (leading.clone(), most.clone(), leaders.clone());
                async move {
                    let now = leading.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    leaders.lock().unwrap().push(id.to_string());
                    let _ = lost.wait_for(|l| *l).await;
                    leading.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .await
        });
    }
    let wait_leaders = |n: usize| {
        let leaders = leaders.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if leaders.lock().unwrap().len() >= n {
                    return leaders.lock().unwrap().clone();
                }
                assert!(Instant::now() < deadline, "no leader #{n}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = wait_leaders(1).await[0].clone();
    // Both keep campaigning for a while; only one leads.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        leaders.lock().unwrap().len(),
        1,
        "{:?}",
        leaders.lock().unwrap()
    );
    // The leader stops; the other takes over once the lease runs out.
    let stop = &stops.iter().find(|(id, _)| *id == first).unwrap().1;
    stop.send(true).unwrap();
    let all = wait_leaders(2).await;
    assert_ne!(all[1], first);
    assert_eq!(most.load(Ordering::SeqCst), 1, "two leaders at once");
}
