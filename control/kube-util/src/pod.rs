//! Questions about pods that every controller asks, answered one way.

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::chrono::SubsecRound;

use crate::quantity;

/// The current time as an API timestamp, in whole seconds. A `Time` is written and
/// stored with seconds only, so one kept with a fraction would differ from itself read
/// back, and whoever compares what it computed with what it reads (a node's pod status,
/// a controller's conditions) would write again a status that changed nothing.
pub fn now() -> Time {
    Time(chrono::Utc::now().trunc_subsecs(0))
}

/// The current time as a `MicroTime` (a Lease's renewal), which the API keeps to the
/// microsecond, cut there for the same reason as [`now`].
pub fn now_micro() -> MicroTime {
    MicroTime(chrono::Utc::now().trunc_subsecs(6))
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    condition(pod, "Ready").is_some_and(|c| c.status == "True")
}

/// A condition of the pod's status, by type.
pub fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The pod's phase, `Pending` if it has none yet.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Succeeded or Failed: the pod will not run again.
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Counts toward its owner's replicas: not terminal and not being deleted.
pub fn is_active(pod: &Pod) -> bool {
    !is_terminal(pod) && pod.metadata.deletion_timestamp.is_none()
}

/// The owner reference marked as controller, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
}

/// What a pod asks for: (CPU millicores, memory bytes), the sum over its containers or
/// the largest init container, whichever is more, as the scheduler counts it.
pub fn requests(pod: &Pod) -> (u64, u64) {
    let Some(spec) = &pod.spec else {
        return (0, 0);
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| {
        let r = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let l = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        // A limit without a request is also the request, as Kubernetes defaults it; so
        // the scheduler places the pod by what the node will charge it.
        let get = |k: &str, f: fn(&str) -> Result<u64, quantity::QuantityError>| {
            r.and_then(|r| r.get(k))
                .or_else(|| l.and_then(|l| l.get(k)))
                .and_then(|q| f(&q.0).ok())
                .unwrap_or(0)
        };
        (
            get("cpu", quantity::millicores),
            get("memory", quantity::whole),
        )
    };
    let (mut cpu, mut mem) = spec
        .containers
        .iter()
        .map(of)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    for init in spec.init_containers.iter().flatten() {
        let (c, m) = of(init);
        cpu = cpu.max(c);
        mem = mem.max(m);
    }
    (cpu, mem)
}

/// Sets a condition, keeping its transition time when the status does not change.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<PodCondition>,
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
) -> bool {
    let status = if status { "True" } else { "False" };
    let reason = reason.map(str::to_string);
    let message = message.map(str::to_string);
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status == status && c.reason == reason && c.message == message {
            return false;
        }
        if c.status != status {
            c.last_transition_time = Some(now());
        }
        c.status = status.into();
        c.reason = reason;
        c.message = message;
        return true;
    }
    conditions.push(PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason,
        message,
        last_transition_time: Some(now()),
        ..Default::default()
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_read_back_from_the_api_unchanged() {
        let t = now();
        let back: Time = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let m = now_micro();
        let back: MicroTime = serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn requests_and_state() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {"name": "a", "image": "x", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                    {"name": "b", "image": "x", "resources": {"requests": {"cpu": "50m"}}}
                ],
                "initContainers": [
                    {"name": "i", "image": "x", "resources": {"requests": {"memory": "1Gi"}}}
                ]
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(requests(&pod), (150, 1 << 30));
        assert!(is_ready(&pod) && is_active(&pod) && !is_terminal(&pod));
        let mut conds = Vec::new();
        assert!(set_condition(&mut conds, "Ready", true, None, None));
        assert!(!set_condition(&mut conds, "Ready", true, None, None));
        assert!(set_condition(&mut conds, "Ready", false, Some("X"), None));
    }
}
