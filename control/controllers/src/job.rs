//! The Job controller: runs pods until enough succeed, within a failure budget and a time
//! limit, then cleans up after `ttlSecondsAfterFinished`.
//!
//! ## Expected flow
//! - Up to `parallelism` pods run at once, never more than the completions still missing
//!   (a Job without `completions` is done when one pod succeeds and none is running).
//! - Failed pods count against `backoffLimit` (for `restartPolicy: OnFailure`, container
//!   restarts count too); a failed pod is replaced after a backoff of 10 s, doubling up to
//!   6 minutes, as kube-controller-manager does.
//! - The Job ends `Complete` (with `SuccessCriteriaMet`) or `Failed` (with
//!   `FailureTarget`, reason `BackoffLimitExceeded` or `DeadlineExceeded` after
//!   `activeDeadlineSeconds`); a failed Job's running pods are deleted.
//! - A finished Job is deleted `ttlSecondsAfterFinished` after it finished; its pods go
//!   with it through the garbage collector.
//! - A suspended Job deletes its running pods and starts none.

use std::sync::Arc;
use std::time::Duration;

use baton_kube::events::EventType;
use baton_kube::pod;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::replicaset::{generate_name, pod_from_template};
use crate::Ctx;

/// Why a Job could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for job {job}")]
pub struct Error {
    job: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

fn seconds_since(t: &Time) -> i64 {
    (pod::now().0 - t.0).num_seconds()
}

fn condition_true(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

pub async fn reconcile(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let err = |action: &'static str| {
        let job = format!("{ns}/{name}");
        move |source| Error {
            job,
            action,
            source,
        }
    };
    if job.metadata.deletion_timestamp.is_some() {
        ctx.expectations.forget(&uid);
        return Ok(Action::await_change());
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let spec = job.spec.clone().unwrap_or_default();
    let status = job.status.clone().unwrap_or_default();

    // Finished: only the TTL is left to honour.
    let finished_at = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .and_then(|c| c.last_transition_time.clone());
    if let Some(at) = finished_at {
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            let left = ttl as i64 - seconds_since(&at);
            if left <= 0 {
                match jobs.delete(&name, &DeleteParams::background()).await {
                    Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                    Err(e) => return Err(err("deleting after its TTL")(e)),
                }
                return Ok(Action::await_change());
            }
            return Ok(Action::requeue(Duration::from_secs(left as u64)));
        }
        return Ok(Action::await_change());
    }

    let owned = crate::owned_pods(&ctx, &ns, &uid);
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| pod::is_active(p)).collect();
    let succeeded = owned
        .iter()
        .filter(|p| pod::phase(p) == "Succeeded")
        .count() as i32;
    let failed_pods = owned.iter().filter(|p| pod::phase(p) == "Failed").count() as i32;
    let restarts: i32 = if spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure")
    {
        owned
            .iter()
            .flat_map(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
            })
            .map(|c| c.restart_count)
            .sum()
    } else {
        0
    };
    let failed = failed_pods + restarts;
    let ready = active.iter().filter(|p| pod::is_ready(p)).count() as i32;
    let start_time = status.start_time.clone().unwrap_or_else(pod::now);
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let suspended = spec.suspend == Some(true);

    let mut conditions = status.conditions.clone().unwrap_or_default();
    let mut set = |type_: &str, reason: &str, message: &str| {
        conditions.retain(|c| c.type_ != type_);
        conditions.push(
            serde_json::from_value(json!({
                "type": type_, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": pod::now(), "lastTransitionTime": pod::now(),
            }))
            .expect("a valid JobCondition"),
        );
    };
    let deadline_passed = spec
        .active_deadline_seconds
        .is_some_and(|d| seconds_since(&start_time) >= d);
    let complete = match completions {
        Some(c) => succeeded >= c,
        None => succeeded >= 1 && active.is_empty(),
    };
    let mut outcome: Option<(&str, &str, String)> = None;
    if complete {
        set(
            "SuccessCriteriaMet",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        );
        set(
            "Complete",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        );
        outcome = Some(("Normal", "Completed", "Job completed".into()));
    } else if failed > backoff_limit {
        let msg = "Job has reached the specified backoff limit";
        set("FailureTarget", "BackoffLimitExceeded", msg);
        set("Failed", "BackoffLimitExceeded", msg);
        outcome = Some(("Warning", "BackoffLimitExceeded", msg.into()));
    } else if deadline_passed && !suspended {
        let msg = "Job was active longer than specified deadline";
        set("FailureTarget", "DeadlineExceeded", msg);
        set("Failed", "DeadlineExceeded", msg);
        outcome = Some(("Warning", "DeadlineExceeded", msg.into()));
    }

    let present = owned.iter().map(|p| {
        (
            p.metadata.name.as_deref().unwrap_or(""),
            p.metadata.uid.as_deref().unwrap_or(""),
        )
    });
    let satisfied = ctx.expectations.satisfied(&uid, present);
    let mut requeue: Option<Duration> = (!satisfied).then_some(Duration::from_secs(1));
    let mut to_delete: Vec<&Arc<Pod>> = Vec::new();
    if outcome.as_ref().is_some_and(|o| o.0 == "Warning") || suspended {
        to_delete = active.clone();
    } else if outcome.is_none() && satisfied {
        let remaining = match completions {
            Some(c) => (c - succeeded).max(0),
            None if succeeded > 0 => 0,
            None => parallelism,
        };
        let want = parallelism.min(remaining) as usize;
        if active.len() < want {
            // A failed pod is replaced after a backoff, doubling from 10 s.
            let last_failure = owned
                .iter()
                .filter(|p| pod::phase(p) == "Failed")
                .filter_map(|p| {
                    p.status
                        .as_ref()?
                        .container_statuses
                        .iter()
                        .flatten()
                        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.clone())
                        .max_by_key(|t| t.0)
                })
                .max_by_key(|t| t.0);
            let wait = if failed_pods > 0 {
                let backoff = 10i64 << (failed_pods - 1).min(5);
                last_failure.map_or(0, |t| (backoff.min(360) - seconds_since(&t)).max(0))
            } else {
                0
            };
            if wait > 0 {
                requeue = Some(Duration::from_secs(wait as u64));
            } else {
                for _ in active.len()..want {
                    let pod_name = generate_name(&name);
                    ctx.expectations.expect_create(&uid, &pod_name);
                    if let Err(e) = pods_api
                        .create(
                            &PostParams::default(),
                            &pod_from_template(job.as_ref(), spec.template.clone(), &pod_name),
                        )
                        .await
                    {
                        ctx.expectations.creation_failed(&uid, &pod_name);
                        return Err(err("creating a pod")(e));
                    }
                    ctx.recorder.publish(
                        &job.object_ref(&()),
                        EventType::Normal,
                        "SuccessfulCreate",
                        &format!("Created pod: {pod_name}"),
                    );
                }
            }
        } else if active.len() > want {
            to_delete = active[want..].to_vec();
        }
    }
    for p in to_delete {
        ctx.expectations
            .expect_delete(&uid, p.metadata.uid.as_deref().unwrap_or(""));
        match pods_api
            .delete(&p.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
            Err(e) => return Err(err("deleting a pod")(e)),
        }
    }
    if suspended && !condition_true(&job, "Suspended") {
        set("Suspended", "JobSuspended", "Job suspended");
    }
    let mut new_status = json!({
        "active": active.len(),
        "ready": ready,
        "succeeded": succeeded,
        "failed": failed_pods,
        "startTime": start_time,
        "conditions": conditions,
    });
    if complete {
        new_status["completionTime"] = json!(pod::now());
    }
    let current = serde_json::to_value(&status).unwrap_or_default();
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_i64()).unwrap_or(0);
    let changed = ["active", "ready", "succeeded", "failed"]
        .iter()
        .any(|k| num(&current, k) != num(&new_status, k))
        || current.get("startTime").is_none()
        || outcome.is_some()
        || (suspended && !condition_true(&job, "Suspended"));
    if changed {
        jobs.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": new_status})),
        )
        .await
        .map_err(err("updating its status"))?;
        if let Some((type_, reason, message)) = outcome {
            let t = if type_ == "Normal" {
                EventType::Normal
            } else {
                EventType::Warning
            };
            ctx.recorder
                .publish(&job.object_ref(&()), t, reason, &message);
        }
    }
    if let Some(d) = spec.active_deadline_seconds {
        let left = d - seconds_since(&start_time);
        if left > 0 {
            requeue = Some(requeue.map_or(Duration::from_secs(left as u64), |r| {
                r.min(Duration::from_secs(left as u64))
            }));
        }
    }
    Ok(match requeue {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::World;

    const PODS: &str = "/api/v1/namespaces/default/pods";
    const JOB: &str = "/apis/batch/v1/namespaces/default/jobs/work";

    fn job(spec: serde_json::Value, status: serde_json::Value) -> serde_json::Value {
        let mut spec = spec;
        spec["template"] = json!({"spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "c", "image": "i"}]}});
        json!({"metadata": {"name": "work", "namespace": "default", "uid": "job-uid"},
               "spec": spec, "status": status})
    }

    /// A pod of the Job; `finished` is how many seconds ago it ended, for a finished one.
    fn pod(name: &str, phase: &str, finished: Option<i64>) -> serde_json::Value {
        let at = finished.map(|s| pod::now().0 - chrono_secs(s));
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("{name}-uid"),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "work",
                                     "uid": "job-uid", "controller": true}]},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": match at {
                    Some(t) => json!({"terminated": {"exitCode": 1, "finishedAt": Time(t)}}),
                    None => json!({"running": {}}),
                }}]}
        })
    }

    /// Whether the reconciler asked to look again after `secs`, or a little less: times
    /// are kept to the second, and a slow machine may take a second or two between
    /// writing the objects and reconciling.
    fn requeued_within(action: &Action, secs: u64) -> bool {
        (secs.saturating_sub(3)..=secs).any(|s| *action == Action::requeue(Duration::from_secs(s)))
    }

    fn chrono_secs(s: i64) -> k8s_openapi::chrono::Duration {
        k8s_openapi::chrono::Duration::seconds(s)
    }

    fn status_patch(w: &World) -> serde_json::Value {
        w.api
            .calls()
            .into_iter()
            .find(|c| c.method == "PATCH" && c.path == format!("{JOB}/status"))
            .expect("a status update")
            .body["status"]
            .clone()
    }

    #[tokio::test]
    async fn a_job_runs_up_to_parallelism_pods_and_no_more_until_they_are_seen() {
        let mut w = World::new();
        let j = w.job(job(json!({"completions": 5, "parallelism": 2}), json!({})));
        reconcile(j.clone(), w.ctx.clone()).await.unwrap();
        assert_eq!(
            w.api.writes(),
            [
                format!("POST {PODS}"),
                format!("POST {PODS}"),
                format!("PATCH {JOB}/status")
            ]
        );
        let created = &w.api.calls()[0].body;
        assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "job-uid");
        assert_eq!(
            created["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        assert!(status_patch(&w)["startTime"].is_string());
        // The new pods are not in the store yet: a second pass must not create more.
        w.api.clear();
        let action = reconcile(j, w.ctx.clone()).await.unwrap();
        assert!(
            !w.api.writes().iter().any(|c| c.starts_with("POST")),
            "{:?}",
            w.api.writes()
        );
        assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn a_failed_pod_is_replaced_only_after_its_backoff() {
        let mut w = World::new();
        let j = w.job(job(json!({"completions": 1}), json!({})));
        w.pod(pod("work-a", "Failed", Some(4)));
        let action = reconcile(j.clone(), w.ctx.clone()).await.unwrap();
        assert!(!w.api.writes().iter().any(|c| c.starts_with("POST")));
        assert!(requeued_within(&action, 6), "{action:?}");
        assert_eq!(status_patch(&w)["failed"], 1);
        // Two failures: 20 s from the last one (4 s ago), not from the first (12 s ago).
        w.pod(pod("work-b", "Failed", Some(12)));
        let action = reconcile(j.clone(), w.ctx.clone()).await.unwrap();
        assert!(requeued_within(&action, 16), "{action:?}");
        // Once the backoff has passed, a replacement starts.
        let mut w = World::new();
        let j = w.job(job(json!({"completions": 1}), json!({})));
        w.pod(pod("work-a", "Failed", Some(11)));
        reconcile(j, w.ctx.clone()).await.unwrap();
        assert_eq!(w.api.writes()[0], format!("POST {PODS}"));
    }

    #[tokio::test]
    async fn past_its_backoff_limit_a_job_fails_and_its_running_pods_go() {
        let mut w = World::new();
        let j = w.job(job(json!({"completions": 3, "backoffLimit": 1}), json!({})));
        w.pod(pod("work-a", "Failed", Some(100)));
        w.pod(pod("work-b", "Failed", Some(50)));
        w.pod(pod("work-c", "Running", None));
        reconcile(j, w.ctx.clone()).await.unwrap();
        assert_eq!(
            w.api.writes(),
            [
                format!("DELETE {PODS}/work-c"),
                format!("PATCH {JOB}/status")
            ]
        );
        let status = status_patch(&w);
        let failed = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Failed")
            .expect("a Failed condition");
        assert_eq!(failed["reason"], "BackoffLimitExceeded");
        assert_eq!(w.events().await, ["Warning BackoffLimitExceeded"]);
    }

    #[tokio::test]
    async fn enough_successes_complete_the_job() {
        let mut w = World::new();
        let j = w.job(job(json!({"completions": 2, "parallelism": 2}), json!({})));
        w.pod(pod("work-a", "Succeeded", Some(3)));
        w.pod(pod("work-b", "Succeeded", Some(2)));
        reconcile(j, w.ctx.clone()).await.unwrap();
        assert_eq!(w.api.writes(), [format!("PATCH {JOB}/status")]);
        let status = status_patch(&w);
        assert_eq!(status["succeeded"], 2);
        assert!(status["completionTime"].is_string());
        let types: Vec<_> = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(types, ["SuccessCriteriaMet", "Complete"]);
        assert_eq!(w.events().await, ["Normal Completed"]);
    }

    #[tokio::test]
    async fn a_finished_job_is_deleted_once_its_ttl_has_passed() {
        let finished = |ago: i64| {
            json!({"conditions": [{"type": "Complete", "status": "True",
                   "lastTransitionTime": Time(pod::now().0 - chrono_secs(ago))}]})
        };
        let mut w = World::new();
        let j = w.job(job(json!({"ttlSecondsAfterFinished": 100}), finished(40)));
        let action = reconcile(j, w.ctx.clone()).await.unwrap();
        assert!(w.api.calls().is_empty());
        assert!(requeued_within(&action, 60), "{action:?}");
        let j = w.job(job(json!({"ttlSecondsAfterFinished": 100}), finished(100)));
        reconcile(j, w.ctx.clone()).await.unwrap();
        assert_eq!(w.api.writes(), [format!("DELETE {JOB}")]);
        assert!(w.api.calls()[0].body["propagationPolicy"] == "Background");
    }

    #[tokio::test]
    async fn a_suspended_job_stops_its_pods_and_says_so() {
        let mut w = World::new();
        let j = w.job(job(json!({"completions": 2, "suspend": true}), json!({})));
        w.pod(pod("work-a", "Running", None));
        reconcile(j, w.ctx.clone()).await.unwrap();
        assert_eq!(
            w.api.writes(),
            [
                format!("DELETE {PODS}/work-a"),
                format!("PATCH {JOB}/status")
            ]
        );
        let status = status_patch(&w);
        assert!(status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Suspended" && c["reason"] == "JobSuspended"));
    }

    #[tokio::test]
    async fn a_failed_pod_creation_is_an_error_and_is_not_expected() {
        let mut w = World::new();
        w.api.fail("POST", "/pods", 500);
        let j = w.job(job(json!({"completions": 1}), json!({})));
        let err = reconcile(j.clone(), w.ctx.clone()).await.unwrap_err();
        assert_eq!(err.to_string(), "creating a pod for job default/work");
        // The creation is not awaited: the retry creates the pod again.
        assert!(w.ctx.expectations.satisfied("job-uid", std::iter::empty()));
    }
}
