//! From what the metrics ask to what the autoscaler sets: `spec.behavior`'s stabilization
//! windows and rate policies, then `minReplicas` and `maxReplicas`, as Kubernetes applies
//! them (`normalizeDesiredReplicasWithBehaviors`).
//!
//! - **Stabilization.** Every recommendation is remembered; a scale-down goes no lower
//!   than the highest recommendation of the scale-down window (default 300 s), a scale-up
//!   no higher than the lowest of the scale-up window (default 0 s).
//! - **Rates.** Each policy bounds the change over its period (`Pods`: that many pods;
//!   `Percent`: that share of the count at the period's start); `selectPolicy` takes the
//!   policy allowing the most change (`Max`, the default), the least (`Min`), or none
//!   (`Disabled`). Defaults: up by 4 pods or 100% per 15 s, whichever is more; down by
//!   100% per 15 s.

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::{HPAScalingRules, HorizontalPodAutoscalerBehavior};
use k8s_openapi::chrono::{DateTime, Utc};

/// A scaling policy, resolved.
#[derive(Clone, Debug, PartialEq)]
struct Policy {
    pods: bool,
    value: i32,
    period: Duration,
}

/// One direction's rules, resolved with Kubernetes' defaults.
#[derive(Clone, Debug, PartialEq)]
struct Rules {
    window: Duration,
    select: String,
    policies: Vec<Policy>,
}

fn rules(r: Option<&HPAScalingRules>, up: bool) -> Rules {
    let default_policies = if up {
        vec![
            Policy {
                pods: true,
                value: 4,
                period: Duration::from_secs(15),
            },
            Policy {
                pods: false,
                value: 100,
                period: Duration::from_secs(15),
            },
        ]
    } else {
        vec![Policy {
            pods: false,
            value: 100,
            period: Duration::from_secs(15),
        }]
    };
    let window = r
        .and_then(|r| r.stabilization_window_seconds)
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(if up {
            Duration::ZERO
        } else {
            Duration::from_secs(300)
        });
    let policies = r
        .and_then(|r| r.policies.as_ref())
        .filter(|p| !p.is_empty())
        .map(|ps| {
            ps.iter()
                .map(|p| Policy {
                    pods: p.type_ == "Pods",
                    value: p.value,
                    period: Duration::from_secs(p.period_seconds.max(1) as u64),
                })
                .collect()
        })
        .unwrap_or(default_policies);
    Rules {
        window,
        select: r
            .and_then(|r| r.select_policy.clone())
            .unwrap_or_else(|| "Max".into()),
        policies,
    }
}

/// What one autoscaler remembers between its runs.
#[derive(Clone, Debug, Default)]
pub struct History {
    recommendations: Vec<(DateTime<Utc>, i32)>,
    /// Past changes: when, and by how many (positive up, negative down).
    events: Vec<(DateTime<Utc>, i32)>,
}

impl History {
    /// Takes note of a change of the target's replicas made now.
    pub fn scaled(&mut self, now: DateTime<Utc>, change: i32) {
        if change != 0 {
            self.events.push((now, change));
        }
    }

    fn changed_within(&self, now: DateTime<Utc>, period: Duration, up: bool) -> i32 {
        self.events
            .iter()
            .filter(|(t, c)| now - *t <= chrono(period) && (*c > 0) == up)
            .map(|(_, c)| c.abs())
            .sum()
    }

    fn forget_before(&mut self, cutoff: DateTime<Utc>) {
        self.recommendations.retain(|(t, _)| *t >= cutoff);
        self.events.retain(|(t, _)| *t >= cutoff);
    }
}

fn chrono(d: Duration) -> k8s_openapi::chrono::Duration {
    k8s_openapi::chrono::Duration::from_std(d).unwrap_or_default()
}

/// The outcome: the count to set, and the ScalingLimited condition's say.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub replicas: i32,
    /// Whether a rate, minReplicas or maxReplicas held the count back, and why.
    pub limited: Option<(&'static str, String)>,
}

/// The bound of one direction's policies on the count, from `current`.
fn limit(current: i32, r: &Rules, h: &History, now: DateTime<Utc>, up: bool) -> i32 {
    if r.select == "Disabled" {
        return current;
    }
    // "Max" means the policy allowing the most change.
    let most_change = r.select != "Min";
    let proposals = r.policies.iter().map(|p| {
        let start = current - h.changed_within(now, p.period, true)
            + h.changed_within(now, p.period, false);
        match (up, p.pods) {
            (true, true) => start + p.value,
            (true, false) => (f64::from(start) * (1.0 + f64::from(p.value) / 100.0)).ceil() as i32,
            (false, true) => start - p.value,
            (false, false) => (f64::from(start) * (1.0 - f64::from(p.value) / 100.0)) as i32,
        }
    });
    if up == most_change {
        proposals.max().unwrap_or(current)
    } else {
        proposals.min().unwrap_or(current)
    }
}

/// Applies the behavior and the bounds to `desired`, with `current` replicas now.
pub fn normalize(
    desired: i32,
    current: i32,
    min: i32,
    max: i32,
    behavior: Option<&HorizontalPodAutoscalerBehavior>,
    h: &mut History,
    now: DateTime<Utc>,
) -> Decision {
    let up_rules = rules(behavior.and_then(|b| b.scale_up.as_ref()), true);
    let down_rules = rules(behavior.and_then(|b| b.scale_down.as_ref()), false);
    // Stabilization over the remembered recommendations, this one included.
    h.recommendations.push((now, desired));
    let (mut up_rec, mut down_rec) = (desired, desired);
    for (t, r) in &h.recommendations {
        if now - *t <= chrono(up_rules.window) {
            up_rec = up_rec.min(*r);
        }
        if now - *t <= chrono(down_rules.window) {
            down_rec = down_rec.max(*r);
        }
    }
    let mut stabilized = current;
    if stabilized < up_rec {
        stabilized = up_rec;
    }
    if stabilized > down_rec {
        stabilized = down_rec;
    }
    let longest = [&up_rules, &down_rules]
        .iter()
        .flat_map(|r| r.policies.iter().map(|p| p.period).chain([r.window]))
        .max()
        .unwrap_or_default();
    h.forget_before(now - chrono(longest));
    // Then the rates and the bounds.
    let mut limited = None;
    let mut replicas = stabilized;
    if stabilized > current {
        let rate = limit(current, &up_rules, h, now, true).max(current);
        let (allowed, reason) = if max > rate {
            (rate, "ScaleUpLimit")
        } else {
            (max, "TooManyReplicas")
        };
        if replicas > allowed {
            replicas = allowed;
            limited = Some((
                reason,
                format!(
                    "the desired replica count is more than the {}",
                    if reason == "ScaleUpLimit" {
                        "scale-up limit"
                    } else {
                        "maximum replica count"
                    }
                ),
            ));
        }
    } else if stabilized < current {
        let rate = limit(current, &down_rules, h, now, false).min(current);
        let (allowed, reason) = if min < rate {
            (rate, "ScaleDownLimit")
        } else {
            (min, "TooFewReplicas")
        };
        if replicas < allowed {
            replicas = allowed;
            limited = Some((
                reason,
                format!(
                    "the desired replica count is less than the {}",
                    if reason == "ScaleDownLimit" {
                        "scale-down limit"
                    } else {
                        "minimum replica count"
                    }
                ),
            ));
        }
    }
    // The bounds hold whatever the rates allow: a maximum lowered below the count, a
    // minimum raised above it, a direction whose policy is Disabled.
    if replicas > max {
        replicas = max;
        limited = Some((
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count".into(),
        ));
    } else if replicas < min {
        replicas = min;
        limited = Some((
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count".into(),
        ));
    }
    Decision { replicas, limited }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: i64) -> DateTime<Utc> {
        "2026-12-04T12:00:00Z".parse::<DateTime<Utc>>().unwrap()
            + k8s_openapi::chrono::Duration::seconds(s)
    }

    #[test]
    fn scale_up_is_limited_by_the_default_rate_and_the_maximum() {
        let mut h = History::default();
        // From 1, at most max(1 + 4, 1 × 2) = 5 in 15 s.
        let d = normalize(20, 1, 1, 10, None, &mut h, at(0));
        assert_eq!(d.replicas, 5);
        assert_eq!(d.limited.unwrap().0, "ScaleUpLimit");
        h.scaled(at(0), 4);
        // Within the same 15 s, the period started at 1: still 5.
        assert_eq!(normalize(20, 5, 1, 10, None, &mut h, at(10)).replicas, 5);
        // After it, from 5: min(10, max(9, 10)) = the maximum.
        let d = normalize(20, 5, 1, 10, None, &mut h, at(20));
        assert_eq!(d.replicas, 10);
        assert_eq!(d.limited.unwrap().0, "TooManyReplicas");
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let mut h = History::default();
        assert_eq!(normalize(6, 6, 1, 10, None, &mut h, at(0)).replicas, 6);
        // Asked for 2 a minute later: the window still holds the 6.
        assert_eq!(normalize(2, 6, 1, 10, None, &mut h, at(60)).replicas, 6);
        // Five minutes after the 6, only 2s remain.
        assert_eq!(normalize(2, 6, 1, 10, None, &mut h, at(301)).replicas, 2);
    }

    #[test]
    fn policies_and_select_policy_from_the_spec() {
        let behavior: HorizontalPodAutoscalerBehavior = serde_json::from_value(json!({
            "scaleDown": {"stabilizationWindowSeconds": 0, "selectPolicy": "Min",
                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60},
                             {"type": "Percent", "value": 50, "periodSeconds": 60}]},
            "scaleUp": {"selectPolicy": "Disabled"},
        }))
        .unwrap();
        let mut h = History::default();
        // Down from 10: Pods allows 9, Percent 5; Min takes the least change, 9.
        let d = normalize(2, 10, 1, 20, Some(&behavior), &mut h, at(0));
        assert_eq!(d.replicas, 9);
        assert_eq!(d.limited.unwrap().0, "ScaleDownLimit");
        // Up is disabled.
        assert_eq!(
            normalize(15, 9, 1, 20, Some(&behavior), &mut h, at(1)).replicas,
            9
        );
        // The bounds hold even against the rates: a maximum lowered below the count (a
        // scale-down the policy would slow), a minimum raised with scale-up Disabled.
        let d = normalize(15, 20, 1, 10, Some(&behavior), &mut h, at(3));
        assert_eq!((d.replicas, d.limited.unwrap().0), (10, "TooManyReplicas"));
        let d = normalize(3, 1, 5, 20, Some(&behavior), &mut h, at(4));
        assert_eq!((d.replicas, d.limited.unwrap().0), (5, "TooFewReplicas"));
        // The minimum holds below everything.
        assert_eq!(
            normalize(0, 1, 1, 20, Some(&behavior), &mut h, at(2)).replicas,
            1
        );
    }
}
