//! Debian's `etcd` (etcd-server), one member started by a test on port 0, and stopped
//! when dropped. Its client address is read from its log, as [`crate::process`] does.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::TimedOut;

/// A running single-member etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

/// The files of etcd's client TLS: its serving certificate and key, and the CA whose
/// client certificates it takes (`--client-cert-auth`).
#[derive(Debug)]
pub struct ServingTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
}

impl Etcd {
    /// One speaking plain HTTP.
    pub fn start() -> Result<Self, TimedOut> {
        Self::launch(None)
    }

    /// One that serves HTTPS and takes only clients with a certificate from `tls.client_ca`.
    pub fn start_tls(tls: ServingTls<'_>) -> Result<Self, TimedOut> {
        Self::launch(Some(tls))
    }

    fn launch(tls: Option<ServingTls<'_>>) -> Result<Self, TimedOut> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "test"])
            .args(["--listen-client-urls", &format!("{scheme}://127.0.0.1:0")])
            .args([
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:0"),
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:0"])
            // A lone member never dials its peer URL: it only names the member.
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "test=http://127.0.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = &tls {
            cmd.arg("--cert-file")
                .arg(t.cert)
                .arg("--key-file")
                .arg(t.key)
                .arg("--trusted-ca-file")
                .arg(t.client_ca)
                .arg("--client-cert-auth");
        }
        let mut child = cmd
            .spawn()
            .expect("etcd (scripts/setup.sh installs Debian's etcd-server)");
        let stderr = child.stderr.take().expect("piped stderr");
        // "serving client requests on" (TLS) or "serving insecure client requests on":
        // etcd logs it once it is ready.
        let addr = match crate::process::announced_addr(
            stderr,
            "client requests on ",
            Duration::from_secs(30),
        ) {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            child,
            url: format!("{scheme}://{addr}"),
            _dir: dir,
        })
    }

    /// Where it keeps its data (its WAL and database).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("data")
    }

    /// Its client URL (`http://127.0.0.1:PORT` or `https://...`).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
