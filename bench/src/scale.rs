//! The scale run, in the style of Kubernetes' density and load tests: hollow nodes
//! (`baton hollow-nodes`, the real node agent with scripted sandboxes) join a `baton up`
//! without a node of its own; Deployments of varied sizes are created at a steady rate
//! until the pods are all Running; then some are scaled, rolled and deleted while the
//! rest run. Measured, as the Kubernetes SLOs define them:
//! - API call latency per verb and resource, from the API server's own
//!   `apiserver_request_duration_seconds` (SLO: p99 ≤ 1 s for single objects, ≤ 30 s for
//!   lists), from the moment every node is Ready: the join is the cluster's setup, and
//!   its calls are printed apart (as the density tests measure a cluster already up);
//! - pod startup latency, from a pod's creation seen by a watch to it Running and Ready
//!   (SLO: p99 ≤ 5 s);
//! - scheduler throughput, pods bound per second;
//! - the control plane's peak RSS and CPU, the store's size, and bytes per object.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::{ms, pct, Procs};

/// What a run does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: usize,
    pub pods: usize,
    /// Pods created per second (through their Deployments).
    pub rate: f64,
    /// How long a hollow container takes to start.
    pub start_delay: Duration,
    /// Scale, roll and delete a tenth of the Deployments each, after the ramp.
    pub churn: bool,
    /// The longest the pods may take to all run before the run fails.
    pub deadline: Duration,
}

/// One row of API call latency.
#[derive(Clone, Debug)]
pub struct ApiRow {
    pub verb: String,
    pub resource: String,
    pub scope: String,
    pub count: u64,
    /// How many of them were refused with 429 (priority and fairness shed them).
    pub refused: u64,
    pub p50: f64,
    pub p99: f64,
}

impl ApiRow {
    /// The SLO this call is held to, in seconds: lists 30 s, single objects 1 s.
    pub fn slo(&self) -> f64 {
        if self.verb == "LIST" {
            30.0
        } else {
            1.0
        }
    }
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Report {
    pub plan: Plan,
    /// From the hollow nodes' start until all were Ready.
    pub nodes_ready: Duration,
    /// From the first Deployment until every pod ran.
    pub pods_running: Duration,
    pub startup: Vec<Duration>,
    /// The parts of each start: from its creation to its binding, and from its binding
    /// to Running, as the watch saw them.
    pub scheduling: Vec<Duration>,
    pub on_node: Vec<Duration>,
    pub scheduled_per_s: f64,
    pub churn: Option<Duration>,
    /// The API calls from the nodes' Ready onwards: the workload, judged by the SLOs.
    pub api: Vec<ApiRow>,
    /// The API calls until every node was Ready: the cluster's setup, before the
    /// workload, as Kubernetes' density tests set their cluster up before they measure.
    pub join: Vec<ApiRow>,
    /// The workload's waits for a seat, per priority level and flow schema (as `verb`
    /// and `resource`), served or refused (as `scope`).
    pub waits: Vec<ApiRow>,
    pub rss_peak_kib: u64,
    pub cpu: Duration,
    /// What the hollow nodes' processes spent, from their start: on this machine they
    /// share the cores with the control plane, so their cost is its loss.
    pub hollow_cpu: Duration,
    /// What this process spent: creating the Deployments and watching every pod, as the
    /// density test's own client does, on the same two cores.
    pub bench_cpu: Duration,
    pub wall: Duration,
    pub store_bytes: u64,
    pub objects: u64,
}

impl Report {
    pub fn startup_pct(&self, p: f64) -> Duration {
        pct(&mut self.startup.clone(), p)
    }

    /// Prints the run's figures as Markdown.
    pub fn print(&self) {
        let p = &self.plan;
        println!();
        println!("## {} hollow nodes, {} pods", p.nodes, p.pods);
        println!(
            "nodes Ready with their Leases after {:.1} s; pods Running {:.1} s after the first Deployment ({:.0} pods/s asked)",
            self.nodes_ready.as_secs_f64(),
            self.pods_running.as_secs_f64(),
            p.rate
        );
        if let Some(c) = self.churn {
            println!(
                "churn (a tenth scaled, rolled, deleted) settled in {:.1} s",
                c.as_secs_f64()
            );
        }
        println!();
        println!("| pod startup p50 ms | p99 ms | scheduler pods/s | control plane peak RSS MiB | CPU s (of {:.0} s) | store MiB | objects | RSS bytes/object |", self.wall.as_secs_f64());
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.0} |",
            ms(self.startup_pct(0.5)),
            ms(self.startup_pct(0.99)),
            self.scheduled_per_s,
            self.rss_peak_kib as f64 / 1024.0,
            self.cpu.as_secs_f64(),
            self.store_bytes as f64 / (1 << 20) as f64,
            self.objects,
            self.rss_peak_kib as f64 * 1024.0 / self.objects.max(1) as f64,
        );
        println!(
            "the hollow nodes' processes: {:.0} CPU-seconds; this benchmark's own client: {:.0}",
            self.hollow_cpu.as_secs_f64(),
            self.bench_cpu.as_secs_f64()
        );
        println!(
            "pod startup, created to bound: p50 {} ms, p99 {} ms; bound to Running: p50 {} ms, p99 {} ms",
            ms(pct(&mut self.scheduling.clone(), 0.5)),
            ms(pct(&mut self.scheduling.clone(), 0.99)),
            ms(pct(&mut self.on_node.clone(), 0.5)),
            ms(pct(&mut self.on_node.clone(), 0.99)),
        );
        println!();
        println!("API calls from the nodes' join on (the workload):");
        print_api(&self.api, true);
        println!();
        println!(
            "API calls while the {} nodes joined ({:.1} s; setup, not judged):",
            p.nodes,
            self.nodes_ready.as_secs_f64()
        );
        print_api(&self.join, false);
        println!();
        println!("Waits for a seat in the workload (priority and fairness):");
        println!("| priority level | flow schema | then | count | p50 ms | p99 ms |");
        println!("|---|---|---|---|---|---|");
        for r in &self.waits {
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} |",
                r.verb,
                r.resource,
                r.scope,
                r.count,
                r.p50 * 1000.0,
                r.p99 * 1000.0
            );
        }
    }

    /// The SLOs that were missed, in words; empty when all were met.
    pub fn missed(&self) -> Vec<String> {
        let mut out = Vec::new();
        let p99 = self.startup_pct(0.99);
        if p99 > Duration::from_secs(5) {
            out.push(format!("pod startup p99 {} ms > 5 s", ms(p99)));
        }
        for r in &self.api {
            if r.p99 > r.slo() {
                out.push(format!(
                    "{} {} ({}) p99 {:.0} ms > {} s",
                    r.verb,
                    r.resource,
                    r.scope,
                    r.p99 * 1000.0,
                    r.slo()
                ));
            }
        }
        out
    }
}

fn print_api(rows: &[ApiRow], judged: bool) {
    println!("| API call | scope | count | of them 429 | p50 ms | p99 ms | SLO |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let verdict = match (judged, r.p99 <= r.slo()) {
            (false, _) => "",
            (true, true) => "met",
            (true, false) => "MISSED",
        };
        println!(
            "| {} {} | {} | {} | {} | {:.1} | {:.1} | {verdict} |",
            r.verb,
            r.resource,
            r.scope,
            r.count,
            r.refused,
            r.p50 * 1000.0,
            r.p99 * 1000.0,
        );
    }
}

/// When each pod was first seen, bound and running.
#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    running: HashMap<String, Instant>,
    bound: HashMap<String, Instant>,
    /// The pods that exist now, and whether each is Running, Ready and not terminating:
    /// the churn is judged from this, so that the run does not list 150,000 pods ten
    /// times a second and slow what it measures.
    now: HashMap<String, bool>,
    /// The pods of a relist in progress, which replace `now` when it is done.
    relist: Option<HashMap<String, bool>>,
}

const LABEL: &str = "baton-scale";

/// Hollow nodes per process: 30 pods each, with a log file per container and a few
/// pooled connections per node, stay under a 20,000 open-files limit.
const NODES_PER_PROCESS: usize = 300;

/// The Deployments' sizes, as the load test mixes them: half the pods in small ones (5),
/// a quarter in medium (30), a quarter in big (250); smaller runs scale the sizes down.
fn sizes(pods: usize) -> Vec<usize> {
    let scale = |n: usize| n.min(pods.div_ceil(8)).max(1);
    let mut out = Vec::new();
    let mut left = pods;
    for (share, size) in [(4, scale(250)), (4, scale(30)), (2, scale(5))] {
        let mut part = (pods / share).min(left);
        if share == 2 {
            part = left;
        }
        while part > 0 {
            let n = size.min(part);
            out.push(n);
            part -= n;
            left -= n;
        }
    }
    out
}

/// Runs the plan against `bin` (a `baton` binary).
pub async fn run(bin: &Path, plan: Plan) -> Result<Report> {
    let started = Instant::now();
    let bench_cpu0 = crate::proc_cpu(std::process::id());
    // Pod ranges for every node, as an operator of this many nodes would configure:
    // the default /20 blocks run out at 2,048 nodes.
    let mask = (20u32..=28)
        .find(|m| 1usize << (m - 9) >= plan.nodes)
        .unwrap_or(28)
        .to_string();
    // Seats for requests, raised with the nodes as operators of large clusters raise
    // kube-apiserver's in-flight limits: a node's requests mostly wait on a commit, using
    // no CPU, and 400 seats for 5,000 nodes acting as themselves (not exempt) shed 1.5
    // million requests with 429 in ten minutes.
    let seats = (plan.nodes * 3 / 5).max(600).to_string();
    let up = crate::up(
        bin,
        &[
            "--no-node",
            "--node-cidr-mask-size",
            &mask,
            "--max-requests-inflight",
            &seats,
        ],
    )
    .await?;
    let client = up.client.clone();
    let cp_pid = up.procs.0[0].id();
    let rss_peak = Arc::new(Mutex::new(0u64));
    let sampler = {
        let rss_peak = rss_peak.clone();
        tokio::spawn(async move {
            loop {
                let now = crate::rss_kib(cp_pid);
                {
                    let mut peak = rss_peak.lock().unwrap();
                    *peak = (*peak).max(now);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let cpu0 = up.procs.cpu();
    // The hollow nodes run in processes of their own, so that the control plane's
    // figures are its own; a few hundred per process, since each holds a log file per
    // container and a connection per node, under the open-files limit a process gets.
    // Their pod directories (a log file and a token volume per pod) go to memory where
    // there is a tmpfs, as a real node's would be on its own disk: on one shared disk the
    // journal's work for 150,000 pods is the hollow nodes' largest cost.
    let shm = std::path::Path::new("/dev/shm");
    let hollow_dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("baton-hollow")
            .tempdir_in(shm)?
    } else {
        tempfile::Builder::new().prefix("baton-hollow").tempdir()?
    };
    let hollow = Procs(
        (0..plan.nodes.div_ceil(NODES_PER_PROCESS))
            .map(|k| {
                let count = NODES_PER_PROCESS.min(plan.nodes - k * NODES_PER_PROCESS);
                std::process::Command::new(bin)
                    .args(["hollow-nodes", "--count", &count.to_string()])
                    .args(["--prefix", &format!("hollow-{k}-"), "--kubeconfig"])
                    .arg(up.data_dir().join("kubeconfig"))
                    .arg("--data-dir")
                    .arg(hollow_dir.path().join(k.to_string()))
                    .args([
                        "--start-delay-ms",
                        &plan.start_delay.as_millis().to_string(),
                    ])
                    .env("RUST_LOG", "error")
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .context("starting the hollow nodes")
            })
            .collect::<Result<Vec<_>>>()?,
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let t0 = Instant::now();
    let ready = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    // Joined: Ready, and holding its Lease (a node takes it after it registers), so that
    // the join's burst of Lease creations is not judged as the workload's.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    crate::wait_within(
        plan.deadline,
        "every hollow node Ready with its Lease",
        || async {
            let ready = nodes
                .list(&ListParams::default().labels("baton.dev/hollow=true"))
                .await
                .map(|l| l.items.iter().filter(|n| ready(n)).count() >= plan.nodes)
                .unwrap_or(false);
            ready
                && leases
                    .list_metadata(&ListParams::default())
                    .await
                    .map(|l| {
                        let held = l.items.iter().filter(|m| {
                            m.metadata
                                .name
                                .as_deref()
                                .is_some_and(|n| n.starts_with("hollow-"))
                        });
                        held.count() >= plan.nodes
                    })
                    .unwrap_or(false)
        },
    )
    .await?;
    let nodes_ready = t0.elapsed();
    eprintln!(
        "scale: {} nodes Ready, with their Leases, in {nodes_ready:.1?}",
        plan.nodes
    );
    let at_ready = api_histograms(&client).await?;

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let watch = tokio::spawn(watch_pods(client.clone(), seen.clone()));
    let sizes = sizes(plan.pods);
    let namespaces = (plan.pods / 3000).max(1);
    for i in 0..namespaces {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("scale-{i}")}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
    }
    let t1 = Instant::now();
    let mut made = Vec::new();
    let mut created = 0usize;
    for (i, size) in sizes.iter().enumerate() {
        // A steady rate: each Deployment waits for its pods' share of the time.
        let due = t1 + Duration::from_secs_f64(created as f64 / plan.rate);
        tokio::time::sleep_until(due.into()).await;
        let ns = format!("scale-{}", i % namespaces);
        let name = format!("d{i}");
        create_deployment(&client, &ns, &name, *size).await?;
        made.push((ns, name, *size));
        created += size;
    }
    crate::wait_within(plan.deadline, "every pod Running", || async {
        seen.lock().unwrap().running.len() >= plan.pods
    })
    .await?;
    let pods_running = t1.elapsed();
    eprintln!("scale: {} pods Running in {pods_running:.1?}", plan.pods);
    let (startup, scheduling, on_node) = {
        let s = seen.lock().unwrap();
        let between = |from: &HashMap<String, Instant>, to: &HashMap<String, Instant>| {
            s.running
                .keys()
                .filter_map(|uid| Some(to.get(uid)?.saturating_duration_since(*from.get(uid)?)))
                .collect::<Vec<_>>()
        };
        (
            between(&s.created, &s.running),
            between(&s.created, &s.bound),
            between(&s.bound, &s.running),
        )
    };
    let scheduled_per_s = {
        let s = seen.lock().unwrap();
        let (first, last) = (s.bound.values().min(), s.bound.values().max());
        match (first, last) {
            (Some(f), Some(l)) if l > f => s.bound.len() as f64 / (*l - *f).as_secs_f64(),
            _ => 0.0,
        }
    };
    let churn = if plan.churn {
        Some(churn(&client, &seen, &made, plan.deadline).await?)
    } else {
        None
    };
    let at_end = api_histograms(&client).await?;
    let api = at_end.since(Some(&at_ready));
    let join = at_ready.since(None);
    let waits = at_end.waits_since(Some(&at_ready));
    let cpu = up.procs.cpu().saturating_sub(cpu0);
    let hollow_cpu = hollow.cpu();
    let store_bytes = dir_bytes(&up.data_dir().join("store"));
    let objects = count_objects(&client).await?;
    watch.abort();
    sampler.abort();
    drop(hollow);
    let rss_peak_kib = *rss_peak.lock().unwrap();
    Ok(Report {
        plan,
        nodes_ready,
        pods_running,
        startup,
        scheduling,
        on_node,
        scheduled_per_s,
        churn,
        api,
        join,
        waits,
        rss_peak_kib,
        cpu,
        hollow_cpu,
        bench_cpu: crate::proc_cpu(std::process::id()).saturating_sub(bench_cpu0),
        wall: started.elapsed(),
        store_bytes,
        objects,
    })
}

async fn create_deployment(client: &Client, ns: &str, name: &str, replicas: usize) -> Result<()> {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {LABEL: "1"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, LABEL: "1"}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/hollow:1",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .with_context(|| format!("creating Deployment {ns}/{name}"))?;
    Ok(())
}

/// Records when each pod is first seen, bound, and Running and Ready.
async fn watch_pods(client: Client, seen: Arc<Mutex<Seen>>) {
    let pods: Api<Pod> = Api::all(client);
    let mut events = watcher(
        pods,
        watcher::Config::default().labels(&format!("{LABEL}=1")),
    )
    .boxed();
    while let Some(ev) = events.next().await {
        let p = match ev {
            Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) => p,
            Ok(Event::Init) => {
                seen.lock().unwrap().relist = Some(HashMap::new());
                continue;
            }
            Ok(Event::InitDone) => {
                let mut s = seen.lock().unwrap();
                if let Some(all) = s.relist.take() {
                    s.now = all;
                }
                continue;
            }
            Ok(Event::Delete(p)) => {
                seen.lock()
                    .unwrap()
                    .now
                    .remove(&p.uid().unwrap_or_default());
                continue;
            }
            Err(_) => continue,
        };
        let now = Instant::now();
        let uid = p.uid().unwrap_or_default();
        let mut s = seen.lock().unwrap();
        s.created.entry(uid.clone()).or_insert(now);
        let spec = p.spec.as_ref();
        if spec.and_then(|s| s.node_name.as_ref()).is_some() {
            s.bound.entry(uid.clone()).or_insert(now);
        }
        let running = p.status.as_ref().is_some_and(|st| {
            st.phase.as_deref() == Some("Running")
                && st
                    .conditions
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        }) && p.metadata.deletion_timestamp.is_none();
        if running {
            s.running.entry(uid.clone()).or_insert(now);
        }
        match s.relist.as_mut() {
            Some(relist) => relist.insert(uid, running),
            None => s.now.insert(uid, running),
        };
    }
}

/// A tenth of the Deployments scaled (half up by half, half down by half), a tenth rolled
/// to a new template, a tenth deleted; returns when the pods running match again.
async fn churn(
    client: &Client,
    seen: &Mutex<Seen>,
    made: &[(String, String, usize)],
    deadline: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    let tenth = (made.len() / 10).max(1);
    let mut expected: usize = made.iter().map(|m| m.2).sum();
    let patch = |ns: &str, name: &str, body: serde_json::Value| {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let name = name.to_string();
        async move {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(body))
                .await
                .with_context(|| format!("patching Deployment {name}"))
        }
    };
    for (i, (ns, name, size)) in made.iter().take(tenth).enumerate() {
        let to = if i % 2 == 0 {
            size + size / 2
        } else {
            size / 2
        };
        patch(ns, name, json!({"spec": {"replicas": to}})).await?;
        expected = expected + to - size;
    }
    for (ns, name, _) in made.iter().skip(tenth).take(tenth) {
        patch(
            ns,
            name,
            json!({"spec": {"template": {"metadata": {"annotations": {"baton.dev/rolled": "1"}}}}}),
        )
        .await?;
    }
    for (ns, name, size) in made.iter().skip(2 * tenth).take(tenth) {
        Api::<Deployment>::namespaced(client.clone(), ns)
            .delete(name, &DeleteParams::foreground())
            .await?;
        expected -= size;
    }
    let mut last_said = Instant::now();
    crate::wait_within(deadline, "the churn to settle", || {
        let (total, running) = {
            let s = seen.lock().unwrap();
            (s.now.len(), s.now.values().filter(|r| **r).count())
        };
        // A long churn says where it stands, so that one that does not settle shows why.
        if last_said.elapsed() >= Duration::from_secs(30) {
            last_said = Instant::now();
            eprintln!(
                "scale: churn at {:.0?}: {total} pods, {running} Running, {expected} wanted",
                t.elapsed()
            );
        }
        std::future::ready(running == expected && total == expected)
    })
    .await?;
    Ok(t.elapsed())
}

/// An API call's verb, resource and scope.
type Call = (String, String, String);
/// A histogram's buckets: upper bound (as bits, for ordering) → (bound, cumulative count).
type Buckets = BTreeMap<u64, (f64, u64)>;

/// `apiserver_request_duration_seconds` per verb, resource and scope, and the 429s of
/// `apiserver_request_total`, as read at one moment. Watches and connections are
/// long-running and left out, as the SLO does.
#[derive(Debug, Default)]
struct ApiHistograms {
    buckets: BTreeMap<Call, Buckets>,
    refused: HashMap<Call, u64>,
    /// `apiserver_flowcontrol_request_wait_duration_seconds` per priority level, flow
    /// schema, and whether the request was then served or refused.
    waits: BTreeMap<Call, Buckets>,
}

async fn api_histograms(client: &Client) -> Result<ApiHistograms> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await.context("reading /metrics")?;
    let mut h = ApiHistograms::default();
    for line in text.lines() {
        enum Series {
            Duration,
            Refused,
            Wait,
        }
        let (rest, series) =
            if let Some(rest) = line.strip_prefix("apiserver_request_duration_seconds_bucket{") {
                (rest, Series::Duration)
            } else if let Some(rest) = line.strip_prefix("apiserver_request_total{") {
                if !rest.contains("code=\"429\"") {
                    continue;
                }
                (rest, Series::Refused)
            } else if let Some(rest) =
                line.strip_prefix("apiserver_flowcontrol_request_wait_duration_seconds_bucket{")
            {
                (rest, Series::Wait)
            } else {
                continue;
            };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels: HashMap<&str, &str> = labels
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        let label = |k: &str| labels.get(k).copied().unwrap_or("").to_string();
        let count: f64 = value.trim().parse().unwrap_or(0.0);
        let (key, into) = match series {
            Series::Wait => {
                let served = if label("execute") == "true" {
                    "served"
                } else {
                    "refused"
                };
                let key = (
                    label("priority_level"),
                    label("flow_schema"),
                    served.to_string(),
                );
                (key, &mut h.waits)
            }
            Series::Duration | Series::Refused => {
                let verb = label("verb");
                if matches!(verb.as_str(), "WATCH" | "CONNECT" | "WATCHLIST") {
                    continue;
                }
                let mut resource = label("resource");
                let sub = label("subresource");
                if !sub.is_empty() {
                    resource = format!("{resource}/{sub}");
                }
                let key = (verb, resource, label("scope"));
                if let Series::Refused = series {
                    *h.refused.entry(key).or_default() += count as u64;
                    continue;
                }
                (key, &mut h.buckets)
            }
        };
        let le: f64 = match labels.get("le").copied() {
            Some("+Inf") => f64::INFINITY,
            Some(v) => v.parse().unwrap_or(f64::INFINITY),
            None => continue,
        };
        let e = into
            .entry(key)
            .or_default()
            .entry(le.to_bits())
            .or_insert((le, 0));
        e.1 += count as u64;
    }
    Ok(h)
}

impl ApiHistograms {
    /// p50 and p99 per call of the requests made since `earlier` (all of them if none),
    /// from the buckets' differences (interpolated within a bucket, as
    /// `histogram_quantile` does).
    fn since(&self, earlier: Option<&ApiHistograms>) -> Vec<ApiRow> {
        self.rows(earlier, |h| &h.buckets)
    }

    /// The waits for a seat since `earlier`, as rows of (level, flow schema, served or
    /// refused).
    fn waits_since(&self, earlier: Option<&ApiHistograms>) -> Vec<ApiRow> {
        self.rows(earlier, |h| &h.waits)
    }

    fn rows(
        &self,
        earlier: Option<&ApiHistograms>,
        series: impl Fn(&ApiHistograms) -> &BTreeMap<Call, Buckets>,
    ) -> Vec<ApiRow> {
        let mut rows = Vec::new();
        for ((verb, resource, scope), b) in series(self) {
            let key = (verb.clone(), resource.clone(), scope.clone());
            let before = earlier.and_then(|e| series(e).get(&key));
            let mut b: Vec<(f64, u64)> = b
                .iter()
                .map(|(bits, &(le, c))| {
                    let was = before.and_then(|x| x.get(bits)).map_or(0, |x| x.1);
                    (le, c.saturating_sub(was))
                })
                .collect();
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            let total = b.last().map(|x| x.1).unwrap_or(0);
            if total == 0 {
                continue;
            }
            let q = |p: f64| {
                let want = p * total as f64;
                let (mut lo, mut below) = (0.0, 0u64);
                for (le, c) in &b {
                    if *c as f64 >= want {
                        if le.is_infinite() {
                            return lo;
                        }
                        let within = (*c - below).max(1) as f64;
                        return lo + (le - lo) * ((want - below as f64) / within);
                    }
                    (lo, below) = (*le, *c);
                }
                lo
            };
            let refused_before = earlier
                .and_then(|e| e.refused.get(&key))
                .copied()
                .unwrap_or(0);
            let refused = self
                .refused
                .get(&key)
                .copied()
                .unwrap_or(0)
                .saturating_sub(refused_before);
            rows.push(ApiRow {
                verb: verb.clone(),
                resource: resource.clone(),
                scope: scope.clone(),
                count: total,
                refused,
                p50: q(0.5),
                p99: q(0.99),
            });
        }
        rows
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Objects of the kinds the run makes many of.
async fn count_objects(client: &Client) -> Result<u64> {
    let mut n = 0;
    let lp = ListParams::default();
    n += Api::<Pod>::all(client.clone())
        .list_metadata(&lp)
        .await?
        .items
        .len();
    n += Api::<Node>::all(client.clone())
        .list_metadata(&lp)
        .await?
        .items
        .len();
    n += Api::<k8s_openapi::api::coordination::v1::Lease>::all(client.clone())
        .list_metadata(&lp)
        .await?
        .items
        .len();
    n += Api::<k8s_openapi::api::apps::v1::ReplicaSet>::all(client.clone())
        .list_metadata(&lp)
        .await?
        .items
        .len();
    n += Api::<Deployment>::all(client.clone())
        .list_metadata(&lp)
        .await?
        .items
        .len();
    n += Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::all(client.clone())
        .list_metadata(&lp)
        .await?
        .items
        .len();
    if n == 0 {
        bail!("no objects");
    }
    Ok(n as u64)
}
