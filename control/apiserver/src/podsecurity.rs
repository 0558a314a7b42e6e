//! PodSecurity admission: the Pod Security Standards, enforced per namespace as
//! kube-apiserver's PodSecurity plugin enforces them.
//!
//! A namespace chooses a level with its labels `pod-security.kubernetes.io/enforce`
//! (pods that break it are refused), `.../warn` (they get a warning) and `.../audit`
//! (logged): `privileged` (anything), `baseline` or `restricted`; an unknown level means
//! `restricted`, and the `-version` labels are read as `latest`. Pods are checked when
//! created and when their spec changes; a workload's pod template (Deployment, Job, ...)
//! is never refused, but gets the warning its pods would get.
//!
//! The checks are kube's, on the same fields, with the same words, so a manifest that
//! passes `restricted` on Kubernetes passes here and one that fails fails the same way.
//! What they mean for a Wasm component: host namespaces, host ports and hostPath volumes
//! reach the node and are the checks that protect it; a component has no Linux
//! privileges, capabilities, seccomp, AppArmor or SELinux context to lose, so those
//! fields change nothing for it, and are checked for the manifests' sake and for the OCI
//! containers a pod may hold beside its components.

use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::objects::Objects;
use crate::policy::Attempt;
use crate::resources;
use crate::strategy::PodSpecAt;
use crate::table::{s, strings};

/// The plugin: refuses a pod that breaks its namespace's `enforce` level, and warns of a
/// pod (or template) that breaks `warn` (or, for a template, `enforce`).
pub(crate) async fn admit(objects: &Objects, a: &Attempt<'_>) -> ApiResult<()> {
    let (Some(at), Some(ns), None) = (a.res.strategy.pod_spec(), a.namespace, a.subresource) else {
        return Ok(());
    };
    let (pointer, is_pod) = match at {
        PodSpecAt::Pod => ("/spec", true),
        PodSpecAt::Template(p) => (p, false),
    };
    let Some(spec) = a.object.pointer(pointer) else {
        return Ok(());
    };
    // An update that leaves the pod spec as it was (labels, status) is not checked again.
    if a.old.is_some_and(|o| o.pointer(pointer) == Some(spec)) {
        return Ok(());
    }
    // As this member's store has the namespace, from the watch cache: a namespace's
    // labels are read on every pod create, as kube-apiserver reads them from its
    // informer.
    let namespace = objects
        .get_local(resources::builtin("Namespace"), None, ns)
        .await?;
    let labels = namespace
        .as_ref()
        .and_then(|n| n.pointer("/metadata/labels"));
    let [enforce, warn, audit] = levels(labels);
    if is_pod {
        if let Some(level) = enforce {
            let v = violations(spec, level);
            if !v.is_empty() {
                return Err(ApiError::Forbidden {
                    message: format!(
                        "{} {:?} is forbidden: {}",
                        a.res.qualified(),
                        a.name,
                        refusal(level, &v)
                    ),
                });
            }
        }
    }
    let warn_at = if is_pod { warn } else { enforce.max(warn) };
    if let Some(level) = warn_at {
        let v = violations(spec, level);
        if !v.is_empty() {
            a.warn(warning(level, &v));
        }
    }
    if let Some(level) = audit {
        let v = violations(spec, level);
        if !v.is_empty() {
            tracing::info!(namespace = ns, name = a.name, violations = %v.join(", "), "PodSecurity audit");
        }
    }
    Ok(())
}

/// The standards, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    /// The level a namespace label names; an unknown one is the strictest.
    pub fn parse(v: &str) -> Level {
        match v {
            "privileged" => Level::Privileged,
            "baseline" => Level::Baseline,
            _ => Level::Restricted,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        }
    }
}

const LABEL: &str = "pod-security.kubernetes.io/";

/// What a namespace's labels ask for: (enforce, warn, audit).
pub fn levels(namespace_labels: Option<&Value>) -> [Option<Level>; 3] {
    ["enforce", "warn", "audit"].map(|mode| {
        namespace_labels
            .and_then(|l| l.get(format!("{LABEL}{mode}")))
            .and_then(Value::as_str)
            .map(Level::parse)
    })
}

/// Capabilities baseline lets a container add.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

const SELINUX_TYPES: &[&str] = &[
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Every container of a pod spec, init and ephemeral ones included.
fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(move |k| spec.get(k).and_then(Value::as_array).into_iter().flatten())
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "container "a"" or "containers "a", "b"".
fn which(names: &[String]) -> String {
    if names.len() == 1 {
        format!("container {}", quoted(names))
    } else {
        format!("containers {}", quoted(names))
    }
}

/// The names of the containers for which `f` holds.
fn failing(spec: &Value, f: impl Fn(&Value) -> bool) -> Vec<String> {
    containers(spec)
        .filter(|c| f(c))
        .map(|c| s(c, "/name").to_string())
        .collect()
}

/// How a pod spec breaks `level`, in kube's words; empty if it meets it.
pub fn violations(spec: &Value, level: Level) -> Vec<String> {
    let mut out = Vec::new();
    if level == Level::Privileged {
        return out;
    }
    let sc = |c: &Value, field: &str| c.pointer(&format!("/securityContext/{field}")).cloned();
    let pod_sc = |field: &str| spec.pointer(&format!("/securityContext/{field}")).cloned();

    // Baseline.
    let host_process = pod_sc("windowsOptions/hostProcess") == Some(Value::Bool(true))
        || !failing(spec, |c| {
            sc(c, "windowsOptions/hostProcess") == Some(Value::Bool(true))
        })
        .is_empty();
    if host_process {
        out.push("hostProcess (pod or containers must not set securityContext.windowsOptions.hostProcess=true)".into());
    }
    let host_ns: Vec<String> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|k| spec.get(*k) == Some(&Value::Bool(true)))
        .map(|k| format!("{k}=true"))
        .collect();
    if !host_ns.is_empty() {
        out.push(format!("host namespaces ({})", host_ns.join(", ")));
    }
    let privileged = failing(spec, |c| sc(c, "privileged") == Some(Value::Bool(true)));
    if !privileged.is_empty() {
        out.push(format!(
            "privileged ({} must not set securityContext.privileged=true)",
            which(&privileged)
        ));
    }
    let mut added: Vec<String> = Vec::new();
    let extra_caps = failing(spec, |c| {
        strings(
            c.pointer("/securityContext/capabilities/add")
                .cloned()
                .as_ref(),
        )
        .iter()
        .any(|cap| !BASELINE_CAPABILITIES.contains(&cap.as_str()))
    });
    for c in containers(spec) {
        for cap in strings(
            c.pointer("/securityContext/capabilities/add")
                .cloned()
                .as_ref(),
        ) {
            if !BASELINE_CAPABILITIES.contains(&cap.as_str()) && !added.contains(&cap) {
                added.push(cap);
            }
        }
    }
    if !extra_caps.is_empty() {
        out.push(format!(
            "non-default capabilities ({} must not include {} in securityContext.capabilities.add)",
            which(&extra_caps),
            quoted(&added)
        ));
    }
    let host_paths: Vec<String> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("hostPath").is_some())
        .map(|v| s(v, "/name").to_string())
        .collect();
    if !host_paths.is_empty() {
        let noun = if host_paths.len() == 1 {
            "volume"
        } else {
            "volumes"
        };
        out.push(format!("hostPath volumes ({noun} {})", quoted(&host_paths)));
    }
    let mut ports: Vec<String> = Vec::new();
    let with_ports = failing(spec, |c| {
        c.get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|p| p.get("hostPort").and_then(Value::as_i64).unwrap_or(0) != 0)
    });
    for c in containers(spec) {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(hp) = p
                .get("hostPort")
                .and_then(Value::as_i64)
                .filter(|p| *p != 0)
            {
                ports.push(hp.to_string());
            }
        }
    }
    if !with_ports.is_empty() {
        out.push(format!(
            "hostPort ({} uses {} {})",
            which(&with_ports),
            if ports.len() == 1 {
                "hostPort"
            } else {
                "hostPorts"
            },
            ports.join(", ")
        ));
    }
    let unconfined_apparmor = s(spec, "/securityContext/appArmorProfile/type") == "Unconfined"
        || !failing(spec, |c| {
            s(c, "/securityContext/appArmorProfile/type") == "Unconfined"
        })
        .is_empty();
    if unconfined_apparmor {
        out.push("appArmorProfile (pod and containers must not set securityContext.appArmorProfile.type to \"Unconfined\")".into());
    }
    let bad_selinux = |o: &Value| {
        !SELINUX_TYPES.contains(&s(o, "/securityContext/seLinuxOptions/type"))
            || !s(o, "/securityContext/seLinuxOptions/user").is_empty()
            || !s(o, "/securityContext/seLinuxOptions/role").is_empty()
    };
    if bad_selinux(spec) || !failing(spec, bad_selinux).is_empty() {
        out.push("seLinuxOptions (pod and containers must not set securityContext.seLinuxOptions.user or role, and type must be one of container_t, container_init_t, container_kvm_t, container_engine_t)".into());
    }
    let proc_mount = failing(spec, |c| {
        !matches!(s(c, "/securityContext/procMount"), "" | "Default")
    });
    if !proc_mount.is_empty() {
        out.push(format!(
            "procMount ({} must not set securityContext.procMount to \"Unmasked\")",
            which(&proc_mount)
        ));
    }
    let unconfined_seccomp = s(spec, "/securityContext/seccompProfile/type") == "Unconfined"
        || !failing(spec, |c| {
            s(c, "/securityContext/seccompProfile/type") == "Unconfined"
        })
        .is_empty();
    if unconfined_seccomp {
        out.push("seccompProfile (pod and containers must not set securityContext.seccompProfile.type to \"Unconfined\")".into());
    }
    let sysctls: Vec<String> = spec
        .pointer("/securityContext/sysctls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|x| s(x, "/name").to_string())
        .filter(|n| !SAFE_SYSCTLS.contains(&n.as_str()))
        .collect();
    if !sysctls.is_empty() {
        out.push(format!("forbidden sysctls ({})", sysctls.join(", ")));
    }
    if level == Level::Baseline {
        return out;
    }

    // Restricted.
    let mut bad_volumes: Vec<(String, String)> = Vec::new();
    for v in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(kind) = v.as_object().and_then(|m| {
            m.keys()
                .find(|k| *k != "name" && !RESTRICTED_VOLUMES.contains(&k.as_str()))
        }) {
            bad_volumes.push((s(v, "/name").to_string(), kind.clone()));
        }
    }
    if !bad_volumes.is_empty() {
        let names: Vec<String> = bad_volumes.iter().map(|(n, _)| n.clone()).collect();
        let mut kinds: Vec<String> = bad_volumes.iter().map(|(_, k)| k.clone()).collect();
        kinds.dedup();
        let noun = if names.len() == 1 {
            "volume"
        } else {
            "volumes"
        };
        out.push(format!(
            "restricted volume types ({noun} {} {} {})",
            quoted(&names),
            if names.len() == 1 {
                "uses restricted volume type"
            } else {
                "use restricted volume types"
            },
            quoted(&kinds)
        ));
    }
    let escalation = failing(spec, |c| {
        sc(c, "allowPrivilegeEscalation") != Some(Value::Bool(false))
    });
    if !escalation.is_empty() {
        out.push(format!(
            "allowPrivilegeEscalation != false ({} must set securityContext.allowPrivilegeEscalation=false)",
            which(&escalation)
        ));
    }
    let mut caps_bad = Vec::new();
    for c in containers(spec) {
        let drop = strings(
            c.pointer("/securityContext/capabilities/drop")
                .cloned()
                .as_ref(),
        );
        let add = strings(
            c.pointer("/securityContext/capabilities/add")
                .cloned()
                .as_ref(),
        );
        if !drop.iter().any(|d| d == "ALL") || add.iter().any(|a| a != "NET_BIND_SERVICE") {
            caps_bad.push(s(c, "/name").to_string());
        }
    }
    if !caps_bad.is_empty() {
        out.push(format!(
            "unrestricted capabilities ({} must set securityContext.capabilities.drop=[\"ALL\"])",
            which(&caps_bad)
        ));
    }
    let pod_non_root = pod_sc("runAsNonRoot");
    let explicit_root = pod_non_root == Some(Value::Bool(false))
        || !failing(spec, |c| sc(c, "runAsNonRoot") == Some(Value::Bool(false))).is_empty();
    let unset = failing(spec, |c| sc(c, "runAsNonRoot").is_none());
    if explicit_root {
        out.push("runAsNonRoot != true (pod and containers must not set securityContext.runAsNonRoot=false)".into());
    } else if pod_non_root != Some(Value::Bool(true)) && !unset.is_empty() {
        out.push(format!(
            "runAsNonRoot != true (pod or {} must set securityContext.runAsNonRoot=true)",
            which(&unset)
        ));
    }
    let root_uid = pod_sc("runAsUser").and_then(|v| v.as_i64()) == Some(0)
        || !failing(spec, |c| {
            sc(c, "runAsUser").and_then(|v| v.as_i64()) == Some(0)
        })
        .is_empty();
    if root_uid {
        out.push("runAsUser=0 (pod and containers must not set runAsUser=0)".into());
    }
    let confined = |t: &str| matches!(t, "RuntimeDefault" | "Localhost");
    let pod_seccomp = confined(s(spec, "/securityContext/seccompProfile/type"));
    let unset = failing(spec, |c| {
        let t = s(c, "/securityContext/seccompProfile/type");
        if t.is_empty() {
            !pod_seccomp
        } else {
            !confined(t)
        }
    });
    if !unset.is_empty() && !unconfined_seccomp {
        out.push(format!(
            "seccompProfile (pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            which(&unset)
        ));
    }
    out
}

/// The message of a pod refused at `level`.
pub fn refusal(level: Level, violations: &[String]) -> String {
    format!(
        "violates PodSecurity \"{}:latest\": {}",
        level.name(),
        violations.join(", ")
    )
}

/// The warning of a pod or template that breaks `level`.
pub fn warning(level: Level, violations: &[String]) -> String {
    format!(
        "would violate PodSecurity \"{}:latest\": {}",
        level.name(),
        violations.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_plain_wasm_pod_is_baseline_but_not_restricted() {
        let spec = json!({"containers": [{"name": "app", "image": "registry.local/app:1"}]});
        assert!(violations(&spec, Level::Baseline).is_empty());
        let v = violations(&spec, Level::Restricted);
        assert_eq!(
            v,
            [
                "allowPrivilegeEscalation != false (container \"app\" must set securityContext.allowPrivilegeEscalation=false)",
                "unrestricted capabilities (container \"app\" must set securityContext.capabilities.drop=[\"ALL\"])",
                "runAsNonRoot != true (pod or container \"app\" must set securityContext.runAsNonRoot=true)",
                "seccompProfile (pod or container \"app\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")",
            ]
        );
    }

    #[test]
    fn a_restricted_pod_meets_every_level() {
        let spec = json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
            "containers": [{"name": "app", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]
        });
        for level in [Level::Privileged, Level::Baseline, Level::Restricted] {
            assert!(violations(&spec, level).is_empty(), "{level:?}");
        }
    }

    #[test]
    fn what_reaches_the_node_breaks_baseline() {
        let spec = json!({
            "hostNetwork": true,
            "volumes": [{"name": "h", "hostPath": {"path": "/etc"}}],
            "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}],
                            "securityContext": {"privileged": true, "capabilities": {"add": ["SYS_ADMIN"]}}}]
        });
        let v = violations(&spec, Level::Baseline);
        assert_eq!(
            v,
            [
                "host namespaces (hostNetwork=true)",
                "privileged (container \"c\" must not set securityContext.privileged=true)",
                "non-default capabilities (container \"c\" must not include \"SYS_ADMIN\" in securityContext.capabilities.add)",
                "hostPath volumes (volume \"h\")",
                "hostPort (container \"c\" uses hostPort 8080)",
            ]
        );
        assert!(violations(&spec, Level::Privileged).is_empty());
        assert_eq!(
            refusal(Level::Baseline, &v[..1]),
            "violates PodSecurity \"baseline:latest\": host namespaces (hostNetwork=true)"
        );
    }

    #[test]
    fn namespace_labels_choose_the_levels() {
        let labels = json!({"pod-security.kubernetes.io/enforce": "baseline",
                            "pod-security.kubernetes.io/warn": "bogus"});
        assert_eq!(
            levels(Some(&labels)),
            [Some(Level::Baseline), Some(Level::Restricted), None]
        );
        assert_eq!(levels(None), [None, None, None]);
    }
}
