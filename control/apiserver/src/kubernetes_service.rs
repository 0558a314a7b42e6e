//! The `kubernetes` Service in `default`, through which workloads reach the API server.
//!
//! As kube-apiserver's bootstrap controller does, every API server keeps the Service
//! there (ClusterIP [`CLUSTER_IP`], port 443 named `https`, no selector) and puts its own
//! address into the Service's EndpointSlice, so that a node's service proxy carries a
//! component's `https://10.96.0.1` (or `https://kubernetes.default.svc`) to an API
//! server. The ClusterIP is held in the Service range like any other, so no other Service
//! can be given it. An administrator who deletes the Service gets it back within
//! [`RESYNC`].
//!
//! Each member adds itself and never removes another: a member that is gone for good
//! stays in the slice until an administrator edits it (kube-apiserver's lease-based
//! reconciler, which drops members whose lease lapsed, is not done yet).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::resources;
use crate::rest;
use crate::strategy::Claim;

/// The `kubernetes` Service's ClusterIP: the first of the Service range (10.96.0.0/16).
pub const CLUSTER_IP: &str = "10.96.0.1";
/// How often each API server checks that the Service and its own endpoint are there.
pub const RESYNC: Duration = Duration::from_secs(10);

const NAME: &str = "kubernetes";
const NAMESPACE: &str = "default";
const MANAGER: &str = "baton-apiserver";

/// Makes sure the Service exists and that `endpoint` is among its endpoints.
#[tracing::instrument(skip(objects), err)]
pub async fn reconcile(objects: &Objects, endpoint: SocketAddr) -> ApiResult<()> {
    ensure_service(objects, endpoint.port()).await?;
    ensure_endpoint(objects, endpoint).await
}

/// Reconciles now, then every [`RESYNC`], until the task is dropped.
pub async fn run(objects: Objects, endpoint: SocketAddr) {
    loop {
        if let Err(e) = reconcile(&objects, endpoint).await {
            tracing::warn!(error = %e, "could not publish the kubernetes Service");
        }
        tokio::time::sleep(RESYNC).await;
    }
}

fn meta(name: &str, labels: Value) -> Value {
    json!({"name": name, "namespace": NAMESPACE, "labels": labels,
           "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": rest::now()})
}

async fn ensure_service(objects: &Objects, target_port: u16) -> ApiResult<()> {
    let res = resources::builtin("Service");
    if objects
        .get(res, Some(NAMESPACE), NAME, ReadAt::Latest)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(NAME, json!({"component": "apiserver", "provider": "kubernetes"})),
        "spec": {
            "type": "ClusterIP",
            "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": target_port}],
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    });
    let claim = Claim {
        key: format!("{}{CLUSTER_IP}", crate::strategy::service::IPS),
        field: "spec.clusterIP",
        value: CLUSTER_IP.into(),
        requested: true,
        taken: "provided IP is already allocated",
    };
    match objects
        .create(res, Some(NAMESPACE), NAME, svc, &[claim])
        .await
    {
        Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn ensure_endpoint(objects: &Objects, endpoint: SocketAddr) -> ApiResult<()> {
    let res = resources::builtin("EndpointSlice");
    // A wildcard listener is reached on loopback from this machine's nodes.
    let ip = match endpoint.ip() {
        ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    let mine = json!({"addresses": [ip.to_string()], "conditions": {"ready": true}});
    let port = json!([{"name": "https", "port": endpoint.port(), "protocol": "TCP"}]);
    for _ in 0..5 {
        let current = objects
            .get(res, Some(NAMESPACE), NAME, ReadAt::Latest)
            .await?;
        let result = match current {
            None => {
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": meta(NAME, json!({
                        "kubernetes.io/service-name": NAME,
                        "endpointslice.kubernetes.io/managed-by": MANAGER,
                    })),
                    "addressType": if ip.is_ipv4() { "IPv4" } else { "IPv6" },
                    "endpoints": [mine],
                    "ports": port,
                });
                objects
                    .create(res, Some(NAMESPACE), NAME, slice, &[])
                    .await
                    .map(|_| ())
            }
            Some((mut slice, rev)) => {
                let listed = slice
                    .get("endpoints")
                    .and_then(Value::as_array)
                    .is_some_and(|e| e.iter().any(|e| e == &mine));
                if listed && slice.get("ports") == Some(&port) {
                    return Ok(());
                }
                // Members serve one port; a slice with another one is from an older
                // configuration, and this member's view replaces it.
                let mut endpoints: Vec<Value> = if slice.get("ports") == Some(&port) {
                    slice["endpoints"].as_array().cloned().unwrap_or_default()
                } else {
                    Vec::new()
                };
                endpoints.retain(|e| e.pointer("/addresses/0") != mine.pointer("/addresses/0"));
                endpoints.push(mine.clone());
                slice["endpoints"] = json!(endpoints);
                slice["ports"] = port.clone();
                objects
                    .replace(res, Some(NAMESPACE), NAME, slice, rev)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Err(ApiError::Conflict { .. } | ApiError::AlreadyExists { .. }) => continue,
            other => return other,
        }
    }
    Ok(())
}
