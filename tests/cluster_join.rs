//! Members that join with the cluster token: `baton server --server URL --token T`.
//!
//! Real `baton server` processes on 127.0.0.1, each serving the API: the joiners fetch
//! the cluster's keys from the first, so that one kubeconfig works against every member,
//! and a Secret written through one is read through another. A wrong token, a server of
//! another cluster and a data dir of another cluster are refused with a message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_store::{StoreCa, StoreClient};

struct Member {
    child: Child,
    dir: PathBuf,
    store: String,
    api: SocketAddr,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn baton() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.env("RUST_LOG", "info,openraft=warn");
    cmd
}

/// Starts a member with its own store socket and an API on port 0; returns once it says
/// where its API is (a joiner says so only once it has joined).
fn start(dir: &Path, extra: &[&str]) -> Member {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = listener.local_addr().unwrap().to_string();
    let mut cmd = baton();
    baton_testkit::process::pass_listener(&mut cmd, &listener);
    cmd.args(["server", "--listen-fd"])
        .arg(baton_testkit::process::LISTEN_FD.to_string());
    let member = run_member(cmd, dir, extra, store);
    drop(listener);
    member
}

/// Starts a member whose store is the external etcd that `extra` names.
fn start_over_etcd(dir: &Path, extra: &[&str]) -> Member {
    let mut cmd = baton();
    cmd.arg("server");
    run_member(cmd, dir, extra, String::new())
}

fn run_member(mut cmd: Command, dir: &Path, extra: &[&str], store: String) -> Member {
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let mut child = cmd
        .args(["--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn baton server");
    let stdout = child.stdout.take().unwrap();
    let api = baton_testkit::process::announced_addr(
        stdout,
        "Kubernetes API at https://",
        Duration::from_secs(90),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; its log:\n{}",
            std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
        )
    });
    Member {
        child,
        dir: dir.to_path_buf(),
        store,
        api,
    }
}

/// Runs a joiner that must be refused; returns what it said.
fn refused(dir: &Path, extra: &[&str]) -> String {
    let mut child = baton()
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = baton_testkit::wait_until(Duration::from_secs(60), "the joiner to stop", || {
        child.try_wait().ok().flatten()
    })
    .unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("{e}: a joiner that should be refused kept waiting")
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "a joiner that should be refused started: {err}"
    );
    err
}

fn kubectl(kubeconfig: &Path, server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .arg(format!("--server=https://{server}"))
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} against {server}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_with_the_cluster_token_and_share_one_identity() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    // The first member's encryption key is given from outside its data dir; the joiners
    // get it with the cluster's keys, or they could not read its Secrets.
    let encryption = tmp.path().join("encryption.yaml");
    std::fs::write(
        &encryption,
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - {name: given, secret: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=}\n  - identity: {}\n",
    )
    .unwrap();
    let first = start(
        &tmp.path().join("m1"),
        &[
            "--bootstrap",
            "--encryption-provider-config",
            encryption.to_str().unwrap(),
        ],
    );
    let token = std::fs::read_to_string(first.dir.join("token"))
        .expect("the first member wrote the cluster token")
        .trim()
        .to_string();
    assert!(token.starts_with("baton1::"), "{token}");
    let url = format!("https://{}", first.api);

    // Two members join at the same moment through the first's API.
    let dirs = [tmp.path().join("m2"), tmp.path().join("m3")];
    let (a, b) = std::thread::scope(|s| {
        let join = |d: &PathBuf| {
            let (url, token) = (url.clone(), token.clone());
            let d = d.clone();
            s.spawn(move || start(&d, &["--server", &url, "--token", &token]))
        };
        let (a, b) = (join(&dirs[0]), join(&dirs[1]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let members = [first, a, b];

    // The store has three voters, and takes a client certificate from its own CA only.
    let tls = StoreCa::load(&members[0].dir.join("pki"))
        .unwrap()
        .client("test")
        .unwrap();
    let store = StoreClient::new(members.iter().map(|m| m.store.clone()))
        .with_tls(&tls)
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    baton_testkit::wait_until_async(Duration::from_secs(60), "three voters", || {
        let store = store.clone();
        async move {
            let s = store.status().await.ok()?;
            (s.members.iter().filter(|m| m.voter).count() == 3).then_some(())
        }
    })
    .await
    .unwrap();
    let anonymous = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    for m in &members {
        let res = anonymous
            .get(format!("https://{}/store/v1/status", m.store))
            .send()
            .await;
        assert!(
            res.is_err(),
            "the store port of {} answered a client without a certificate",
            m.store
        );
    }

    // One identity: every member has the first's CA, so its kubeconfig works everywhere,
    // and one encryption key, so a Secret written through one is read through another.
    let ca = std::fs::read(members[0].dir.join("pki/ca.crt")).unwrap();
    for m in &members[1..] {
        assert_eq!(std::fs::read(m.dir.join("pki/ca.crt")).unwrap(), ca);
    }
    let kubeconfig = members[0].dir.join("kubeconfig");
    kubectl(
        &kubeconfig,
        members[2].api,
        &[
            "create",
            "secret",
            "generic",
            "shared",
            "--from-literal=k=v",
        ],
    );
    for m in &members {
        let got = kubectl(
            &kubeconfig,
            m.api,
            &["get", "secret", "shared", "-o", "jsonpath={.data.k}"],
        );
        assert_eq!(got, "dg==", "through {}", m.api);
    }
    // `baton kubeconfig` names every member given, one context each; each context
    // works. (Members on one address with ports of their own cannot all publish
    // themselves in the one EndpointSlice; tests/partitions.rs checks the discovery.)
    let servers: Vec<String> = members
        .iter()
        .map(|m| format!("https://{}", m.api))
        .collect();
    let out = baton()
        .args(["kubeconfig", "--user", "alice", "--group", "system:masters"])
        .args(["--server", &servers.join(","), "--data-dir"])
        .arg(&members[0].dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let alice = tmp.path().join("alice.kubeconfig");
    std::fs::write(&alice, &out.stdout).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for m in &members {
        assert!(
            text.contains(&format!("server: https://{}", m.api)),
            "{text}"
        );
    }
    for context in ["baton", "baton-2", "baton-3"] {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &alice)
            .args([
                "--context",
                context,
                "get",
                "secret",
                "shared",
                "-o",
                "name",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "context {context}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A wrong secret for the right CA: the server refuses it, and the joiner says so.
    let (prefix, _) = token.rsplit_once("::").unwrap();
    let err = refused(
        &tmp.path().join("wrong"),
        &[
            "--server",
            &url,
            "--token",
            &format!("{prefix}::not-the-secret-at-all"),
        ],
    );
    assert!(err.contains("refused the token"), "{err}");
    // A token for another CA: the server is not the token's cluster.
    let other = format!("baton1::{}::not-the-secret-at-all", "0".repeat(64));
    let err = refused(
        &tmp.path().join("other"),
        &["--server", &url, "--token", &other],
    );
    assert!(err.contains("another CA than the token names"), "{err}");
    // A data dir of this cluster, given with another cluster's token, is refused at start.
    let copy = members[1].dir.with_extension("copy");
    std::fs::create_dir_all(copy.join("pki")).unwrap();
    std::fs::copy(members[1].dir.join("pki/ca.crt"), copy.join("pki/ca.crt")).unwrap();
    let err = refused(&copy, &["--server", &url, "--token", &other]);
    assert!(err.contains("belongs to another cluster"), "{err}");

    // A node given every server fails over when the one it uses dies: its Lease is
    // renewed through another member after the first is killed.
    let servers = members
        .iter()
        .map(|m| format!("https://{}", m.api))
        .collect::<Vec<_>>()
        .join(",");
    let node_token = std::fs::read_to_string(members[0].dir.join("node-token"))
        .unwrap()
        .trim()
        .to_string();
    // The node token joins nodes only: a server that presents it gets no keys.
    let err = refused(
        &tmp.path().join("with-node-token"),
        &["--server", &url, "--token", &node_token],
    );
    assert!(err.contains("refused the token"), "{err}");
    let node_dir = tmp.path().join("node");
    let mut node = baton()
        .args([
            "node",
            "--server",
            &servers,
            "--token",
            &node_token,
            "--data-dir",
        ])
        .arg(&node_dir)
        .args(["--node-name", "edge"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(node_dir.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let renewed = |through: SocketAddr| {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .arg(format!("--server=https://{through}"))
            .args(["-n", "kube-node-lease", "get", "lease", "edge", "-o"])
            .arg("jsonpath={.spec.renewTime}")
            .output()
            .ok()?;
        let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !t.is_empty()).then_some(t)
    };
    let before = baton_testkit::wait_until(Duration::from_secs(60), "the node's Lease", || {
        renewed(members[1].api)
    })
    .unwrap();
    let [first, second, _third] = members;
    drop(first);
    let after = baton_testkit::wait_until(
        Duration::from_secs(60),
        "the node's Lease renewed after the first member died",
        || renewed(second.api).filter(|t| *t > before),
    );
    let _ = node.kill();
    let _ = node.wait();
    let log = std::fs::read_to_string(node_dir.with_extension("log")).unwrap_or_default();
    after.unwrap_or_else(|e| panic!("{e}; the node's log:\n{log}"));
    assert!(
        log.contains("API server failover"),
        "the node did not fail over; its log:\n{log}"
    );
}

/// Nodes join as Kubernetes' TLS bootstrap has them: the token asks for a client
/// certificate through a CertificateSigningRequest, which the controller manager
/// approves and signs; the node then runs as `system:node:NAME`. Both the node token
/// and a bootstrap token from `baton token create` work; a revoked one is refused.
#[test]
fn nodes_join_with_a_token_through_a_certificate_signing_request() {
    let tmp = tempfile::tempdir().unwrap();
    let first = start(&tmp.path().join("m1"), &["--bootstrap"]);
    let node_token = std::fs::read_to_string(first.dir.join("node-token"))
        .unwrap()
        .trim()
        .to_string();
    let url = format!("https://{}", first.api);
    let data = first.dir.to_str().unwrap().to_string();
    let bootstrap = baton()
        .args(["token", "create", "--data-dir", &data, "--ttl", "1h"])
        .output()
        .unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let bootstrap = String::from_utf8(bootstrap.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(bootstrap.starts_with("baton1::"), "{bootstrap}");
    let listed = baton()
        .args(["token", "list", "--data-dir", &data])
        .output()
        .unwrap();
    let id = bootstrap
        .rsplit("::")
        .next()
        .unwrap()
        .split('.')
        .next()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(id));

    let node = |name: &str, token: &str| -> Child {
        baton()
            .args(["node", "--server", &url, "--token", token, "--data-dir"])
            .arg(tmp.path().join(name))
            .args(["--node-name", name])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _a = Kill(node("node-a", &node_token));
    let _b = Kill(node("node-b", &bootstrap));
    let kubeconfig = first.dir.join("kubeconfig");
    baton_testkit::wait_until(Duration::from_secs(60), "both nodes Ready", || {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .args(["get", "nodes", "-o"])
            .arg("jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}")
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        (s.contains("node-a=True") && s.contains("node-b=True")).then_some(())
    })
    .unwrap();
    let csrs = kubectl(
        &kubeconfig,
        first.api,
        &[
            "get",
            "csr",
            "-o",
            "jsonpath={range .items[*]}{.spec.username} {.status.conditions[0].type};{end}",
        ],
    );
    assert!(
        csrs.contains("system:bootstrap:node-token Approved"),
        "{csrs}"
    );
    assert!(
        csrs.contains(&format!("system:bootstrap:{id} Approved")),
        "{csrs}"
    );
    // The node's own kubeconfig names its certificate's user, not the token.
    let node_kubeconfig =
        std::fs::read_to_string(tmp.path().join("node-b/node-kubeconfig")).unwrap();
    assert!(node_kubeconfig.contains("system:node:node-b"));
    assert!(!node_kubeconfig.contains(id));

    // Revoked: a new node with it is refused, and says why.
    let deleted = baton()
        .args(["token", "delete", "--data-dir", &data, &bootstrap])
        .output()
        .unwrap();
    assert!(deleted.status.success(), "{deleted:?}");
    let out = baton()
        .args([
            "node",
            "--server",
            &url,
            "--token",
            &bootstrap,
            "--data-dir",
        ])
        .arg(tmp.path().join("node-c"))
        .args(["--node-name", "node-c"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token was refused"), "{err}");

    // Rotation: node-a restarts with a certificate near the end of its life (95% spent,
    // issued here by the cluster CA). It asks for a new one as itself, the controller
    // approves the renewal, and the node goes on with it: kept in its kubeconfig.
    drop(_a);
    let path = tmp.path().join("node-a/node-kubeconfig");
    let (cert, key) = expiring_node_certificate(&first.dir.join("pki"), "node-a");
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let old: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let indent = &l[..l.len() - l.trim_start().len()];
            if l.trim_start().starts_with("client-certificate-data:") {
                format!("{indent}client-certificate-data: {}\n", b64(&cert))
            } else if l.trim_start().starts_with("client-key-data:") {
                format!("{indent}client-key-data: {}\n", b64(&key))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&path, &old).unwrap();
    let _a = Kill(node("node-a", &node_token));
    baton_testkit::wait_until(
        Duration::from_secs(60),
        "node-a to renew its certificate",
        || {
            let now = std::fs::read_to_string(&path).ok()?;
            (now != old && now.contains("client-certificate-data")).then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; its log:\n{}",
            std::fs::read_to_string(tmp.path().join("node-a.log")).unwrap_or_default()
        )
    });
    let csrs = kubectl(
        &kubeconfig,
        first.api,
        &[
            "get",
            "csr",
            "-o",
            "jsonpath={range .items[*]}{.spec.username} {.status.conditions[0].type} {.status.conditions[0].message};{end}",
        ],
    );
    assert!(
        csrs.contains("system:node:node-a Approved Auto approving a node's renewal"),
        "{csrs}"
    );
    // The node goes on with the new certificate: its Lease is renewed after the swap.
    let renew_time = || {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .args(["get", "lease", "-n", "kube-node-lease", "node-a", "-o"])
            .arg("jsonpath={.spec.renewTime}")
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let before = renew_time();
    baton_testkit::wait_until(Duration::from_secs(30), "node-a to renew its Lease", || {
        let now = renew_time()?;
        (Some(&now) != before.as_ref() && !now.is_empty()).then_some(())
    })
    .unwrap();
}

/// A client certificate for node `name` from the cluster CA in `pki`, 95% through a
/// life of 100 minutes.
fn expiring_node_certificate(pki: &Path, name: &str) -> (String, String) {
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(95 * 60)).into();
    params.not_after = (now + Duration::from_secs(5 * 60)).into();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `baton server --store etcd://...`: the cluster's state lives in an existing etcd
/// (Debian's, with client TLS and client certificates). A second member joins with the
/// token and shares it; what one member writes, the other reads. An etcd that cannot be
/// reached, or a malformed `--store`, stops a member at start with a message.
#[test]
fn servers_keep_the_cluster_in_an_external_etcd() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let ca = StoreCa::generate().unwrap();
    let served = ca.member(1, &["127.0.0.1"]).unwrap();
    let client = ca.client("baton").unwrap();
    let file = |name: &str, pem: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let etcd_cert = file("etcd.crt", served.cert_and_key_pem().0);
    let etcd_key = file("etcd.key", served.cert_and_key_pem().1);
    let ca_file = file("ca.crt", &ca.cert_pem);
    let cert = file("client.crt", client.cert_and_key_pem().0);
    let key = file("client.key", client.cert_and_key_pem().1);
    let etcd = baton_testkit::etcd::Etcd::start_tls(baton_testkit::etcd::ServingTls {
        cert: Path::new(&etcd_cert),
        key: Path::new(&etcd_key),
        client_ca: Path::new(&ca_file),
    })
    .unwrap();
    let url = format!("etcd://{}", etcd.url().trim_start_matches("https://"));
    let store_flags = [
        "--store",
        &url,
        "--etcd-cacert",
        &ca_file,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ];
    let first = start_over_etcd(&tmp.path().join("m1"), &store_flags);
    let token = std::fs::read_to_string(first.dir.join("token")).unwrap();
    let server = format!("https://{}", first.api);
    let mut joiner = store_flags.to_vec();
    joiner.extend(["--server", &server, "--token", token.trim()]);
    let second = start_over_etcd(&tmp.path().join("m2"), &joiner);
    let kubeconfig = first.dir.join("kubeconfig");
    kubectl(
        &kubeconfig,
        first.api,
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=k=in-etcd",
        ],
    );
    let got = kubectl(
        &kubeconfig,
        second.api,
        &["get", "secret", "s", "-o", "jsonpath={.data.k}"],
    );
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(got.trim())
            .unwrap(),
        b"in-etcd"
    );
    // Both members' API servers publish themselves in the one store.
    let eps = kubectl(
        &kubeconfig,
        second.api,
        &[
            "get",
            "endpointslices",
            "-n",
            "default",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ],
    );
    assert!(eps.contains("127.0.0.1"), "{eps}");

    // Bad input stops a member at start, and says why.
    let bad = |dir: &str, flags: &[&str]| {
        let out = baton()
            .args(["server", "--api-listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join(dir))
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = bad("m3", &["--store", "etcd://"]);
    assert!(err.contains("names no etcd endpoint"), "{err}");
    // A client certificate etcd does not know.
    let other = StoreCa::generate().unwrap().client("x").unwrap();
    let other_cert = file("other.crt", other.cert_and_key_pem().0);
    let other_key = file("other.key", other.cert_and_key_pem().1);
    let err = bad(
        "m4",
        &[
            "--store",
            &url,
            "--etcd-cacert",
            &ca_file,
            "--etcd-cert",
            &other_cert,
            "--etcd-key",
            &other_key,
        ],
    );
    assert!(err.contains("failed to reach etcd"), "{err}");
    drop(second);
    drop(first);
}
