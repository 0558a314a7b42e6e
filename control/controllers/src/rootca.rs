//! The root CA publisher: every active namespace has the ConfigMap `kube-root-ca.crt`
//! holding the cluster CA (`ca.crt`), which the projected `kube-api-access-*` volume of
//! every pod with a ServiceAccount token mounts beside the token, so that an in-cluster
//! client can verify the API server. A ConfigMap edited or deleted by hand is put back.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Ctx;

/// The ConfigMap's name, as Kubernetes names it.
pub const NAME: &str = "kube-root-ca.crt";
/// The key of the CA bundle in it.
pub const KEY: &str = "ca.crt";

/// Why the ConfigMap could not be written (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("publishing {NAME} in {namespace}")]
pub struct Error {
    namespace: String,
    #[source]
    source: kube::Error,
}

/// Writes the namespace's `kube-root-ca.crt` if it is missing or says something else.
pub async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let active = ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating");
    let Some(ca) = ctx.root_ca.as_deref().filter(|_| active) else {
        return Ok(Action::await_change());
    };
    let namespace = ns.name_any();
    let err = |source| Error {
        namespace: namespace.clone(),
        source,
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let wanted = std::collections::BTreeMap::from([(KEY.to_string(), ca.to_string())]);
    let result = match api.get_opt(NAME).await.map_err(err)? {
        Some(cm) if cm.data.as_ref() == Some(&wanted) && cm.binary_data.is_none() => {
            return Ok(Action::await_change())
        }
        Some(mut cm) => {
            cm.data = Some(wanted);
            cm.binary_data = None;
            api.replace(NAME, &PostParams::default(), &cm).await
        }
        None => {
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(NAME.into()),
                    annotations: Some(
                        [(
                            "kubernetes.io/description".to_string(),
                            "The cluster CA: it verifies the API server reached at kubernetes.default.svc or at its ClusterIP.".to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                data: Some(wanted),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await
        }
    };
    match result {
        Ok(_) => Ok(Action::await_change()),
        // Someone wrote it meanwhile: look again.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Ok(Action::requeue(std::time::Duration::from_millis(100)))
        }
        // The namespace is going: nothing to publish.
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fake::{World, FAKE_CA};

    fn namespace(v: serde_json::Value) -> Arc<Namespace> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[tokio::test]
    async fn a_namespace_without_the_configmap_gets_the_cluster_ca() {
        let w = World::new();
        w.api
            .fail("GET", "/namespaces/team-a/configmaps/kube-root-ca.crt", 404);
        reconcile(
            namespace(json!({"metadata": {"name": "team-a"}})),
            w.ctx.clone(),
        )
        .await
        .unwrap();
        let writes = w.api.write_calls();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(writes[0].method, "POST");
        assert_eq!(writes[0].path, "/api/v1/namespaces/team-a/configmaps");
        assert_eq!(writes[0].body["metadata"]["name"], NAME);
        assert_eq!(writes[0].body["data"][KEY], FAKE_CA);
    }

    #[tokio::test]
    async fn a_namespace_being_deleted_gets_nothing() {
        let w = World::new();
        reconcile(
            namespace(json!({"metadata": {"name": "gone"}, "status": {"phase": "Terminating"}})),
            w.ctx.clone(),
        )
        .await
        .unwrap();
        assert!(w.api.calls().is_empty());
    }
}
