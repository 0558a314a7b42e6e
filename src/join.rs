//! `baton server --server URL --token TOKEN`: the joiner's side of
//! [`baton_apiserver::join`]. It checks the server's CA against the token, fetches the
//! cluster's shared keys and the store members' addresses, and installs the keys in this
//! member's `pki` directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use baton_apiserver::join::{Bundle, JoinAnswer, Token, MAX_BUNDLE_BYTES};

/// Why a join attempt failed: worth another try, or not.
enum Failure {
    /// The server is not there yet, or not ready: try again.
    Wait(anyhow::Error),
    /// The token or the server is wrong: trying again cannot help.
    Refused(anyhow::Error),
}

/// Fetches the cluster's keys and its store members from `server`, retrying while the
/// server is not up or not ready (members may start in any order), and saying why it
/// waits. Stops at once if the server's CA is not the token's or it refuses the token.
pub async fn fetch(server: &str, token: &Token) -> Result<(Bundle, Vec<String>)> {
    retrying("join the cluster", || fetch_once(server, token)).await
}

/// Retries `step` while it says to wait, saying why once per reason; stops on a refusal.
async fn retrying<T, F, Fut>(what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut delay = Duration::from_millis(200);
    let mut said = String::new();
    loop {
        match step().await {
            Ok(x) => return Ok(x),
            Err(Failure::Refused(e)) => return Err(e),
            Err(Failure::Wait(e)) => {
                let why = format!("{e:#}");
                if why != said {
                    tracing::info!(reason = %why, "waiting to {what}; retrying");
                    said = why;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A node's kubeconfig, as Kubernetes' TLS bootstrap makes it: the token (the cluster's,
/// or a bootstrap token from `baton token create`) asks for a client certificate for
/// `system:node:NAME` through a CertificateSigningRequest, which the controller manager
/// approves and signs; the kubeconfig names `server`, the CA and that certificate.
pub async fn node_kubeconfig(server: &str, token: &Token, name: &str) -> Result<String> {
    let server = server.trim_end_matches('/');
    let ca = retrying("reach the cluster", || fetch_ca(server, token)).await?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(trust_only(&ca).map_err(|_| anyhow::anyhow!("unusable CA"))?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let (key, request) = node_client_request(name)?;
    let csrs = format!("{server}/apis/certificates.k8s.io/v1/certificatesigningrequests");
    let body = serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"generateName": format!("node-csr-{name}-")},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(&request),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "key encipherment", "client auth"],
        },
    });
    let created: serde_json::Value = retrying("ask for the node's certificate", || {
        let (http, csrs, body) = (&http, &csrs, &body);
        async move {
            let resp = http
                .post(csrs)
                .bearer_auth(token.secret())
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            answer(resp, "the token was refused: it is not this cluster's, or it has expired or been deleted").await
        }
    })
    .await?;
    let csr_name = created
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .context("the created request has no name")?
        .to_string();
    let url = format!("{csrs}/{csr_name}");
    let cert = retrying("get the node's certificate signed", || {
        let (http, url, csr_name) = (&http, &url, &csr_name);
        async move {
            let resp = http.get(url).bearer_auth(token.secret()).send().await;
            let csr = answer(resp, "the token was refused while the request waited").await?;
            let conditions = csr
                .pointer("/status/conditions")
                .and_then(|c| c.as_array())
                .cloned()
                .unwrap_or_default();
            for c in conditions {
                let kind = c.get("type").and_then(|t| t.as_str()).unwrap_or_default();
                if kind == "Denied" || kind == "Failed" {
                    let msg = c
                        .get("message")
                        .and_then(|m| m.as_str())
                        .unwrap_or_default();
                    return Err(Failure::Refused(anyhow::anyhow!(
                        "CertificateSigningRequest {csr_name} was {}: {msg}",
                        kind.to_lowercase()
                    )));
                }
            }
            let b64 = csr
                .pointer("/status/certificate")
                .and_then(|c| c.as_str())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    Failure::Wait(anyhow::anyhow!(
                        "CertificateSigningRequest {csr_name} is not signed yet"
                    ))
                })?;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| Failure::Refused(e.into()))
        }
    })
    .await?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: baton\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: system:node:{name}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: baton\n  context:\n    cluster: baton\n    user: system:node:{name}\ncurrent-context: baton\n",
        b64(&ca),
        b64(&cert),
        b64(key.serialize_pem().as_bytes()),
    ))
}

/// A new key, and a certificate request for node `name`'s client identity
/// (`system:node:NAME` in `system:nodes`), PEM: what a joining or renewing node signs.
pub fn node_client_request(name: &str) -> Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let request = params.serialize_request(&key)?.pem()?;
    Ok((key, request))
}

/// The JSON of a successful answer; a 401 or 403 refuses with `refused`, anything else
/// waits.
async fn answer(
    resp: reqwest::Result<reqwest::Response>,
    refused: &str,
) -> Result<serde_json::Value, Failure> {
    if let Ok(r) = &resp {
        if matches!(r.status().as_u16(), 401 | 403) {
            return Err(Failure::Refused(anyhow::anyhow!("{refused}")));
        }
    }
    let body = read_bounded(resp, 1 << 20).await.map_err(Failure::Wait)?;
    serde_json::from_slice(&body).map_err(|e| Failure::Wait(e.into()))
}

/// Installs `bundle` in `pki_dir`, after checking that its CA is the token's.
pub fn install(bundle: &Bundle, token: &Token, pki_dir: &Path) -> Result<()> {
    let ca = bundle
        .0
        .get("ca.crt")
        .context("the cluster's bundle holds no CA")?;
    if !token.verifies_ca(ca) {
        bail!("the cluster's bundle holds another CA than the token names");
    }
    bundle.write(pki_dir).with_context(|| {
        format!(
            "failed to write the cluster's keys to {}",
            pki_dir.display()
        )
    })
}

/// The CA of the cluster behind `server`, fetched without trusting the server and
/// checked against the token's hash: a server that answers with another CA is not this
/// cluster's.
async fn fetch_ca(server: &str, token: &Token) -> Result<Vec<u8>, Failure> {
    // The token's secret goes to the server next: never in the clear.
    if !server.starts_with("https://") {
        return Err(Failure::Refused(anyhow::anyhow!(
            "{server}: the server must be an https:// URL"
        )));
    }
    let any = reqwest::Client::builder()
        .use_preconfigured_tls(trust_any())
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::Refused(e.into()))?;
    let ca = read_bounded(any.get(format!("{server}/cacerts")).send().await, 64 << 10)
        .await
        .map_err(|e| Failure::Wait(e.context(format!("fetching {server}/cacerts"))))?;
    if !token.verifies_ca(&ca) {
        return Err(Failure::Refused(anyhow::anyhow!(
            "the server at {server} has another CA than the token names: a wrong server, or a wrong token"
        )));
    }
    Ok(ca)
}

async fn fetch_once(server: &str, token: &Token) -> Result<(Bundle, Vec<String>), Failure> {
    let server = server.trim_end_matches('/');
    let ca = fetch_ca(server, token).await?;
    let trusted = reqwest::Client::builder()
        .use_preconfigured_tls(trust_only(&ca)?)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::Refused(e.into()))?;
    let resp = trusted
        .get(format!("{server}/baton/v1/join"))
        .bearer_auth(token.secret())
        .send()
        .await;
    if let Ok(r) = &resp {
        if r.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Failure::Refused(anyhow::anyhow!(
                "the server at {server} refused the token: it is not this cluster's"
            )));
        }
    }
    let body = read_bounded(resp, 2 * MAX_BUNDLE_BYTES)
        .await
        .map_err(|e| Failure::Wait(e.context(format!("joining through {server}"))))?;
    let answer: JoinAnswer = serde_json::from_slice(&body)
        .map_err(|e| Failure::Wait(anyhow::Error::from(e).context("an unreadable join answer")))?;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(answer.bundle)
        .map_err(|e| Failure::Wait(e.into()))?;
    let bundle = Bundle::open(&sealed, token).map_err(|e| Failure::Refused(e.into()))?;
    Ok((bundle, answer.members))
}

/// The body of a successful answer, read up to `limit` bytes.
async fn read_bounded(resp: reqwest::Result<reqwest::Response>, limit: usize) -> Result<Vec<u8>> {
    let mut resp = resp?;
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            bail!("the answer is larger than {limit} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)])
        );
    }
    Ok(body)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn trust_only(ca_pem: &[u8]) -> Result<rustls::ClientConfig, Failure> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| Failure::Refused(anyhow::anyhow!("the CA is not PEM: {e:?}")))?;
        roots
            .add(c)
            .map_err(|e| Failure::Refused(anyhow::anyhow!("the CA is unusable: {e}")))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Refused(e.into()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A TLS client that accepts any server certificate, for the one request whose answer
/// is checked by other means (the CA, against the token's hash). Signatures are still
/// checked, so the handshake itself is sound.
fn trust_any() -> rustls::ClientConfig {
    (*baton_node::probe::insecure_tls()).clone()
}
