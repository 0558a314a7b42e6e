//! Debugging verbs with the real kubectl against `baton up`:
//! - **exec round trip**: `kubectl exec POD -- true`, process start to exit, beside
//!   `kubectl get pod POD` (the same kubectl start, config load and TLS handshake, and one
//!   API request) so that the share of the exec itself shows; and the same exec from a
//!   client without kubectl's process start (a TLS connection, the WebSocket upgrade, the
//!   command, its status), which is what the server side costs;
//! - **port-forward throughput**: bytes echoed by a TCP component on one connection
//!   through `kubectl port-forward`, beside one connection straight to the pod's address.
//!
//! `BENCH_OPS` (default 50) exec runs; `BENCH_MIB` (default 64) MiB echoed per path.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use baton_bench::{env_or, ms, pct, up, wait_until, Procs};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Wall time of one kubectl run.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<Duration> {
    let t0 = Instant::now();
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .context("running kubectl")?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Echoes `total` bytes through one connection to `addr`: bytes per second.
async fn echo_throughput(addr: SocketAddr, total: usize) -> Result<f64> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut r, mut w) = tcp.into_split();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 << 10];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            w.write_all(&chunk[..n]).await?;
            sent += n;
        }
        anyhow::Ok(w)
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < total {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            bail!("the echo ended after {got} of {total} bytes");
        }
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(writer.await??);
    Ok(total as f64 / secs)
}

/// What the bench's own exec client needs from the kubeconfig.
struct Target {
    addr: String,
    tls: tokio_rustls::TlsConnector,
    token: String,
}

fn target(kubeconfig: &Path) -> Result<Target> {
    use base64::Engine;
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cluster = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("a cluster")?;
    let server = cluster.server.context("a server")?;
    let addr = server.trim_start_matches("https://").to_string();
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster.certificate_authority_data.context("the CA")?)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let token = kc
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.clone())
        .and_then(|a| a.token)
        .map(|t| secrecy::ExposeSecret::expose_secret(&t).to_string())
        .context("a token")?;
    Ok(Target {
        addr,
        tls: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
        token,
    })
}

/// One `exec -- true` over WebSocket v5 on a fresh connection, to its Success status.
async fn ws_exec(t: &Target) -> Result<Duration> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(&t.addr).await?;
    tcp.set_nodelay(true)?;
    let host = t.addr.rsplit_once(':').map_or(t.addr.as_str(), |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let tls = t.tls.connect(name, tcp).await?;
    let mut req = format!(
        "wss://{}/api/v1/namespaces/default/pods/tb/exec?command=true&container=main&stdout=true&stderr=true",
        t.addr
    )
    .into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", t.token).parse()?);
    req.headers_mut()
        .insert("sec-websocket-protocol", "v5.channel.k8s.io".parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    let mut status = Vec::new();
    while let Some(m) = ws.next().await {
        match m? {
            Message::Binary(b) if b.first() == Some(&3) => status.extend_from_slice(&b[1..]),
            Message::Close(_) => break,
            _ => {}
        }
    }
    let took = t0.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&status)?;
    anyhow::ensure!(v["status"] == "Success", "exec answered {v}");
    Ok(took)
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: debug-bench BATON_BINARY")?,
    );
    let guests = std::fs::canonicalize(
        baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../examples-wasm/dist"),
    )?;
    let ops: usize = env_or("BENCH_OPS", 50);
    let mib: usize = env_or("BENCH_MIB", 64);
    let up = up(&bin, &[]).await?;
    let kubeconfig = up.data_dir().join("kubeconfig");
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tb"},
        "spec": {"containers": [
            {"name": "main", "image": guests.join("toolbox.wasm").display().to_string(), "args": ["sleep"]},
            {"name": "echo", "image": guests.join("tcp-echo.wasm").display().to_string()},
        ]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_until("the pod to run", || {
        let pods = pods.clone();
        async move {
            pods.get("tb").await.is_ok_and(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
        }
    })
    .await?;
    let ip = pods
        .get("tb")
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("the pod's IP")?;

    println!("## kubectl exec round trip ({ops} runs, kubectl 1.33, WebSocket v5)");
    // Warm both paths once: the component compiled, kubectl's caches filled.
    kubectl(&kubeconfig, &["exec", "tb", "-c", "main", "--", "true"])?;
    kubectl(&kubeconfig, &["get", "pod", "tb"])?;
    let (mut exec, mut get, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ops {
        exec.push(kubectl(
            &kubeconfig,
            &["exec", "tb", "-c", "main", "--", "true"],
        )?);
        get.push(kubectl(&kubeconfig, &["get", "pod", "tb"])?);
        bare.push(kubectl(&kubeconfig, &["version", "--client"])?);
    }
    let t = target(&kubeconfig)?;
    ws_exec(&t).await?;
    let mut raw = Vec::new();
    for _ in 0..ops {
        raw.push(ws_exec(&t).await?);
    }
    println!("| command | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| `kubectl exec tb -- true` | {} | {} |",
        ms(pct(&mut exec, 0.5)),
        ms(pct(&mut exec, 0.99))
    );
    println!(
        "| `kubectl get pod tb` (kubectl's own start and one request) | {} | {} |",
        ms(pct(&mut get, 0.5)),
        ms(pct(&mut get, 0.99))
    );
    println!(
        "| `kubectl version --client` (kubectl's process alone, no request) | {} | {} |",
        ms(pct(&mut bare, 0.5)),
        ms(pct(&mut bare, 0.99))
    );
    println!(
        "| exec `true` over WebSocket v5 without kubectl (TLS, upgrade, command, status) | {} | {} |",
        ms(pct(&mut raw, 0.5)),
        ms(pct(&mut raw, 0.99))
    );
    println!("goal: exec p50 < 50 ms");

    println!();
    println!("## port-forward throughput, one connection, {mib} MiB echoed by tcp-echo");
    let direct: SocketAddr = format!("{ip}:7000").parse()?;
    wait_until("the echo server to listen", || async move {
        tokio::net::TcpStream::connect(direct).await.is_ok()
    })
    .await?;
    let total = mib << 20;
    let straight = echo_throughput(direct, total).await?;
    let mut child = Command::new("kubectl")
        .args(["port-forward", "pod/tb", ":7000"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("kubectl port-forward")?;
    let stdout = child.stdout.take().context("stdout")?;
    let _pf = Procs(vec![child]);
    let mut lines = BufReader::new(stdout).lines();
    let port: u16 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("Forwarding from 127.0.0.1:")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .context("kubectl printed its local port")?;
    std::thread::spawn(move || for _ in lines {});
    let forwarded = echo_throughput(SocketAddr::from(([127, 0, 0, 1], port)), total).await?;
    println!("| path | MiB/s |");
    println!("|---|---|");
    println!(
        "| straight to the pod ({direct}) | {:.1} |",
        straight / (1 << 20) as f64
    );
    println!(
        "| through `kubectl port-forward` (WebSocket tunnel, SPDY) | {:.1} |",
        forwarded / (1 << 20) as f64
    );
    println!(
        "port-forward / direct: {:.2}x (goal >= 0.5x)",
        forwarded / straight
    );
    drop(up);
    Ok(())
}
