//! `POST pods/{name}/eviction`: a deletion that asks the pod's PodDisruptionBudget
//! first, as kube-apiserver's eviction subresource does (what `kubectl drain` calls).
//!
//! A pod that is finished, not yet scheduled or already being deleted goes at once. A
//! running one goes only if the one budget selecting it allows a disruption: the
//! budget's `disruptionsAllowed` is taken down by one and the pod is recorded under
//! `disruptedPods`, in a compare-and-swap on the budget, before the pod is deleted, so
//! two evictions racing for the last allowed disruption cannot both win. The disruption
//! controller recomputes the budget from the pods it sees. A refusal is 429, which
//! `kubectl drain` retries.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::resources;
use crate::rest::{self, Request};
use crate::selectors::LabelSelector;
use crate::table::s;

/// Whether a budget may be asked about this pod at all: a pod that is not running
/// disrupts nothing by going.
fn disrupts(pod: &Value) -> bool {
    let phase = s(pod, "/status/phase");
    let scheduled = !s(pod, "/spec/nodeName").is_empty();
    !matches!(phase, "Succeeded" | "Failed")
        && scheduled
        && pod.pointer("/metadata/deletionTimestamp").is_none()
}

fn refused(message: String) -> ApiError {
    ApiError::TooManyRequests { message }
}

/// Takes one disruption from the budget selecting `pod`, if there is one.
async fn take_disruption(objects: &Objects, ns: &str, pod: &Value) -> ApiResult<()> {
    let pdbs = resources::builtin("PodDisruptionBudget");
    let name = s(pod, "/metadata/name").to_string();
    loop {
        let page = objects
            .list(pdbs, Some(ns), ReadAt::Latest, 0, None, |b| {
                b.pointer("/spec/selector")
                    .is_some_and(|sel| LabelSelector::from_object(sel).matches(pod))
            })
            .await?;
        let budget = match page.items.as_slice() {
            [] => return Ok(()),
            [one] => one.clone(),
            _ => {
                return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ))
            }
        };
        let bname = s(&budget, "/metadata/name").to_string();
        let generation = budget
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let observed = budget
            .pointer("/status/observedGeneration")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if observed < generation {
            return Err(refused(format!(
                "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {bname} is still being processed by the server."
            )));
        }
        let allowed = budget
            .pointer("/status/disruptionsAllowed")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if allowed <= 0 {
            let desired = budget
                .pointer("/status/desiredHealthy")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let current = budget
                .pointer("/status/currentHealthy")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            return Err(refused(format!(
                "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {bname} needs {desired} healthy pods and has {current} currently"
            )));
        }
        let mut next = budget.clone();
        next["status"]["disruptionsAllowed"] = json!(allowed - 1);
        if !next["status"]["disruptedPods"].is_object() {
            next["status"]["disruptedPods"] = json!({});
        }
        next["status"]["disruptedPods"][&name] = json!(rest::now());
        let rev = crate::objects::rv_of(&budget).unwrap_or(0);
        match objects.replace(pdbs, Some(ns), &bname, next, rev).await {
            Ok(_) => return Ok(()),
            // Another eviction took a disruption meanwhile: ask again.
            Err(ApiError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Handles `POST pods/{name}/eviction`.
pub(crate) async fn evict(objects: &Objects, req: &Request) -> ApiResult<Response> {
    let name = req.target.name.as_deref().unwrap_or_default();
    let ns = req.target.ns.as_deref().unwrap_or("default");
    let (body, _) = crate::validation::parse_json_checked(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the Eviction: {e}")))?;
    if let Some(n) = body.pointer("/metadata/name").and_then(Value::as_str) {
        if n != name {
            return Err(ApiError::bad_request(format!(
                "name in URL does not match name in Eviction object ({n} vs {name})"
            )));
        }
    }
    let opts = rest::delete_options_from(req, body.get("deleteOptions"))?;
    let (pod, _) = objects.get_or_404(&req.target.res, Some(ns), name).await?;
    if disrupts(&pod) && !req.dry_run() {
        take_disruption(objects, ns, &pod).await?;
    }
    rest::delete_one(objects, req, name, &opts).await?;
    Ok(rest::json_response(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        &[],
    ))
}
