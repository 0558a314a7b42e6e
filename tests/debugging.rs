//! Debugging Wasm pods with the real kubectl against `baton up`: `kubectl exec` runs a
//! new instance of a container's component as a command (stdout, exit code, stdin; over
//! WebSocket with kubectl 1.33 and over SPDY with the oldest kubectl), is refused clearly
//! for an HTTP-only component and a missing container; a client that goes away leaves
//! nothing running; `kubectl port-forward` carries concurrent requests to a pod and a
//! Service and reports a port nothing listens on; `kubectl debug` adds a toolbox to a pod,
//! to a copy of it (`--copy-to`) and to the node (its root mounted, where the node allows
//! it); `kubectl top` sees a spinning pod's CPU and a memory hog's memory.

#[path = "support/baton.rs"]
mod baton;
#[path = "../oci/tests/support/registry.rs"]
mod registry;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use baton::{guests_dir, http_get, jsonpath, kubectl_dir, wait_for, Baton};
use registry::{Options, Registry};

/// `baton up` with pods on a loopback range of its own: tests run side by side, and two
/// clusters' first pods must not both be `127.128.0.2:8080`.
fn cluster(extra: &[&str]) -> Baton {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cidr = format!("127.{}.0.0/24", 150 + n);
    let mut args = vec!["--pod-cidr", cidr.as_str()];
    args.extend_from_slice(extra);
    Baton::start_with(&args)
}

/// A pod of the toolbox (waiting, as a container to exec into) and an HTTP component.
fn debug_pod(b: &Baton) {
    let toolbox = guests_dir().join("toolbox.wasm");
    let web = guests_dir().join("http-hello.wasm");
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: tb, labels: {{app: tb}}}}\nspec:\n  containers:\n  - {{name: main, image: {}, args: [sleep], env: [{{name: GREETING, value: hello}}], volumeMounts: [{{name: data, mountPath: /data}}]}}\n  - {{name: web, image: {}, ports: [{{containerPort: 8080}}]}}\n  volumes: [{{name: data, emptyDir: {{}}}}]\n",
        toolbox.display(),
        web.display()
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&yaml));
    b.ok(&["wait", "--for=condition=Ready", "pod/tb", "--timeout=120s"]);
}

/// The node's count of a pod's live instances, from its metrics.
fn instances(b: &Baton, pod: &str) -> Option<u64> {
    let text = b.ok(&["get", "--raw", "/api/v1/nodes/local/proxy/metrics"]);
    text.lines()
        .filter(|l| l.starts_with("baton_sandbox_instances{"))
        .find(|l| l.contains(&format!("pod=\"{pod}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn exec_runs_a_command_in_the_pod_and_passes_its_output_input_and_exit_code() {
    let b = cluster(&[]);
    debug_pod(&b);

    // stdout, with the container's environment.
    let out = b.ok(&["exec", "tb", "-c", "main", "--", "echo", "hi", "there"]);
    assert_eq!(out, "hi there\n");
    let env = b.ok(&["exec", "tb", "-c", "main", "--", "env"]);
    assert!(env.contains("GREETING=hello"), "{env}");

    // The exit code comes back as kubectl's own, whatever it is (wasi:cli exit-with-code).
    let failed = b.run(
        "kubectl",
        &["exec", "tb", "-c", "main", "--", "false"],
        None,
    );
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let failed = b.run(
        "kubectl",
        &[
            "exec",
            "tb",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "echo bye; exit 42",
        ],
        None,
    );
    assert_eq!(failed.status.code(), Some(42), "{failed:?}");
    let missing = b.run(
        "kubectl",
        &[
            "exec",
            "tb",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "no-such-command",
        ],
        None,
    );
    assert_eq!(missing.status.code(), Some(127), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("command not found"),
        "{missing:?}"
    );

    // With a terminal (kubectl needs one of its own: `script` gives it a pty), the command
    // sees one, of the size kubectl reports.
    let on_terminal = |kubectl: &str| {
        let tty = Command::new("script")
            .args([
                "-qec",
                &format!("stty cols 132 rows 43; {kubectl} exec -it tb -c main -- tty"),
                "/dev/null",
            ])
            .env("KUBECONFIG", &b.kubeconfig)
            .env("HOME", b.home())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&tty.stdout);
        assert!(shown.contains("terminal 132x43"), "{kubectl}: {tty:?}");
    };
    on_terminal("kubectl");

    // stdin, ended by kubectl's close of the stream.
    let echoed = b.ok_with(
        "kubectl",
        &["exec", "-i", "tb", "-c", "main", "--", "cat"],
        Some("piped through the pod\n"),
    );
    assert_eq!(echoed, "piped through the pod\n");

    // The pod's localhost reaches its sibling.
    let sibling = b.ok(&["exec", "tb", "-c", "main", "--", "get", "localhost:8080/x"]);
    assert!(sibling.contains("hello from http-hello"), "{sibling}");

    // An HTTP-only component cannot run a command: the error says what to do instead.
    let err = b.fails(&["exec", "tb", "-c", "web", "--", "ls"], None);
    assert!(
        err.contains("wasi:http proxy") && err.contains("kubectl debug"),
        "{err}"
    );

    // A container that is not in the pod.
    let err = b.fails(&["exec", "tb", "-c", "nope", "--", "ls"], None);
    assert!(err.contains("container nope is not valid"), "{err}");

    // The oldest kubectl upgrades the connection to SPDY: the same answers.
    if kubectl_dir().join("kubectl.1.27").exists() {
        let out = b.ok_with(
            "kubectl.1.27",
            &["exec", "tb", "-c", "main", "--", "echo", "old", "kubectl"],
            None,
        );
        assert_eq!(out, "old kubectl\n");
        let failed = b.run(
            "kubectl.1.27",
            &["exec", "tb", "-c", "main", "--", "false"],
            None,
        );
        assert_eq!(failed.status.code(), Some(1), "{failed:?}");
        let echoed = b.ok_with(
            "kubectl.1.27",
            &["exec", "-i", "tb", "-c", "main", "--", "cat"],
            Some("through SPDY\n"),
        );
        assert_eq!(echoed, "through SPDY\n");
        on_terminal(&kubectl_dir().join("kubectl.1.27").display().to_string());
        let out = b.run(
            "kubectl.1.27",
            &["exec", "tb", "-c", "web", "--", "ls"],
            None,
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("kubectl debug"));
    }
}

#[test]
fn a_client_that_goes_away_leaves_no_instance_behind() {
    let b = cluster(&[]);
    debug_pod(&b);
    let before = wait_for(&b, 30, "the pod's instances counted", || {
        instances(&b, "tb")
    });
    let mut client = b.spawn(&["exec", "tb", "-c", "main", "--", "sleep"]);
    wait_for(&b, 30, "the exec'd instance running", || {
        (instances(&b, "tb")? == before + 1).then_some(())
    });
    // The API server counts the session as long-running while it lasts.
    wait_for(&b, 30, "the exec counted as long-running", || {
        (b.streams_running("exec") == 1).then_some(())
    });
    // kubectl killed outright: no close frame, just a dropped connection.
    client.kill().unwrap();
    let _ = client.wait();
    wait_for(&b, 30, "the exec'd instance gone", || {
        (instances(&b, "tb")? == before).then_some(())
    });
    wait_for(&b, 30, "the exec no longer counted", || {
        (b.streams_running("exec") == 0).then_some(())
    });
}

#[test]
fn top_shows_a_spinning_pod_busier_and_a_memory_hog_bigger_than_an_idle_pod() {
    let b = cluster(&[]);
    let toolbox = guests_dir().join("toolbox.wasm");
    // Each may hold 128 MiB: the hog needs more than a pod without limits is given.
    let pod = |name: &str, args: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - {{name: main, image: {}, args: {args}, resources: {{limits: {{memory: 128Mi}}}}}}\n---\n",
            toolbox.display()
        )
    };
    let yaml = pod("idle", "[sleep]") + &pod("spinner", "[spin]") + &pod("hog", "[hog, '64']");
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&yaml));
    b.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/idle",
        "pod/spinner",
        "pod/hog",
        "--timeout=120s",
    ]);
    // (cpu in millicores, memory in MiB) per pod, once every pod has figures.
    let figures = |out: &str| -> Option<Vec<(String, u64, u64)>> {
        let rows: Vec<(String, u64, u64)> = out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let cpu = f.get(1)?.strip_suffix('m')?.parse().ok()?;
                let mem = f.get(2)?.strip_suffix("Mi")?.parse().ok()?;
                Some((f[0].to_string(), cpu, mem))
            })
            .collect();
        (rows.len() == 3).then_some(rows)
    };
    let rows = wait_for(&b, 60, "kubectl top to show all three pods", || {
        let out = b.run("kubectl", &["top", "pods"], None);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let rows = figures(&text)?;
        let get = |n: &str| rows.iter().find(|r| r.0 == n).cloned();
        let (idle, spinner, hog) = (get("idle")?, get("spinner")?, get("hog")?);
        // The spinner has a window in which it ran, the hog has taken its memory.
        (spinner.1 > 100 && hog.2 >= 64).then_some((idle, spinner, hog))
    });
    let (idle, spinner, hog) = rows;
    assert!(spinner.1 > idle.1 + 100, "{spinner:?} vs {idle:?}");
    assert!(hog.2 >= idle.2 + 60, "{hog:?} vs {idle:?}");

    // The node's own figures, with percentages of what it can allocate.
    let nodes = b.ok(&["top", "nodes"]);
    assert!(
        nodes
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("local ")),
        "{nodes}"
    );

    // The API answers as metrics-server would: a get of one pod, a 404 for another.
    let one = b.ok(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/hog",
    ]);
    let v: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(v["kind"], "PodMetrics");
    assert_eq!(v["containers"][0]["name"], "main");
    let err = b.fails(
        &[
            "get",
            "--raw",
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/nothing",
        ],
        None,
    );
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    // The node's /metrics carries the same figures under cAdvisor's names.
    let text = b.ok(&["get", "--raw", "/api/v1/nodes/local/proxy/metrics"]);
    let sample = |name: &str, pod: &str| -> f64 {
        let series = format!("{name}{{container=\"main\",namespace=\"default\",pod=\"{pod}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(sample("container_cpu_usage_seconds_total", "spinner") > 0.1);
    assert!(sample("container_memory_working_set_bytes", "hog") >= (64u64 << 20) as f64);
    for line in [
        "kubelet_running_pods 3",
        "kubelet_pod_start_duration_seconds_count 3",
        // One fresh instance per process started.
        "baton_cold_start_duration_seconds_count 3",
        // Three pods of one component started together: it is compiled once.
        r#"baton_component_loads_total{source="compiled"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let info = r#",container="main",kind="cli",exports="#;
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("baton_component_info{") && l.contains(info))
            .count(),
        3,
        "{text}"
    );

    // The API server's /metrics carries the scheduler's and the controllers' too.
    let text = b.ok(&["get", "--raw", "/metrics"]);
    for line in [
        r#"scheduler_schedule_attempts_total{result="scheduled",profile="default-scheduler"} 3"#,
        r#"scheduler_pending_pods{queue="active"} 0"#,
        r#"scheduler_pending_pods{queue="unschedulable"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    for prefix in [
        r#"scheduler_scheduling_attempt_duration_seconds_count{result="scheduled",profile="default-scheduler"} "#,
        r#"workqueue_work_duration_seconds_count{name="serviceaccount"} "#,
        r#"workqueue_queue_duration_seconds_count{name="serviceaccount"} "#,
        r#"workqueue_depth{name="replicaset"} "#,
        r#"controller_runtime_reconcile_total{controller="serviceaccount",result="success"} "#,
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(prefix)),
            "no {prefix:?} in:\n{text}"
        );
    }
    // Every namespace went through the ServiceAccount controller's queue at least once.
    let adds: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"workqueue_adds_total{name="serviceaccount"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no serviceaccount adds in:\n{text}"));
    let namespaces = b.ok(&["get", "namespaces", "-o", "name"]).lines().count();
    assert!(
        adds >= namespaces as f64,
        "{adds} adds for {namespaces} namespaces"
    );
    assert_eq!(text.matches("# EOF").count(), 1, "one end: {text}");
}

/// `kubectl port-forward TARGET :PORT` (a local port of its choosing), and the local
/// address it printed.
fn port_forward(b: &Baton, bin: &str, target: &str, port: &str) -> (Child, SocketAddr) {
    let program = if bin == "kubectl" {
        std::path::PathBuf::from("kubectl")
    } else {
        kubectl_dir().join(bin)
    };
    let mut child = Command::new(program)
        .args(["port-forward", target, &format!(":{port}")])
        .env("KUBECONFIG", &b.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl port-forward");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("Forwarding from 127.0.0.1:")?
                .split(' ')
                .next()?
                .parse::<u16>()
                .ok()
        })
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .expect("kubectl printed the local address");
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// Sends `n` requests at once; returns how many got the component's answer.
fn concurrent_gets(addr: SocketAddr, n: usize) -> usize {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                http_get(addr, &format!("/req-{i}")).is_ok_and(|(code, body)| {
                    code == 200 && body.contains(&format!("path=/req-{i}"))
                })
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap_or(false))
        .filter(|ok| *ok)
        .count()
}

/// Stops kubectl as Ctrl-C does; returns whether it exited cleanly.
fn interrupt(mut child: Child) -> bool {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The node's count of a pod's open sockets.
fn sockets(b: &Baton, pod: &str) -> Option<u64> {
    let text = b.ok(&["get", "--raw", "/api/v1/nodes/local/proxy/metrics"]);
    text.lines()
        .filter(|l| l.starts_with("baton_sandbox_sockets{"))
        .find(|l| l.contains(&format!("pod=\"{pod}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn port_forward_carries_concurrent_requests_to_a_pod_and_a_service_and_stops_cleanly() {
    let b = cluster(&[]);
    debug_pod(&b);
    b.ok_with(
        "kubectl",
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Service\nmetadata: {name: tb}\nspec:\n  selector: {app: tb}\n  ports: [{port: 80, targetPort: 8080}]\n"),
    );
    let baseline = wait_for(&b, 30, "the pod's sockets counted", || sockets(&b, "tb"));

    // kubectl 1.31+ tunnels SPDY through a WebSocket.
    let (pf, addr) = port_forward(&b, "kubectl", "pod/tb", "8080");
    assert_eq!(concurrent_gets(addr, 100), 100, "through pod/tb");
    assert!(interrupt(pf), "port-forward ends cleanly on Ctrl-C");

    // A Service: kubectl picks one of its pods and maps the Service port.
    let (pf, addr) = port_forward(&b, "kubectl", "svc/tb", "80");
    assert_eq!(concurrent_gets(addr, 100), 100, "through svc/tb");
    assert!(interrupt(pf));

    // The oldest kubectl upgrades the connection to SPDY itself.
    if kubectl_dir().join("kubectl.1.27").exists() {
        let (pf, addr) = port_forward(&b, "kubectl.1.27", "pod/tb", "8080");
        assert_eq!(concurrent_gets(addr, 20), 20, "through kubectl 1.27");
        assert!(interrupt(pf));
    }

    // Nothing the sessions opened in the pod is left.
    wait_for(&b, 30, "the forwarded connections closed", || {
        (sockets(&b, "tb")? <= baseline).then_some(())
    });
}

#[test]
fn port_forward_to_a_port_nothing_listens_on_reports_the_error() {
    let b = cluster(&[]);
    debug_pod(&b);
    let (mut pf, addr) = port_forward(&b, "kubectl", "pod/tb", "9999");
    let _ = http_get(addr, "/");
    // As with a kubelet, the error stream carries the reason, and kubectl gives up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = pf.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "kubectl still up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut pf.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("error forwarding port 9999 to pod tb") && err.contains("refused"),
        "{err}"
    );
}

#[test]
fn cp_round_trips_a_file_through_a_pods_volume() {
    let b = cluster(&[]);
    debug_pod(&b);
    // 10 MiB that no compression or truncation would keep intact by chance.
    let mut data = vec![0u8; 10 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let local = b.dir.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    let local = local.display().to_string();
    b.ok(&["cp", &local, "tb:/data/big.bin", "-c", "main"]);
    let listed = b.ok(&["exec", "tb", "-c", "main", "--", "ls", "-l", "/data"]);
    assert!(
        listed.contains(&format!("{} big.bin", 10 << 20)),
        "{listed}"
    );
    let back = b.dir.path().join("back.bin");
    b.ok(&[
        "cp",
        "tb:/data/big.bin",
        &back.display().to_string(),
        "-c",
        "main",
    ]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the copy came back different");
}

/// Pushes a file to the registry with `baton push`.
fn push(reg: &Registry, file: &std::path::Path, image: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("push")
        .arg(file)
        .args([image, "--insecure-registry", &reg.addr])
        .env("RUST_LOG", "warn")
        .output()
        .expect("baton push");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn debug_adds_a_toolbox_that_reaches_the_sibling_and_sees_the_volume() {
    let reg = Registry::start(Options::default());
    let toolbox = format!("{}/baton/toolbox:1", reg.addr);
    push(&reg, &guests_dir().join("toolbox.wasm"), &toolbox);
    // A Wasm module that is not a component.
    let core = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(core.path(), b"\0asm\x01\0\0\0").unwrap();
    let not_component = format!("{}/baton/core:1", reg.addr);
    push(&reg, core.path(), &not_component);

    let b = cluster(&["--insecure-registry", &reg.addr]);
    debug_pod(&b);
    let note = b.dir.path().join("note.txt");
    std::fs::write(&note, "left in the volume\n").unwrap();
    b.ok(&[
        "cp",
        &note.display().to_string(),
        "tb:/data/note.txt",
        "-c",
        "main",
    ]);

    // An ephemeral toolbox next to `main`: the pod's localhost, the target's volume.
    let out = b.ok_with(
        "kubectl",
        &[
            "debug",
            "-i",
            "tb",
            &format!("--image={toolbox}"),
            "--target=main",
        ],
        Some("get localhost:8080/from-debug\ncat /data/note.txt\nps\nexit\n"),
    );
    // ps lists the pod's tasks: the target's process and the sibling's server among them.
    let row = |command: &str| -> Vec<String> {
        let line = out.lines().find(|l| l.ends_with(command));
        let line = line.unwrap_or_else(|| panic!("no {command:?} in ps:\n{out}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    assert_eq!(row("main sleep")[1..3], ["main", "process"], "{out}");
    assert_eq!(row("listen :8080")[1..3], ["web", "server"], "{out}");
    assert!(
        out.contains("hello from http-hello path=/from-debug"),
        "{out}"
    );
    assert!(out.contains("left in the volume"), "{out}");
    let state = jsonpath(
        &b,
        &["pod", "tb"],
        &format!(
            "{{.status.ephemeralContainerStatuses[?(@.image==\"{toolbox}\")].state.terminated.reason}}"
        ),
    );
    assert_eq!(state, "Completed");
    // Only the subresource changes them: an update of the whole pod that drops them is
    // refused.
    let refused = b.run(
        "kubectl",
        &[
            "patch",
            "pod",
            "tb",
            "--type=json",
            "-p",
            r#"[{"op": "remove", "path": "/spec/ephemeralContainers"}]"#,
        ],
        None,
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("ephemeral"),
        "{refused:?}"
    );

    // An image that is not a component waits with the reason, as kubectl shows it.
    b.ok(&["debug", "tb", &format!("--image={not_component}")]);
    wait_for(
        &b,
        60,
        "the bad debug container to wait with a reason",
        || {
            // Statuses are sorted by name, as the kubelet writes them: found by image.
            let of_bad = format!(
                "{{.status.ephemeralContainerStatuses[?(@.image==\"{not_component}\")].state.waiting"
            );
            let reason = jsonpath(&b, &["pod", "tb"], &format!("{of_bad}.reason}}"));
            let message = jsonpath(&b, &["pod", "tb"], &format!("{of_bad}.message}}"));
            (reason == "CreateContainerError" && message.contains("not a runnable Wasm component"))
                .then_some(())
        },
    );
    // The pod itself is untouched.
    let out = b.ok(&["exec", "tb", "-c", "main", "--", "echo", "still", "here"]);
    assert_eq!(out, "still here\n");
    let restarts = jsonpath(
        &b,
        &["pod", "tb"],
        "{.status.containerStatuses[*].restartCount}",
    );
    if restarts != "0 0" {
        let status = b.ok(&[
            "get",
            "pod",
            "tb",
            "-o",
            "jsonpath={.status.containerStatuses}",
        ]);
        let events = b.ok(&["get", "events"]);
        panic!("the app containers restarted: {status}\n{events}");
    }

    // Ephemeral containers are only added: a changed one is refused.
    let err = b.fails(
        &[
            "patch",
            "pod",
            "tb",
            "--subresource=ephemeralcontainers",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/ephemeralContainers/0/image","value":"x/y:2"}]"#,
        ],
        None,
    );
    assert!(err.contains("may not be changed"), "{err}");

    // Debugging the node mounts its root; a node that allows no host paths refuses it,
    // saying why.
    let out = b.ok(&[
        "debug",
        "node/local",
        &format!("--image={toolbox}"),
        "--profile=general",
    ]);
    let pod = out
        .split_whitespace()
        .find(|w| w.starts_with("node-debugger-local-"))
        .unwrap_or_else(|| panic!("no debugging pod named in {out:?}"))
        .to_string();
    wait_for(&b, 60, "the node debugger to wait with a reason", || {
        let waiting = "{.status.containerStatuses[0].state.waiting";
        let reason = jsonpath(&b, &["pod", &pod], &format!("{waiting}.reason}}"));
        let message = jsonpath(&b, &["pod", &pod], &format!("{waiting}.message}}"));
        (reason == "CreateContainerConfigError"
            && message.contains("hostPath \"/\" refused")
            && message.contains("--allow-host-path"))
        .then_some(())
    });
}

#[test]
fn debug_copies_a_pod_with_a_toolbox_and_debugs_a_node_that_allows_it() {
    let reg = Registry::start(Options::default());
    let toolbox = format!("{}/baton/toolbox:1", reg.addr);
    push(&reg, &guests_dir().join("toolbox.wasm"), &toolbox);
    // The node's operator lets pods mount the node's root, as node debugging does.
    let b = cluster(&["--insecure-registry", &reg.addr, "--allow-host-path", "/"]);
    debug_pod(&b);

    // A copy of the pod with the toolbox beside its containers; the pod stays as it was.
    let out = b.ok_with(
        "kubectl",
        &[
            "debug",
            "tb",
            "-i",
            "--copy-to=tb-copy",
            &format!("--image={toolbox}"),
            "--share-processes",
            "--profile=general",
            "--container=toolbox",
            "--",
            "sh",
        ],
        Some("get localhost:8080/in-the-copy\nps\nexit\n"),
    );
    assert!(
        out.contains("hello from http-hello path=/in-the-copy"),
        "{out}"
    );
    for row in ["main sleep", "listen :8080", "toolbox sh"] {
        assert!(
            out.lines().any(|l| l.ends_with(row)),
            "no {row:?} in:\n{out}"
        );
    }
    let containers = jsonpath(&b, &["pod", "tb-copy"], "{.spec.containers[*].name}");
    assert_eq!(containers, "main web toolbox");
    let containers = jsonpath(&b, &["pod", "tb"], "{.spec.containers[*].name}");
    assert_eq!(containers, "main web");

    // The node: its root is at /host in a pod bound to it.
    let marker = b.dir.path().join("node-file.txt");
    std::fs::write(&marker, "on the node itself\n").unwrap();
    let out = b.ok_with(
        "kubectl",
        &[
            "debug",
            "node/local",
            "-i",
            &format!("--image={toolbox}"),
            "--profile=general",
            "--",
            "sh",
        ],
        Some(&format!("cat /host{}\nexit\n", marker.display())),
    );
    assert!(out.contains("on the node itself"), "{out}");
}

#[test]
fn attach_connects_to_a_running_process_with_stdin() {
    let b = cluster(&[]);
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: shell}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {}, args: [sh], stdin: true}}\n",
        guests_dir().join("toolbox.wasm").display()
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&yaml));
    b.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/shell",
        "--timeout=120s",
    ]);
    let out = b.ok_with(
        "kubectl",
        &["attach", "shell", "-c", "main", "-i"],
        Some("echo attached and typed\nexit\n"),
    );
    assert!(out.contains("attached and typed"), "{out}");
    wait_for(&b, 30, "the shell to end", || {
        (jsonpath(&b, &["pod", "shell"], "{.status.phase}") == "Succeeded").then_some(())
    });
}
