//! The web dashboard in a real browser: Debian's headless Chromium, driven by Playwright
//! (`tests/ui/dashboard.mjs`), against `baton up`. A user logs in with a token, watches
//! the example Deployment's pods turn Ready without a reload, scales it to 3, edits its
//! YAML, restarts it and deletes a pod, each confirmed; follows a pod's logs as lines
//! arrive; and a user bound to `view` gets no edit buttons, while the same calls forced
//! from the page are refused by the API. Screenshots of each step are kept under the
//! target dir (`tmp/dashboard-screenshots`).

#[path = "support/baton.rs"]
mod baton;

use std::path::PathBuf;
use std::process::Command;

use baton::{guests_dir, Baton};

/// A network namespace for Chromium, linked to the host by a veth pair, with a TCP
/// forwarder from the host's end to the API server. Chromium drops every request in
/// flight (`ERR_NETWORK_CHANGED`) when it sees an address come or go, and pods' bridges
/// and veths come and go on the host all the time, in this test and in the tests beside
/// it; in a namespace of its own, Chromium sees none of them.
struct BrowserNet {
    ns: String,
    /// What Chromium dials: the host's end of the veth, forwarded to the API.
    url: String,
}

impl BrowserNet {
    const HOST: &'static str = "169.254.170.1";
    const INSIDE: &'static str = "169.254.170.2";

    fn new(api: &str) -> BrowserNet {
        let ns = format!("btui{}", std::process::id());
        let (outside, inside) = ("btui-h", "btui-c");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // Leftovers of a run that was killed.
        let _ = Command::new("ip")
            .args(["link", "delete", outside])
            .output();
        ip(&["netns", "add", &ns]);
        // No IPv6 inside: its link-local address would arrive a moment after the link
        // is up, and Chromium would take that for a change of network too.
        for key in ["all", "default"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw"])
                .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
                .output()
                .expect("run sysctl");
            assert!(out.status.success(), "{out:?}");
        }
        ip(&[
            "link", "add", outside, "type", "veth", "peer", "name", inside,
        ]);
        ip(&["link", "set", inside, "netns", &ns]);
        ip(&["addr", "add", &format!("{}/30", Self::HOST), "dev", outside]);
        ip(&["link", "set", outside, "up"]);
        let inside_addr = format!("{}/30", Self::INSIDE);
        ip(&["-n", &ns, "addr", "add", &inside_addr, "dev", inside]);
        ip(&["-n", &ns, "link", "set", inside, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let listener = std::net::TcpListener::bind((Self::HOST, 0)).expect("bind the forwarder");
        let url = format!("https://{}", listener.local_addr().unwrap());
        let api = api.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&api) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        BrowserNet { ns, url }
    }

    /// A launcher Playwright can start as Chromium: the real one, inside the namespace.
    fn chromium(&self, dir: &std::path::Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("chromium-in-netns");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec ip netns exec {} /usr/bin/chromium \"$@\"\n",
                self.ns
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for BrowserNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .output();
    }
}

fn ui_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

/// A ServiceAccount bound to a ClusterRole, and a token for it.
fn token_for(b: &Baton, name: &str, role: &str) -> String {
    b.ok(&["create", "serviceaccount", name]);
    b.ok(&[
        "create",
        "clusterrolebinding",
        name,
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount=default:{name}"),
    ]);
    b.ok(&["create", "token", name, "--duration=1h"])
        .trim()
        .to_string()
}

/// `baton kubeconfig` for `user`: its client certificate and key, written as PEM files.
fn certificate_for(b: &Baton, user: &str) -> (PathBuf, PathBuf) {
    use base64::Engine;
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["kubeconfig", "--user", user, "--data-dir"])
        .arg(b.dir.path().join("data"))
        .output()
        .expect("run baton kubeconfig");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| -> Vec<u8> {
        let b64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .trim();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    };
    let cert = b.dir.path().join(format!("{user}.crt"));
    let key = b.dir.path().join(format!("{user}.key"));
    std::fs::write(&cert, field("client-certificate-data:")).unwrap();
    std::fs::write(&key, field("client-key-data:")).unwrap();
    (cert, key)
}

#[test]
fn dashboard_in_headless_chromium() {
    assert!(
        ui_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/setup.sh"
    );
    let b = Baton::start_with(&["--pod-cidr", "127.170.0.0/24"]);
    let admin = token_for(&b, "dash-admin", "cluster-admin");
    let viewer = token_for(&b, "dash-viewer", "view");
    // A user known only by a client certificate the cluster CA signed, bound to `view`.
    let (cert, key) = certificate_for(&b, "dash-cert");
    b.ok(&[
        "create",
        "clusterrolebinding",
        "dash-cert",
        "--clusterrole=view",
        "--user=dash-cert",
    ]);

    // The README's example, its image the locally built component.
    let example = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/hello/deployment.yaml"),
    )
    .unwrap();
    let hello = guests_dir().join("http-hello.wasm");
    let deployment = example.replace(
        "127.0.0.1:5000/baton/http-hello:1.0",
        hello.to_str().unwrap(),
    );
    assert_ne!(deployment, example, "the example names its image");
    let ticker = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ticker}}\nspec:\n  containers:\n  - name: main\n    image: {}\n    env: [{{name: TICKS, value: \"600\"}}, {{name: TICK_MS, value: \"500\"}}]\n",
        guests_dir().join("hello.wasm").display()
    );

    let net = BrowserNet::new(&b.addr);
    let launcher = net.chromium(b.dir.path());
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&artifacts);
    let out = Command::new("node")
        .arg(ui_dir().join("dashboard.mjs"))
        .current_dir(ui_dir())
        .env("BATON_URL", &net.url)
        .env("CHROMIUM", launcher)
        .env("KUBECONFIG", &b.kubeconfig)
        .env("HOME", b.home())
        .env("ADMIN_TOKEN", admin)
        .env("VIEW_TOKEN", viewer)
        .env("DEPLOYMENT", deployment)
        .env("TICKER", ticker)
        .env("ARTIFACTS", &artifacts)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser steps failed:\n{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 10);

    // The client certificate: Playwright presents it through a proxy on loopback, so
    // Node runs in the namespace too, beside its Chromium.
    let out = Command::new("ip")
        .args(["netns", "exec", &net.ns, "node"])
        .arg(ui_dir().join("dashboard.mjs"))
        .current_dir(ui_dir())
        .env("ONLY", "client-certificate")
        .env("BATON_URL", &net.url)
        .env("HOME", b.home())
        .env("ARTIFACTS", &artifacts)
        .env("CLIENT_CERT", cert)
        .env("CLIENT_KEY", key)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the certificate step failed:\n{stdout}"
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 1);
    // Every step left its screenshot.
    let shots = std::fs::read_dir(&artifacts).unwrap().count();
    assert!(shots >= 7, "{shots} screenshots in {}", artifacts.display());
}
