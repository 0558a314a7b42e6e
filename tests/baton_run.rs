//! `baton run`: a component or a local pod manifest, as a user runs them.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
}

fn baton() -> Command {
    Command::new(env!("CARGO_BIN_EXE_baton"))
}

#[test]
fn runs_a_cli_component_with_args_env_and_exit_code() {
    let out = baton()
        .arg("run")
        .arg(root().join("examples-wasm/dist/hello.wasm"))
        .args(["-e", "A=1", "--", "x", "y"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("args=[\"x\", \"y\"]") && stdout.contains("env A=1"),
        "{stdout}"
    );
    let out = baton()
        .arg("run")
        .arg(root().join("examples-wasm/dist/job.wasm"))
        .args(["-e", "N=50", "-e", "EXIT_CODE=2"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failing job fails the command"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("primes below 50: 15"));
    let out = baton()
        .arg("run")
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a valid Wasm component"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_user_error_shows_its_causes_without_a_backtrace_or_colour() {
    let missing = root().join("no-such-dir/app.wasm");
    let out = baton()
        .arg("run")
        .arg(&missing)
        .env("RUST_BACKTRACE", "full")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("No such file"),
        "the cause is shown: {stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    // Output to a pipe carries no ANSI escapes, logs included.
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn runs_a_local_pod_whose_frontend_reaches_its_backend() {
    let mut child = baton()
        .args(["run", "-f"])
        .arg(root().join("examples-wasm/pods/frontend-backend.yaml"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Both containers serving: the frontend answers by asking the backend, and a pod's
    // containers start in no particular order.
    let mut addr = None;
    let mut backend = false;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("container frontend serves http://") {
            addr = line.split("http://").nth(1).map(|a| a.trim().to_string());
        }
        backend |= line.contains("container backend serves http://");
        if addr.is_some() && backend {
            break;
        }
    }
    // Keep reading: `baton run` still prints (the backend's address), and a closed pipe
    // would kill it, and the backend with it, before the request below.
    std::thread::spawn(move || for _ in lines {});
    let addr = addr.expect("the pod printed its frontend address");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /hi HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        resp.contains("hello from the backend from http-hello path=/hi"),
        "{resp}"
    );
}

#[test]
fn runs_a_local_job_pod_to_completion() {
    let out = baton()
        .args(["run", "-f"])
        .arg(root().join("examples-wasm/pods/job.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("primes below 100000: 9592")
            && stdout.contains("container job exited 0 (Completed)"),
        "{stdout}"
    );
}

/// A server that fails after its store is open (here: its API port is taken) exits with
/// its error, after closing the store, never with an abort from RocksDB's threads.
#[test]
fn a_server_that_fails_after_opening_its_store_exits_cleanly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = baton()
        .args([
            "server",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--bootstrap",
        ])
        .args(["--api-listen", &api, "--data-dir"])
        .arg(dir.path().join("member"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exited by a signal? {stderr}");
    assert!(stderr.contains("error: failed to listen on"), "{stderr}");
    assert!(!stderr.contains("terminate called"), "{stderr}");
}

/// `--listen-fd` takes only a listening socket a parent passed; anything else is a clear
/// error before the store is touched.
#[test]
fn a_server_given_no_socket_to_inherit_says_so() {
    let dir = tempfile::tempdir().unwrap();
    for (fd, says) in [
        ("9", "no listening TCP socket was passed as descriptor 9"),
        ("1", "not a descriptor a listening socket can be passed as"),
    ] {
        let out = baton()
            .args([
                "server",
                "--id",
                "1",
                "--listen-fd",
                fd,
                "--bootstrap",
                "--data-dir",
            ])
            .arg(dir.path().join("member"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!dir.path().join("member").exists(), "{stderr}");
    }
}
