//! Hosts of a test cluster on network namespaces (`baton_testkit::netns`): `baton
//! server` and `baton node` processes on them, and `kubectl` against them.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_testkit::netns::Net;

pub const STORE_PORT: u16 = 2380;
pub const API_PORT: u16 = 6443;

pub struct Server {
    pub child: Child,
    pub host: usize,
    pub dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// Waits until it serves the API (a joiner does once it has joined).
    pub fn wait_ready(&mut self) {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        if let Err(e) = baton_testkit::process::announced_addr(
            stdout,
            "Kubernetes API at https://",
            Duration::from_secs(120),
        ) {
            panic!("host {}: {e}; its log:\n{}", self.host, self.log());
        }
    }
}

/// On a failing test, prints what the hosts' logs under `dir` say of the store's
/// elections: the logs live in the test's temporary directory, and go with it, so CI's
/// output is all that is left of a rare failure.
pub struct ElectionsOnFailure(pub PathBuf);

impl Drop for ElectionsOnFailure {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        // Where a run leaves its hosts' whole logs, for a closer look.
        if let Some(keep) = std::env::var_os("BATON_TEST_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            for log in &logs {
                if let Some(name) = log.file_name() {
                    let _ = std::fs::copy(log, keep.join(name));
                }
            }
        }
        if !std::thread::panicking() {
            return;
        }
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    ["leader", "elect", "vote", "joined"]
                        .iter()
                        .any(|k| l.contains(k))
                        && !l.contains("openraft::replication")
                })
                .collect();
            eprintln!("--- {}: the store's elections", log.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{}", l.chars().take(400).collect::<String>());
            }
        }
    }
}

/// Seconds a node may be silent before its pods are evicted (40 by default).
pub const NODE_GRACE: &str = "6";

/// Starts `baton server` on `host`, with its store and API on the host's address.
pub fn spawn_server(net: &Net, host: usize, dir: &Path, extra: &[&str]) -> Server {
    let ip = net.host(host).ip;
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let child = net
        .command(host, env!("CARGO_BIN_EXE_baton"))
        .env(
            "RUST_LOG",
            "info,openraft=warn,openraft::engine::engine_impl=info",
        )
        .args(["server", "--listen", &format!("{ip}:{STORE_PORT}")])
        .args(["--api-listen", &format!("{ip}:{API_PORT}"), "--data-dir"])
        .arg(dir)
        .args(["--node-monitor-grace", NODE_GRACE])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn baton server in a network namespace");
    Server {
        child,
        host,
        dir: dir.to_path_buf(),
    }
}

/// Starts `baton node` on `host`, joining with the node token through every server.
pub fn spawn_node(net: &Net, host: usize, dir: &Path, servers: &str, token: &str) -> Server {
    let ip = net.host(host).ip;
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let child = net
        .command(host, env!("CARGO_BIN_EXE_baton"))
        .env("RUST_LOG", "info")
        .args(["node", "--server", servers, "--token", token])
        .args(["--node-name", &format!("node-{host}")])
        .args(["--node-address", &ip.to_string()])
        // Renewed every second, well within the control plane's grace.
        .args(["--node-lease-duration", "4", "--local-images"])
        .arg(guests_dir())
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn baton node in a network namespace");
    Server {
        child,
        host,
        dir: dir.to_path_buf(),
    }
}

pub fn guests_dir() -> PathBuf {
    baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("examples-wasm/dist")
}

pub fn kubectl(kubeconfig: &Path, server: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(["--server", server, "--request-timeout=5s"])
        .args(args)
        .output()
        .expect("kubectl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `kubectl apply -f -` of `manifest` through `server`, bounded by `timeout`.
pub fn kubectl_apply(
    kubeconfig: &Path,
    server: &str,
    timeout: &str,
    manifest: &str,
) -> Result<(), String> {
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(["--server", server, "--request-timeout", timeout])
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
