//! Leader election on a Lease, as kube-controller-manager and kube-scheduler do it: of
//! several control-plane members, one runs the control loops at a time.
//!
//! ## Expected flow
//! A candidate takes the Lease if nobody holds it or its holder has not renewed it within
//! the lease duration, then renews it every third of the duration. Every write carries
//! the Lease's resourceVersion, so two candidates cannot both win the same round. While
//! it holds the Lease, the candidate runs its work; when it cannot renew for a whole
//! lease duration (or sees another holder), it stops the work and campaigns again.
//!
//! ## Caveats
//! A leader cut off from the API server stops its work one lease duration after its last
//! renewal, which is when others may take over; clock skew between members beyond a
//! fraction of the duration can overlap the two.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

/// Who campaigns for what.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
}

fn now() -> MicroTime {
    MicroTime(crate::pod::now().0)
}

/// One round: Ok(true) if we hold the Lease after it.
async fn try_acquire_or_renew(api: &Api<Lease>, e: &Election) -> Result<bool, kube::Error> {
    let spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(e.identity.clone()),
        lease_duration_seconds: Some(e.lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&e.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(e.name.clone()),
                namespace: Some(e.namespace.clone()),
                ..Default::default()
            },
            spec: Some(spec(0)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(err) => Err(err),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let mine = current.holder_identity.as_deref() == Some(e.identity.as_str());
    let expired = current.renew_time.as_ref().is_none_or(|t| {
        let d = current.lease_duration_seconds.unwrap_or(15).max(1) as i64;
        (crate::pod::now().0 - t.0).num_seconds() >= d
    });
    let free = current.holder_identity.as_deref().is_none_or(str::is_empty);
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
    match api.replace(&e.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

/// Campaigns until `shutdown`; runs `work(stopped)` whenever this candidate leads, where
/// `stopped` completes when leadership is lost (or at shutdown).
pub async fn run<W, Fut>(client: Client, e: Election, shutdown: impl Future<Output = ()>, work: W)
where
    W: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let retry = (e.lease_duration / 3).max(Duration::from_millis(200));
    tokio::pin!(shutdown);
    loop {
        // Campaign.
        loop {
            match try_acquire_or_renew(&api, &e).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => tracing::debug!(error = %err, "leader election round failed"),
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        tracing::info!(lease = %e.name, identity = %e.identity, "became the leader");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(work(stop_rx));
        let mut renewed = Instant::now();
        let lost = loop {
            tokio::select! {
                _ = &mut shutdown => break false,
                _ = &mut task => break true,
                _ = tokio::time::sleep(retry) => {}
            }
            match try_acquire_or_renew(&api, &e).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break true,
                Err(err) => {
                    tracing::warn!(error = %err, "renewing the leader lease failed");
                    if renewed.elapsed() >= e.lease_duration {
                        break true;
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut task).await;
        if !lost {
            return;
        }
        tracing::warn!(lease = %e.name, identity = %e.identity, "lost the leader lease");
    }
}
