//! Running `wasi:cli/run` components to completion.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use wasmtime::component::Component;
use wasmtime::Store;
use wasmtime_wasi::p2::bindings::Command;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder};

use crate::host::Host;
use crate::logs::ContainerLog;
use crate::net::PodNet;
use crate::platform::StorePlatform;

use crate::error::{chain, ShimError};
use crate::runtime::{ComponentKind, DeadlineExceeded, Runtime};
use crate::usage::{AbortOnDrop, Task, TaskCommand, TaskKind};
use crate::Exit;

/// A host directory the guest sees at `guest_path`; nothing else of the host is visible.
#[derive(Clone, Debug)]
pub struct Mount {
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
}

/// A process's standard input, handed to the process once while the node keeps the
/// writing end (`kubectl attach`). Without one, a process reads end-of-file.
#[derive(Clone, Default)]
pub struct StdinPipe(
    Arc<std::sync::Mutex<Option<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>>>>,
);

impl StdinPipe {
    pub fn new(reader: impl tokio::io::AsyncRead + Send + Sync + Unpin + 'static) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(Box::new(reader)))))
    }

    fn take(&self) -> Option<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for StdinPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StdinPipe")
    }
}

/// How to run one CLI component.
#[derive(Clone, Debug, Default)]
pub struct CliSpec {
    /// Its standard input, if it has one (`stdin: true`).
    pub stdin: Option<StdinPipe>,
    /// argv[1..]; argv[0] is the component's name.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Linear memory cap; 0 means the runtime's maximum.
    pub memory_bytes: usize,
    /// Wall-clock budget; None runs until the guest returns.
    pub timeout: Option<Duration>,
    /// Whether the guest may open TCP sockets.
    pub network: bool,
    /// Captured stdout/stderr is cut at this many bytes each.
    pub output_limit: usize,
    /// Write stdout and stderr to this container log instead of capturing them.
    pub log: Option<ContainerLog>,
    /// The platform interfaces it is granted, and their backing.
    pub platform: crate::platform::Platform,
}

/// The end of a CLI run, with what it printed.
#[derive(Debug)]
pub struct CliOutcome {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A guest's WASI context without its stdio, which each caller gives.
pub(crate) fn wasi_ctx(
    spec_env: &[(String, String)],
    args: &[String],
    mounts: &[Mount],
    network: Option<&Arc<PodNet>>,
) -> Result<WasiCtxBuilder, ShimError> {
    let mut b = WasiCtx::builder();
    b.args(args).envs(spec_env);
    for m in mounts {
        let perms = if m.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&m.host_path, &m.guest_path, perms)
            .map_err(|e| {
                ShimError::Setup(format!(
                    "mounting {} at {}: {}",
                    m.host_path.display(),
                    m.guest_path,
                    chain(&e)
                ))
            })?;
    }
    if let Some(pod) = network {
        b.socket_addr_check(crate::net::addr_check(pod.clone()))
            .allow_tcp(true)
            .allow_udp(true)
            .allow_ip_name_lookup(true);
    }
    Ok(b)
}

/// Classifies how a guest stopped.
pub(crate) fn exit_of(result: wasmtime::Result<()>, oom: bool) -> Exit {
    match result {
        Ok(()) => Exit {
            code: 0,
            reason: "Completed",
            message: String::new(),
        },
        Err(e) => {
            if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
                let reason = if *code == 0 { "Completed" } else { "Error" };
                return Exit {
                    code: *code,
                    reason,
                    message: String::new(),
                };
            }
            if e.downcast_ref::<DeadlineExceeded>().is_some() {
                return Exit {
                    code: 137,
                    reason: "DeadlineExceeded",
                    message: chain(&e),
                };
            }
            if oom {
                return Exit {
                    code: 137,
                    reason: "OOMKilled",
                    message: format!("memory limit reached: {}", chain(&e)),
                };
            }
            Exit {
                code: 1,
                reason: "Error",
                message: chain(&e),
            }
        }
    }
}

impl Runtime {
    /// Instantiates a command in `store` and runs its `wasi:cli/run`, as WASI 0.2 or 0.3
    /// by what the component exports. `started` is when the run was asked for, to
    /// record the instance's start time.
    pub(crate) async fn call_run(
        &self,
        store: &mut Store<Host>,
        component: &Component,
        timeout: Option<Duration>,
        started: Option<Instant>,
    ) -> wasmtime::Result<()> {
        let status = if self.is_wasi_03(component) {
            let cmd = wasmtime_wasi::p3::bindings::Command::instantiate_async(
                &mut *store,
                component,
                &self.linker,
            )
            .await?;
            if let Some(t) = started {
                self.stats.instance_started(t.elapsed());
            }
            // A 0.3 guest may wait on a future that never resolves, running no code
            // that an epoch tick could stop: its deadline is kept by the clock too.
            let call = store.run_concurrent(async |acc| cmd.wasi_cli_run().call_run(acc).await);
            match timeout {
                Some(t) => tokio::time::timeout(t, call)
                    .await
                    .map_err(|_| wasmtime::Error::new(DeadlineExceeded))???,
                None => call.await??,
            }
        } else {
            let cmd = Command::instantiate_async(&mut *store, component, &self.linker).await?;
            if let Some(t) = started {
                self.stats.instance_started(t.elapsed());
            }
            cmd.wasi_cli_run().call_run(&mut *store).await?
        };
        status.map_err(|()| wasmtime::Error::msg("the program returned an error"))
    }

    /// Runs a CLI component to completion.
    pub async fn run_cli(
        &self,
        component: &Component,
        name: &str,
        spec: &CliSpec,
    ) -> Result<CliOutcome, ShimError> {
        let net = self.loopback_net();
        let (rt, component, name, spec) = (
            self.clone(),
            component.clone(),
            name.to_string(),
            spec.clone(),
        );
        let usage = net.usage.clone();
        let mut argv = vec![name.clone()];
        argv.extend(spec.args.iter().cloned());
        let task = usage.task(&name, TaskKind::Process, TaskCommand::Argv(argv));
        let store_task = task.clone();
        let run = async move {
            rt.run_cli_with(&component, &name, &spec, net, Some(store_task))
                .await
        };
        let mut task = AbortOnDrop::new(self.spawn_guest(&usage, Some(task), run));
        task.join()
            .await
            .unwrap_or_else(|e| Err(ShimError::Setup(format!("component task failed: {e}"))))
    }

    pub(crate) async fn run_cli_with(
        &self,
        component: &Component,
        name: &str,
        spec: &CliSpec,
        net: Arc<PodNet>,
        task: Option<Arc<Task>>,
    ) -> Result<CliOutcome, ShimError> {
        self.expect_kind(component, ComponentKind::Cli)?;
        spec.platform.admit(&self.imports(component))?;
        let started = self.clock();
        let tally = task.as_ref().map(|t| t.tally().clone());
        let limit = if spec.output_limit == 0 {
            1 << 20
        } else {
            spec.output_limit
        };
        let (stdout, stderr) = (MemoryOutputPipe::new(limit), MemoryOutputPipe::new(limit));
        let mut args = vec![name.to_string()];
        args.extend(spec.args.iter().cloned());
        let mut wasi = wasi_ctx(&spec.env, &args, &spec.mounts, spec.network.then_some(&net))?;
        let log_sink: Box<dyn wasmtime_wasi::cli::StdoutStream> = match &spec.log {
            Some(log) => {
                wasi.stdout(log.stdout()).stderr(log.stderr());
                Box::new(log.stderr())
            }
            None => {
                wasi.stdout(stdout.clone()).stderr(stderr.clone());
                Box::new(stderr.clone())
            }
        };
        if let Some(stdin) = spec.stdin.as_ref().and_then(StdinPipe::take) {
            wasi.stdin(wasmtime_wasi::cli::AsyncStdinStream::new(stdin));
        }
        let wasi = wasi.build();
        // A process is stopped by aborting its task; no kill flag is needed.
        let platform = StorePlatform {
            platform: spec.platform.clone(),
            log_sink: Some(log_sink),
        };
        let (mut store, oom) = self.store(
            (wasi, platform),
            spec.memory_bytes,
            spec.timeout,
            net,
            None,
            task,
        );
        let run = self.call_run(&mut store, component, spec.timeout, started);
        let result = run
            .instrument(tracing::debug_span!("wasm_cli", component = name))
            .await;
        let exit = exit_of(result, oom.load(Ordering::Relaxed));
        if let Some(t) = &tally {
            t.exits.record(exit.reason);
        }
        drop(store);
        if let Some(log) = &spec.log {
            let _ = log.flush();
        }
        Ok(CliOutcome {
            exit,
            stdout: stdout.contents().to_vec(),
            stderr: stderr.contents().to_vec(),
        })
    }
}
