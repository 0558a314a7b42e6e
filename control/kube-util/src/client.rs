//! kube `Client`s from kubeconfigs held in memory, as `baton up` hands them to the
//! components it runs in one process.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error("cannot build a client")]
    Client(#[source] kube::Error),
}

/// A client from kubeconfig YAML.
pub async fn from_yaml(yaml: &str) -> Result<Client, ClientError> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(ClientError::Kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(ClientError::Kubeconfig)?;
    Client::try_from(config).map_err(ClientError::Client)
}
