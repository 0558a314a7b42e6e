//! Images from a real registry through the whole system: `baton push`, `baton pull` and
//! `baton images` on the command line, then a Deployment whose image is in a registry
//! with htpasswd auth, pulled with an imagePullSecret; and a missing image failing with
//! ErrImagePull, then ImagePullBackOff, with the registry's words.

#[path = "support/baton.rs"]
mod baton;
#[path = "../oci/tests/support/registry.rs"]
mod registry;

use std::process::Command;

use baton::Baton;
use registry::{Options, Registry};

fn guest(name: &str) -> String {
    baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .join("examples-wasm/dist")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

fn baton_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("baton");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_for(b: &Baton, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    baton::wait_for(b, secs, what, || f().then_some(()));
}

#[test]
fn a_deployment_runs_from_a_registry_and_missing_images_back_off() {
    let reg = Registry::start(Options {
        user: Some(("ci".into(), "pw".into())),
        tls: false,
    });
    let image = format!("{}/baton/http-hello:1.0", reg.addr);
    let creds = [
        "--insecure-registry",
        &reg.addr,
        "--username",
        "ci",
        "--password",
        "pw",
    ];

    // The command line: push prints the digest; pull fetches it; images lists it.
    let hello = guest("http-hello");
    let mut args = vec!["push", &hello, &image];
    args.extend_from_slice(&creds);
    let (ok, digest, err) = baton_cli(&args);
    assert!(ok, "push failed: {err}");
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    assert!(err.contains("100.0%"), "push progress is shown: {err}");
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().display().to_string();
    let mut args = vec!["pull", &image, "--cache-dir", &cache_dir];
    args.extend_from_slice(&creds);
    let (ok, out, err) = baton_cli(&args);
    assert!(ok, "pull failed: {err}");
    assert!(out.starts_with(digest.trim()), "{out}");
    assert!(err.contains("100.0%"), "progress is shown: {err}");
    let (ok, out, _) = baton_cli(&["images", "--cache-dir", &cache_dir]);
    assert!(ok && out.contains("baton/http-hello:1.0"), "{out}");
    let (ok, _, err) = baton_cli(&[
        "pull",
        &format!("{}/baton/http-hello:1.0", reg.addr),
        "--cache-dir",
        &cache_dir,
        "--insecure-registry",
        &reg.addr,
    ]);
    assert!(!ok && err.contains("unauthorized"), "{err}");

    // The cluster pulls it for a Deployment, with an imagePullSecret.
    let b = Baton::start_with(&["--insecure-registry", &reg.addr]);
    b.ok(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={}", reg.addr),
        "--docker-username=ci",
        "--docker-password=pw",
    ]);
    let manifest = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: pulled
spec:
  replicas: 2
  selector:
    matchLabels: {{app: pulled}}
  template:
    metadata:
      labels: {{app: pulled}}
    spec:
      imagePullSecrets: [{{name: regcred}}]
      containers:
      - name: hello
        image: {image}
        ports: [{{containerPort: 8080}}]
        env: [{{name: GREETING, value: pulled}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: missing
spec:
  imagePullSecrets: [{{name: regcred}}]
  containers:
  - name: hello
    image: {addr}/baton/nothing:1
"#,
        addr = reg.addr
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    b.ok(&[
        "wait",
        "--for=condition=Available",
        "deploy/pulled",
        "--timeout=90s",
    ]);
    let pods = b.ok(&["get", "pods", "-l", "app=pulled", "-o", "name"]);
    let first = pods
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("pod/")
        .to_string();
    let described = b.ok(&["describe", "pod", &first]);
    assert!(described.contains(&image), "{described}");
    let ip = b.ok(&["get", "pod", &first, "-o", "jsonpath={.status.podIP}"]);
    let body = std::process::Command::new("curl")
        .args(["-s", &format!("http://{ip}:8080/")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&body.stdout).starts_with("pulled from"));

    // A missing image: ErrImagePull with the registry's message, then ImagePullBackOff.
    let reason = |b: &Baton| {
        b.ok(&[
            "get",
            "pod",
            "missing",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}|{.status.containerStatuses[0].state.waiting.message}",
        ])
    };
    let mut seen_err = false;
    wait_for(&b, 60, "ImagePullBackOff after ErrImagePull", || {
        let r = reason(&b);
        if r.starts_with("ErrImagePull|") {
            assert!(r.contains("not found"), "{r}");
            seen_err = true;
        }
        r.starts_with("ImagePullBackOff|") && r.contains("not found")
    });
    let events = b.ok(&["describe", "pod", "missing"]);
    assert!(events.contains("Failed to pull image"), "{events}");
    let _ = seen_err;
}
