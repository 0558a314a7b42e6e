//! A second real client: kube-rs (the Rust client the controllers will use) against
//! `baton up`: list, watch with resume, patch, server-side apply, kube-runtime's
//! watcher, and kube-rs's own port-forward (WebSocket channels, not kubectl's tunnel).

#[path = "support/baton.rs"]
mod baton;

use std::time::Duration;

use baton::Baton;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde_json::json;

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": v}})).unwrap()
}

async fn client(b: &Baton) -> kube::Client {
    let kc = Kubeconfig::read_from(&b.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
) -> WatchEvent<ConfigMap> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event in time")
            .expect("stream open")
            .unwrap();
        if !matches!(ev, WatchEvent::Bookmark(_)) {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_watches_with_resume_patches_and_applies() {
    let b = Baton::start();
    let client = client(&b).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    cms.create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.unwrap();

    let mut stream = cms
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();
    cms.create(&PostParams::default(), &cm("b", "1"))
        .await
        .unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    let WatchEvent::Added(added) = next_event(&mut stream).await else {
        panic!("expected ADDED")
    };
    assert_eq!(added.metadata.name.as_deref(), Some("b"));
    let WatchEvent::Modified(modified) = next_event(&mut stream).await else {
        panic!("expected MODIFIED")
    };
    assert_eq!(modified.data.unwrap()["v"], "2");
    let resume_at = modified.metadata.resource_version.unwrap();
    drop(stream);

    // While nobody watches, b goes away; a watch resumed at the last seen version sees it.
    cms.delete("b", &DeleteParams::default()).await.unwrap();
    let mut stream = cms
        .watch(&WatchParams::default().timeout(30), &resume_at)
        .await
        .unwrap()
        .boxed();
    let WatchEvent::Deleted(gone) = next_event(&mut stream).await else {
        panic!("expected DELETED")
    };
    assert_eq!(gone.metadata.name.as_deref(), Some("b"));
    assert_eq!(gone.data.unwrap()["v"], "1", "the final object");

    // Server-side apply: create, update, conflict, force.
    let pp = PatchParams::apply("kube-rs-test");
    let applied = cms
        .patch("c", &pp, &Patch::Apply(cm("c", "x")))
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["v"], "x");
    let applied = cms
        .patch("c", &pp, &Patch::Apply(cm("c", "y")))
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["v"], "y");
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"kube-rs-test".to_string()),
        "{managers:?}"
    );
    let other = PatchParams::apply("someone-else");
    match cms.patch("c", &other, &Patch::Apply(cm("c", "z"))).await {
        Err(kube::Error::Api(ae)) => assert_eq!((ae.code, ae.reason.as_str()), (409, "Conflict")),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forced = cms
        .patch("c", &other.force(), &Patch::Apply(cm("c", "z")))
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["v"], "z");

    // A stale update is a conflict.
    let mut stale = cms.get("a").await.unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "3"}})),
    )
    .await
    .unwrap();
    stale.data = Some([("v".to_string(), "4".to_string())].into());
    match cms.replace("a", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(ae)) => assert_eq!(ae.code, 409),
        other => panic!("expected a conflict, got {other:?}"),
    }

    // kube-runtime's watcher: list-then-watch, as controllers run.
    let mut w = watcher(cms.clone(), watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    while !seen.iter().any(|n: &String| n == "c") {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.try_next())
            .await
            .expect("watcher event in time")
            .unwrap()
            .unwrap();
        if let watcher::Event::InitApply(o) | watcher::Event::Apply(o) = ev {
            seen.push(o.metadata.name.unwrap());
        }
    }
    assert!(seen.contains(&"a".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_port_forwards_to_a_pod_and_reports_a_port_nothing_listens_on() {
    use k8s_openapi::api::core::v1::Pod;
    use tokio::io::AsyncWriteExt;
    let b = Baton::start_with(&["--pod-cidr", "127.149.0.0/24"]);
    let client = client(&b).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"containers": [{
            "name": "web",
            "image": baton::guests_dir().join("http-hello.wasm"),
            "ports": [{"containerPort": 8080}],
        }]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        kube::runtime::wait::await_condition(
            pods.clone(),
            "web",
            kube::runtime::conditions::is_pod_running(),
        ),
    )
    .await
    .expect("the pod runs in time")
    .unwrap();

    // Two ports in one session: one serves, nothing listens on the other.
    let mut pf = pods.portforward("web", &[8080, 9999]).await.unwrap();
    let refused = pf.take_error(9999).unwrap();
    let mut web = pf.take_stream(8080).unwrap();
    // The component may still be binding its port when the pod reads Running.
    web.write_all(b"GET /kube-rs HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        read_until(&mut web, "path=/kube-rs"),
    )
    .await
    .expect("the answer in time");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("path=/kube-rs"),
        "{answer}"
    );
    let why = tokio::time::timeout(Duration::from_secs(30), refused)
        .await
        .expect("the error in time")
        .expect("an error for the closed port");
    assert!(
        why.contains("error forwarding port 9999 to pod web"),
        "{why}"
    );
    // The client ends the session while its connection to the pod is still open.
    drop(web);
    tokio::time::timeout(Duration::from_secs(30), pf.join())
        .await
        .expect("the session ends")
        .unwrap();
}

/// Reads off a connection that stays open until what was read holds `want`.
async fn read_until(io: &mut (impl tokio::io::AsyncRead + Unpin), want: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if text.contains(want) {
            return text;
        }
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection ended early: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}
