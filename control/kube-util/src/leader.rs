//! Leader election on a Lease, as kube-controller-manager and kube-scheduler do it: of
//! several control-plane members, one runs the control loops at a time.
//!
//! ## The model (client-go's)
//! Three durations, `retry_period < renew_deadline < lease_duration`:
//! - A **candidate** takes the Lease when nobody holds it, or when its record has not
//!   changed for `lease_duration` by the candidate's own clock since it last saw it
//!   change. Expiry is judged by observation, never by comparing the `renewTime` written
//!   by another machine with the local wall clock, so clock skew between members does not
//!   matter; only the rate of their clocks does.
//! - The **leader** renews every `retry_period`. It leads for `renew_deadline` from the
//!   start of its last successful renewal: the instant before the request was sent, which
//!   is no later than the record the others observe. Every attempt is cut off at that
//!   deadline, and at the deadline the leader stops its work: it signals the work, waits
//!   briefly, and then aborts it.
//! - So the old leader has stopped before `lease_duration` has passed since the others
//!   saw its last renewal, which is the earliest they can take over. The margin
//!   (`lease_duration - renew_deadline`) covers the work's wind-down.
//!
//! Every write carries the Lease's resourceVersion, so two candidates cannot both win the
//! same round.
//!
//! The API is reached through [`LeaseApi`], which `kube::Api<Lease>` implements; tests
//! put a fake behind it that can be partitioned.

use std::future::Future;
use std::time::Duration;

use crate::pod::now_micro;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// Who campaigns for what, and on which timings.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a candidate waits, without seeing the Lease change, before taking it.
    pub lease_duration: Duration,
    /// How long a leader leads without a successful renewal. Shorter than
    /// `lease_duration`; the difference is the time its work has to stop.
    pub renew_deadline: Duration,
    /// How often the leader renews and a candidate tries.
    pub retry_period: Duration,
}

impl Election {
    /// kube-controller-manager's timings: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The three calls leader election makes on the Lease.
pub trait LeaseApi {
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
    /// Replaces the Lease if its resourceVersion still matches (409 otherwise).
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
}

impl LeaseApi for Api<Lease> {
    async fn get(&self, name: &str) -> Result<Option<Lease>, kube::Error> {
        self.get_opt(name).await
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::create(self, &PostParams::default(), lease).await
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        Api::replace(self, name, &PostParams::default(), lease).await
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// What a candidate last saw of the Lease, and when (by its own clock).
#[derive(Default)]
struct Observed {
    record: Option<LeaseSpec>,
    at: Option<Instant>,
}

impl Observed {
    fn see(&mut self, record: &LeaseSpec) {
        if self.record.as_ref() != Some(record) {
            self.record = Some(record.clone());
            self.at = Some(Instant::now());
        }
    }
}

/// One round: Ok(true) if we hold the Lease after it.
async fn try_acquire_or_renew(
    api: &impl LeaseApi,
    e: &Election,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(e.identity.clone()),
        lease_duration_seconds: Some(e.lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(now_micro()),
        renew_time: Some(now_micro()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get(&e.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(e.name.clone()),
                namespace: Some(e.namespace.clone()),
                ..Default::default()
            },
            spec: Some(spec(0)),
        };
        return match api.create(&lease).await {
            Ok(made) => {
                observed.see(&made.spec.unwrap_or_default());
                Ok(true)
            }
            Err(err) if is_conflict(&err) => Ok(false),
            Err(err) => Err(err),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    observed.see(&current);
    let mine = current.holder_identity.as_deref() == Some(e.identity.as_str());
    let free = current.holder_identity.as_deref().is_none_or(str::is_empty);
    // The holder's own lease duration, as it wrote it, rules its expiry.
    let duration = current
        .lease_duration_seconds
        .map_or(e.lease_duration, |s| Duration::from_secs(s.max(1) as u64));
    let expired = observed.at.is_none_or(|at| at.elapsed() >= duration);
    if !(mine || expired || free) {
        return Ok(false);
    }
    let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
    let mut next = spec(transitions);
    if mine {
        next.acquire_time = current.acquire_time.clone();
    }
    lease.spec = Some(next);
    // The resourceVersion read above makes this a compare-and-swap.
    match api.replace(&lease).await {
        Ok(written) => {
            observed.see(&written.spec.unwrap_or_default());
            Ok(true)
        }
        Err(err) if is_conflict(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Campaigns until `shutdown`; runs `work(stopped)` whenever this candidate leads, where
/// `stopped` turns true when leadership ends (lost, or at shutdown). The work should
/// return soon after; it is aborted if it has not returned halfway through the margin
/// between `renew_deadline` and `lease_duration`.
pub async fn run<W, Fut>(client: Client, e: Election, shutdown: impl Future<Output = ()>, work: W)
where
    W: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    run_on(&api, e, shutdown, work).await
}

/// [`run`] against any [`LeaseApi`].
pub async fn run_on<W, Fut>(
    api: &impl LeaseApi,
    e: Election,
    shutdown: impl Future<Output = ()>,
    work: W,
) where
    W: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let retry = e.retry_period.max(Duration::from_millis(10));
    let wind_down = e.lease_duration.saturating_sub(e.renew_deadline) / 2;
    let mut observed = Observed::default();
    tokio::pin!(shutdown);
    loop {
        // Campaign. Leadership counts from before the winning request was sent.
        let mut renewed;
        loop {
            renewed = Instant::now();
            let round = tokio::time::timeout(
                e.renew_deadline,
                try_acquire_or_renew(api, &e, &mut observed),
            );
            match round.await {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(err)) => tracing::debug!(error = %err, "leader election round failed"),
                Err(_) => tracing::debug!("leader election round timed out"),
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        tracing::info!(lease = %e.name, identity = %e.identity, "became the leader");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(work(stop_rx));
        let lost = loop {
            let deadline = renewed + e.renew_deadline;
            tokio::select! {
                _ = &mut shutdown => break false,
                _ = &mut task => break true,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(lease = %e.name, "no renewal within the renew deadline");
                    break true;
                }
                _ = tokio::time::sleep(retry) => {}
            }
            let attempt = Instant::now();
            let round =
                tokio::time::timeout_at(deadline, try_acquire_or_renew(api, &e, &mut observed));
            match round.await {
                Ok(Ok(true)) => renewed = attempt,
                Ok(Ok(false)) => break true,
                Ok(Err(err)) => tracing::warn!(error = %err, "renewing the leader lease failed"),
                Err(_) => {
                    tracing::warn!(lease = %e.name, "no renewal within the renew deadline");
                    break true;
                }
            }
        };
        let _ = stop_tx.send(true);
        if tokio::time::timeout(wind_down, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
        if !lost {
            return;
        }
        tracing::warn!(lease = %e.name, identity = %e.identity, "lost the leader lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    /// The API server's Lease, shared by every member's view of it.
    #[derive(Default)]
    struct Server {
        lease: Mutex<Option<Lease>>,
        version: AtomicU64,
    }

    /// One member's connection: partitioned, its calls hang (or fail, if `fail_fast`).
    struct View {
        server: Arc<Server>,
        cut: AtomicBool,
        slow_writes: AtomicBool,
        fail_fast: bool,
    }

    fn conflict() -> kube::Error {
        kube::Error::Api(kube::core::ErrorResponse {
            status: "Failure".into(),
            message: "conflict".into(),
            reason: "Conflict".into(),
            code: 409,
        })
    }

    impl View {
        /// The network: 5 ms each way, except answers to writes while `slow_writes` is
        /// set, which take 1 s (so that a leader timing its lease from the answer rather
        /// than from the request is late, while the others see the write at once); or
        /// nothing at all while cut.
        async fn reach(&self, write_answer: bool) -> Result<(), kube::Error> {
            let slow = write_answer && self.slow_writes.load(Ordering::SeqCst);
            let ms = if slow { 1000 } else { 5 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if self.cut.load(Ordering::SeqCst) {
                if self.fail_fast {
                    return Err(kube::Error::Service("connection refused".into()));
                }
                std::future::pending::<()>().await;
            }
            Ok(())
        }

        fn stamp(&self, mut lease: Lease) -> Lease {
            let v = self.server.version.fetch_add(1, Ordering::SeqCst) + 1;
            lease.metadata.resource_version = Some(v.to_string());
            lease
        }
    }

    impl LeaseApi for View {
        async fn get(&self, _: &str) -> Result<Option<Lease>, kube::Error> {
            self.reach(false).await?;
            let got = self.server.lease.lock().unwrap().clone();
            self.reach(false).await?;
            Ok(got)
        }

        async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
            self.reach(false).await?;
            let made = {
                let mut slot = self.server.lease.lock().unwrap();
                if slot.is_some() {
                    return Err(conflict());
                }
                let made = self.stamp(lease.clone());
                *slot = Some(made.clone());
                made
            };
            self.reach(true).await?;
            Ok(made)
        }

        async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
            self.reach(false).await?;
            let made = {
                let mut slot = self.server.lease.lock().unwrap();
                let current = slot
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone());
                if current != lease.metadata.resource_version {
                    return Err(conflict());
                }
                let made = self.stamp(lease.clone());
                *slot = Some(made.clone());
                made
            };
            // The write landed; the answer may still be lost on the way back.
            self.reach(true).await?;
            Ok(made)
        }
    }

    /// Leading intervals: (member, from, to); `to` is None while it leads.
    type Log = Arc<Mutex<Vec<(usize, Instant, Option<Instant>)>>>;

    /// Ends a member's interval when its work ends, however it ends (returned or aborted).
    struct Leading(Log, usize);

    impl Drop for Leading {
        fn drop(&mut self) {
            let mut log = self.0.lock().unwrap();
            if let Some(i) = log
                .iter()
                .rposition(|(m, _, to)| *m == self.1 && to.is_none())
            {
                log[i].2 = Some(Instant::now());
            }
        }
    }

    /// Starts `n` members on one Lease; returns their views and the log of who led when.
    fn members(n: usize, fail_fast: bool, stubborn: bool) -> (Vec<Arc<View>>, Log) {
        let server = Arc::new(Server::default());
        let log: Log = Arc::default();
        let mut views = Vec::new();
        for id in 0..n {
            let view = Arc::new(View {
                server: server.clone(),
                cut: AtomicBool::new(false),
                slow_writes: AtomicBool::new(false),
                fail_fast,
            });
            views.push(view.clone());
            let log = log.clone();
            tokio::spawn(async move {
                let e = Election {
                    retry_period: Duration::from_millis(500),
                    ..Election::new("kube-system", "test", &format!("m{id}"))
                };
                run_on(&*view, e, std::future::pending(), move |mut stop| {
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push((id, Instant::now(), None));
                        let _leading = Leading(log, id);
                        // A stubborn work ignores the signal and must be aborted.
                        if stubborn {
                            std::future::pending::<()>().await;
                        }
                        let _ = stop.wait_for(|s| *s).await;
                    }
                })
                .await;
            });
        }
        (views, log)
    }

    fn leader_now(log: &Log) -> Option<usize> {
        let log = log.lock().unwrap();
        let open: Vec<usize> = log
            .iter()
            .filter(|(.., to)| to.is_none())
            .map(|l| l.0)
            .collect();
        assert!(open.len() <= 1, "two leaders at once: {log:?}");
        open.first().copied()
    }

    async fn wait_leader(log: &Log, not: Option<usize>) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(l) = leader_now(log).filter(|l| Some(*l) != not) {
                return l;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "no new leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn assert_no_overlap(log: &Log) {
        let log = log.lock().unwrap();
        for (i, a) in log.iter().enumerate() {
            for b in &log[i + 1..] {
                if a.0 == b.0 {
                    continue;
                }
                let a_end = a.2.unwrap_or(Instant::now() + Duration::from_secs(3600));
                let b_end = b.2.unwrap_or(Instant::now() + Duration::from_secs(3600));
                assert!(
                    a_end <= b.1 || b_end <= a.1,
                    "members {} and {} led at once: {a:?} {b:?}",
                    a.0,
                    b.0
                );
            }
        }
    }

    async fn partition_the_leader_repeatedly(fail_fast: bool, stubborn: bool) {
        let (views, log) = members(3, fail_fast, stubborn);
        let mut leader = wait_leader(&log, None).await;
        for _ in 0..4 {
            // The leader's last renewals are answered late, and then it is cut off.
            views[leader].slow_writes.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3)).await;
            views[leader].cut.store(true, Ordering::SeqCst);
            let next = wait_leader(&log, Some(leader)).await;
            views[leader].cut.store(false, Ordering::SeqCst);
            views[leader].slow_writes.store(false, Ordering::SeqCst);
            leader = next;
            // Everyone settles: the healed member sees the new holder and follows.
            tokio::time::sleep(Duration::from_secs(20)).await;
            assert_eq!(leader_now(&log), Some(leader));
        }
        assert_no_overlap(&log);
        assert!(log.lock().unwrap().len() >= 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partitioned_leader_stops_before_another_takes_over() {
        partition_the_leader_repeatedly(false, false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_calls_fail_stops_before_another_takes_over() {
        partition_the_leader_repeatedly(true, false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_ignores_the_signal_is_aborted_in_time() {
        partition_the_leader_repeatedly(false, true).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_lease_is_taken_only_after_a_full_lease_duration() {
        let (views, log) = members(1, false, false);
        wait_leader(&log, None).await;
        // A member that starts now sees a lease held by someone else, written long ago.
        views[0].cut.store(true, Ordering::SeqCst);
        let server = views[0].server.clone();
        let view = View {
            server,
            cut: AtomicBool::new(false),
            slow_writes: AtomicBool::new(false),
            fail_fast: false,
        };
        let t0 = Instant::now();
        let e = Election::new("kube-system", "test", "late");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let late = run_on(&view, e, std::future::pending(), move |_| {
            let tx = tx.lock().unwrap().take();
            async move {
                if let Some(tx) = tx {
                    let _ = tx.send(Instant::now());
                }
                std::future::pending::<()>().await
            }
        });
        let won = tokio::select! {
            _ = late => unreachable!(),
            won = rx => won.unwrap(),
        };
        assert!(won - t0 >= Duration::from_secs(15), "{:?}", won - t0);
    }
}
