//! Cluster benchmark: pod start latency, scheduler throughput with hollow nodes, and the
//! idle memory of `baton up`.
//!
//! - **Pod start latency**: 200 `http-hello` pods created at 20 per second against
//!   `baton up` (its local node, components already compiled); the time from the create
//!   request to the pod's Ready condition arriving on a watch, p50 and p99.
//! - **Scheduler throughput**: `baton up --no-node` with 1,000 hollow nodes (tasks that
//!   register a Node, heartbeat through its Lease every 10 s and report the pods bound to
//!   them Running, without running them); 3,000 pods created by 32 clients; pods bound per
//!   second from the first create to the last binding.
//! - **Idle memory**: resident memory of `baton up` with its local node and no pods, 10 s
//!   after it is ready.
//! - **Images**: a component pushed to Debian's docker-registry; pull time cold and cached;
//!   pod start on a fresh node, cold (pull, compile, start) and cached; 100 pods of one
//!   new image, and how many registry transfers they caused.
//!
//! - **Isolation**: a neighbour `http-hello` pod under a closed-loop client (one
//!   keep-alive connection, requests back to back), alone and then beside pods that spin
//!   at their CPU limit (`hostile loop`, 4 × 250m, half the node), in the same run; and
//!   the API server's latency (a GET every 20 ms) throughout. Prints p50/p99 of both and
//!   the neighbour's p99 ratio. Goal: within 2x of alone, API p99 under 50 ms.
//!
//! Usage: `cluster-bench BATON_BINARY GUEST_DIR` (see `scripts/bench.sh cluster`).
//! `BENCH_PARTS` picks parts (`idle,start,sched,pull,isolation`); `BENCH_NODES` and
//! `BENCH_PODS` size the scheduler run, and `BENCH_CLIENTS` (32) is how many pods it
//! creates at once; `BENCH_SECS` the isolation cells.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use baton_bench::{env_or, ms, pct, rss_kib, up, wait_until, Procs};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_node_ready(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    wait_until("the local node to be Ready", || {
        let nodes = nodes.clone();
        async move {
            nodes.list(&Default::default()).await.is_ok_and(|l| {
                l.items.iter().any(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
            })
        }
    })
    .await
}

fn hello_pod(name: &str, image: &str, label: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": label}},
        "spec": {"containers": [{"name": "hello", "image": image, "ports": [{"containerPort": 8080}]}]}
    }))
    .expect("a valid pod")
}

async fn idle(bin: &Path) -> Result<()> {
    let up = up(bin, &[]).await?;
    wait_node_ready(&up.client).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = rss_kib(up.procs.0[0].id());
    println!("## Idle memory of `baton up` (store, API server, scheduler, controllers, a node)");
    println!("| state | resident MiB |");
    println!("|---|---|");
    println!(
        "| idle, 10 s after ready, no pods | {:.1} |",
        rss as f64 / 1024.0
    );
    println!("goal: <= 100 MiB (a k3s server is about 500 MB idle)");
    Ok(())
}

async fn start_latency(bin: &Path, guests: &Path) -> Result<()> {
    let up = up(bin, &[]).await?;
    wait_node_ready(&up.client).await?;
    let image = guests.join("http-hello.wasm").display().to_string();
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let readies: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let (pods, readies) = (pods.clone(), readies.clone());
        tokio::spawn(async move {
            let mut events = watcher(pods, watcher::Config::default().labels("bench")).boxed();
            while let Some(ev) = events.next().await {
                if let Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) = ev {
                    if ready(&p) {
                        readies
                            .lock()
                            .unwrap()
                            .entry(p.name_any())
                            .or_insert_with(Instant::now);
                    }
                }
            }
        })
    };
    // One pod first, so the component is compiled and cached before the timed ones.
    pods.create(&PostParams::default(), &hello_pod("warm", &image, "warm"))
        .await?;
    wait_until("the warm-up pod", || {
        let readies = readies.clone();
        async move { readies.lock().unwrap().contains_key("warm") }
    })
    .await?;
    let n = 200;
    let mut created = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for i in 0..n {
        tick.tick().await;
        let name = format!("start-{i}");
        let t0 = Instant::now();
        pods.create(&PostParams::default(), &hello_pod(&name, &image, "start"))
            .await?;
        created.insert(name, t0);
    }
    wait_until("200 ready pods", || {
        let readies = readies.clone();
        async move {
            readies
                .lock()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with("start-"))
                .count()
                == n
        }
    })
    .await?;
    watch.abort();
    let readies = readies.lock().unwrap();
    let mut lat: Vec<Duration> = created
        .iter()
        .map(|(name, t0)| readies[name].saturating_duration_since(*t0))
        .collect();
    println!();
    println!("## Pod start latency: create to Ready, {n} pods at 20/s, component cached");
    println!("| p50 ms | p99 ms | max ms |");
    println!("|---|---|---|");
    let max = lat.iter().max().copied().unwrap_or_default();
    println!(
        "| {} | {} | {} |",
        ms(pct(&mut lat, 0.5)),
        ms(pct(&mut lat, 0.99)),
        ms(max)
    );
    println!("goal: p99 <= 50 ms (Kubernetes SLO: 5 s; Wasm shims on Kubernetes: about 1.1 s)");
    Ok(())
}

/// 1,000 nodes' worth of kubelets without the pods: registration, heartbeats, and pods
/// reported Running once bound.
async fn hollow_nodes(client: Client, count: usize) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut tasks = Vec::new();
    let names: Vec<String> = (0..count).map(|i| format!("hollow-{i}")).collect();
    futures::stream::iter(names.clone())
        .map(|name| {
            let nodes = nodes.clone();
            async move {
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "type": "hollow"}},
                }))?;
                nodes.create(&PostParams::default(), &node).await?;
                let status = json!({"status": {
                    "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
                    "allocatable": {"cpu": "4", "memory": "16Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                    "lastHeartbeatTime": baton_kube::pod::now(), "lastTransitionTime": baton_kube::pod::now()}],
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                }});
                nodes.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    // Heartbeats: every node's Lease renewed every 10 s, spread over the period.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10_000 / count.max(1) as u64).max(Duration::from_millis(1)));
        let mut i = 0usize;
        loop {
            tick.tick().await;
            let name = &names[i % names.len()];
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(baton_kube::pod::now().0)}});
            let _ = leases
                .patch(name, &PatchParams::apply("hollow").force(), &Patch::Apply(&lease))
                .await;
            i += 1;
        }
    }));
    // Bound pods reported Running and Ready, as their kubelets would.
    let pods: Api<Pod> = Api::all(client.clone());
    tasks.push(tokio::spawn(async move {
        let mut events = watcher(pods, watcher::Config::default().labels("bench=sched")).boxed();
        let mut reported = std::collections::HashSet::new();
        while let Some(ev) = events.next().await {
            let Ok(Event::Apply(p)) = ev else { continue };
            let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            if !bound || !reported.insert(p.name_any()) {
                continue;
            }
            let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
            let status = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}]}});
            tokio::spawn(async move {
                let _ = api
                    .patch_status(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await;
            });
        }
    }));
    Ok(tasks)
}

async fn scheduler(bin: &Path) -> Result<()> {
    let up = up(bin, &["--no-node"]).await?;
    let node_count: usize = env_or("BENCH_NODES", 1000);
    let pod_count: usize = env_or("BENCH_PODS", 3000);
    let clients: usize = env_or("BENCH_CLIENTS", 32);
    let hollow = hollow_nodes(up.client.clone(), node_count).await?;
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let bound: Arc<Mutex<(usize, Option<Instant>)>> = Arc::default();
    let watch = {
        let (pods, bound) = (pods.clone(), bound.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut events =
                watcher(pods, watcher::Config::default().labels("bench=sched")).boxed();
            while let Some(ev) = events.next().await {
                if let Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) = ev {
                    if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
                        && seen.insert(p.name_any())
                    {
                        let mut b = bound.lock().unwrap();
                        b.0 += 1;
                        b.1 = Some(Instant::now());
                    }
                }
            }
        })
    };
    let start = Instant::now();
    futures::stream::iter(0..pod_count)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("sched-{i}"), "labels": {"bench": "sched"}},
                    "spec": {"containers": [{"name": "c", "image": "/hollow.wasm",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(clients)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let created = start.elapsed();
    wait_until("every pod bound", || {
        let bound = bound.clone();
        async move { bound.lock().unwrap().0 >= pod_count }
    })
    .await?;
    let last = bound.lock().unwrap().1.context("no binding seen")?;
    let took = last.saturating_duration_since(start);
    watch.abort();
    for t in hollow {
        t.abort();
    }
    println!();
    println!("## Scheduler throughput: {pod_count} pods onto {node_count} hollow nodes");
    println!("| pods created in s | all bound after s | pods bound per s |");
    println!("|---|---|---|");
    println!(
        "| {:.2} | {:.2} | {:.0} |",
        created.as_secs_f64(),
        took.as_secs_f64(),
        pod_count as f64 / took.as_secs_f64()
    );
    println!("goal: >= 1,000 pods/s (kube-scheduler's CI bar: 680–810 pods/s at 5,000 nodes)");
    drop(up);
    Ok(())
}

/// Debian's docker-registry on a loopback port of its choosing, storing in `dir`.
fn start_registry(dir: &Path) -> Result<(Procs, String)> {
    let cfg = dir.join("registry.yml");
    // Port 0: the registry binds one and logs it ("listening on ADDR", at info).
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: \"127.0.0.1:0\"}}\n",
            dir.join("registry").display()
        ),
    )?;
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting docker-registry")?;
    let log = child.stderr.take().context("the registry's log")?;
    let procs = Procs(vec![child]);
    let addr =
        baton_testkit::process::announced_addr(log, "listening on ", Duration::from_secs(30))
            .context("docker-registry did not start")?;
    Ok((procs, addr.to_string()))
}

/// Waits for a pod to be Ready; returns how long since `t0`.
async fn ready_after(pods: &Api<Pod>, name: &str, t0: Instant) -> Result<Duration> {
    wait_until("a pod to be Ready", || {
        let pods = pods.clone();
        let name = name.to_string();
        async move { pods.get(&name).await.is_ok_and(|p| ready(&p)) }
    })
    .await?;
    Ok(t0.elapsed())
}

async fn pulls(bin: &Path, guests: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_registry, addr) = start_registry(dir.path())?;
    let mut cfg = baton_oci::OciConfig::new(dir.path().join("push-cache"));
    cfg.insecure_registries = vec![addr.clone()];
    let pusher = baton_oci::Registry::new(cfg)?;
    let image = format!("{addr}/bench/http-hello:1");
    let wasm = std::fs::read(guests.join("http-hello.wasm"))?;
    pusher
        .push(
            &wasm,
            "http-hello.wasm",
            &image,
            &baton_oci::Auth::Anonymous,
            None,
        )
        .await?;
    // Pull alone: cold, then from the cache.
    let mut cfg = baton_oci::OciConfig::new(dir.path().join("pull-cache"));
    cfg.insecure_registries = vec![addr.clone()];
    let puller = baton_oci::Registry::new(cfg)?;
    let t0 = Instant::now();
    puller
        .pull(
            &image,
            &baton_oci::Auth::Anonymous,
            baton_oci::PullPolicy::IfNotPresent,
            None,
        )
        .await?;
    let cold_pull = t0.elapsed();
    let t0 = Instant::now();
    puller
        .pull(
            &image,
            &baton_oci::Auth::Anonymous,
            baton_oci::PullPolicy::IfNotPresent,
            None,
        )
        .await?;
    let cached_pull = t0.elapsed();
    // A pod on a fresh node: pull, compile and start; then a second pod of the image.
    let up = up(bin, &["--insecure-registry", &addr]).await?;
    wait_node_ready(&up.client).await?;
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let t0 = Instant::now();
    pods.create(&PostParams::default(), &hello_pod("cold", &image, "pull"))
        .await?;
    let cold_start = ready_after(&pods, "cold", t0).await?;
    let t0 = Instant::now();
    pods.create(&PostParams::default(), &hello_pod("cached", &image, "pull"))
        .await?;
    let cached_start = ready_after(&pods, "cached", t0).await?;
    // 100 pods of an image not yet on the node: one transfer.
    let hundred = format!("{addr}/bench/frontend:1");
    pusher
        .push(
            &std::fs::read(guests.join("http-frontend.wasm"))?,
            "http-frontend.wasm",
            &hundred,
            &baton_oci::Auth::Anonymous,
            None,
        )
        .await?;
    let t0 = Instant::now();
    futures::stream::iter(0..100)
        .map(|i| {
            let pods = pods.clone();
            let pod = hello_pod(&format!("many-{i}"), &hundred, "many");
            async move { pods.create(&PostParams::default(), &pod).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    wait_until("100 ready pods", || {
        let pods = pods.clone();
        async move {
            pods.list(&kube::api::ListParams::default().labels("bench=many"))
                .await
                .is_ok_and(|l| l.items.iter().filter(|p| ready(p)).count() == 100)
        }
    })
    .await?;
    let hundred_took = t0.elapsed();
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(up.client.clone(), "default");
    let transfers = events
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Pulled"))
        .filter(|e| {
            e.involved_object
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("many-"))
        })
        .count();
    println!();
    println!("## Images: pull and start, cold and cached (docker-registry on loopback)");
    println!("| measure | cold ms | cached ms |");
    println!("|---|---|---|");
    println!(
        "| pull http-hello ({} KiB) | {} | {} |",
        wasm.len() / 1024,
        ms(cold_pull),
        ms(cached_pull)
    );
    println!(
        "| pod create to Ready on a fresh node (pull, compile, start) | {} | {} |",
        ms(cold_start),
        ms(cached_start)
    );
    println!(
        "| 100 pods of one new image: all Ready after | {} | |",
        ms(hundred_took)
    );
    println!("| 100 pods of one new image: registry transfers | {transfers} | |");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let usage = "usage: cluster-bench BATON_BINARY GUEST_DIR";
    let bin = args.next().context(usage)?;
    let guests = std::fs::canonicalize(args.next().context(usage)?)?;
    let parts =
        std::env::var("BENCH_PARTS").unwrap_or_else(|_| "idle,start,sched,pull,isolation".into());
    if parts.contains("idle") {
        idle(&bin).await?;
    }
    if parts.contains("start") {
        start_latency(&bin, &guests).await?;
    }
    if parts.contains("sched") {
        scheduler(&bin).await?;
    }
    if parts.contains("pull") {
        pulls(&bin, &guests).await?;
    }
    if parts.contains("isolation") {
        isolation(&bin, &guests).await?;
    }
    Ok(())
}

/// A pod from JSON, created and waited for until Running; its IP.
async fn run_pod(pods: &Api<Pod>, pod: serde_json::Value) -> Result<String> {
    let pod: Pod = serde_json::from_value(pod)?;
    let name = pod.name_any();
    pods.create(&PostParams::default(), &pod).await?;
    wait_until("a pod to be Running", || {
        let (pods, name) = (pods.clone(), name.clone());
        async move {
            pods.get(&name).await.is_ok_and(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
        }
    })
    .await?;
    let p = pods.get(&name).await?;
    p.status
        .and_then(|s| s.pod_ip)
        .context("a running pod has an IP")
}

/// The neighbour's latencies under a closed-loop client for `secs`, and the API server's
/// (a GET of a Namespace every 20 ms) meanwhile.
async fn neighbour_and_api(
    client: &Client,
    addr: std::net::SocketAddr,
    secs: f64,
) -> Result<(f64, Vec<Duration>, Vec<Duration>)> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let api = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
            let mut lat = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                if ns.get("default").await.is_ok() {
                    lat.push(t.elapsed());
                }
            }
            lat
        })
    };
    let (rps, lat) = baton_bench::http::load(addr, 1, secs).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok((rps, lat, api.await?))
}

async fn isolation(bin: &Path, guests: &Path) -> Result<()> {
    let secs: f64 = env_or("BENCH_SECS", 10.0);
    let up = up(bin, &[]).await?;
    wait_node_ready(&up.client).await?;
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let hello = guests.join("http-hello.wasm").display().to_string();
    let hostile = guests.join("hostile.wasm").display().to_string();
    let ip = run_pod(
        &pods,
        json!({"metadata": {"name": "neighbour"}, "spec": {"containers": [{
            "name": "web", "image": hello, "ports": [{"containerPort": 8080}]}]}}),
    )
    .await?;
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse()?;
    // Warm up: the component compiled, the connection paths hot.
    baton_bench::http::load(addr, 1, 1.0).await?;
    let (alone_rps, mut alone, mut alone_api) = neighbour_and_api(&up.client, addr, secs).await?;
    let spinners = 4;
    for i in 0..spinners {
        run_pod(
            &pods,
            json!({"metadata": {"name": format!("spin-{i}")}, "spec": {"containers": [{
                "name": "spin", "image": hostile, "args": ["loop"],
                "resources": {"limits": {"cpu": "250m"}}}]}}),
        )
        .await?;
    }
    let cpu0 = up.procs.cpu();
    let t0 = Instant::now();
    let (busy_rps, mut busy, mut busy_api) = neighbour_and_api(&up.client, addr, secs).await?;
    let cores = (up.procs.cpu() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    println!();
    println!(
        "Isolation: a neighbour `http-hello` (1 closed-loop client, {secs} s per cell) beside {spinners} pods spinning at their 250m CPU limit"
    );
    println!("| case | neighbour req/s | neighbour p50 ms | neighbour p99 ms | API p50 ms | API p99 ms |");
    println!("|---|---|---|---|---|---|");
    for (case, rps, lat, api) in [
        ("alone", alone_rps, &mut alone, &mut alone_api),
        ("beside spinners", busy_rps, &mut busy, &mut busy_api),
    ] {
        println!(
            "| {case} | {rps:.0} | {} | {} | {} | {} |",
            ms(pct(lat, 0.5)),
            ms(pct(lat, 0.99)),
            ms(pct(api, 0.5)),
            ms(pct(api, 0.99)),
        );
    }
    let ratio = pct(&mut busy, 0.99).as_secs_f64() / pct(&mut alone, 0.99).as_secs_f64();
    println!(
        "neighbour p99 beside spinners / alone: {ratio:.2}x (goal <= 2x); baton up used {cores:.2} cores with the spinners (limit 1.00 for them)"
    );
    println!("goal: API p99 < 50 ms throughout");
    Ok(())
}
