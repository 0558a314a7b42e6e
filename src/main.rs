//! `baton`: the one binary of Baton.
//!
//! - `baton up`: everything in one process on the embedded single-member store: the store,
//!   the Kubernetes API server, the scheduler, the controllers and a local node.
//! - `baton server`: one member of a replicated control plane (the store, and with
//!   `--api-listen` the API server and, on the elected leader, the control loops).
//! - `baton node`: a node agent joining a cluster.
//! - `baton store ...`: everyday client verbs against a store, and an offline repair.
//! - `baton push`: a Wasm component to a registry, as an OCI artifact.
//! - `baton pull`: a component into the node's image cache.
//! - `baton images`: the node's image cache.
//! - `baton run`: one component, or one pod from a local manifest, without a cluster.
//! - `baton kubeconfig`: a kubeconfig for a teammate, with a client certificate the
//!   cluster CA signed (the user is its CN, the groups its O).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use baton_apiserver::{ApiServer, Objects, Pki};
use baton_kube::local_nodes::LocalNodes;
use baton_store::{RangeRequest, ReadOptions, Store, StoreClient, StoreConfig, WatchEvent};
use clap::{Args, Parser, Subcommand};

mod control;
mod hollow;
mod inspect;
mod join;
mod oci_cli;
mod otel;
mod rotate;
mod run;
mod token;

// glibc's malloc showed up as ~12% of the store's write path under load; mimalloc's
// thread-local free lists make the many small request buffers cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same in its v2 and v3 headers; the Rust
/// bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Gives freed pages back to the system after a second, mimalloc v3's own default, set
/// here so that it does not change with the allocator's version. A purge makes the next
/// allocation there fault a zeroed page back in: with a 10 ms delay (mimalloc v2's),
/// `clear_page` was 6% of the hollow nodes' samples in the scale run, and at 1,000
/// nodes a second's delay took the control plane from 153 to 143–144 CPU-seconds and
/// the hollow nodes from 61 to 57–58, for 20–33 MiB more peak RSS (1,564 MiB). An
/// earlier tree measured 250 MiB more; what is freed is far less now.
/// `MIMALLOC_PURGE_DELAY`, mimalloc's own setting, still wins when it is set. Runs
/// before any thread starts, as `mi_option_set` requires.
#[allow(unsafe_code)]
fn purge_freed_memory_after_a_second() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: a plain option store, made while the process has one thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// How long freed memory stays committed before it is given back (milliseconds).
const PURGE_DELAY_MS: std::os::raw::c_long = 1000;

#[derive(Parser, Debug)]
#[command(
    name = "baton",
    version,
    about = "A WebAssembly-first orchestrator that speaks the Kubernetes API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Export traces to this OpenTelemetry collector over OTLP/HTTP (protobuf), e.g.
    /// `http://127.0.0.1:4318` (`/v1/traces` is added).
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

impl Command {
    /// The OpenTelemetry `service.name` this command's traces carry.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Up(_) => "baton",
            Command::Server(_) => "baton-server",
            Command::Node(_) => "baton-node",
            Command::Run(_) => "baton-run",
            _ => "baton-cli",
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run Baton on this machine with the embedded single-member store.
    Up(UpArgs),
    /// Run one member of a replicated control plane.
    Server(ServerArgs),
    /// Run a node agent that joins the cluster of a kubeconfig.
    Node(NodeCmdArgs),
    /// Talk to a store: status, get, put, list, watch.
    Store(StoreArgs),
    /// Bootstrap tokens nodes join with: list, create (with a TTL), delete.
    Token(token::TokenArgs),
    /// Run a component (or a pod from a local manifest) here, without a cluster.
    Run(run::RunArgs),
    /// Tell what components are and whether Baton can run them (kind, WASI version,
    /// the capabilities they need, imports no node provides).
    Inspect(inspect::InspectArgs),
    /// Push a Wasm component to a registry as an OCI artifact; prints its digest.
    Push(oci_cli::PushArgs),
    /// Pull a component into the node's image cache.
    Pull(oci_cli::PullArgs),
    /// List the node's image cache.
    Images(oci_cli::ImagesArgs),
    /// Run many node agents with scripted sandboxes in this process, to measure the
    /// control plane at scale (kubemark's hollow nodes).
    HollowNodes(hollow::HollowArgs),
    /// Print a kubeconfig for a user, with a client certificate the cluster CA signs
    /// (run where the cluster's data dir is; grant it access with a RoleBinding).
    Kubeconfig(KubeconfigArgs),
    /// Hold a pod's shared PID namespace as its PID 1 (the node runs it for a pod with
    /// `shareProcessNamespace`): reap what is left to it, end on SIGTERM.
    #[command(hide = true)]
    Pause,
}

#[derive(Args, Debug)]
struct KubeconfigArgs {
    /// The cluster's data dir (its `pki` and admin `kubeconfig`).
    #[arg(long, env = "BATON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The user's name (the certificate's CN).
    #[arg(long)]
    user: String,
    /// A group the user is in (the certificate's O); repeatable.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// The namespace the kubeconfig's context starts in.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// The API servers' URLs (comma-separated or repeated). By default every member's
    /// that the cluster knows (asked with the data dir's admin kubeconfig), the admin
    /// kubeconfig's first.
    #[arg(long, value_delimiter = ',')]
    server: Vec<String>,
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Where all state lives.
    #[arg(long, env = "BATON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the Kubernetes API (HTTPS).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Also serve the store's own API here (for `baton store`); off by default.
    #[arg(long)]
    store_listen: Option<SocketAddr>,
    /// Run only the control plane, without a local node.
    #[arg(long)]
    no_node: bool,
    /// Run no scheduler and no controllers: the store and the API server only.
    #[arg(long)]
    no_controllers: bool,
    /// Seconds a node may miss heartbeats before it is marked unknown and its pods are
    /// evicted (after their tolerations).
    #[arg(long, default_value_t = 40)]
    node_monitor_grace: u64,
    #[command(flatten)]
    api_limits: ApiLimits,
    /// The prefix length of the pod range each node is given, within 127.128.0.0/9
    /// (kube-controller-manager's `--node-cidr-mask-size`): 20 gives 4,096 pod addresses
    /// to each of 2,048 nodes, 22 gives 1,024 to each of 8,192.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(12..=28))]
    node_cidr_mask_size: u8,
    /// Seconds between two runs of each HorizontalPodAutoscaler.
    #[arg(long = "horizontal-pod-autoscaler-sync-period", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    hpa_sync_period: u64,
    /// An EncryptionConfiguration file (kube-apiserver's format) for what is encrypted
    /// at rest; by default `DATA/pki/encryption-config.yaml`, made at first start to
    /// encrypt Secrets with AES-GCM under a random key.
    #[arg(long)]
    encryption_provider_config: Option<PathBuf>,
    #[command(flatten)]
    node: control::NodeArgs,
}

#[derive(Args, Debug)]
struct NodeCmdArgs {
    /// The kubeconfig of the cluster to join.
    #[arg(long, env = "KUBECONFIG", required_unless_present = "server")]
    kubeconfig: Option<PathBuf>,
    /// Join the cluster whose API servers are at these URLs (comma-separated or
    /// repeated) with `--token`, as Kubernetes' TLS bootstrap does: the node asks for its
    /// client certificate through a CertificateSigningRequest, which the cluster
    /// approves and signs. The node fails over between them, and learns the others.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "token",
        conflicts_with = "kubeconfig"
    )]
    server: Vec<String>,
    /// The cluster token, or a bootstrap token from `baton token create`.
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the node keeps pod volumes, logs and compiled components.
    #[arg(long)]
    data_dir: PathBuf,
    #[command(flatten)]
    node: control::NodeArgs,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// This member's id, unique in the cluster (1, 2, 3, ...); by default one is picked
    /// at random at first start and kept in the data dir.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    id: Option<u64>,
    /// Address to serve Raft and the store API on; peers must reach it.
    #[arg(
        long,
        required_unless_present_any = ["listen_fd", "store"],
        conflicts_with_all = ["listen_fd", "store"]
    )]
    listen: Option<SocketAddr>,
    /// Serve on a listening TCP socket inherited as this file descriptor instead (socket
    /// activation: systemd passes 3), so that the address is bound before the process
    /// starts and kept across its restarts.
    #[arg(long, conflicts_with = "store")]
    listen_fd: Option<i32>,
    /// Keep the cluster's state in an existing etcd v3 cluster instead of Baton's own
    /// store: `etcd://HOST:2379[,HOST:2379...]` (HTTPS with `--etcd-cacert`), or
    /// `http(s)://` client URLs. Every member names the same etcd; there is no
    /// `--listen`, `--bootstrap` or `--join`, as etcd replicates the state.
    #[arg(long, conflicts_with_all = ["bootstrap", "join"], requires = "api_listen")]
    store: Option<String>,
    /// The CA that signed etcd's serving certificates (PEM).
    #[arg(long, requires = "store")]
    etcd_cacert: Option<PathBuf>,
    /// A client certificate for etcd's `--client-cert-auth` (PEM), with `--etcd-key`.
    #[arg(long, requires_all = ["etcd_cacert", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    #[arg(long)]
    data_dir: PathBuf,
    /// Start a new cluster with this member as its only voter (first member only).
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// Join the cluster that the store member at this address belongs to; this member's
    /// pki directory must hold a copy of the cluster's store CA.
    #[arg(long)]
    join: Option<String>,
    /// Join the cluster whose API server is at this URL (`https://HOST:6443`), with
    /// `--token`: the cluster's keys are fetched from it, and the store joined.
    #[arg(long, conflicts_with_all = ["bootstrap", "join"], requires = "token")]
    server: Option<String>,
    /// The cluster token (`baton1::HASH::SECRET`, in the first member's `DATA/token`).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve the Kubernetes API (HTTPS) on this address too.
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// An EncryptionConfiguration file for what is encrypted at rest. Every member must
    /// be given the same file (copy it), or members cannot read each other's writes. By
    /// default `DATA/pki/encryption-config.yaml`: the first member makes it (Secrets
    /// under AES-GCM with a random key) and members that join with a token fetch it.
    #[arg(long)]
    encryption_provider_config: Option<PathBuf>,
    /// Seconds a node may miss heartbeats before it is marked unknown, tainted
    /// `node.kubernetes.io/unreachable`, and its pods are evicted once their tolerations
    /// of that run out (kube-controller-manager's `--node-monitor-grace-period`). Nodes
    /// should renew their Lease well within it (`baton node --node-lease-duration`).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    node_monitor_grace: u64,
    #[command(flatten)]
    api_limits: ApiLimits,
    /// The prefix length of the pod range each node is given, within 127.128.0.0/9
    /// (kube-controller-manager's `--node-cidr-mask-size`): 20 gives 4,096 pod addresses
    /// to each of 2,048 nodes, 22 gives 1,024 to each of 8,192.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(12..=28))]
    node_cidr_mask_size: u8,
    #[command(flatten)]
    tuning: Tuning,
}

/// The API server's limits, the same on `baton up` and `baton server`.
#[derive(Args, Debug, Clone)]
struct ApiLimits {
    /// Requests served at once, watches aside (kube-apiserver's `--max-requests-inflight`
    /// and `--max-mutating-requests-inflight` together), shared out among the priority
    /// levels. A seat held by a request waiting for its write to commit costs no CPU, so
    /// a large cluster wants more: the scale runs give 3,000 at 5,000 nodes.
    #[arg(long, default_value_t = baton_apiserver::server::MAX_INFLIGHT as u64, value_parser = clap::value_parser!(u64).range(7..))]
    max_requests_inflight: u64,
    /// Seconds an Event is kept after it was last written (kube-apiserver's
    /// `--event-ttl`, one hour).
    #[arg(long, default_value_t = baton_apiserver::event_ttl::DEFAULT_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    event_ttl: u64,
    /// Seconds a request may take before it is answered 504, watches, logs, exec,
    /// attach, port-forward and proxies aside (kube-apiserver's `--request-timeout`); a
    /// client's `timeout` parameter may only shorten it.
    #[arg(long, default_value_t = baton_apiserver::server::REQUEST_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
}

/// Raft tuning; the defaults suit a LAN.
#[derive(Args, Debug)]
struct Tuning {
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout; the upper bound is 1.5 times
    /// this. A follower also waits out a leader lease as long as the upper bound after
    /// the last heartbeat, so a lost leader is replaced 2.5 to 3 times this after it
    /// went silent.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    election_ms: u64,
    /// Build a snapshot after at least this many log entries, once the log written
    /// since the last snapshot is also half that snapshot's size.
    #[arg(long, default_value_t = 20_000)]
    snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot.
    #[arg(long, default_value_t = 2_000)]
    keep_logs: u64,
}

#[derive(Args, Debug)]
struct StoreArgs {
    /// Members to talk to, comma-separated host:port.
    #[arg(long, default_value = "127.0.0.1:2380", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// A member's data dir: its store CA issues this command a client certificate (run
    /// as the user who owns it). By default, Baton's own data dir.
    #[arg(long, env = "BATON_DATA_DIR", conflicts_with_all = ["cacert", "cert", "key"])]
    data_dir: Option<PathBuf>,
    /// The store CA's certificate, to verify members by (with --cert and --key).
    #[arg(long, requires_all = ["cert", "key"])]
    cacert: Option<PathBuf>,
    /// A client certificate the store CA signed.
    #[arg(long, requires_all = ["cacert", "key"])]
    cert: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, requires_all = ["cacert", "cert"])]
    key: Option<PathBuf>,
    #[command(subcommand)]
    verb: StoreVerb,
}

#[derive(Subcommand, Debug)]
enum StoreVerb {
    /// Show a member's view of the cluster.
    Status,
    /// Read one key.
    Get { key: String },
    /// Write one key.
    Put { key: String, value: String },
    /// List the keys under a prefix.
    List { prefix: String },
    /// Print changes under a prefix as they happen.
    Watch {
        prefix: String,
        #[arg(long, default_value_t = 0)]
        from: i64,
    },
    /// Drop history below a revision.
    Compact { revision: i64 },
    /// Remove a member from the cluster.
    RemoveMember { id: u64 },
    /// Recover a stopped member whose write-ahead log is damaged, offline: keep what
    /// precedes the damage, drop the rest. The data dir is the one `baton up` or
    /// `baton server` was given. In a cluster, prefer rejoining from the peers.
    Repair {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn default_data_dir() -> PathBuf {
    // A user without root keeps state in their own home, as k3s's rootless mode does.
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("baton")
}

fn main() {
    // wasmtime makes and drops an error on its hot path (disposing a finished store's
    // fibers, once per HTTP request). Under RUST_BACKTRACE, which containers often set,
    // each would capture a backtrace: 5% of a request's CPU in a profile. Errors keep
    // their cause chains, and panics still print backtraces under RUST_BACKTRACE. Set
    // before any thread starts, so nothing reads the environment meanwhile.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    purge_freed_memory_after_a_second();
    raise_open_files_limit();
    let cli = Cli::parse();
    let telemetry = match otel::init(cli.otlp_endpoint.as_deref(), cli.command.service_name()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_now(1);
        }
    };
    // Hollow nodes run a process per few hundred nodes, several on each core: one thread
    // each, so that their tasks never wake a second thread of the same process and
    // steal from it, as a multi-threaded runtime's do.
    let rt = match cli.command {
        Command::HollowNodes(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            exit_now(1);
        }
    };
    let result = rt.block_on(run_command(cli));
    // Every task, and with them the store, is dropped before the process exits: RocksDB's
    // threads must not be running when the C++ runtime tears down.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    telemetry.shutdown();
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            // The cause chain, one line, never a backtrace: these are users' errors.
            eprintln!("error: {e:#}");
            1
        }
    };
    exit_now(code)
}

/// Raises the open-files limit as far as the process may, as Go's runtime does for every
/// program and containerd's unit does with `LimitNOFILE=infinity`. A node holds a log
/// file per container and a connection per proxied client, an API server a connection per
/// watching node, and hollow nodes all of that for thousands of nodes in one process: the
/// usual soft limit (1,024, or the hard limit of a container) runs out long before memory.
/// Privileged, the hard limit goes up to the kernel's `fs.nr_open`; otherwise the soft
/// limit goes up to the hard one. A failure leaves the limit as it was.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    // None is unlimited; the kernel takes no more than fs.nr_open either way.
    let cap = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let hard = now.maximum.unwrap_or(u64::MAX);
    let both = |n: u64| Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    if hard < cap && cap != u64::MAX && setrlimit(Resource::Nofile, both(cap)).is_ok() {
        return;
    }
    let soft = hard.min(cap);
    if now.current.unwrap_or(u64::MAX) < soft && soft != u64::MAX {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(soft),
                maximum: now.maximum,
            },
        );
    }
}

/// Leaves the process without running C++ static destructors. RocksDB's destroy its
/// global thread pools and mutexes while its background threads may still be parked on
/// them, which aborts ("pthread lock: Invalid argument", "terminate called without an
/// active exception") after the store was closed cleanly. Everything of ours is flushed
/// and closed by now: the store was shut down, and the runtime with every task is gone.
#[allow(unsafe_code)]
fn exit_now(code: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; no Rust state is used after it.
    unsafe { libc::_exit(i32::from(code)) }
}

/// Runs a subcommand; returns the process's exit code.
async fn run_command(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Up(args) => up(args).await.map(|()| 0),
        Command::Server(args) => server(args).await.map(|()| 0),
        Command::Node(args) => node(args).await.map(|()| 0),
        Command::Store(args) => store_verb(args).await.map(|()| 0),
        Command::Token(args) => token::token(args, default_data_dir()).await.map(|()| 0),
        Command::Push(args) => oci_cli::push(args).await.map(|()| 0),
        Command::Pull(args) => oci_cli::pull(args, default_data_dir()).await.map(|()| 0),
        Command::Images(args) => oci_cli::images(args, default_data_dir()).map(|()| 0),
        Command::Kubeconfig(args) => kubeconfig(args).await.map(|()| 0),
        Command::HollowNodes(args) => hollow::hollow_nodes(args).await.map(|()| 0),
        Command::Pause => pause().await.map(|()| 0),
        // A component's own exit code, as `wasmtime run` passes it on.
        Command::Run(args) => Ok(run::run(args).await?.clamp(0, 255) as u8),
        Command::Inspect(args) => inspect::inspect(args),
    }
}

/// `baton pause`: the PID 1 of a pod's shared PID namespace, as Kubernetes' pause
/// container is. The processes of the pod's containers that lose their parent are
/// reparented to it, and it reaps them; PID 1 ignores the signals it does not handle, so
/// only SIGTERM and SIGINT end it (or SIGKILL, which ends the namespace).
async fn pause() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut children = signal(SignalKind::child())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        // Every child that has ended; None once none has, an error once there are none.
        while let Ok(Some(_)) = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG)
        {
        }
        tokio::select! {
            _ = children.recv() => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

/// `baton kubeconfig`: prints a kubeconfig with a fresh client certificate.
async fn kubeconfig(args: KubeconfigArgs) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let pki_dir = dir.join("pki");
    if !pki_dir.join("ca.key").exists() {
        bail!(
            "{} holds no cluster CA: give the data dir of a cluster (--data-dir)",
            pki_dir.display()
        );
    }
    let pki = Pki::load_or_create(&pki_dir, &[]).context("failed to load the cluster's PKI")?;
    let servers = if args.server.is_empty() {
        let admin = std::fs::read_to_string(dir.join("kubeconfig")).with_context(|| {
            format!(
                "no kubeconfig in {} to read the server from; give --server",
                dir.display()
            )
        })?;
        let first = kubeconfig_server(&admin).context("give --server")?;
        let mut servers = vec![first];
        // The other members, if the cluster answers; else the one server is enough.
        let others = async {
            let client = baton_kube::client::from_yaml(&admin).await?;
            let found = tokio::time::timeout(Duration::from_secs(10), api_servers(&client))
                .await
                .context("no answer within 10 s")??;
            Ok::<_, anyhow::Error>(found)
        };
        match others.await {
            Ok(found) => {
                for hp in found {
                    let url = format!("https://{hp}");
                    if !servers.contains(&url) {
                        servers.push(url);
                    }
                }
            }
            Err(e) => eprintln!(
                "the kubeconfig names {} only: cannot list the other API servers: {e:#}",
                servers[0]
            ),
        }
        servers
    } else {
        args.server
    };
    let (cert, key) = pki
        .issue_client_certificate(&args.user, &args.groups, args.days)
        .context("failed to issue the client certificate")?;
    print!(
        "{}",
        pki.kubeconfig_with_certificate(&servers, &args.user, &cert, &key, &args.namespace)
    );
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Serves until Ctrl-C or SIGTERM, then stops the store cleanly.
async fn run_until_signal(store: &Store, tasks: Vec<tokio::task::JoinHandle<()>>) -> Result<()> {
    shutdown_signal().await;
    stop(store, tasks).await
}

/// Passes on `result`; on an error, shuts the store down first.
async fn close_on_error(store: &Store, result: Result<()>) -> Result<()> {
    if result.is_err() {
        if let Err(e) = store.shutdown().await {
            tracing::warn!(error = %format!("{e:#}"), "stopping the store after an error");
        }
    }
    result
}

/// Stops the serving tasks, then the store.
async fn stop(store: &Store, tasks: Vec<tokio::task::JoinHandle<()>>) -> Result<()> {
    for t in tasks {
        t.abort();
    }
    store
        .shutdown()
        .await
        .context("failed to stop the store cleanly")
}

/// Makes `dir` (and its parents) and closes it to everyone but its owner: it holds the
/// store, whose values include every Secret, and the cluster's keys and tokens. Files
/// made by this process are private too (umask 077), so a file that a library creates
/// with its own default mode is not readable by other local users either.
fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("failed to make {} private", dir.display()))
}

async fn up(args: UpArgs) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    private_dir(&dir)?;
    let api_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let api_addr = api_listener.local_addr()?;
    let mut cfg = StoreConfig::new(1, dir.join("store"), "127.0.0.1:0");
    if let Some(addr) = args.store_listen {
        // The store's port takes only clients with a certificate from its CA.
        cfg.tls = Some(member_tls(&dir.join("pki"), 1, &addr.to_string(), true)?);
    }
    let store = Store::open_single(cfg)
        .await
        .with_context(|| format!("failed to open the store in {}", dir.display()))?;
    // From here on the store is open: an error closes it before the process exits, as a
    // signal would, so that no RocksDB thread is at work while the process tears down.
    let result: Result<()> = async {
        let mut tasks = Vec::new();
        if let Some(addr) = args.store_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to listen on {addr}"))?;
            tasks.push(store.serve(l));
        }
        // A file given must exist; the default one is made at first start.
        let encryption = Some(match &args.encryption_provider_config {
            Some(p) => (p.clone(), false),
            None => (dir.join("pki").join("encryption-config.yaml"), true),
        });
        // The node agent below answers the API server in-process, without TLS.
        let local_nodes = LocalNodes::default();
        let api = start_api(
            &store,
            &dir,
            api_listener,
            api_addr,
            ApiOptions {
                encryption,
                local_nodes: local_nodes.clone(),
                join_token: None,
                limits: args.api_limits.clone(),
            },
            &mut tasks,
        )
        .await?;
        let mut loops = control::Loops::new();
        let controllers = baton_controllers::Config {
            node_monitor_grace: Duration::from_secs(args.node_monitor_grace),
            hpa_sync: Duration::from_secs(args.hpa_sync_period),
            node_cidr_mask: args.node_cidr_mask_size,
            ..Default::default()
        };
        if !args.no_controllers {
            loops
                .start_control_plane(&api.pki, &api.local, controllers)
                .await?;
        }
        if !args.no_node {
            let client =
                control::client_for(&api.pki, &api.local.server, "system:node:local").await?;
            let mut node = args.node.config(dir.join("node"))?;
            node.local_link = Some(local_nodes);
            node.runtime
                .extra_ca_pem
                .push(api.pki.ca_pem.clone().into_bytes());
            // The node renews its Lease four times within the grace its own control plane
            // gives it, so that a live node never looks lost between two renewals.
            node.heartbeat = node
                .heartbeat
                .min(Duration::from_secs(args.node_monitor_grace) / 4);
            loops.start_node(client, node);
        }
        println!("baton is up: Kubernetes API at {}", api.local.server);
        println!("kubeconfig: {}", api.kubeconfig.display());
        println!(
            "try: KUBECONFIG={} kubectl get nodes",
            api.kubeconfig.display()
        );
        shutdown_signal().await;
        loops.shutdown().await;
        stop(&store, tasks).await
    }
    .await;
    close_on_error(&store, result).await
}

async fn node(args: NodeCmdArgs) -> Result<()> {
    use baton_kube::balancer::{host_port, Balancer};
    private_dir(&args.data_dir)?;
    let kept = match &args.kubeconfig {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?,
        ),
        None => None,
    };
    // The API servers this node was given. It reaches them through a load balancer of
    // its own on 127.0.0.1, as k3s's agent does, so that it goes on when one dies.
    let urls = match &kept {
        Some(yaml) => vec![kubeconfig_server(yaml)?],
        None => args.server.clone(),
    };
    let given = urls
        .iter()
        .map(|u| host_port(u).with_context(|| format!("{u}: not an https:// URL")))
        .collect::<Result<Vec<_>>>()?;
    let balancer = Balancer::start(given.clone())
        .await
        .context("failed to start the API load balancer")?;
    let local = format!("https://{}", balancer.local_addr());
    let joined_by_token = kept.is_none();
    let yaml = match (kept, &args.token) {
        (Some(yaml), _) => yaml,
        (None, Some(token)) => {
            node_bootstrap(&local, token, &args.node.name, &args.data_dir).await?
        }
        (None, None) => bail!("give --kubeconfig, or --server and --token"),
    };
    let yaml = with_server(&yaml, &local);
    let joined = baton_kube::client::multiplexed_from_yaml(&yaml)
        .await
        .context("failed to connect to the cluster")?;
    let client = if joined_by_token {
        // The TLS bootstrap made the node's own identity: it renews that before it
        // expires, in place.
        let rotating = rotate::Rotating::new(joined);
        let name = args.node.name.clone();
        let local = local.clone();
        tokio::spawn(rotate::keep_fresh(
            rotating.clone(),
            args.data_dir.join("node-kubeconfig"),
            move |client, yaml| {
                let (name, local) = (name.clone(), local.clone());
                // Kept with the servers the node was given; used through the balancer.
                async move { rotate::renew(client, with_server(&yaml, &local), name).await }
            },
        ));
        rotating.client()
    } else {
        // Whatever the kubeconfig's user, the node goes on as system:node:NAME, under the
        // Node authorizer: it asks for its own client certificate first.
        node_identity(&joined, &yaml, &args.node.name)
            .await
            .with_context(|| {
                format!(
                    "failed to get the client certificate of node {}",
                    args.node.name
                )
            })?
    };
    let balancer = std::sync::Arc::new(balancer);
    let learner = tokio::spawn(learn_api_servers(client.clone(), balancer.clone(), given));
    let mut loops = control::Loops::new();
    let mut node = args.node.config(args.data_dir)?;
    // Components verify the API server (the `kubernetes` Service) as the node does.
    node.runtime.extra_ca_pem = baton_kube::client::cluster_ca_pem(&yaml)
        .await
        .context("failed to read the cluster CA from the kubeconfig")?;
    loops.start_node(client, node);
    println!("baton node {} is running", args.node.name);
    shutdown_signal().await;
    loops.shutdown().await;
    learner.abort();
    Ok(())
}

/// The `server:` of a kubeconfig's (first) cluster.
fn kubeconfig_server(yaml: &str) -> Result<String> {
    yaml.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("server: ")
                .map(|s| s.trim().to_string())
        })
        .context("the kubeconfig names no server")
}

/// The kubeconfig with every cluster's `server:` replaced by `url`.
fn with_server(yaml: &str, url: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.lines() {
        match line.trim_start().strip_prefix("server: ") {
            Some(_) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                out.push_str(&format!("{indent}server: {url}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Keeps the balancer's list at the servers given and those the `kubernetes`
/// EndpointSlices name (every member publishes itself there).
async fn learn_api_servers(
    client: kube::Client,
    balancer: std::sync::Arc<baton_kube::balancer::Balancer>,
    given: Vec<String>,
) {
    loop {
        match api_servers(&client).await {
            Ok(found) => {
                let mut servers = given.clone();
                servers.extend(found);
                balancer.set_servers(servers);
            }
            Err(e) => tracing::debug!(error = %e, "listing the API servers"),
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

/// Every API server's `host:port`, as the members publish themselves in the
/// `kubernetes` Service's EndpointSlices.
async fn api_servers(client: &kube::Client) -> Result<Vec<String>, kube::Error> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), "default");
    // The API servers' own slices only: another slice for the Service could name a decoy.
    let params = kube::api::ListParams::default().labels(
        "kubernetes.io/service-name=kubernetes,endpointslice.kubernetes.io/managed-by=baton-apiserver",
    );
    let mut servers = Vec::new();
    for slice in slices.list(&params).await?.items {
        for port in slice.ports.unwrap_or_default() {
            let Some(p) = port.port else { continue };
            for ep in &slice.endpoints {
                for a in &ep.addresses {
                    servers.push(match a.parse::<std::net::Ipv6Addr>() {
                        Ok(_) => format!("[{a}]:{p}"),
                        Err(_) => format!("{a}:{p}"),
                    });
                }
            }
        }
    }
    Ok(servers)
}

/// The kubeconfig of a node that joins with a token: the one it got before, kept in
/// `DATA/node-kubeconfig` while its certificate is good, else a new one from the
/// cluster's TLS bootstrap.
async fn node_bootstrap(
    server: &str,
    token: &str,
    name: &str,
    data_dir: &std::path::Path,
) -> Result<String> {
    let token = baton_apiserver::join::Token::parse(token).context("--token")?;
    let path = data_dir.join("node-kubeconfig");
    if let Ok(kept) = std::fs::read_to_string(&path) {
        if baton_kube::client::from_yaml(&kept).await.is_ok() {
            return Ok(kept);
        }
    }
    let yaml = join::node_kubeconfig(server, &token, name).await?;
    std::fs::write(&path, &yaml).with_context(|| format!("failed to write {}", path.display()))?;
    tracing::info!(
        node = name,
        "joined with a client certificate from the cluster's CA"
    );
    Ok(yaml)
}

/// A client acting as node `name`, from a client certificate the cluster issues to the
/// user of `joined`.
async fn node_identity(joined: &kube::Client, yaml: &str, name: &str) -> Result<kube::Client> {
    let body = serde_json::to_vec(&serde_json::json!({"usage": "client"}))?;
    let req = http::Request::post(format!("/baton/v1/nodes/{name}/certificate"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)?;
    let v: serde_json::Value = joined.request(req).await?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    let (Some(cert), Some(key)) = (get("certificate"), get("key")) else {
        bail!("the API server's answer has no certificate and key");
    };
    Ok(baton_kube::client::with_client_certificate(yaml, &cert, &key).await?)
}

/// A started API server: where it is, its PKI, and the admin kubeconfig.
struct StartedApi {
    /// Its address, and its routes for the control loops in this process.
    local: control::LocalApi,
    pki: Pki,
    kubeconfig: PathBuf,
}

/// How `start_api` sets the API server up.
struct ApiOptions {
    /// The EncryptionConfiguration file, and whether to make it if it is missing.
    encryption: Option<(PathBuf, bool)>,
    /// The node agents in this process, answered without TLS.
    local_nodes: LocalNodes,
    /// The cluster token members may join with.
    join_token: Option<baton_apiserver::join::Token>,
    /// Seats, Events' time to live and the requests' time limit.
    limits: ApiLimits,
}

/// Starts the API server over `store`.
async fn start_api(
    store: &Store,
    dir: &std::path::Path,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    opts: ApiOptions,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<StartedApi> {
    let ApiOptions {
        encryption,
        local_nodes,
        join_token,
        limits,
    } = opts;
    let pki = Pki::load_or_create(&dir.join("pki"), &[addr.ip().to_string()])
        .context("failed to set up the cluster's certificates and tokens")?;
    let mut objects = Objects::new(store.clone());
    objects.local_nodes = local_nodes;
    if let Some((path, create)) = encryption {
        let e = if create {
            baton_apiserver::encryption::Encryption::load_or_create(&path)
        } else {
            baton_apiserver::encryption::Encryption::load(&path)
        }
        .with_context(|| {
            format!(
                "failed to load the encryption configuration {}",
                path.display()
            )
        })?;
        objects = objects.with_encryption(e);
    }
    let mut api =
        ApiServer::with_max_inflight(objects, pki.clone(), limits.max_requests_inflight as usize)
            .with_request_timeout(Duration::from_secs(limits.request_timeout));
    if let Some(t) = join_token {
        api = api.with_join_token(t);
    }
    api.bootstrap()
        .await
        .context("failed to create the system namespaces")?;
    tasks.push(
        api.serve_tls(listener)
            .context("failed to start the API server")?,
    );
    tasks.push(api.publish_endpoint(addr));
    tasks.push(api.expire_events(Duration::from_secs(limits.event_ttl)));
    let kubeconfig = dir.join("kubeconfig");
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let server = format!("https://{host}:{}", addr.port());
    pki.write_kubeconfig(&kubeconfig, &server)
        .context("failed to write the kubeconfig")?;
    Ok(StartedApi {
        local: control::LocalApi {
            server,
            routes: api.router(),
        },
        pki,
        kubeconfig,
    })
}

async fn server(args: ServerArgs) -> Result<()> {
    // None with --store, which clap allows only without --listen and --listen-fd.
    let listener = match (args.listen_fd, args.listen) {
        (Some(fd), _) => Some(inherited_listener(fd)?),
        (None, Some(listen)) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("failed to listen on {listen}"))?,
        ),
        (None, None) => None,
    };
    let addr = match (&listener, &args.store) {
        (Some(l), _) => l.local_addr()?.to_string(),
        (None, store) => store.clone().unwrap_or_default(),
    };
    private_dir(&args.data_dir)?;
    let pki_dir = args.data_dir.join("pki");
    let token = args
        .token
        .as_deref()
        .map(baton_apiserver::join::Token::parse)
        .transpose()
        .context("--token")?;
    // A member joining by token installs the cluster's keys before anything else. One
    // that has them (a restart) starts without the server, which may be down.
    let mut seeds: Vec<String> = args.join.iter().cloned().collect();
    if let (Some(url), Some(token)) = (&args.server, &token) {
        match std::fs::read(pki_dir.join("ca.crt")) {
            Ok(pem) if !token.verifies_ca(&pem) => bail!(
                "{} belongs to another cluster: its CA is not the one the token names; give this member an empty --data-dir",
                args.data_dir.display()
            ),
            Ok(_) => {}
            Err(_) => {
                let (bundle, members) = join::fetch(url, token).await?;
                join::install(&bundle, token, &pki_dir)?;
                seeds = members;
            }
        }
        token.save(&args.data_dir.join("token"))?;
    }
    let id = member_id(args.id, &args.data_dir)?;
    let (store, member) = match (&args.store, listener) {
        (Some(url), _) => (open_external_etcd(&args, url).await?, None),
        (None, Some(listener)) => {
            let (store, tls) = open_member(&args, id, &addr, &pki_dir).await?;
            (store, Some((listener, tls)))
        }
        (None, None) => bail!("--listen, --listen-fd or --store is required"),
    };
    // From here on the store is open: an error closes it before the process exits, as a
    // signal would, so that no RocksDB thread is at work while the process tears down.
    let result: Result<()> = async {
        let mut tasks = Vec::new();
        if let Some((listener, tls)) = member {
            tasks.push(store.serve(listener));
            if args.bootstrap {
                store
                    .initialize()
                    .await
                    .context("failed to bootstrap the cluster")?;
            }
            let voter = store.status().members.iter().any(|m| m.id == id && m.voter);
            if !voter {
                // Installed earlier, but the join did not finish: ask again where to join.
                if let (true, Some(url), Some(token)) = (seeds.is_empty(), &args.server, &token) {
                    seeds = join::fetch(url, token).await?.1;
                }
                if !seeds.is_empty() {
                    join_store(&store, &seeds, &addr, &tls).await?;
                }
            }
        }
        if let Some(api_addr) = args.api_listen {
            let l = tokio::net::TcpListener::bind(api_addr)
                .await
                .with_context(|| format!("failed to listen on {api_addr}"))?;
            let api_addr = l.local_addr()?;
            let pki = Pki::load_or_create(&pki_dir, &[api_addr.ip().to_string()])
                .context("failed to set up the cluster's certificates and tokens")?;
            let token = match token {
                Some(t) => t,
                None => baton_apiserver::join::Token::load_or_create(
                    &args.data_dir.join("token"),
                    &pki.ca_pem,
                )
                .context("failed to load the cluster token")?,
            };
            let encryption = match &args.encryption_provider_config {
                Some(p) => (p.clone(), false),
                None => (pki_dir.join("encryption-config.yaml"), true),
            };
            // Members that join with the token get this member's configuration, wherever
            // it was given from, as their default.
            let encryption_file = encryption.0.clone();
            let api = start_api(
                &store,
                &args.data_dir,
                l,
                api_addr,
                ApiOptions {
                    encryption: Some(encryption),
                    local_nodes: LocalNodes::default(),
                    join_token: Some(token.clone()),
                    limits: args.api_limits.clone(),
                },
                &mut tasks,
            )
            .await?;
            // Nodes join with the node token, which cannot join servers.
            token
                .node_token()
                .save(&args.data_dir.join("node-token"))
                .context("failed to write the node token")?;
            tasks.push(tokio::spawn(keep_bundle(
                store.clone(),
                pki_dir.clone(),
                encryption_file.clone(),
                token,
            )));
            println!(
                "Kubernetes API at https://{api_addr}, kubeconfig: {}",
                api.kubeconfig.display()
            );
            println!(
                "cluster token: {} (servers join with --server https://{api_addr} --token ...); node token: {}",
                args.data_dir.join("token").display(),
                args.data_dir.join("node-token").display()
            );
            // Every member with an API server campaigns; the leader runs the control loops.
            let mut loops = control::Loops::new();
            loops
                .start_elected_control_plane(
                    &api.pki,
                    &api.local,
                    format!("baton-server-{id}"),
                    baton_controllers::Config {
                        node_monitor_grace: Duration::from_secs(args.node_monitor_grace),
                        node_cidr_mask: args.node_cidr_mask_size,
                        ..Default::default()
                    },
                )
                .await?;
            println!("baton server {id} listening on {addr}");
            shutdown_signal().await;
            loops.shutdown().await;
            return stop(&store, tasks).await;
        }
        println!("baton server {id} listening on {addr}");
        run_until_signal(&store, tasks).await
    }
    .await;
    close_on_error(&store, result).await
}

/// Opens this process's member of the embedded store, in `DATA/store`, with its
/// member certificate; the caller serves it and joins it to the cluster.
async fn open_member(
    args: &ServerArgs,
    id: u64,
    addr: &str,
    pki_dir: &std::path::Path,
) -> Result<(Store, baton_store::StoreTls)> {
    // The store lives in DATA/store, beside the member's pki, as `baton up`'s does;
    // members made before kept it in DATA itself, and still do.
    let store_dir = if args.data_dir.join("BATON_STORE").exists() {
        args.data_dir.clone()
    } else {
        args.data_dir.join("store")
    };
    let mut cfg = StoreConfig::new(id, &store_dir, addr);
    // Only the member that starts the cluster makes its store CA; a joiner must be given
    // the cluster's, or it could not talk to its peers.
    let tls = member_tls(
        pki_dir,
        id,
        addr,
        args.join.is_none() && args.server.is_none(),
    )?;
    cfg.tls = Some(tls.clone());
    cfg.heartbeat = Duration::from_millis(args.tuning.heartbeat_ms);
    cfg.election_timeout = (
        Duration::from_millis(args.tuning.election_ms),
        Duration::from_millis(args.tuning.election_ms * 3 / 2),
    );
    cfg.snapshot_after_logs = args.tuning.snapshot_after_logs;
    cfg.keep_logs = args.tuning.keep_logs;
    let store = Store::open(cfg)
        .await
        .with_context(|| format!("failed to open the store in {}", store_dir.display()))?;
    Ok((store, tls))
}

/// Connects to the external etcd `url` names, with the client TLS the flags give.
async fn open_external_etcd(args: &ServerArgs, url: &str) -> Result<Store> {
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("failed to read {}", p.display()));
    let tls = match &args.etcd_cacert {
        Some(ca) => Some(baton_store::EtcdTls {
            ca_pem: read(ca)?,
            identity: match (&args.etcd_cert, &args.etcd_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            },
        }),
        None => None,
    };
    let cfg = baton_store::EtcdConfig::from_url(url, tls).context("--store")?;
    Store::open_etcd(cfg)
        .await
        .with_context(|| format!("failed to reach etcd at {url}"))
}

/// This member's id: the one given, else the one kept in the data dir, else a new one
/// picked at random and kept. A given id that differs from the kept one is refused: the
/// store in the data dir belongs to that id.
fn member_id(given: Option<u64>, data_dir: &std::path::Path) -> Result<u64> {
    let path = data_dir.join("member-id");
    let kept = match std::fs::read_to_string(&path) {
        Ok(s) => Some(
            s.trim()
                .parse::<u64>()
                .with_context(|| format!("{} holds no member id", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    };
    let id = match (given, kept) {
        (Some(g), Some(k)) if g != k => {
            bail!("--id {g}, but {} belongs to member {k}", data_dir.display())
        }
        (Some(g), _) => g,
        (None, Some(k)) => k,
        // Below 2^53, so that every JSON reader keeps it exact.
        (None, None) => rand::random::<u64>() % ((1 << 53) - 1) + 1,
    };
    if kept.is_none() {
        std::fs::write(&path, format!("{id}\n"))
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(id)
}

/// Keeps the cluster's shared keys in the store, sealed under the token, for members
/// that join with it: written once, by whichever member comes first.
async fn keep_bundle(
    store: Store,
    pki_dir: PathBuf,
    encryption: PathBuf,
    token: baton_apiserver::join::Token,
) {
    use baton_apiserver::join::{Bundle, BUNDLE_KEY};
    let mut delay = Duration::from_millis(200);
    let mut said = String::new();
    loop {
        let result = async {
            if store
                .get(BUNDLE_KEY.as_bytes(), ReadOptions::default())
                .await?
                .is_some()
            {
                return Ok::<_, anyhow::Error>(());
            }
            let mut bundle = Bundle::read(&pki_dir)?;
            let config = std::fs::read(&encryption)
                .with_context(|| format!("failed to read {}", encryption.display()))?;
            bundle.0.insert("encryption-config.yaml".into(), config);
            let sealed = bundle.seal(&token);
            match store
                .put_if(BUNDLE_KEY, sealed, baton_store::Precondition::Absent)
                .await
            {
                Ok(_) | Err(baton_store::Error::Conflict { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                // Members cannot join until this succeeds: say why, once per reason.
                let why = format!("{e:#}");
                if why != said {
                    tracing::warn!(error = %why, "storing the cluster's keys for joining members; retrying");
                    said = why;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The listening socket a parent passed as file descriptor `fd`.
#[allow(unsafe_code)]
fn inherited_listener(fd: i32) -> Result<tokio::net::TcpListener> {
    use std::os::fd::FromRawFd;
    // Only descriptors a parent can have passed: 0-2 are stdio, and a negative one is
    // no descriptor at all.
    if fd < 3 {
        bail!("--listen-fd {fd}: not a descriptor a listening socket can be passed as");
    }
    // SAFETY: nothing else in this process owns `fd`: the parent passed it, and the
    // process opened nothing before parsing its arguments but the runtime's own
    // descriptors. If `fd` is not a socket after all (it was not passed, and the runtime
    // happens to use that number), it is never closed: ManuallyDrop forgets it.
    let std = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
    let listening =
        std.local_addr().is_ok() && std.take_error().map(|e| e.is_none()).unwrap_or(false);
    if !listening {
        bail!("--listen-fd {fd}: no listening TCP socket was passed as descriptor {fd}");
    }
    let std = std::mem::ManuallyDrop::into_inner(std);
    std.set_nonblocking(true)
        .context("failed to set up the inherited socket")?;
    Ok(tokio::net::TcpListener::from_std(std)?)
}

/// Member `id`'s TLS identity toward its peers and the store's clients, at `addr`, from
/// the store CA in `pki_dir`; `may_create`: whether this member may start a new CA.
fn member_tls(
    pki_dir: &std::path::Path,
    id: u64,
    addr: &str,
    may_create: bool,
) -> Result<baton_store::StoreTls> {
    let have = pki_dir.join(baton_store::StoreCa::KEY_FILE).exists();
    if !have && !may_create {
        bail!(
            "{} holds no store CA, so this member cannot prove itself to the cluster it joins: copy {} and {} from a member's pki directory",
            pki_dir.display(),
            baton_store::StoreCa::CERT_FILE,
            baton_store::StoreCa::KEY_FILE
        );
    }
    let ca = baton_store::StoreCa::load_or_create(pki_dir)
        .with_context(|| format!("failed to load the store CA in {}", pki_dir.display()))?;
    ca.member(id, &[addr])
        .context("failed to issue this member's certificate")
}

/// Joins the store cluster of `seeds` (any of its members), as a voter. Members may
/// start in any order or at the same moment: no seed may be up yet, or another
/// membership change may be under way, so this retries until this member is a voter,
/// and says why it waits.
async fn join_store(
    store: &Store,
    seeds: &[String],
    addr: &str,
    tls: &baton_store::StoreTls,
) -> Result<()> {
    let client = StoreClient::new(seeds.to_vec())
        .with_tls(tls)?
        .with_timeout(Duration::from_secs(30));
    let mut delay = Duration::from_millis(200);
    let mut said = String::new();
    loop {
        let why = match join_step(&client, store.id(), addr).await {
            Ok(true) => {
                tracing::info!(seeds = ?seeds, "joined the cluster as a voter");
                return Ok(());
            }
            // A step was taken; look again soon (the seed may see it a moment later).
            Ok(false) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        if why != said {
            tracing::info!(seeds = ?seeds, reason = %why, "waiting to join the cluster; retrying");
            said = why;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// One step towards being a voter: Ok(true) once this member is one.
async fn join_step(client: &StoreClient, id: u64, addr: &str) -> Result<bool, baton_store::Error> {
    let status = client.status().await?;
    match status.members.iter().find(|m| m.id == id) {
        Some(m) if m.voter => Ok(true),
        Some(_) => client.add_voter(id).await.map(|()| false),
        None => client.add_learner(id, addr).await.map(|()| false),
    }
}

/// `baton store repair`: offline, on a stopped member's data dir.
fn repair_store(data_dir: &std::path::Path) -> Result<()> {
    // `baton up` keeps its store in DIR/store; `baton server`, in DIR itself.
    let dir = if data_dir.join("store").is_dir() {
        data_dir.join("store")
    } else {
        data_dir.to_path_buf()
    };
    let done = baton_store::repair(&dir)
        .with_context(|| format!("failed to repair the store in {}", dir.display()))?;
    println!(
        "repaired {}: kept what preceded the damage; writes after it are lost",
        done.path.display()
    );
    Ok(())
}

/// The store client `baton store` talks as: the files given, or a certificate issued
/// now by the store CA of a data dir.
fn store_client_identity(args: &StoreArgs) -> Result<baton_store::StoreTls> {
    if let (Some(ca), Some(cert), Some(key)) = (&args.cacert, &args.cert, &args.key) {
        return baton_store::StoreTls::from_files(ca, cert, key)
            .context("failed to read the store client certificate");
    }
    let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let pki = dir.join("pki");
    let ca = baton_store::StoreCa::load(&pki).with_context(|| {
        format!(
            "no store CA in {}: give a member's --data-dir, or --cacert, --cert and --key",
            pki.display()
        )
    })?;
    ca.client("baton-store-cli")
        .context("failed to issue a store client certificate")
}

async fn store_verb(args: StoreArgs) -> Result<()> {
    if let StoreVerb::Repair { data_dir } = &args.verb {
        return repair_store(data_dir);
    }
    let client =
        StoreClient::new(args.endpoints.clone()).with_tls(&store_client_identity(&args)?)?;
    match args.verb {
        StoreVerb::Repair { .. } => unreachable!("handled above"),
        StoreVerb::Status => {
            let s = client.status().await?;
            println!(
                "member {} leader {:?} term {} revision {} compacted {}",
                s.id, s.leader, s.term, s.revision, s.compact_revision
            );
            for m in s.members {
                println!(
                    "  {} {} {}",
                    m.id,
                    m.addr,
                    if m.voter { "voter" } else { "learner" }
                );
            }
        }
        StoreVerb::Get { key } => match client.get(key.as_bytes(), ReadOptions::default()).await? {
            Some(kv) => println!("{}", String::from_utf8_lossy(&kv.value)),
            None => bail!("key {key:?} not found"),
        },
        StoreVerb::Put { key, value } => println!("revision {}", client.put(key, value).await?),
        StoreVerb::List { prefix } => {
            let mut req = RangeRequest::prefix(prefix);
            loop {
                let page = client.range(&req).await?;
                for kv in &page.kvs {
                    println!("{}\t{}", String::from_utf8_lossy(&kv.key), kv.mod_revision);
                }
                if !page.more {
                    break;
                }
                req.start_after = page.kvs.last().map(|kv| kv.key.clone());
                req.revision = page.revision;
            }
        }
        StoreVerb::Watch { prefix, from } => {
            let mut watch = client.watch(prefix, from).await?;
            while let Some(item) = watch.next().await {
                match item? {
                    WatchEvent::Events(re) => {
                        for e in re.events {
                            println!(
                                "{} {:?} {}",
                                re.revision,
                                e.kind,
                                String::from_utf8_lossy(&e.kv.key)
                            );
                        }
                    }
                    WatchEvent::Progress(rev) => println!("{rev} progress"),
                }
            }
        }
        StoreVerb::Compact { revision } => {
            println!("compacted to {}", client.compact(revision).await?)
        }
        StoreVerb::RemoveMember { id } => {
            client.remove_member(id).await?;
            println!("removed member {id}");
        }
    }
    Ok(())
}
