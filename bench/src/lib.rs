//! Shared pieces of Baton's benchmarks: child processes that are killed when dropped,
//! a `baton up` with a client for it, percentiles, ports, waiting on a condition,
//! process resource figures from /proc, and the certificates of an etcd with TLS.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Child processes killed and reaped when dropped, so a failed benchmark leaves nothing.
#[derive(Debug)]
pub struct Procs(pub Vec<Child>);

impl Procs {
    /// CPU time used so far by these processes.
    pub fn cpu(&self) -> Duration {
        self.0.iter().map(|c| proc_cpu(c.id())).sum()
    }

    /// Resident memory of these processes now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.0.iter().map(|c| rss_kib(c.id())).sum()
    }
}

impl Drop for Procs {
    /// SIGTERM first, so that a `baton up` removes what would outlive its process (OCI
    /// containers, network namespaces); SIGKILL for what has not stopped in 10 s.
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for c in &mut self.0 {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The fields of /proc/PID/stat after the command name (which is in parentheses and may
/// hold spaces).
fn stat_fields(pid: u32) -> Vec<String> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().map(str::to_string).collect()
}

/// CPU time (user + system) a process has used so far.
pub fn proc_cpu(pid: u32) -> Duration {
    let f = stat_fields(pid);
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Duration::from_secs_f64((tick(11) + tick(12)) / 100.0)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Polls `f` until it is true, for at most 60 s.
pub async fn wait_until<F, Fut>(what: &str, f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_within(Duration::from_secs(60), what, f).await
}

/// Polls `f` until it is true, for at most `deadline`.
pub async fn wait_within<F, Fut>(deadline: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let cond = || {
        let fut = f();
        async move { fut.await.then_some(()) }
    };
    baton_testkit::wait_until_async(deadline, what, cond).await?;
    Ok(())
}

/// The `p` quantile (0..=1) of some durations.
pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// A number from an environment variable, or a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A running `baton up` on a fresh data dir, and a kube client for it.
#[allow(missing_debug_implementations)] // kube::Client has no Debug
pub struct Up {
    pub procs: Procs,
    pub client: kube::Client,
    _dir: tempfile::TempDir,
}

impl Up {
    /// The data dir `baton up` runs on.
    pub fn data_dir(&self) -> &Path {
        self._dir.path()
    }
}

/// Starts `BIN up` (with `extra` arguments) and connects to it once it serves.
pub async fn up(bin: &Path, extra: &[&str]) -> Result<Up> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        // The benchmarks' images are the built guests, named by path.
        .arg("--local-images")
        .arg(baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../examples-wasm/dist"))
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting baton up")?;
    let stdout = child.stdout.take().context("stdout")?;
    let procs = Procs(vec![child]);
    let mut lines = BufReader::new(stdout).lines();
    // `baton up` prints its address once it serves; the read ends if it dies instead.
    for line in lines.by_ref() {
        if line?.contains("https://") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let kc = Kubeconfig::read_from(dir.path().join("kubeconfig"))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = kube::Client::try_from(config)?;
    Ok(Up {
        procs,
        client,
        _dir: dir,
    })
}

/// An HTTP/1.1 load generator: keep-alive connections sending requests back to back.
pub mod scale;

pub mod http {
    /// One cell of a throughput table.
    #[derive(Debug)]
    pub struct Row {
        pub rate: f64,
        pub p50: Duration,
        pub p99: Duration,
        /// Server CPU per request, in microseconds.
        pub cpu_us: f64,
    }

    /// A second of warm-up, then `clients` connections against `addr` for `secs`, with the
    /// CPU the server processes `procs` spent meanwhile.
    pub async fn measure(
        procs: &crate::Procs,
        addr: SocketAddr,
        clients: usize,
        secs: f64,
    ) -> Result<Row> {
        load(addr, clients, 1.0).await?;
        let cpu0 = procs.cpu();
        let (rate, mut lat) = load(addr, clients, secs).await?;
        let cpu = procs.cpu().saturating_sub(cpu0);
        Ok(Row {
            rate,
            p50: crate::pct(&mut lat, 0.5),
            p99: crate::pct(&mut lat, 0.99),
            cpu_us: cpu.as_secs_f64() * 1e6 / (lat.len().max(1) as f64),
        })
    }

    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Result};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

    /// A connection to `addr`, ready to send requests.
    pub async fn connect(addr: SocketAddr) -> Result<Sender> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One `GET /bench`, its body read: how long it took.
    pub async fn request(sender: &mut Sender) -> Result<Duration> {
        let req = hyper::Request::get("/bench")
            .header(hyper::header::HOST, "bench")
            .body(Empty::<Bytes>::new())?;
        let t0 = Instant::now();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        ensure!(status == 200, "status {status}: {body:?}");
        Ok(t0.elapsed())
    }

    /// One request on a fresh connection.
    pub async fn get_once(addr: SocketAddr) -> Result<()> {
        request(&mut connect(addr).await?).await.map(|_| ())
    }

    /// One keep-alive connection sending requests back to back until the deadline.
    pub async fn client(addr: SocketAddr, deadline: Instant) -> Result<Vec<Duration>> {
        let mut sender = connect(addr).await?;
        let mut lat = Vec::new();
        while Instant::now() < deadline {
            lat.push(request(&mut sender).await?);
        }
        Ok(lat)
    }

    /// Runs `clients` connections against `addr` for `secs`: (requests/s, latencies).
    pub async fn load(addr: SocketAddr, clients: usize, secs: f64) -> Result<(f64, Vec<Duration>)> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let tasks: Vec<_> = (0..clients)
            .map(|_| tokio::spawn(client(addr, deadline)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        Ok((all.len() as f64 / start.elapsed().as_secs_f64(), all))
    }
}

/// The `wasmtime serve` peers a throughput benchmark runs: as its users run it, and with
/// the slot reuse Baton configures (dirty pages found with PAGEMAP_SCAN and copied back
/// rather than dropped with madvise), so a ratio can be read against either.
pub const WASMTIME_PEERS: [(&str, &[&str]); 2] = [
    ("wasmtime serve", &[]),
    (
        "wasmtime serve, tuned",
        &[
            "-O",
            "pooling-allocator=y,pooling-pagemap-scan=auto,pooling-memory-keep-resident=524288,pooling-table-keep-resident=65536",
        ],
    ),
];

/// `wasmtime serve` on http-hello with `options` ([`WASMTIME_PEERS`]): port 0, announced
/// on stderr, and, as Baton runs, no backtrace captured for the errors wasmtime makes on
/// every request (disposing a finished store's fibers).
pub fn wasmtime_serve(wasmtime: &Path, options: &[&str], wasm: &Path) -> Command {
    let mut cmd = Command::new(wasmtime);
    cmd.env("RUST_LIB_BACKTRACE", "0")
        .args(["serve", "-S", "cli", "--addr", "127.0.0.1:0"])
        .args(options)
        .args(["--env", "GREETING=hi"])
        .arg(wasm);
    cmd
}

/// Certificates for an etcd cluster with peer and client TLS, as a production etcd runs:
/// one CA, a serving and peer certificate for the members' addresses, and a client
/// certificate.
pub struct EtcdTls {
    dir: std::path::PathBuf,
    ca: String,
    client: (String, String),
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl EtcdTls {
    /// Writes `ca.crt`, `server.crt` and `server.key` (good for `ips`) into `dir`.
    pub fn make(dir: &Path, ips: &[std::net::IpAddr]) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key)?;
        let issue = |usages: Vec<ExtendedKeyUsagePurpose>| -> Result<(String, String)> {
            let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
            for ip in ips {
                p.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
            }
            p.extended_key_usages = usages;
            let key = KeyPair::generate()?;
            Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let server = issue(vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ])?;
        let client = issue(vec![ExtendedKeyUsagePurpose::ClientAuth])?;
        std::fs::write(dir.join("ca.crt"), ca_cert.pem())?;
        std::fs::write(dir.join("server.crt"), &server.0)?;
        std::fs::write(dir.join("server.key"), &server.1)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: ca_cert.pem(),
            client,
        })
    }

    /// etcd's flags for member `name` of a new cluster with peer and client TLS:
    /// clients at `client` (`host:port`), peers at `peer`, the members' peer URLs in
    /// `initial` (`NAME=https://host:port,...`), data in `data_dir`.
    pub fn member_flags(
        &self,
        name: &str,
        data_dir: &Path,
        client: &str,
        peer: &str,
        initial: &str,
    ) -> Vec<String> {
        let mut flags = vec![
            format!("--name={name}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls=https://{client}"),
            format!("--advertise-client-urls=https://{client}"),
            format!("--listen-peer-urls=https://{peer}"),
            format!("--initial-advertise-peer-urls=https://{peer}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=bench".into(),
            "--log-level=error".into(),
        ];
        flags.extend(self.flags());
        flags
    }

    /// etcd's flags for client and peer TLS, each side requiring a certificate.
    pub fn flags(&self) -> Vec<String> {
        let f = |n: &str| self.dir.join(n).display().to_string();
        vec![
            format!("--cert-file={}", f("server.crt")),
            format!("--key-file={}", f("server.key")),
            format!("--trusted-ca-file={}", f("ca.crt")),
            "--client-cert-auth".into(),
            format!("--peer-cert-file={}", f("server.crt")),
            format!("--peer-key-file={}", f("server.key")),
            format!("--peer-trusted-ca-file={}", f("ca.crt")),
            "--peer-client-cert-auth".into(),
        ]
    }

    pub fn connect_options(&self) -> etcd_client::ConnectOptions {
        etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&self.ca))
                .identity(etcd_client::Identity::from_pem(
                    &self.client.0,
                    &self.client.1,
                )),
        )
    }
}
