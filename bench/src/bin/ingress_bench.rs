//! Ingress benchmark: `http-hello` in a Deployment of `baton up`, reached through the
//! node's Ingress, beside the same pod through its NodePort (the L4 path) and beside
//! `wasmtime serve` of the same component, in one run under one load generator:
//! keep-alive HTTP/1.1 connections sending requests back to back for a fixed time.
//! Prints requests/s, p50, p99, server CPU per request and the ratio to `wasmtime serve`.
//!
//! Then scale from zero: the Deployment, under an autoscaler with `minReplicas: 0`, is
//! scaled to zero and a request sent through the Ingress, which holds it while the node
//! wakes the Deployment; the time to its response, over `BENCH_COLD_RUNS` runs (default
//! 20), beside a warm request on a fresh connection, with when each step of the wake
//! was seen, and what the function holds on the node while at zero.
//!
//! Usage: `ingress-bench BATON_BINARY WASMTIME_BINARY GUEST_DIR` (see
//! `scripts/bench.sh ingress`). `BENCH_SECS` sets the seconds per cell (default 5);
//! `BENCH_PARTS` picks `throughput`, `cold` or both (the default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use baton_bench::http::{get_once, measure};
use baton_bench::{env_or, ms, up, wait_until, Procs};
use baton_testkit::process::announced_addr;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::Api;
use serde_json::json;

/// `http-hello` as a Deployment behind a NodePort Service and an Ingress of the default
/// class; returns (Ingress address, NodePort address) once both answer.
async fn deploy(client: &kube::Client, wasm: &Path) -> Result<(SocketAddr, SocketAddr)> {
    let ns = "default";
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "hello"}},
            "template": {"metadata": {"labels": {"app": "hello"}},
                "spec": {"containers": [{"name": "hello", "image": wasm.display().to_string(),
                    "ports": [{"containerPort": 8080}],
                    "env": [{"name": "GREETING", "value": "hi"}]}]}}}
    }))?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"type": "NodePort", "selector": {"app": "hello"},
                 "ports": [{"port": 80, "targetPort": 8080}]}
    }))?;
    let ing: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "hello", "port": {"number": 80}}}}]}}]}
    }))?;
    let pp = PostParams::default();
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&pp, &deploy)
        .await?;
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .create(&pp, &svc)
        .await?;
    Api::<Ingress>::namespaced(client.clone(), ns)
        .create(&pp, &ing)
        .await?;
    let node_port = svc
        .spec
        .and_then(|s| s.ports?.first()?.node_port)
        .context("no node port assigned")?;
    let nodes: Api<Node> = Api::all(client.clone());
    let ingress_port =
        baton_testkit::wait_until_async(Duration::from_secs(60), "the node's Ingress port", || {
            let nodes = nodes.clone();
            async move {
                nodes
                    .get("local")
                    .await
                    .ok()
                    .and_then(|n| n.metadata.annotations)
                    .and_then(|a| a.get("baton.dev/ingress-http-port").cloned())
                    .and_then(|p| p.parse::<u16>().ok())
            }
        })
        .await?;
    let ingress: SocketAddr = ([127, 0, 0, 1], ingress_port).into();
    let nodeport: SocketAddr = ([127, 0, 0, 1], u16::try_from(node_port)?).into();
    for (what, addr) in [("the Ingress", ingress), ("the NodePort", nodeport)] {
        wait_until(what, || async move { get_once(addr).await.is_ok() }).await?;
    }
    Ok((ingress, nodeport))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ingress-bench BATON WASMTIME GUEST_DIR";
    let baton = PathBuf::from(args.next().context(usage)?);
    let wasmtime = PathBuf::from(args.next().context(usage)?);
    let wasm =
        std::fs::canonicalize(PathBuf::from(args.next().context(usage)?))?.join("http-hello.wasm");
    let secs: f64 = env_or("BENCH_SECS", 5.0);
    let up = up(
        &baton,
        &["--ingress-http-port", "0", "--ingress-https-port", "0"],
    )
    .await?;
    let (ingress, nodeport) = deploy(&up.client, &wasm).await?;
    // BENCH_PARTS picks parts, e.g. "cold"; both by default.
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "throughput,cold".into());
    if parts.contains("throughput") {
        throughput(&up, &wasmtime, &wasm, ingress, nodeport, secs).await?;
    }
    if parts.contains("cold") {
        from_zero(&up, ingress).await?;
    }
    Ok(())
}

/// Requests/s and latency through the Ingress and the NodePort, beside `wasmtime serve`.
async fn throughput(
    up: &baton_bench::Up,
    wasmtime: &Path,
    wasm: &Path,
    ingress: SocketAddr,
    nodeport: SocketAddr,
    secs: f64,
) -> Result<()> {
    let mut peers = Vec::new();
    for (name, options) in baton_bench::WASMTIME_PEERS {
        let mut child = baton_bench::wasmtime_serve(wasmtime, options, wasm)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wasmtime serve")?;
        let addr = announced_addr(
            child.stderr.take().context("stderr")?,
            " on http://",
            Duration::from_secs(60),
        );
        let procs = Procs(vec![child]);
        let addr = addr.context("wasmtime serve did not say where it listens")?;
        wait_until(
            "wasmtime serve",
            || async move { get_once(addr).await.is_ok() },
        )
        .await?;
        peers.push((name, procs, addr));
    }
    println!("## Ingress: http-hello, keep-alive HTTP/1.1, {secs} s per cell, same machine");
    println!("| clients | path | req/s | p50 ms | p99 ms | server CPU us/req | req/s ratio to wasmtime serve / tuned |");
    println!("|---|---|---|---|---|---|---|");
    for clients in [1usize, 16, 64] {
        let mut rows = Vec::new();
        for (name, procs, addr) in &peers {
            rows.push((*name, measure(procs, *addr, clients, secs).await?));
        }
        let i = measure(&up.procs, ingress, clients, secs).await?;
        let n = measure(&up.procs, nodeport, clients, secs).await?;
        rows.insert(0, ("baton NodePort", n));
        rows.insert(0, ("baton Ingress", i));
        let w = rows[2].1.rate;
        let tuned = rows[3].1.rate;
        for (name, r) in &rows {
            println!(
                "| {clients} | {name} | {:.0} | {} | {} | {:.0} | {:.2}x / {:.2}x |",
                r.rate,
                ms(r.p50),
                ms(r.p99),
                r.cpu_us,
                r.rate / w,
                r.rate / tuned
            );
        }
    }
    println!("goal: the Ingress at >= 0.8x the requests/s of `wasmtime serve`");
    Ok(())
}

/// The Deployment's pods, by the API.
async fn pods_of_hello(client: &kube::Client) -> Result<usize> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    Ok(pods
        .list(&ListParams::default().labels("app=hello"))
        .await?
        .items
        .len())
}

/// Cold requests from zero replicas through the Ingress, beside warm ones.
async fn from_zero(up: &baton_bench::Up, ingress: SocketAddr) -> Result<()> {
    let runs: usize = env_or("BENCH_COLD_RUNS", 20);
    let client = &up.client;
    // An autoscaler that may scale to zero (so the nodes may wake the Deployment), with a
    // window long enough that only this benchmark scales it down.
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "hello"},
            "minReplicas": 0, "maxReplicas": 1,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": "http_requests_per_second"},
                "target": {"type": "AverageValue", "averageValue": "1000"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 3600}}}
    }))?;
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &hpa)
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut idle_rss = Vec::new();
    let mut steps: Vec<Vec<Duration>> = vec![Vec::new(); Timeline::STAGES.len()];
    for _ in 0..runs {
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            get_once(ingress).await?;
            warm.push(t0.elapsed());
        }
        let running_rss = up.procs.rss_kib();
        deployments
            .patch_scale(
                "hello",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 0}})),
            )
            .await?;
        // At zero: no pod, and no endpoint in the Service's slices.
        baton_testkit::wait_until_async(Duration::from_secs(60), "the Deployment at zero", || {
            let (client, slices) = (client.clone(), slices.clone());
            async move {
                let pods = pods_of_hello(&client).await.ok()?;
                let list = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=hello"))
                    .await
                    .ok()?;
                let endpoints: usize = list.items.iter().map(|s| s.endpoints.len()).sum();
                (pods == 0 && endpoints == 0).then_some(())
            }
        })
        .await?;
        idle_rss.push((running_rss, up.procs.rss_kib()));
        let stages = Timeline::watch(client).await?;
        let t0 = std::time::Instant::now();
        get_once(ingress)
            .await
            .context("a request from zero through the Ingress")?;
        cold.push(t0.elapsed());
        for (i, at) in stages.settle().await.into_iter().enumerate() {
            steps[i].push(at.map_or(Duration::MAX, |at| at.saturating_duration_since(t0)));
        }
    }
    let (cp50, cp99) = (
        baton_bench::pct(&mut cold, 0.5),
        baton_bench::pct(&mut cold, 0.99),
    );
    let (wp50, wp99) = (
        baton_bench::pct(&mut warm, 0.5),
        baton_bench::pct(&mut warm, 0.99),
    );
    println!();
    println!("## Scale from zero: http-hello through the Ingress, {runs} runs, component cached on the node");
    println!("| request | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| cold: from zero replicas to the response | {} | {} |",
        ms(cp50),
        ms(cp99)
    );
    println!(
        "| warm: fresh connection, pod running | {} | {} |",
        ms(wp50),
        ms(wp99)
    );
    println!(
        "added at p99: {} ms (goal: at most 5 ms)",
        ms(cp99.saturating_sub(wp99))
    );
    println!();
    println!(
        "Where the cold request's time goes: when each step was seen by a watch, from the request"
    );
    println!("| step | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (name, mut at) in Timeline::STAGES.iter().zip(steps) {
        println!(
            "| {name} | {} | {} |",
            ms(baton_bench::pct(&mut at, 0.5)),
            ms(baton_bench::pct(&mut at, 0.99))
        );
    }
    let (before, after): (Vec<u64>, Vec<u64>) = idle_rss.into_iter().unzip();
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    println!(
        "idle cost: at zero the function has no pod, so the nodes hold no instance, task or memory of it \
         (the Summary API lists no pod of it); the baton process RSS, median: {} KiB running, {} KiB at zero",
        median(before),
        median(after)
    );
    Ok(())
}

/// When each step of a wake was seen, by watches opened before the request: the
/// activator's scale, the ReplicaSet's, the pod's creation, binding and readiness, and the
/// ready endpoint.
struct Timeline(Vec<tokio::task::JoinHandle<Option<std::time::Instant>>>);

impl Timeline {
    const STAGES: [&'static str; 6] = [
        "Deployment scaled to 1 (the node's wake)",
        "ReplicaSet scaled to 1 (deployment controller)",
        "pod created (replicaset controller)",
        "pod bound (scheduler)",
        "pod Ready (node)",
        "endpoint ready in the EndpointSlice (endpointslice controller)",
    ];

    async fn watch(client: &kube::Client) -> Result<Self> {
        use k8s_openapi::api::apps::v1::ReplicaSet;
        let ns = "default";
        let hello = || WatchParams::default().labels("app=hello");
        let named = || WatchParams::default().fields("metadata.name=hello");
        let ready = |p: &Pod| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        };
        let mut tasks = vec![
            first(
                Api::<Deployment>::namespaced(client.clone(), ns),
                named(),
                |d| d.spec.as_ref().and_then(|s| s.replicas) == Some(1),
            )
            .await?,
            first(
                Api::<ReplicaSet>::namespaced(client.clone(), ns),
                hello(),
                |r| r.spec.as_ref().and_then(|s| s.replicas) == Some(1),
            )
            .await?,
        ];
        let pods = || Api::<Pod>::namespaced(client.clone(), ns);
        tasks.push(first(pods(), hello(), |_| true).await?);
        tasks.push(
            first(pods(), hello(), |p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
            })
            .await?,
        );
        tasks.push(first(pods(), hello(), ready).await?);
        tasks.push(
            first(
                Api::<EndpointSlice>::namespaced(client.clone(), ns),
                WatchParams::default().labels("kubernetes.io/service-name=hello"),
                |s| {
                    s.endpoints
                        .iter()
                        .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                },
            )
            .await?,
        );
        Ok(Self(tasks))
    }

    /// Each step's time, None if it was not seen within a few seconds.
    async fn settle(self) -> Vec<Option<std::time::Instant>> {
        let mut out = Vec::new();
        for t in self.0 {
            out.push(t.await.ok().flatten());
        }
        out
    }
}

/// Opens a watch from now and returns a task that yields when an object first matched.
async fn first<K>(
    api: Api<K>,
    params: WatchParams,
    matches: impl Fn(&K) -> bool + Send + 'static,
) -> Result<tokio::task::JoinHandle<Option<std::time::Instant>>>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    use futures::StreamExt;
    use kube::api::WatchEvent;
    let list = ListParams {
        label_selector: params.label_selector.clone(),
        field_selector: params.field_selector.clone(),
        ..ListParams::default()
    };
    let rv = api
        .list_metadata(&list)
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut events = api.watch(&params, &rv).await?.boxed();
    Ok(tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let event = tokio::time::timeout_at(deadline, events.next())
                .await
                .ok()??;
            if let Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) = event {
                if matches(&o) {
                    return Some(std::time::Instant::now());
                }
            }
        }
    }))
}
