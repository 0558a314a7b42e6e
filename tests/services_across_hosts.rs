//! Service traffic across real network boundaries: one control-plane host and two node
//! hosts, each a network namespace (`baton_testkit::netns`) running its own `baton`.
//!
//! A pod on the second node serves UDP (the `udp-echo` guest) and TCP (`tcp-echo`)
//! behind one NodePort Service. Then:
//! - a pod on the first node reaches both ports through the Service's name: its node's
//!   proxy carries the traffic through a tunnel to the other node; and through a
//!   headless Service's name, which gives the pod's own address, served by the first
//!   node for the pod on the second;
//! - the test, from outside every node, reaches both through the NodePort of the first
//!   node, which runs no endpoint, and an HTTP pod on the second node through the
//!   first node's Ingress;
//! - one UDP client keeps its endpoint (the reply path) while the Service has two;
//! - the endpoints' node refuses a tunnel to anything but a ready endpoint, and to a
//!   caller that is not a registered node.
//!
//! Needs root (network namespaces).

#[path = "support/hosts.rs"]
mod hosts;

use std::path::Path;
use std::time::Duration;

use baton_testkit::netns::Net;
use hosts::{guests_dir, kubectl, kubectl_apply, spawn_node, spawn_server, Server, API_PORT};

/// The echo pods (UDP and TCP in one pod), pinned to `node`, and their Service.
fn echo(node: &str, replicas: u32) -> String {
    let dist = guests_dir();
    let (udp, tcp) = (dist.join("udp-echo.wasm"), dist.join("tcp-echo.wasm"));
    for g in [&udp, &tcp] {
        assert!(
            g.exists(),
            "{} is missing: run scripts/build-guests.sh",
            g.display()
        );
    }
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: echo}}
  template:
    metadata:
      labels: {{app: echo}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
      - name: udp
        image: {udp}
        env:
        - {{name: PORT, value: "5353"}}
        - {{name: NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        ports:
        - {{containerPort: 5353, protocol: UDP}}
      - name: tcp
        image: {tcp}
        env:
        - {{name: PORT, value: "7000"}}
        ports:
        - {{containerPort: 7000}}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  type: NodePort
  selector: {{app: echo}}
  ports:
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}
  - {{name: tcp, port: 7000, targetPort: 7000, protocol: TCP}}
---
apiVersion: v1
kind: Service
metadata:
  name: echo-pods
spec:
  clusterIP: None
  selector: {{app: echo}}
  ports:
  - {{name: dns, port: 5353, protocol: UDP}}
  - {{name: tcp, port: 7000, protocol: TCP}}
"#,
        udp = udp.display(),
        tcp = tcp.display(),
    )
}

/// An HTTP Deployment pinned to `node`, its Service, and an Ingress for it.
fn web(node: &str) -> String {
    let image = guests_dir().join("http-hello.wasm");
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
      - name: hello
        image: {image}
        ports:
        - {{containerPort: 8080}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 8080}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
spec:
  rules:
  - host: web.example
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
"#,
        image = image.display()
    )
}

/// A pod on `node` that pings the echo Service by name over UDP and TCP, then exits.
fn client(node: &str) -> String {
    let dist = guests_dir();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  restartPolicy: Never
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: udp
    image: {udp}
    env:
    - {{name: MODE, value: ping}}
    - {{name: TARGET, value: echo}}
    - {{name: PORT, value: "53"}}
    - {{name: WAIT_MS, value: "30000"}}
  - name: tcp
    image: {tcp}
    env:
    - {{name: TARGET, value: echo.default.svc.cluster.local}}
    - {{name: PORT, value: "7000"}}
    - {{name: WAIT_MS, value: "30000"}}
  - name: udp-pod
    image: {udp}
    env:
    - {{name: MODE, value: ping}}
    - {{name: TARGET, value: echo-pods}}
    - {{name: PORT, value: "5353"}}
    - {{name: WAIT_MS, value: "30000"}}
  - name: tcp-pod
    image: {tcp}
    env:
    - {{name: TARGET, value: echo-pods}}
    - {{name: PORT, value: "7000"}}
    - {{name: WAIT_MS, value: "30000"}}
"#,
        udp = dist.join("udp-echo.wasm").display(),
        tcp = dist.join("tcp-client.wasm").display(),
    )
}

fn jsonpath(kubeconfig: &Path, api: &str, args: &[&str]) -> Option<String> {
    kubectl(kubeconfig, api, args)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sends `msg` to `to` over UDP from `socket` until a reply comes, for up to `wait`.
async fn udp_ask(
    socket: &tokio::net::UdpSocket,
    to: std::net::SocketAddr,
    msg: &str,
    wait: Duration,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while tokio::time::Instant::now() < deadline {
        socket
            .send_to(msg.as_bytes(), to)
            .await
            .map_err(|e| e.to_string())?;
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
        {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    Err(format!("no reply from {to} within {wait:?}"))
}

/// A certificate from the cluster CA in `pki` for `cn` in `org`, for client auth.
fn client_certificate(pki: &Path, cn: &str, org: &str) -> (String, String) {
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, org);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An HTTPS client that trusts the cluster CA and presents `identity`, if any.
fn https_client(pki: &Path, identity: Option<(String, String)>) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject;
    let ca = std::fs::read(pki.join("ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    // HTTP/1.1: a tunnel asked for by upgrade, as a node without HTTP/2 asks; the
    // nodes' own tunnels above went over HTTP/2.
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The status of a tunnel request for `target` to the kubelet endpoint at `node`.
async fn tunnel_status(
    client: &reqwest::Client,
    node: std::net::SocketAddr,
    protocol: &str,
    target: &str,
) -> Result<u16, String> {
    client
        .get(format!(
            "https://{node}/tunnel?protocol={protocol}&target={target}"
        ))
        .header("connection", "upgrade")
        .header("upgrade", "baton-tunnel")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_pods_on_other_hosts_over_tcp_and_udp() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::new(3).expect("network namespaces (run as root)");
    let dir = |h: usize| tmp.path().join(format!("host-{h}"));
    let mut server = spawn_server(&net, 0, &dir(0), &["--bootstrap"]);
    server.wait_ready();
    let api = format!("https://{}:{API_PORT}", net.host(0).ip);
    let node_token = std::fs::read_to_string(dir(0).join("node-token")).unwrap();
    let nodes: Vec<Server> = (1..3)
        .map(|h| spawn_node(&net, h, &dir(h), &api, node_token.trim()))
        .collect();
    let logs = || {
        nodes
            .iter()
            .map(|n| format!("node-{}:\n{}", n.host, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let kubeconfig = dir(0).join("kubeconfig");
    baton_testkit::wait_until(Duration::from_secs(60), "both nodes Ready", || {
        let ready = r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}"#;
        let out = kubectl(&kubeconfig, &api, &["get", "nodes", "-o", ready]).ok()?;
        (out.split_whitespace().filter(|s| *s == "True").count() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", logs()));

    kubectl_apply(&kubeconfig, &api, "30s", &echo("node-2", 1)).unwrap();
    baton_testkit::wait_until(Duration::from_secs(60), "the echo pod ready", || {
        let ready = r#"jsonpath={.items[*].status.conditions[?(@.type=="Ready")].status}"#;
        let out = jsonpath(
            &kubeconfig,
            &api,
            &["get", "pods", "-l", "app=echo", "-o", ready],
        )?;
        (out == "True").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", logs()));

    // A pod on the other node reaches both ports by the Service's name.
    kubectl_apply(&kubeconfig, &api, "30s", &client("node-1")).unwrap();
    let phase = baton_testkit::wait_until(Duration::from_secs(90), "the client to finish", || {
        let out = jsonpath(
            &kubeconfig,
            &api,
            &["get", "pod", "client", "-o", "jsonpath={.status.phase}"],
        )?;
        matches!(out.as_str(), "Succeeded" | "Failed").then_some(out)
    })
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", logs()));
    let log_of =
        |c: &str| kubectl(&kubeconfig, &api, &["logs", "client", "-c", c]).unwrap_or_default();
    let (udp_log, tcp_log) = (log_of("udp"), log_of("tcp"));
    let (udp_pod_log, tcp_pod_log) = (log_of("udp-pod"), log_of("tcp-pod"));
    assert_eq!(
        phase,
        "Succeeded",
        "udp: {udp_log}\ntcp: {tcp_log}\nudp-pod: {udp_pod_log}\ntcp-pod: {tcp_pod_log}\nthe nodes' logs:\n{}",
        logs()
    );
    // The headless Service's name gives the pod's own address, which node-1 serves for
    // the pod on node-2.
    assert!(
        udp_pod_log.contains("udp echo ok from echo-pods:5353"),
        "{udp_pod_log}"
    );
    assert!(
        tcp_pod_log.contains("echo ok from echo-pods:7000"),
        "{tcp_pod_log}"
    );
    assert!(udp_log.contains("udp echo ok from echo:53"), "{udp_log}");
    assert!(
        tcp_log.contains("echo ok from echo.default.svc.cluster.local:7000"),
        "{tcp_log}"
    );

    // From outside, through the NodePort of the node that runs no endpoint.
    let ports = jsonpath(
        &kubeconfig,
        &api,
        &[
            "get",
            "svc",
            "echo",
            "-o",
            "jsonpath={.spec.ports[*].nodePort}",
        ],
    )
    .unwrap();
    let ports: Vec<u16> = ports
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let (udp_port, tcp_port) = (ports[0], ports[1]);
    let node1 = net.host(1).ip;
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let reply = udp_ask(
        &socket,
        (node1, udp_port).into(),
        "hello",
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", logs()));
    assert!(reply.ends_with(":hello"), "{reply}");
    let first_replica = reply.trim_end_matches(":hello").to_string();
    let mut tcp = tokio::net::TcpStream::connect((node1, tcp_port))
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(b"across\n").await.unwrap();
        let mut got = [0u8; 7];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut got))
            .await
            .expect("an echo within 10 s")
            .unwrap();
        assert_eq!(&got, b"across\n");
    }

    // An Ingress on the node without the backend proxies to it on the other.
    kubectl_apply(&kubeconfig, &api, "30s", &web("node-2")).unwrap();
    let http = reqwest::Client::new();
    let ingress = format!("http://{node1}:80/");
    let answer = baton_testkit::wait_until_async(
        Duration::from_secs(60),
        "the Ingress on node-1 to answer for the pod on node-2",
        || {
            let (http, ingress) = (http.clone(), ingress.clone());
            async move {
                let r = http
                    .get(&ingress)
                    .header("host", "web.example")
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(r.text().await.ok()?)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", logs()));
    assert!(!answer.is_empty());

    // Two endpoints now: a client that keeps talking keeps its endpoint, so its replies
    // come from where it sent; a new client is balanced to the other in turn.
    kubectl_apply(&kubeconfig, &api, "30s", &echo("node-2", 2)).unwrap();
    baton_testkit::wait_until(Duration::from_secs(60), "two ready echo endpoints", || {
        let out = jsonpath(
            &kubeconfig,
            &api,
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=echo",
                "-o",
                "jsonpath={.items[*].endpoints[?(@.conditions.ready==true)].targetRef.name}",
            ],
        )?;
        (out.split_whitespace().count() == 2).then_some(())
    })
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..6 {
        let reply = udp_ask(
            &socket,
            (node1, udp_port).into(),
            &format!("again-{i}"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        seen.insert(reply.split(':').next().unwrap().to_string());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [first_replica],
        "one client's datagrams went to more than one endpoint"
    );
    let mut replicas = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let other = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        let reply = udp_ask(
            &other,
            (node1, udp_port).into(),
            "new",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        replicas.insert(reply.split(':').next().unwrap().to_string());
    }
    assert_eq!(
        replicas.len(),
        2,
        "new clients all went to one endpoint: {replicas:?}"
    );

    // The endpoints' node opens a tunnel for a node, to a ready Service endpoint only.
    let pki = dir(0).join("pki");
    let pod_ip = jsonpath(
        &kubeconfig,
        &api,
        &[
            "get",
            "pods",
            "-l",
            "app=echo",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ],
    )
    .unwrap();
    let kubelet_port = jsonpath(
        &kubeconfig,
        &api,
        &[
            "get",
            "node",
            "node-2",
            "-o",
            "jsonpath={.status.daemonEndpoints.kubeletEndpoint.Port}",
        ],
    )
    .unwrap();
    let node2 = std::net::SocketAddr::new(net.host(2).ip.into(), kubelet_port.parse().unwrap());
    let as_node1 = https_client(
        &pki,
        Some(client_certificate(
            &pki,
            "system:node:node-1",
            "system:nodes",
        )),
    );
    assert_eq!(
        tunnel_status(&as_node1, node2, "TCP", &format!("{pod_ip}:7000")).await,
        Ok(101)
    );
    // A node certificate from the CA for a name that is no registered Node (a node
    // deleted, or a certificate issued outside the node join) opens nothing.
    let intruder = https_client(
        &pki,
        Some(client_certificate(
            &pki,
            "system:node:intruder",
            "system:nodes",
        )),
    );
    assert_eq!(
        tunnel_status(&intruder, node2, "TCP", &format!("{pod_ip}:7000")).await,
        Ok(403)
    );
    for (protocol, target) in [
        // The kubelet endpoint itself, a port the pod does not publish, the node's
        // loopback, and the right port with the wrong protocol.
        ("TCP", node2.to_string()),
        ("TCP", format!("{pod_ip}:7001")),
        ("TCP", format!("127.0.0.1:{}", node2.port())),
        ("TCP", format!("{pod_ip}:5353")),
    ] {
        assert_eq!(
            tunnel_status(&as_node1, node2, protocol, &target).await,
            Ok(403),
            "{protocol} {target}"
        );
    }
    // A client of the API that is not a node, even an administrator, gets no tunnel and
    // none of the kubelet's API either; one without a certificate is not let in.
    let admin = https_client(
        &pki,
        Some(client_certificate(&pki, "alice", "system:masters")),
    );
    assert_eq!(
        tunnel_status(&admin, node2, "TCP", &format!("{pod_ip}:7000")).await,
        Ok(403)
    );
    let logs = admin
        .get(format!("https://{node2}/containerLogs/default/client/udp"))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status().as_u16(), 403);
    let anonymous = https_client(&pki, None);
    assert!(
        tunnel_status(&anonymous, node2, "TCP", &format!("{pod_ip}:7000"))
            .await
            .is_err()
    );
    drop(server);
}
