//! Recording core/v1 Events, the story `kubectl describe` tells.
//!
//! kube-runtime's recorder writes `events.k8s.io/v1` Events; kubectl's describe reads
//! core/v1 Events by involved object, so Baton's components record those.
//!
//! Recording never makes the work it describes wait. [`Recorder::publish`] decides at
//! once what the event becomes and queues the write; writer tasks send it. A ReplicaSet
//! that creates 500 pods, or a scheduler binding a thousand a second, does not pay a
//! round trip per event, and a full queue drops what does not fit, as client-go's
//! broadcaster does: an event is a report, not state.
//!
//! What an event becomes is client-go's correlation (its `EventCorrelator`), with its
//! numbers:
//! - **Repeats** (same object, type, reason and message) bump the count of the first one
//!   instead of adding another.
//! - **Similar events** (same object, type and reason, different messages): after ten in
//!   ten minutes, the rest bump one event whose message is the latest, prefixed with
//!   `(combined from similar events): `.
//! - **Spam:** a token bucket per source, object and reason allows a burst of 25 writes
//!   and one more every five minutes; what is over is not written, though a later write
//!   carries its count. client-go's bucket is per source and object; Baton's is also per
//!   reason, so that an autoscaler's repeated "metrics missing" warnings cannot use up the
//!   budget of its rescales.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;
use tokio::sync::{mpsc, Notify};

use crate::pod::now;

/// Normal or Warning, as Events carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

/// Events queued at most, over all writers (client-go's `maxQueuedEvents`).
const QUEUED_AT_MOST: usize = 1000;
/// Keys each correlation table remembers (client-go's `maxLruCacheEntries`).
const REMEMBERED: usize = 4096;
/// Different messages of one object, type and reason before they are combined.
const SIMILAR_AT_MOST: usize = 10;
const SIMILAR_WINDOW: Duration = Duration::from_secs(600);
const SPAM_BURST: f64 = 25.0;
const SPAM_REFILL: Duration = Duration::from_secs(300);
const COMBINED: &str = "(combined from similar events): ";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    component: String,
    /// `written`, `failed`, `filtered` (over the spam budget) or `dropped` (queue full).
    result: &'static str,
}

static COUNTS: LazyLock<Family<Labels, Counter>> = LazyLock::new(|| {
    let family = Family::<Labels, Counter>::default();
    crate::telemetry::register(|r| {
        r.register(
            "baton_events",
            "Events recorded by this process's components, by what became of them",
            family.clone(),
        )
    });
    family
});

fn count(component: &str, result: &'static str) {
    COUNTS
        .get_or_create(&Labels {
            component: component.to_string(),
            result,
        })
        .inc();
}

/// Records Events for one component (`default-scheduler`, `kubelet`, ...). Cheap to
/// clone; the writers end once the last clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    component: String,
    host: Option<String>,
    capacity: usize,
    writers: usize,
    correlator: Mutex<Correlator>,
    /// One queue per writer, started by the first event (so that a recorder can be made
    /// outside a runtime). An object's events always go to the same writer, so that its
    /// first write lands before the updates of its count.
    queues: OnceLock<Vec<mpsc::Sender<Write>>>,
    progress: Arc<Progress>,
}

/// Writes queued or under way, so that a test can wait for them.
#[derive(Default)]
struct Progress {
    open: AtomicUsize,
    idle: Notify,
}

impl Progress {
    fn done(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("component", &self.inner.component)
            .finish()
    }
}

impl Recorder {
    /// A recorder with one writer and client-go's queue of 1,000 events.
    pub fn new(client: Client, component: &str, host: Option<&str>) -> Self {
        Self::with_queue(client, component, host, QUEUED_AT_MOST, 1)
    }

    /// A recorder whose queue holds `capacity` events, sent by `writers` tasks. A
    /// component that records hundreds of events a second about different objects (the
    /// scheduler, the controller manager) wants a few writers; a hollow node, a small
    /// queue.
    pub fn with_queue(
        client: Client,
        component: &str,
        host: Option<&str>,
        capacity: usize,
        writers: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                component: component.into(),
                host: host.map(str::to_string),
                capacity: capacity.max(1),
                writers: writers.max(1),
                correlator: Mutex::new(Correlator::default()),
                queues: OnceLock::new(),
                progress: Arc::default(),
            }),
        }
    }

    /// Records an event about `object`, in the background. Nothing is returned: an event
    /// that could not be written must not fail the work it describes.
    pub fn publish(&self, object: &ObjectReference, type_: EventType, reason: &str, message: &str) {
        let inner = &self.inner;
        let t = now();
        let decided = inner
            .correlator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(object, type_, reason, message, Instant::now(), &t);
        let Some((write, shard)) = decided else {
            count(&inner.component, "filtered");
            return;
        };
        let Some(queues) = self.queues() else {
            tracing::debug!(reason, "no runtime to record an event on");
            return;
        };
        let event = self.event(object, type_, reason, write, t);
        inner.progress.open.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = queues[shard % queues.len()].try_send(event) {
            inner.progress.done();
            count(&inner.component, "dropped");
            tracing::debug!(error = %e, reason, "event dropped");
        }
    }

    /// Waits until every event published so far has been written or given up on.
    pub async fn flushed(&self) {
        let progress = &self.inner.progress;
        loop {
            let idle = progress.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if progress.open.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn queues(&self) -> Option<&Vec<mpsc::Sender<Write>>> {
        let inner = &self.inner;
        if let Some(q) = inner.queues.get() {
            return Some(q);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(inner.queues.get_or_init(|| {
            let each = (inner.capacity / inner.writers).max(1);
            (0..inner.writers)
                .map(|_| {
                    let (tx, rx) = mpsc::channel(each);
                    runtime.spawn(write_all(
                        inner.client.clone(),
                        inner.component.clone(),
                        inner.progress.clone(),
                        rx,
                    ));
                    tx
                })
                .collect()
        }))
    }

    fn event(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        decided: Decided,
        t: Time,
    ) -> Write {
        let inner = &self.inner;
        let event = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(decided.name.clone()),
                namespace: Some(namespace(object).to_string()),
                ..Default::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.into()),
            message: Some(decided.message),
            type_: Some(format!("{type_:?}")),
            source: Some(EventSource {
                component: Some(inner.component.clone()),
                host: inner.host.clone(),
            }),
            reporting_component: Some(inner.component.clone()),
            reporting_instance: inner.host.clone(),
            first_timestamp: Some(decided.first),
            last_timestamp: Some(t),
            count: Some(decided.count),
            ..Default::default()
        };
        Write {
            event,
            update: decided.count > 1,
        }
    }
}

fn namespace(object: &ObjectReference) -> &str {
    object.namespace.as_deref().unwrap_or("default")
}

/// One write: the whole event, and whether it should update an earlier one (its count,
/// last time and message) rather than create it.
#[derive(Debug)]
struct Write {
    event: Event,
    update: bool,
}

async fn write_all(
    client: Client,
    component: String,
    progress: Arc<Progress>,
    mut rx: mpsc::Receiver<Write>,
) {
    while let Some(w) = rx.recv().await {
        let ok = write(&client, w).await;
        count(&component, if ok { "written" } else { "failed" });
        progress.done();
    }
}

async fn write(client: &Client, w: Write) -> bool {
    let e = &w.event;
    let ns = e.metadata.namespace.as_deref().unwrap_or("default");
    let name = e.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let reason = e.reason.as_deref().unwrap_or_default();
    if w.update {
        let patch = json!({
            "count": e.count,
            "lastTimestamp": e.last_timestamp,
            "message": e.message,
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return true,
            // Gone (expired, deleted, or its first write was dropped): write it whole.
            Err(e) => tracing::debug!(error = %e, reason, "event update failed"),
        }
    }
    match api.create(&PostParams::default(), e).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, reason, "failed to record an event");
            false
        }
    }
}

/// What an event becomes: its name (new, or the earlier one it updates), its count, when
/// it was first seen, and its message.
#[derive(Debug, PartialEq)]
struct Decided {
    name: String,
    count: i32,
    first: Time,
    message: String,
}

/// client-go's correlation: repeats, similar events and spam (see the module's docs).
/// Pure bookkeeping, with the time passed in, so that it is tested without a clock.
#[derive(Default)]
struct Correlator {
    /// Per object, type and reason: the messages seen in the current window.
    similar: Bounded<Similar>,
    /// Per event key (the message, or the combined key): the event written for it.
    seen: Bounded<Seen>,
    /// Per object and reason: the spam budget.
    budget: Bounded<Bucket>,
    /// Makes names unique when two events of one object come in the same nanosecond.
    serial: u64,
}

struct Similar {
    messages: std::collections::HashSet<String>,
    since: Instant,
}

struct Seen {
    name: String,
    count: i32,
    first: Time,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Correlator {
    /// What to write for this event, and the writer it belongs to; `None` when it is over
    /// its spam budget (it is still counted).
    fn decide(
        &mut self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        at: Instant,
        t: &Time,
    ) -> Option<(Decided, usize)> {
        let object_key = format!(
            "{}\0{}\0{}\0{}\0{}",
            object.api_version.as_deref().unwrap_or(""),
            object.kind.as_deref().unwrap_or(""),
            namespace(object),
            object.name.as_deref().unwrap_or(""),
            object.uid.as_deref().unwrap_or("")
        );
        let similar_key = format!("{object_key}\0{type_:?}\0{reason}");

        let similar = self.similar.entry(&similar_key, || Similar {
            messages: Default::default(),
            since: at,
        });
        if at.duration_since(similar.since) > SIMILAR_WINDOW {
            similar.messages.clear();
            similar.since = at;
        }
        let combined = if similar.messages.contains(message) {
            false
        } else if similar.messages.len() < SIMILAR_AT_MOST {
            similar.messages.insert(message.to_string());
            false
        } else {
            true
        };
        let (key, message) = if combined {
            (similar_key.clone(), format!("{COMBINED}{message}"))
        } else {
            (format!("{similar_key}\0{message}"), message.to_string())
        };

        self.serial += 1;
        let serial = self.serial;
        let seen = self.seen.entry(&key, || Seen {
            // Named by the clock's nanoseconds, as client-go names events, not by the
            // event's time: that has whole seconds ([`now`]), and two recorders of one
            // object (the scheduler and a node, or a node restarted) would otherwise
            // pick the same name within a second, and the second event would be lost.
            name: format!(
                "{}.{:x}",
                object.name.as_deref().unwrap_or("object"),
                chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64 + serial
            ),
            count: 0,
            first: t.clone(),
        });
        seen.count += 1;
        let decided = Decided {
            name: seen.name.clone(),
            count: seen.count,
            first: seen.first.clone(),
            message,
        };

        let bucket = self.budget.entry(&similar_key, || Bucket {
            tokens: SPAM_BURST,
            at,
        });
        let refilled = at.duration_since(bucket.at).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        bucket.tokens = (bucket.tokens + refilled).min(SPAM_BURST);
        bucket.at = at;
        if bucket.tokens < 1.0 {
            return None;
        }
        bucket.tokens -= 1.0;

        let mut h = std::collections::hash_map::DefaultHasher::new();
        object_key.hash(&mut h);
        Some((decided, h.finish() as usize))
    }
}

/// A map that forgets the entries used longest ago once it holds more than
/// [`REMEMBERED`], half of them at a time, so that forgetting is cheap on average.
struct Bounded<V> {
    map: HashMap<String, (V, u64)>,
    tick: u64,
}

impl<V> Default for Bounded<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            tick: 0,
        }
    }
}

impl<V> Bounded<V> {
    fn entry(&mut self, key: &str, new: impl FnOnce() -> V) -> &mut V {
        self.tick += 1;
        if !self.map.contains_key(key) && self.map.len() >= REMEMBERED {
            let mut ticks: Vec<u64> = self.map.values().map(|(_, t)| *t).collect();
            let (_, cut, _) = ticks.select_nth_unstable(REMEMBERED / 2);
            let cut = *cut;
            self.map.retain(|_, (_, t)| *t > cut);
        }
        let tick = self.tick;
        let slot = self
            .map
            .entry(key.to_string())
            .or_insert_with(|| (new(), tick));
        slot.1 = tick;
        &mut slot.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn decide(
        c: &mut Correlator,
        object: &ObjectReference,
        reason: &str,
        message: &str,
        at: Instant,
    ) -> Option<Decided> {
        c.decide(object, EventType::Normal, reason, message, at, &now())
            .map(|(d, _)| d)
    }

    #[test]
    fn two_recorders_name_their_events_of_one_object_apart_within_a_second() {
        let at = Instant::now();
        let (mut a, mut b) = (Correlator::default(), Correlator::default());
        let t = now();
        let first = a
            .decide(&pod("p"), EventType::Normal, "Scheduled", "m", at, &t)
            .unwrap()
            .0;
        let second = b
            .decide(&pod("p"), EventType::Normal, "Pulled", "m", at, &t)
            .unwrap()
            .0;
        assert_ne!(first.name, second.name);
    }

    #[test]
    fn a_repeat_bumps_the_count_of_the_first() {
        let (mut c, at) = (Correlator::default(), Instant::now());
        let first = decide(&mut c, &pod("a"), "BackOff", "restarting", at).unwrap();
        assert_eq!(first.count, 1);
        let again = decide(&mut c, &pod("a"), "BackOff", "restarting", at).unwrap();
        assert_eq!((again.name, again.count), (first.name.clone(), 2));
        assert_eq!(again.first, first.first);
        // Another object's same event is its own.
        let other = decide(&mut c, &pod("b"), "BackOff", "restarting", at).unwrap();
        assert_eq!(other.count, 1);
        assert_ne!(other.name, first.name);
    }

    #[test]
    fn after_ten_different_messages_the_rest_are_combined_into_one() {
        let (mut c, at) = (Correlator::default(), Instant::now());
        let rs = pod("web");
        let mut names = std::collections::HashSet::new();
        for i in 0..10 {
            let d = decide(
                &mut c,
                &rs,
                "SuccessfulCreate",
                &format!("Created pod: {i}"),
                at,
            );
            let d = d.unwrap();
            assert_eq!(d.count, 1);
            names.insert(d.name);
        }
        assert_eq!(names.len(), 10);
        let eleventh = decide(&mut c, &rs, "SuccessfulCreate", "Created pod: 10", at).unwrap();
        assert_eq!(
            (eleventh.message.as_str(), eleventh.count),
            ("(combined from similar events): Created pod: 10", 1)
        );
        let twelfth = decide(&mut c, &rs, "SuccessfulCreate", "Created pod: 11", at).unwrap();
        assert_eq!(twelfth.name, eleventh.name);
        assert_eq!(twelfth.count, 2);
        assert!(twelfth.message.ends_with("Created pod: 11"));
        // One of the first ten again is still a repeat of its own.
        let repeat = decide(&mut c, &rs, "SuccessfulCreate", "Created pod: 3", at).unwrap();
        assert_eq!(
            (repeat.count, repeat.message.as_str()),
            (2, "Created pod: 3")
        );
        // Ten minutes on, the window starts again.
        let later = at + SIMILAR_WINDOW + Duration::from_secs(1);
        let fresh = decide(&mut c, &rs, "SuccessfulCreate", "Created pod: 12", later).unwrap();
        assert_eq!(fresh.message, "Created pod: 12");
    }

    #[test]
    fn a_burst_over_the_budget_is_not_written_and_the_budget_refills() {
        let (mut c, at) = (Correlator::default(), Instant::now());
        let rs = pod("web");
        let written = (0..500)
            .filter_map(|i| decide(&mut c, &rs, "SuccessfulCreate", &format!("{i}"), at))
            .count();
        assert_eq!(written, 25);
        // Another reason about the same object has its own budget.
        assert!(decide(&mut c, &rs, "SuccessfulDelete", "gone", at).is_some());
        // Five minutes later, one more; its count carries what was not written.
        let later = at + SPAM_REFILL;
        let next = decide(&mut c, &rs, "SuccessfulCreate", "500", later).unwrap();
        assert_eq!(next.count, 500 - 10 + 1);
        assert!(decide(&mut c, &rs, "SuccessfulCreate", "501", later).is_none());
    }

    #[test]
    fn the_tables_stay_bounded_and_forget_the_oldest() {
        let mut b = Bounded::<u32>::default();
        *b.entry("kept", || 0) = 7;
        for i in 0..3 * REMEMBERED {
            b.entry(&i.to_string(), || 1);
            // Used all along: never the oldest.
            b.entry("kept", || 0);
        }
        assert!(b.map.len() <= REMEMBERED);
        assert_eq!(*b.entry("kept", || 0), 7);
    }

    /// The requests a [`counting_client`] was sent: method and body.
    type Calls = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

    /// A client whose API answers every write with 201 and counts them, slowly.
    fn counting_client(delay: Duration) -> (Client, Calls) {
        let calls: Calls = Arc::default();
        let seen = calls.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let seen = seen.clone();
            async move {
                let method = req.method().to_string();
                let body = http_body_util::BodyExt::collect(req.into_body())
                    .await?
                    .to_bytes();
                tokio::time::sleep(delay).await;
                let v: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                seen.lock().unwrap().push((method, v.clone()));
                let reply = json!({"apiVersion": "v1", "kind": "Event",
                    "metadata": {"name": "e", "namespace": "default"},
                    "involvedObject": {}});
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    http::Response::builder()
                        .status(201)
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            reply.to_string(),
                        )))
                        .unwrap(),
                )
            }
        });
        (Client::new(svc, "default"), calls)
    }

    #[tokio::test(start_paused = true)]
    async fn publishing_does_not_wait_for_the_api_and_a_full_queue_drops() {
        let (client, calls) = counting_client(Duration::from_secs(1));
        let r = Recorder::with_queue(client, "test", None, 4, 1);
        let started = tokio::time::Instant::now();
        for i in 0..20 {
            r.publish(&pod(&format!("p{i}")), EventType::Normal, "Scheduled", "ok");
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "publish waited");
        r.flushed().await;
        // The writer has not run yet: four wait in the queue, the rest are dropped.
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert!(calls.iter().all(|(m, _)| m == "POST"));
    }

    #[tokio::test]
    async fn an_objects_first_write_lands_before_its_count_is_updated() {
        let (client, calls) = counting_client(Duration::from_millis(1));
        let r = Recorder::with_queue(client, "test", Some("n1"), 100, 4);
        for _ in 0..3 {
            r.publish(&pod("a"), EventType::Warning, "BackOff", "restarting");
        }
        r.flushed().await;
        let calls = calls.lock().unwrap();
        let shape: Vec<_> = calls
            .iter()
            .map(|(m, v)| format!("{m} {}", v["count"]))
            .collect();
        assert_eq!(shape, ["POST 1", "PATCH 2", "PATCH 3"]);
        assert_eq!(calls[0].1["source"]["host"], "n1");
        assert_eq!(calls[0].1["type"], "Warning");
    }
}
