//! Running a new instance of a container's component inside a running pod: what
//! `kubectl exec` and `kubectl debug` mean for components, which have no shell and no
//! process to join.
//!
//! The instance is a `wasi:cli` command with the caller's argv and stdio. It lives in the
//! pod, as a process does in a container's namespaces: it shares the pod's localhost and
//! Service names, sees the volumes and environment it is given, and counts against the
//! pod's CPU quota, memory limit and socket caps. It belongs to the pod twice over: the
//! [`Execution`] that the caller holds stops it when dropped (a client that goes away
//! frees it), and the pod's shutdown stops every execution still running.
//!
//! With a terminal (`kubectl exec -t`) the guest's stdio reports itself as one
//! (wasi:cli's `terminal-stdin`/`-stdout`), and its size at the start is given as
//! `COLUMNS` and `LINES`, as a shell would export them: WASI 0.2 has no call for a
//! terminal's size, so a later resize does not reach the guest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::Instrument;
use wasmtime::component::Component;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream, StdinStream, StdoutStream};

use crate::cli::{exit_of, wasi_ctx, Mount};
use crate::error::ShimError;
use crate::net::PodNet;
use crate::runtime::{ComponentKind, Runtime};
use crate::usage::{TaskCommand, TaskKind};
use crate::Exit;

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    /// The container it runs in: what it uses is counted as that container's.
    pub container: String,
    /// The whole argv, the command's name first, as `kubectl exec POD -- ARGS` gives it.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Linear memory cap; 0 means the runtime's maximum.
    pub memory_bytes: usize,
    /// The platform interfaces it is granted (its container's), and their backing.
    pub platform: crate::platform::Platform,
}

/// The instance's stdio. Without stdin the guest reads end-of-file at once.
pub struct ExecIo {
    pub stdin: Option<Box<dyn AsyncRead + Send + Sync + Unpin>>,
    pub stdout: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    pub stderr: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    /// Whether the stdio is a terminal, and its size.
    pub terminal: Option<Terminal>,
}

/// A terminal's size in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Terminal {
    pub columns: u16,
    pub rows: u16,
}

/// Waits until what was written to `out` has left for its destination, for at most a
/// few seconds (a client that stopped reading does not hold the command's end).
async fn drain<S: StdoutStream>(out: &S) {
    use wasmtime_wasi::p2::Pollable as _;
    let mut stream = out.p2_stream();
    if stream.flush().is_ok() {
        let _ = tokio::time::timeout(DRAIN_WAIT, stream.ready()).await;
    }
}

/// How long an ended command's output may take to reach its client.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// An output stream written from two places: the guest's stderr, and its wasi:logging
/// records.
struct Shared<S>(Arc<S>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: wasmtime_wasi::cli::IsTerminal> wasmtime_wasi::cli::IsTerminal for Shared<S> {
    fn is_terminal(&self) -> bool {
        self.0.is_terminal()
    }
}

impl<S: StdoutStream + Sync> StdoutStream for Shared<S> {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        self.0.async_stream()
    }

    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        self.0.p2_stream()
    }
}

/// One of the guest's stdio streams, reported to it as a terminal.
struct OnTerminal<S>(S);

impl<S> wasmtime_wasi::cli::IsTerminal for OnTerminal<S> {
    fn is_terminal(&self) -> bool {
        true
    }
}

impl<S: StdinStream> StdinStream for OnTerminal<S> {
    fn async_stream(&self) -> Box<dyn AsyncRead + Send + Sync> {
        self.0.async_stream()
    }

    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::InputStream> {
        self.0.p2_stream()
    }
}

impl<S: StdoutStream> StdoutStream for OnTerminal<S> {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        self.0.async_stream()
    }

    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        self.0.p2_stream()
    }
}

impl std::fmt::Debug for ExecIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("stdin", &self.stdin.is_some())
            .finish_non_exhaustive()
    }
}

/// How much of a guest's output is taken before its write waits for the reader: enough
/// for a line or a small file, small enough that a stalled client holds the guest back
/// rather than the node's memory.
const STDOUT_BUDGET: usize = 64 << 10;

/// A running execution. Dropping it stops the instance at the guest's next tick.
#[derive(Debug)]
pub struct Execution {
    task: JoinHandle<Exit>,
}

impl Execution {
    /// Waits for the instance to end. A pod that stops first ends it as a stop ends a
    /// process (143).
    pub async fn wait(&mut self) -> Exit {
        match (&mut self.task).await {
            Ok(exit) => exit,
            Err(e) if e.is_cancelled() => Exit {
                code: 143,
                reason: "Error",
                message: "the pod is stopping".into(),
            },
            Err(e) => Exit {
                code: 128,
                reason: "Error",
                message: format!("exec task failed: {e}"),
            },
        }
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The executions running in one pod; closed when the pod stops.
#[derive(Debug)]
pub(crate) struct Executions {
    /// None once the pod is stopping: nothing new may start.
    running: Mutex<Option<HashMap<u64, AbortHandle>>>,
    next: AtomicU64,
    /// Execution futures not yet dropped, finished or aborted.
    live: AtomicUsize,
    gone: tokio::sync::Notify,
}

/// Held by an execution's future: its drop is the end of everything the instance held.
struct Live {
    id: u64,
    set: Arc<Executions>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(m) = self.set.lock().as_mut() {
            m.remove(&self.id);
        }
        self.set.live.fetch_sub(1, Ordering::AcqRel);
        self.set.gone.notify_waiters();
    }
}

impl Executions {
    pub(crate) fn new() -> Self {
        Self {
            running: Mutex::new(Some(HashMap::new())),
            next: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            gone: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, AbortHandle>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every execution and refuses new ones; returns once all their futures, with
    /// the sockets they hold, are gone.
    pub(crate) async fn close(&self) {
        self.abort_all();
        loop {
            let gone = self.gone.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout(crate::pod::GONE_WAIT, gone)
                .await
                .is_err()
            {
                tracing::warn!("an exec instance is still not gone after its pod stopped");
                return;
            }
        }
    }

    /// Stops every execution now and refuses new ones, without waiting.
    pub(crate) fn abort_all(&self) {
        if let Some(m) = self.lock().take() {
            for a in m.values() {
                a.abort();
            }
        }
    }
}

/// A pod's handle for starting executions in it: cheap to clone, and usable while the
/// pod's owner runs and stops its containers.
#[derive(Clone)]
pub struct PodHandle {
    pub(crate) rt: Runtime,
    pub(crate) net: Arc<PodNet>,
    pub(crate) execs: Arc<Executions>,
}

impl std::fmt::Debug for PodHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodHandle")
            .field("ip", &self.net.ip)
            .finish_non_exhaustive()
    }
}

impl PodHandle {
    /// The pod's address: what `localhost` means inside it.
    pub fn ip(&self) -> IpAddr {
        self.net.ip
    }

    /// Executions running in the pod now.
    pub fn executions(&self) -> usize {
        self.execs.live.load(Ordering::Acquire)
    }

    /// Whether [`exec`](Self::exec) would start `component` on `platform`, checked
    /// without starting it.
    pub fn can_exec(
        &self,
        component: &Component,
        platform: &crate::Platform,
    ) -> Result<(), ShimError> {
        // An HTTP component is not a command even if it exports `wasi:cli/run` too
        // (toolchains add one that only panics).
        if self.rt.kind(component)? != ComponentKind::Cli {
            return Err(ShimError::NotACommand);
        }
        platform.admit(&self.rt.imports(component))
    }

    /// Starts `component` as a command in the pod. A component without a `wasi:cli/run`
    /// export (a wasi:http proxy) cannot be run so: [`ShimError::NotACommand`].
    pub fn exec(
        &self,
        component: &Component,
        spec: ExecSpec,
        io: ExecIo,
    ) -> Result<Execution, ShimError> {
        self.can_exec(component, &spec.platform)?;
        let mut env = spec.env.clone();
        if let Some(t) = io.terminal {
            for (k, v) in [
                ("TERM", "xterm".to_string()),
                ("COLUMNS", t.columns.to_string()),
                ("LINES", t.rows.to_string()),
            ] {
                if !env.iter().any(|(n, _)| n == k) {
                    env.push((k.to_string(), v));
                }
            }
        }
        let mut wasi = wasi_ctx(&env, &spec.argv, &spec.mounts, Some(&self.net))?;
        let (stdout, stderr) = (
            Shared(Arc::new(AsyncStdoutStream::new(STDOUT_BUDGET, io.stdout))),
            Shared(Arc::new(AsyncStdoutStream::new(STDOUT_BUDGET, io.stderr))),
        );
        let log_sink: Box<dyn StdoutStream> = Box::new(stderr.clone());
        let outputs = [stdout.clone(), stderr.clone()];
        let stdin = io.stdin.map(AsyncStdinStream::new);
        if io.terminal.is_some() {
            wasi.stdout(OnTerminal(stdout)).stderr(OnTerminal(stderr));
            if let Some(stdin) = stdin {
                wasi.stdin(OnTerminal(stdin));
            }
        } else {
            wasi.stdout(stdout).stderr(stderr);
            if let Some(stdin) = stdin {
                wasi.stdin(stdin);
            }
        }
        let wasi = wasi.build();
        let mut running = self.execs.lock();
        let Some(map) = running.as_mut() else {
            return Err(ShimError::Setup("the pod is stopping".into()));
        };
        let id = self.execs.next.fetch_add(1, Ordering::Relaxed);
        self.execs.live.fetch_add(1, Ordering::AcqRel);
        let live = Live {
            id,
            set: self.execs.clone(),
        };
        let (rt, net, component) = (self.rt.clone(), self.net.clone(), component.clone());
        let name = spec.argv.first().cloned().unwrap_or_default();
        let task = self.net.usage.task(
            &spec.container,
            TaskKind::Exec,
            TaskCommand::Argv(spec.argv.clone()),
        );
        let store_task = task.clone();
        let run = async move {
            let _live = live;
            let platform = crate::platform::StorePlatform {
                platform: spec.platform,
                log_sink: Some(log_sink),
            };
            let (mut store, oom) = rt.store(
                (wasi, platform),
                spec.memory_bytes,
                None,
                net,
                None,
                Some(store_task),
            );
            let result = rt.call_run(&mut store, &component, None, None).await;
            // A 0.3 guest's writes are done once the host has taken them, not once they
            // have reached the client: what it printed last is sent before its exit is.
            for out in &outputs {
                drain(out).await;
            }
            exit_of(result, oom.load(Ordering::Relaxed))
        }
        .instrument(tracing::debug_span!("wasm_exec", command = %name));
        let task = self.rt.spawn_guest(&self.net.usage, Some(task), run);
        map.insert(id, task.abort_handle());
        Ok(Execution { task })
    }
}
