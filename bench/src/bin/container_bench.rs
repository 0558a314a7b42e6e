//! OCI containers beside Wasm components, against `baton up` with the real runc and a
//! real registry (Debian's docker-registry, holding busybox-static packed as an image):
//! - **pod start**, create to Ready, image cached: a pod of one component, a pod of one
//!   container, and a pod of both (whose component makes its sockets in the pod's
//!   network namespace, linked to the node's bridge);
//! - **a component's requests**: HTTP requests to a component of a components-only pod
//!   (the fast path, at its loopback address), beside requests to a component of a pod
//!   with a network namespace, from the node over the bridge and from inside the pod.
//!
//! `BENCH_PODS` (default 20) pods of each kind, one after another; `BENCH_REQS` (default
//! 2000) requests per path.

#[path = "../../../oci/tests/support/images.rs"]
mod images;
#[path = "../../../oci/tests/support/registry.rs"]
mod registry;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use baton_bench::{env_or, ms, pct, up, wait_until};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use serde_json::json;

async fn ready(pods: &Api<Pod>, name: &str) -> bool {
    pods.get(name).await.is_ok_and(|p| {
        p.status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Creates a pod and waits for it to be Ready; returns how long that took.
async fn start(pods: &Api<Pod>, pod: serde_json::Value) -> Result<Duration> {
    let pod: Pod = serde_json::from_value(pod)?;
    let name = pod.metadata.name.clone().context("a name")?;
    let t0 = Instant::now();
    pods.create(&PostParams::default(), &pod).await?;
    // Polled every millisecond: the figure is the pod's, not the poll's.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready(pods, &name).await {
        anyhow::ensure!(Instant::now() < deadline, "{name} was not Ready in 120 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(t0.elapsed())
}

async fn delete_all(pods: &Api<Pod>) -> Result<()> {
    pods.delete_collection(
        &DeleteParams::default().grace_period(0),
        &Default::default(),
    )
    .await?;
    wait_until("the pods to go", || {
        let pods = pods.clone();
        async move {
            pods.list(&Default::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
        }
    })
    .await
}

/// One keep-alive HTTP/1.1 GET on `tcp`; the response is read whole.
async fn get(tcp: &mut tokio::net::TcpStream) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = tcp.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(head) = text.find("\r\n\r\n") {
            let len: usize = text[..head]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if got.len() >= head + 4 + len {
                return Ok(());
            }
        }
    }
}

/// Request latencies over one connection made by `connect`.
async fn latencies(mut tcp: tokio::net::TcpStream, n: usize) -> Result<Vec<Duration>> {
    tcp.set_nodelay(true)?;
    get(&mut tcp).await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        get(&mut tcp).await?;
        out.push(t0.elapsed());
    }
    Ok(out)
}

/// Opens a connection from inside the network namespace at `ns`.
fn connect_in(ns: PathBuf, addr: std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
    let s = std::thread::spawn(move || -> Result<std::net::TcpStream> {
        let f = std::fs::File::open(&ns)?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))??;
    Ok(tokio::net::TcpStream::from_std(s)?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: container-bench BATON_BINARY")?,
    );
    let guests = std::fs::canonicalize(
        baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../examples-wasm/dist"),
    )?;
    let n: usize = env_or("BENCH_PODS", 20);
    let reqs: usize = env_or("BENCH_REQS", 2000);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reg = registry::Registry::start(registry::Options::default());
    let layers = [(images::busybox_layer(), images::GZIP)];
    images::push(
        &reg.addr,
        "baton/busybox:1",
        &layers,
        images::config(images::node_arch(), &layers),
    )
    .await;
    let busybox = format!("{}/baton/busybox:1", reg.addr);
    let web = guests.join("http-hello.wasm").display().to_string();
    let up = up(&bin, &["--insecure-registry", &reg.addr]).await?;
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let container =
        |name: &str| json!({"name": name, "image": busybox, "command": ["sleep", "100000"]});
    let component =
        |name: &str| json!({"name": name, "image": web, "ports": [{"containerPort": 8080}]});
    let pod = |name: String, containers: Vec<serde_json::Value>| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": containers},
        })
    };
    // The image is pulled and unpacked once, before anything is timed.
    start(
        &pods,
        pod("warm".into(), vec![container("c"), component("w")]),
    )
    .await?;
    delete_all(&pods).await?;

    println!("## Pod start, create to Ready, image cached ({n} pods each, one at a time)");
    println!("| pod | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (kind, containers) in [
        ("one component", vec![component("w")]),
        ("one OCI container (runc)", vec![container("c")]),
        (
            "a component and a container",
            vec![component("w"), container("c")],
        ),
    ] {
        let mut took = Vec::new();
        for i in 0..n {
            took.push(start(&pods, pod(format!("p{i}"), containers.clone())).await?);
        }
        println!(
            "| {kind} | {} | {} |",
            ms(pct(&mut took, 0.5)),
            ms(pct(&mut took, 0.99))
        );
        delete_all(&pods).await?;
    }
    println!("reference: Kubernetes' pod startup SLO is 5 s at p99; containerd takes about 1 s");

    println!();
    println!("## A component's requests: in a pod of components, and in a pod with a network namespace ({reqs} requests each, one connection)");
    start(&pods, pod("wasm".into(), vec![component("w")])).await?;
    start(
        &pods,
        pod("mixed".into(), vec![component("w"), container("c")]),
    )
    .await?;
    let at = |name: &str| {
        let pods = pods.clone();
        let name = name.to_string();
        async move {
            let p = pods.get(&name).await?;
            let ip = p.status.and_then(|s| s.pod_ip).context("the pod's IP")?;
            let uid = p.metadata.uid.context("the pod's UID")?;
            anyhow::Ok((format!("{ip}:8080").parse::<std::net::SocketAddr>()?, uid))
        }
    };
    let (wasm_addr, _) = at("wasm").await?;
    let (mixed_addr, uid) = at("mixed").await?;
    let mut fast = latencies(tokio::net::TcpStream::connect(wasm_addr).await?, reqs).await?;
    let mut bridged = latencies(tokio::net::TcpStream::connect(mixed_addr).await?, reqs).await?;
    let ns = PathBuf::from(format!("/run/netns/baton-{uid}"));
    let inside: std::net::SocketAddr = "127.0.0.1:8080".parse()?;
    let mut local = latencies(connect_in(ns, inside)?, reqs).await?;
    println!("| path | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (path, took) in [
        (
            format!("node to a pod of components, at its loopback address ({wasm_addr})"),
            &mut fast,
        ),
        (
            format!("node to a pod with a namespace, over the bridge ({mixed_addr})"),
            &mut bridged,
        ),
        (
            "inside that pod's namespace, to `localhost:8080` (a sibling container's path)"
                .to_string(),
            &mut local,
        ),
    ] {
        println!(
            "| {path} | {} | {} |",
            ms(pct(took, 0.5)),
            ms(pct(took, 0.99))
        );
    }
    delete_all(&pods).await?;
    Ok(())
}
