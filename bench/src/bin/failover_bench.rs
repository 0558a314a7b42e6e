//! Failover benchmark: how long writes stop when the Raft leader's host is cut off.
//!
//! Three members, each on a host of its own (a network namespace, `baton_testkit::netns`),
//! for Baton's store (`baton server`, joined with the cluster token, mutual TLS) and for
//! etcd 3.4 (Debian's, with peer and client TLS), each with its default timing. Per trial:
//! four writers put continuously through clients that know every member, each request
//! bounded by 500 ms; the leader's host is cut off; the figure is the time from the cut to
//! the first acknowledged write that was called after it. The partition then heals, and
//! the next trial waits until the old leader follows again.
//!
//! Usage: `failover-bench BATON_BINARY` as root (see `scripts/bench.sh failover`).
//! `BENCH_TRIALS` sets the trials per system (default 20). Prints p50, p99 and max per
//! system, and Baton's p99 over etcd's.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use baton_bench::{env_or, ms, pct, wait_until, EtcdTls, Procs};
use baton_store::{StoreCa, StoreClient};
use baton_testkit::netns::Net;

/// What a trial needs of a system: a write, and each member's view of the leader.
trait System: Send + Sync {
    /// One put through a client of every member, bounded by `REQUEST_TIMEOUT`.
    /// Whether the write was acknowledged; if not, why.
    fn put(&self, key: String) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
    /// The leader as member `host` sees it (a host index), if it answers.
    fn leader_seen_by(
        &self,
        host: usize,
    ) -> Pin<Box<dyn Future<Output = Option<usize>> + Send + '_>>;
}

const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// A trial slower than this prints its writers' calls.
const SLOW: Duration = Duration::from_millis(2500);
const WRITERS: usize = 4;

struct Baton {
    client: StoreClient,
    /// One client per member, for its own view.
    members: Vec<StoreClient>,
    ips: Vec<String>,
}

impl System for Baton {
    fn put(&self, key: String) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            self.client
                .put(key, "v")
                .await
                .map(drop)
                .map_err(|e| baton_error_chain::chain(&e))
        })
    }

    fn leader_seen_by(
        &self,
        host: usize,
    ) -> Pin<Box<dyn Future<Output = Option<usize>> + Send + '_>> {
        Box::pin(async move {
            let s = self.members[host].status().await.ok()?;
            let leader = s.leader?;
            let addr = &s.members.iter().find(|m| m.id == leader)?.addr;
            self.ips
                .iter()
                .position(|ip| addr.starts_with(&format!("{ip}:")))
        })
    }
}

struct Etcd {
    client: etcd_client::Client,
    members: Vec<etcd_client::Client>,
    /// Member id per host.
    ids: Vec<u64>,
}

impl System for Etcd {
    fn put(&self, key: String) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let mut c = self.client.clone();
            match tokio::time::timeout(REQUEST_TIMEOUT, c.put(key, "v", None)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
            }
        })
    }

    fn leader_seen_by(
        &self,
        host: usize,
    ) -> Pin<Box<dyn Future<Output = Option<usize>> + Send + '_>> {
        Box::pin(async move {
            let mut c = self.members[host].clone();
            let s = tokio::time::timeout(REQUEST_TIMEOUT, c.status())
                .await
                .ok()?
                .ok()?;
            self.ids.iter().position(|id| *id == s.leader())
        })
    }
}

/// The leader every member names, once they agree.
async fn agreed_leader(sys: &dyn System, hosts: usize) -> Result<usize> {
    let found = Arc::new(Mutex::new(None));
    wait_until("the members to agree on a leader", || {
        let found = found.clone();
        async move {
            let mut seen = Vec::new();
            for h in 0..hosts {
                seen.push(sys.leader_seen_by(h).await);
            }
            let agreed = seen[0].is_some() && seen.iter().all(|s| *s == seen[0]);
            if agreed {
                *found.lock().unwrap() = seen[0];
            }
            agreed
        }
    })
    .await?;
    let leader = found.lock().unwrap().context("no leader")?;
    Ok(leader)
}

/// Cuts the leader off while writers run; returns the time to the first write acknowledged
/// after the cut.
async fn trial(sys: Arc<dyn System>, net: &Net, hosts: usize, n: usize) -> Result<Duration> {
    let leader = agreed_leader(&*sys, hosts).await?;
    let cut_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_ack: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Every call that ended after the cut, to explain a slow trial.
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (sys, cut_at, first_ack, stop, calls) = (
            sys.clone(),
            cut_at.clone(),
            first_ack.clone(),
            stop.clone(),
            calls.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let called = Instant::now();
                let result = sys.put(format!("failover/{n}/{w}/{i}")).await;
                let ok = result.is_ok();
                let cut = *cut_at.lock().unwrap();
                if let Some(cut) = cut {
                    let at = |t: Instant| t.saturating_duration_since(cut).as_millis();
                    calls.lock().unwrap().push(format!(
                        "  writer {w}: called at {} ms, answered at {} ms: {}",
                        at(called),
                        at(Instant::now()),
                        result.err().as_deref().unwrap_or("ok")
                    ));
                }
                if let (true, Some(cut)) = (ok, cut) {
                    if called >= cut {
                        let mut first = first_ack.lock().unwrap();
                        if first.is_none() {
                            *first = Some(Instant::now());
                        }
                    }
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    net.cut(leader)?;
    let cut = Instant::now();
    *cut_at.lock().unwrap() = Some(cut);
    let acked = wait_until("a write after the cut", || {
        let first_ack = first_ack.clone();
        async move { first_ack.lock().unwrap().is_some() }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    net.heal(leader)?;
    for w in writers {
        w.await?;
    }
    acked?;
    let failover = first_ack
        .lock()
        .unwrap()
        .context("no write after the cut")?
        - cut;
    if failover > SLOW {
        eprintln!("trial {n} took {} ms; the writers' calls:", ms(failover));
        for line in calls.lock().unwrap().iter() {
            eprintln!("{line}");
        }
    }
    // The old leader follows again before the next trial.
    wait_until("the old leader to follow again", || {
        let sys = sys.clone();
        async move {
            let seen = sys.leader_seen_by(leader).await;
            seen.is_some() && seen != Some(leader)
        }
    })
    .await?;
    Ok(failover)
}

async fn run(
    sys: Arc<dyn System>,
    net: &Net,
    hosts: usize,
    trials: usize,
) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for n in 0..trials {
        let d = trial(sys.clone(), net, hosts, n).await?;
        eprintln!("trial {n}: {}", ms(d));
        out.push(d);
    }
    Ok(out)
}

/// Three `baton server` members, the first with the API and the cluster token, the others
/// joining with it.
async fn start_baton(bin: &Path, dir: &Path, net: &Net) -> Result<(Procs, Baton)> {
    let mut procs = Procs(Vec::new());
    let ips: Vec<String> = (0..3).map(|h| net.host(h).ip.to_string()).collect();
    for (h, ip) in ips.iter().enumerate() {
        let data = dir.join(format!("baton-{h}"));
        let mut cmd = net.command(h, bin);
        cmd.args(["server", "--listen", &format!("{ip}:2380"), "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if h == 0 {
            cmd.args(["--bootstrap", "--api-listen", &format!("{ip}:6443")]);
        } else {
            let token = std::fs::read_to_string(dir.join("baton-0/token"))?;
            cmd.args(["--server", &format!("https://{}:6443", ips[0])])
                .args(["--token", token.trim()]);
        }
        let mut child = cmd.spawn().context("starting baton server")?;
        let stdout = child.stdout.take().context("stdout")?;
        procs.0.push(child);
        // A member says where it listens once it has started (a joiner, once joined).
        baton_testkit::process::announced_addr(stdout, "listening on ", Duration::from_secs(120))?;
    }
    let ca = StoreCa::load(&dir.join("baton-0/pki"))?;
    let tls = ca.client("bench")?;
    let addrs: Vec<String> = ips.iter().map(|ip| format!("{ip}:2380")).collect();
    let client = StoreClient::new(addrs.clone())
        .with_tls(&tls)?
        .with_timeout(REQUEST_TIMEOUT);
    let members = addrs.iter().map(|a| client.pinned(a)).collect();
    Ok((
        procs,
        Baton {
            client,
            members,
            ips,
        },
    ))
}

/// Three etcd members with peer and client TLS, each on its host.
async fn start_etcd(dir: &Path, net: &Net) -> Result<(Procs, Etcd)> {
    let ips: Vec<std::net::IpAddr> = (0..3).map(|h| net.host(h).ip.into()).collect();
    let tls = EtcdTls::make(&dir.join("etcd-tls"), &ips)?;
    let initial: Vec<String> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| format!("m{i}=https://{ip}:2380"))
        .collect();
    let mut procs = Procs(Vec::new());
    for (i, ip) in ips.iter().enumerate() {
        let child = net
            .command(i, "etcd")
            .args(tls.member_flags(
                &format!("m{i}"),
                &dir.join(format!("etcd-{i}")),
                &format!("{ip}:2379"),
                &format!("{ip}:2380"),
                &initial.join(","),
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (install Debian's etcd-server)")?;
        procs.0.push(child);
    }
    let endpoints: Vec<String> = ips.iter().map(|ip| format!("https://{ip}:2379")).collect();
    let opts = || tls.connect_options().with_connect_timeout(REQUEST_TIMEOUT);
    wait_until("etcd to elect a leader", || {
        let (endpoints, opts) = (endpoints.clone(), opts());
        async move {
            let Ok(mut c) = etcd_client::Client::connect(endpoints, Some(opts)).await else {
                return false;
            };
            c.put("bench/ready", "1", None).await.is_ok()
        }
    })
    .await?;
    let client = etcd_client::Client::connect(&endpoints, Some(opts())).await?;
    let mut members = Vec::new();
    let mut ids = Vec::new();
    for e in &endpoints {
        let mut c = etcd_client::Client::connect([e], Some(opts())).await?;
        ids.push(c.status().await?.header().context("no header")?.member_id());
        members.push(c);
    }
    Ok((
        procs,
        Etcd {
            client,
            members,
            ids,
        },
    ))
}

fn summary(name: &str, v: &mut [Duration]) -> (Duration, String) {
    let p99 = pct(v, 0.99);
    let row = format!(
        "| {name} | {} | {} | {} | {} |",
        v.len(),
        ms(pct(v, 0.5)),
        ms(p99),
        ms(v.iter().copied().max().unwrap_or_default())
    );
    (p99, row)
}

#[tokio::main]
async fn main() -> Result<()> {
    // etcd's client (tonic) builds its TLS with the process's crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: failover-bench BATON_BINARY")?,
    );
    if !Command::new("ip")
        .arg("netns")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!("network namespaces are needed: run as root, with iproute2");
    }
    let trials: usize = env_or("BENCH_TRIALS", 20);
    let tmp = tempfile::tempdir()?;

    let net = Net::new(3)?;
    let (procs, baton) = start_baton(&bin, tmp.path(), &net).await?;
    let mut baton_times = run(Arc::new(baton), &net, 3, trials).await?;
    drop(procs);
    drop(net);

    let net = Net::new(3)?;
    let (procs, etcd) = start_etcd(tmp.path(), &net).await?;
    let mut etcd_times = run(Arc::new(etcd), &net, 3, trials).await?;
    drop(procs);
    drop(net);

    println!("| system | trials | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    let (baton_p99, row) = summary("Baton (3 members, mutual TLS)", &mut baton_times);
    println!("{row}");
    let (etcd_p99, row) = summary("etcd 3.4 (3 members, peer and client TLS)", &mut etcd_times);
    println!("{row}");
    println!(
        "p99 ratio (Baton / etcd, lower is better): {:.2}; goal: Baton's p99 ≤ 3 s",
        baton_p99.as_secs_f64() / etcd_p99.as_secs_f64()
    );
    Ok(())
}
