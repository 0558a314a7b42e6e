//! What the node measures of itself and its pods, for `kubectl top`: the kubelet's Summary
//! API (`GET /stats/summary`), in the subset that metrics consumers read.
//!
//! CPU is a rate, so it needs two readings: a sampler reads every [`SAMPLE`] the
//! machine's CPU time (`/proc/stat`) and each container's guest CPU time (counted by the
//! sandbox), and a summary reports the rate over the last two readings, with the window
//! they span. Memory is read when asked: the machine's working set (`MemTotal -
//! MemAvailable`) and each container's linear memory.
//!
//! HTTP components' requests are read the same way: the rate of answered requests over
//! the last two readings, and the requests in flight now (both counted in the sandbox),
//! under each container's `http` (not in the kubelet's answer). They are what
//! `custom.metrics.k8s.io` serves, so an autoscaler can follow a function's traffic and
//! see when it has none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

/// How often CPU time is read: the shortest window `kubectl top` sees.
pub const SAMPLE: Duration = Duration::from_secs(5);

/// One reading of every counter.
#[derive(Debug, Clone)]
struct Reading {
    at: Instant,
    /// The machine's busy CPU time, in nanoseconds, if `/proc/stat` could be read.
    node_cpu: Option<u64>,
    /// Pod key -> container -> (CPU nanoseconds, HTTP requests answered).
    pods: HashMap<String, HashMap<String, (u64, u64)>>,
}

/// The last two readings.
#[derive(Debug, Default)]
pub struct Stats {
    readings: Mutex<(Option<Reading>, Option<Reading>)>,
}

fn read_node_cpu() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    if v.len() < 8 {
        return None;
    }
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    // USER_HZ is 100 on every Linux that Baton runs on.
    Some(busy * 10_000_000)
}

fn read_node_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::chrono::DateTime::<k8s_openapi::chrono::Utc>::from(t)
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

impl Stats {
    /// Takes a reading now.
    pub fn sample(&self, usage: &[baton_wasm_shim::PodUsage]) {
        let reading = Reading {
            at: Instant::now(),
            node_cpu: read_node_cpu(),
            pods: usage
                .iter()
                .map(|p| {
                    let containers = p
                        .containers
                        .iter()
                        .map(|c| (c.name.clone(), (c.cpu_nanos, c.http.total())))
                        .collect();
                    (p.pod.clone(), containers)
                })
                .collect(),
        };
        let mut r = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        r.0 = r.1.take();
        r.1 = Some(reading);
    }

    /// Reads every [`SAMPLE`] until the task is dropped.
    pub fn run(self: Arc<Self>, runtime: baton_wasm_shim::Runtime) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE);
            loop {
                tick.tick().await;
                self.sample(&runtime.usage());
            }
        })
    }

    /// The Summary API answer: the node, and every pod with a container the sandbox has
    /// counted. `usageNanoCores` is the rate over the last two readings (absent before
    /// there are two); `window` is the time they span.
    pub fn summary(&self, node: &str, usage: &[baton_wasm_shim::PodUsage]) -> Value {
        let (prev, last) = {
            let r = self.readings.lock().unwrap_or_else(|e| e.into_inner());
            (r.0.clone(), r.1.clone())
        };
        let now = SystemTime::now();
        let time = rfc3339(now);
        let span = match (&prev, &last) {
            (Some(p), Some(l)) => Some((p, l, l.at.duration_since(p.at))),
            _ => None,
        };
        let per_second = |before: u64, after: u64, d: Duration| -> f64 {
            if d.is_zero() {
                return 0.0;
            }
            after.saturating_sub(before) as f64 / d.as_secs_f64()
        };
        let rate = |before: u64, after: u64, d: Duration| per_second(before, after, d) as u64;
        let mut node_cpu = json!({"time": time});
        if let Some((p, l, d)) = span {
            if let (Some(a), Some(b)) = (p.node_cpu, l.node_cpu) {
                node_cpu["usageNanoCores"] = json!(rate(a, b, d));
                node_cpu["usageCoreNanoSeconds"] = json!(b);
            }
        }
        let mut node_memory = json!({"time": time});
        if let Some(m) = read_node_memory() {
            node_memory["workingSetBytes"] = json!(m);
            node_memory["usageBytes"] = json!(m);
        }
        let pods: Vec<Value> = usage
            .iter()
            .filter(|p| !p.containers.is_empty())
            .filter_map(|p| {
                let (ns, name, uid) = pod_key(&p.pod)?;
                let containers: Vec<Value> = p
                    .containers
                    .iter()
                    .map(|c| {
                        let mut cpu = json!({"time": time, "usageCoreNanoSeconds": c.cpu_nanos});
                        let serves_http = c
                            .component
                            .as_ref()
                            .is_some_and(|i| i.kind == baton_wasm_shim::ComponentKind::Http);
                        let mut http = json!({"time": time, "requestsTotal": c.http.total(), "inFlight": c.http.in_flight});
                        if let Some((pr, l, d)) = span {
                            let before = pr.pods.get(&p.pod).and_then(|m| m.get(&c.name));
                            let after = l.pods.get(&p.pod).and_then(|m| m.get(&c.name));
                            if let Some((cpu_after, requests_after)) = after {
                                // A container first seen in the last reading started after
                                // the one before: it used all it has since.
                                let (cpu_before, requests_before) =
                                    before.copied().unwrap_or((0, 0));
                                cpu["usageNanoCores"] = json!(rate(cpu_before, *cpu_after, d));
                                http["requestsPerSecond"] =
                                    json!(per_second(requests_before, *requests_after, d));
                            }
                        }
                        let mut out = json!({
                            "name": c.name,
                            "cpu": cpu,
                            "memory": {"time": time, "workingSetBytes": c.memory_bytes, "usageBytes": c.memory_bytes},
                        });
                        if serves_http {
                            out["http"] = http;
                        }
                        out
                    })
                    .collect();
                Some(json!({
                    "podRef": {"name": name, "namespace": ns, "uid": uid},
                    "containers": containers,
                    // Its containers' linear memory and host-side state together; the
                    // pod's own figure (what its limit holds) counts linear memory only.
                    "memory": {"time": time, "workingSetBytes": p.containers.iter().map(|c| c.memory_bytes).sum::<usize>().max(p.memory_bytes)},
                }))
            })
            .collect();
        let window = span.map(|(_, _, d)| d.as_secs_f64()).unwrap_or(0.0);
        json!({
            "node": {"nodeName": node, "cpu": node_cpu, "memory": node_memory},
            "pods": pods,
            // Not in the kubelet's answer: the span the CPU rates were measured over, in
            // seconds, which metrics.k8s.io reports as `window`.
            "window": window,
        })
    }
}

/// A sandbox pod key (`namespace/name/uid`) as its parts; the uid may be missing.
pub(crate) fn pod_key(key: &str) -> Option<(&str, &str, &str)> {
    let mut parts = key.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next().unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_wasm_shim::stats::HttpUsage;
    use baton_wasm_shim::{ComponentInfo, ComponentKind, ContainerUsage, PodUsage};

    fn http_pod(answered: u64, in_flight: u64) -> PodUsage {
        PodUsage {
            pod: "ns/fn/uid-2".into(),
            containers: vec![ContainerUsage {
                name: "handler".into(),
                component: Some(ComponentInfo {
                    kind: ComponentKind::Http,
                    exports: Arc::from(vec![]),
                }),
                http: HttpUsage {
                    by_class: [0, answered, 0, 0, 0],
                    in_flight,
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_a_rate_over_the_last_two_readings_and_in_flight_is_now() {
        let stats = Stats::default();
        stats.sample(&[http_pod(10, 0)]);
        let first = stats.summary("n1", &[http_pod(10, 0)]);
        let http = &first["pods"][0]["containers"][0]["http"];
        assert_eq!(http["requestsTotal"], 10);
        assert!(
            http.get("requestsPerSecond").is_none(),
            "one reading is no rate"
        );
        std::thread::sleep(Duration::from_millis(100));
        stats.sample(&[http_pod(30, 2)]);
        let s = stats.summary("n1", &[http_pod(30, 3)]);
        let http = &s["pods"][0]["containers"][0]["http"];
        // 20 requests in a little over 100 ms.
        let rps = http["requestsPerSecond"].as_f64().unwrap();
        assert!((100.0..=200.0).contains(&rps), "{rps} requests/s");
        assert_eq!(http["inFlight"], 3, "in flight is read when asked");
        // An idle function's rate is zero, not absent: what scale to zero waits for.
        stats.sample(&[http_pod(30, 0)]);
        let idle = stats.summary("n1", &[http_pod(30, 0)]);
        assert_eq!(
            idle["pods"][0]["containers"][0]["http"]["requestsPerSecond"],
            0.0
        );
    }

    fn pod(cpu: u64, memory: usize) -> PodUsage {
        PodUsage {
            pod: "ns/web/uid-1".into(),
            memory_bytes: memory,
            containers: vec![ContainerUsage {
                name: "app".into(),
                cpu_nanos: cpu,
                memory_bytes: memory,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn cpu_is_a_rate_over_the_last_two_readings() {
        let stats = Stats::default();
        stats.sample(&[pod(0, 1 << 20)]);
        let first = stats.summary("n1", &[pod(0, 1 << 20)]);
        assert!(first["pods"][0]["containers"][0]["cpu"]
            .get("usageNanoCores")
            .is_none());
        std::thread::sleep(Duration::from_millis(50));
        stats.sample(&[pod(25_000_000, 2 << 20)]);
        let s = stats.summary("n1", &[pod(25_000_000, 2 << 20)]);
        let c = &s["pods"][0]["containers"][0];
        assert_eq!(s["pods"][0]["podRef"]["name"], "web");
        assert_eq!(c["name"], "app");
        assert_eq!(c["memory"]["workingSetBytes"], 2 << 20);
        // 25 ms of CPU in a little over 50 ms: about half a core.
        let rate = c["cpu"]["usageNanoCores"].as_u64().unwrap();
        assert!(
            (100_000_000..=500_000_000).contains(&rate),
            "rate {rate} nanocores"
        );
        assert!(s["window"].as_f64().unwrap() >= 0.05);
        assert!(c.get("http").is_none(), "a CLI component has no requests");
        assert!(s["node"]["memory"]["workingSetBytes"].as_u64().unwrap() > 0);
    }
}
