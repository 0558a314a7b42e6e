//! The node's presence in the API: its Node object (capacity, allocatable, addresses,
//! conditions, version info) and its heartbeat, a Lease in `kube-node-lease` renewed every
//! few seconds, which the node lifecycle controller watches.

use std::collections::BTreeMap;
use std::time::Duration;

use baton_kube::events::{EventType, Recorder};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// Why the node could not register or heartbeat.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("registering node {node}")]
    Node {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("renewing the lease of node {node}")]
    Lease {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What the node offers.
#[derive(Debug, Clone)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory: u64,
    pub pods: u64,
}

/// The node's status as it reports it; Ready while the agent runs.
fn status(
    address: &str,
    name: &str,
    cap: &Capacity,
    port: u16,
    memory_pressure: bool,
    images: &[crate::images::NodeImage],
) -> serde_json::Value {
    let now = baton_kube::pod::now();
    let resources = json!({
        "cpu": format!("{}m", cap.cpu_millis),
        "memory": format!("{}", cap.memory),
        "pods": cap.pods.to_string(),
    });
    let cond = |t: &str, s: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
        "conditions": [
            if memory_pressure {
                cond("MemoryPressure", "True", "KubeletHasInsufficientMemory", "kubelet has insufficient memory available")
            } else {
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available")
            },
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "baton node agent is posting ready status"),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "images": images
            .iter()
            .map(|i| json!({"names": i.names, "sizeBytes": i.size_bytes}))
            .collect::<Vec<_>>(),
        "nodeInfo": {
            "architecture": go_arch(),
            "operatingSystem": "linux",
            "osImage": "Baton Wasm node",
            "kernelVersion": "",
            "kubeletVersion": "v1.33.0-baton",
            "kubeProxyVersion": "v1.33.0-baton",
            "containerRuntimeVersion": "wasmtime://48.0.8",
            "machineID": name, "systemUUID": name, "bootID": "",
        },
    })
}

/// This machine's architecture as Go (and so every chart's `nodeSelector`) names it:
/// `amd64`, not Rust's `x86_64`.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        // riscv64, s390x, arm and mips are spelled alike.
        other => other,
    }
}

/// The Node as the kubelet names it in its events: its name as its uid, which
/// `kubectl describe node` looks for beside the Node's own uid.
fn node_ref(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid: Some(name.into()),
        ..Default::default()
    }
}

/// What the kubelet tells of its node when it starts: started, each condition's state,
/// Ready.
pub fn tell_started(events: &Recorder, name: &str) {
    events.publish(
        &node_ref(name),
        EventType::Normal,
        "Starting",
        "Starting kubelet.",
    );
    for status in [
        "NodeHasSufficientMemory",
        "NodeHasNoDiskPressure",
        "NodeHasSufficientPID",
        "NodeReady",
    ] {
        tell_status(events, name, status);
    }
}

/// A change of the node's status, as the kubelet words it (`NodeHasInsufficientMemory`).
pub fn tell_status(events: &Recorder, name: &str, status: &'static str) {
    events.publish(
        &node_ref(name),
        EventType::Normal,
        status,
        &format!("Node {name} status is now: {status}"),
    );
}

/// The Node annotations naming the ports the node serves Ingresses on.
pub const INGRESS_HTTP_PORT: &str = "baton.dev/ingress-http-port";
pub const INGRESS_HTTPS_PORT: &str = "baton.dev/ingress-https-port";

/// Writes the ports the node serves Ingresses on into its Node's annotations, so that a
/// port picked by the system (0 asked) can be found.
pub async fn publish_ingress_ports(
    client: &Client,
    name: &str,
    http: Option<u16>,
    https: Option<u16>,
) -> Result<(), RegisterError> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {
        INGRESS_HTTP_PORT: http.map(|p| p.to_string()),
        INGRESS_HTTPS_PORT: https.map(|p| p.to_string()),
    }}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|source| RegisterError::Node {
            node: name.into(),
            source,
        })?;
    Ok(())
}

/// What the node reports of its own state beyond its configuration.
#[derive(Debug, Default)]
pub struct Reported<'a> {
    pub memory_pressure: bool,
    /// The images it holds (`status.images`).
    pub images: &'a [crate::images::NodeImage],
}

/// What a node says of itself when it registers or refreshes its status.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub name: &'a str,
    pub address: &'a str,
    /// Its own labels, besides the well-known ones every node gets.
    pub labels: &'a BTreeMap<String, String>,
    pub capacity: &'a Capacity,
    /// The kubelet endpoint's port (0: none).
    pub kubelet_port: u16,
}

impl Identity<'_> {
    fn status_patch(&self, reported: &Reported<'_>) -> serde_json::Value {
        json!({"status": status(
            self.address,
            self.name,
            self.capacity,
            self.kubelet_port,
            reported.memory_pressure,
            reported.images,
        )})
    }
}

/// Creates or updates the Node, and marks it Ready. Returns the Node as stored.
pub async fn register(
    client: &Client,
    node: Identity<'_>,
    reported: &Reported<'_>,
) -> Result<Node, RegisterError> {
    let name = node.name;
    let api: Api<Node> = Api::all(client.clone());
    let err = |source| RegisterError::Node {
        node: name.into(),
        source,
    };
    let mut all_labels = node.labels.clone();
    all_labels.insert("kubernetes.io/hostname".into(), name.into());
    all_labels.insert("kubernetes.io/os".into(), "linux".into());
    all_labels.insert("kubernetes.io/arch".into(), go_arch().into());
    all_labels.insert("baton.dev/runtime".into(), "wasm".into());
    let object: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": all_labels},
    }))
    .expect("a valid Node");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let patch = json!({"metadata": {"labels": all_labels}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(err)?;
        }
        Err(e) => return Err(err(e)),
    }
    let patch = node.status_patch(reported);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(err)
}

/// Refreshes the Node's status, as the kubelet's status loop does: one status patch, with
/// no create and no label write. A Node deleted meanwhile is registered again. Returns
/// the Node as stored (what the control plane set on it, its TTL annotation among them).
pub async fn refresh(
    client: &Client,
    node: Identity<'_>,
    reported: &Reported<'_>,
) -> Result<Node, RegisterError> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = node.status_patch(reported);
    match api
        .patch_status(node.name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(stored) => Ok(stored),
        Err(kube::Error::Api(s)) if s.code == 404 => register(client, node, reported).await,
        Err(source) => Err(RegisterError::Node {
            node: node.name.into(),
            source,
        }),
    }
}

/// The node's Lease, renewed as the kubelet's lease controller renews it: by an update of
/// the copy it last wrote (its `resourceVersion` included), so that a renewal is one write
/// and no read. A conflict (someone else wrote the Lease meanwhile) or a missing Lease
/// reads it again, or creates it, as the kubelet's `ensureLease` does.
#[derive(Debug)]
pub struct NodeLease {
    name: String,
    duration: Duration,
    /// The Lease as the API server last answered it; taken out while a renewal runs.
    latest: std::sync::Mutex<Option<Lease>>,
}

impl NodeLease {
    /// The Lease of node `name`, held for `duration` after each renewal.
    pub fn new(name: &str, duration: Duration) -> Self {
        Self {
            name: name.into(),
            duration,
            latest: Default::default(),
        }
    }

    fn stamp(&self, lease: &mut Lease) {
        let now = baton_kube::pod::now_micro();
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(self.name.clone());
        spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        spec.renew_time = Some(now);
    }

    /// Renews the Lease, creating it the first time.
    pub async fn renew(&self, client: &Client) -> Result<(), RegisterError> {
        let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let err = |source| RegisterError::Lease {
            node: self.name.clone(),
            source,
        };
        let held = self.latest.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut lease) = held {
            self.stamp(&mut lease);
            match api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(written) => {
                    self.keep(written);
                    return Ok(());
                }
                // Someone else wrote it, or it was deleted: read it again below.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => {
                    // Unanswered: the copy is still the latest the node knows.
                    self.keep(lease);
                    return Err(err(e));
                }
            }
        }
        let written = match api.get_opt(&self.name).await.map_err(err)? {
            Some(mut lease) => {
                self.stamp(&mut lease);
                api.replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map_err(err)?
            }
            None => {
                let mut lease: Lease = serde_json::from_value(json!({
                    "metadata": {"name": self.name, "namespace": "kube-node-lease",
                        "ownerReferences": []},
                }))
                .expect("a valid Lease");
                self.stamp(&mut lease);
                match api.create(&PostParams::default(), &lease).await {
                    Ok(created) => created,
                    // Created meanwhile (an earlier attempt that timed out): the next
                    // renewal reads it.
                    Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
                    Err(e) => return Err(err(e)),
                }
            }
        };
        self.keep(written);
        Ok(())
    }

    fn keep(&self, lease: Lease) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
    }
}

/// Beats between status reports when nothing in the status changed: five minutes at the
/// default 10 s beat, the kubelet's `nodeStatusReportFrequency`. The Lease is the pulse;
/// at 5,000 nodes a report a minute was 83 Node writes a second, each sent to every
/// watcher of Nodes.
pub const STATUS_REPORT_BEATS: u64 = 30;

/// Beats between reads of the node's own Node while it carries no TTL annotation yet: the
/// node learns its ConfigMap TTL from there ([`crate::config::ObjectCache::follow`]), and
/// the control plane sets it only after the node registered.
pub const TTL_READ_BEATS: u64 = 3;

/// What a node does with its Node at a beat.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusDue {
    /// Report the status (and follow the Node the answer returns).
    Report,
    /// Read the Node, only to follow it.
    Read,
    Nothing,
}

/// When the Node's status is due, beat by beat, as the kubelet decides it: at once when
/// something in it changed (a failed renewal counts: while the node was cut off, the
/// control plane may have marked it unknown, and only the node's report makes it Ready
/// again); else [`STATUS_REPORT_BEATS`] after the last report. After a start or a
/// change, that one wait is moved by an offset drawn from ±half of it (the kubelet's
/// `delayAfterNodeStatusChange`), so that nodes that joined together do not report
/// together ever after: 5,000 hollow nodes that joined within 19 s sent their five-minute
/// reports in bursts of 5,000, and those writes' p99 went past a second. While the node
/// does not know its TTL, it reads its Node every [`TTL_READ_BEATS`].
#[derive(Debug)]
pub struct StatusClock {
    since_report: u64,
    wait: u64,
}

impl StatusClock {
    /// The clock of a node that has just registered; `draw` in [0, 1) places its first
    /// report (`rand::random()` in a node, fixed in tests).
    pub fn new(draw: f64) -> Self {
        Self {
            since_report: 0,
            wait: offset_wait(draw),
        }
    }

    /// What is due at this beat; `draw` places the next report if this one is for a
    /// change.
    pub fn beat(&mut self, changed: bool, knows_ttl: bool, draw: f64) -> StatusDue {
        self.since_report += 1;
        if changed {
            self.since_report = 0;
            self.wait = offset_wait(draw);
            StatusDue::Report
        } else if self.since_report >= self.wait {
            self.since_report = 0;
            self.wait = STATUS_REPORT_BEATS;
            StatusDue::Report
        } else if !knows_ttl && self.since_report % TTL_READ_BEATS == 0 {
            StatusDue::Read
        } else {
            StatusDue::Nothing
        }
    }
}

/// [`STATUS_REPORT_BEATS`] moved by `draw` (in [0, 1)) within ±half of it.
fn offset_wait(draw: f64) -> u64 {
    let period = STATUS_REPORT_BEATS as f64;
    (period + (draw.clamp(0.0, 1.0) - 0.5) * period)
        .round()
        .max(1.0) as u64
}

/// The node's own Node, as stored.
pub async fn read_node(client: &Client, name: &str) -> Result<Node, RegisterError> {
    Api::<Node>::all(client.clone())
        .get(name)
        .await
        .map_err(|source| RegisterError::Node {
            node: name.into(),
            source,
        })
}

/// Waits until the control plane has given the node a pod range, and returns it.
pub async fn assigned_pod_cidr(client: &Client, name: &str) -> Result<String, RegisterError> {
    loop {
        let node = read_node(client, name).await?;
        if let Some(c) = node.spec.and_then(|s| s.pod_cidr) {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_testkit::fake_api::FakeApi;

    #[tokio::test]
    async fn a_lease_is_renewed_by_updating_the_copy_last_written_and_read_again_on_a_conflict() {
        let api = FakeApi::default();
        let client = api.client();
        let path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1";
        let lease = NodeLease::new("n1", Duration::from_secs(40));
        let calls = || -> Vec<String> {
            api.calls()
                .iter()
                .map(|c| format!("{} {}", c.method, c.path))
                .collect()
        };
        // The first renewal finds no Lease and creates it.
        api.fail("GET", path, 404);
        lease.renew(&client).await.unwrap();
        api.heal();
        // The next ones update what was written, with its resourceVersion, and read nothing.
        lease.renew(&client).await.unwrap();
        lease.renew(&client).await.unwrap();
        let collection = path.trim_end_matches("/n1");
        assert_eq!(
            calls(),
            [
                format!("GET {path}"),
                format!("POST {collection}"),
                format!("PUT {path}"),
                format!("PUT {path}")
            ]
        );
        let put = api.write_calls().pop().unwrap();
        assert_eq!(put.body["metadata"]["resourceVersion"], "1");
        assert_eq!(put.body["spec"]["holderIdentity"], "n1");
        assert_eq!(put.body["spec"]["leaseDurationSeconds"], 40);
        assert!(put.body["spec"]["renewTime"].is_string());
        // Someone else wrote the Lease: the update conflicts, the node reads it again and
        // updates that.
        api.clear();
        api.fail("PUT", path, 409);
        api.object(
            path,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "n1", "namespace": "kube-node-lease", "resourceVersion": "7"}}),
        );
        assert!(
            lease.renew(&client).await.is_err(),
            "the second update conflicts too"
        );
        api.heal();
        lease.renew(&client).await.unwrap();
        assert_eq!(
            calls(),
            [
                format!("PUT {path}"),
                format!("GET {path}"),
                format!("PUT {path}"),
                format!("GET {path}"),
                format!("PUT {path}")
            ]
        );
        assert_eq!(
            api.write_calls().pop().unwrap().body["metadata"]["resourceVersion"],
            "7"
        );
    }

    /// The beats at which a clock reports in `beats` beats, with `changed` beats.
    fn reports(clock: &mut StatusClock, beats: u64, changed: &[u64], draw: f64) -> Vec<u64> {
        (1..=beats)
            .filter(|b| clock.beat(changed.contains(b), true, draw) == StatusDue::Report)
            .collect()
    }

    #[test]
    fn the_status_is_reported_every_five_minutes_or_on_a_change_and_the_node_read_until_it_has_a_ttl(
    ) {
        // A draw of one half moves nothing: every thirtieth beat.
        let mut clock = StatusClock::new(0.5);
        assert_eq!(reports(&mut clock, 90, &[], 0.5), [30, 60, 90]);
        assert_eq!(
            reports(&mut clock, 10, &[7], 0.5),
            [7],
            "a change is told at once"
        );
        let mut clock = StatusClock::new(0.5);
        let due: Vec<StatusDue> = (0..4).map(|_| clock.beat(false, false, 0.5)).collect();
        assert_eq!(
            due,
            [
                StatusDue::Nothing,
                StatusDue::Nothing,
                StatusDue::Read,
                StatusDue::Nothing
            ],
            "the Node is read every third beat until the TTL is known"
        );
    }

    #[test]
    fn the_first_report_after_a_start_or_a_change_is_moved_by_up_to_half_the_period() {
        // Drawn early and late: the first report comes at 15 and 45 beats, then every 30.
        let mut early = StatusClock::new(0.0);
        assert_eq!(reports(&mut early, 80, &[], 0.0), [15, 45, 75]);
        let mut late = StatusClock::new(0.999);
        assert_eq!(reports(&mut late, 110, &[], 0.0), [45, 75, 105]);
        // A change moves the next wait by its own draw.
        let mut clock = StatusClock::new(0.5);
        assert_eq!(reports(&mut clock, 70, &[10], 0.9), [10, 52]);
        // Nodes that start together spread their reports over the period.
        let firsts: std::collections::BTreeSet<u64> = (0..200)
            .map(|_| {
                let mut c = StatusClock::new(rand::random());
                (1..=60)
                    .find(|_| c.beat(false, true, 0.5) == StatusDue::Report)
                    .unwrap()
            })
            .collect();
        assert!(
            firsts.len() > 10 && firsts.iter().all(|b| (15..=45).contains(b)),
            "{firsts:?}"
        );
    }

    #[tokio::test]
    async fn a_status_refresh_is_one_patch_and_a_deleted_node_registers_again() {
        let cap = Capacity {
            cpu_millis: 1000,
            memory: 1 << 30,
            pods: 110,
        };
        let labels = BTreeMap::new();
        let node = Identity {
            name: "n1",
            address: "10.0.0.1",
            labels: &labels,
            capacity: &cap,
            kubelet_port: 0,
        };
        let refresh = |api: &baton_testkit::fake_api::FakeApi| {
            let client = api.client();
            async move { refresh(&client, node, &Reported::default()).await }
        };
        let api = baton_testkit::fake_api::FakeApi::default();
        refresh(&api).await.unwrap();
        assert_eq!(api.writes(), ["PATCH /api/v1/nodes/n1/status"]);

        let gone = baton_testkit::fake_api::FakeApi::default();
        gone.fail("PATCH", "/nodes/n1/status", 404);
        let err = refresh(&gone).await.unwrap_err();
        assert!(matches!(err, RegisterError::Node { .. }), "{err}");
        assert_eq!(
            gone.writes(),
            [
                "PATCH /api/v1/nodes/n1/status",
                "POST /api/v1/nodes",
                "PATCH /api/v1/nodes/n1/status"
            ],
            "registered again (its status patch still fails here)"
        );
    }

    #[test]
    fn the_architecture_has_gos_name() {
        let arch = super::go_arch();
        assert!(!["x86_64", "aarch64"].contains(&arch), "{arch}");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(arch, "amd64");
        }
    }
}
