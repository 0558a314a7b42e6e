//! The metrics of this process's control loops: the controllers' work queues and the
//! scheduler's attempts, gathered in one process-wide registry that the API server's
//! `/metrics` serves beside its own (as kube-apiserver, the scheduler and the
//! controller-manager each register into Kubernetes' process-wide legacy registry).
//!
//! Names follow Kubernetes' where they mean the same: `workqueue_work_duration_seconds`
//! and `workqueue_retries_total` per controller (`name`), and controller-runtime's
//! `controller_runtime_reconcile_total` (`controller`, `result`). A queue's depth is not
//! among them: kube-runtime's scheduler keeps its queue to itself, and a figure guessed
//! from outside would be wrong.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
    work: Family<QueueLabels, Histogram>,
    retries: Family<QueueLabels, Counter>,
    reconciles: Family<ReconcileLabels, Counter>,
}

static QUEUES: LazyLock<Queues> = LazyLock::new(|| {
    let q = Queues {
        work: Family::new_with_constructor(|| Histogram::new(duration_buckets())),
        retries: Family::default(),
        reconciles: Family::default(),
    };
    register(|r| {
        r.register(
            "workqueue_work_duration_seconds",
            "How long processing an item from workqueue takes in seconds.",
            q.work.clone(),
        );
        r.register(
            "workqueue_retries",
            "Total number of retries handled by workqueue.",
            q.retries.clone(),
        );
        r.register(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller.",
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

/// Wraps a kube-runtime reconciler so that each run is counted and timed under `name`.
pub fn timed<K, C, E, Fut>(
    name: &'static str,
    mut reconcile: impl FnMut(Arc<K>, Arc<C>) -> Fut,
) -> impl FnMut(Arc<K>, Arc<C>) -> Timed<Fut>
where
    Fut: Future<Output = Result<Action, E>>,
{
    move |obj, ctx| Timed {
        inner: Box::pin(reconcile(obj, ctx)),
        name,
        started: Instant::now(),
    }
}

/// A reconcile being timed ([`timed`]).
#[derive(Debug)]
pub struct Timed<F> {
    inner: Pin<Box<F>>,
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

    fn scrape() -> String {
        let mut out = String::new();
        encode_into(&mut out);
        out
    }

    #[tokio::test]
    async fn reconciles_are_timed_and_counted_by_outcome() {
        let mut ok = timed("test-ok", |_: Arc<()>, _: Arc<()>| async {
            Ok::<_, std::io::Error>(Action::await_change())
        });
        ok(Arc::new(()), Arc::new(())).await.unwrap();
        let mut later = timed("test-ok", |_: Arc<()>, _: Arc<()>| async {
            Ok::<_, std::io::Error>(Action::requeue(Duration::from_secs(5)))
        });
        later(Arc::new(()), Arc::new(())).await.unwrap();
        let mut failing = timed("test-failing", |_: Arc<()>, _: Arc<()>| async {
            Err::<Action, _>(std::io::Error::other("no"))
        });
        failing(Arc::new(()), Arc::new(())).await.unwrap_err();
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
