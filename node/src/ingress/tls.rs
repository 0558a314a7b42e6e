//! The Ingress's certificates: the `kubernetes.io/tls` Secrets `spec.tls` names, chosen
//! by SNI.
//!
//! A node may read such a Secret because an Ingress of its class names it (the Node
//! authorizer's rule), one GET at a time, so the Secrets are read again every
//! [`REFRESH`] and whenever the Ingresses' TLS sections change: a renewed certificate is
//! served within seconds, with no restart. A Secret that is missing or unusable leaves
//! its hosts without TLS; they are still served over HTTP, and the controller manager
//! tells of it in an event on the Ingress.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Shared;

/// How often the certificates are read again.
const REFRESH: Duration = Duration::from_secs(5);

/// The certificates by host (lower case; `*.example.com` for a wildcard), and the wake-up
/// for a reread.
#[derive(Debug, Default)]
pub(super) struct Certs {
    by_host: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    wake: tokio::sync::Notify,
}

impl Certs {
    /// Asks for the Secrets to be read again now.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    fn find(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.to_ascii_lowercase();
        let by_host = self.by_host.read().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = by_host.get(&name) {
            return Some(k.clone());
        }
        let (_, parent) = name.split_once('.')?;
        by_host.get(&format!("*.{parent}")).cloned()
    }
}

/// Picks the certificate by the name the client asked for.
#[derive(Debug)]
struct BySni(Arc<Shared>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certs.find(hello.server_name()?)
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressShared").finish_non_exhaustive()
    }
}

/// The TLS side of the HTTPS listener: HTTP/2 or HTTP/1.1 by ALPN.
pub(super) fn acceptor(shared: Arc<Shared>) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni(shared)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Why a Secret cannot serve TLS.
#[derive(Debug, thiserror::Error)]
pub(super) enum CertError {
    #[error("the Secret has no {0}")]
    Missing(&'static str),
    #[error("tls.crt holds no certificate")]
    NoCertificate,
    #[error("tls.key is not a PEM private key")]
    Key(#[source] rustls::pki_types::pem::Error),
    #[error("tls.key is not a key rustls can sign with")]
    Unsupported(#[source] rustls::Error),
}

/// A Secret's certificate chain and key.
pub(super) fn certified_key(secret: &Secret) -> Result<CertifiedKey, CertError> {
    let data = secret.data.as_ref();
    let get = |k: &'static str| {
        data.and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .ok_or(CertError::Missing(k))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&get("tls.crt")?)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(&get("tls.key")?).map_err(CertError::Key)?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::Unsupported)?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Reads the named Secrets again every [`REFRESH`], or when woken.
pub(super) async fn refresh(client: Client, shared: Arc<Shared>) {
    loop {
        let wanted = shared.routes().tls.clone();
        let before = shared
            .certs
            .by_host
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut by_host = HashMap::new();
        for t in &wanted {
            let api: Api<Secret> = Api::namespaced(client.clone(), &t.namespace);
            let key = match api.get_opt(&t.secret).await {
                Ok(Some(s)) => match certified_key(&s) {
                    Ok(k) => Arc::new(k),
                    Err(e) => {
                        tracing::debug!(secret = %t.secret, error = %e, "unusable TLS secret");
                        continue;
                    }
                },
                Ok(None) => continue,
                Err(e) => {
                    // The API is away, not the Secret: keep serving what was read.
                    tracing::debug!(secret = %t.secret, error = %e, "cannot read a TLS secret");
                    for h in &t.hosts {
                        let h = h.to_ascii_lowercase();
                        if let Some(k) = before.get(&h) {
                            by_host.entry(h).or_insert_with(|| k.clone());
                        }
                    }
                    continue;
                }
            };
            for h in &t.hosts {
                by_host
                    .entry(h.to_ascii_lowercase())
                    .or_insert_with(|| key.clone());
            }
        }
        *shared
            .certs
            .by_host
            .write()
            .unwrap_or_else(|e| e.into_inner()) = by_host;
        let _ = tokio::time::timeout(REFRESH, shared.certs.wake.notified()).await;
    }
}
