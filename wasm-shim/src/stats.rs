//! What the sandbox counts for the node's metrics, beyond CPU and memory: per container,
//! HTTP requests by status class and their latency, and guests that stopped abnormally
//! (traps, limit kills) by reason; per node, component loads by whether the compiled
//! cache had them, and instance starts (the cold start each request or process pays) with
//! their latency.
//!
//! Everything on a request's path is a relaxed atomic add into fixed buckets: no lock, no
//! allocation, no label lookup. [`RuntimeConfig::metrics`](crate::RuntimeConfig) turns the
//! timing off for those who measure the cost of measuring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency bucket bounds, in seconds: from a warm request's tenth of a millisecond to a
/// slow one's ten seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

const BOUNDS_NANOS: [u64; 14] = {
    let mut out = [0u64; 14];
    let mut i = 0;
    while i < 14 {
        out[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A latency histogram whose buckets are counters: observing is two atomic adds.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Per bucket (not cumulative), the last one past every bound.
    counts: [AtomicU64; 15],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NANOS
            .iter()
            .position(|b| nanos <= *b)
            .unwrap_or(BOUNDS_NANOS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Latency {
        Latency {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_nanos: self.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

/// A histogram read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Per bucket of [`LATENCY_BUCKETS`] (not cumulative), then the overflow bucket.
    pub counts: Vec<u64>,
    pub sum_nanos: u64,
}

impl Latency {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(le, cumulative count)` pairs as Prometheus writes buckets, ending with `+Inf`.
    pub fn cumulative(&self) -> Vec<(String, u64)> {
        let mut total = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                total += c;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                (le, total)
            })
            .collect()
    }
}

/// One HTTP container's requests.
#[derive(Debug, Default)]
pub(crate) struct HttpStats {
    /// By status class: 1xx … 5xx.
    by_class: [AtomicU64; 5],
    latency: Histogram,
    /// Requests taken and not yet answered (their response head not yet produced).
    in_flight: AtomicU64,
}

/// A request being served: counted in flight until dropped, however its handling ends.
pub(crate) struct InFlight<'a>(&'a HttpStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpStats {
    /// A request taken: in flight until the guard drops.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// A response sent (its head): its status and the time it took to produce.
    pub fn answered(&self, status: u16, took: Option<Duration>) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        if let Some(d) = took {
            self.latency.observe(d);
        }
    }

    pub fn snapshot(&self) -> HttpUsage {
        HttpUsage {
            by_class: std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed)),
            latency: self.latency.snapshot(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// One HTTP container's requests, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpUsage {
    /// Responses by status class: `by_class[0]` is 1xx, `by_class[4]` 5xx.
    pub by_class: [u64; 5],
    /// Time to the response's head.
    pub latency: Latency,
    /// Requests taken and not yet answered, now.
    pub in_flight: u64,
}

impl HttpUsage {
    pub fn total(&self) -> u64 {
        self.by_class.iter().sum()
    }
}

/// Guests of one container that stopped other than by completing, by reason (`Error`
/// for a trap or a failing exit, `OOMKilled`, `DeadlineExceeded`). Rare, so a lock.
#[derive(Debug, Default)]
pub(crate) struct Exits(Mutex<Vec<(&'static str, u64)>>);

impl Exits {
    pub fn record(&self, reason: &'static str) {
        if reason == "Completed" {
            return;
        }
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match all.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => all.push((reason, 1)),
        }
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The node-wide counts of the runtime.
#[derive(Debug, Default)]
pub(crate) struct RuntimeStats {
    cache_hits: AtomicU64,
    compiled: AtomicU64,
    cold_starts: Histogram,
}

impl RuntimeStats {
    /// A component loaded: from the compiled cache, or compiled now.
    pub fn loaded(&self, from_cache: bool) {
        let c = if from_cache {
            &self.cache_hits
        } else {
            &self.compiled
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A fresh instance made ready to run: what each request and process starts with.
    pub fn instance_started(&self, took: Duration) {
        self.cold_starts.observe(took);
    }

    pub fn snapshot(&self) -> RuntimeUsage {
        RuntimeUsage {
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            compiled: self.compiled.load(Ordering::Relaxed),
            cold_starts: self.cold_starts.snapshot(),
            otel: Default::default(),
        }
    }
}

/// The runtime's node-wide counts, read at one moment ([`crate::Runtime::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeUsage {
    /// Components loaded from the on-disk compiled cache.
    pub cache_hits: u64,
    /// Components compiled (no cache, or not in it).
    pub compiled: u64,
    /// Instance starts and how long each took.
    pub cold_starts: Latency,
    /// What wasi:otel forwarded and dropped.
    pub otel: crate::platform::otel::OtelUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_into_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count(), 4);
        let cum = s.cumulative();
        assert_eq!(cum[0], ("0.0001".to_string(), 2));
        assert_eq!(cum[5], ("0.005".to_string(), 3));
        assert_eq!(cum.last().unwrap(), &("+Inf".to_string(), 4));
        assert_eq!(s.sum_nanos, 60_003_150_000);
    }

    #[test]
    fn requests_are_counted_by_status_class_and_exits_by_reason() {
        let http = HttpStats::default();
        for status in [200, 204, 404, 500, 504, 101] {
            http.answered(status, Some(Duration::from_micros(300)));
        }
        http.answered(200, None);
        let held = http.begin();
        assert_eq!(http.snapshot().in_flight, 1);
        drop(held);
        let s = http.snapshot();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.by_class, [1, 3, 0, 1, 2]);
        assert_eq!(s.total(), 7);
        assert_eq!(
            s.latency.count(),
            6,
            "untimed answers are counted, not timed"
        );

        let exits = Exits::default();
        for r in ["Completed", "OOMKilled", "Error", "OOMKilled"] {
            exits.record(r);
        }
        assert_eq!(exits.snapshot(), vec![("OOMKilled", 2), ("Error", 1)]);
    }
}
