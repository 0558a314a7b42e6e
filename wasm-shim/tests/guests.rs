//! The guests of examples-wasm/ run through the sandbox, with real behaviour asserted.
//! Build them first with `scripts/build-guests.sh` (the CI script does).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_wasm_shim::{
    CliSpec, ComponentKind, ContainerSpec, ExecIo, ExecSpec, HttpSpec, Mount, NameResolver,
    NetLimits, PodSpec, Runtime, RuntimeConfig, ShimError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every guest in examples-wasm, and the test that uses it: a guest no test uses is an error.
const GUESTS: &[(&str, &str)] = &[
    ("hello", "cli_args_env_and_exit"),
    ("job", "job_writes_its_volume_and_exits_with_its_code"),
    (
        "hostile",
        "hostile_guests_are_contained_with_the_right_reason",
    ),
    (
        "http-hello",
        "http_component_serves_an_instance_per_request",
    ),
    (
        "toolbox",
        "exec_runs_a_command_in_a_running_pod_with_its_stdio",
    ),
    (
        "http-frontend",
        "pod_siblings_share_localhost_and_pods_share_a_port",
    ),
    ("http-hostile", "a_bad_http_request_fails_alone"),
    ("p3-hello", "wasi_03_components_run_beside_0_2_ones"),
    ("p3-http-hello", "wasi_03_components_run_beside_0_2_ones"),
    (
        "p3-tcp",
        "wasi_03_sockets_share_the_pods_localhost_with_0_2_siblings",
    ),
    (
        "config-watch",
        "wasi_config_follows_its_values_and_logging_reaches_the_log",
    ),
    (
        "kv-counter",
        "a_keyvalue_bucket_counts_and_refuses_past_its_cap",
    ),
    ("kv-cas", "spins_keyvalue_draft_swaps_batches_and_pages"),
    (
        "spin-probe",
        "components_built_with_spins_sdks_run_unchanged",
    ),
    (
        "spin2-probe",
        "components_built_with_spins_sdks_run_unchanged",
    ),
    (
        "otel-probe",
        "wasi_otel_spans_reach_the_sink_and_logs_the_container_log",
    ),
    (
        "tcp-echo",
        "tcp_echo_across_components_and_two_pods_on_one_port",
    ),
    (
        "tcp-client",
        "tcp_echo_across_components_and_two_pods_on_one_port",
    ),
    (
        "udp-echo",
        "udp_echo_on_the_pods_localhost_and_two_pods_on_one_port",
    ),
    // An in-cluster API client: it needs an API server, so the root crate tests it.
    (
        "kube-lister",
        "tests/access.rs a_wasm_guest_lists_pods_through_the_kubernetes_service_with_its_projected_token",
    ),
    // A mutating admission webhook: the API server calls it, so the root crate tests it.
    (
        "admission-labeller",
        "tests/access.rs a_mutating_webhook_served_by_a_wasm_component_labels_what_is_created",
    ),
];

fn guest(name: &str) -> PathBuf {
    let p = baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .join("../examples-wasm/dist")
        .join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-guests.sh",
        p.display()
    );
    p
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        max_instances: 64,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

#[test]
fn every_guest_is_listed() {
    let dist = baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("../examples-wasm/dist");
    for entry in
        std::fs::read_dir(&dist).expect("examples-wasm/dist exists: run scripts/build-guests.sh")
    {
        let name = entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".wasm")
            .to_string();
        assert!(
            GUESTS.iter().any(|(g, _)| *g == name),
            "guest {name} is not used by any test"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_args_env_and_exit() {
    let rt = runtime();
    let c = rt.load_file(&guest("hello")).unwrap();
    assert_eq!(rt.kind(&c).unwrap(), ComponentKind::Cli);
    let spec = CliSpec {
        args: vec!["one".into(), "two".into()],
        env: vec![("GREETING".into(), "hi".into())],
        ..Default::default()
    };
    let out = rt.run_cli(&c, "hello", &spec).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        (out.exit.code, out.exit.reason),
        (0, "Completed"),
        "{:?}",
        out.exit
    );
    assert!(stdout.contains("args=[\"one\", \"two\"]"), "{stdout}");
    assert!(stdout.contains("env GREETING=hi"), "{stdout}");
    // Only what the pod was given: no host environment leaks in.
    assert!(!stdout.contains("env PATH="), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_writes_its_volume_and_exits_with_its_code() {
    let rt = runtime();
    let c = rt.load_file(&guest("job")).unwrap();
    let vol = tempfile::tempdir().unwrap();
    let mounts = vec![Mount {
        host_path: vol.path().to_path_buf(),
        guest_path: "/data".into(),
        read_only: false,
    }];
    let spec = CliSpec {
        env: vec![("N".into(), "1000".into())],
        mounts: mounts.clone(),
        ..Default::default()
    };
    let out = rt.run_cli(&c, "job", &spec).await.unwrap();
    assert_eq!(out.exit.reason, "Completed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("primes below 1000: 168"));
    assert_eq!(
        std::fs::read_to_string(vol.path().join("result.txt")).unwrap(),
        "primes below 1000: 168\n"
    );
    let spec = CliSpec {
        env: vec![("N".into(), "10".into()), ("EXIT_CODE".into(), "3".into())],
        mounts,
        ..Default::default()
    };
    let out = rt.run_cli(&c, "job", &spec).await.unwrap();
    // wasi:cli 0.2's `exit` carries success or failure; Rust's std maps any non-zero
    // code to failure, which arrives as 1.
    assert_eq!((out.exit.code, out.exit.reason), (1, "Error"));
    // A read-only mount refuses the write; the job reports it and still exits.
    let ro = vec![Mount {
        host_path: vol.path().to_path_buf(),
        guest_path: "/data".into(),
        read_only: true,
    }];
    std::fs::remove_file(vol.path().join("result.txt")).unwrap();
    let out = rt
        .run_cli(
            &c,
            "job",
            &CliSpec {
                mounts: ro,
                env: vec![("N".into(), "10".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!vol.path().join("result.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_are_contained_with_the_right_reason() {
    let rt = runtime();
    let c = rt.load_file(&guest("hostile")).unwrap();
    let run = |mode: &str, spec: CliSpec| {
        let rt = rt.clone();
        let c = c.clone();
        let mode = mode.to_string();
        async move {
            rt.run_cli(
                &c,
                "hostile",
                &CliSpec {
                    args: vec![mode],
                    ..spec
                },
            )
            .await
            .unwrap()
        }
    };
    let out = run("trap", CliSpec::default()).await;
    assert_eq!(out.exit.reason, "Error");
    assert!(
        out.exit.message.contains("unreachable") || out.exit.message.contains("trap"),
        "{:?}",
        out.exit
    );
    let out = run(
        "loop",
        CliSpec {
            timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(out.exit.reason, "DeadlineExceeded", "{:?}", out.exit);
    let out = run(
        "memory",
        CliSpec {
            memory_bytes: 32 << 20,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(out.exit.reason, "OOMKilled", "{:?}", out.exit);
    let vol = tempfile::tempdir().unwrap();
    let mounts = vec![Mount {
        host_path: vol.path().to_path_buf(),
        guest_path: "/data".into(),
        read_only: false,
    }];
    let out = run(
        "read-host",
        CliSpec {
            mounts,
            ..Default::default()
        },
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.exit.code, 0,
        "the guest read host files it was not given:\n{stdout}"
    );
    assert!(!stdout.contains("LEAK"), "{stdout}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_component_serves_an_instance_per_request() {
    let rt = runtime();
    let c = rt.load_file(&guest("http-hello")).unwrap();
    assert_eq!(rt.kind(&c).unwrap(), ComponentKind::Http);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spec = HttpSpec {
        env: vec![
            ("GREETING".into(), "hi".into()),
            ("POD_NAME".into(), "web-0".into()),
        ],
        ..Default::default()
    };
    let server = rt.serve_http(&c, spec, listener).unwrap();
    let (code, body) = http_get(server.local_addr(), "/abc?x=1").await;
    assert_eq!(code, 200);
    assert!(body.contains("hi from web-0 path=/abc?x=1"), "{body}");
    // A neighbour that spins does not stop the service.
    let hostile = rt.load_file(&guest("hostile")).unwrap();
    let rt2 = rt.clone();
    let spinner = tokio::spawn(async move {
        let spec = CliSpec {
            args: vec!["loop".into()],
            timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        rt2.run_cli(&hostile, "hostile", &spec).await.unwrap()
    });
    for i in 0..20 {
        let (code, body) = http_get(server.local_addr(), &format!("/n{i}")).await;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(spinner.await.unwrap().exit.reason, "DeadlineExceeded");
    // The wrong kind is refused with a reason.
    let err = rt
        .run_cli(&c, "http-hello", &CliSpec::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ShimError::WrongKind { .. }), "{err}");
}

/// A `traceparent` on a request to a component rides on the component's own outgoing
/// requests, so that a trace continues through a component that knows nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_context_reaches_the_components_outgoing_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The backend: records each request's head and answers "ok".
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = backend.accept().await.unwrap();
            let tx = heads_tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&got).to_lowercase());
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let rt = runtime();
    let c = rt.load_file(&guest("http-frontend")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spec = HttpSpec {
        env: vec![("BACKEND_URL".into(), format!("http://{backend_addr}"))],
        ..Default::default()
    };
    let server = rt.serve_http(&c, spec, listener).unwrap();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for traced in [true, false] {
        let mut s = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        let extra = if traced {
            format!("traceparent: {parent}\r\ntracestate: vendor=x\r\n")
        } else {
            String::new()
        };
        s.write_all(
            format!("GET /t HTTP/1.1\r\nhost: x\r\n{extra}connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.contains("frontend got 200 OK from backend: ok"),
            "{answer}"
        );
        let head = heads.recv().await.unwrap();
        assert_eq!(
            head.contains(&format!("traceparent: {parent}")),
            traced,
            "{head}"
        );
        assert_eq!(head.contains("tracestate: vendor=x"), traced, "{head}");
    }
}

#[test]
fn broken_wasm_is_refused_and_the_cache_survives_a_restart() {
    let rt = runtime();
    let err = rt
        .load_bytes(
            b"\0asm\x01\0\0\0garbage",
            std::path::Path::new("broken.wasm"),
        )
        .unwrap_err();
    assert!(matches!(err, ShimError::InvalidComponent { .. }), "{err}");
    let cache = tempfile::tempdir().unwrap();
    let cfg = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        max_instances: 8,
        ..RuntimeConfig::default()
    };
    let first = Runtime::new(cfg.clone()).unwrap();
    first.load_file(&guest("hello")).unwrap();
    let entries = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(entries, 1, "one compiled entry");
    assert_eq!((first.stats().compiled, first.stats().cache_hits), (1, 0));
    drop(first);
    let second = Runtime::new(cfg).unwrap();
    let started = std::time::Instant::now();
    let c = second.load_file(&guest("hello")).unwrap();
    assert_eq!(second.kind(&c).unwrap(), ComponentKind::Cli);
    assert_eq!((second.stats().compiled, second.stats().cache_hits), (0, 1));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "loaded from the cache, not recompiled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_goes_to_the_container_log() {
    use baton_wasm_shim::logs::{read_logs, ContainerLog, LogConfig, LogQuery};
    let rt = runtime();
    let c = rt.load_file(&guest("hello")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        path: dir.path().join("hello.log"),
        max_bytes: 1 << 20,
        max_files: 2,
    };
    let log = ContainerLog::open(cfg.clone()).unwrap();
    let spec = CliSpec {
        args: vec!["x".into()],
        log: Some(log),
        ..Default::default()
    };
    let out = rt.run_cli(&c, "hello", &spec).await.unwrap();
    assert_eq!(out.exit.reason, "Completed");
    let lines = read_logs(
        &cfg,
        &LogQuery {
            timestamps: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        lines[0].contains("Z hello from a baton pod: args=[\"x\"]"),
        "{lines:?}"
    );
}

/// A client that sends the head first and the body after (as every wasi:http client
/// does) may get the answer before it has sent the body's end. The server reads the rest
/// of the body instead of closing: the client keeps its connection and can send the
/// body's end and a second request on it. (Closed at once, the client saw a reset where
/// a guest's `localhost` call raced its backend.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_ends_keeps_the_connection() {
    use http_body_util::{BodyExt, Channel, Empty};
    let rt = runtime();
    let c = rt.load_file(&guest("http-hello")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = rt.serve_http(&c, HttpSpec::default(), listener).unwrap();
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, BoxBody>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    type BoxBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
    let (mut body_tx, body) = Channel::<bytes::Bytes>::new(1);
    let req = |path: &str, body: BoxBody| {
        hyper::Request::post(path)
            .header("host", "test")
            .body(body)
            .unwrap()
    };
    let resp = send
        .send_request(req("/first", body.boxed()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("path=/first"),
        "{text:?}"
    );
    // The guest has answered; the request body is still open. Now it ends.
    let step = Duration::from_secs(10);
    tokio::time::timeout(step, body_tx.send_data(bytes::Bytes::from_static(b"late")))
        .await
        .expect("body sent in time")
        .unwrap();
    drop(body_tx);
    tokio::time::timeout(step, send.ready())
        .await
        .expect("ready in time")
        .expect("the connection was kept");
    let resp = tokio::time::timeout(
        step,
        send.send_request(req("/second", Empty::new().boxed())),
    )
    .await
    .expect("second answer in time")
    .expect("a second request on the same connection");
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("path=/second"),
        "{text:?}"
    );
    drop(send);
    tokio::time::timeout(step, conn)
        .await
        .expect("closed in time")
        .unwrap()
        .unwrap();
}

/// A client that asked to be told before it sends its body (`Expect: 100-continue`) and
/// got its answer without it is not told to send it after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_to_send_its_body_is_not_invited_after_the_answer() {
    let rt = runtime();
    let c = rt.load_file(&guest("http-hello")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = rt.serve_http(&c, HttpSpec::default(), listener).unwrap();
    let mut s = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: test\r\nexpect: 100-continue\r\ncontent-length: 100000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_siblings_share_localhost_and_pods_share_a_port() {
    let rt = runtime();
    let front = rt.load_file(&guest("http-frontend")).unwrap();
    let back = rt.load_file(&guest("http-hello")).unwrap();
    let pod = |n: u8, greeting: &str| PodSpec {
        name: format!("p{n}"),
        ip: std::net::IpAddr::from([127, 1, 0, n]),
        containers: vec![
            ContainerSpec {
                name: "frontend".into(),
                component: front.clone(),
                port: Some(8080),
                cli: CliSpec::default(),
                http: HttpSpec::default(),
            },
            ContainerSpec {
                name: "backend".into(),
                component: back.clone(),
                port: Some(8081),
                cli: CliSpec::default(),
                http: HttpSpec {
                    env: vec![
                        ("GREETING".into(), greeting.into()),
                        ("POD_NAME".into(), format!("p{n}")),
                    ],
                    ..Default::default()
                },
            },
        ],
        names: None,
    };
    // Both pods serve ports 8080 and 8081, each on its own address.
    let a = rt.start_pod(pod(1, "hello-a")).await.unwrap();
    let b = rt.start_pod(pod(2, "hello-b")).await.unwrap();
    let (code, body) = http_get(a.http_addr("frontend").unwrap(), "/x").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("frontend got 200 OK from backend: hello-a from p1 path=/x"),
        "{body}"
    );
    let (code, body) = http_get(b.http_addr("frontend").unwrap(), "/y").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("hello-b from p2 path=/y"),
        "localhost in pod b is pod b: {body}"
    );
    // Each container's requests were counted where it runs, with what it is.
    let usage = rt.usage();
    let p2 = usage.iter().find(|u| u.pod == "p2").expect("p2's usage");
    for c in &p2.containers {
        let info = c.component.as_ref().expect("described at start");
        assert_eq!(info.kind, ComponentKind::Http, "{}", c.name);
        assert!(info
            .exports
            .iter()
            .any(|e| e.starts_with("wasi:http/incoming-handler@0.2")));
        assert_eq!(c.http.by_class, [0, 1, 0, 0, 0], "{}", c.name);
        assert_eq!(c.http.latency.count(), 1, "{}", c.name);
    }
    // Four requests in all, each in an instance started for it.
    assert_eq!(rt.stats().cold_starts.count(), 4);
    // With its backend gone, a frontend does not reach the other pod's.
    drop(a);
    let c = rt
        .start_pod(PodSpec {
            containers: vec![pod(3, "x").containers.remove(0)],
            ..pod(3, "x")
        })
        .await
        .unwrap();
    let (code, body) = http_get(c.http_addr("frontend").unwrap(), "/z").await;
    assert_eq!(code, 502, "{body}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_http_request_fails_alone() {
    let rt = runtime();
    let c = rt.load_file(&guest("http-hostile")).unwrap();
    // The endless loop meets a short deadline; the others a long one, since on a busy
    // machine filling 32 MiB could take longer than a deadline short enough for the test
    // (and a regression there then fails the test instead of hanging it).
    let serve = |request_timeout| {
        let (rt, c) = (rt.clone(), c.clone());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let spec = HttpSpec {
                memory_bytes: 32 << 20,
                request_timeout,
                ..Default::default()
            };
            rt.serve_http(&c, spec, listener).unwrap()
        }
    };
    let timed = serve(Some(Duration::from_millis(500))).await;
    let lenient = serve(Some(Duration::from_secs(60))).await;
    for (server, path, want_code, want_reason) in [
        (&timed, "/loop", 504, "DeadlineExceeded"),
        (&lenient, "/memory", 500, "OOMKilled"),
        (&lenient, "/trap", 500, "Error"),
    ] {
        let addr = server.local_addr();
        let (code, body) = http_get(addr, path).await;
        assert_eq!(code, want_code, "{path}: {body}");
        assert!(body.starts_with(want_reason), "{path}: {body}");
        // The next request gets a fresh instance and is served.
        let (code, body) = http_get(addr, "/").await;
        // (The body may arrive chunked: "3\r\nok\n\r\n0\r\n\r\n".)
        assert!(
            code == 200 && body.contains("ok\n"),
            "after {path}: {code} {body}"
        );
    }
}

/// Instance slots are reused, their dirty pages copied back from the image rather than
/// dropped: a request still sees the component's memory as it was built, never what the
/// last request on that slot left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_instance_slot_holds_nothing_of_the_last_request() {
    let rt = runtime();
    let c = rt.load_file(&guest("http-hostile")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = rt.serve_http(&c, HttpSpec::default(), listener).unwrap();
    for i in 0..40 {
        let (code, body) = http_get(server.local_addr(), "/count").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("seen 1 262144\n"), "request {i}: {body}");
    }
}

/// WASI 0.3 components (native async: `wasi:cli/run@0.3.0`, `wasi:http/handler@0.3.0`)
/// are told apart by their exports and run beside 0.2 ones, on one runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_03_components_run_beside_0_2_ones() {
    let rt = runtime();
    let cli = rt.load_file(&guest("p3-hello")).unwrap();
    let web = rt.load_file(&guest("p3-http-hello")).unwrap();
    let old = rt.load_file(&guest("http-hello")).unwrap();
    assert!(rt.is_wasi_03(&cli) && rt.is_wasi_03(&web) && !rt.is_wasi_03(&old));
    assert_eq!(rt.kind(&cli).unwrap(), ComponentKind::Cli);
    assert_eq!(rt.kind(&web).unwrap(), ComponentKind::Http);
    // A command: its output through 0.3's stdout stream, its status as the exit code.
    let spec = CliSpec {
        args: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let out = rt.run_cli(&cli, "p3-hello", &spec).await.unwrap();
    assert_eq!(out.exit.code, 0, "{:?}", out.exit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(r#"hello from wasi 0.3, args=["a", "b"]"#),
        "{stdout}"
    );
    let spec = CliSpec {
        args: vec!["fail".into()],
        ..Default::default()
    };
    let out = rt.run_cli(&cli, "p3-hello", &spec).await.unwrap();
    assert_eq!(out.exit.code, 1, "{:?}", out.exit);
    // A handler, an instance per request, its body written after the head; beside a 0.2
    // server on the same runtime.
    let serve = |c: &wasmtime::component::Component| {
        let (rt, c) = (rt.clone(), c.clone());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let spec = HttpSpec {
                env: vec![("GREETING".into(), "hi".into())],
                ..Default::default()
            };
            rt.serve_http(&c, spec, listener).unwrap()
        }
    };
    let (new, old) = (serve(&web).await, serve(&old).await);
    for i in 0..5 {
        let (code, body) = http_get(new.local_addr(), &format!("/n{i}?x=1")).await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains(&format!("hi from p3-http-hello path=/n{i}?x=1 wasi=0.3")),
            "{body}"
        );
        let (code, body) = http_get(old.local_addr(), "/").await;
        assert_eq!(code, 200, "{body}");
    }
    // The wrong kind is refused, whatever the version.
    let err = rt
        .run_cli(&web, "web", &CliSpec::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ShimError::WrongKind { .. }), "{err}");
}

fn cli_container(
    name: &str,
    component: &wasmtime::component::Component,
    env: &[(&str, &str)],
    args: &[&str],
) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        component: component.clone(),
        port: None,
        cli: CliSpec {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            network: true,
            ..Default::default()
        },
        http: HttpSpec::default(),
    }
}

/// Connects to `addr` until it answers, for at most 10 s.
async fn connect_when_up(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let start = std::time::Instant::now();
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("{addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_across_components_and_two_pods_on_one_port() {
    let rt = runtime();
    let echo = rt.load_file(&guest("tcp-echo")).unwrap();
    let client = rt.load_file(&guest("tcp-client")).unwrap();
    let pod = |n: u8, with_echo: bool, wait_ms: &str| PodSpec {
        name: format!("tcp{n}"),
        ip: std::net::IpAddr::from([127, 1, 1, n]),
        containers: [
            with_echo.then(|| cli_container("echo", &echo, &[("PORT", "7000")], &[])),
            Some(cli_container(
                "client",
                &client,
                &[("PORT", "7000"), ("WAIT_MS", wait_ms)],
                &[],
            )),
        ]
        .into_iter()
        .flatten()
        .collect(),
        names: None,
    };
    // Two pods, each with an echo server on port 7000 and a client of localhost:7000.
    let mut a = rt.start_pod(pod(1, true, "10000")).await.unwrap();
    let mut b = rt.start_pod(pod(2, true, "10000")).await.unwrap();
    for p in [&mut a, &mut b] {
        let out = p.wait("client").await.unwrap().unwrap();
        assert_eq!(out.exit.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("echo ok from localhost:7000"));
    }
    // The node reaches each pod's port at the pod's address.
    for ip in [[127, 1, 1, 1], [127, 1, 1, 2]] {
        let mut s = connect_when_up((ip, 7000).into()).await;
        s.write_all(b"from the node\n").await.unwrap();
        let mut got = [0u8; 14];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"from the node\n");
    }
    // A pod without its own server does not reach another pod's localhost.
    let mut c = rt.start_pod(pod(3, false, "300")).await.unwrap();
    let out = c.wait("client").await.unwrap().unwrap();
    assert_eq!(out.exit.code, 1, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// UDP over wasi:sockets gets the pod's virtual localhost as TCP does: a server bound to
/// the wildcard is the pod's alone, a client reaches its sibling at `localhost`, and the
/// node reaches each pod at its address, with the reply coming back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_on_the_pods_localhost_and_two_pods_on_one_port() {
    let rt = runtime();
    let echo = rt.load_file(&guest("udp-echo")).unwrap();
    let pod = |n: u8, with_server: bool, wait_ms: &str| {
        let host = format!("udp{n}");
        let server = [("PORT", "7100"), ("NAME", host.as_str())];
        let client = [
            ("MODE", "ping"),
            ("PORT", "7100"),
            ("TARGET", "localhost"),
            ("WAIT_MS", wait_ms),
        ];
        PodSpec {
            name: host.clone(),
            ip: std::net::IpAddr::from([127, 1, 3, n]),
            containers: [
                with_server.then(|| cli_container("server", &echo, &server, &[])),
                Some(cli_container("client", &echo, &client, &[])),
            ]
            .into_iter()
            .flatten()
            .collect(),
            names: None,
        }
    };
    let mut a = rt.start_pod(pod(1, true, "10000")).await.unwrap();
    let mut b = rt.start_pod(pod(2, true, "10000")).await.unwrap();
    for (p, name) in [(&mut a, "udp1"), (&mut b, "udp2")] {
        let (code, out) = cli_stdout(p, "client").await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("reply {name}:ping-2")), "{out}");
    }
    // The node, from an address of its own, reaches each pod's server.
    let node = tokio::net::UdpSocket::bind("127.1.3.200:0").await.unwrap();
    for (n, name) in [(1u8, "udp1"), (2, "udp2")] {
        let pod: std::net::SocketAddr = ([127, 1, 3, n], 7100).into();
        node.send_to(b"hi", pod).await.unwrap();
        let mut buf = [0u8; 64];
        let (len, from) = tokio::time::timeout(Duration::from_secs(10), node.recv_from(&mut buf))
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(&buf[..len], format!("{name}:hi").as_bytes());
        assert_eq!(from, pod);
    }
    // A pod without its own server gets no reply from another pod's localhost.
    let mut c = rt.start_pod(pod(3, false, "500")).await.unwrap();
    let (code, out) = cli_stdout(&mut c, "client").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no reply"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_hog_is_capped_and_its_neighbour_keeps_serving() {
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 64,
        net_limits: NetLimits {
            max_sockets: 50,
            ..NetLimits::default()
        },
        ..RuntimeConfig::default()
    })
    .unwrap();
    let hostile = rt.load_file(&guest("hostile")).unwrap();
    let hello = rt.load_file(&guest("http-hello")).unwrap();
    let mut pod = rt
        .start_pod(PodSpec {
            name: "hog".into(),
            ip: std::net::IpAddr::from([127, 1, 2, 1]),
            containers: vec![
                cli_container("hog", &hostile, &[], &["sockets"]),
                ContainerSpec {
                    name: "web".into(),
                    component: hello,
                    port: Some(8080),
                    cli: CliSpec::default(),
                    http: HttpSpec::default(),
                },
            ],
            names: None,
        })
        .await
        .unwrap();
    let out = pod.wait("hog").await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("opened 50 sockets"), "{stdout}");
    assert!(stdout.contains("socket 50 refused"), "{stdout}");
    // The hog's sockets went back with its instance, and the web container still serves.
    assert_eq!(pod.open_sockets(), 0);
    let (code, body) = http_get(pod.http_addr("web").unwrap(), "/").await;
    assert_eq!(code, 200, "{body}");
}

/// A node listener on 127.0.0.1 that counts who reached it: a socket that escaped the
/// pod's virtual localhost would land here.
async fn canary() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.write_all(b"node\n").await;
        }
    });
    (port, hits)
}

async fn cli_stdout(pod: &mut baton_wasm_shim::Pod, name: &str) -> (i32, String) {
    let out = pod.wait(name).await.unwrap().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.exit.code, text)
}

/// 0.3 sockets get the same virtual localhost, names and caps as 0.2's, and a 0.3 and a
/// 0.2 component in one pod reach each other over it, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_03_sockets_share_the_pods_localhost_with_0_2_siblings() {
    let rt = runtime();
    let (echo2, client2) = (
        rt.load_file(&guest("tcp-echo")).unwrap(),
        rt.load_file(&guest("tcp-client")).unwrap(),
    );
    let p3 = rt.load_file(&guest("p3-tcp")).unwrap();
    let (port, hits) = canary().await;
    let p = port.to_string();
    let pod = |n: u8, containers: Vec<ContainerSpec>, names: Option<NameResolver>| PodSpec {
        name: format!("p3tcp{n}"),
        ip: std::net::IpAddr::from([127, 1, 4, n]),
        containers,
        names,
    };
    // 0.3 client of a 0.2 server, then 0.2 client of a 0.3 server, both pods on one port.
    let mut a = rt
        .start_pod(pod(
            1,
            vec![
                cli_container("echo", &echo2, &[("PORT", &p)], &[]),
                cli_container("client", &p3, &[], &["client", "localhost", &p, "10000"]),
            ],
            None,
        ))
        .await
        .unwrap();
    let mut b = rt
        .start_pod(pod(
            2,
            vec![
                cli_container("echo", &p3, &[], &["echo", &p]),
                cli_container(
                    "client",
                    &client2,
                    &[("PORT", &p), ("WAIT_MS", "10000")],
                    &[],
                ),
            ],
            None,
        ))
        .await
        .unwrap();
    let (code, out) = cli_stdout(&mut a, "client").await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("echo ok from localhost:{p}")),
        "{out}"
    );
    let (code, out) = cli_stdout(&mut b, "client").await;
    assert_eq!(code, 0, "{out}");
    // The node reaches the 0.3 server at its pod's address. (Under a loaded test run a
    // first connection was once closed unanswered, not reproduced since: it is tried
    // again, for at most 10 s, and the test still fails if none is echoed.)
    let start = std::time::Instant::now();
    loop {
        let mut s = connect_when_up(([127, 1, 4, 2], port).into()).await;
        s.write_all(b"from the node\n").await.unwrap();
        let mut got = [0u8; 14];
        match s.read_exact(&mut got).await {
            Ok(_) => {
                assert_eq!(&got, b"from the node\n");
                break;
            }
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("the node's connection was not echoed ({e}); again");
            }
            Err(e) => panic!("the node's connection was never echoed: {e}"),
        }
    }
    // Alone in its pod, a 0.3 client reaches nothing at localhost: not a neighbour, not
    // the node.
    let mut c = rt
        .start_pod(pod(
            3,
            vec![cli_container(
                "client",
                &p3,
                &[],
                &["client", "localhost", &p, "300"],
            )],
            None,
        ))
        .await
        .unwrap();
    let (code, out) = cli_stdout(&mut c, "client").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot connect"), "{out}");
    // A listen on a socket never bound gets the pod's address, not the node's wildcard.
    let mut d = rt
        .start_pod(pod(
            4,
            vec![cli_container("any", &p3, &[], &["listen-any"])],
            None,
        ))
        .await
        .unwrap();
    let (code, out) = cli_stdout(&mut d, "any").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("listening on 127.1.4.4:"), "{out}");
    // A Service's name and its ClusterIP lead where the resolver says.
    let names: NameResolver = Arc::new(|n: &str| {
        (n == "echo.default.svc.cluster.local" || n == "10.96.0.9")
            .then(|| std::net::IpAddr::from([127, 1, 4, 1]))
    });
    let mut e = rt
        .start_pod(pod(
            5,
            vec![
                cli_container(
                    "by-name",
                    &p3,
                    &[],
                    &["client", "echo.default.svc.cluster.local", &p, "10000"],
                ),
                cli_container("by-ip", &p3, &[], &["client", "10.96.0.9", &p, "10000"]),
            ],
            Some(names),
        ))
        .await
        .unwrap();
    for name in ["by-name", "by-ip"] {
        let (code, out) = cli_stdout(&mut e, name).await;
        assert_eq!(code, 0, "{name}: {out}");
        assert!(out.contains("echo ok from"), "{out}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// The pod's socket cap holds for 0.3: sockets it creates, and connections it accepts,
/// which 0.3 hands out through a stream rather than a call per accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_03_socket_hog_is_capped() {
    let limited = |max_sockets| {
        Runtime::new(RuntimeConfig {
            max_instances: 16,
            net_limits: NetLimits {
                max_sockets,
                ..NetLimits::default()
            },
            ..RuntimeConfig::default()
        })
        .unwrap()
    };
    let rt = limited(50);
    let p3 = rt.load_file(&guest("p3-tcp")).unwrap();
    let mut pod = rt
        .start_pod(PodSpec {
            name: "p3hog".into(),
            ip: std::net::IpAddr::from([127, 1, 4, 10]),
            containers: vec![cli_container("hog", &p3, &[], &["hog"])],
            names: None,
        })
        .await
        .unwrap();
    let (code, out) = cli_stdout(&mut pod, "hog").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("opened 50 sockets"), "{out}");
    assert!(out.contains("socket 50 refused"), "{out}");
    assert_eq!(pod.open_sockets(), 0);

    // Three sockets: the listener and two connections.
    let rt = limited(3);
    let p3 = rt.load_file(&guest("p3-tcp")).unwrap();
    let pod = rt
        .start_pod(PodSpec {
            name: "p3accept".into(),
            ip: std::net::IpAddr::from([127, 1, 4, 11]),
            containers: vec![cli_container("echo", &p3, &[], &["echo", "7301"])],
            names: None,
        })
        .await
        .unwrap();
    let addr: std::net::SocketAddr = ([127, 1, 4, 11], 7301).into();
    let echoes = |mut s: tokio::net::TcpStream| async move {
        if s.write_all(b"hi\n").await.is_err() {
            return None;
        }
        let mut got = [0u8; 3];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await;
        matches!(read, Ok(Ok(_))).then_some(s)
    };
    let first = echoes(connect_when_up(addr).await)
        .await
        .expect("first echoes");
    let second = echoes(connect_when_up(addr).await)
        .await
        .expect("second echoes");
    assert!(pod.open_sockets() <= 3);
    assert!(
        echoes(connect_when_up(addr).await).await.is_none(),
        "a connection past the cap is closed"
    );
    assert!(pod.open_sockets() <= 3, "{}", pod.open_sockets());
    // Closing one frees its place, once the guest has seen it close.
    drop(first);
    let start = std::time::Instant::now();
    loop {
        if echoes(connect_when_up(addr).await).await.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no room after a close"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
}

/// Waits until the log's subscribers have seen a line containing `needle`.
async fn log_shows(
    rx: &mut tokio::sync::broadcast::Receiver<(u8, bytes::Bytes)>,
    seen: &mut String,
    needle: &str,
) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            match rx.recv().await {
                Ok((_, b)) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(e) => panic!("log closed: {e}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {needle:?} in the log: {seen}");
}

/// A component reads its wasi:config values as the node has them now: a new value is
/// read without a restart. Its wasi:logging records are lines of its container log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_config_follows_its_values_and_logging_reaches_the_log() {
    use baton_wasm_shim::logs::{ContainerLog, LogConfig};
    use baton_wasm_shim::{Capabilities, ConfigVars, Platform};
    let rt = runtime();
    let watch = rt.load_file(&guest("config-watch")).unwrap();
    // Not granted: refused before it starts, naming the interface.
    let refused = rt
        .run_cli(&watch, "config-watch", &CliSpec::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ShimError::NotGranted { interface, capability: "config" }
            if interface == "wasi:config/store@0.2.0-draft-2024-09-27"),
        "{refused}"
    );
    let dir = tempfile::tempdir().unwrap();
    let log = ContainerLog::open(LogConfig {
        path: dir.path().join("log"),
        max_bytes: 1 << 20,
        max_files: 1,
    })
    .unwrap();
    let mut rx = log.subscribe();
    let vars = ConfigVars::new([("greeting".to_string(), "hello".to_string())].into());
    let spec = CliSpec {
        args: vec!["greeting".into(), "20".into()],
        log: Some(log),
        platform: Platform::new(Capabilities::parse("config,logging").unwrap())
            .with_config(vars.clone()),
        ..Default::default()
    };
    let rt2 = rt.clone();
    let running = tokio::spawn(async move { rt2.run_cli(&watch, "config-watch", &spec).await });
    let mut seen = String::new();
    log_shows(&mut rx, &mut seen, "greeting=hello\n").await;
    log_shows(&mut rx, &mut seen, "INFO config-watch: greeting changed\n").await;
    vars.set([("greeting".to_string(), "bye".to_string())].into());
    log_shows(&mut rx, &mut seen, "greeting=bye\n").await;
    vars.set(Default::default());
    log_shows(&mut rx, &mut seen, "greeting is not set\n").await;
    running.abort();
}

/// A keyvalue bucket counts across runs, and a bucket at its cap refuses a write with a
/// clear error that the guest can handle, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyvalue_bucket_counts_and_refuses_past_its_cap() {
    use baton_wasm_shim::{Bucket, Capabilities, MemoryBucket, Platform};
    let rt = runtime();
    let counter = rt.load_file(&guest("kv-counter")).unwrap();
    let bucket: Arc<dyn Bucket> = Arc::new(MemoryBucket::new("counters", 4096));
    let platform = Platform::new(Capabilities::parse("keyvalue").unwrap())
        .with_bucket("counters", bucket.clone());
    let run = |args: &[&str]| {
        let spec = CliSpec {
            args: args.iter().map(|a| a.to_string()).collect(),
            platform: platform.clone(),
            ..Default::default()
        };
        let (rt, counter) = (rt.clone(), counter.clone());
        async move {
            let out = rt.run_cli(&counter, "kv-counter", &spec).await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            (out.exit.code, text)
        }
    };
    assert_eq!(run(&["counters"]).await, (0, "hits=1\n".into()));
    assert_eq!(run(&["counters"]).await, (0, "hits=2\n".into()));
    let (code, out) = run(&["counters", "fill"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("refused after 3 values"), "{out}");
    assert!(out.contains("is full"), "{out}");
    assert!(out.ends_with("hits=3\n"), "{out}");
    assert_eq!(
        bucket.get("hits").await.unwrap().as_deref(),
        Some(&b"3"[..])
    );
    // A bucket the pod did not declare is not there.
    let (code, out) = run(&["elsewhere"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NoSuchStore"), "{out}");
}

/// Spin's wasi:keyvalue (0.2.0-draft2): signed counters, batches, text cursors, and a
/// compare-and-swap that loses a race and wins its retry, on the same buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spins_keyvalue_draft_swaps_batches_and_pages() {
    use baton_wasm_shim::{Capabilities, MemoryBucket, Platform};
    let rt = runtime();
    let cas = rt.load_file(&guest("kv-cas")).unwrap();
    let spec = CliSpec {
        args: vec!["cas".into()],
        platform: Platform::new(Capabilities::parse("keyvalue").unwrap())
            .with_bucket("cas", Arc::new(MemoryBucket::new("cas", 1 << 20))),
        ..Default::default()
    };
    let out = rt.run_cli(&cas, "kv-cas", &spec).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.exit.code,
        0,
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "counter=-5\nbatch=a:1,zz:-\nkeys=a,b,n more=false\nlost to theirs\na=ours\n"
    );
}

/// A component's wasi:otel span reaches the runtime's span sink as it sent it; its log
/// record is a line of its output; its metrics are dropped and counted. Without a sink,
/// the span is dropped and counted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_otel_spans_reach_the_sink_and_logs_the_container_log() {
    use baton_wasm_shim::platform::otel::{GuestSpan, SpanSink};
    use baton_wasm_shim::{Capabilities, Platform};
    let got: Arc<std::sync::Mutex<Vec<GuestSpan>>> = Arc::default();
    let sink = got.clone();
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 16,
        guest_spans: Some(SpanSink(Arc::new(move |s| sink.lock().unwrap().push(s)))),
        ..RuntimeConfig::default()
    })
    .unwrap();
    let probe = rt.load_file(&guest("otel-probe")).unwrap();
    let spec = CliSpec {
        args: vec!["checkout".into()],
        platform: Platform::new(Capabilities::parse("otel").unwrap()),
        ..Default::default()
    };
    let out = rt.run_cli(&probe, "otel-probe", &spec).await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.exit.code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("metrics=Ok(())"), "{stdout}");
    assert_eq!(stderr, "WARN otel: span checkout ended\n");
    let spans = got.lock().unwrap().clone();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span.name, "checkout");
    assert_eq!(span.parent_span_id, None, "no outer context: a root span");
    assert_eq!(span.attributes, [("probe.answer".into(), "42".into())]);
    assert_eq!(span.status, Some(Some("on purpose".into())));
    assert_eq!(span.scope, "otel-probe");
    assert!(span.end >= span.start && span.sampled);
    let otel = rt.stats().otel;
    assert_eq!(
        (
            otel.forwarded_spans,
            otel.dropped_spans,
            otel.dropped_metrics,
            otel.log_records
        ),
        (1, 0, 1, 1)
    );

    let rt = runtime();
    let probe = rt.load_file(&guest("otel-probe")).unwrap();
    assert_eq!(
        rt.run_cli(&probe, "otel-probe", &spec)
            .await
            .unwrap()
            .exit
            .code,
        0
    );
    assert_eq!(rt.stats().otel.dropped_spans, 1);
}

/// One request with a method and a body, over a fresh connection.
async fn http_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            // 1.0, so that the answer comes whole rather than chunked.
            "{method} {path} HTTP/1.0\r\nhost: test\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

/// Components built with Spin's SDKs, 7 (WASI 0.3, spin:key-value@3.0.0 and
/// spin:variables@3.0.0) and 5 (WASI 0.2, fermyon:spin/*@2.0.0), read their variables from
/// the container's config values and keep their data in the pod's buckets, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_built_with_spins_sdks_run_unchanged() {
    use baton_wasm_shim::{Capabilities, ConfigVars, MemoryBucket, Platform};
    let rt = runtime();
    for name in ["spin-probe", "spin2-probe"] {
        let component = rt.load_file(&guest(name)).unwrap();
        let platform = Platform::new(Capabilities::parse("config,keyvalue").unwrap())
            .with_config(ConfigVars::new(
                [("message".to_string(), format!("hello from {name}"))].into(),
            ))
            .with_bucket("default", Arc::new(MemoryBucket::new("default", 64)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spec = HttpSpec {
            platform,
            ..Default::default()
        };
        let server = rt.serve_http(&component, spec, listener).unwrap();
        let addr = server.local_addr();
        let (code, body) = http_call(addr, "GET", "/var/message", "").await;
        assert_eq!(
            (code, body.as_str()),
            (200, format!("hello from {name}").as_str())
        );
        let (code, body) = http_call(addr, "GET", "/var/absent", "").await;
        assert_eq!(code, 404, "{name}: {body}");
        assert!(body.contains("Undefined"), "{name}: {body}");
        assert_eq!(http_call(addr, "PUT", "/kv/a", "one").await.0, 201);
        assert_eq!(http_call(addr, "PUT", "/kv/b", "two").await.0, 201);
        assert_eq!(
            http_call(addr, "GET", "/kv/a", "").await,
            (200, "one".into())
        );
        assert_eq!(http_call(addr, "GET", "/kv/zz", "").await.0, 404);
        assert_eq!(
            http_call(addr, "GET", "/keys", "").await,
            (200, "a\nb".into())
        );
        // Past the bucket's 64 bytes: the SDK's error, and the request still answers.
        let (code, body) = http_call(addr, "PUT", "/kv/big", &"x".repeat(100)).await;
        assert_eq!(code, 507, "{name}: {body}");
        assert!(body.contains("is full"), "{name}: {body}");
        // Not granted key-value: refused before it serves, naming the interface.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spec = HttpSpec {
            platform: Platform::new(Capabilities::parse("config").unwrap()),
            ..Default::default()
        };
        let refused = rt.serve_http(&component, spec, listener).unwrap_err();
        assert!(
            matches!(
                &refused,
                ShimError::NotGranted {
                    capability: "keyvalue",
                    ..
                }
            ),
            "{name}: {refused}"
        );
    }
}

/// A WASI 0.3 handler whose workload opts in serves several requests per instance, and
/// several at once; by default each request has an instance of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_03_handler_reuses_instances_only_when_asked() {
    use baton_wasm_shim::InstanceReuse;
    let rt = runtime();
    let web = rt.load_file(&guest("p3-http-hello")).unwrap();
    let serve = |reuse| {
        let (rt, web) = (rt.clone(), web.clone());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let spec = HttpSpec {
                env: vec![("GREETING".into(), "hi".into())],
                reuse,
                ..Default::default()
            };
            rt.serve_http(&web, spec, listener).unwrap()
        }
    };
    let starts = || rt.stats().cold_starts.count();
    // Reused: nine requests one after the other take two instances of at most eight.
    let reused = serve(Some(InstanceReuse {
        requests: 8,
        concurrent: 4,
    }))
    .await;
    let before = starts();
    for i in 0..9 {
        let (code, body) = http_get(reused.local_addr(), &format!("/s{i}")).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("path=/s{i} wasi=0.3")), "{body}");
    }
    assert_eq!(starts() - before, 2);
    // Many at once: every one answered, by few instances.
    let before = starts();
    let gets: Vec<_> = (0..32)
        .map(|i| {
            let addr = reused.local_addr();
            tokio::spawn(async move { http_get(addr, &format!("/c{i}")).await })
        })
        .collect();
    for (i, g) in gets.into_iter().enumerate() {
        let (code, body) = g.await.unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("path=/c{i} wasi=0.3")), "{body}");
    }
    // At least 32 / 8; at most the eight that hold four each at once, plus one started
    // beside the running ones per guest thread (one per CPU here).
    let used = starts() - before;
    let most = 9 + std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        (4..=most).contains(&used),
        "{used} instances for 32 requests"
    );
    // Not asked: an instance per request.
    let fresh = serve(None).await;
    let before = starts();
    for _ in 0..3 {
        assert_eq!(http_get(fresh.local_addr(), "/").await.0, 200);
    }
    assert_eq!(starts() - before, 3);
}

/// A stopped container's ports are free when the stop returns, and a stopped pod's
/// address is free when its shutdown returns: a restart binds the same port at once, and
/// another pod given the same address binds its ports (a listener that outlived its stop
/// failed them with "address in use", into CrashLoopBackOff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_containers_ports_are_free_when_the_stop_returns() {
    let rt = runtime();
    let hello = rt.load_file(&guest("http-hello")).unwrap();
    let echo = rt.load_file(&guest("tcp-echo")).unwrap();
    let ip = std::net::IpAddr::from([127, 1, 3, 1]);
    let web = ContainerSpec {
        name: "web".into(),
        component: hello.clone(),
        port: Some(8080),
        cli: CliSpec::default(),
        http: HttpSpec::default(),
    };
    let mut pod = rt.new_pod("restarts", ip, None);
    for _ in 0..50 {
        pod.start_container(&rt, web.clone())
            .await
            .expect("the restarted container binds its port");
    }
    pod.start_container(&rt, cli_container("echo", &echo, &[("PORT", "7000")], &[]))
        .await
        .unwrap();
    drop(connect_when_up((ip, 7000).into()).await);
    pod.shutdown(Duration::ZERO).await;
    // The address goes to another pod, which binds the same ports.
    for port in [8080, 7000] {
        std::net::TcpListener::bind((ip, port)).expect("the port is free after shutdown");
    }
}

/// What an exec'd command printed and how it ended, given its stdin.
async fn exec(
    pod: &baton_wasm_shim::PodHandle,
    component: &baton_wasm_shim::Component,
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> (String, i32) {
    exec_on(pod, component, argv, stdin, None).await
}

/// [`exec`], with or without a terminal.
async fn exec_on(
    pod: &baton_wasm_shim::PodHandle,
    component: &baton_wasm_shim::Component,
    argv: &[&str],
    stdin: Option<&[u8]>,
    terminal: Option<baton_wasm_shim::Terminal>,
) -> (String, i32) {
    let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
    // Kept open: a guest whose stderr is gone fails to print its error, and panics.
    let (_err_r, err_w) = tokio::io::duplex(1 << 16);
    let stdin = stdin.map(|b| {
        let (r, mut w) = tokio::io::duplex(1 << 16);
        let b = b.to_vec();
        tokio::spawn(async move {
            w.write_all(&b).await.unwrap();
        });
        Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>
    });
    let mut run = pod
        .exec(
            component,
            ExecSpec {
                container: "main".into(),
                argv: argv.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
            ExecIo {
                stdin,
                stdout: Box::new(out_w),
                stderr: Box::new(err_w),
                terminal,
            },
        )
        .unwrap();
    let exit = run.wait().await;
    let mut out = String::new();
    out_r.read_to_string(&mut out).await.unwrap();
    (out, exit.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_command_in_a_running_pod_with_its_stdio() {
    let rt = runtime();
    let toolbox = rt.load_file(&guest("toolbox")).unwrap();
    let web = rt.load_file(&guest("http-hello")).unwrap();
    let pod = rt
        .start_pod(PodSpec {
            name: "debugged".into(),
            ip: std::net::IpAddr::from([127, 1, 4, 1]),
            containers: vec![ContainerSpec {
                name: "web".into(),
                component: web.clone(),
                port: Some(8080),
                cli: CliSpec::default(),
                http: HttpSpec::default(),
            }],
            names: None,
        })
        .await
        .unwrap();
    let handle = pod.handle();
    // The command shares the pod's localhost: it reaches the sibling.
    let (out, code) = exec(
        &handle,
        &toolbox,
        &["get", "localhost:8080/from-exec"],
        None,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("path=/from-exec"), "{out}");
    // stdin in, stdout out, and a failing command's code.
    let (out, code) = exec(&handle, &toolbox, &["cat"], Some(b"through stdin")).await;
    assert_eq!((out.as_str(), code), ("through stdin", 0));
    let (_, code) = exec(&handle, &toolbox, &["false"], None).await;
    assert_eq!(code, 1);
    // A WASI 0.3 command runs the same way.
    let p3 = rt.load_file(&guest("p3-hello")).unwrap();
    let (out, code) = exec(&handle, &p3, &["p3-hello", "from-exec"], None).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(r#"hello from wasi 0.3, args=["from-exec"]"#),
        "{out}"
    );
    let (_, code) = exec(&handle, &p3, &["p3-hello", "fail"], None).await;
    assert_eq!(code, 1);
    // An HTTP component runs no command.
    let (_, w) = tokio::io::duplex(16);
    let (_, e) = tokio::io::duplex(16);
    let refused = handle.exec(
        &web,
        ExecSpec {
            argv: vec!["ls".into()],
            ..Default::default()
        },
        ExecIo {
            stdin: None,
            stdout: Box::new(w),
            stderr: Box::new(e),
            terminal: None,
        },
    );
    assert!(matches!(refused, Err(ShimError::NotACommand)));
    // A command still running when the pod stops is stopped with it.
    let (_, w) = tokio::io::duplex(16);
    let (_, e) = tokio::io::duplex(16);
    let mut sleeper = handle
        .exec(
            &toolbox,
            ExecSpec {
                argv: vec!["sleep".into()],
                ..Default::default()
            },
            ExecIo {
                stdin: None,
                stdout: Box::new(w),
                stderr: Box::new(e),
                terminal: None,
            },
        )
        .unwrap();
    assert_eq!(handle.executions(), 1);
    pod.shutdown(Duration::ZERO).await;
    assert_eq!(sleeper.wait().await.code, 143);
    assert_eq!(handle.executions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_lists_the_pods_tasks_and_exit_codes_and_terminals_pass_through() {
    let rt = runtime();
    let toolbox = rt.load_file(&guest("toolbox")).unwrap();
    let web = rt.load_file(&guest("http-hello")).unwrap();
    let pod = rt
        .start_pod(PodSpec {
            name: "listed".into(),
            ip: std::net::IpAddr::from([127, 1, 4, 2]),
            containers: vec![
                ContainerSpec {
                    name: "web".into(),
                    component: web,
                    port: Some(8080),
                    cli: CliSpec::default(),
                    http: HttpSpec::default(),
                },
                ContainerSpec {
                    name: "hogger".into(),
                    component: toolbox.clone(),
                    port: None,
                    cli: CliSpec {
                        args: vec!["hog".into(), "8".into()],
                        ..Default::default()
                    },
                    http: HttpSpec::default(),
                },
            ],
            names: None,
        })
        .await
        .unwrap();
    let handle = pod.handle();
    // The hog's row shows the memory it holds once it has taken it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let table = loop {
        let (out, code) = exec(&handle, &toolbox, &["ps"], None).await;
        assert_eq!(code, 0, "{out}");
        let hog = out.lines().find(|l| l.contains("hogger hog 8")).map(|l| {
            let mib = l.split_whitespace().nth(5).unwrap();
            mib.trim_end_matches("MiB").parse::<f64>().unwrap()
        });
        if hog.is_some_and(|m| m >= 8.0) {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no hog at 8 MiB in:\n{out}"
        );
        tokio::task::yield_now().await;
    };
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let kinds: Vec<(&str, &str)> = rows.iter().map(|r| (r[1], r[2])).collect();
    assert!(kinds.contains(&("web", "server")), "{table}");
    assert!(kinds.contains(&("hogger", "process")), "{table}");
    assert!(
        kinds.contains(&("main", "exec")),
        "ps sees itself:\n{table}"
    );
    let pids: Vec<u32> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(pids.windows(2).all(|w| w[0] < w[1]), "{table}");
    // An exec'd command that ended is gone from the next listing.
    let (out, _) = exec(&handle, &toolbox, &["ps"], None).await;
    assert_eq!(
        out.lines().filter(|l| l.contains(" exec ")).count(),
        1,
        "only the running ps:\n{out}"
    );
    // Any exit code reaches the caller, from a command and from the shell.
    let (_, code) = exec(&handle, &toolbox, &["exit", "3"], None).await;
    assert_eq!(code, 3);
    let (_, code) = exec(&handle, &toolbox, &["sh", "-c", "echo hi; exit 42"], None).await;
    assert_eq!(code, 42);
    let (_, code) = exec(&handle, &toolbox, &["sh", "-c", "no-such-command"], None).await;
    assert_eq!(code, 127);
    // A terminal is seen as one, with its size.
    let size = baton_wasm_shim::Terminal {
        columns: 100,
        rows: 30,
    };
    let (out, code) = exec_on(&handle, &toolbox, &["tty"], None, Some(size)).await;
    assert_eq!((out.as_str(), code), ("terminal 100x30\n", 0));
    let (out, code) = exec(&handle, &toolbox, &["tty"], None).await;
    assert_eq!((out.as_str(), code), ("not a tty\n", 1));
    pod.shutdown(Duration::ZERO).await;
}

/// A served component can be called in process, as a node's Ingress does: the same
/// answer as over its socket; nothing is found at other addresses, or once it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_component_answers_in_process_until_it_stops() {
    use http_body_util::{BodyExt, Empty};
    let rt = runtime();
    let c = rt.load_file(&guest("http-hello")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = rt.serve_http(&c, HttpSpec::default(), listener).unwrap();
    let addr = server.local_addr();
    assert!(rt.local_http(([127, 0, 0, 1], 1).into()).is_none());
    // A front server handing each request to the component in process.
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let rt2 = rt.clone();
    tokio::spawn(async move {
        let (tcp, _) = front.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |req| {
            let local = rt2.local_http(addr).expect("served in process");
            async move { Ok::<_, std::convert::Infallible>(local.call(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
            .await;
    });
    let tcp = tokio::net::TcpStream::connect(front_addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            hyper::Request::get("/inside?x=1")
                .header("host", "test")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("path=/inside?x=1"),
        "{text:?}"
    );
    server.shutdown(Duration::from_secs(1)).await;
    assert!(rt.local_http(addr).is_none(), "gone with its server");
}

/// A graceful stop lets the calls made in process finish, as it lets its connections
/// finish, and takes no new call meanwhile: a component retired while the Ingress has a
/// request in it still answers that request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_finishes_the_calls_made_in_process() {
    use http_body_util::{BodyExt, Empty};
    let rt = runtime();
    let c = rt.load_file(&guest("http-hostile")).unwrap();
    // `/work` keeps its instance busy for 20 ms of CPU: long enough to be caught in
    // flight most times; a call that ends first is simply tried again.
    for attempt in 0..50 {
        let key = format!("ns/retired/{attempt}");
        let mut pod = rt.new_pod(&key, "127.78.0.1".parse().unwrap(), None);
        pod.start_container(
            &rt,
            ContainerSpec {
                name: "f".into(),
                component: c.clone(),
                port: Some(0),
                cli: CliSpec::default(),
                http: HttpSpec::default(),
            },
        )
        .await
        .unwrap();
        let addr = pod.http_addr("f").unwrap();
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let rt2 = rt.clone();
        tokio::spawn(async move {
            let (tcp, _) = front.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req| {
                let local = rt2.local_http(addr);
                async move {
                    Ok::<_, std::convert::Infallible>(match local {
                        Some(l) => l.call(req).await.map(BodyExt::boxed_unsync),
                        None => hyper::Response::builder()
                            .status(503)
                            .body(
                                http_body_util::Full::new(bytes::Bytes::new())
                                    .map_err(|e| match e {})
                                    .boxed_unsync(),
                            )
                            .unwrap(),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
        let tcp = tokio::net::TcpStream::connect(front_addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let call = tokio::spawn(async move {
            let resp = send
                .send_request(
                    hyper::Request::get("/work")
                        .header("host", "test")
                        .body(Empty::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        });
        // Wait, on the pod's own count, until the request is in its instance.
        let in_flight = || rt.usage().iter().any(|u| u.pod == key && u.instances > 0);
        while !in_flight() && !call.is_finished() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        if call.is_finished() {
            pod.shutdown(Duration::ZERO).await;
            continue;
        }
        let stop = tokio::spawn(pod.shutdown(Duration::from_secs(10)));
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("worked"), "{body}");
        stop.await.unwrap();
        assert!(rt.local_http(addr).is_none(), "gone with its pod");
        return;
    }
    panic!("no call was ever caught in flight");
}
