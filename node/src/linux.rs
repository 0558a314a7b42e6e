//! The OCI-container half of a pod: Linux images run by runc ([`baton_runc`]).
//!
//! A pod whose images include a Linux container image gets, at its first container's
//! start, a network namespace ([`crate::netns`]) that all its containers join. Each
//! container runs from its own writable view of the image's shared root filesystem
//! ([`baton_rootfs::View`]), as the process its spec and image config give (Kubernetes'
//! `command`/`args` over the image's `Entrypoint`/`Cmd`), with the pod's volumes bind
//! mounted, its limits as cgroup limits, and its security context. Its output goes to
//! the same CRI-format log files as a component's.
//!
//! A container's runc is watched by a task of its own, which reports the exit (with
//! `OOMKilled` when the cgroup counted an OOM kill) and removes the container and its
//! view; so the worker may stop a container while nothing polls its exit.
//!
//! The namespace is linked to the node's bridge and holds the pod's routed address
//! ([`crate::netns`]); the pod's components make their sockets in it too, so `localhost`
//! means one thing to all of a pod's containers. Containers see the pod's `/etc/hosts`,
//! and an `/etc/resolv.conf` that names the node's DNS responder on the bridge
//! ([`crate::dns`]), with the search path of the pod's namespace, as the kubelet writes
//! for `dnsPolicy: ClusterFirst`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_runc::{BindMount, ContainerConfig, ExecProcess, Runc, SeccompProfile};
use baton_wasm_shim::{ExecIo, Exit};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, PodSecurityContext};
use tokio::sync::watch;

use crate::netns::NetNs;
use crate::sandbox::{ContainerRun, ExitFuture, StartError};
use crate::streams::{ExecError, PodStreams};

/// A Linux image ready to run: its config, and its unpacked root filesystem.
#[derive(Debug)]
pub struct LinuxImage {
    pub image: Box<baton_oci::LinuxImage>,
    pub rootfs: PathBuf,
}

/// What the node runs containers with.
#[derive(Debug)]
pub struct LinuxRuntime {
    pub runc: Runc,
    /// Where containers' bundles and views live (`NODE-DATA/containers`).
    pub dir: PathBuf,
    /// What the pods' namespaces are linked to; it is up before the first pod starts.
    pub bridge: crate::netns::Bridge,
    /// The cluster's DNS domain (`cluster.local`), for the pods' search path.
    pub cluster_domain: String,
}

impl LinuxRuntime {
    /// Removes the node's runc containers, their views (overlay mounts) and its pods'
    /// namespaces: at start, what an earlier run left when it was killed (pods' workers
    /// start them anew, as they do a pod's components after a restart); at a stop, what
    /// this run's pods still hold.
    pub async fn remove_leftovers(&self) {
        for id in self.runc.list().await.unwrap_or_default() {
            tracing::info!(container = %id, "removing a container left by an earlier run");
            if let Err(e) = self.runc.delete(&id).await {
                tracing::warn!(container = %id, error = %e, "removing a left container");
            }
        }
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name == "netns" {
                continue;
            }
            let _ = baton_rootfs::remove_view(&e.path().join("view"));
            let _ = std::fs::remove_dir_all(e.path());
        }
        crate::netns::remove_leftovers(&self.dir.join("netns"));
    }
}

/// What a pod's Linux containers share.
#[derive(Debug, Clone)]
pub struct PodLinux {
    pub uid: String,
    pub name: String,
    /// Its Kubernetes namespace, for the DNS search path.
    pub namespace: String,
    /// Its routed address (see [`crate::netns::Bridge::routed`]).
    pub ip: Ipv4Addr,
    /// Its `dnsPolicy` and `dnsConfig`.
    pub dns: crate::dns::PodDns,
    /// `shareProcessNamespace`: one PID namespace for all its containers.
    pub share_process_namespace: bool,
    pub grace: Duration,
    pub security: Option<PodSecurityContext>,
}

/// A pod's shared PID namespace (`shareProcessNamespace`), held by `baton pause` as its
/// PID 1, as Kubernetes' pause container holds one: a container's exit, or its restart,
/// leaves the namespace and the others in it alone. It is made with util-linux:
/// `unshare --pid --fork` makes the namespace and its first process, and `--kill-child`
/// with `setpriv --pdeathsig KILL` ends it if the node agent dies (which ends every
/// process in it), so that nothing of the pod outlives a killed node.
#[derive(Debug)]
struct SharedPids {
    holder: tokio::process::Child,
    /// `/proc/PID/ns/pid` of the pause process, which containers join.
    path: PathBuf,
}

/// How long the pause process may take to appear.
const PAUSE_WAIT: Duration = Duration::from_secs(5);

impl SharedPids {
    async fn start() -> Result<Self, StartError> {
        let exe = std::env::current_exe().map_err(setup)?;
        let mut holder = tokio::process::Command::new("setpriv")
            .args([
                "--pdeathsig",
                "KILL",
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--",
            ])
            .arg(&exe)
            .arg("pause")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                create(format!(
                    "shareProcessNamespace: starting setpriv and unshare (util-linux): {e}"
                ))
            })?;
        let pid = holder
            .id()
            .ok_or_else(|| create("the PID namespace's holder ended".into()))?;
        // unshare forks the pause process into the namespace: the path is its.
        let children = format!("/proc/{pid}/task/{pid}/children");
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        loop {
            let first = std::fs::read_to_string(&children)
                .ok()
                .and_then(|t| t.split_whitespace().next().map(str::to_string));
            if let Some(child) = first {
                return Ok(Self {
                    holder,
                    path: PathBuf::from(format!("/proc/{child}/ns/pid")),
                });
            }
            if let Ok(Some(status)) = holder.try_wait() {
                return Err(create(format!(
                    "shareProcessNamespace: the PID namespace's holder ended ({status})"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(create(
                    "shareProcessNamespace: the pause process did not start".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A running container, for stops and `kubectl exec`.
#[derive(Debug, Clone)]
struct Running {
    id: String,
    exec: ExecProcess,
    /// Its exit once known; the watching task sets it.
    ended: watch::Receiver<Option<Exit>>,
}

/// One pod's containers.
#[derive(Debug)]
pub struct LinuxPod {
    rt: Arc<LinuxRuntime>,
    pod: PodLinux,
    /// Made at the first container's start; shared with the pod's streams.
    netns: Arc<std::sync::OnceLock<Arc<NetNs>>>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    /// The holder of its shared PID namespace, made at the first container's start.
    pids: Option<SharedPids>,
    /// Numbers container runs, so that a restart never reuses a runc ID still being
    /// removed.
    runs: u64,
}

fn setup<E: std::error::Error + Send + Sync + 'static>(e: E) -> StartError {
    StartError::Setup(Box::new(e))
}

fn create(message: String) -> StartError {
    StartError::Create(message.into())
}

/// The process a container runs: Kubernetes' `command` replaces the image's entrypoint
/// (and drops its `Cmd`), `args` replaces `Cmd`.
pub fn process_args(spec: &Container, entrypoint: &[String], cmd: &[String]) -> Vec<String> {
    match (&spec.command, &spec.args) {
        (Some(c), Some(a)) if !c.is_empty() => c.iter().chain(a).cloned().collect(),
        (Some(c), _) if !c.is_empty() => c.clone(),
        (_, Some(a)) => entrypoint.iter().chain(a).cloned().collect(),
        _ => entrypoint.iter().chain(cmd).cloned().collect(),
    }
}

/// The image's environment with the container's over it, by name.
fn merge_env(image: &[String], container: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = image
        .iter()
        .filter(|kv| {
            let k = kv.split('=').next().unwrap_or("");
            !container.iter().any(|(n, _)| n == k)
        })
        .cloned()
        .collect();
    out.extend(container.iter().map(|(k, v)| format!("{k}={v}")));
    out
}

/// A numeric `uid[:gid]` from an image's `User`, or a name looked up in the image's
/// `/etc/passwd`.
fn image_user(user: &str, rootfs: &std::path::Path) -> Result<(u32, Option<u32>), String> {
    if user.is_empty() {
        return Ok((0, None));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let gid = g.map(|g| g.parse::<u32>()).transpose().map_err(|_| {
        format!("the image's user {user:?} names a group by name, which is not supported")
    })?;
    if let Ok(uid) = u.parse() {
        return Ok((uid, gid));
    }
    // Read through the view: a symlinked /etc/passwd stays inside it (openat2 is not
    // needed here: the view is the container's own, and this is one bounded read).
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    passwd
        .lines()
        .take(10_000)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == u).then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .find_map(|(uid, g)| uid.map(|uid| (uid, gid.or(g))))
        .ok_or_else(|| format!("the image's user {u:?} is not in its /etc/passwd"))
}

fn millis(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> Option<u64> {
    q.and_then(|q| baton_kube::quantity::millicores(&q.0).ok())
}

impl LinuxPod {
    pub fn new(rt: Arc<LinuxRuntime>, pod: PodLinux) -> Self {
        Self {
            rt,
            pod,
            netns: Arc::default(),
            running: Arc::default(),
            pids: None,
            runs: 0,
        }
    }

    /// The pod's routed address, which its namespace holds.
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }

    /// The pod's namespace, made on first use.
    pub async fn netns(&mut self) -> Result<Arc<NetNs>, StartError> {
        if let Some(ns) = self.netns.get() {
            return Ok(ns.clone());
        }
        let records = self.rt.dir.join("netns");
        let ns = Arc::new(
            NetNs::create(&self.pod.uid, self.pod.ip, &self.rt.bridge, &records)
                .await
                .map_err(setup)?,
        );
        // Only this pod's worker starts its containers: nobody set it meanwhile.
        let _ = self.netns.set(ns.clone());
        Ok(ns)
    }

    /// The pod's shared PID namespace, if it asks for one (made on first use, and again
    /// if its holder was killed, which ends every process in it).
    async fn shared_pids(&mut self) -> Result<Option<PathBuf>, StartError> {
        if !self.pod.share_process_namespace {
            return Ok(None);
        }
        if let Some(p) = &mut self.pids {
            if matches!(p.holder.try_wait(), Ok(None)) {
                return Ok(Some(p.path.clone()));
            }
        }
        let pids = SharedPids::start().await?;
        let path = pids.path.clone();
        self.pids = Some(pids);
        Ok(Some(path))
    }

    /// The runc configuration of one container run.
    fn config(
        &self,
        id: &str,
        run: &ContainerRun<Arc<LinuxImage>>,
        spec: &Container,
        rootfs: PathBuf,
        netns: &NetNs,
        pids: Option<PathBuf>,
    ) -> Result<ContainerConfig, StartError> {
        let image_config = run.image.image.config.config().clone().unwrap_or_default();
        let entrypoint = image_config.entrypoint().clone().unwrap_or_default();
        let cmd = image_config.cmd().clone().unwrap_or_default();
        let args = process_args(spec, &entrypoint, &cmd);
        if args.is_empty() {
            return Err(create(format!(
                "container {}: neither the pod nor the image gives a command",
                spec.name
            )));
        }
        let sc = spec.security_context.as_ref();
        let psc = self.pod.security.as_ref();
        let (image_uid, image_gid) =
            image_user(image_config.user().as_deref().unwrap_or(""), &rootfs).map_err(create)?;
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(psc.and_then(|p| p.run_as_user))
            .map(|u| u as u32)
            .unwrap_or(image_uid);
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(psc.and_then(|p| p.run_as_group))
            .map(|g| g as u32)
            .or(image_gid)
            .unwrap_or(0);
        let non_root = sc
            .and_then(|s| s.run_as_non_root)
            .or(psc.and_then(|p| p.run_as_non_root))
            .unwrap_or(false);
        if non_root && uid == 0 {
            return Err(create(format!(
                "container {} has runAsNonRoot and would run as root (uid 0)",
                spec.name
            )));
        }
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        let resources = spec.resources.as_ref();
        let seccomp = match sc
            .and_then(|s| s.seccomp_profile.as_ref())
            .or(psc.and_then(|p| p.seccomp_profile.as_ref()))
        {
            Some(p) if p.type_ == "Unconfined" => SeccompProfile::Unconfined,
            _ => SeccompProfile::RuntimeDefault,
        };
        Ok(ContainerConfig {
            id: id.into(),
            hostname: self.pod.name.clone(),
            rootfs,
            readonly_rootfs: sc
                .and_then(|s| s.read_only_root_filesystem)
                .unwrap_or(false),
            args,
            env: merge_env(&image_config.env().clone().unwrap_or_default(), &run.env),
            cwd: spec
                .working_dir
                .clone()
                .or(image_config.working_dir().clone())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
            uid,
            gid,
            additional_gids: psc
                .and_then(|p| p.supplemental_groups.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|g| g as u32)
                .collect(),
            mounts: run
                .mounts
                .iter()
                .map(|m| BindMount {
                    source: m.host_path.clone(),
                    destination: PathBuf::from(&m.guest_path),
                    readonly: m.read_only,
                })
                .collect(),
            network_namespace: Some(netns.path().to_path_buf()),
            pid_namespace: pids,
            memory_limit: Some(run.memory_bytes as u64).filter(|&b| b > 0),
            cpu_limit_millis: millis(resources.and_then(|r| r.limits.as_ref()?.get("cpu"))),
            cpu_request_millis: millis(resources.and_then(|r| r.requests.as_ref()?.get("cpu")))
                .unwrap_or(0),
            pids_limit: Some(4096),
            capabilities_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
            capabilities_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
            no_new_privileges: !sc
                .and_then(|s| s.allow_privilege_escalation)
                .unwrap_or(true),
            seccomp,
            cgroups_path: format!("/baton/{id}"),
        })
    }

    /// Starts a container run.
    pub async fn start(
        &mut self,
        run: ContainerRun<Arc<LinuxImage>>,
        spec: &Container,
    ) -> Result<ExitFuture, StartError> {
        let netns = self.netns().await?;
        let pids = self.shared_pids().await?;
        self.runs += 1;
        let id = format!("{}-{}-{}", self.pod.uid, run.name, self.runs);
        let dir = self.rt.dir.join(&id);
        let (image_root, view_dir) = (run.image.rootfs.clone(), dir.join("view"));
        let view =
            tokio::task::spawn_blocking(move || baton_rootfs::create_view(&image_root, &view_dir))
                .await
                .map_err(setup)?
                .map_err(setup)?;
        let config = match self.config(&id, &run, spec, view.root.clone(), &netns, pids) {
            Ok(c) => c,
            Err(e) => {
                let _ = view.remove();
                return Err(e);
            }
        };
        let mut config = config;
        let (hosts, resolv) = self.pod_files()?;
        config.mounts.push(BindMount {
            source: hosts,
            destination: PathBuf::from("/etc/hosts"),
            readonly: false,
        });
        config.mounts.push(BindMount {
            source: resolv,
            destination: PathBuf::from("/etc/resolv.conf"),
            readonly: false,
        });
        let bundle = dir.join("bundle");
        if let Err(e) = config.write_bundle(&bundle) {
            let _ = view.remove();
            return Err(setup(e));
        }
        let mut container =
            match self
                .rt
                .runc
                .run(&id, &bundle, Stdio::null(), Stdio::piped(), Stdio::piped())
            {
                Ok(c) => c,
                Err(e) => {
                    let _ = view.remove();
                    return Err(setup(e));
                }
            };
        let (mut out, mut err) = (container.stdout(), container.stderr());
        let (mut log_out, mut log_err) = (run.log.stdout(), run.log.stderr());
        let pumps = tokio::spawn(async move {
            let o = async {
                if let Some(o) = out.as_mut() {
                    let _ = tokio::io::copy(o, &mut log_out).await;
                }
            };
            let e = async {
                if let Some(e) = err.as_mut() {
                    let _ = tokio::io::copy(e, &mut log_err).await;
                }
            };
            tokio::join!(o, e);
        });
        let (tx, ended) = watch::channel(None);
        let (runc, cgroup, log) = (
            self.rt.runc.clone(),
            config.cgroups_path.clone(),
            run.log.clone(),
        );
        let span = tracing::info_span!("linux_container", id = %id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let (code, runc_error) = container.wait().await;
                let oom = runc.oom_killed(&cgroup);
                // The output ends with the container; what is left in the pipes is logged.
                let _ = tokio::time::timeout(Duration::from_secs(5), pumps).await;
                let _ = log.flush();
                if let Err(e) = container.delete().await {
                    tracing::warn!(error = %e, "removing a stopped container");
                }
                let _ = tokio::task::spawn_blocking(move || view.remove()).await;
                let _ = std::fs::remove_dir_all(&dir);
                let exit = match (oom, runc_error) {
                    (true, _) => Exit {
                        code: 137,
                        reason: "OOMKilled",
                        message: String::new(),
                    },
                    // runc failed to start the process (its command is not in the image).
                    (false, Some(why)) if code != 0 => Exit {
                        code: 128,
                        reason: "StartError",
                        message: why,
                    },
                    (false, _) => Exit {
                        code,
                        reason: if code == 0 { "Completed" } else { "Error" },
                        message: String::new(),
                    },
                };
                let _ = tx.send(Some(exit));
            },
            span,
        ));
        let exec = ExecProcess {
            args: Vec::new(),
            env: config.env.clone(),
            cwd: config.cwd.clone(),
            uid: config.uid,
            gid: config.gid,
        };
        self.lock().insert(
            run.name.clone(),
            Running {
                id,
                exec,
                ended: ended.clone(),
            },
        );
        Ok(Box::pin(wait_exit(ended)))
    }

    /// The pod's `/etc/hosts` and `/etc/resolv.conf`, as the kubelet writes them:
    /// `localhost` and the pod's name at its address; the name servers and search path of
    /// its DNS policy. Written once per pod; every container mounts them.
    fn pod_files(&self) -> Result<(PathBuf, PathBuf), StartError> {
        let dir = self.rt.dir.join(format!("pod-{}", self.pod.uid));
        let (hosts, resolv) = (dir.join("hosts"), dir.join("resolv.conf"));
        if !hosts.exists() || !resolv.exists() {
            let hosts_text = format!(
                "# Kubernetes-managed hosts file (written by Baton).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
                self.pod.ip, self.pod.name
            );
            let resolv_text = crate::dns::resolv_conf(
                &self.pod.dns,
                self.rt.bridge.gateway(),
                &self.pod.namespace,
                &self.rt.cluster_domain,
            );
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&hosts, hosts_text))
                .and_then(|_| std::fs::write(&resolv, resolv_text))
                .map_err(setup)?;
        }
        Ok((hosts, resolv))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn has(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Stops a container: SIGTERM, then SIGKILL once the pod's grace period is over.
    /// Returns when it is gone.
    pub async fn stop(&mut self, name: &str) {
        let running = self.lock().remove(name);
        if let Some(r) = running {
            stop(&self.rt.runc, r, self.pod.grace).await;
        }
    }

    /// Stops every container within `grace`, then removes the pod's namespace.
    pub async fn shutdown(self, grace: Duration) {
        let all: Vec<Running> = self.lock().drain().map(|(_, r)| r).collect();
        let runc = self.rt.runc.clone();
        futures::future::join_all(all.into_iter().map(|r| stop(&runc, r, grace))).await;
        if let Some(mut p) = self.pids {
            let _ = p.holder.kill().await;
        }
        if let Some(ns) = self.netns.get() {
            ns.delete().await;
        }
        let _ = std::fs::remove_dir_all(self.rt.dir.join(format!("pod-{}", self.pod.uid)));
    }

    pub fn streams(&self) -> LinuxStreams {
        LinuxStreams {
            runc: self.rt.runc.clone(),
            running: self.running.clone(),
            netns: self.netns.clone(),
        }
    }
}

async fn wait_exit(mut ended: watch::Receiver<Option<Exit>>) -> Exit {
    match ended.wait_for(Option::is_some).await {
        Ok(e) => e.clone().unwrap_or_else(lost),
        Err(_) => lost(),
    }
}

fn lost() -> Exit {
    Exit {
        code: 137,
        reason: "Error",
        message: "the container's watcher ended without its exit".into(),
    }
}

/// How long a container gets to go after SIGKILL before the stop gives up on it.
const KILL_WAIT: Duration = Duration::from_secs(10);

async fn stop(runc: &Runc, r: Running, grace: Duration) {
    let mut ended = r.ended.clone();
    if ended.borrow().is_some() {
        return;
    }
    let _ = runc.kill(&r.id, "TERM").await;
    if tokio::time::timeout(grace, ended.wait_for(Option::is_some))
        .await
        .is_ok()
    {
        return;
    }
    let _ = runc.kill(&r.id, "KILL").await;
    let _ = tokio::time::timeout(KILL_WAIT, ended.wait_for(Option::is_some)).await;
}

/// How long a terminal's last output may take to arrive once its command has ended.
const TERMINAL_DRAIN: Duration = Duration::from_secs(1);

/// `kubectl exec -t`: the command on a terminal the node makes for runc
/// ([`Runc::exec_terminal`]), whose master carries its input and output (stderr
/// included, as on any terminal).
async fn exec_on_terminal(
    runc: Runc,
    id: String,
    process: ExecProcess,
    size: baton_wasm_shim::Terminal,
    io: ExecIo,
) -> Exit {
    let (mut child, master) = match runc.exec_terminal(&id, &process, size.columns, size.rows) {
        Ok(got) => got,
        Err(e) => return not_started(baton_kube::error::chain(&e)),
    };
    // Each direction on a thread of its own, blocking: a read that waits for output must
    // not hold input back (tokio's file does one operation at a time), and the reader
    // sees the end as EIO once the command's side closes.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let (in_tx, in_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let relays = master.try_clone().and_then(|reader| {
        std::thread::Builder::new()
            .name("exec-tty-out".into())
            .spawn(move || {
                use std::io::Read;
                let mut from = reader;
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    if out_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            })?;
        std::thread::Builder::new()
            .name("exec-tty-in".into())
            .spawn(move || {
                use std::io::Write;
                let mut to = master;
                while let Ok(chunk) = in_rx.recv() {
                    if to.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
    });
    if let Err(e) = relays {
        let _ = child.kill().await;
        return not_started(format!("the terminal of runc exec: {e}"));
    }
    let ExecIo {
        stdin, mut stdout, ..
    } = io;
    let input = async move {
        use tokio::io::AsyncReadExt;
        if let Some(mut from) = stdin {
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n @ 1..) = from.read(&mut buf).await {
                let in_tx = in_tx.clone();
                let chunk = buf[..n].to_vec();
                // The writer thread blocks on a full terminal; so does this send.
                let sent = tokio::task::spawn_blocking(move || in_tx.send(chunk)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
        }
    };
    let output = async {
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = out_rx.recv().await {
            if stdout.write_all(&chunk).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
        let _ = stdout.flush().await;
    };
    let status = async {
        let mut output = std::pin::pin!(output);
        let mut drained = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = &mut output, if !drained => drained = true,
            }
        };
        // What the command wrote last; a process it left behind may hold the terminal
        // open, so the session ends with the command, not with that process.
        if !drained {
            let _ = tokio::time::timeout(TERMINAL_DRAIN, &mut output).await;
        }
        status
    };
    let status = tokio::select! {
        s = status => s,
        _ = async { input.await; std::future::pending::<()>().await } => unreachable!(),
    };
    command_exit(status)
}

/// A command's end as `kubectl exec` reports it: its code, or 128 + its signal; 255 if
/// it could not be waited for.
fn command_exit(status: std::io::Result<std::process::ExitStatus>) -> Exit {
    let code = status.map_or(255, baton_runc::exit_code);
    Exit {
        code,
        reason: if code == 0 { "Completed" } else { "Error" },
        message: String::new(),
    }
}

/// An exec whose command never started, with why (126, as a shell says it).
fn not_started(message: String) -> Exit {
    Exit {
        code: 126,
        reason: "Error",
        message,
    }
}

/// `kubectl exec` and `port-forward` into a pod's containers.
#[derive(Clone, Debug)]
pub struct LinuxStreams {
    runc: Runc,
    running: Arc<Mutex<HashMap<String, Running>>>,
    netns: Arc<std::sync::OnceLock<Arc<NetNs>>>,
}

impl LinuxStreams {
    /// Whether the pod's namespace exists yet (a Linux container has started).
    pub fn has_netns(&self) -> bool {
        self.netns.get().is_some()
    }

    pub fn has(&self, container: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(container)
    }

    fn running(&self, container: &str) -> Result<Running, ExecError> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(container)
            .cloned()
            .ok_or_else(|| ExecError::NotRunning(container.into()))
    }
}

fn attach_unsupported(container: &str) -> ExecError {
    ExecError::Unsupported(format!(
        "attaching to OCI container {container:?} is not supported yet; use kubectl exec or kubectl logs -f"
    ))
}

impl PodStreams for LinuxStreams {
    fn check(&self, container: &str, command: Option<&[String]>) -> Result<(), ExecError> {
        self.running(container)?;
        match command {
            Some([]) => Err(ExecError::NoCommand),
            Some(_) => Ok(()),
            None => Err(attach_unsupported(container)),
        }
    }

    fn exec(
        &self,
        container: &str,
        argv: Vec<String>,
        io: ExecIo,
    ) -> Result<ExitFuture, ExecError> {
        if argv.is_empty() {
            return Err(ExecError::NoCommand);
        }
        let r = self.running(container)?;
        let process = ExecProcess {
            args: argv,
            ..r.exec
        };
        if let Some(t) = io.terminal {
            return Ok(Box::pin(exec_on_terminal(
                self.runc.clone(),
                r.id,
                process,
                t,
                io,
            )));
        }
        let stdin = if io.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = self
            .runc
            .exec(&r.id, &process, stdin, Stdio::piped(), Stdio::piped())
            .map_err(|source| ExecError::Runc {
                container: container.into(),
                source,
            })?;
        let ExecIo {
            stdin,
            mut stdout,
            mut stderr,
            terminal: _,
        } = io;
        let (child_in, mut child_out, mut child_err) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        Ok(Box::pin(async move {
            let input = async {
                if let (Some(mut from), Some(mut to)) = (stdin, child_in) {
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                }
            };
            let output = async {
                if let Some(o) = child_out.as_mut() {
                    let _ = tokio::io::copy(o, &mut stdout).await;
                }
            };
            let errors = async {
                if let Some(e) = child_err.as_mut() {
                    let _ = tokio::io::copy(e, &mut stderr).await;
                }
            };
            let status = async {
                let (_, _, status) = tokio::join!(output, errors, child.wait());
                status
            };
            // stdin may stay open after the command ends; the end is the process's.
            let status = tokio::select! {
                s = status => s,
                _ = async { input.await; std::future::pending::<()>().await } => unreachable!(),
            };
            command_exit(status)
        }))
    }

    fn attach(&self, container: &str, _io: ExecIo) -> Result<ExitFuture, ExecError> {
        Err(attach_unsupported(container))
    }

    fn connect(&self, port: u16) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
        let netns = self.netns.get().cloned();
        Box::pin(async move {
            let ns =
                netns.ok_or_else(|| std::io::Error::other("the pod has no network namespace"))?;
            // As the kubelet does: the pod's localhost, where a server bound to
            // 127.0.0.1 only is reached too.
            ns.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
        })
    }
}
