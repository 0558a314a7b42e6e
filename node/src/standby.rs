//! Answering a workload woken from zero before its pod is up.
//!
//! Waking a workload ([`crate::activator`]) goes through the whole control plane: the
//! scale, the ReplicaSet, the pod, its binding, its start here, its readiness and its
//! EndpointSlice, each a write and a watch event; tens of milliseconds. Yet the node that
//! holds the request often has the workload's component compiled already, and starts one
//! in under a millisecond. So, while the pod is on its way, the node answers the held
//! requests from a *standby*: the workload's pod template run here, in a sandbox of its
//! own, exactly as the pod's container would run it. As soon as the Service has a ready
//! endpoint, new requests go there and the standby finishes its requests and goes.
//!
//! ## When a standby may stand in for the pod
//! Only when nothing the component can observe differs from the pod it stands in for:
//! - one container, no init containers, no volumes, no `envFrom` and no `valueFrom`
//!   (the pod's name, its Secrets and its ConfigMaps are not the node's to read before the
//!   pod is bound here), and no `baton.dev/tls-volume`;
//! - a wasi:http component already on the node (a registry's image whose pull policy is
//!   `Always` would be checked against its registry again, so it waits for the pod);
//! - that imports no `wasi:filesystem`, so the files a pod would have (its
//!   ServiceAccount token) cannot be missed;
//! - the Service's target port is the port the container serves.
//!
//! It gets the same environment (the template's, the `kubernetes` Service's variables),
//! the same memory and CPU limits, the same request timeout, and names resolve as for the
//! pod. Its output goes to `standby/<namespace>/<kind>/<name>/<container>.log` under the
//! node's data directory (the pod's own log starts with the pod). At most
//! [`MAX_STANDBYS`] run at once, each for at most the wake timeout.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

use baton_kube::pod as podx;
use baton_wasm_shim::logs::{ContainerLog, LogConfig};
use baton_wasm_shim::{ComponentKind, ContainerSpec, HttpSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::sandbox::PodSandboxes;
use crate::worker::Shared;

/// Standbys running at once, over all workloads.
pub const MAX_STANDBYS: usize = 64;

/// Why a workload is not answered from a standby (it then waits for its pod).
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("its pod template {0}")]
    NotEligible(String),
    #[error("its component {0}")]
    Component(String),
    #[error("the node is shutting down")]
    NodeGone,
    #[error("{MAX_STANDBYS} standbys already run")]
    Full,
    #[error("getting its component from the node's cache")]
    Image(#[source] crate::images::ImageError),
    #[error("giving it an address")]
    Address(#[source] crate::ipam::IpamError),
    #[error("resolving its environment")]
    Config(#[source] crate::config::ConfigError),
    #[error("opening its log")]
    Log(#[source] std::io::Error),
    #[error("starting it")]
    Start(#[source] baton_wasm_shim::ShimError),
}

/// The one container a template may be answered from, or why it may not.
pub fn eligible(template: &PodTemplateSpec) -> Result<&Container, StandbyError> {
    let no = |why: &str| Err(StandbyError::NotEligible(why.to_string()));
    let Some(spec) = &template.spec else {
        return no("has no spec");
    };
    let [c] = spec.containers.as_slice() else {
        return no("has more than one container");
    };
    if spec.init_containers.as_ref().is_some_and(|v| !v.is_empty()) {
        return no("has init containers");
    }
    if spec.volumes.as_ref().is_some_and(|v| !v.is_empty())
        || c.volume_mounts.as_ref().is_some_and(|v| !v.is_empty())
    {
        return no("has volumes");
    }
    if c.env_from.as_ref().is_some_and(|v| !v.is_empty())
        || c.env.iter().flatten().any(|e| e.value_from.is_some())
    {
        return no("takes environment variables from objects or the pod");
    }
    if template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| a.contains_key(crate::config::TLS_VOLUME_ANNOTATION))
    {
        return no("serves TLS from a volume");
    }
    if template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| {
            a.keys()
                .any(|k| k.starts_with(crate::platform::CAPABILITIES))
        })
    {
        return no("uses platform interfaces, whose backing is its pod's");
    }
    // A node path is read afresh at every start anyway; a registry's image would be
    // checked against the registry, with the pod's pull secrets.
    let image = c.image.as_deref().unwrap_or_default();
    if c.image_pull_policy.as_deref() == Some("Always")
        && crate::images::local_path(image).is_none()
    {
        return no("pulls its image from its registry at every start");
    }
    Ok(c)
}

/// The port a pod's HTTP container serves, as the node starts it: its first container
/// port, or 8080.
pub fn served_port(c: &Container) -> u16 {
    c.ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(8080)
}

/// Whether a Service port with `target` (its `targetPort`, defaulted to its port
/// `port`) reaches what `c` serves.
pub fn targets(c: &Container, target: Option<&IntOrString>, port: u16) -> bool {
    let served = served_port(c);
    match target {
        None => port == served,
        Some(IntOrString::Int(n)) => i64::from(*n) == i64::from(served),
        Some(IntOrString::String(name)) => c
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(name) && p.container_port == i32::from(served)),
    }
}

struct Running {
    addr: SocketAddr,
    ip: Ipv4Addr,
    pod: baton_wasm_shim::Pod,
}

/// The node's standbys, one per workload at most.
pub struct Standbys {
    shared: Weak<Shared<PodSandboxes>>,
    running: tokio::sync::Mutex<HashMap<String, Running>>,
}

impl std::fmt::Debug for Standbys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standbys").finish_non_exhaustive()
    }
}

impl Standbys {
    pub fn new(shared: Weak<Shared<PodSandboxes>>) -> Self {
        Self {
            shared,
            running: tokio::sync::Mutex::default(),
        }
    }

    /// Where the standby of `workload` (`namespace/Kind/name`) serves, started now from
    /// `template` if none runs; and whether it was started now. The caller retires it
    /// ([`Standbys::retire`]) once the pod is up.
    pub async fn address(
        &self,
        workload: &str,
        template: &PodTemplateSpec,
        target: Option<&IntOrString>,
        port: u16,
    ) -> Result<(SocketAddr, bool), StandbyError> {
        let mut running = self.running.lock().await;
        if let Some(r) = running.get(workload) {
            return Ok((r.addr, false));
        }
        if running.len() >= MAX_STANDBYS {
            return Err(StandbyError::Full);
        }
        let c = eligible(template)?;
        if !targets(c, target, port) {
            return Err(StandbyError::NotEligible(
                "serves another port than the Service's target".into(),
            ));
        }
        let shared = self.shared.upgrade().ok_or(StandbyError::NodeGone)?;
        let ip = shared
            .ipam
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate(None)
            .map_err(StandbyError::Address)?;
        match start(&shared, workload, template, c, ip).await {
            Ok((addr, pod)) => {
                tracing::info!(%workload, %addr, "answering from a standby until the pod is up");
                running.insert(workload.to_string(), Running { addr, ip, pod });
                Ok((addr, true))
            }
            Err(e) => {
                shared
                    .ipam
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release(ip);
                Err(e)
            }
        }
    }

    /// Stops the standby of `workload`: it takes no new request, finishes those it has
    /// (for the request timeout at most), and its address is given back.
    pub async fn retire(&self, workload: &str) {
        let Some(r) = self.running.lock().await.remove(workload) else {
            return;
        };
        let grace = self
            .shared
            .upgrade()
            .map_or(Duration::ZERO, |s| s.sandboxes.wasm.request_timeout);
        r.pod.shutdown(grace).await;
        if let Some(shared) = self.shared.upgrade() {
            shared
                .ipam
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(r.ip);
        }
        tracing::info!(%workload, "the standby is retired");
    }
}

/// Runs the template's container at `ip`, as the node would run the pod's.
async fn start(
    shared: &Shared<PodSandboxes>,
    workload: &str,
    template: &PodTemplateSpec,
    c: &Container,
    ip: Ipv4Addr,
) -> Result<(SocketAddr, baton_wasm_shim::Pod), StandbyError> {
    let wasm = &shared.sandboxes.wasm;
    let rt = &wasm.runtime;
    let image = c.image.as_deref().unwrap_or_default();
    // Only what is on the node: a standby never waits on a registry.
    let got = wasm
        .images
        .get(
            image,
            &baton_oci::Auth::default(),
            baton_oci::PullPolicy::Never,
        )
        .await
        .map_err(StandbyError::Image)?;
    match rt.kind(&got.component) {
        Ok(ComponentKind::Http) => {}
        Ok(ComponentKind::Cli) => {
            return Err(StandbyError::Component("is not a wasi:http handler".into()))
        }
        Err(e) => return Err(StandbyError::Start(e)),
    }
    if let Some(i) = rt
        .imports(&got.component)
        .into_iter()
        .find(|i| i.starts_with("wasi:filesystem/"))
    {
        return Err(StandbyError::Component(format!(
            "imports {i}, and a standby has none of the pod's files"
        )));
    }
    let (ns, name) = {
        let mut parts = workload.splitn(3, '/');
        let ns = parts.next().unwrap_or_default().to_string();
        let name = parts.nth(1).unwrap_or_default().to_string();
        (ns, name)
    };
    let meta = template.metadata.clone().unwrap_or_default();
    // The pod as the template makes it, for the helpers that size and configure pods.
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(format!("{name}-standby")),
            namespace: Some(ns.clone()),
            labels: meta.labels,
            annotations: meta.annotations,
            ..ObjectMeta::default()
        },
        spec: template.spec.clone(),
        status: None,
    };
    let dir = shared
        .data_dir
        .join("standby")
        .join(workload.replace('/', "_"));
    let local = shared.local_volumes();
    let facts = crate::config::PodFacts {
        pod_ip: ip.to_string(),
        host_ip: shared.host_ip.clone(),
        node_name: shared.node_name.clone(),
    };
    let mut config = crate::config::resolve(
        &shared.client,
        &shared.objects,
        &pod,
        &facts,
        &dir,
        shared.host_dirs(&local),
        &mut crate::config::Written::default(),
    )
    .await
    .map_err(StandbyError::Config)?
    .remove(&c.name)
    .unwrap_or_default();
    if let Some((ip, port)) = shared.services.as_ref().and_then(|s| s.api_server()) {
        crate::config::api_server_env(&mut config.env, ip, port);
    }
    let log = ContainerLog::open(LogConfig {
        path: dir.join(format!("{}.log", c.name)),
        max_bytes: shared.settings.log_max_bytes,
        max_files: 1,
    })
    .map_err(StandbyError::Log)?;
    let memory_bytes = shared.memory.container_limit(c) as usize;
    let names = wasm.resolvers.as_ref().map(|r| r(&ns));
    let mut sandbox = rt.new_pod(&format!("{ns}/{name}-standby/standby"), ip.into(), names);
    sandbox.set_cpu_limit(crate::status::pod_cpu_limit(&pod));
    sandbox.set_cpu_weight(podx::requests(&pod).0);
    sandbox.set_memory_limit(Some(memory_bytes));
    let port = served_port(c);
    sandbox
        .start_container(
            rt,
            ContainerSpec {
                name: c.name.clone(),
                component: got.component,
                port: Some(port),
                cli: Default::default(),
                http: HttpSpec {
                    env: config.env,
                    mounts: Vec::new(),
                    tls: None,
                    memory_bytes,
                    request_timeout: Some(wasm.request_timeout),
                    log: Some(log),
                    platform: Default::default(),
                    reuse: None,
                },
            },
        )
        .await
        .map_err(StandbyError::Start)?;
    let addr = sandbox
        .http_addr(&c.name)
        .unwrap_or_else(|| SocketAddr::new(ip.into(), port));
    Ok((addr, sandbox))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(spec: serde_json::Value) -> PodTemplateSpec {
        serde_json::from_value(json!({"metadata": {"labels": {"app": "f"}}, "spec": spec})).unwrap()
    }

    #[test]
    fn only_a_template_whose_pod_the_component_could_not_tell_apart_is_answered_from() {
        let plain = template(json!({"containers": [{"name": "f", "image": "f:1",
            "env": [{"name": "A", "value": "1"}], "ports": [{"containerPort": 80, "name": "http"}]}]}));
        let c = eligible(&plain).expect("a plain one-container template");
        assert_eq!(served_port(c), 80);
        assert!(targets(c, None, 80));
        assert!(targets(c, Some(&IntOrString::Int(80)), 8000));
        assert!(targets(c, Some(&IntOrString::String("http".into())), 8000));
        assert!(!targets(c, Some(&IntOrString::Int(81)), 81));
        assert!(!targets(c, Some(&IntOrString::String("admin".into())), 81));
        let refused = [
            json!({"containers": [{"name": "a", "image": "f"}, {"name": "b", "image": "g"}]}),
            json!({"initContainers": [{"name": "i", "image": "i"}], "containers": [{"name": "f", "image": "f"}]}),
            json!({"volumes": [{"name": "v", "emptyDir": {}}], "containers": [{"name": "f", "image": "f"}]}),
            json!({"containers": [{"name": "f", "image": "f",
                "env": [{"name": "P", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}),
            json!({"containers": [{"name": "f", "image": "f",
                "envFrom": [{"configMapRef": {"name": "c"}}]}]}),
            json!({"containers": [{"name": "f", "image": "f", "imagePullPolicy": "Always"}]}),
        ];
        for spec in refused {
            assert!(
                matches!(
                    eligible(&template(spec.clone())),
                    Err(StandbyError::NotEligible(_))
                ),
                "{spec}"
            );
        }
        let tls: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"annotations": {crate::config::TLS_VOLUME_ANNOTATION: "certs"}},
            "spec": {"containers": [{"name": "f", "image": "f"}]}}))
        .unwrap();
        assert!(eligible(&tls).is_err());
        let path = template(
            json!({"containers": [{"name": "f", "image": "/guests/f.wasm",
            "imagePullPolicy": "Always"}]}),
        );
        assert!(eligible(&path).is_ok(), "a node path is read afresh anyway");
        let default_port = template(json!({"containers": [{"name": "f", "image": "f"}]}));
        assert_eq!(served_port(eligible(&default_port).unwrap()), 8080);
    }
}
