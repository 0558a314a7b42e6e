//! An operator written with kube-rs (`examples/greeter-operator`, the README's example)
//! runs against `baton up`: it installs its CRD, reconciles Greeters into Deployments
//! that serve, writes their status, and deleting a Greeter garbage-collects what it made.

#[path = "support/baton.rs"]
mod baton;
#[path = "../examples/greeter-operator/operator.rs"]
mod operator;

use std::net::SocketAddr;

use baton::{http_get, jsonpath, wait_for, Baton};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use operator::{Greeter, GreeterSpec};

async fn client(b: &Baton) -> kube::Client {
    let kc = Kubeconfig::read_from(&b.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn http_hello() -> String {
    let p = baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .join("examples-wasm/dist/http-hello.wasm");
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-guests.sh",
        p.display()
    );
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_operator_reconciles_its_custom_resources() {
    let b = Baton::start_cluster();
    let client = client(&b).await;
    operator::install(&client)
        .await
        .expect("the CRD is installed");
    let running = tokio::spawn(operator::run(client.clone()));

    let greeters: Api<Greeter> = Api::namespaced(client.clone(), "default");
    let g = Greeter::new(
        "hello",
        GreeterSpec {
            greeting: "bonjour".into(),
            replicas: 2,
            image: http_hello(),
        },
    );
    greeters.create(&PostParams::default(), &g).await.unwrap();

    // kubectl is a plain client of the same blocking kind; run it off the runtime.
    let b = std::sync::Arc::new(b);
    let bb = b.clone();
    let port = tokio::task::spawn_blocking(move || {
        wait_for(
            &bb,
            90,
            "the Greeter's 2 ready replicas in its status",
            || {
                (jsonpath(&bb, &["greeter", "hello"], "{.status.readyReplicas}") == "2")
                    .then_some(())
            },
        );
        let out = bb.ok(&["get", "gr"]);
        assert!(out.contains("GREETING") && out.contains("bonjour"), "{out}");
        jsonpath(&bb, &["svc", "hello"], "{.spec.ports[0].nodePort}")
            .parse::<u16>()
            .expect("a node port")
    })
    .await
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let bb = b.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            &bb,
            30,
            "the greeting through the Service",
            || match http_get(addr, "/") {
                Ok((200, body)) if body.starts_with("bonjour from hello-") => Some(()),
                _ => None,
            },
        )
    })
    .await
    .unwrap();

    greeters.delete("hello", &Default::default()).await.unwrap();
    let bb = b.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(&bb, 60, "the Deployment and Service collected", || {
            let gone = |kind: &str| {
                !bb.run("kubectl", &["get", kind, "hello"], None)
                    .status
                    .success()
            };
            (gone("deploy") && gone("svc")).then_some(())
        })
    })
    .await
    .unwrap();
    running.abort();
}
