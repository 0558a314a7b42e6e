//! The HorizontalPodAutoscaler controller (autoscaling/v2): every sync period, each
//! autoscaler reads its target's scale, the CPU and memory its pods use (from
//! `metrics.k8s.io`, which the API server answers from the nodes' own readings), asks
//! [`replicas`] what each metric wants, lets [`behavior`] and the bounds temper the
//! largest, and sets the target's scale subresource.
//!
//! ## Expected flow
//! 1. The target is found by `scaleTargetRef` through discovery and its `scale`
//!    subresource; its pods are those of its label selector in the pod store.
//! 2. Per `Resource` metric (CPU or memory; utilization of requests or an average
//!    value): a proposal. With no metrics listed, CPU at 80% of requests.
//! 3. The highest proposal, stabilized and rate-limited ([`behavior`]), within
//!    `minReplicas` (default 1) and `maxReplicas`, is written to the scale, with a
//!    `SuccessfulRescale` event saying why.
//! 4. The status shows the current and desired counts, each metric's current value, the
//!    last scale time, and the conditions `kubectl describe hpa` prints: `AbleToScale`,
//!    `ScalingActive` and `ScalingLimited`, with Kubernetes' reasons. A target that does
//!    not exist, a pod without a request, or no metrics at all are told there and in
//!    Warning events, and nothing is scaled.
//!
//! A target scaled to zero by hand disables the autoscaler (`ScalingDisabled`) unless its
//! `minReplicas` is 0 (HPAScaleToZero).
//!
//! ## Scale to zero
//! With `minReplicas: 0`, a `Pods` metric of the requests a function answers
//! (`http_requests_per_second`, from `custom.metrics.k8s.io`) proposes zero replicas
//! once no request came in a whole sampling window. The scale-down stabilization window
//! (`behavior.scaleDown.stabilizationWindowSeconds`, 300 s by default) is the idle window:
//! only when every proposal within it was zero does the target go to zero. From zero the
//! autoscaler waits; the nodes wake the target on its next request (the node's
//! `activator`).

pub mod behavior;
pub mod replicas;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use k8s_openapi::api::autoscaling::v2::{
    HorizontalPodAutoscaler, HorizontalPodAutoscalerCondition, MetricSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::{json, Value};

use crate::Ctx;
use replicas::{Requests, Sample, Target};

/// Why an autoscaler's run failed in a way that is retried (its status could not be
/// written). Everything else is told in its status and events.
#[derive(Debug, thiserror::Error)]
#[error("writing the status of autoscaler {hpa}")]
pub struct Error {
    hpa: String,
    #[source]
    source: kube::Error,
}

/// One metric's outcome, for the status and the event.
struct Measured {
    proposal: replicas::Proposal,
    /// `{"type": "Resource", "resource": {...}}` as `status.currentMetrics` holds it.
    current: Value,
    /// How the event names it: "cpu resource utilization (percentage of request)".
    description: String,
}

/// A metric that could not be computed: the condition reason and message.
struct Failure {
    reason: &'static str,
    message: String,
}

fn condition(
    old: &[HorizontalPodAutoscalerCondition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &Time,
) -> Value {
    let status = if ok { "True" } else { "False" };
    // The transition time moves only when the status does.
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": since})
}

/// A pod's request of `resource` in milli-units, or the container that has none.
fn request_of(pod: &Pod, resource: &str) -> Result<i64, String> {
    let mut sum = 0i64;
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let q = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(resource));
        let Some(q) = q else {
            return Err(c.name.clone());
        };
        sum += milli(resource, &q.0).unwrap_or(0);
    }
    Ok(sum)
}

/// A quantity in milli-units: millicores for CPU, thousandths of a byte for memory.
fn milli(resource: &str, q: &str) -> Option<i64> {
    if resource == "cpu" {
        baton_kube::quantity::millicores(q).ok().map(|m| m as i64)
    } else {
        custom_milli(q)
    }
}

fn quantity_of(resource: &str, milli: i64) -> String {
    if resource == "cpu" {
        format!("{milli}m")
    } else {
        format!("{}", milli / 1000)
    }
}

/// The pods' readings of `resource` from `metrics.k8s.io`, by pod name.
async fn resource_samples(
    ctx: &Ctx,
    ns: &str,
    selector: &str,
    resource: &str,
) -> Result<BTreeMap<String, Sample>, kube::Error> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics"),
        "pods",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let list = api.list(&ListParams::default().labels(selector)).await?;
    let mut out = BTreeMap::new();
    for item in list.items {
        let usage: i64 = item.data["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["usage"][resource].as_str())
            .filter_map(|q| milli(resource, q))
            .sum();
        let timestamp = item.data["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .unwrap_or_else(Utc::now);
        let window = item.data["window"]
            .as_str()
            .and_then(parse_window)
            .unwrap_or(Duration::from_secs(15));
        out.insert(
            item.name_any(),
            Sample {
                milli: usage,
                timestamp,
                window,
            },
        );
    }
    Ok(out)
}

/// A metrics API window: `5s`, or `5000ms` as Baton's API server writes it.
fn parse_window(w: &str) -> Option<Duration> {
    if let Some(ms) = w.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .map(|m| Duration::from_secs_f64(m / 1000.0));
    }
    w.strip_suffix('s')?
        .parse::<f64>()
        .ok()
        .map(Duration::from_secs_f64)
}

/// The pods' readings of custom metric `metric` from `custom.metrics.k8s.io`, by pod
/// name, in thousandths.
async fn pods_samples(
    ctx: &Ctx,
    ns: &str,
    selector: &str,
    metric: &str,
) -> Result<BTreeMap<String, Sample>, kube::Error> {
    let path = format!(
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/{metric}?labelSelector={}",
        baton_kube::client::url_escape(selector)
    );
    let req = http::Request::get(path)
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let list: Value = ctx.client.request(req).await?;
    let mut out = BTreeMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (
            item.pointer("/describedObject/name")
                .and_then(Value::as_str),
            item["value"].as_str().and_then(custom_milli),
        ) else {
            continue;
        };
        let timestamp = item["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .unwrap_or_else(Utc::now);
        let window = item["windowSeconds"]
            .as_u64()
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(15));
        out.insert(
            name.to_string(),
            Sample {
                milli: value,
                timestamp,
                window,
            },
        );
    }
    Ok(out)
}

/// A quantity in thousandths: a custom metric's, or memory's in milli-bytes.
fn custom_milli(q: &str) -> Option<i64> {
    baton_kube::quantity::nanos(q)
        .ok()
        .map(|n| i64::try_from(n / 1_000_000).unwrap_or(i64::MAX))
}

/// A `Pods` metric's proposal: its average per pod against the target's average value.
async fn measure_pods(
    ctx: &Ctx,
    ns: &str,
    selector: &str,
    pods: &[&Pod],
    current: i32,
    metric: &MetricSpec,
    now: DateTime<Utc>,
) -> Result<Measured, Failure> {
    let invalid = |why: &str| Failure {
        reason: "InvalidMetricSourceType",
        message: format!("the HPA was unable to compute the replica count: {why}"),
    };
    let source = metric
        .pods
        .as_ref()
        .ok_or_else(|| invalid("a Pods metric without its source"))?;
    let name = source.metric.name.as_str();
    if source.metric.selector.is_some() {
        return Err(invalid(&format!(
            "metric {name}: a metric selector is not supported by the pods' custom metrics"
        )));
    }
    let target = match (&source.target.type_[..], &source.target.average_value) {
        ("AverageValue", Some(v)) => {
            Target::AverageValue(custom_milli(&v.0).ok_or_else(|| invalid("invalid averageValue"))?)
        }
        _ => {
            return Err(invalid(&format!(
                "metric {name}: a Pods metric's target is an AverageValue"
            )))
        }
    };
    let failed = |e: String| Failure {
        reason: "FailedGetPodsMetric",
        message: format!(
            "the HPA was unable to compute the replica count: unable to get metric {name}: {e}"
        ),
    };
    let samples = pods_samples(ctx, ns, selector, name)
        .await
        .map_err(|e| failed(baton_kube::error::chain(&e)))?;
    let proposal = replicas::replicas(
        current,
        pods,
        &samples,
        &Requests::new(),
        &target,
        false,
        now,
    )
    .map_err(|e| failed(e.to_string()))?;
    let average = baton_kube::quantity::from_milli(proposal.average_milli);
    Ok(Measured {
        proposal,
        current: json!({"type": "Pods", "pods": {"metric": {"name": name}, "current": {"averageValue": average}}}),
        description: format!("pods metric {name}"),
    })
}

/// One metric's proposal.
async fn measure(
    ctx: &Ctx,
    ns: &str,
    selector: &str,
    pods: &[&Pod],
    current: i32,
    metric: &MetricSpec,
    now: DateTime<Utc>,
) -> Result<Measured, Failure> {
    if metric.type_ == "Pods" {
        return measure_pods(ctx, ns, selector, pods, current, metric, now).await;
    }
    let Some(source) = metric
        .resource
        .as_ref()
        .filter(|_| metric.type_ == "Resource")
    else {
        return Err(Failure {
            reason: "InvalidMetricSourceType",
            message: format!(
                "the HPA was unable to compute the replica count: metrics of type {} are not served by this cluster",
                metric.type_
            ),
        });
    };
    let resource = source.name.as_str();
    let target = match (
        &source.target.average_utilization,
        &source.target.average_value,
    ) {
        (Some(u), _) if source.target.type_ == "Utilization" => Target::Utilization(*u),
        (_, Some(v)) if source.target.type_ == "AverageValue" => {
            Target::AverageValue(milli(resource, &v.0).unwrap_or(0))
        }
        _ => {
            return Err(Failure {
                reason: "InvalidMetricSourceType",
                message: format!(
                    "the HPA was unable to compute the replica count: invalid target of {resource}"
                ),
            })
        }
    };
    let mut requests = Requests::new();
    if matches!(target, Target::Utilization(_)) {
        for p in pods {
            let name = p.name_any();
            match request_of(p, resource) {
                Ok(r) => {
                    requests.insert(name, r);
                }
                Err(container) => {
                    return Err(Failure {
                        reason: "FailedGetResourceMetric",
                        message: format!(
                            "the HPA was unable to compute the replica count: failed to get {resource} utilization: missing request for {resource} in container {container} of Pod {name}"
                        ),
                    })
                }
            }
        }
    }
    let samples = resource_samples(ctx, ns, selector, resource)
        .await
        .map_err(|e| Failure {
            reason: "FailedGetResourceMetric",
            message: format!(
                "the HPA was unable to compute the replica count: failed to get {resource} usage: unable to get metrics for resource {resource}: {e}"
            ),
        })?;
    let proposal = replicas::replicas(
        current,
        pods,
        &samples,
        &requests,
        &target,
        resource == "cpu",
        now,
    )
    .map_err(|e| Failure {
        reason: "FailedGetResourceMetric",
        message: format!(
            "the HPA was unable to compute the replica count: failed to get {resource} utilization: {e}"
        ),
    })?;
    let (current_value, description) = match target {
        Target::Utilization(_) => (
            json!({"averageUtilization": proposal.utilization.unwrap_or(0),
                   "averageValue": quantity_of(resource, proposal.average_milli)}),
            format!("{resource} resource utilization (percentage of request)"),
        ),
        Target::AverageValue(_) => (
            json!({"averageValue": quantity_of(resource, proposal.average_milli)}),
            format!("{resource} resource"),
        ),
    };
    Ok(Measured {
        proposal,
        current: json!({"type": "Resource", "resource": {"name": resource, "current": current_value}}),
        description,
    })
}

/// The default metric: CPU at 80% of requests.
fn default_metrics() -> Vec<MetricSpec> {
    vec![
        serde_json::from_value(json!({"type": "Resource", "resource": {"name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 80}}}))
        .expect("a valid metric"),
    ]
}

pub async fn reconcile(hpa: Arc<HorizontalPodAutoscaler>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    forget_missing(&ctx);
    if hpa.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = hpa.namespace().unwrap_or_default();
    let name = hpa.name_any();
    let key = format!("{ns}/{name}");
    // History by uid: an autoscaler made again under the same name starts afresh.
    let uid = hpa.metadata.uid.clone().unwrap_or_else(|| key.clone());
    let now = Utc::now();
    let now_t = Time(now);
    let spec = hpa.spec.clone().unwrap_or_default();
    let status = hpa.status.clone().unwrap_or_default();
    let old_conditions = status.conditions.clone().unwrap_or_default();
    let cond = |t: &str, ok: bool, reason: &str, msg: &str| {
        condition(&old_conditions, t, ok, reason, msg, &now_t)
    };
    let obj_ref = hpa.object_ref(&());
    let sync = Action::requeue(ctx.hpa_sync);
    let hpa_api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &ns);
    let write = |new_status: Value| {
        let hpa_api = hpa_api.clone();
        let name = name.clone();
        let key = key.clone();
        async move {
            let patch = json!({"status": new_status});
            match hpa_api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {
                    Ok(())
                }
                Err(source) => Err(Error { hpa: key, source }),
            }
        }
    };
    let target = &spec.scale_target_ref;
    let (group, version) = match target.api_version.as_deref().unwrap_or("").split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            target.api_version.clone().unwrap_or_default(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, &target.kind);
    // The target and its scale; without them nothing can be done.
    let scale = async {
        let (ar, _) = kube::discovery::pinned_kind(&ctx.client, &gvk).await?;
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
        let scale = api.get_scale(&target.name).await?;
        Ok::<_, kube::Error>((api, scale))
    }
    .await;
    let (api, scale) = match scale {
        Ok(s) => s,
        Err(e) => {
            let msg = format!(
                "the HPA controller was unable to get the target's current scale: {}",
                baton_kube::error::chain(&e)
            );
            ctx.recorder
                .publish(&obj_ref, EventType::Warning, "FailedGetScale", &msg);
            write(json!({
                "currentReplicas": status.current_replicas,
                "desiredReplicas": status.desired_replicas,
                "conditions": [cond("AbleToScale", false, "FailedGetScale", &msg)],
            }))
            .await?;
            return Ok(sync);
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas;
    if current == 0 && min > 0 {
        write(json!({
            "currentReplicas": 0,
            "desiredReplicas": 0,
            "conditions": [
                cond("AbleToScale", true, "SucceededGetScale", "the HPA controller was able to get the target's current scale"),
                cond("ScalingActive", false, "ScalingDisabled", "scaling is disabled since the replica count of the target is zero"),
            ],
        }))
        .await?;
        return Ok(sync);
    }
    if current == 0 {
        // Scaled to zero (HPAScaleToZero): no pod has a figure to scale up on. The first
        // request to one of its Services or Ingresses wakes it (the nodes hold it and ask
        // for one replica), and the autoscaler takes over from there.
        write(json!({
            "currentReplicas": 0,
            "desiredReplicas": 0,
            "currentMetrics": [],
            "lastScaleTime": status.last_scale_time,
            "conditions": [
                cond("AbleToScale", true, "SucceededGetScale", "the HPA controller was able to get the target's current scale"),
                cond("ScalingActive", false, "ScaledToZero", "the target is scaled to zero: its first request through a Service or an Ingress scales it up"),
                cond("ScalingLimited", false, "DesiredWithinRange", "the desired count is within the acceptable range"),
            ],
        }))
        .await?;
        return Ok(sync);
    }
    let selector_string = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    // The target's pods by the selector its scale reports, as the API server parses it:
    // any kind with a scale subresource, whatever its spec looks like.
    let listed = if selector_string.is_empty() {
        Err(Failure {
            reason: "InvalidSelector",
            message: "the HPA target's scale is missing a selector".into(),
        })
    } else {
        Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default().labels(&selector_string))
            .await
            .map_err(|e| Failure {
                reason: "FailedGetPods",
                message: format!(
                    "the HPA was unable to list the target's pods: {}",
                    baton_kube::error::chain(&e)
                ),
            })
    };
    let metrics = spec
        .metrics
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(default_metrics);
    let mut measured = Vec::new();
    let mut failures = Vec::new();
    match listed {
        Ok(list) => {
            let pods: Vec<&Pod> = list.items.iter().collect();
            for m in &metrics {
                match measure(&ctx, &ns, &selector_string, &pods, current, m, now).await {
                    Ok(x) => measured.push(x),
                    Err(f) => failures.push(f),
                }
            }
        }
        Err(f) => failures.push(f),
    }
    let mut best = measured
        .iter()
        .max_by_key(|m| m.proposal.replicas)
        .map(|m| (m.proposal.replicas, m.description.clone()));
    // A metric that could not be read might have asked for more: no scale-down then.
    if let Some((proposed, _)) = best.as_mut() {
        if !failures.is_empty() && *proposed < current {
            *proposed = current;
        }
    }
    // Without any reading the count still goes back within the bounds.
    if best.is_none() && (current > max || current < min) {
        let why = if current > max {
            "the current replica count above maxReplicas"
        } else {
            "the current replica count below minReplicas"
        };
        best = Some((current, why.to_string()));
    }
    let Some((proposed, why)) = best else {
        // No metric could say anything: keep the count, tell why.
        let f = failures.first().expect("a metric failed");
        ctx.recorder
            .publish(&obj_ref, EventType::Warning, f.reason, &f.message);
        write(json!({
            "currentReplicas": current,
            "desiredReplicas": current,
            "conditions": [
                cond("AbleToScale", true, "SucceededGetScale", "the HPA controller was able to get the target's current scale"),
                cond("ScalingActive", false, f.reason, &f.message),
            ],
        }))
        .await?;
        return Ok(sync);
    };
    for f in &failures {
        ctx.recorder
            .publish(&obj_ref, EventType::Warning, f.reason, &f.message);
    }
    let decision = {
        let mut histories = ctx.hpa_history.lock().unwrap_or_else(|e| e.into_inner());
        let h = histories.entry(uid.clone()).or_default();
        behavior::normalize(proposed, current, min, max, spec.behavior.as_ref(), h, now)
    };
    let desired = decision.replicas;
    let mut last_scale = status.last_scale_time.clone();
    let mut able = cond(
        "AbleToScale",
        true,
        "ReadyForNewScale",
        "recommended size matches current size",
    );
    if desired != current {
        let patch = json!({"spec": {"replicas": desired}});
        match api
            .patch_scale(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                let reason = if desired > current {
                    format!("{why} above target")
                } else {
                    "All metrics below target".to_string()
                };
                ctx.recorder.publish(
                    &obj_ref,
                    EventType::Normal,
                    "SuccessfulRescale",
                    &format!("New size: {desired}; reason: {reason}"),
                );
                ctx.hpa_history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(uid.clone())
                    .or_default()
                    .scaled(now, desired - current);
                last_scale = Some(now_t.clone());
                able = cond(
                    "AbleToScale",
                    true,
                    "SucceededRescale",
                    &format!("the HPA controller was able to update the target scale to {desired}"),
                );
            }
            Err(e) => {
                let msg = format!(
                    "the HPA controller was unable to update the target scale: {}",
                    baton_kube::error::chain(&e)
                );
                ctx.recorder
                    .publish(&obj_ref, EventType::Warning, "FailedRescale", &msg);
                able = cond("AbleToScale", false, "FailedUpdateScale", &msg);
            }
        }
    }
    let active = match failures.first() {
        Some(f) if measured.is_empty() => cond("ScalingActive", false, f.reason, &f.message),
        _ => cond(
            "ScalingActive",
            true,
            "ValidMetricFound",
            &format!("the HPA was able to successfully calculate a replica count from {why}"),
        ),
    };
    let limited = match &decision.limited {
        Some((reason, msg)) => cond("ScalingLimited", true, reason, msg),
        None => cond(
            "ScalingLimited",
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range",
        ),
    };
    let current_metrics: Vec<&Value> = measured.iter().map(|m| &m.current).collect();
    write(json!({
        "observedGeneration": hpa.metadata.generation,
        "currentReplicas": current,
        "desiredReplicas": desired,
        "currentMetrics": current_metrics,
        "lastScaleTime": last_scale,
        "conditions": [able, active, limited],
    }))
    .await?;
    Ok(sync)
}

/// Forgets the history of autoscalers that are gone.
fn forget_missing(ctx: &Ctx) {
    let live: std::collections::HashSet<String> = ctx
        .hpas
        .state()
        .iter()
        .filter_map(|h| h.metadata.uid.clone())
        .collect();
    ctx.hpa_history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|k, _| live.contains(k));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_quantities_read_as_the_metrics_apis_write_them() {
        assert_eq!(parse_window("5000ms"), Some(Duration::from_secs(5)));
        assert_eq!(parse_window("15s"), Some(Duration::from_secs(15)));
        assert_eq!(parse_window("soon"), None);
        assert_eq!(custom_milli("2500m"), Some(2500));
        assert_eq!(custom_milli("3"), Some(3000));
        assert_eq!(baton_kube::quantity::from_milli(3000), "3");
        assert_eq!(baton_kube::quantity::from_milli(2500), "2500m");
        assert_eq!(
            baton_kube::client::url_escape("app=fn,tier in (a)"),
            "app%3Dfn%2Ctier%20in%20%28a%29"
        );
    }
}
