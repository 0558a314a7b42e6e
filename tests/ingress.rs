//! Ingress, end to end: `baton up` serving an Ingress of the default class `baton` on
//! its HTTP and HTTPS ports, checked with curl and kubectl.

#[path = "support/baton.rs"]
mod baton;

use std::process::Command;

use baton::{jsonpath, wait_for, Baton};

/// A Deployment of `http-hello` greeting with `greeting`, and its Service.
fn app(name: &str, greeting: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: hello
        image: {image}
        ports: [{{containerPort: 8080}}]
        env: [{{name: GREETING, value: "{greeting}"}}]
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector: {{app: {name}}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
"#,
        image = baton::guest("http-hello")
    )
}

const INGRESS: &str = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: site
spec:
  tls:
  - hosts: [shop.example]
    secretName: shop-tls
  rules:
  - host: shop.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: shop, port: {number: 80}}}}
      - {path: /blog, pathType: Prefix, backend: {service: {name: blog, port: {name: http}}}}
  - host: "*.blog.example"
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: blog, port: {number: 80}}}}
  - host: gone.example
    http:
      paths:
      - {path: /, pathType: Exact, backend: {service: {name: nowhere, port: {number: 80}}}}
"#;

/// curl against the node's Ingress ports, the host resolved to 127.0.0.1; returns the
/// status code, the headers and the body.
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap_or(0),
        head.to_string(),
        body.to_string(),
    )
}

#[test]
fn an_ingress_routes_hosts_and_paths_over_http_and_https_and_says_what_is_missing() {
    let b = Baton::start_with(&["--ingress-http-port", "0", "--ingress-https-port", "0"]);
    let port = |which: &str| -> String {
        wait_for(&b, 30, "the node's Ingress ports", || {
            let p = jsonpath(
                &b,
                &["node", "local"],
                &format!("{{.metadata.annotations.baton\\.dev/ingress-{which}-port}}"),
            );
            (!p.is_empty()).then_some(p)
        })
    };
    let (http, https) = (port("http"), port("https"));
    // The cluster starts with the default class.
    let classes = b.ok(&["get", "ingressclass"]);
    assert!(
        classes.contains("baton") && classes.contains("baton.dev/ingress-controller"),
        "{classes}"
    );

    // A certificate for shop.example, from a CA the test makes.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Subjects of their own: a leaf named as its issuer would look self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ingress test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["shop.example".to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "shop.example");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let dir = b.dir.path();
    let write = |name: &str, text: &str| baton::write(dir, name, text);
    let ca_file = write("ca.crt", &ca.pem());
    let crt_file = write("tls.crt", &cert.pem());
    let key_file = write("tls.key", &key.serialize_pem());
    b.ok(&[
        "create",
        "secret",
        "tls",
        "shop-tls",
        "--cert",
        crt_file.to_str().unwrap(),
        "--key",
        key_file.to_str().unwrap(),
    ]);

    let manifests = format!(
        "{}---\n{}---\n{INGRESS}",
        app("shop", "shop"),
        app("blog", "blog")
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifests));
    wait_for(&b, 90, "both Deployments ready", || {
        let ready = |d| jsonpath(&b, &["deploy", d], "{.status.readyReplicas}");
        (ready("shop") == "1" && ready("blog") == "1").then_some(())
    });
    let resolve = |host: &str, port: &str| format!("{host}:{port}:127.0.0.1");
    let get = |host: &str, path: &str| {
        curl(&[
            "--resolve",
            &resolve(host, &http),
            &format!("http://{host}:{http}{path}"),
        ])
    };
    // Hosts and paths, each to its backend, waiting for the routes to arrive.
    let (code, _, body) = wait_for(&b, 30, "shop.example routed", || {
        let r = get("shop.example", "/cart?id=7");
        (r.0 == 200).then_some(r)
    });
    assert_eq!(code, 200);
    assert!(
        body.starts_with("shop from ") && body.contains("path=/cart?id=7"),
        "{body}"
    );
    let (code, _, body) = get("shop.example", "/blog/post");
    assert_eq!(code, 200);
    assert!(body.starts_with("blog from "), "{body}");
    // Prefix matches whole path elements: /blogroll is the shop's.
    let (_, _, body) = get("shop.example", "/blogroll");
    assert!(body.starts_with("shop from "), "{body}");
    let (code, _, body) = get("news.blog.example", "/");
    assert_eq!(code, 200);
    assert!(body.starts_with("blog from "), "{body}");
    // No rule: 404. A backend with no endpoints: 503, try again later.
    assert_eq!(get("unknown.example", "/").0, 404);
    assert_eq!(get("deep.news.blog.example", "/").0, 404);
    let (code, head, _) = get("gone.example", "/");
    assert_eq!(code, 503);
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    // Exact is exact.
    assert_eq!(get("gone.example", "/x").0, 404);
    // HTTP/2 with prior knowledge, to the same backend.
    let (code, head, body) = curl(&[
        "--http2-prior-knowledge",
        "--resolve",
        &resolve("shop.example", &http),
        &format!("http://shop.example:{http}/h2"),
    ]);
    assert_eq!(code, 200, "{head}");
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(body.contains("path=/h2"), "{body}");

    // TLS with the Secret's certificate, verified against the test's CA, over HTTP/2.
    let (code, head, body) = wait_for(&b, 30, "shop.example over TLS", || {
        let r = curl(&[
            "--cacert",
            ca_file.to_str().unwrap(),
            "--resolve",
            &resolve("shop.example", &https),
            &format!("https://shop.example:{https}/secure"),
        ]);
        (r.0 == 200).then_some(r)
    });
    assert_eq!(code, 200);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(
        body.starts_with("shop from ") && body.contains("path=/secure"),
        "{body}"
    );
    // A host without a certificate gets no TLS.
    let (code, _, _) = curl(&[
        "--cacert",
        ca_file.to_str().unwrap(),
        "--resolve",
        &resolve("news.blog.example", &https),
        &format!("https://news.blog.example:{https}/"),
    ]);
    assert_eq!(code, 0, "a handshake without a certificate for the host");

    // kubectl shows the node's address.
    let address = wait_for(&b, 30, "the Ingress's address", || {
        let a = jsonpath(
            &b,
            &["ingress", "site"],
            "{.status.loadBalancer.ingress[*].ip}",
        );
        (!a.is_empty()).then_some(a)
    });
    assert_eq!(address, "127.0.0.1");
    let listed = b.ok(&["get", "ingress", "site"]);
    assert!(
        listed.contains("127.0.0.1") && listed.contains("baton"),
        "{listed}"
    );

    // An Ingress of another class is not served: it is applied before the next one,
    // whose routing shows both were seen.
    let other = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: elsewhere
spec:
  ingressClassName: nginx
  rules:
  - host: other.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: blog, port: {number: 80}}}}
"#;
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(other));
    // An Ingress naming a missing Secret: served over HTTP, and an event says why.
    let missing = r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: news
spec:
  ingressClassName: baton
  tls:
  - hosts: [news.example]
    secretName: no-such-secret
  rules:
  - host: news.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: blog, port: {number: 80}}}}
"#;
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(missing));
    let (_, _, body) = wait_for(&b, 30, "news.example over HTTP", || {
        let r = get("news.example", "/");
        (r.0 == 200).then_some(r)
    });
    assert!(body.starts_with("blog from "), "{body}");
    assert_eq!(get("other.example", "/").0, 404);
    let events = wait_for(&b, 30, "the missing Secret's event", || {
        let e = b.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=news",
        ]);
        e.contains("TLSSecretNotFound").then_some(e)
    });
    assert!(events.contains("no-such-secret"), "{events}");
}

/// Reads from `s` until the end of an HTTP head (or 64 KiB, or the end).
fn read_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A WebSocket through the Ingress: the upgrade reaches the backend with `Upgrade` and
/// `Connection: upgrade` (hop-by-hop headers otherwise dropped), and once it switches
/// protocols, bytes flow both ways until the client closes.
#[test]
fn an_ingress_passes_an_upgrade_to_websocket_through() {
    use std::io::{Read, Write};
    // The backend: answers an upgrade with 101, then echoes what it gets, upper-cased.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    let seen = std::thread::spawn(move || {
        let (mut s, _) = backend.accept().unwrap();
        let head = read_head(&mut s);
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&buf[..n].to_ascii_uppercase()).unwrap(),
            }
        }
        head
    });
    let b = Baton::start_with(&["--ingress-http-port", "0", "--ingress-https-port", "0"]);
    let port = baton::ingress_http_addr(&b).port();
    // A Service without a selector, its endpoint the test's own server.
    let objects = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: ws}}
spec:
  ports: [{{port: 80, targetPort: {backend_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ws-1
  labels: {{kubernetes.io/service-name: ws}}
addressType: IPv4
ports: [{{name: "", port: {backend_port}, protocol: TCP}}]
endpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: ws}}
spec:
  rules:
  - host: ws.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: ws, port: {{number: 80}}}}}}}}
"#
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&objects));
    let (mut s, head) = wait_for(&b, 30, "the upgrade switched", || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .ok()?;
        let head = read_head(&mut s);
        head.starts_with("HTTP/1.1 101").then_some((s, head))
    });
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("upgrade: websocket") && lower.contains("connection: upgrade"),
        "{head}"
    );
    for word in ["hello", "again"] {
        s.write_all(word.as_bytes()).unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, word.to_ascii_uppercase().as_bytes());
    }
    drop(s);
    let seen = seen.join().unwrap().to_ascii_lowercase();
    assert!(seen.starts_with("get /chat http/1.1"), "{seen}");
    assert!(
        seen.contains("upgrade: websocket")
            && seen.contains("connection: upgrade")
            && seen.contains("sec-websocket-version: 13")
            && seen.contains("x-forwarded-host: ws.test"),
        "{seen}"
    );
    assert!(!seen.contains("keep-alive"), "{seen}");
}
