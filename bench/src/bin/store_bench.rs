//! Store benchmark: Baton's store against etcd 3.4 (Debian's etcd-server), same machine,
//! same run, same workload.
//!
//! Workload: sync writes of 256-byte values and linearizable reads, at 1, 16 and 128
//! concurrent clients, for a fixed time per cell, on one member and on three members on
//! loopback. Both clients talk to the leader. Both speak TLS with client certificates, as
//! in production: Baton's members and clients mutual TLS from the store CA, and etcd with
//! peer and client TLS (`--client-cert-auth`, `--peer-client-cert-auth`). Prints one
//! table with the ratio per row.
//!
//! Usage: `store-bench BATON_BINARY` (see `scripts/bench.sh store`). `BENCH_SECS` sets the
//! seconds per cell (default 5).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use baton_bench::{env_or, ms, pct, proc_cpu, wait_until, EtcdTls, Procs};
use baton_store::{ReadOptions, StoreClient};
use rand::{Rng, SeedableRng};

const VALUE_BYTES: usize = 256;
const KEYSPACE: u32 = 10_000;

#[derive(Clone)]
enum Target {
    Baton(StoreClient),
    Etcd(Box<etcd_client::Client>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Put,
    Get,
}

impl Target {
    async fn op(&mut self, w: Workload, key: String, value: &[u8]) -> Result<()> {
        match (self, w) {
            (Target::Baton(c), Workload::Put) => {
                c.put(key, value.to_vec()).await?;
            }
            (Target::Baton(c), Workload::Get) => {
                c.get(key.as_bytes(), ReadOptions::default()).await?;
            }
            (Target::Etcd(c), Workload::Put) => {
                c.put(key, value.to_vec(), None).await?;
            }
            (Target::Etcd(c), Workload::Get) => {
                c.get(key, None).await?;
            }
        }
        Ok(())
    }
}

struct Cell {
    /// Server CPU per operation, all members together.
    cpu_per_op: Duration,
    /// CPU per operation of this process: the client library and the load loop.
    client_cpu_per_op: Duration,
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn run_cell(
    target: &Target,
    procs: &Procs,
    w: Workload,
    clients: usize,
    secs: u64,
) -> Result<Cell> {
    let value = Arc::new(vec![b'x'; VALUE_BYTES]);
    // Warm-up: connections, leases on the pools, first pages of RocksDB/bbolt.
    {
        let mut t = target.clone();
        for i in 0..100 {
            t.op(w, format!("bench/{i}"), &value).await?;
        }
    }
    let start = Instant::now();
    let cpu0 = procs.cpu();
    let client0 = proc_cpu(std::process::id());
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut t = target.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut rng = rand::rngs::StdRng::from_entropy();
            while Instant::now() < deadline {
                let key = format!("bench/{}", rng.gen_range(0..KEYSPACE));
                let t0 = Instant::now();
                t.op(w, key, &value).await?;
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = procs.cpu().saturating_sub(cpu0);
    let client_cpu = proc_cpu(std::process::id()).saturating_sub(client0);
    Ok(Cell {
        cpu_per_op: cpu / all.len().max(1) as u32,
        client_cpu_per_op: client_cpu / all.len().max(1) as u32,
        ops_per_sec: all.len() as f64 / elapsed,
        p50: pct(&mut all, 0.50),
        p99: pct(&mut all, 0.99),
    })
}

/// Starts `n` Baton members; returns the processes and a client pinned to the leader.
async fn start_baton(bin: &Path, dir: &Path, n: usize) -> Result<(Procs, Target)> {
    let mut procs = Procs(Vec::new());
    // Each member's socket is bound here and passed to it, so that every address is
    // known before the members that join it start.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    // Members speak mutual TLS with one store CA, copied into each data dir before it
    // starts; the benchmark's clients present a store client certificate.
    let ca = baton_store::StoreCa::generate()?;
    let tls = ca.client("bench")?;
    let client = |addrs: Vec<String>| StoreClient::new(addrs).with_tls(&tls);
    for (i, addr) in addrs.iter().enumerate() {
        let data = dir.join(format!("baton-{n}-{i}"));
        ca.write_to(&data.join("pki"))?;
        let mut cmd = Command::new(bin);
        baton_testkit::process::pass_listener(&mut cmd, &listeners[i]);
        cmd.args(["server", "--id", &(i + 1).to_string()])
            .args([
                "--listen-fd",
                &baton_testkit::process::LISTEN_FD.to_string(),
            ])
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null());
        if i == 0 {
            cmd.arg("--bootstrap");
        } else {
            cmd.args(["--join", &addrs[0]]);
        }
        procs.0.push(cmd.spawn().context("starting baton server")?);
        let c = client(vec![addr.clone()])?.with_timeout(Duration::from_secs(2));
        let id = i as u64 + 1;
        wait_until("a baton member to join", || {
            let c = c.clone();
            async move {
                c.status()
                    .await
                    .map(|s| s.leader.is_some() && s.members.iter().any(|m| m.id == id && m.voter))
                    .unwrap_or(false)
            }
        })
        .await?;
    }
    let status = client(addrs.clone())?.status().await?;
    let leader = status.leader.context("no leader")?;
    let addr = status
        .members
        .iter()
        .find(|m| m.id == leader)
        .context("leader not a member")?
        .addr
        .clone();
    Ok((procs, Target::Baton(client(vec![addr])?)))
}

/// A loopback port that was free a moment ago.
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Starts an `n`-member etcd cluster with peer and client TLS, as Baton's members speak
/// mutual TLS; returns the processes and a client of its leader.
async fn start_etcd(dir: &Path, n: usize) -> Result<(Procs, Target)> {
    let mut procs = Procs(Vec::new());
    let tls = EtcdTls::make(&dir.join(format!("etcd-{n}-tls")), &["127.0.0.1".parse()?])?;
    // etcd's members name each other's peer URLs before any starts, and etcd cannot
    // inherit sockets: its ports are picked here, the one place a port is picked before
    // its server binds it.
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (unused_port(), unused_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("m{i}=https://127.0.0.1:{p}"))
        .collect();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let child = Command::new("etcd")
            .args(tls.member_flags(
                &format!("m{i}"),
                &dir.join(format!("etcd-{n}-{i}")),
                &format!("127.0.0.1:{client}"),
                &format!("127.0.0.1:{peer}"),
                &initial.join(","),
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (install Debian's etcd-server)")?;
        procs.0.push(child);
    }
    let endpoints: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("https://127.0.0.1:{c}"))
        .collect();
    wait_until("etcd to elect a leader", || {
        let endpoints = endpoints.clone();
        let opts = tls.connect_options();
        async move {
            let Ok(mut c) = etcd_client::Client::connect(endpoints, Some(opts)).await else {
                return false;
            };
            c.put("bench/ready", "1", None).await.is_ok()
        }
    })
    .await?;
    let mut c = etcd_client::Client::connect(endpoints, Some(tls.connect_options())).await?;
    let leader = c.status().await?.leader();
    let members = c.member_list().await?;
    let url = members
        .members()
        .iter()
        .find(|m| m.id() == leader)
        .and_then(|m| m.client_urls().first().cloned())
        .context("etcd leader has no client URL")?;
    let c = etcd_client::Client::connect([url], Some(tls.connect_options())).await?;
    Ok((procs, Target::Etcd(Box::new(c))))
}

#[tokio::main]
async fn main() -> Result<()> {
    // etcd's client (tonic) builds its TLS with the process's crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: store-bench BATON_BINARY")?,
    );
    let secs: u64 = env_or("BENCH_SECS", 5);
    // BENCH_FILTER=1/Put/16 runs only the matching cells (for profiling).
    let filter = std::env::var("BENCH_FILTER").ok();
    let tmp = tempfile::tempdir()?;
    println!(
        "store benchmark: {VALUE_BYTES}-byte values, {secs}s per cell, clients on the same host"
    );
    println!(
        "| members | op | clients | baton ops/s | baton p50 ms | baton p99 ms | etcd ops/s | etcd p50 ms | etcd p99 ms | ops ratio | p99 ratio | baton cpu µs/op | etcd cpu µs/op | baton client µs/op | etcd client µs/op |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for members in [1usize, 3] {
        let (baton_procs, baton) = start_baton(&bin, tmp.path(), members).await?;
        let (etcd_procs, etcd) = start_etcd(tmp.path(), members).await?;
        for w in [Workload::Put, Workload::Get] {
            for clients in [1usize, 16, 128] {
                let name = format!("{members}/{w:?}/{clients}");
                if !filter.as_deref().is_none_or(|f| name.contains(f)) {
                    continue;
                }
                let b = run_cell(&baton, &baton_procs, w, clients, secs).await?;
                let e = run_cell(&etcd, &etcd_procs, w, clients, secs).await?;
                let op = match w {
                    Workload::Put => "put (sync)",
                    Workload::Get => "get (linearizable)",
                };
                println!(
                    "| {members} | {op} | {clients} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
                    b.ops_per_sec,
                    ms(b.p50),
                    ms(b.p99),
                    e.ops_per_sec,
                    ms(e.p50),
                    ms(e.p99),
                    b.ops_per_sec / e.ops_per_sec,
                    b.p99.as_secs_f64() / e.p99.as_secs_f64(),
                    b.cpu_per_op.as_secs_f64() * 1e6,
                    e.cpu_per_op.as_secs_f64() * 1e6,
                    b.client_cpu_per_op.as_secs_f64() * 1e6,
                    e.client_cpu_per_op.as_secs_f64() * 1e6,
                );
            }
        }
        drop(baton_procs);
        drop(etcd_procs);
    }
    println!("ops ratio = baton/etcd throughput (higher is better); p99 ratio = baton/etcd p99 (lower is better)");
    Ok(())
}
