//! The scheduler's metrics, under kube-scheduler's names, in the process-wide registry
//! ([`baton_kube::telemetry`]): attempts by result and their duration, and the pods
//! waiting, by queue, read from the scheduler's own cache of pending pods when scraped.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::DEFAULT_SCHEDULER;

/// How an attempt to place a pod ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    Scheduled,
    /// No node fits.
    Unschedulable,
    /// Something failed (a binding, a claim): the pod is retried.
    Error,
}

impl Attempt {
    fn label(self) -> &'static str {
        match self {
            Attempt::Scheduled => "scheduled",
            Attempt::Unschedulable => "unschedulable",
            Attempt::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    result: &'static str,
    profile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: &'static str,
}

struct Metrics {
    attempts: Family<AttemptLabels, Counter>,
    durations: Family<AttemptLabels, Histogram>,
}

/// The pending pods of the scheduler running in this process, for the scrape, with the
/// number its [`track_pending`] gave it.
static PENDING: LazyLock<Mutex<Option<Tracked>>> = LazyLock::new(Mutex::default);

/// A scheduler's pending pods, and the number [`track_pending`] gave them.
type Tracked = (u64, Store<Pod>);

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics {
        attempts: Family::default(),
        durations: Family::new_with_constructor(|| {
            Histogram::new(baton_kube::telemetry::duration_buckets())
        }),
    };
    baton_kube::telemetry::register(|r| {
        r.register(
            "scheduler_schedule_attempts",
            "Number of attempts to schedule pods, by the result",
            m.attempts.clone(),
        );
        r.register(
            "scheduler_scheduling_attempt_duration_seconds",
            "Scheduling attempt latency in seconds (scheduling algorithm + binding)",
            m.durations.clone(),
        );
        r.register_collector(Box::new(PendingPods));
    });
    m
});

/// Counts one attempt and how long it took.
pub fn attempt(result: Attempt, took: Duration) {
    let labels = AttemptLabels {
        result: result.label(),
        profile: DEFAULT_SCHEDULER,
    };
    METRICS.attempts.get_or_create(&labels).inc();
    METRICS
        .durations
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
}

/// Makes `pending` (the scheduler's cache of pods without a node) the one the scrape
/// reads, until [`untrack_pending`] with the number returned.
pub fn track_pending(pending: Store<Pod>) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    LazyLock::force(&METRICS);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some((n, pending));
    n
}

/// Stops reading the pending pods of a scheduler that stopped (a member that lost its
/// lease must not report a frozen queue), unless a newer one took its place.
pub fn untrack_pending(n: u64) {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if pending.as_ref().is_some_and(|(m, _)| *m == n) {
        *pending = None;
    }
}

/// Which of kube-scheduler's queues a pending pod would be in.
fn queue_of(pod: &Pod) -> &'static str {
    let spec = pod.spec.as_ref();
    if spec.is_some_and(|s| s.scheduling_gates.as_ref().is_some_and(|g| !g.is_empty())) {
        return "gated";
    }
    let unschedulable = baton_kube::pod::condition(pod, "PodScheduled")
        .is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
    if unschedulable {
        "unschedulable"
    } else {
        "active"
    }
}

#[derive(Debug)]
struct PendingPods;

impl prometheus_client::collector::Collector for PendingPods {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let family = Family::<QueueLabels, Gauge>::default();
        for queue in ["active", "unschedulable", "gated"] {
            let _ = family.get_or_create(&QueueLabels { queue });
        }
        if let Some((_, store)) = &*PENDING.lock().unwrap_or_else(|e| e.into_inner()) {
            for pod in store.state() {
                let ours = pod.spec.as_ref().is_none_or(|s| {
                    s.scheduler_name.as_deref().unwrap_or(DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER
                });
                if ours {
                    family
                        .get_or_create(&QueueLabels {
                            queue: queue_of(&pod),
                        })
                        .inc();
                }
            }
        }
        let metric = encoder.encode_descriptor(
            "scheduler_pending_pods",
            "Number of pending pods, by the queue type.",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pending_pod_is_in_the_queue_its_state_says() {
        let pod = |v: serde_json::Value| serde_json::from_value::<Pod>(v).unwrap();
        assert_eq!(
            queue_of(&pod(json!({"spec": {"containers": []}}))),
            "active"
        );
        assert_eq!(
            queue_of(&pod(
                json!({"spec": {"containers": [], "schedulingGates": [{"name": "wait"}]}})
            )),
            "gated"
        );
        assert_eq!(
            queue_of(&pod(
                json!({"spec": {"containers": []}, "status": {"conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}})
            )),
            "unschedulable"
        );
    }

    #[test]
    fn attempts_are_counted_by_result() {
        attempt(Attempt::Scheduled, Duration::from_millis(2));
        attempt(Attempt::Unschedulable, Duration::from_millis(1));
        let mut text = String::new();
        baton_kube::telemetry::encode_into(&mut text);
        for line in [
            r#"scheduler_schedule_attempts_total{result="scheduled",profile="default-scheduler"} 1"#,
            r#"scheduler_schedule_attempts_total{result="unschedulable",profile="default-scheduler"} 1"#,
            r#"scheduler_scheduling_attempt_duration_seconds_count{result="scheduled",profile="default-scheduler"} 1"#,
            r#"scheduler_pending_pods{queue="active"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }
}
