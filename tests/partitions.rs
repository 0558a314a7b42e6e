//! The control plane across real network boundaries: each host a network namespace with
//! its own address, joined by a bridge (`baton_testkit::netns`), each running its own
//! `baton server`. The first member starts the cluster; the others join with its token,
//! started in an order picked at random, at the same moment.
//!
//! While clients run a recorded workload against the store and `kubectl` applies
//! ConfigMaps, the test:
//! 1. cuts the links of the host that holds the Raft leader. Writes resume within 3 s;
//!    no `kubectl` command fails beyond one retry against another server. The partition
//!    heals; the old leader rejoins as a follower.
//! 2. kills the new leader with SIGKILL and replaces it with a member on a new host,
//!    which joins with the token; the dead member is removed. The cluster serves
//!    throughout.
//!
//! The whole history must be linearizable, and every ConfigMap that `kubectl` was told
//! was applied must be there at the end. Needs root (network namespaces).

#[path = "support/linearizability.rs"]
mod linearizability;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_store::{StoreCa, StoreClient};
use baton_testkit::netns::Net;
use linearizability::{check, client_loop, final_reads, Input, Operation};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const STORE_PORT: u16 = 2380;
const API_PORT: u16 = 6443;

struct Server {
    child: Child,
    host: usize,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// Waits until it serves the API (a joiner does once it has joined).
    fn wait_ready(&mut self) {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        if let Err(e) = baton_testkit::process::announced_addr(
            stdout,
            "Kubernetes API at https://",
            Duration::from_secs(120),
        ) {
            panic!("host {}: {e}; its log:\n{}", self.host, self.log());
        }
    }
}

/// Starts `baton server` on `host`, with its store and API on the host's address.
fn spawn_server(net: &Net, host: usize, dir: &Path, extra: &[&str]) -> Server {
    let ip = net.host(host).ip;
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let child = net
        .command(host, env!("CARGO_BIN_EXE_baton"))
        .env("RUST_LOG", "info,openraft=warn")
        .args(["server", "--listen", &format!("{ip}:{STORE_PORT}")])
        .args(["--api-listen", &format!("{ip}:{API_PORT}"), "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn baton server in a network namespace");
    Server {
        child,
        host,
        dir: dir.to_path_buf(),
    }
}

/// What `kubectl` did: each command, whether the first try failed, and whether the
/// retry against the next server failed too.
#[derive(Default)]
struct KubectlLog {
    applied: Vec<String>,
    retried: usize,
    failed: Vec<String>,
}

/// Applies a ConfigMap through one server, and once more through the next if that
/// fails. Returns the error of the last try.
fn apply(kubeconfig: &Path, servers: &[String], first: usize, name: &str) -> Vec<String> {
    let manifest =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n");
    let mut errors = Vec::new();
    for attempt in 0..2 {
        let server = &servers[(first + attempt) % servers.len()];
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", kubeconfig)
            .args([
                "--server",
                server,
                "--request-timeout=2s",
                "apply",
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            return errors;
        }
        errors.push(format!(
            "{server}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    errors
}

/// The host whose store address is `addr`.
fn host_of(net_ips: &[String], addr: &str) -> usize {
    net_ips
        .iter()
        .position(|ip| addr.starts_with(&format!("{ip}:")))
        .unwrap_or_else(|| panic!("{addr} is no host's"))
}

/// The first write acknowledged among those called at or after `from` (µs since start).
fn first_write_ack(history: &[Operation], from: u128) -> Option<u128> {
    history
        .iter()
        .filter(|o| o.call >= from && o.output.is_some() && !matches!(o.input, Input::Get))
        .filter_map(|o| o.ret)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_survives_a_partitioned_leader_and_a_replaced_member() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Net::new(3).expect("network namespaces (run as root)");
    let ips: Vec<String> = (0..3).map(|h| net.host(h).ip.to_string()).collect();
    let dir = |h: usize| tmp.path().join(format!("host-{h}"));
    let mut servers: Vec<Option<Server>> = Vec::new();

    // The first member, then the others at once, in a random order.
    let mut first = spawn_server(&net, 0, &dir(0), &["--bootstrap"]);
    first.wait_ready();
    let token = std::fs::read_to_string(dir(0).join("token")).unwrap();
    let token = token.trim().to_string();
    let first_api = format!("https://{}:{API_PORT}", ips[0]);
    servers.push(Some(first));
    let mut order = vec![1, 2];
    order.shuffle(&mut rng);
    eprintln!("joining in the order {order:?}");
    let mut joiners: Vec<Server> = order
        .iter()
        .map(|&h| {
            spawn_server(
                &net,
                h,
                &dir(h),
                &["--server", &first_api, "--token", &token],
            )
        })
        .collect();
    for j in &mut joiners {
        j.wait_ready();
    }
    joiners.sort_by_key(|s| s.host);
    servers.extend(joiners.into_iter().map(Some));

    let ca = StoreCa::load(&dir(0).join("pki")).unwrap();
    let tls = ca.client("test").unwrap();
    let store_addrs: Vec<String> = ips.iter().map(|ip| format!("{ip}:{STORE_PORT}")).collect();
    let client_over = |addrs: &[String]| {
        StoreClient::new(addrs.to_vec())
            .with_tls(&tls)
            .unwrap()
            .with_timeout(Duration::from_secs(1))
    };
    let admin = client_over(&store_addrs);
    let status = baton_testkit::wait_until_async(Duration::from_secs(60), "three voters", || {
        let admin = admin.clone();
        async move {
            let s = admin.status().await.ok()?;
            (s.leader.is_some() && s.members.iter().filter(|m| m.voter).count() == 3).then_some(s)
        }
    })
    .await
    .unwrap();
    eprintln!("members: {:?}", status.members);

    // The workload: store clients, each starting at another member, and kubectl.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for id in 0..4 {
        let mut eps = store_addrs.clone();
        eps.rotate_left(id % 3);
        clients.push(tokio::spawn(client_loop(
            id,
            client_over(&eps),
            start,
            stop.clone(),
            history.clone(),
        )));
    }
    let kubeconfig = dir(0).join("kubeconfig");
    let api_servers = Arc::new(Mutex::new(
        ips.iter()
            .map(|ip| format!("https://{ip}:{API_PORT}"))
            .collect::<Vec<_>>(),
    ));
    let kubectl_log = Arc::new(Mutex::new(KubectlLog::default()));
    let kubectl = {
        let (stop, log, servers, kubeconfig) = (
            stop.clone(),
            kubectl_log.clone(),
            api_servers.clone(),
            kubeconfig.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("cm-{n}");
                let list = servers.lock().unwrap().clone();
                let errors = apply(&kubeconfig, &list, n, &name);
                let mut log = log.lock().unwrap();
                match errors.len() {
                    0 => log.applied.push(name),
                    1 => {
                        log.retried += 1;
                        log.applied.push(name);
                    }
                    _ => log.failed.push(errors.join("; ")),
                }
                drop(log);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. The leader's host is cut off.
    let status = admin.status().await.unwrap();
    let leader_id = status.leader.unwrap();
    let leader_addr = status
        .members
        .iter()
        .find(|m| m.id == leader_id)
        .unwrap()
        .addr
        .clone();
    let leader_host = host_of(&ips, &leader_addr);
    let cut_at = start.elapsed().as_micros();
    net.cut(leader_host).unwrap();
    eprintln!("cut host {leader_host}, the leader's ({leader_addr})");
    let resumed = baton_testkit::wait_until_async(
        Duration::from_secs(15),
        "an acknowledged write after the cut",
        || {
            let history = history.clone();
            async move { first_write_ack(&history.lock().unwrap(), cut_at) }
        },
    )
    .await
    .unwrap();
    let failover = Duration::from_micros((resumed - cut_at) as u64);
    eprintln!("writes resumed {failover:?} after the leader's partition");
    tokio::time::sleep(Duration::from_secs(3)).await;
    net.heal(leader_host).unwrap();
    let old = admin.pinned(&leader_addr);
    baton_testkit::wait_until_async(
        Duration::from_secs(30),
        "the old leader to rejoin as a follower",
        || {
            let old = old.clone();
            async move {
                let s = old.status().await.ok()?;
                (s.leader.is_some() && s.leader != Some(leader_id)).then_some(())
            }
        },
    )
    .await
    .unwrap();
    assert!(
        failover <= Duration::from_secs(3),
        "writes resumed {failover:?} after the leader's partition; the goal is 3 s"
    );

    // 2. The current leader is killed and replaced by a member on a new host.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = admin.status().await.unwrap();
    let victim_id = status.leader.unwrap();
    let victim_addr = status
        .members
        .iter()
        .find(|m| m.id == victim_id)
        .unwrap()
        .addr
        .clone();
    let victim = host_of(&ips, &victim_addr);
    servers[victim].take();
    eprintln!("killed host {victim}'s member ({victim_addr}) with SIGKILL");
    let new_host = net.add_host().unwrap();
    let survivor = (0..3).find(|h| *h != victim).unwrap();
    let survivor_api = format!("https://{}:{API_PORT}", ips[survivor]);
    let mut replacement = spawn_server(
        &net,
        new_host,
        &dir(new_host),
        &["--server", &survivor_api, "--token", &token],
    );
    replacement.wait_ready();
    let new_ip = net.host(new_host).ip.to_string();
    {
        let mut list = api_servers.lock().unwrap();
        list[victim] = format!("https://{new_ip}:{API_PORT}");
    }
    let live: Vec<String> = store_addrs
        .iter()
        .filter(|a| **a != victim_addr)
        .cloned()
        .chain([format!("{new_ip}:{STORE_PORT}")])
        .collect();
    let admin = client_over(&live);
    admin.remove_member(victim_id).await.unwrap();
    baton_testkit::wait_until_async(
        Duration::from_secs(30),
        "three voters, the new member among them",
        || {
            let admin = admin.clone();
            let new_ip = new_ip.clone();
            async move {
                let s = admin.status().await.ok()?;
                let voters: Vec<_> = s.members.iter().filter(|m| m.voter).collect();
                (s.leader.is_some()
                    && voters.len() == 3
                    && voters
                        .iter()
                        .any(|m| m.addr.starts_with(&format!("{new_ip}:")))
                    && !s.members.iter().any(|m| m.id == victim_id))
                .then_some(())
            }
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    kubectl.join().unwrap();
    final_reads(&admin, start, &history).await;

    let history = history.lock().unwrap().clone();
    let answered = history.iter().filter(|o| o.output.is_some()).count();
    eprintln!("history: {} operations, {answered} answered", history.len());
    assert!(answered > 100, "the workload made progress ({answered})");
    if let Err(e) = check(&history) {
        panic!("history is not linearizable: {e}");
    }
    let log = kubectl_log.lock().unwrap();
    eprintln!(
        "kubectl: {} applied, {} after one retry",
        log.applied.len(),
        log.retried
    );
    assert!(
        log.failed.is_empty(),
        "kubectl commands failed beyond one retry: {:?}",
        log.failed
    );
    // Every ConfigMap kubectl was told was applied is there.
    let out = Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["--server", &survivor_api, "get", "configmaps", "-o", "name"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let names = String::from_utf8_lossy(&out.stdout);
    for name in &log.applied {
        assert!(
            names.contains(&format!("configmap/{name}\n")),
            "{name} was acknowledged and is gone"
        );
    }
    drop(replacement);
    drop(servers);
}
