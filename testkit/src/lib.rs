//! # baton-testkit: waiting on a condition with a deadline, and a fake API server
//!
//! [`fake_api::FakeApi`] is an in-memory API server behind a [`kube::Client`], for unit
//! tests of controllers and of the node agent. [`process`] starts servers under test
//! without guessing free ports; [`etcd`] and [`redis`] start Debian's servers of those
//! names for a test; [`netns`] makes hosts of network namespaces, whose links a test cuts;
//! [`tmpfs`] mounts a small disk for a test to fill.
//!
//! Tests and benchmarks never sleep for a fixed time to let something happen: they poll a
//! condition until it holds, and fail with what they were waiting for once a deadline
//! passes. [`wait_until`] does it on a plain thread (tests that drive `kubectl` or child
//! processes), [`wait_until_async`] inside a tokio runtime. Polling starts at 10 ms and
//! backs off to 100 ms, so a quick condition is seen quickly and a slow one costs little.

pub mod etcd;
pub mod fake_api;
pub mod netns;
pub mod process;
pub mod redis;
pub mod tmpfs;

/// The directory of the crate whose test or bench is running. Cargo says it at run time;
/// `compiled` (the caller's `env!("CARGO_MANIFEST_DIR")`) is only the fallback, since it
/// may name another checkout when several share one target directory.
pub fn crate_dir(compiled: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(Into::into)
        .unwrap_or_else(|| compiled.into())
}

use std::future::Future;
use std::time::{Duration, Instant};

/// A condition did not hold in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub timeout: Duration,
}

const FIRST_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(100);

/// Polls `f` until it returns Some, for at most `timeout`.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let deadline = Instant::now() + timeout;
    let mut poll = FIRST_POLL;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                timeout,
            });
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// Polls the future `f` makes until it yields Some, for at most `timeout`.
pub async fn wait_until_async<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut f: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    // tokio's clock, so that a test with a paused clock waits in its own time.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = FIRST_POLL;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(MAX_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(v.unwrap(), 3);
    }

    #[test]
    fn says_what_it_waited_for_when_it_times_out() {
        let e = wait_until(Duration::from_millis(30), "never", || None::<()>).unwrap_err();
        assert_eq!(e.to_string(), "timed out after 30ms waiting for never");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn async_waits_follow_the_clock() {
        let t0 = tokio::time::Instant::now();
        let e = wait_until_async(Duration::from_millis(500), "never", || async { None::<()> })
            .await
            .unwrap_err();
        assert_eq!(e.what, "never");
        assert!(t0.elapsed() >= Duration::from_millis(500));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}
