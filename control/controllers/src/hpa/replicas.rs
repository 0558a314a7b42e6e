//! How many replicas one metric asks for: the HorizontalPodAutoscaler's replica
//! calculator, as Kubernetes computes it (`pkg/controller/podautoscaler`).
//!
//! - The ratio of usage to target decides: `ceil(ratio × pods with figures)`, unless the
//!   ratio is within the tolerance (10%) of 1, which keeps the current count.
//! - **Pods without a figure** (missing metrics) are counted conservatively: as using
//!   their whole request (or the target) when the others say scale down, and nothing when
//!   they say scale up. If that flips the direction, nothing changes.
//! - **Unready pods** (not Ready, or for CPU still in their first minutes with a figure
//!   from before they were Ready) count as using nothing, and only when scaling up: a
//!   starting pod's burst must not scale a workload up.
//! - Pods being deleted and failed pods are left out.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::chrono::{DateTime, Utc};

/// The tolerance around a ratio of 1 within which nothing changes.
pub const TOLERANCE: f64 = 0.1;
/// How long after its start a pod's CPU figures may still be its start-up burst.
pub const CPU_INITIALIZATION: Duration = Duration::from_secs(300);
/// How long after its start a pod that is not Ready may still become so.
pub const INITIAL_READINESS_DELAY: Duration = Duration::from_secs(30);

/// One pod's figure: its usage (milli-units: millicores, or milli-bytes for memory, or
/// thousandths of a custom metric) and when the window it covers ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub milli: i64,
    pub timestamp: DateTime<Utc>,
    pub window: Duration,
}

/// What a metric asks for, with what it measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub replicas: i32,
    /// Utilization in percent of the requests, for a utilization target.
    pub utilization: Option<i32>,
    /// The average per pod, in milli-units.
    pub average_milli: i64,
}

/// Why no proposal could be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CalcError {
    #[error("did not receive metrics for targeted pods (pods might be unready)")]
    NoMetrics,
    #[error("missing request for {resource} in container {container} of Pod {pod}")]
    MissingRequest {
        resource: String,
        container: String,
        pod: String,
    },
}

fn ready_since(pod: &Pod) -> Option<(bool, Option<DateTime<Utc>>)> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((
        c.status == "True",
        c.last_transition_time.as_ref().map(|t| t.0),
    ))
}

/// The pods as the calculator sorts them.
#[derive(Debug, Default)]
struct Groups {
    ready: usize,
    unready: Vec<String>,
    missing: Vec<String>,
    ignored: Vec<String>,
}

fn group(
    pods: &[&Pod],
    samples: &BTreeMap<String, Sample>,
    cpu: bool,
    now: DateTime<Utc>,
) -> Groups {
    let mut g = Groups::default();
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some() || phase == Some("Failed") {
            g.ignored.push(name);
            continue;
        }
        if phase == Some("Pending") {
            g.unready.push(name);
            continue;
        }
        let Some(sample) = samples.get(&name) else {
            g.missing.push(name);
            continue;
        };
        let condition = ready_since(pod);
        let (ready, since) = condition.unwrap_or((false, None));
        let unready = if cpu && condition.is_none() {
            // No Ready condition at all: not known to be ready.
            true
        } else if cpu {
            let started = pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0);
            match started {
                None => true,
                Some(start) if now - start < chrono(CPU_INITIALIZATION) => {
                    // Still starting: its figure counts only if it was measured wholly
                    // after the pod became Ready.
                    !ready || since.is_none_or(|t| sample.timestamp - chrono(sample.window) < t)
                }
                Some(start) => {
                    // Not Ready, and never Ready since shortly after its start.
                    !ready && since.is_some_and(|t| t < start + chrono(INITIAL_READINESS_DELAY))
                }
            }
        } else {
            false
        };
        if unready {
            g.unready.push(name);
        } else {
            g.ready += 1;
        }
    }
    g
}

fn chrono(d: Duration) -> k8s_openapi::chrono::Duration {
    k8s_openapi::chrono::Duration::from_std(d).unwrap_or_default()
}

/// A pod's request of a resource, in milli-units, summed over its containers.
pub type Requests = BTreeMap<String, i64>;

/// Usage ratio and utilization for a utilization target of `target` percent.
fn utilization_ratio(
    samples: &BTreeMap<String, i64>,
    requests: &Requests,
    target: i32,
) -> Option<(f64, i32)> {
    let (mut used, mut requested) = (0i64, 0i64);
    for (pod, usage) in samples {
        if let Some(r) = requests.get(pod) {
            used += usage;
            requested += r;
        }
    }
    if requested == 0 {
        return None;
    }
    let utilization = (used * 100 / requested) as i32;
    Some((
        f64::from(utilization) / f64::from(target.max(1)),
        utilization,
    ))
}

/// What a per-pod average target (`target_milli` per pod) asks for, over the pods'
/// samples; `utilization` targets pass their requests.
fn ratio_of(
    samples: &BTreeMap<String, i64>,
    requests: Option<(&Requests, i32)>,
    target_milli: i64,
) -> Option<(f64, Option<i32>)> {
    match requests {
        Some((requests, target)) => {
            utilization_ratio(samples, requests, target).map(|(r, u)| (r, Some(u)))
        }
        None => {
            if samples.is_empty() {
                return None;
            }
            let sum: i64 = samples.values().sum();
            let avg = sum as f64 / samples.len() as f64;
            Some((avg / target_milli.max(1) as f64, None))
        }
    }
}

/// The target of a metric.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Percent of the pods' requests (Resource metrics only).
    Utilization(i32),
    /// Per pod, in milli-units.
    AverageValue(i64),
}

/// Replicas for one metric over `pods` (the target's pods), with `current` replicas.
/// `requests` are needed for a utilization target; `cpu` turns on CPU's readiness rule.
pub fn replicas(
    current: i32,
    pods: &[&Pod],
    samples: &BTreeMap<String, Sample>,
    requests: &Requests,
    target: &Target,
    cpu: bool,
    now: DateTime<Utc>,
) -> Result<Proposal, CalcError> {
    if pods.is_empty() {
        return Err(CalcError::NoMetrics);
    }
    let g = group(pods, samples, cpu, now);
    let mut usable: BTreeMap<String, i64> = samples
        .iter()
        .filter(|(p, _)| !g.ignored.contains(p) && !g.unready.contains(p))
        .filter(|(p, _)| {
            pods.iter()
                .any(|pod| pod.metadata.name.as_deref() == Some(p.as_str()))
        })
        .map(|(p, s)| (p.clone(), s.milli))
        .collect();
    if usable.is_empty() {
        return Err(CalcError::NoMetrics);
    }
    let (req, target_milli) = match target {
        Target::Utilization(t) => (Some((requests, *t)), 0),
        Target::AverageValue(v) => (None, *v),
    };
    let average = |m: &BTreeMap<String, i64>| m.values().sum::<i64>() / (m.len().max(1) as i64);
    let (ratio, utilization) = ratio_of(&usable, req, target_milli).ok_or(CalcError::NoMetrics)?;
    let scale_up_with_unready = !g.unready.is_empty() && ratio > 1.0;
    if !scale_up_with_unready && g.missing.is_empty() {
        let replicas = if (1.0 - ratio).abs() <= TOLERANCE {
            current
        } else {
            (ratio * usable.len() as f64).ceil() as i32
        };
        return Ok(Proposal {
            replicas,
            utilization,
            average_milli: average(&usable),
        });
    }
    let measured_average = average(&usable);
    // The conservative assumptions for the pods without a usable figure: against the
    // move, and none when the others sit exactly on target.
    for pod in &g.missing {
        let assumed = if ratio < 1.0 {
            match target {
                Target::Utilization(t) => {
                    requests.get(pod).copied().unwrap_or(0) * i64::from((*t).max(100)) / 100
                }
                Target::AverageValue(v) => *v,
            }
        } else if ratio > 1.0 {
            0
        } else {
            continue;
        };
        usable.insert(pod.clone(), assumed);
    }
    if scale_up_with_unready {
        for pod in &g.unready {
            usable.insert(pod.clone(), 0);
        }
    }
    let (new_ratio, _) = ratio_of(&usable, req, target_milli).ok_or(CalcError::NoMetrics)?;
    let flipped = (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0);
    if (1.0 - new_ratio).abs() <= TOLERANCE || flipped {
        return Ok(Proposal {
            replicas: current,
            utilization,
            average_milli: measured_average,
        });
    }
    let replicas = (new_ratio * usable.len() as f64).ceil() as i32;
    let against =
        (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current);
    Ok(Proposal {
        replicas: if against { current } else { replicas },
        utilization,
        average_milli: measured_average,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-12-04T12:00:00Z".parse().unwrap()
    }

    fn pod(name: &str, ready: bool, started_ago_s: i64) -> Pod {
        let start = now() - k8s_openapi::chrono::Duration::seconds(started_ago_s);
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"phase": "Running", "startTime": start.to_rfc3339(),
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                    "lastTransitionTime": (start + k8s_openapi::chrono::Duration::seconds(2)).to_rfc3339()}]}
        }))
        .unwrap()
    }

    fn sample(milli: i64) -> Sample {
        Sample {
            milli,
            timestamp: now(),
            window: Duration::from_secs(15),
        }
    }

    fn run(pods: &[Pod], usage: &[(&str, i64)], target: Target) -> i32 {
        let refs: Vec<&Pod> = pods.iter().collect();
        let samples = usage
            .iter()
            .map(|(p, m)| (p.to_string(), sample(*m)))
            .collect();
        let requests = pods
            .iter()
            .map(|p| (p.metadata.name.clone().unwrap(), 100))
            .collect();
        replicas(
            pods.len() as i32,
            &refs,
            &samples,
            &requests,
            &target,
            true,
            now(),
        )
        .unwrap()
        .replicas
    }

    #[test]
    fn the_ratio_scales_and_the_tolerance_holds() {
        let pods = [pod("a", true, 600), pod("b", true, 600)];
        // 90% of 100m each against a 50% target: 2 × 1.8 → 4.
        assert_eq!(
            run(&pods, &[("a", 90), ("b", 90)], Target::Utilization(50)),
            4
        );
        // 54% against 50%: within 10%, stay.
        assert_eq!(
            run(&pods, &[("a", 54), ("b", 54)], Target::Utilization(50)),
            2
        );
        // 10% against 50%: 2 × 0.2 → 1.
        assert_eq!(
            run(&pods, &[("a", 10), ("b", 10)], Target::Utilization(50)),
            1
        );
        // An average value: 300m per pod against 100m: 6.
        assert_eq!(
            run(&pods, &[("a", 300), ("b", 300)], Target::AverageValue(100)),
            6
        );
    }

    #[test]
    fn a_request_rate_of_zero_proposes_zero_replicas() {
        let pods = [pod("a", true, 600), pod("b", true, 600)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let samples = [("a", 0), ("b", 0)]
            .iter()
            .map(|(p, m)| (p.to_string(), sample(*m)))
            .collect();
        let rate = |samples: &BTreeMap<String, Sample>| {
            replicas(
                2,
                &refs,
                samples,
                &Requests::new(),
                &Target::AverageValue(10_000),
                false,
                now(),
            )
            .unwrap()
            .replicas
        };
        assert_eq!(rate(&samples), 0, "idle: zero, which minReplicas 0 allows");
        // Any request keeps one: 0.5 requests/s against 10 per pod.
        let trickle = [("a", 500), ("b", 0)]
            .iter()
            .map(|(p, m)| (p.to_string(), sample(*m)))
            .collect();
        assert_eq!(rate(&trickle), 1);
    }

    #[test]
    fn missing_figures_are_assumed_against_the_move() {
        let pods = [
            pod("a", true, 600),
            pod("b", true, 600),
            pod("c", true, 600),
        ];
        // Scale up from a and b; c counted as 0: (90+90+0)/300 = 60% vs 50% → 1.2 → 4.
        assert_eq!(
            run(&pods, &[("a", 90), ("b", 90)], Target::Utilization(50)),
            4
        );
        // Scale down from a and b; c counted as its request, 100%: (10+10+100)/300 = 40%
        // vs 50% → 0.8 → 3 × 0.8 = 2.4 → 3: no change.
        assert_eq!(
            run(&pods, &[("a", 10), ("b", 10)], Target::Utilization(50)),
            3
        );
    }

    #[test]
    fn pods_without_figures_change_nothing_when_the_others_are_on_target() {
        let pods = [
            pod("a", true, 600),
            pod("b", true, 600),
            pod("c", true, 600),
            pod("d", true, 600),
        ];
        assert_eq!(
            run(&pods, &[("a", 50), ("b", 50)], Target::Utilization(50)),
            4
        );
    }

    #[test]
    fn unready_pods_count_as_idle_when_scaling_up_and_a_starting_burst_is_ignored() {
        // b is not Ready: a alone at 100% vs 50% would ask 2, with b at 0 it is 50%: stay.
        let pods = [pod("a", true, 600), pod("b", false, 600)];
        assert_eq!(
            run(&pods, &[("a", 100), ("b", 100)], Target::Utilization(50)),
            2
        );
        // c started a minute ago and its figure predates its readiness: unready.
        let pods = [pod("a", true, 600), pod("c", true, 60)];
        let mut burst = sample(400);
        burst.window = Duration::from_secs(120);
        let refs: Vec<&Pod> = pods.iter().collect();
        let samples = [("a".to_string(), sample(50)), ("c".to_string(), burst)].into();
        let requests = [("a".to_string(), 100), ("c".to_string(), 100)].into();
        let p = replicas(
            2,
            &refs,
            &samples,
            &requests,
            &Target::Utilization(50),
            true,
            now(),
        );
        assert_eq!(p.unwrap().replicas, 2);
    }

    #[test]
    fn no_figures_at_all_is_an_error() {
        let pods = [pod("a", true, 600)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let got = replicas(
            1,
            &refs,
            &BTreeMap::new(),
            &Requests::new(),
            &Target::Utilization(50),
            true,
            now(),
        );
        assert_eq!(got, Err(CalcError::NoMetrics));
    }
}
