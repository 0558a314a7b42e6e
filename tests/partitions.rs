//! A cluster across real network boundaries: each host a network namespace with its own
//! address, joined by a bridge (`baton_testkit::netns`), each running its own `baton`.
//! Three control-plane hosts run `baton server`, two node hosts `baton node`. The first
//! member starts the cluster; the other members and the nodes join with its tokens, all
//! started at the same moment, in an order picked at random.
//!
//! First, the node host that runs a Deployment's pod is cut off. The pod is replaced on
//! the other node within 30 s (its tolerations of `unreachable` are short, for the test);
//! at no moment do two copies stand ready behind its Service; once the partition heals,
//! the old copy is stopped and its Pod is gone.
//!
//! Then, while clients run a recorded workload against the store and `kubectl` applies
//! ConfigMaps, the test:
//! 1. cuts the links of the host that holds the Raft leader. Writes resume within 3 s;
//!    no `kubectl` command fails beyond one retry against another server. The partition
//!    heals; the old leader rejoins as a follower.
//! 2. kills the new leader with SIGKILL and replaces it with a member on a new host,
//!    which joins with the token; the dead member is removed. The cluster serves
//!    throughout.
//!
//! The whole history must be linearizable, and every ConfigMap that `kubectl` was told
//! was applied must be there at the end. Needs root (network namespaces).

#[path = "support/hosts.rs"]
mod hosts;
#[path = "support/linearizability.rs"]
mod linearizability;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_store::{StoreCa, StoreClient};
use baton_testkit::netns::Net;
use hosts::{
    guests_dir, kubectl, kubectl_apply, spawn_node, spawn_server, ElectionsOnFailure, Server,
    API_PORT, STORE_PORT,
};
use linearizability::{check, client_loop, final_reads, Input, Operation};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The Deployment whose pod the node partition moves, and its Service. It tolerates an
/// unreachable or not-ready node for 2 s (300 s by default), so the test is quick.
fn web() -> String {
    let image = guests_dir().join("http-hello.wasm");
    assert!(
        image.exists(),
        "{} is missing: run scripts/build-guests.sh",
        image.display()
    );
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
      tolerations:
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}}
      containers:
      - name: hello
        image: {image}
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {{app: web}}
  ports:
  - port: 80
    targetPort: 8080
"#,
        image = image.display()
    )
}

/// The web pods that are running, ready and not being deleted: (name, node).
fn ready_pods(kubeconfig: &Path, server: &str) -> Vec<(String, String)> {
    let out = kubectl(
        kubeconfig,
        server,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase} {.metadata.deletionTimestamp} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
        ],
    )
    .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // A deletion timestamp would make five fields.
            (f.len() == 4 && f[2] == "Running" && f[3] == "True")
                .then(|| (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

/// The pods the web Service's EndpointSlices name as ready.
fn ready_endpoints(kubeconfig: &Path, server: &str) -> Result<Vec<String>, String> {
    let out = kubectl(
        kubeconfig,
        server,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            r#"jsonpath={range .items[*].endpoints[*]}{.targetRef.name} {.conditions.ready}{"\n"}{end}"#,
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(" true").map(str::to_string))
        .collect())
}

/// What `kubectl` did: each command, whether the first try failed, and whether the
/// retry against the next server failed too.
#[derive(Default)]
struct KubectlLog {
    applied: Vec<String>,
    retried: usize,
    failed: Vec<String>,
}

/// Applies a ConfigMap through `servers[first]`, and if that fails, once more through
/// the server that last answered (`last_good`), as a user would retry. The retry is
/// picked from the user's list as it is then: a server taken out of it while the first
/// try was waiting (a killed member) is not retried. Returns the errors: none, one (the
/// retry worked) or two.
fn apply(
    kubeconfig: &Path,
    servers: &Mutex<Vec<String>>,
    first: usize,
    last_good: &mut Option<String>,
    name: &str,
) -> Vec<String> {
    let manifest =
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n");
    let first = {
        let list = servers.lock().unwrap();
        list[first % list.len()].clone()
    };
    let mut errors = Vec::new();
    match kubectl_apply(kubeconfig, &first, "5s", &manifest) {
        Ok(()) => {
            *last_good = Some(first);
            return errors;
        }
        Err(e) => errors.push(format!("{first}: {e}")),
    }
    let retry = {
        let list = servers.lock().unwrap();
        match last_good.clone() {
            Some(s) if s != first && list.contains(&s) => s,
            _ => {
                let at = list.iter().position(|s| *s == first).map_or(0, |i| i + 1);
                list[at % list.len()].clone()
            }
        }
    };
    match kubectl_apply(kubeconfig, &retry, "5s", &manifest) {
        Ok(()) => *last_good = Some(retry),
        Err(e) => errors.push(format!("{retry}: {e}")),
    }
    errors
}

/// The host whose store address is `addr`.
fn host_of(net_ips: &[String], addr: &str) -> usize {
    net_ips
        .iter()
        .position(|ip| addr.starts_with(&format!("{ip}:")))
        .unwrap_or_else(|| panic!("{addr} is no host's"))
}

/// The first write acknowledged among those called at or after `from` (µs since start).
fn first_write_ack(history: &[Operation], from: u128) -> Option<u128> {
    history
        .iter()
        .filter(|o| o.call >= from && o.output.is_some() && !matches!(o.input, Input::Get))
        .filter_map(|o| o.ret)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_survives_partitioned_hosts_and_a_replaced_member() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let _elections = ElectionsOnFailure(tmp.path().to_path_buf());
    let mut net = Net::new(5).expect("network namespaces (run as root)");
    let ips: Vec<String> = (0..3).map(|h| net.host(h).ip.to_string()).collect();
    let dir = |h: usize| tmp.path().join(format!("host-{h}"));
    let mut servers: Vec<Option<Server>> = Vec::new();

    // The first member, then the others at once, in a random order.
    let mut first = spawn_server(&net, 0, &dir(0), &["--bootstrap"]);
    first.wait_ready();
    let token = std::fs::read_to_string(dir(0).join("token")).unwrap();
    let token = token.trim().to_string();
    let first_api = format!("https://{}:{API_PORT}", ips[0]);
    servers.push(Some(first));
    let node_token = std::fs::read_to_string(dir(0).join("node-token")).unwrap();
    let all_apis = (0..3)
        .map(|h| format!("https://{}:{API_PORT}", net.host(h).ip))
        .collect::<Vec<_>>()
        .join(",");
    // Members 1 and 2 and nodes 3 and 4, at once, in a random order.
    let mut order = vec![1, 2, 3, 4];
    order.shuffle(&mut rng);
    eprintln!("joining in the order {order:?}");
    let mut joiners = Vec::new();
    let mut nodes = Vec::new();
    for &h in &order {
        if h < 3 {
            let join = ["--server", &first_api, "--token", &token];
            joiners.push(spawn_server(&net, h, &dir(h), &join));
        } else {
            nodes.push(spawn_node(&net, h, &dir(h), &all_apis, node_token.trim()));
        }
    }
    for j in &mut joiners {
        j.wait_ready();
    }
    joiners.sort_by_key(|s| s.host);
    servers.extend(joiners.into_iter().map(Some));
    let kubeconfig = dir(0).join("kubeconfig");
    let node_logs = |nodes: &[Server]| {
        nodes
            .iter()
            .map(|n| format!("node-{}:\n{}", n.host, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    baton_testkit::wait_until(Duration::from_secs(60), "both nodes Ready", || {
        let ready = r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}"#;
        let out = kubectl(&kubeconfig, &first_api, &["get", "nodes", "-o", ready]).ok()?;
        (out.split_whitespace().filter(|s| *s == "True").count() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", node_logs(&nodes)));

    // `baton kubeconfig` finds every member: one context each, each of which works.
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["kubeconfig", "--user", "alice", "--group", "system:masters"])
        .arg("--data-dir")
        .arg(dir(0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let alice = tmp.path().join("alice.kubeconfig");
    std::fs::write(&alice, &out.stdout).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for h in 0..3 {
        let url = format!("https://{}:{API_PORT}", net.host(h).ip);
        assert!(
            text.contains(&format!("server: {url}")),
            "{url} missing:\n{text}"
        );
    }
    for context in ["baton", "baton-2", "baton-3"] {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &alice)
            .args(["--context", context, "get", "nodes", "-o", "name"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "context {context}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The node host that runs the web pod is cut off; the pod moves to the other node.
    kubectl_apply(&kubeconfig, &first_api, "30s", &web()).unwrap();
    let (old_pod, old_node) =
        baton_testkit::wait_until(Duration::from_secs(60), "the web pod to run", || {
            ready_pods(&kubeconfig, &first_api).into_iter().next()
        })
        .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", node_logs(&nodes)));
    let cut_host: usize = old_node.trim_start_matches("node-").parse().unwrap();
    let cut = Instant::now();
    net.cut(cut_host).unwrap();
    eprintln!("cut node host {cut_host}, which runs {old_pod}");
    // The most pods the Service named ready at once, sampled throughout.
    let mut most_ready = 0;
    let (new_pod, _) = baton_testkit::wait_until(
        Duration::from_secs(60),
        "the web pod to run on the other node",
        || {
            if let Ok(eps) = ready_endpoints(&kubeconfig, &first_api) {
                most_ready = most_ready.max(eps.len());
            }
            ready_pods(&kubeconfig, &first_api)
                .into_iter()
                .find(|(name, node)| *name != old_pod && *node != old_node)
        },
    )
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", node_logs(&nodes)));
    let moved = cut.elapsed();
    eprintln!("{new_pod} runs on the other node {moved:?} after the partition");
    net.heal(cut_host).unwrap();
    // Healed, the old node stops the old copy and confirms it; its Pod goes.
    baton_testkit::wait_until(
        Duration::from_secs(60),
        "the old pod to be stopped and gone",
        || {
            let pods = ["get", "pods", "-l", "app=web", "-o", "name"];
            let out = kubectl(&kubeconfig, &first_api, &pods).ok()?;
            if let Ok(eps) = ready_endpoints(&kubeconfig, &first_api) {
                most_ready = most_ready.max(eps.len());
            }
            (!out.contains(&old_pod)).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; the nodes' logs:\n{}", node_logs(&nodes)));
    baton_testkit::wait_until(
        Duration::from_secs(30),
        "the Service to name only the new pod",
        || {
            let eps = ready_endpoints(&kubeconfig, &first_api).ok()?;
            most_ready = most_ready.max(eps.len());
            (eps == [new_pod.clone()]).then_some(())
        },
    )
    .unwrap();
    assert_eq!(
        most_ready, 1,
        "two copies of the pod stood ready behind the Service at once"
    );
    assert!(
        moved <= Duration::from_secs(30),
        "the pod was replaced {moved:?} after its node's partition; the goal is 30 s"
    );

    let ca = StoreCa::load(&dir(0).join("pki")).unwrap();
    let tls = ca.client("test").unwrap();
    let store_addrs: Vec<String> = ips.iter().map(|ip| format!("{ip}:{STORE_PORT}")).collect();
    let client_over = |addrs: &[String]| {
        StoreClient::new(addrs.to_vec())
            .with_tls(&tls)
            .unwrap()
            .with_timeout(Duration::from_secs(1))
    };
    let admin = client_over(&store_addrs);
    let status = baton_testkit::wait_until_async(Duration::from_secs(60), "three voters", || {
        let admin = admin.clone();
        async move {
            let s = admin.status().await.ok()?;
            (s.leader.is_some() && s.members.iter().filter(|m| m.voter).count() == 3).then_some(s)
        }
    })
    .await
    .unwrap();
    eprintln!("members: {:?}", status.members);

    // The workload: store clients, each starting at another member, and kubectl.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for id in 0..4 {
        let mut eps = store_addrs.clone();
        eps.rotate_left(id % 3);
        clients.push(tokio::spawn(client_loop(
            id,
            client_over(&eps),
            start,
            stop.clone(),
            history.clone(),
        )));
    }
    let api_servers = Arc::new(Mutex::new(
        ips.iter()
            .map(|ip| format!("https://{ip}:{API_PORT}"))
            .collect::<Vec<_>>(),
    ));
    let kubectl_log = Arc::new(Mutex::new(KubectlLog::default()));
    let kubectl = {
        let (stop, log, servers, kubeconfig) = (
            stop.clone(),
            kubectl_log.clone(),
            api_servers.clone(),
            kubeconfig.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0usize;
            let mut last_good = None;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("cm-{n}");
                let errors = apply(&kubeconfig, &servers, n, &mut last_good, &name);
                let mut log = log.lock().unwrap();
                match errors.len() {
                    0 => log.applied.push(name),
                    1 => {
                        log.retried += 1;
                        log.applied.push(name);
                    }
                    _ => log.failed.push(errors.join("; ")),
                }
                drop(log);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. The leader's host is cut off: the leader every member names.
    let status = baton_testkit::wait_until_async(
        Duration::from_secs(10),
        "the members to agree on a leader",
        || {
            let (admin, addrs) = (admin.clone(), store_addrs.clone());
            async move {
                let mut seen = Vec::new();
                for a in &addrs {
                    seen.push(admin.pinned(a).status().await.ok()?);
                }
                let leader = seen[0].leader?;
                seen.iter()
                    .all(|s| s.leader == Some(leader) && s.term == seen[0].term)
                    .then(|| seen.swap_remove(0))
            }
        },
    )
    .await
    .unwrap();
    let leader_id = status.leader.unwrap();
    let leader_addr = status
        .members
        .iter()
        .find(|m| m.id == leader_id)
        .unwrap()
        .addr
        .clone();
    let leader_host = host_of(&ips, &leader_addr);
    net.cut(leader_host).unwrap();
    // Measured from when the link is down: a write called while `ip` ran may still
    // have gone through.
    let cut_at = start.elapsed().as_micros();
    eprintln!("cut host {leader_host}, the leader's ({leader_addr})");
    let resumed = baton_testkit::wait_until_async(
        Duration::from_secs(15),
        "an acknowledged write after the cut",
        || {
            let history = history.clone();
            async move { first_write_ack(&history.lock().unwrap(), cut_at) }
        },
    )
    .await
    .unwrap();
    let failover = Duration::from_micros((resumed - cut_at) as u64);
    eprintln!("writes resumed {failover:?} after the leader's partition");
    tokio::time::sleep(Duration::from_secs(3)).await;
    net.heal(leader_host).unwrap();
    let old = admin.pinned(&leader_addr);
    baton_testkit::wait_until_async(
        Duration::from_secs(30),
        "the old leader to rejoin as a follower",
        || {
            let old = old.clone();
            async move {
                let s = old.status().await.ok()?;
                (s.leader.is_some() && s.leader != Some(leader_id)).then_some(())
            }
        },
    )
    .await
    .unwrap();
    assert!(
        failover <= Duration::from_secs(3),
        "writes resumed {failover:?} after the leader's partition; the goal is 3 s"
    );

    // 2. The current leader is killed and replaced by a member on a new host.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = admin.status().await.unwrap();
    let victim_id = status.leader.unwrap();
    let victim_addr = status
        .members
        .iter()
        .find(|m| m.id == victim_id)
        .unwrap()
        .addr
        .clone();
    let victim = host_of(&ips, &victim_addr);
    servers[victim].take();
    eprintln!("killed host {victim}'s member ({victim_addr}) with SIGKILL");
    // The user takes the lost machine out of their list until its replacement is up.
    let victim_api = format!("https://{}:{API_PORT}", ips[victim]);
    api_servers.lock().unwrap().retain(|s| *s != victim_api);
    let new_host = net.add_host().unwrap();
    let survivor = (0..3).find(|h| *h != victim).unwrap();
    let survivor_api = format!("https://{}:{API_PORT}", ips[survivor]);
    let mut replacement = spawn_server(
        &net,
        new_host,
        &dir(new_host),
        &["--server", &survivor_api, "--token", &token],
    );
    replacement.wait_ready();
    let new_ip = net.host(new_host).ip.to_string();
    api_servers
        .lock()
        .unwrap()
        .push(format!("https://{new_ip}:{API_PORT}"));
    let live: Vec<String> = store_addrs
        .iter()
        .filter(|a| **a != victim_addr)
        .cloned()
        .chain([format!("{new_ip}:{STORE_PORT}")])
        .collect();
    let admin = client_over(&live);
    // A membership change may still be under way (the new member's promotion): the
    // removal is asked again until it is made.
    let why = Arc::new(Mutex::new(String::new()));
    baton_testkit::wait_until_async(Duration::from_secs(30), "the dead member's removal", || {
        let (admin, why) = (admin.clone(), why.clone());
        async move {
            let result = admin.remove_member(victim_id).await;
            if let Err(e) = &result {
                *why.lock().unwrap() = e.to_string();
            }
            result.ok()
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", why.lock().unwrap()));
    baton_testkit::wait_until_async(
        Duration::from_secs(30),
        "three voters, the new member among them",
        || {
            let admin = admin.clone();
            let new_ip = new_ip.clone();
            async move {
                let s = admin.status().await.ok()?;
                let voters: Vec<_> = s.members.iter().filter(|m| m.voter).collect();
                (s.leader.is_some()
                    && voters.len() == 3
                    && voters
                        .iter()
                        .any(|m| m.addr.starts_with(&format!("{new_ip}:")))
                    && !s.members.iter().any(|m| m.id == victim_id))
                .then_some(())
            }
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    kubectl.join().unwrap();
    final_reads(&admin, start, &history).await;

    let history = history.lock().unwrap().clone();
    let answered = history.iter().filter(|o| o.output.is_some()).count();
    eprintln!("history: {} operations, {answered} answered", history.len());
    assert!(answered > 100, "the workload made progress ({answered})");
    if let Err(e) = check(&history) {
        panic!("history is not linearizable: {e}");
    }
    let log = kubectl_log.lock().unwrap();
    eprintln!(
        "kubectl: {} applied, {} after one retry",
        log.applied.len(),
        log.retried
    );
    assert!(
        log.failed.is_empty(),
        "kubectl commands failed beyond one retry: {:?}",
        log.failed
    );
    // Every ConfigMap kubectl was told was applied is there.
    let out = Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["--server", &survivor_api, "get", "configmaps", "-o", "name"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let names = String::from_utf8_lossy(&out.stdout);
    for name in &log.applied {
        assert!(
            names.contains(&format!("configmap/{name}\n")),
            "{name} was acknowledged and is gone"
        );
    }
    drop(nodes);
    drop(replacement);
    drop(servers);
}
