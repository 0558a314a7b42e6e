//! A Greeter operator, written with kube-rs as any Kubernetes operator is.
//!
//! It installs its CustomResourceDefinition (from `#[derive(CustomResource)]`), then runs
//! a kube-runtime `Controller`: each `Greeter` becomes a Deployment of an HTTP component
//! that answers with the greeting, and a NodePort Service in front of it, both owned by
//! the Greeter (so deleting it garbage-collects them); the Greeter's status reports the
//! ready replicas. Nothing here knows it talks to Baton rather than Kubernetes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What a Greeter asks for.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "demo.baton.dev",
    version = "v1",
    kind = "Greeter",
    namespaced,
    status = "GreeterStatus",
    shortname = "gr",
    printcolumn = r#"{"name":"Greeting","type":"string","jsonPath":".spec.greeting"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GreeterSpec {
    /// What every replica answers with.
    pub greeting: String,
    /// How many replicas serve it.
    pub replicas: i32,
    /// The HTTP component to run (an OCI reference).
    pub image: String,
}

/// What the operator reports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GreeterStatus {
    pub ready_replicas: i32,
}

/// The operator's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed")]
    Kube(#[from] kube::Error),
    #[error("the Greeter CRD was not established in time")]
    NotEstablished,
    #[error("a Greeter has no namespace")]
    NoNamespace,
}

const MANAGER: &str = "greeter-operator";

/// Installs (or updates) the Greeter CRD and waits until it is served.
pub async fn install(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Greeter::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let established = await_condition(crds, &name, conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .map_err(|_| Error::NotEstablished)?
        .map_err(|_| Error::NotEstablished)?;
    Ok(())
}

struct Ctx {
    client: Client,
}

async fn reconcile(g: Arc<Greeter>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = g.namespace().ok_or(Error::NoNamespace)?;
    let name = g.name_any();
    let owner = g
        .controller_owner_ref(&())
        .expect("a stored Greeter has a uid");
    let labels = json!({"app.kubernetes.io/name": "greeter", "greeter": name});
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "ownerReferences": [owner]},
        "spec": {
            "replicas": g.spec.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "greeter",
                    "image": g.spec.image,
                    "ports": [{"containerPort": 8080}],
                    "env": [
                        {"name": "GREETING", "value": g.spec.greeting},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                    ]
                }]}
            }
        }
    });
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "ownerReferences": [owner]},
        "spec": {"type": "NodePort", "selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}
    });
    let apply = PatchParams::apply(MANAGER).force();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let applied = deployments
        .patch(&name, &apply, &Patch::Apply(&deployment))
        .await?;
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &apply, &Patch::Apply(&service))
        .await?;
    let ready = applied.status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let greeters: Api<Greeter> = Api::namespaced(ctx.client.clone(), &ns);
    if g.status.as_ref().map(|s| s.ready_replicas) != Some(ready) {
        greeters
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"readyReplicas": ready}})),
            )
            .await?;
    }
    // Changes to the owned Deployment wake the controller; this is a safety net.
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy(_g: Arc<Greeter>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    eprintln!("greeter-operator: reconcile failed: {error}");
    Action::requeue(Duration::from_secs(2))
}

/// Runs the controller until the task is dropped.
pub async fn run(client: Client) {
    let greeters: Api<Greeter> = Api::all(client.clone());
    let deployments: Api<Deployment> = Api::all(client.clone());
    Controller::new(greeters, Default::default())
        .owns(deployments, Default::default())
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|_| async {})
        .await;
}
