//! Hollow nodes: the node agent's own code with scripted sandboxes, so that one process
//! can play thousands of nodes against a real control plane, as kubemark's hollow kubelet
//! does.
//!
//! A hollow node registers its Node, renews its Lease, refreshes its status now and then,
//! watches the pods bound to it with the `spec.nodeName` field selector, and gives each a
//! pod worker ([`crate::worker`]) that reports it Pending, Running and Ready, and
//! terminates it when it is deleted, exactly as a real node does. Only the sandbox
//! differs: [`crate::fake::FakeSandboxes`] starts any image as a server after a set delay,
//! and runs nothing. There is no kubelet endpoint, no Service proxy and no Ingress.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_kube::events::Recorder;
use kube::Client;

use crate::fake::{FakeSandboxes, Script};
use crate::register::{self, Capacity};
use crate::{budget, eviction, ipam, manage_pods, platform, server, worker, NodeError};

/// Pod addresses of hollow nodes. Nothing connects to them, and a hollow node takes no
/// range from the control plane's `/20`s, of which there are only 2,048.
const HOLLOW_RANGE: &str = "127.64.0.0/10";

/// How a hollow node is set up.
#[derive(Debug, Clone)]
pub struct HollowConfig {
    pub name: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    /// Lease renewals; the Node's status is reported about every thirtieth ([`register::StatusClock`]).
    pub heartbeat: Duration,
    /// How long each container takes to start: from bound to Running.
    pub start_delay: Duration,
    /// Pod directories (each pod's logs) live here.
    pub data_dir: PathBuf,
}

/// The address every hollow node reports: nothing connects to it.
const ADDRESS: &str = "127.0.0.1";

impl HollowConfig {
    /// What the node reports of itself (no kubelet endpoint).
    fn identity(&self) -> register::Identity<'_> {
        register::Identity {
            name: &self.name,
            address: ADDRESS,
            labels: &self.labels,
            capacity: &self.capacity,
            kubelet_port: 0,
        }
    }

    /// A node of kubemark's default size (4 CPUs, 16 GiB, 110 pods).
    pub fn new(name: &str, data_dir: PathBuf) -> Self {
        Self {
            name: name.into(),
            capacity: Capacity {
                cpu_millis: 4000,
                memory: 16 << 30,
                pods: 110,
            },
            labels: BTreeMap::from([("baton.dev/hollow".to_string(), "true".to_string())]),
            heartbeat: Duration::from_secs(10),
            start_delay: Duration::ZERO,
            data_dir,
        }
    }
}

/// Runs a hollow node until `shutdown` completes.
pub async fn run(
    client: Client,
    cfg: HollowConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    // As the kubelet does, a node that cannot register yet (the API server sheds load
    // with 429 while thousands join at once) tries again, and says why it waits. The
    // Lease is tried on its own: a failed renewal does not register the Node again.
    let reported = register::Reported::default();
    let registered = until_done(&cfg.name, "register", || {
        register::register(&client, cfg.identity(), &reported)
    })
    .await;
    let lease = register::NodeLease::new(&cfg.name, cfg.heartbeat * 4);
    until_done(&cfg.name, "take its Lease", || lease.renew(&client)).await;
    let events = Recorder::with_queue(client.clone(), "kubelet", Some(&cfg.name), 64, 1);
    let sandboxes = FakeSandboxes::default();
    sandboxes
        .any_image(Script::Serve)
        .start_delay(cfg.start_delay);
    let logs = Arc::new(server::LogIndex::default());
    let shared = Arc::new(worker::Shared {
        client: client.clone(),
        sandboxes,
        ipam: Mutex::new(ipam::Ipam::new(HOLLOW_RANGE)?),
        node_name: cfg.name.clone(),
        host_ip: ADDRESS.into(),
        data_dir: cfg.data_dir.clone(),
        events,
        settings: worker::Settings::default(),
        services: None,
        logs: logs.clone(),
        memory: Arc::new(budget::MemoryBudget::new(cfg.capacity.memory, 64 << 20)),
        evictions: Arc::new(eviction::Evictions::default()),
        platform: Arc::new(platform::Stores::new(cfg.data_dir.join("keyvalue"))),
        objects: Default::default(),
    });
    shared.objects.follow(&registered);
    let heartbeat = tokio::spawn(heartbeat(client, cfg, lease, shared.objects.clone()));
    manage_pods(shared, logs, shutdown).await;
    heartbeat.abort();
    Ok(())
}

/// Renews the Lease every beat and reports the Node's status when it is due, as the node
/// agent does ([`register::StatusClock`]); a failed renewal is retried at the next beat.
async fn heartbeat(
    client: Client,
    cfg: HollowConfig,
    lease: register::NodeLease,
    objects: Arc<crate::config::ObjectCache>,
) {
    let mut tick = tokio::time::interval(cfg.heartbeat);
    // Spread the nodes over the period, as real ones started at different times are.
    tick.reset_after(cfg.heartbeat.mul_f64(rand_fraction(&cfg.name)));
    let mut clock = register::StatusClock::new(rand::random());
    let mut renewal_failed = false;
    loop {
        tick.tick().await;
        if let Err(e) = lease.renew(&client).await {
            tracing::debug!(node = %cfg.name, error = %e, "hollow heartbeat failed");
            renewal_failed = true;
            continue;
        }
        let node = match clock.beat(renewal_failed, objects.knows_ttl(), rand::random()) {
            register::StatusDue::Report => {
                register::refresh(&client, cfg.identity(), &register::Reported::default()).await
            }
            register::StatusDue::Read => register::read_node(&client, &cfg.name).await,
            register::StatusDue::Nothing => continue,
        };
        match node {
            Ok(node) => {
                objects.follow(&node);
                renewal_failed = false;
            }
            Err(e) => tracing::debug!(node = %cfg.name, error = %e, "hollow status update failed"),
        }
    }
}

/// Runs `attempt` until it succeeds, backing off from 200 ms to 10 s between tries.
async fn until_done<T, F, Fut>(node: &str, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, register::RegisterError>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(e) => {
                tracing::info!(node, error = %baton_kube::error::chain(&e), "hollow node waits to {what}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A number in [0, 1) fixed by the name.
fn rand_fraction(name: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() % 10_000) as f64 / 10_000.0
}
