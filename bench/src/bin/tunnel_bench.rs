//! Tunnel benchmark: what it costs to reach a Service endpoint on another host.
//!
//! One control-plane host and two node hosts, each a network namespace
//! (`baton_testkit::netns`) running its own `baton`, joined with the node token.
//! http-hello runs on the second node behind a NodePort Service. The benchmark sends HTTP
//! requests from outside the nodes to that NodePort:
//! - **direct**: on the second node, whose proxy reaches the pod on its own host;
//! - **tunnel**: on the first node, whose proxy carries each connection through a tunnel
//!   to the second (`node/src/tunnel.rs`).
//!
//! Two loads each: a fresh connection per request (what opening a tunnel costs), and
//! keep-alive connections (what carrying bytes through one costs). The ratio is the
//! tunnel's rate over the direct path's: the price of crossing hosts.
//!
//! Usage: `tunnel-bench BATON_BINARY` as root (see `scripts/bench.sh tunnel`).
//! `BENCH_SECS` sets the seconds per cell (default 3).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use baton_bench::{env_or, http, ms, pct, wait_until, Procs};
use baton_testkit::netns::Net;

const API_PORT: u16 = 6443;

fn guests_dir() -> PathBuf {
    baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../examples-wasm/dist")
}

/// kubectl against the control-plane host, with the cluster's admin kubeconfig.
fn kubectl(kubeconfig: &Path, api: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(["--server", api, "--request-timeout=10s"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("kubectl")?;
    let mut input = child.stdin.take().context("stdin")?;
    if let Some(s) = stdin {
        input.write_all(s.as_bytes())?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The control plane on host 0 and a node on each of hosts 1 and 2.
fn start(bin: &Path, dir: &Path, net: &Net) -> Result<Procs> {
    let mut procs = Procs(Vec::new());
    let ip0 = net.host(0).ip;
    let server_dir = dir.join("host-0");
    let mut child = net
        .command(0, bin)
        .env("RUST_LOG", "error")
        .args(["server", "--bootstrap", "--listen", &format!("{ip0}:2380")])
        .args(["--api-listen", &format!("{ip0}:{API_PORT}"), "--data-dir"])
        .arg(&server_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting baton server")?;
    let stdout = child.stdout.take().context("stdout")?;
    procs.0.push(child);
    baton_testkit::process::announced_addr(
        stdout,
        "Kubernetes API at https://",
        Duration::from_secs(120),
    )?;
    let token = std::fs::read_to_string(server_dir.join("node-token"))?;
    for h in 1..3 {
        let ip = net.host(h).ip;
        let child = net
            .command(h, bin)
            .env("RUST_LOG", "error")
            .args(["node", "--server", &format!("https://{ip0}:{API_PORT}")])
            .args(["--token", token.trim(), "--node-name", &format!("node-{h}")])
            .args(["--node-address", &ip.to_string(), "--local-images"])
            .arg(guests_dir())
            .arg("--data-dir")
            .arg(dir.join(format!("host-{h}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting baton node")?;
        procs.0.push(child);
    }
    Ok(procs)
}

/// http-hello pinned to node-2, behind a NodePort Service.
fn workload() -> Result<String> {
    let image = guests_dir().join("http-hello.wasm");
    ensure!(
        image.exists(),
        "{} is missing: run scripts/build-guests.sh",
        image.display()
    );
    Ok(format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: node-2}}
      containers:
      - name: hello
        image: {image}
        ports:
        - {{containerPort: 8080}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 8080}}
"#,
        image = image.display()
    ))
}

/// `clients` loops, each sending one request on a fresh connection at a time, for
/// `secs`: (connections/s, latencies of connect and request together).
async fn fresh_connections(
    addr: SocketAddr,
    clients: usize,
    secs: f64,
) -> Result<(f64, Vec<Duration>)> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    http::get_once(addr).await?;
                    lat.push(t0.elapsed());
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / start.elapsed().as_secs_f64(), all))
}

struct Cell {
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_us: f64,
}

async fn cell(
    procs: &Procs,
    addr: SocketAddr,
    fresh: bool,
    clients: usize,
    secs: f64,
) -> Result<Cell> {
    let run = |secs| async move {
        if fresh {
            fresh_connections(addr, clients, secs).await
        } else {
            http::load(addr, clients, secs).await
        }
    };
    run(0.5).await?;
    let cpu0 = procs.cpu();
    let (rate, mut lat) = run(secs).await?;
    let cpu = procs.cpu().saturating_sub(cpu0);
    Ok(Cell {
        rate,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        cpu_us: cpu.as_secs_f64() * 1e6 / lat.len().max(1) as f64,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: tunnel-bench BATON_BINARY")?,
    );
    if !Command::new("ip")
        .arg("netns")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!("network namespaces are needed: run as root, with iproute2");
    }
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let tmp = tempfile::tempdir()?;
    let net = Net::new(3)?;
    let procs = start(&bin, tmp.path(), &net)?;
    let kubeconfig = tmp.path().join("host-0/kubeconfig");
    let api = format!("https://{}:{API_PORT}", net.host(0).ip);

    wait_until("both nodes Ready", || async {
        let ready = r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}"#;
        kubectl(&kubeconfig, &api, &["get", "nodes", "-o", ready], None)
            .is_ok_and(|o| o.split_whitespace().filter(|s| *s == "True").count() == 2)
    })
    .await?;
    kubectl(&kubeconfig, &api, &["apply", "-f", "-"], Some(&workload()?))?;
    let port: u16 = {
        let mut port = None;
        wait_until("the NodePort", || {
            let found = kubectl(
                &kubeconfig,
                &api,
                &[
                    "get",
                    "svc",
                    "web",
                    "-o",
                    "jsonpath={.spec.ports[0].nodePort}",
                ],
                None,
            )
            .ok()
            .and_then(|p| p.trim().parse().ok());
            port = found;
            async move { found.is_some() }
        })
        .await?;
        port.context("no NodePort")?
    };
    let direct = SocketAddr::new(net.host(2).ip.into(), port);
    let tunnel = SocketAddr::new(net.host(1).ip.into(), port);
    for addr in [direct, tunnel] {
        wait_until("http-hello to answer through the NodePort", || async move {
            http::get_once(addr).await.is_ok()
        })
        .await?;
    }

    println!(
        "| load | clients | path | req/s | p50 ms | p99 ms | nodes' CPU us/req | tunnel / direct |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (load, fresh) in [("a connection per request", true), ("keep-alive", false)] {
        for clients in [1, 16] {
            let d = cell(&procs, direct, fresh, clients, secs).await?;
            let t = cell(&procs, tunnel, fresh, clients, secs).await?;
            for (path, c) in [("direct", &d), ("tunnel", &t)] {
                println!(
                    "| {load} | {clients} | {path} | {:.0} | {} | {} | {:.0} | {} |",
                    c.rate,
                    ms(c.p50),
                    ms(c.p99),
                    c.cpu_us,
                    if path == "tunnel" {
                        format!("{:.2}x", t.rate / d.rate)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    drop(procs);
    drop(net);
    Ok(())
}
