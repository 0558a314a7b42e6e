//! The metrics of this process's control loops: the controllers' work queues and the
//! scheduler's attempts, gathered in one process-wide registry that the API server's
//! `/metrics` serves beside its own (as kube-apiserver, the scheduler and the
//! controller-manager each register into Kubernetes' process-wide legacy registry).
//!
//! Names follow Kubernetes' where they mean the same: client-go's work queue metrics
//! per controller (`name`): `workqueue_depth`, `workqueue_adds_total`,
//! `workqueue_queue_duration_seconds`, `workqueue_work_duration_seconds` and
//! `workqueue_retries_total`; and controller-runtime's `controller_runtime_reconcile_total`
//! (`controller`, `result`).
//!
//! kube-runtime's scheduler keeps its queue to itself, so a [`WorkQueue`] watches it from
//! both ends: the triggers going in (each object, each owner of a changed child, each key
//! a mapper gives) and the reconciles coming out. A key is queued from its first trigger
//! until its reconcile starts; triggers for a key already queued are one add, as in
//! client-go. A requeue (an error's retry, a reconcile's `requeue_after`) comes due inside
//! kube-runtime; it is counted as an add when its reconcile starts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of work and attempt durations, in seconds: Kubernetes' exponential
/// 1 ms … 10 s.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0,
    ]
    .into_iter()
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds metrics to the process-wide registry. Each caller registers once (from a
/// `LazyLock`), however many schedulers or controller managers a process starts.
pub fn register(f: impl FnOnce(&mut Registry)) {
    f(&mut registry());
}

/// Writes the process-wide registry in the OpenMetrics text format, without the closing
/// `# EOF`, so that it can follow another registry's families.
pub fn encode_into(out: &mut String) {
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode_registry(out, &registry());
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: &'static str,
}

/// The work queues' metrics: one family each, labelled by controller.
struct Queues {
    depth: Family<QueueLabels, Gauge>,
    adds: Family<QueueLabels, Counter>,
    waits: Family<QueueLabels, Histogram>,
    work: Family<QueueLabels, Histogram>,
    retries: Family<QueueLabels, Counter>,
    reconciles: Family<ReconcileLabels, Counter>,
}

static QUEUES: LazyLock<Queues> = LazyLock::new(|| {
    let q = Queues {
        depth: Family::default(),
        adds: Family::default(),
        waits: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
        work: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
        retries: Family::default(),
        reconciles: Family::default(),
    };
    register(|r| {
        r.register(
            "workqueue_depth",
            "Current depth of workqueue",
            q.depth.clone(),
        );
        r.register(
            "workqueue_adds",
            "Total number of adds handled by workqueue",
            q.adds.clone(),
        );
        r.register(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            q.waits.clone(),
        );
        r.register(
            "workqueue_work_duration_seconds",
            "How long processing an item from workqueue takes in seconds",
            q.work.clone(),
        );
        r.register(
            "workqueue_retries",
            "Total number of retries handled by workqueue",
            q.retries.clone(),
        );
        r.register(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller",
            q.reconciles.clone(),
        );
    });
    q
});

/// Records one reconcile of controller `name`: how long it took and how it ended. An
/// error is a retry, since every controller's error policy requeues.
pub fn record_reconcile(name: &str, took: Duration, outcome: Outcome) {
    let q = &*QUEUES;
    let queue = QueueLabels {
        name: name.to_string(),
    };
    q.work.get_or_create(&queue).observe(took.as_secs_f64());
    if outcome == Outcome::Error {
        q.retries.get_or_create(&queue).inc();
    }
    q.reconciles
        .get_or_create(&ReconcileLabels {
            controller: name.to_string(),
            result: outcome.label(),
        })
        .inc();
}

/// How a reconcile ended, as controller-runtime labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// It asked to be run again after a while.
    Requeue,
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Requeue => "requeue_after",
            Outcome::Error => "error",
        }
    }
}

/// One controller's work queue, watched from outside kube-runtime's scheduler (see the
/// module's introduction). Cheap to clone.
#[derive(Clone, Debug)]
pub struct WorkQueue {
    name: &'static str,
    /// Queued keys (`namespace/name`) and when each was first triggered.
    pending: Arc<Mutex<HashMap<String, Instant>>>,
}

fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or(""))
}

impl WorkQueue {
    /// The queue of controller `name`, as the metrics label it.
    pub fn new(name: &'static str) -> Self {
        let queue = Self {
            name,
            pending: Arc::default(),
        };
        // Present at zero from the start, as client-go's are.
        queue.set_depth(0);
        queue
    }

    /// The controller's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn labels(&self) -> QueueLabels {
        QueueLabels {
            name: self.name.to_string(),
        }
    }

    fn set_depth(&self, depth: usize) {
        QUEUES
            .depth
            .get_or_create(&self.labels())
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A trigger for `key`: one add unless it is queued already.
    fn add(&self, key: String) {
        let depth = {
            let mut pending = self.pending();
            if pending.contains_key(&key) {
                return;
            }
            pending.insert(key, Instant::now());
            pending.len()
        };
        QUEUES.adds.get_or_create(&self.labels()).inc();
        self.set_depth(depth);
    }

    /// `key`'s reconcile starts: it leaves the queue.
    fn take(&self, key: &str) {
        let (waited, depth) = {
            let mut pending = self.pending();
            let waited = pending.remove(key).map(|at| at.elapsed());
            (waited, pending.len())
        };
        let labels = self.labels();
        // Not queued by a trigger: a requeue come due inside kube-runtime.
        if waited.is_none() {
            QUEUES.adds.get_or_create(&labels).inc();
        }
        QUEUES
            .waits
            .get_or_create(&labels)
            .observe(waited.unwrap_or_default().as_secs_f64());
        self.set_depth(depth);
    }

    /// Drops `key` without a reconcile: its object was gone when its turn came.
    fn forget(&self, key: &str) {
        let depth = {
            let mut pending = self.pending();
            pending.remove(key);
            pending.len()
        };
        self.set_depth(depth);
    }

    /// Counts the triggers of the controller's own objects (`Controller::for_shared_stream`).
    pub fn own<K: Resource, S: Stream<Item = Arc<K>>>(&self, s: S) -> impl Stream<Item = Arc<K>> {
        let queue = self.clone();
        s.inspect(move |o| {
            queue.add(key(
                o.meta().namespace.as_deref(),
                o.meta().name.as_deref().unwrap_or(""),
            ))
        })
    }

    /// Counts the triggers of changed children: each owner of kind `KOwner`
    /// (`Controller::owns_shared_stream`, which reconciles the same owners).
    pub fn owned<KOwner, K, S>(&self, s: S) -> impl Stream<Item = Arc<K>>
    where
        KOwner: Resource<DynamicType = ()>,
        K: Resource,
        S: Stream<Item = Arc<K>>,
    {
        let queue = self.clone();
        s.inspect(move |o| {
            let ns = o.meta().namespace.as_deref();
            for owner in o.meta().owner_references.iter().flatten() {
                if let Some(r) = ObjectRef::<KOwner>::from_owner_ref(ns, owner, ()) {
                    queue.add(key(r.namespace.as_deref(), &r.name));
                }
            }
        })
    }

    /// Counts the keys a mapper of shared objects triggers
    /// (`Controller::watches_shared_stream`).
    pub fn mapped<KOwner, K, I>(
        &self,
        mapper: impl Fn(Arc<K>) -> I + Send + Sync + 'static,
    ) -> impl Fn(Arc<K>) -> Vec<ObjectRef<KOwner>> + Send + Sync + 'static
    where
        KOwner: Resource,
        I: IntoIterator<Item = ObjectRef<KOwner>>,
    {
        self.mapped_values(mapper)
    }

    /// Counts the keys a mapper of any objects triggers (`Controller::watches`).
    pub fn mapped_values<KOwner, T, I>(
        &self,
        mapper: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> impl Fn(T) -> Vec<ObjectRef<KOwner>> + Send + Sync + 'static
    where
        KOwner: Resource,
        I: IntoIterator<Item = ObjectRef<KOwner>>,
    {
        let queue = self.clone();
        move |o| {
            let refs: Vec<_> = mapper(o).into_iter().collect();
            for r in &refs {
                queue.add(key(r.namespace.as_deref(), &r.name));
            }
            refs
        }
    }

    /// Takes note of what kube-runtime's controller reports: a key whose object was gone
    /// leaves the queue without a reconcile.
    pub fn observe<T, E1, E2>(&self, r: &Result<T, kube::runtime::controller::Error<E1, E2>>) {
        if let Err(kube::runtime::controller::Error::ObjectNotFound(r)) = r {
            self.forget(&key(r.namespace.as_deref(), &r.name));
        }
    }

    /// Wraps a kube-runtime reconciler so that each run leaves the queue, is counted and
    /// timed, and is traced: a span per run, continuing the trace of the write that last
    /// set the object's desired state ([`crate::trace`]).
    pub fn reconciler<K, C, E, Fut>(
        &self,
        mut reconcile: impl FnMut(Arc<K>, Arc<C>) -> Fut,
    ) -> impl FnMut(Arc<K>, Arc<C>) -> Timed<Fut>
    where
        K: Resource,
        Fut: Future<Output = Result<Action, E>>,
    {
        let queue = self.clone();
        move |obj, ctx| {
            let meta = obj.meta();
            let name = meta.name.as_deref().unwrap_or("");
            queue.take(&key(meta.namespace.as_deref(), name));
            let span = tracing::info_span!(
                target: crate::trace::TARGET,
                "reconcile",
                controller = queue.name,
                namespace = meta.namespace.as_deref().unwrap_or(""),
                name,
            );
            crate::trace::follow(&span, meta);
            Timed {
                inner: Box::pin(tracing::Instrument::instrument(reconcile(obj, ctx), span)),
                name: queue.name,
                started: Instant::now(),
            }
        }
    }
}

/// A reconcile being timed ([`WorkQueue::reconciler`]).
#[derive(Debug)]
pub struct Timed<F> {
    inner: Pin<Box<tracing::instrument::Instrumented<F>>>,
    name: &'static str,
    started: Instant,
}

impl<F, E> Future for Timed<F>
where
    F: Future<Output = Result<Action, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(self.inner.as_mut().poll(cx));
        let outcome = match &out {
            Err(_) => Outcome::Error,
            // Action keeps its requeue time private, but compares.
            Ok(a) if *a == Action::await_change() => Outcome::Success,
            Ok(_) => Outcome::Requeue,
        };
        record_reconcile(self.name, self.started.elapsed(), outcome);
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn scrape() -> String {
        let mut out = String::new();
        encode_into(&mut out);
        out
    }

    fn cm(ns: &str, name: &str, owner: Option<&str>) -> Arc<ConfigMap> {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some(ns.into());
        cm.metadata.name = Some(name.into());
        cm.metadata.owner_references = owner.map(|o| {
            vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    name: o.into(),
                    uid: "u".into(),
                    ..Default::default()
                },
            ]
        });
        Arc::new(cm)
    }

    fn line(text: &str, prefix: &str) -> String {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .to_string()
    }

    #[tokio::test]
    async fn a_queue_counts_each_key_once_until_its_reconcile_takes_it() {
        let queue = WorkQueue::new("test-queue");
        let depth = r#"workqueue_depth{name="test-queue"}"#;
        let adds = r#"workqueue_adds_total{name="test-queue"}"#;
        assert_eq!(line(&scrape(), depth), format!("{depth} 0"));
        // Two objects, one of them twice, and a child whose owner is the first: two keys.
        let triggers =
            futures::stream::iter([cm("a", "x", None), cm("a", "y", None), cm("a", "x", None)]);
        let children = futures::stream::iter([cm("a", "child", Some("x"))]);
        queue
            .own(triggers)
            .chain(queue.owned::<ConfigMap, _, _>(children))
            .collect::<Vec<_>>()
            .await;
        let mapper =
            queue.mapped(|_: Arc<ConfigMap>| [ObjectRef::<ConfigMap>::new("z").within("b")]);
        assert_eq!(mapper(cm("a", "other", None)).len(), 1);
        let text = scrape();
        assert_eq!(line(&text, depth), format!("{depth} 3"));
        assert_eq!(line(&text, adds), format!("{adds} 3"));
        let mut reconcile = queue.reconciler(|_: Arc<ConfigMap>, _: Arc<()>| async {
            Ok::<_, std::io::Error>(Action::await_change())
        });
        reconcile(cm("a", "x", None), Arc::new(())).await.unwrap();
        // z was gone by its turn: kube-runtime says so instead of reconciling.
        let gone: Result<(), kube::runtime::controller::Error<std::io::Error, std::io::Error>> =
            Err(kube::runtime::controller::Error::ObjectNotFound(
                ObjectRef::<ConfigMap>::new("z").within("b").erase(),
            ));
        queue.observe(&gone);
        let text = scrape();
        assert_eq!(line(&text, depth), format!("{depth} 1"));
        let waits = r#"workqueue_queue_duration_seconds_count{name="test-queue"}"#;
        assert_eq!(line(&text, waits), format!("{waits} 1"));
        // A requeue come due is an add when it runs.
        reconcile(cm("a", "x", None), Arc::new(())).await.unwrap();
        assert_eq!(line(&scrape(), adds), format!("{adds} 4"));
    }

    #[tokio::test]
    async fn reconciles_are_timed_and_counted_by_outcome() {
        let mut ok = WorkQueue::new("test-ok").reconciler(|_: Arc<ConfigMap>, _: Arc<()>| async {
            Ok::<_, std::io::Error>(Action::await_change())
        });
        ok(Arc::new(ConfigMap::default()), Arc::new(()))
            .await
            .unwrap();
        let mut later =
            WorkQueue::new("test-ok").reconciler(|_: Arc<ConfigMap>, _: Arc<()>| async {
                Ok::<_, std::io::Error>(Action::requeue(Duration::from_secs(5)))
            });
        later(Arc::new(ConfigMap::default()), Arc::new(()))
            .await
            .unwrap();
        let mut failing =
            WorkQueue::new("test-failing").reconciler(|_: Arc<ConfigMap>, _: Arc<()>| async {
                Err::<Action, _>(std::io::Error::other("no"))
            });
        failing(Arc::new(ConfigMap::default()), Arc::new(()))
            .await
            .unwrap_err();
        let text = scrape();
        for line in [
            r#"workqueue_work_duration_seconds_count{name="test-ok"} 2"#,
            r#"workqueue_retries_total{name="test-failing"} 1"#,
            r#"controller_runtime_reconcile_total{controller="test-ok",result="success"} 1"#,
            r#"controller_runtime_reconcile_total{controller="test-ok",result="requeue_after"} 1"#,
            r#"controller_runtime_reconcile_total{controller="test-failing",result="error"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
    }
}
