//! Sandboxes whose containers are scripted, not run.
//!
//! A [`FakeSandboxes`] knows a few images by name. A server image serves until it is
//! stopped; a process image exits with a set code after a set time, or when the test
//! says so. Probes pass unless the test fails them. Everything goes by tokio's clock, so
//! with a paused clock a test walks a pod through minutes of restarts in milliseconds.
//! The same fake lets a hollow node carry thousands of pods without running any.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_wasm_shim::Exit;
use k8s_openapi::api::core::v1::{Container, Probe};
use tokio::sync::oneshot;

use crate::images::ImageError;
use crate::probe::ProbeError;
use crate::sandbox::{
    ContainerRun, ExitFuture, Lifetime, Pulled, Sandbox, SandboxConfig, Sandboxes, StartError,
    Started,
};
use crate::streams::{ExecError, PodStreams};

/// What an image does when started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Serves until stopped.
    Serve,
    /// Runs until the test ends it with [`FakeSandboxes::exit`].
    Run,
    /// Exits with `code` after `after`.
    Exit { after: Duration, code: i32 },
    /// Fails to start.
    FailStart,
}

/// A running container: which run it is, and for a process the way to end it.
type Run = (u64, Option<oneshot::Sender<Exit>>);

#[derive(Default)]
struct State {
    images: HashMap<String, Script>,
    /// What an image not named in `images` does; None: it fails to pull.
    any_image: Option<Script>,
    /// Containers (by name) whose probes fail.
    failing_probes: Vec<String>,
    /// Running containers, by sandbox key and name: which run it is, and the way to end
    /// a process. (By key first, so that a sandbox's end does not scan a hollow node's
    /// thousands of others.)
    running: HashMap<String, HashMap<String, Run>>,
    runs: u64,
    /// Starts, by container name.
    starts: HashMap<String, usize>,
    /// Sandboxes created and not yet shut down or dropped.
    live: usize,
    /// Pulls, by image reference.
    pulls: HashMap<String, usize>,
    /// How long a start takes: what a hollow node waits before it reports a pod Running.
    start_delay: Duration,
    /// Exec'd commands still running.
    execs: usize,
}

/// Scripted sandboxes; clones share their state.
#[derive(Clone, Default)]
pub struct FakeSandboxes {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeSandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeSandboxes").finish_non_exhaustive()
    }
}

impl FakeSandboxes {
    /// Streams of a pod in which every container name runs: for testing the protocols
    /// without a worker.
    pub fn any_streams(&self) -> Arc<dyn PodStreams> {
        Arc::new(FakeStreams {
            fake: self.clone(),
            key: None,
        })
    }

    /// Exec'd commands that are still running, in all sandboxes.
    pub fn execs(&self) -> usize {
        self.lock().execs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `reference` an image that behaves as `script`. Other references fail to pull.
    pub fn image(&self, reference: &str, script: Script) -> &Self {
        self.lock().images.insert(reference.into(), script);
        self
    }

    /// Makes the probes of containers named `container` fail (or pass again).
    pub fn fail_probes(&self, container: &str, fail: bool) {
        let mut s = self.lock();
        s.failing_probes.retain(|c| c != container);
        if fail {
            s.failing_probes.push(container.into());
        }
    }

    /// Ends every running process named `container` with `code`. Returns how many ended.
    pub fn exit(&self, container: &str, code: i32) -> usize {
        let mut s = self.lock();
        let mut ended = 0;
        for (name, (_, tx)) in s.running.values_mut().flat_map(|c| c.iter_mut()) {
            if name == container {
                if let Some(tx) = tx.take() {
                    ended += usize::from(tx.send(exit(code)).is_ok());
                }
            }
        }
        ended
    }

    /// How many times containers named `container` were started.
    pub fn starts(&self, container: &str) -> usize {
        self.lock().starts.get(container).copied().unwrap_or(0)
    }

    /// The names of the containers running now, sorted.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lock()
            .running
            .values()
            .flat_map(|c| c.keys().cloned())
            .collect();
        names.sort();
        names
    }

    /// Sandboxes that exist now.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// How many times `reference` was pulled.
    pub fn pulls(&self, reference: &str) -> usize {
        self.lock().pulls.get(reference).copied().unwrap_or(0)
    }

    /// Makes every image not named otherwise behave as `script` (a hollow node runs
    /// whatever is bound to it).
    pub fn any_image(&self, script: Script) -> &Self {
        self.lock().any_image = Some(script);
        self
    }

    /// Makes every start take `delay`, as a hollow node's pods do.
    pub fn start_delay(&self, delay: Duration) -> &Self {
        self.lock().start_delay = delay;
        self
    }
}

/// An exit as a process reports it: `Completed` for 0, `Error` otherwise.
fn exit(code: i32) -> Exit {
    Exit {
        code,
        reason: if code == 0 { "Completed" } else { "Error" },
        message: String::new(),
    }
}

impl Sandboxes for FakeSandboxes {
    type Sandbox = FakeSandbox;

    fn create(&self, config: SandboxConfig) -> FakeSandbox {
        self.lock().live += 1;
        FakeSandbox {
            fake: self.clone(),
            key: config.key,
        }
    }
}

/// One pod's scripted containers.
#[derive(Debug)]
pub struct FakeSandbox {
    fake: FakeSandboxes,
    key: String,
}

impl Drop for FakeSandbox {
    fn drop(&mut self) {
        let mut s = self.fake.lock();
        s.live -= 1;
        s.running.remove(&self.key);
    }
}

impl FakeSandbox {
    fn stop_now(&mut self, name: &str) {
        let mut s = self.fake.lock();
        let Some(containers) = s.running.get_mut(&self.key) else {
            return;
        };
        if let Some((_, Some(tx))) = containers.remove(name) {
            let _ = tx.send(exit(143));
        }
        if containers.is_empty() {
            s.running.remove(&self.key);
        }
    }
}

impl Sandbox for FakeSandbox {
    type Image = Script;

    fn image_present(&self, image: &str) -> bool {
        self.fake.lock().pulls.contains_key(image)
    }

    async fn pull(
        &mut self,
        image: &str,
        _auth: &baton_oci::Auth,
        _policy: baton_oci::PullPolicy,
    ) -> Result<Pulled<Script>, ImageError> {
        let mut s = self.fake.lock();
        let present = s.pulls.contains_key(image);
        *s.pulls.entry(image.into()).or_default() += 1;
        let script = *s
            .images
            .get(image)
            .or(s.any_image.as_ref())
            .ok_or_else(|| ImageError::Refused {
                image: image.into(),
                why: "the fake runtime has no such image".into(),
            })?;
        Ok(Pulled {
            image: script,
            lifetime: match script {
                Script::Serve => Lifetime::Server,
                _ => Lifetime::Process,
            },
            digest: Some(format!("sha256:{image}")),
            pulled: !present,
        })
    }

    async fn start(&mut self, run: ContainerRun<Script>) -> Result<Started, StartError> {
        self.stop_now(&run.name);
        let delay = self.fake.lock().start_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (key, name) = (self.key.clone(), run.name.clone());
        let mut s = self.fake.lock();
        *s.starts.entry(name.clone()).or_default() += 1;
        s.runs += 1;
        let run_id = s.runs;
        let exit: Option<ExitFuture> = match run.image {
            Script::FailStart => {
                return Err(StartError::Setup(
                    format!("container {} cannot start (scripted)", run.name).into(),
                ))
            }
            Script::Serve => {
                s.running
                    .entry(key)
                    .or_default()
                    .insert(name, (run_id, None));
                None
            }
            Script::Run | Script::Exit { .. } => {
                let (tx, rx) = oneshot::channel();
                s.running
                    .entry(key.clone())
                    .or_default()
                    .insert(name.clone(), (run_id, Some(tx)));
                let after = match run.image {
                    Script::Exit { after, code } => Some((after, code)),
                    _ => None,
                };
                let fake = self.fake.clone();
                Some(Box::pin(async move {
                    let timer = async {
                        match after {
                            Some((after, code)) => {
                                tokio::time::sleep(after).await;
                                code
                            }
                            None => std::future::pending().await,
                        }
                    };
                    let ended = tokio::select! {
                        r = rx => r.unwrap_or_else(|_| exit(137)),
                        code = timer => exit(code),
                    };
                    // This run is over; a later run of the same name is not.
                    let mut s = fake.lock();
                    if let Some(containers) = s.running.get_mut(&key) {
                        if containers.get(&name).is_some_and(|(id, _)| *id == run_id) {
                            containers.remove(&name);
                        }
                        if containers.is_empty() {
                            s.running.remove(&key);
                        }
                    }
                    ended
                }))
            }
        };
        Ok(Started { exit })
    }

    async fn stop(&mut self, name: &str) {
        self.stop_now(name);
    }

    fn probe(
        &self,
        container: &Container,
        _probe: &Probe,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send + 'static {
        let fail = self.fake.lock().failing_probes.contains(&container.name);
        async move {
            if fail {
                Err(ProbeError::Status(500))
            } else {
                Ok(())
            }
        }
    }

    fn streams(&self) -> Arc<dyn PodStreams> {
        Arc::new(FakeStreams {
            fake: self.fake.clone(),
            key: Some(self.key.clone()),
        })
    }

    async fn shutdown(mut self, _grace: Duration) {
        let names: Vec<String> = self
            .fake
            .lock()
            .running
            .get(&self.key)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        for n in names {
            self.stop_now(&n);
        }
    }
}

/// Exec into a scripted container runs a scripted command:
/// - `echo ARGS…` prints its arguments;
/// - `cat` copies stdin to stdout until end-of-file;
/// - `exit N` ends with code N, after writing `bye` to stderr;
/// - `sleep` runs until stopped;
/// - `tty` prints its terminal's size (`COLUMNSxROWS`), or fails without one.
struct FakeStreams {
    fake: FakeSandboxes,
    /// The sandbox whose running containers it reaches; None reaches any name.
    key: Option<String>,
}

/// Connects to the port on 127.0.0.1: a test's listener plays the pod.
fn fake_connect(
    port: u16,
) -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
    Box::pin(tokio::net::TcpStream::connect(("127.0.0.1", port)))
}

/// Counts a fake exec while its future lives.
struct ExecGuard(FakeSandboxes);

impl Drop for ExecGuard {
    fn drop(&mut self) {
        self.0.lock().execs -= 1;
    }
}

impl PodStreams for FakeStreams {
    fn check(&self, container: &str, command: Option<&[String]>) -> Result<(), ExecError> {
        let s = self.fake.lock();
        if self
            .key
            .as_ref()
            .is_some_and(|k| !s.running.get(k).is_some_and(|c| c.contains_key(container)))
        {
            return Err(ExecError::NotRunning(container.into()));
        }
        match command {
            Some([]) => Err(ExecError::NoCommand),
            _ => Ok(()),
        }
    }

    /// Attaching runs `cat`: what the client sends comes back.
    fn attach(
        &self,
        container: &str,
        io: baton_wasm_shim::ExecIo,
    ) -> Result<ExitFuture, ExecError> {
        self.exec(container, vec!["cat".into()], io)
    }

    fn connect(
        &self,
        port: u16,
    ) -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        fake_connect(port)
    }

    fn exec(
        &self,
        container: &str,
        argv: Vec<String>,
        io: baton_wasm_shim::ExecIo,
    ) -> Result<ExitFuture, ExecError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.check(container, Some(&argv))?;
        self.fake.lock().execs += 1;
        let guard = ExecGuard(self.fake.clone());
        Ok(Box::pin(async move {
            let _guard = guard;
            let baton_wasm_shim::ExecIo {
                stdin,
                mut stdout,
                mut stderr,
                terminal,
            } = io;
            let code = match argv[0].as_str() {
                "tty" => match terminal {
                    Some(t) => {
                        let line = format!("{}x{}\n", t.columns, t.rows);
                        let _ = stdout.write_all(line.as_bytes()).await;
                        0
                    }
                    None => 1,
                },
                "echo" => {
                    let line = format!("{}\n", argv[1..].join(" "));
                    let _ = stdout.write_all(line.as_bytes()).await;
                    0
                }
                "cat" => {
                    if let Some(mut stdin) = stdin {
                        let mut buf = Vec::new();
                        let _ = stdin.read_to_end(&mut buf).await;
                        let _ = stdout.write_all(&buf).await;
                    }
                    0
                }
                "exit" => {
                    let _ = stderr.write_all(b"bye\n").await;
                    argv.get(1).and_then(|c| c.parse().ok()).unwrap_or(1)
                }
                "sleep" => std::future::pending().await,
                _ => 127,
            };
            let _ = stdout.shutdown().await;
            exit(code)
        }))
    }
}
