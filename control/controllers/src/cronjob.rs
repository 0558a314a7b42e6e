//! The CronJob controller: makes a Job at each time of its schedule.
//!
//! ## Expected flow
//! - The schedule is cron syntax (five fields or `@hourly`…), read in `spec.timeZone`
//!   (UTC when unset), on the controller manager's [`Clock`](crate::clock::Clock).
//! - At each reconcile the most recent scheduled time not yet run (after
//!   `status.lastScheduleTime`, or the CronJob's creation) is started, unless it is older
//!   than `startingDeadlineSeconds`; times missed before it are skipped, as
//!   kube-controller-manager skips them. Then the reconcile is requeued for the next time.
//! - A Job is named `<cronjob>-<scheduled minute since the epoch>`, so a time is started at
//!   most once, even by two controller managers.
//! - `concurrencyPolicy`: `Allow` starts regardless; `Forbid` skips a time while a Job
//!   runs; `Replace` deletes the running Jobs first.
//! - Finished Jobs beyond `successfulJobsHistoryLimit` (3) and `failedJobsHistoryLimit`
//!   (1) are deleted, oldest first, their pods with them.
//! - `suspend` stops new Jobs; running ones go on.
//! - Status: `active` (the running Jobs), `lastScheduleTime`, `lastSuccessfulTime`.

use std::sync::Arc;
use std::time::Duration;

use baton_kube::cron::Schedule;
use baton_kube::events::EventType;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Ctx;

/// Why a CronJob could not be reconciled (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{action} for cronjob {cronjob}")]
pub struct Error {
    cronjob: String,
    action: &'static str,
    #[source]
    source: kube::Error,
}

/// The annotation a Job carries with the time it was scheduled for.
pub const SCHEDULED_AT: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

/// How many missed times are counted before the controller says it missed too many.
const MISSED_LIMIT: usize = 100;

fn finished(job: &Job) -> Option<&'static str> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    conds
        .iter()
        .filter(|c| c.status == "True")
        .find_map(|c| match c.type_.as_str() {
            "Complete" => Some("Complete"),
            "Failed" => Some("Failed"),
            _ => None,
        })
}

/// The name of the Job for one scheduled time: the same time gives the same name.
pub fn job_name(cronjob: &str, scheduled: DateTime<Utc>) -> String {
    format!("{cronjob}-{}", scheduled.timestamp().div_euclid(60))
}

fn job_ref(job: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: job.metadata.name.clone(),
        namespace: job.metadata.namespace.clone(),
        uid: job.metadata.uid.clone(),
        resource_version: job.metadata.resource_version.clone(),
        ..Default::default()
    }
}

/// The Job a CronJob starts for `scheduled`.
fn job_for(cj: &CronJob, scheduled: DateTime<Utc>, zone: &str) -> Job {
    let template = cj
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let mut annotations = tmeta.annotations.unwrap_or_default();
    annotations.insert(SCHEDULED_AT.into(), zone.to_string());
    let owner = cj.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(true);
        o
    });
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&cj.name_any(), scheduled)),
            namespace: cj.namespace(),
            labels: tmeta.labels,
            annotations: Some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(template.spec.unwrap_or_default()),
        status: None,
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Deletes one of the CronJob's Jobs (its pods with it), and says so in an event.
async fn delete_job(
    ctx: &Ctx,
    cj: &CronJob,
    jobs: &Api<Job>,
    name: &str,
) -> Result<(), kube::Error> {
    if crate::delete_if_present(jobs, name, &DeleteParams::background()).await? {
        ctx.recorder.publish(
            &cj.object_ref(&()),
            EventType::Normal,
            "SuccessfulDelete",
            &format!("Deleted job {name}"),
        );
    }
    Ok(())
}

pub async fn reconcile(cj: Arc<CronJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = cj.namespace().unwrap_or_default();
    let name = cj.name_any();
    let uid = cj.uid().unwrap_or_default();
    let err = |action: &'static str| {
        let cronjob = format!("{ns}/{name}");
        move |source| Error {
            cronjob,
            action,
            source,
        }
    };
    if cj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = cj.spec.clone().unwrap_or_default();
    let status = cj.status.clone().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.clock.now();

    let mut owned: Vec<Arc<Job>> = ctx
        .jobs
        .state()
        .into_iter()
        .filter(|j| {
            j.namespace().as_deref() == Some(ns.as_str())
                && baton_kube::pod::controller_of(&j.metadata).is_some_and(|o| o.uid == uid)
        })
        .collect();
    owned.sort_by_key(|j| j.metadata.creation_timestamp.clone().map(|t| t.0));
    let mut active: Vec<ObjectReference> = owned
        .iter()
        .filter(|j| finished(j).is_none() && j.metadata.deletion_timestamp.is_none())
        .map(|j| job_ref(j))
        .collect();
    // Jobs the status still lists as active that have finished: told once, when the
    // status that drops them is written.
    let saw: Vec<(String, &'static str)> = status
        .active
        .iter()
        .flatten()
        .filter_map(|r| {
            let j = owned
                .iter()
                .find(|j| r.name.as_deref() == j.metadata.name.as_deref())?;
            finished(j).map(|outcome| (j.name_any(), outcome))
        })
        .collect();
    let last_success = owned
        .iter()
        .filter(|j| finished(j) == Some("Complete"))
        .filter_map(|j| j.status.as_ref()?.completion_time.clone())
        .map(|t| t.0)
        .max();

    // History: the oldest finished Jobs beyond each limit go.
    for (outcome, limit) in [
        ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
        ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let done: Vec<&Arc<Job>> = owned
            .iter()
            .filter(|j| finished(j) == Some(outcome) && j.metadata.deletion_timestamp.is_none())
            .collect();
        let extra = done.len().saturating_sub(limit.max(0) as usize);
        for j in done.into_iter().take(extra) {
            delete_job(&ctx, &cj, &jobs_api, &j.name_any())
                .await
                .map_err(err("deleting an old job"))?;
        }
    }

    let mut last_schedule = status.last_schedule_time.clone().map(|t| t.0);
    let mut requeue = None;
    match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
        Err(e) => {
            ctx.recorder.publish(
                &cj.object_ref(&()),
                EventType::Warning,
                "UnparseableSchedule",
                &format!("unparseable schedule {:?}: {e}", spec.schedule),
            );
        }
        Ok(schedule) => {
            requeue = schedule.next_after(now);
            let created = cj.metadata.creation_timestamp.clone().map(|t| t.0);
            let mut earliest = last_schedule.or(created).unwrap_or(now);
            if let Some(deadline) = spec.starting_deadline_seconds {
                earliest = earliest.max(now - k8s_openapi::chrono::Duration::seconds(deadline));
            }
            let due = schedule.latest_at_or_before(now).filter(|t| *t > earliest);
            if let Some(scheduled) = due {
                if schedule.count_between(earliest, now, MISSED_LIMIT + 1) > MISSED_LIMIT {
                    ctx.recorder
                        .publish(
                            &cj.object_ref(&()),
                            EventType::Warning,
                            "TooManyMissedTimes",
                            "too many missed start times; set or decrease .spec.startingDeadlineSeconds or check clock skew",
                        );
                }
                let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
                let start = if spec.suspend == Some(true) {
                    false
                } else if !active.is_empty() && policy == "Forbid" {
                    tracing::debug!(cronjob = %name, "a job still runs; this time is skipped");
                    false
                } else {
                    if policy == "Replace" {
                        for a in std::mem::take(&mut active) {
                            let job = a.name.clone().unwrap_or_default();
                            delete_job(&ctx, &cj, &jobs_api, &job)
                                .await
                                .map_err(err("replacing a running job"))?;
                        }
                    }
                    true
                };
                if start {
                    let zone_time = schedule.in_zone(scheduled);
                    let job = job_for(&cj, scheduled, &zone_time);
                    match jobs_api.create(&PostParams::default(), &job).await {
                        Ok(made) => {
                            ctx.recorder.publish(
                                &cj.object_ref(&()),
                                EventType::Normal,
                                "SuccessfulCreate",
                                &format!("Created job {}", made.name_any()),
                            );
                            active.push(job_ref(&made));
                        }
                        // Made before (by this or another manager): the time is taken.
                        Err(kube::Error::Api(e)) if e.code == 409 => {}
                        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 422 => {
                            ctx.recorder.publish(
                                &cj.object_ref(&()),
                                EventType::Warning,
                                "FailedCreate",
                                &format!("Error creating job: {}", e.message),
                            );
                        }
                        Err(e) => return Err(err("creating a job")(e)),
                    }
                }
                // A skipped time counts as handled, so it is not tried again.
                if spec.suspend != Some(true) {
                    last_schedule = Some(scheduled);
                }
            }
        }
    }

    let new_status = json!({
        "active": if active.is_empty() { serde_json::Value::Null } else { json!(active) },
        "lastScheduleTime": last_schedule.map(rfc3339),
        "lastSuccessfulTime": last_success.map(rfc3339),
    });
    let old_status = json!({
        "active": status.active.as_ref().filter(|a| !a.is_empty()).map(|a| {
            a.iter().map(|r| json!(r)).collect::<Vec<_>>()
        }),
        "lastScheduleTime": status.last_schedule_time.as_ref().map(|t: &Time| rfc3339(t.0)),
        "lastSuccessfulTime": status.last_successful_time.as_ref().map(|t: &Time| rfc3339(t.0)),
    });
    if new_status != old_status {
        match cronjobs
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": new_status })),
            )
            .await
        {
            Ok(_) => {
                for (job, outcome) in saw {
                    ctx.recorder.publish(
                        &cj.object_ref(&()),
                        EventType::Normal,
                        "SawCompletedJob",
                        &format!("Saw completed job: {job}, condition: {outcome}"),
                    );
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Action::await_change()),
            Err(e) => return Err(err("writing status")(e)),
        }
    }
    if spec.suspend == Some(true) {
        return Ok(Action::await_change());
    }
    Ok(match requeue {
        // A little after the time, so the clock has passed it when the reconcile runs.
        Some(next) => Action::requeue(
            (next - now)
                .to_std()
                .unwrap_or_default()
                .saturating_add(Duration::from_millis(100)),
        ),
        None => Action::await_change(),
    })
}

/// The CronJob that owns a Job, for requeueing it when the Job changes.
pub fn cronjob_of_job(job: &Job) -> Option<kube::runtime::reflector::ObjectRef<CronJob>> {
    let owner = baton_kube::pod::controller_of(&job.metadata)?;
    (owner.kind == "CronJob").then(|| {
        kube::runtime::reflector::ObjectRef::new(&owner.name)
            .within(job.metadata.namespace.as_deref().unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::fake::World;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn cronjob(extra: serde_json::Value) -> CronJob {
        let mut v = json!({
            "apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "tick", "namespace": "default", "uid": "cj-uid",
                         "creationTimestamp": "2026-12-03T10:00:30Z"},
            "spec": {"schedule": "* * * * *", "jobTemplate": {
                "metadata": {"labels": {"app": "tick"}},
                "spec": {"template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "r/tick:1"}]}}}}}
        });
        json_merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn job(name: &str, created: &str, outcome: Option<&str>) -> serde_json::Value {
        let conditions = outcome
            .map(|o| json!([{"type": o, "status": "True"}]))
            .unwrap_or(json!([]));
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("{name}-uid"),
                "creationTimestamp": created,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "tick",
                    "uid": "cj-uid", "controller": true}]},
            "spec": {"template": {}},
            "status": {"conditions": conditions,
                       "completionTime": outcome.filter(|o| *o == "Complete").map(|_| created)}
        })
    }

    fn world_at(t: &str) -> World {
        let mut w = World::new();
        w.set_clock(Clock::manual(at(t)));
        w
    }

    #[tokio::test]
    async fn a_minute_schedule_makes_one_job_per_minute_and_requeues_for_the_next() {
        let w = world_at("2026-12-03T10:01:05Z");
        let action = reconcile(Arc::new(cronjob(json!({}))), w.ctx.clone())
            .await
            .unwrap();
        let made = at("2026-12-03T10:01:00Z");
        assert_eq!(
            w.api.writes(),
            [
                "POST /apis/batch/v1/namespaces/default/jobs".to_string(),
                "PATCH /apis/batch/v1/namespaces/default/cronjobs/tick/status".to_string()
            ]
        );
        let calls = w.api.write_calls();
        let job = &calls[0].body;
        assert_eq!(job["metadata"]["name"], job_name("tick", made));
        assert_eq!(job["metadata"]["labels"]["app"], "tick");
        assert_eq!(
            job["metadata"]["annotations"][SCHEDULED_AT],
            "2026-12-03T10:01:00Z"
        );
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "cj-uid");
        assert_eq!(job["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(
            calls[1].body["status"]["lastScheduleTime"],
            "2026-12-03T10:01:00Z"
        );
        // Next minute, 55 s on (and a little after).
        assert_eq!(
            action,
            Action::requeue(Duration::from_secs(55) + Duration::from_millis(100))
        );
    }

    #[tokio::test]
    async fn a_time_already_run_is_not_run_again_and_missed_times_are_skipped() {
        let w = world_at("2026-12-03T10:01:30Z");
        let cj = cronjob(json!({"status": {"lastScheduleTime": "2026-12-03T10:01:00Z"}}));
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());

        // Ten minutes later: only the latest time runs.
        w.ctx
            .clock
            .advance(k8s_openapi::chrono::Duration::minutes(10));
        let cj = cronjob(json!({"status": {"lastScheduleTime": "2026-12-03T10:01:00Z"}}));
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        let calls = w.api.write_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0].body["metadata"]["name"],
            job_name("tick", at("2026-12-03T10:11:00Z"))
        );
    }

    #[tokio::test]
    async fn a_time_past_its_starting_deadline_is_skipped() {
        let w = world_at("2026-12-03T10:01:50Z");
        let cj = cronjob(json!({"spec": {"startingDeadlineSeconds": 10}}));
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
    }

    #[tokio::test]
    async fn forbid_skips_while_a_job_runs_and_replace_deletes_it_first() {
        let mut w = world_at("2026-12-03T10:02:05Z");
        w.job(job("tick-1", "2026-12-03T10:01:00Z", None));
        let forbid = cronjob(json!({"spec": {"concurrencyPolicy": "Forbid"},
                                    "status": {"lastScheduleTime": "2026-12-03T10:01:00Z"}}));
        reconcile(Arc::new(forbid), w.ctx.clone()).await.unwrap();
        assert_eq!(
            w.api.writes(),
            ["PATCH /apis/batch/v1/namespaces/default/cronjobs/tick/status"]
        );
        assert_eq!(
            w.api.write_calls()[0].body["status"]["active"][0]["name"],
            "tick-1"
        );

        w.api.clear();
        let replace = cronjob(json!({"spec": {"concurrencyPolicy": "Replace"},
                                     "status": {"lastScheduleTime": "2026-12-03T10:01:00Z"}}));
        reconcile(Arc::new(replace), w.ctx.clone()).await.unwrap();
        let writes = w.api.writes();
        assert_eq!(
            writes[0],
            "DELETE /apis/batch/v1/namespaces/default/jobs/tick-1"
        );
        assert_eq!(writes[1], "POST /apis/batch/v1/namespaces/default/jobs");
    }

    #[tokio::test]
    async fn old_finished_jobs_beyond_the_history_limits_go_oldest_first() {
        let mut w = world_at("2026-12-03T10:05:30Z");
        for (i, outcome) in ["Complete", "Complete", "Failed", "Complete", "Failed"]
            .iter()
            .enumerate()
        {
            w.job(job(
                &format!("tick-{i}"),
                &format!("2026-12-03T10:0{i}:00Z"),
                Some(outcome),
            ));
        }
        let cj = cronjob(json!({"spec": {"successfulJobsHistoryLimit": 2},
                                "status": {"lastScheduleTime": "2026-12-03T10:05:00Z"}}));
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        let deletes: Vec<String> = w
            .api
            .writes()
            .into_iter()
            .filter(|w| w.starts_with("DELETE"))
            .collect();
        assert_eq!(
            deletes,
            [
                "DELETE /apis/batch/v1/namespaces/default/jobs/tick-0",
                "DELETE /apis/batch/v1/namespaces/default/jobs/tick-2"
            ]
        );
        let calls = w.api.write_calls();
        let status = &calls.last().unwrap().body["status"];
        assert_eq!(status["lastSuccessfulTime"], "2026-12-03T10:03:00Z");
    }

    #[tokio::test]
    async fn a_job_the_status_lists_as_active_is_seen_completed_once() {
        let mut w = world_at("2026-12-03T10:01:30Z");
        w.job(job("tick-1", "2026-12-03T10:01:00Z", Some("Complete")));
        let cj = cronjob(json!({"status": {
            "lastScheduleTime": "2026-12-03T10:01:00Z",
            "active": [{"kind": "Job", "name": "tick-1", "namespace": "default"}]}}));
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        assert_eq!(w.events().await, ["Normal SawCompletedJob"]);
        let calls = w.api.calls();
        let event = calls.iter().find(|c| c.path.contains("/events")).unwrap();
        assert_eq!(
            event.body["message"],
            "Saw completed job: tick-1, condition: Complete"
        );
        // The status no longer lists it: nothing more to tell.
        let cj = cronjob(json!({"status": {"lastScheduleTime": "2026-12-03T10:01:00Z"}}));
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        assert_eq!(w.events().await.len(), 1);
    }

    #[tokio::test]
    async fn a_suspended_cronjob_starts_nothing_and_a_time_zone_moves_the_schedule() {
        let w = world_at("2026-12-03T10:00:40Z");
        let cj = cronjob(json!({"spec": {"suspend": true}}));
        w.ctx
            .clock
            .advance(k8s_openapi::chrono::Duration::minutes(2));
        assert_eq!(
            reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap(),
            Action::await_change()
        );
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());

        // 11:00 in Paris is 10:00 UTC in December.
        let w = world_at("2026-12-03T10:00:10Z");
        let cj = cronjob(
            json!({"metadata": {"creationTimestamp": "2026-12-03T09:00:00Z"},
                                "spec": {"schedule": "0 11 * * *", "timeZone": "Europe/Paris"}}),
        );
        reconcile(Arc::new(cj), w.ctx.clone()).await.unwrap();
        let calls = w.api.write_calls();
        assert_eq!(
            calls[0].body["metadata"]["annotations"][SCHEDULED_AT],
            "2026-12-03T11:00:00+01:00"
        );
    }
}
