//! A second real client: kube-rs (the Rust client the controllers will use) against
//! `baton up`: list, watch with resume, patch, server-side apply, and kube-runtime's
//! watcher.

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
