//! The Deployment controller: a ReplicaSet per pod template, rolled from old to new.
//!
//! ## Expected flow
//! 1. The template's hash names the new ReplicaSet (`NAME-HASH`, label
//!    `pod-template-hash`). If no owned ReplicaSet has it, one is created with revision
//!    `max(old revisions) + 1`; if an old one has it (a rollback), it becomes the new one
//!    and takes the next revision. `kubectl rollout undo` and `rollout history` read
//!    these `deployment.kubernetes.io/revision` annotations.
//! 2. **RollingUpdate** scales the new ReplicaSet up within `replicas + maxSurge`, and the
//!    old ones down while at least `replicas - maxUnavailable` pods stay available: the
//!    arithmetic of kube-controller-manager's `rolling.go`, including cleaning up
//!    unhealthy old replicas first. **Recreate** scales old ones to zero, waits until their
//!    pods are gone, then scales the new one up.
//! 3. Old ReplicaSets with no pods beyond `revisionHistoryLimit` are deleted.
//! 4. The status carries the replica counts, `observedGeneration`, and the `Available`
//!    and `Progressing` conditions (`NewReplicaSetAvailable`, `ReplicaSetUpdated`,
//!    `ProgressDeadlineExceeded`, `DeploymentPaused`), which `kubectl rollout status` reads.
//!
//! A paused Deployment is only scaled: no new ReplicaSet is made while it is paused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use baton_kube::pod;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, ReplicaSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Ctx;

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
pub const HASH_LABEL: &str = "pod-template-hash";

/// Why a Deployment could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} for deployment {deployment}")]
    Api {
        deployment: String,
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no namespace or UID")]
    Incomplete(String),
}

/// FNV-1a over the template's JSON, encoded in the alphabet of generated names, as
/// `pod-template-hash` is: the same template always gives the same ReplicaSet.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let mut h: u32 = 0x811c9dc5;
    for b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    const ALPHABET: &[u8] = b"bcdf5ghjklmn6pqrst7vwxz24689";
    let mut out = String::new();
    let mut v = h as u64;
    loop {
        out.push(ALPHABET[(v % ALPHABET.len() as u64) as usize] as char);
        v /= ALPHABET.len() as u64;
        if v == 0 {
            break;
        }
    }
    out
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

/// An `intstr` of maxSurge/maxUnavailable against `total`, rounding up or down.
fn resolve(v: Option<&IntOrString>, default_pct: i32, total: i32, round_up: bool) -> i32 {
    match v {
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => {
            let pct: i32 = s.trim_end_matches('%').parse().unwrap_or(default_pct);
            let x = total as i64 * pct as i64;
            (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
        }
        None => {
            let x = total as i64 * default_pct as i64;
            (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
        }
    }
}

/// (maxSurge, maxUnavailable) for `desired` replicas; never both zero.
pub fn surge_and_unavailable(d: &Deployment, desired: i32) -> (i32, i32) {
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), 25, desired, true).max(0);
    let mut unavailable = resolve(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        25,
        desired,
        false,
    )
    .max(0);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable.min(desired))
}

/// The scale changes one pass of a rolling update makes: (new replicas, old replicas by
/// name), following kube-controller-manager's `rolling.go`.
pub fn rolling_step(
    desired: i32,
    surge: i32,
    max_unavailable: i32,
    new: (i32, i32),
    olds: &[(String, i32, i32)],
) -> (i32, BTreeMap<String, i32>) {
    let (new_replicas, new_available) = new;
    let old_total: i32 = olds.iter().map(|o| o.1).sum();
    let mut new_target = new_replicas;
    if old_total == 0 {
        new_target = desired;
    } else if new_replicas < desired {
        let room = desired + surge - (new_replicas + old_total);
        if room > 0 {
            new_target = desired.min(new_replicas + room);
        }
    }
    let mut old_targets: BTreeMap<String, i32> = olds.iter().map(|o| (o.0.clone(), o.1)).collect();
    let min_available = desired - max_unavailable;
    let all_pods = new_replicas + old_total;
    let new_unavailable = (new_replicas - new_available).max(0);
    let max_scaled_down = all_pods - min_available - new_unavailable;
    if old_total > 0 && max_scaled_down > 0 {
        // Unhealthy old replicas go first: removing them costs no availability.
        let mut cleaned = 0;
        for (name, replicas, avail) in olds {
            if cleaned >= max_scaled_down {
                break;
            }
            let unhealthy = (replicas - avail).max(0);
            let cut = unhealthy.min(max_scaled_down - cleaned);
            if cut > 0 {
                *old_targets.entry(name.clone()).or_default() -= cut;
                cleaned += cut;
            }
        }
        // Then healthy ones, while enough stay available.
        let available_all: i32 =
            new_available + olds.iter().map(|o| o.2.min(old_targets[&o.0])).sum::<i32>();
        let mut budget = (available_all - min_available).min(max_scaled_down - cleaned);
        for (name, _, _) in olds {
            if budget <= 0 {
                break;
            }
            let t = old_targets.get_mut(name).expect("every old is listed");
            let cut = (*t).min(budget);
            *t -= cut;
            budget -= cut;
        }
    }
    (new_target, old_targets)
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    previous: Option<&DeploymentCondition>,
    progressed: bool,
) -> DeploymentCondition {
    let now = pod::now();
    let status = if status { "True" } else { "False" }.to_string();
    let same_status = previous.is_some_and(|p| p.status == status);
    let same = same_status && previous.is_some_and(|p| p.reason.as_deref() == Some(reason));
    DeploymentCondition {
        type_: type_.into(),
        last_transition_time: if same_status {
            previous.and_then(|p| p.last_transition_time.clone())
        } else {
            Some(now.clone())
        },
        last_update_time: if same && !progressed {
            previous.and_then(|p| p.last_update_time.clone())
        } else {
            Some(now)
        },
        status,
        reason: Some(reason.into()),
        message: Some(message),
    }
}

pub async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (Some(ns), Some(uid)) = (d.namespace(), d.uid()) else {
        return Err(Error::Incomplete(d.name_any()));
    };
    let name = d.name_any();
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let api_err = |action: &'static str| {
        let deployment = format!("{ns}/{name}");
        move |source| Error::Api {
            deployment,
            action,
            source,
        }
    };
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0);
    let (surge, max_unavailable) = surge_and_unavailable(&d, desired);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let paused = spec.paused == Some(true);
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let mut owned: Vec<Arc<ReplicaSet>> = ctx
        .replicasets_by_controller
        .owned(&ctx.replicasets, &ns, &uid)
        .into_iter()
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .collect();
    owned.sort_by_key(|rs| (revision(rs), rs.metadata.creation_timestamp.clone()));
    let hash = template_hash(&spec.template);
    let is_new = |rs: &ReplicaSet| rs.labels().get(HASH_LABEL) == Some(&hash);
    let max_old_revision = owned
        .iter()
        .filter(|rs| !is_new(rs))
        .map(|rs| revision(rs))
        .max()
        .unwrap_or(0);
    let mut progressed = false;
    let mut new_rs: Option<Arc<ReplicaSet>> = owned.iter().find(|rs| is_new(rs)).cloned();
    let olds: Vec<Arc<ReplicaSet>> = owned.iter().filter(|rs| !is_new(rs)).cloned().collect();
    let change_cause = d.annotations().get(CHANGE_CAUSE).cloned();

    if new_rs.is_none() && !paused {
        let rs_name = format!("{name}-{hash}");
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let old_total: i32 = olds.iter().map(|rs| spec_replicas(rs)).sum();
        let initial = if old_total == 0 {
            desired
        } else if recreate {
            0
        } else {
            (desired + surge - old_total).clamp(0, desired)
        };
        let mut annotations = BTreeMap::from([
            (REVISION.to_string(), (max_old_revision + 1).to_string()),
            (DESIRED.to_string(), desired.to_string()),
            (MAX_REPLICAS.to_string(), (desired + surge).to_string()),
        ]);
        if let Some(c) = &change_cause {
            annotations.insert(CHANGE_CAUSE.into(), c.clone());
        }
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {
                "name": rs_name,
                "namespace": ns,
                "labels": meta.labels,
                "annotations": annotations,
                "ownerReferences": [d.controller_owner_ref(&())],
            },
            "spec": {
                "replicas": initial,
                "minReadySeconds": spec.min_ready_seconds,
                "selector": selector,
                "template": template,
            }
        }))
        .map_err(|e| Error::Incomplete(format!("{name}: {e}")))?;
        match rs_api.create(&PostParams::default(), &rs).await {
            Ok(created) => {
                ctx.recorder.publish(
                    &d.object_ref(&()),
                    EventType::Normal,
                    "ScalingReplicaSet",
                    &format!("Scaled up replica set {rs_name} from 0 to {initial}"),
                );
                new_rs = Some(Arc::new(created));
                progressed = true;
            }
            // The store has not shown it yet; the next pass will.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(200)))
            }
            Err(e) => return Err(api_err("creating its ReplicaSet")(e)),
        }
    } else if let Some(rs) = &new_rs {
        // A rollback makes an old template new again: it takes the next revision.
        if revision(rs) <= max_old_revision && !paused {
            let mut ann = json!({REVISION: (max_old_revision + 1).to_string()});
            if let Some(c) = &change_cause {
                ann[CHANGE_CAUSE] = json!(c);
            }
            rs_api
                .patch(
                    &rs.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": ann}})),
                )
                .await
                .map_err(api_err("updating the revision"))?;
            progressed = true;
        }
    }

    // Scale.
    let mut scales: BTreeMap<String, (i32, i32)> = BTreeMap::new();
    if let Some(new) = &new_rs {
        let new_now = spec_replicas(new);
        if paused || recreate {
            let old_active = olds.iter().any(|rs| spec_replicas(rs) > 0);
            if recreate && !paused {
                for rs in &olds {
                    if spec_replicas(rs) > 0 {
                        scales.insert(rs.name_any(), (spec_replicas(rs), 0));
                    }
                }
                let old_uids: Vec<String> = olds.iter().filter_map(|rs| rs.uid()).collect();
                let old_pods_left = ctx.pods.state().iter().any(|p| {
                    pod::controller_of(&p.metadata).is_some_and(|o| old_uids.contains(&o.uid))
                        && !pod::is_terminal(p)
                });
                if !old_active && !old_pods_left && new_now != desired {
                    scales.insert(new.name_any(), (new_now, desired));
                }
            } else if !old_active && new_now != desired {
                scales.insert(new.name_any(), (new_now, desired));
            }
        } else {
            let old_view: Vec<(String, i32, i32)> = olds
                .iter()
                .map(|rs| {
                    (
                        rs.name_any(),
                        spec_replicas(rs),
                        available(rs).min(spec_replicas(rs)),
                    )
                })
                .collect();
            let (new_target, old_targets) = rolling_step(
                desired,
                surge,
                max_unavailable,
                (new_now, available(new).min(new_now)),
                &old_view,
            );
            if new_target != new_now {
                scales.insert(new.name_any(), (new_now, new_target));
            }
            for (n, now, _) in &old_view {
                if old_targets[n] != *now {
                    scales.insert(n.clone(), (*now, old_targets[n]));
                }
            }
        }
    }
    for (rs_name, (from, to)) in &scales {
        let patch = json!({
            "metadata": {"annotations": {DESIRED: desired.to_string(), MAX_REPLICAS: (desired + surge).to_string()}},
            "spec": {"replicas": to}
        });
        rs_api
            .patch(rs_name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(api_err("scaling a ReplicaSet"))?;
        let verb = if to > from { "up" } else { "down" };
        ctx.recorder.publish(
            &d.object_ref(&()),
            EventType::Normal,
            "ScalingReplicaSet",
            &format!("Scaled {verb} replica set {rs_name} from {from} to {to}"),
        );
        progressed = true;
    }

    // Old ReplicaSets beyond the history limit, oldest first.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let empty: Vec<&Arc<ReplicaSet>> = olds
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && rs.status.as_ref().is_none_or(|s| s.replicas == 0))
        .filter(|rs| !scales.contains_key(&rs.name_any()))
        .collect();
    if empty.len() > limit {
        for rs in &empty[..empty.len() - limit] {
            match rs_api
                .delete(&rs.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                Err(e) => return Err(api_err("deleting an old ReplicaSet")(e)),
            }
        }
    }

    // Status.
    let all: Vec<&Arc<ReplicaSet>> = new_rs.iter().chain(olds.iter()).collect();
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| all.iter().map(|rs| f(rs)).sum::<i32>();
    let replicas = sum(&|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
    let ready = sum(&|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let avail = sum(&|rs| available(rs));
    let updated = new_rs
        .as_ref()
        .and_then(|rs| rs.status.as_ref())
        .map_or(0, |s| s.replicas);
    let new_name = new_rs.as_ref().map(|rs| rs.name_any()).unwrap_or_default();
    let old_conditions = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let prev = |t: &str| old_conditions.iter().find(|c| c.type_ == t);
    let available_ok = avail >= desired - max_unavailable;
    let available_cond = condition(
        "Available",
        available_ok,
        if available_ok {
            "MinimumReplicasAvailable"
        } else {
            "MinimumReplicasUnavailable"
        },
        if available_ok {
            "Deployment has minimum availability.".into()
        } else {
            "Deployment does not have minimum availability.".into()
        },
        prev("Available"),
        false,
    );
    let new_current = new_rs.as_ref().is_some_and(|rs| {
        rs.status.as_ref().and_then(|s| s.observed_generation) >= rs.metadata.generation
    });
    let complete = new_current
        && updated == desired
        && replicas == desired
        && avail == desired
        && olds.iter().all(|rs| spec_replicas(rs) == 0);
    let deadline = spec.progress_deadline_seconds.unwrap_or(600).max(0) as i64;
    let prev_progress = prev("Progressing");
    let mut requeue: Option<Duration> = None;
    let progressing_cond = if paused {
        condition(
            "Progressing",
            false,
            "DeploymentPaused",
            "Deployment is paused".into(),
            prev_progress,
            false,
        )
    } else if complete {
        condition(
            "Progressing",
            true,
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            prev_progress,
            false,
        )
    } else if progressed
        || prev_progress.is_none_or(|c| {
            c.reason.as_deref() == Some("DeploymentPaused")
                || c.reason.as_deref() == Some("NewReplicaSetAvailable")
        })
    {
        requeue = Some(Duration::from_secs(deadline as u64));
        condition(
            "Progressing",
            true,
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
            prev_progress,
            true,
        )
    } else {
        let last = prev_progress
            .and_then(|c| c.last_update_time.as_ref())
            .map(|t| (pod::now().0 - t.0).num_seconds())
            .unwrap_or(0);
        if prev_progress.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            || last > deadline
        {
            condition(
                "Progressing",
                false,
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                prev_progress,
                false,
            )
        } else {
            requeue = Some(Duration::from_secs((deadline - last).max(1) as u64));
            prev_progress.cloned().unwrap_or_else(|| {
                condition(
                    "Progressing",
                    true,
                    "ReplicaSetUpdated",
                    format!("ReplicaSet \"{new_name}\" is progressing."),
                    None,
                    true,
                )
            })
        }
    };
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": avail,
        "unavailableReplicas": (desired - avail).max(0),
        "conditions": [available_cond, progressing_cond],
    });
    let current = serde_json::to_value(&d.status).unwrap_or_default();
    let differs = [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
    ]
    .iter()
    .any(|k| {
        current.get(k).cloned().unwrap_or(json!(0)) != status.get(k).cloned().unwrap_or(json!(0))
    }) || strip_times(current.get("conditions"))
        != strip_times(status.get("conditions"));
    let d_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if differs {
        match d_api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
            Err(e) => return Err(api_err("updating its status")(e)),
        }
    }
    let rev = new_rs
        .as_ref()
        .map(|rs| revision(rs).max(max_old_revision + 1).to_string());
    if let Some(rev) = rev {
        if d.annotations().get(REVISION) != Some(&rev) {
            d_api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {REVISION: rev}}})),
                )
                .await
                .map_err(api_err("recording its revision"))?;
        }
    }
    Ok(match requeue {
        Some(d) if !complete => Action::requeue(d),
        _ => Action::await_change(),
    })
}

/// Conditions without their timestamps, to tell a real change from a clock tick.
fn strip_times(v: Option<&serde_json::Value>) -> serde_json::Value {
    let mut v = v.cloned().unwrap_or(json!([]));
    if let Some(list) = v.as_array_mut() {
        for c in list {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastUpdateTime");
                o.remove("lastTransitionTime");
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_ignore_the_hash_label() {
        let mut t: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "a.wasm"}]}
        }))
        .unwrap();
        let h = template_hash(&t);
        assert_eq!(h, template_hash(&t.clone()));
        t.metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(HASH_LABEL.into(), h.clone());
        assert_eq!(h, template_hash(&t));
        t.spec.as_mut().unwrap().containers[0].image = Some("b.wasm".into());
        assert_ne!(h, template_hash(&t));
    }

    #[test]
    fn rolling_arithmetic() {
        // 3 replicas, surge 1, unavailable 0: one new pod first, no old one down yet.
        let (n, o) = rolling_step(3, 1, 0, (0, 0), &[("old".into(), 3, 3)]);
        assert_eq!((n, o["old"]), (1, 3));
        // The new pod is available: one old pod may go.
        let (n, o) = rolling_step(3, 1, 0, (1, 1), &[("old".into(), 3, 3)]);
        assert_eq!((n, o["old"]), (1, 2));
        // An unavailable new pod holds the old ones back.
        let (_, o) = rolling_step(3, 1, 0, (1, 0), &[("old".into(), 3, 1)]);
        assert_eq!(o["old"], 3);
        // Unhealthy old pods go first, costing no availability.
        let (_, o) = rolling_step(3, 1, 0, (1, 1), &[("old".into(), 3, 1)]);
        assert_eq!(o["old"], 2);
        // Done: all on the new one.
        let (n, o) = rolling_step(3, 1, 0, (3, 3), &[("old".into(), 0, 0)]);
        assert_eq!((n, o["old"]), (3, 0));
        // Scaling with no rollout under way.
        assert_eq!(rolling_step(5, 1, 0, (3, 3), &[]).0, 5);
    }

    #[test]
    fn surge_defaults() {
        let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "d"}, "spec": {
            "selector": {}, "template": {},
            "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}}))
        .unwrap();
        assert_eq!(surge_and_unavailable(&d, 3), (0, 1));
        let d: Deployment = serde_json::from_value(
            json!({"metadata": {"name": "d"}, "spec": {"selector": {}, "template": {}}}),
        )
        .unwrap();
        assert_eq!(surge_and_unavailable(&d, 4), (1, 1));
    }
}
