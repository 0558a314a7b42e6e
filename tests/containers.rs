//! OCI containers with real runc against `baton up`, from a Linux image (Debian's
//! busybox-static packed by the test) in a real registry: output in `kubectl logs`, exit
//! codes and OOM kills in the pod's status, `kubectl exec`, TERM then KILL at the grace
//! period, a component beside a container in one pod, and nothing left behind (runc
//! containers, network namespaces) once pods are deleted.

#[path = "support/baton.rs"]
mod baton;
#[path = "../oci/tests/support/images.rs"]
mod images;
#[path = "../oci/tests/support/registry.rs"]
mod registry;

use baton::{guests_dir, jsonpath, wait_for, Baton};
use registry::{Options, Registry};

/// `baton up` flags for a loopback range of its own and the test registry trusted.
fn flags(reg: &Registry) -> Vec<String> {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cidr = format!("127.{}.0.0/24", 170 + n);
    ["--pod-cidr", &cidr, "--insecure-registry", &reg.addr]
        .map(String::from)
        .to_vec()
}

fn cluster(reg: &Registry) -> Baton {
    let f = flags(reg);
    Baton::start_with(&f.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The processes whose command line names `text`.
fn pids_naming(text: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", text])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn processes_naming(text: &str) -> usize {
    pids_naming(text).len()
}

/// A registry holding `baton/busybox:1`.
fn registry_with_busybox() -> (Registry, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reg = Registry::start(Options::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layers = [(images::busybox_layer(), images::GZIP)];
    rt.block_on(images::push(
        &reg.addr,
        "baton/busybox:1",
        &layers,
        images::config(images::node_arch(), &layers),
    ));
    let image = format!("{}/baton/busybox:1", reg.addr);
    (reg, image)
}

/// runc containers still known under the cluster's state directory.
fn runc_containers(b: &Baton) -> Vec<String> {
    let root = b.dir.path().join("data/node/runc");
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn netns_of(b: &Baton, pod: &str) -> bool {
    let uid = jsonpath(b, &["pod", pod], "{.metadata.uid}");
    std::path::Path::new("/run/netns")
        .join(format!("baton-{uid}"))
        .exists()
}

/// A plain HTTP/1.0 GET from the test, on the node, to `addr`: its whole answer.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out);
    out
}

fn apply(b: &Baton, yaml: &str) {
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(yaml));
}

#[test]
fn a_container_runs_logs_execs_and_reports_its_end() {
    let (reg, image) = registry_with_busybox();
    let b = cluster(&reg);
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: box}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'echo hello from runc $FROM_IMAGE $GREETING; hostname; touch /tmp/up; exec sleep 1000']\n    env: [{{name: GREETING, value: hi}}]\n    readinessProbe: {{exec: {{command: [cat, /tmp/up]}}, periodSeconds: 1}}\n"
        ),
    );
    b.ok(&["wait", "--for=condition=Ready", "pod/box", "--timeout=120s"]);
    let logs = wait_for(&b, 30, "the container's output in its log", || {
        let l = b.ok(&["logs", "box"]);
        (l.lines().count() >= 2).then_some(l)
    });
    assert!(logs.contains("hello from runc yes hi"), "{logs}");
    assert!(
        logs.contains("box"),
        "the pod's name is its hostname: {logs}"
    );
    assert!(netns_of(&b, "box"), "the pod has a network namespace");

    // kubectl exec runs in the container, with its exit code.
    let out = b.ok(&["exec", "box", "--", "sh", "-c", "echo in the box; id -u"]);
    assert_eq!(out, "in the box\n0\n");
    let failed = b.run(
        "kubectl",
        &["exec", "box", "--", "sh", "-c", "exit 3"],
        None,
    );
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");
    // `-it` gives the command a terminal of kubectl's size (kubectl needs one of its own:
    // `script` gives it a pty), and still its exit code.
    let tty = std::process::Command::new("script")
        .args([
            "-qec",
            // runc sizes the terminal just after the command starts.
            "stty cols 100 rows 30; kubectl exec -it box -- sh -c 'tty; i=0; while [ \"$(stty size 2>/dev/null)\" != \"30 100\" ] && [ $i -lt 1000 ]; do i=$((i+1)); done; stty size; exit 4'",
            "/dev/null",
        ])
        .env("KUBECONFIG", &b.kubeconfig)
        .env("HOME", b.home())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(shown.contains("/dev/pts/"), "{tty:?}");
    assert!(shown.contains("30 100"), "{tty:?}");
    assert_eq!(tty.status.code(), Some(4), "{tty:?}");

    // shareProcessNamespace: a container sees its sibling's processes, under a PID 1 of
    // the pod's; apart, each sees its own.
    for (name, share) in [("shared", true), ("apart", false)] {
        apply(
            &b,
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  shareProcessNamespace: {share}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: a, image: {image}, command: [sleep, '1001']}}\n  - {{name: b, image: {image}, command: [sleep, '1002']}}\n"
            ),
        );
        b.ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=120s",
        ]);
        let ps = b.ok(&["exec", name, "-c", "b", "--", "ps"]);
        assert!(ps.contains("sleep 1002"), "{ps}");
        assert_eq!(ps.contains("sleep 1001"), share, "{name}: {ps}");
        assert_eq!(ps.contains("pause"), share, "{name}: {ps}");
    }

    // A pod of a process that exits: its code and reason.
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: job}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'echo done; exit 7']}}\n"
        ),
    );
    let code = wait_for(&b, 60, "the job's container to end", || {
        let c = jsonpath(
            &b,
            &["pod", "job"],
            "{.status.containerStatuses[0].state.terminated.exitCode}",
        );
        (!c.is_empty()).then_some(c)
    });
    assert_eq!(code, "7");
    let reason = jsonpath(
        &b,
        &["pod", "job"],
        "{.status.containerStatuses[0].state.terminated.reason}",
    );
    assert_eq!(reason, "Error");

    // Over its memory limit: OOMKilled, and restarted; its Wasm sibling keeps serving.
    let web = guests_dir().join("http-hello.wasm");
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: hog}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: web, image: {}, ports: [{{containerPort: 8080}}]}}\n  - name: main\n    image: {image}\n    command: [dd, if=/dev/zero, of=/dev/null, bs=64M, count=1]\n    resources: {{limits: {{memory: 16Mi}}}}\n",
            web.display()
        ),
    );
    let main = |field: &str| {
        jsonpath(
            &b,
            &["pod", "hog"],
            &format!("{{.status.containerStatuses[?(@.name==\"main\")].{field}}}"),
        )
    };
    let reason = wait_for(&b, 60, "the hog to be OOM-killed and restarted", || {
        let restarts: u32 = main("restartCount").parse().unwrap_or(0);
        let r = main("lastState.terminated.reason");
        (restarts >= 1 && !r.is_empty()).then_some(r)
    });
    assert_eq!(reason, "OOMKilled");
    let ip = jsonpath(&b, &["pod", "hog"], "{.status.podIP}");
    let got = http_get(&format!("{ip}:8080"), "/after-the-oom");
    assert!(
        got.contains("hello from http-hello path=/after-the-oom"),
        "{got}"
    );

    // A command the image does not have.
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: missing}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [/no/such/binary]}}\n"
        ),
    );
    let message = wait_for(&b, 60, "the missing command to be reported", || {
        let m = jsonpath(
            &b,
            &["pod", "missing"],
            "{.status.containerStatuses[0].state.terminated.message}",
        );
        (!m.is_empty()).then_some(m)
    });
    assert!(message.contains("/no/such/binary"), "{message}");

    // Deleting the pods stops their containers (sleep ignores TERM as PID 1: it is
    // killed at the 2 s grace period) and leaves nothing behind.
    let started = std::time::Instant::now();
    b.ok(&[
        "delete",
        "pod",
        "box",
        "job",
        "hog",
        "missing",
        "shared",
        "apart",
        "--wait=true",
    ]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "deletion took {:?}",
        started.elapsed()
    );
    wait_for(&b, 30, "no runc container left", || {
        runc_containers(&b).is_empty().then_some(())
    });
}

#[test]
fn a_component_and_a_container_share_the_pods_localhost_both_ways() {
    let (reg, image) = registry_with_busybox();
    let b = cluster(&reg);
    let web = guests_dir().join("http-hello.wasm");
    let toolbox = guests_dir().join("toolbox.wasm");
    // The container's port is not declared: inside the pod every port is shared.
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: mixed, labels: {{app: mixed}}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: web, image: {web}, ports: [{{containerPort: 8080}}]}}\n  - {{name: tools, image: {tools}, args: [sleep]}}\n  - name: side\n    image: {image}\n    command: [sh, -c, 'echo from-the-container > /tmp/index.html; exec httpd -f -p 9090 -h /tmp']\n    readinessProbe: {{tcpSocket: {{port: 9090}}, periodSeconds: 1}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, labels: {{app: hello}}}}\nspec:\n  containers:\n  - {{name: web, image: {web}, ports: [{{containerPort: 8080}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello}}\nspec:\n  selector: {{app: hello}}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: side}}\nspec:\n  selector: {{app: mixed}}\n  ports: [{{port: 9090, targetPort: 9090}}]\n",
            web = web.display(),
            tools = toolbox.display()
        ),
    );
    for pod in ["pod/mixed", "pod/hello"] {
        b.ok(&["wait", "--for=condition=Ready", pod, "--timeout=120s"]);
    }
    // The pod is reached at its routed address, behind the node's bridge.
    let ip = jsonpath(&b, &["pod", "mixed"], "{.status.podIP}");
    assert!(ip.starts_with("10."), "a routed pod address: {ip}");
    let exec = |container: &str, args: &[&str]| {
        let mut all = vec!["exec", "mixed", "-c", container, "--"];
        all.extend_from_slice(args);
        b.ok(&all)
    };
    // The container calls the component at localhost.
    let got = exec(
        "side",
        &["wget", "-qO-", "http://localhost:8080/from-container"],
    );
    assert!(
        got.contains("hello from http-hello path=/from-container"),
        "{got}"
    );
    // A component calls the container at localhost, on a port nobody declared.
    let got = exec("tools", &["get", "localhost:9090/index.html"]);
    assert_eq!(got, "from-the-container\n");
    // The container sees its address on eth0, and resolves a Service by its short name
    // through the node's DNS responder, and reaches it at its ClusterIP.
    let got = exec("side", &["ip", "-4", "addr", "show", "eth0"]);
    assert!(got.contains(&format!("inet {ip}/")), "{got}");
    let got = exec(
        "side",
        &["wget", "-qO-", "http://hello/through-the-service"],
    );
    assert!(
        got.contains("hello from http-hello path=/through-the-service"),
        "{got}"
    );
    let cluster_ip = jsonpath(&b, &["service", "hello"], "{.spec.clusterIP}");
    let got = exec("side", &["nslookup", "hello.default.svc.cluster.local"]);
    assert!(got.contains(&cluster_ip), "{got}");
    let failed = b.run(
        "kubectl",
        &[
            "exec",
            "mixed",
            "-c",
            "side",
            "--",
            "nslookup",
            "nope.default.svc.cluster.local",
        ],
        None,
    );
    assert!(
        !failed.status.success(),
        "an unknown name is not found: {failed:?}"
    );
    // A component of the pod reaches a Service from inside the namespace too: here the
    // pod's own container, through the node and back.
    let got = wait_for(&b, 30, "the side Service to have its endpoint", || {
        let out = b.run(
            "kubectl",
            &[
                "exec",
                "mixed",
                "-c",
                "tools",
                "--",
                "get",
                "side:9090/index.html",
            ],
            None,
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    });
    assert_eq!(got, "from-the-container\n");

    let uid = jsonpath(&b, &["pod", "mixed"], "{.metadata.uid}");
    b.ok(&["delete", "pod", "mixed", "--wait=true"]);
    wait_for(&b, 30, "the pod's namespace and containers to go", || {
        let gone = !std::path::Path::new("/run/netns")
            .join(format!("baton-{uid}"))
            .exists()
            && runc_containers(&b).is_empty();
        gone.then_some(())
    });
}

#[test]
fn init_containers_ports_and_bad_images_across_both_kinds() {
    let (reg, image) = registry_with_busybox();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A Linux image for another architecture, and one whose layer is not a tar.
    let other = if images::node_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let layers = [(images::busybox_layer(), images::GZIP)];
    rt.block_on(images::push(
        &reg.addr,
        "baton/other-arch:1",
        &layers,
        images::config(other, &layers),
    ));
    let corrupt = [(b"not a gzip stream".to_vec(), images::GZIP)];
    rt.block_on(images::push(
        &reg.addr,
        "baton/corrupt:1",
        &corrupt,
        images::config(images::node_arch(), &corrupt),
    ));
    let b = cluster(&reg);
    let toolbox = guests_dir().join("toolbox.wasm");

    // A Linux init container writes to an emptyDir before the component starts; the
    // component reads it.
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: ordered}}\nspec:\n  initContainers:\n  - {{name: prepare, image: {image}, command: [sh, -c, 'echo written by init > /work/ready'], volumeMounts: [{{name: work, mountPath: /work}}]}}\n  containers:\n  - {{name: app, image: {}, args: [sleep], volumeMounts: [{{name: work, mountPath: /work}}]}}\n  volumes: [{{name: work, emptyDir: {{}}}}]\n",
            toolbox.display()
        ),
    );
    b.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/ordered",
        "--timeout=120s",
    ]);
    let got = b.ok(&["exec", "ordered", "-c", "app", "--", "cat", "/work/ready"]);
    assert_eq!(got, "written by init\n");

    // Two container pods on one node both listen on port 80.
    for name in ["web-a", "web-b"] {
        apply(
            &b,
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'echo {name} > /tmp/index.html; exec httpd -f -p 80 -h /tmp']\n    ports: [{{containerPort: 80}}]\n    readinessProbe: {{httpGet: {{port: 80, path: /index.html}}, periodSeconds: 1}}\n"
            ),
        );
    }
    for name in ["web-a", "web-b"] {
        b.ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=120s",
        ]);
        let got = b.ok(&[
            "exec",
            name,
            "--",
            "wget",
            "-qO-",
            "http://localhost/index.html",
        ]);
        assert_eq!(got, format!("{name}\n"));
    }

    // Bad images: the pod waits with the reason and the registry's or unpacker's words.
    for (pod, img, reason, words) in [
        (
            "arch",
            format!("{}/baton/other-arch:1", reg.addr),
            "ErrImagePull",
            "platform",
        ),
        (
            "corrupt",
            format!("{}/baton/corrupt:1", reg.addr),
            "ErrImagePull",
            "unpacking",
        ),
    ] {
        apply(
            &b,
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}}}\nspec:\n  containers:\n  - {{name: main, image: {img}}}\n"
            ),
        );
        let (got, message) = wait_for(&b, 60, "the bad image's reason", || {
            let r = jsonpath(
                &b,
                &["pod", pod],
                "{.status.containerStatuses[0].state.waiting.reason}",
            );
            let m = jsonpath(
                &b,
                &["pod", pod],
                "{.status.containerStatuses[0].state.waiting.message}",
            );
            (r == reason || r == "ImagePullBackOff").then_some((r, m))
        });
        assert!(got == reason || got == "ImagePullBackOff", "{pod}: {got}");
        assert!(message.contains(words), "{pod}: {message}");
    }
    b.ok(&["delete", "pod", "--all", "--wait=true"]);
    wait_for(&b, 30, "no runc container left", || {
        runc_containers(&b).is_empty().then_some(())
    });
}

#[test]
fn containers_do_not_outlive_the_node() {
    let (reg, image) = registry_with_busybox();
    let f = flags(&reg);
    let args: Vec<&str> = f.iter().map(String::as_str).collect();
    let b = Baton::start_in(tempfile::tempdir().unwrap(), &args);
    apply(
        &b,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: box}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '100000']}}\n"
        ),
    );
    b.ok(&["wait", "--for=condition=Ready", "pod/box", "--timeout=120s"]);
    let uid = jsonpath(&b, &["pod", "box"], "{.metadata.uid}");
    // What names the container's foreground runc (not a passing `runc delete`): a
    // pattern for pgrep.
    let root = format!(
        "{} .* run --keep",
        b.dir.path().join("data/node/runc").display()
    );
    // Killed at once: nothing could remove its container.
    let dir = b.crash();
    let before = pids_naming(&root);
    assert_eq!(before.len(), 1, "the container's runc outlived a crash");
    // The next start removes what the crash left, and the pod runs again, in a new
    // container.
    let b = Baton::start_in(dir, &args);
    wait_for(&b, 60, "the pod to run again in one new container", || {
        let ready = jsonpath(&b, &["pod", "box"], "{.status.containerStatuses[0].ready}");
        let now = pids_naming(&root);
        (ready == "true" && runc_containers(&b).len() == 1 && now.len() == 1 && now != before)
            .then_some(())
    });
    // The pod is on the node's bridge, through a veth of its own.
    let ip: std::net::Ipv4Addr = jsonpath(&b, &["pod", "box"], "{.status.podIP}")
        .parse()
        .unwrap();
    let veth = format!("/sys/class/net/bv{:08x}", u32::from(ip));
    let bridge = std::fs::read_link(format!("{veth}/master")).unwrap_or_else(|e| {
        let links = std::process::Command::new("sh")
            .args(["-c", "ip -br link; ls /run/netns"])
            .output()
            .unwrap();
        panic!(
            "{veth} is on no bridge ({e}); links:\n{}",
            String::from_utf8_lossy(&links.stdout)
        )
    });
    let bridge = std::path::Path::new("/sys/class/net").join(bridge.file_name().unwrap());
    assert!(bridge.exists(), "{}", bridge.display());
    // A node that is stopped (SIGTERM) stops its containers and removes the namespaces,
    // their veths and its bridge.
    let data = b.dir.path().join("data").display().to_string();
    drop(b);
    assert_eq!(processes_naming(&root), 0, "a container outlived its node");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&data)).collect();
    assert!(left.is_empty(), "mounts outlived their node: {left:#?}");
    assert!(!std::path::Path::new("/run/netns")
        .join(format!("baton-{uid}"))
        .exists());
    assert!(
        !std::path::Path::new(&veth).exists(),
        "{veth} outlived its pod"
    );
    assert!(!bridge.exists(), "{} outlived its node", bridge.display());
}
