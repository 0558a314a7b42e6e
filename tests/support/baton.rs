#![allow(dead_code)] // shared by several test crates, each using a part
//! A `baton up` process on an ephemeral port, and the real kubectl (and curl) against it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct Baton {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub kubeconfig: PathBuf,
}

/// The built guest components (`scripts/build-guests.sh`).
pub fn guests_dir() -> PathBuf {
    baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("examples-wasm/dist")
}

/// A built guest component's path, as a pod's image names it.
pub fn guest(name: &str) -> String {
    let p = guests_dir().join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-guests.sh",
        p.display()
    );
    p.display().to_string()
}

/// The folder holding the versioned kubectl binaries (`kubectl.1.29`, ...).
pub fn kubectl_dir() -> PathBuf {
    let which = Command::new("sh")
        .args(["-c", "readlink -f \"$(command -v kubectl)\""])
        .output()
        .expect("sh");
    let path = PathBuf::from(String::from_utf8_lossy(&which.stdout).trim());
    path.parent().expect("kubectl has a folder").to_path_buf()
}

impl Baton {
    /// The store and the API server only: for tests of the API, which write statuses
    /// themselves and must not race the controllers.
    pub fn start() -> Baton {
        Self::start_with(&["--no-controllers", "--no-node"])
    }

    /// The whole system: API server, scheduler, controllers and a local node.
    pub fn start_cluster() -> Baton {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Baton {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// `baton up` on the data dir `DIR/data` of a dir that may hold one already.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Baton {
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            // Images may be paths only in the built guests and the test's own folder.
            .arg("--local-images")
            .arg(guests_dir())
            .arg("--local-images")
            .arg(dir.path().join("images"))
            .args(extra)
            // BATON_TEST_LOG=baton_controllers=debug shows a cluster's insides.
            .env(
                "RUST_LOG",
                std::env::var("BATON_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn baton up");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        // `baton up` prints its address once it serves; the read ends if it dies instead.
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.split("https://").nth(1) {
                addr = Some(rest.trim().to_string());
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let addr = addr.expect("baton up printed its API address");
        let kubeconfig = dir.path().join("data/kubeconfig");
        Baton {
            child,
            dir,
            addr,
            kubeconfig,
        }
    }

    /// The `baton up` process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills `baton up` at once (as a crash would) and hands back its dir.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Runs a kubectl binary (`kubectl`, or `kubectl.1.29` from the versioned folder).
    pub fn run(&self, bin: &str, args: &[&str], stdin: Option<&str>) -> Output {
        self.run_env(bin, args, stdin, &[])
    }

    /// [`Baton::run`] with more environment (`KUBE_EDITOR` for `kubectl edit`).
    pub fn run_env(
        &self,
        bin: &str,
        args: &[&str],
        stdin: Option<&str>,
        env: &[(&str, &str)],
    ) -> Output {
        let program = if bin == "kubectl" {
            PathBuf::from("kubectl")
        } else {
            kubectl_dir().join(bin)
        };
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.home())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        } else {
            drop(child.stdin.take());
        }
        // No kubectl call may hang a test: it is killed after two minutes.
        let pid = child.id();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = done_tx.send(());
        let _ = watchdog.join();
        out
    }

    /// The API server's count of a pod subresource's streams going on (`exec`, `attach`,
    /// `portforward`), from `apiserver_longrunning_requests`.
    pub fn streams_running(&self, subresource: &str) -> u64 {
        let text = self.ok(&["get", "--raw", "/metrics"]);
        let sub = format!(r#"subresource="{subresource}""#);
        text.lines()
            .filter(|l| l.starts_with("apiserver_longrunning_requests{"))
            .filter(|l| l.contains(r#"verb="CONNECT""#) && l.contains(&sub))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Runs kubectl and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with("kubectl", args, None)
    }

    pub fn ok_with(&self, bin: &str, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(bin, args, stdin);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{bin} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
        stdout
    }

    /// Runs kubectl expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run("kubectl", args, stdin);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A kubectl process left running (for `-w`), with its stdout piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.home())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl")
    }

    pub fn token(&self) -> String {
        let kc = std::fs::read_to_string(&self.kubeconfig).unwrap();
        kc.lines()
            .find_map(|l| l.trim().strip_prefix("token: ").map(String::from))
            .unwrap()
    }

    /// A raw request with curl; returns the HTTP status and the JSON body.
    pub fn curl(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let ca = self.dir.path().join("data/pki/ca.crt");
        let body_file = self.dir.path().join("curl-body");
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "--cacert",
        ])
        .arg(&ca)
        .args(["-H", &format!("Content-Type: {content_type}")]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            std::fs::write(&body_file, b).unwrap();
            cmd.arg("--data-binary")
                .arg(format!("@{}", body_file.display()));
        }
        cmd.arg(format!("https://{}{path}", self.addr));
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code: u16 = code.trim().parse().unwrap_or(0);
        (
            code,
            serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
        )
    }
}

impl Drop for Baton {
    /// SIGTERM first, so that the node removes what outlives the process otherwise (OCI
    /// containers, network namespaces); SIGKILL if it has not stopped in 10 s.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` returns Some; panics after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    baton_testkit::wait_until(timeout, what, f).unwrap_or_else(|e| panic!("{e}"))
}

pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// One GET on a fresh connection, as a client in a load loop sends it.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_get_within(addr, path, Duration::from_secs(5))
}

/// [`http_get`], waiting up to `wait` for the answer (a request held while its workload
/// comes up from zero).
pub fn http_get_within(
    addr: SocketAddr,
    path: &str,
    wait: Duration,
) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let code = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP response: {buf:?}"))?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

/// The payload of a chunked HTTP/1.1 body.
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Waits for `f`; on timeout, prints what the cluster looks like before failing.
pub fn wait_for<T>(b: &Baton, secs: u64, what: &str, f: impl FnMut() -> Option<T>) -> T {
    baton_testkit::wait_until(Duration::from_secs(secs), what, f).unwrap_or_else(|e| {
        let state = b.run(
            "kubectl",
            &["get", "deploy,rs,pods,endpointslices", "-o", "wide"],
            None,
        );
        panic!("{e}; cluster:\n{}", String::from_utf8_lossy(&state.stdout))
    })
}

/// Where the local node serves Ingresses over HTTP (started with `--ingress-http-port 0`,
/// it publishes the port it got on its Node).
#[allow(dead_code)]
pub fn ingress_http_addr(b: &Baton) -> std::net::SocketAddr {
    let port: u16 = wait_for(b, 30, "the node's Ingress port", || {
        jsonpath(
            b,
            &["node", "local"],
            "{.metadata.annotations.baton\\.dev/ingress-http-port}",
        )
        .parse()
        .ok()
    });
    ([127, 0, 0, 1], port).into()
}

pub fn jsonpath(b: &Baton, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let jp = format!("jsonpath={path}");
    args.extend(["-o", jp.as_str()]);
    let out = b.run("kubectl", &args, None);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
