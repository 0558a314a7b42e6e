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
    let mut delay = Duration::from_millis(200);
    let mut said = String::new();
    loop {
        match fetch_once(server, token).await {
            Ok(x) => return Ok(x),
            Err(Failure::Refused(e)) => return Err(e),
            Err(Failure::Wait(e)) => {
                let why = format!("{e:#}");
                if why != said {
                    tracing::info!(server, reason = %why, "waiting to join the cluster; retrying");
                    said = why;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
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

async fn fetch_once(server: &str, token: &Token) -> Result<(Bundle, Vec<String>), Failure> {
    let server = server.trim_end_matches('/');
    // The CA is fetched from a server not trusted yet, then checked against the token's
    // hash: a server that answers with another CA is not this cluster's.
    let any = reqwest::Client::builder()
        .use_preconfigured_tls(trust_any()?)
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

fn trust_any() -> Result<rustls::ClientConfig, Failure> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Refused(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
        .with_no_client_auth())
}

/// Accepts any server certificate, for the one request whose answer is checked by
/// other means (the CA, against the token's hash). Signatures are still checked, so the
/// handshake itself is sound.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
