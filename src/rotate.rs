//! A node's client certificate, renewed before it expires, as the kubelet rotates its
//! own (`--rotate-certificates`).
//!
//! The node acts through one [`kube::Client`] that every loop of it shares. Its requests
//! go through [`Rotating`], which hands each one to the client of the current
//! certificate; a renewal swaps that client in place, so no loop restarts and no watch is
//! cut short by it (a watch already open goes on over its connection).
//!
//! When between 70% and 90% of the certificate's life has passed (a point picked at
//! random, so that nodes joined together do not renew together), the node asks for a new
//! one with a CertificateSigningRequest made as itself, which the controller manager
//! approves as a renewal. The new kubeconfig is written to `DATA/node-kubeconfig` before
//! it is used, so a node that restarts starts with it. A renewal that fails is tried
//! again a minute later, and said in the log.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use base64::Engine;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{Api, PostParams};

/// The client of the current certificate, swapped when it is renewed.
#[derive(Clone)]
pub struct Rotating(Arc<RwLock<kube::Client>>);

impl Rotating {
    pub fn new(client: kube::Client) -> Self {
        Self(Arc::new(RwLock::new(client)))
    }

    /// A client whose every request uses the certificate of the moment.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn swap(&self, client: kube::Client) {
        *self.0.write().expect("client lock") = client;
    }

    fn current(&self) -> kube::Client {
        self.0.read().expect("client lock").clone()
    }
}

impl tower::Service<http::Request<kube::client::Body>> for Rotating {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let client = self.current();
        Box::pin(async move { client.send(req).await })
    }
}

/// When the client certificate of kubeconfig `yaml` was issued and when it expires.
pub fn validity(yaml: &str) -> Result<(SystemTime, SystemTime)> {
    let data = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-certificate-data:"))
        .context("the kubeconfig has no client certificate")?
        .trim();
    let pem = base64::engine::general_purpose::STANDARD
        .decode(data)
        .context("the kubeconfig's client certificate is not base64")?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| anyhow::anyhow!("the kubeconfig's client certificate is not PEM"))?;
    let cert = pem
        .parse_x509()
        .context("the kubeconfig's client certificate does not parse")?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let v = cert.validity();
    Ok((at(v.not_before), at(v.not_after)))
}

/// How long from `now` until a certificate valid from `from` to `to` is renewed: when
/// `fraction` (0.7 to 0.9) of its life has passed; at once if that is past.
pub fn renew_in(from: SystemTime, to: SystemTime, now: SystemTime, fraction: f64) -> Duration {
    let life = to.duration_since(from).unwrap_or_default();
    let at = from + life.mul_f64(fraction.clamp(0.0, 1.0));
    at.duration_since(now).unwrap_or_default()
}

/// Renews the certificate of the kubeconfig at `path` before it expires, for as long as
/// the node runs: each renewal is written to `path`, then swapped into `rotating`.
/// `renew` asks for the new kubeconfig with the current client.
pub async fn keep_fresh<F, Fut>(rotating: Rotating, path: PathBuf, mut renew: F)
where
    F: FnMut(kube::Client, String) -> Fut,
    Fut: Future<Output = Result<String>>,
{
    loop {
        let wait = std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|yaml| validity(&yaml).map(|v| (yaml, v)));
        let (yaml, (from, to)) = match wait {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), path = %path.display(), "cannot read the node's certificate to renew it");
                return;
            }
        };
        let fraction = 0.7 + rand::random::<f64>() * 0.2;
        let delay = renew_in(from, to, SystemTime::now(), fraction);
        tracing::info!(
            in_secs = delay.as_secs(),
            "the node's client certificate is renewed"
        );
        tokio::time::sleep(delay).await;
        let renewed = async {
            let new = renew(rotating.current(), yaml).await?;
            let client = baton_kube::client::multiplexed_from_yaml(&new).await?;
            std::fs::write(&path, &new)
                .with_context(|| format!("failed to write {}", path.display()))?;
            rotating.swap(client);
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match renewed {
            Ok(()) => tracing::info!("renewed the node's client certificate"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "renewing the node's client certificate failed; trying again in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// A new kubeconfig for node `name`: `yaml` with a certificate from a
/// CertificateSigningRequest the node makes as itself, with a new key.
pub async fn renew(client: kube::Client, yaml: String, name: String) -> Result<String> {
    let (key, request) = crate::join::node_client_request(&name)?;
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("node-csr-{name}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(request.into_bytes()),
            signer_name: "kubernetes.io/kube-apiserver-client-kubelet".into(),
            usages: Some(
                ["digital signature", "key encipherment", "client auth"]
                    .map(String::from)
                    .to_vec(),
            ),
            ..Default::default()
        },
        status: None,
    };
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    let made = csrs
        .create(&PostParams::default(), &csr)
        .await
        .context("failed to ask for a new certificate")?;
    let csr_name = made.metadata.name.unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let cert = loop {
        let got = csrs.get(&csr_name).await?;
        let status = got.status.unwrap_or_default();
        if let Some(c) = status
            .conditions
            .unwrap_or_default()
            .iter()
            .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
        {
            bail!(
                "CertificateSigningRequest {csr_name} was {}: {}",
                c.type_.to_lowercase(),
                c.message.clone().unwrap_or_default()
            );
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            break String::from_utf8(cert.0).context("the issued certificate is not PEM")?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("CertificateSigningRequest {csr_name} was not signed within 5 minutes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    Ok(baton_kube::client::kubeconfig_with_client_certificate(
        &yaml,
        &cert,
        &key.serialize_pem(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubeconfig whose client certificate lives from `from` for `life`.
    fn kubeconfig(from: SystemTime, life: Duration) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.not_before = from.into();
        p.not_after = (from + life).into();
        let cert = p.self_signed(&key).unwrap();
        let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            b64(cert.pem()),
            b64(key.serialize_pem())
        )
    }

    #[test]
    fn the_life_of_a_kubeconfigs_certificate_is_read() {
        let from = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let yaml = kubeconfig(from, Duration::from_secs(600));
        assert_eq!(
            validity(&yaml).unwrap(),
            (from, from + Duration::from_secs(600))
        );
        assert!(validity("users: []").is_err());
        assert!(validity("    client-certificate-data: bm90IGEgY2VydA==").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_is_renewed_before_it_expires_and_kept() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-kubeconfig");
        // 95% of its life spent: renewed at once.
        let now = SystemTime::now();
        let first = kubeconfig(now - Duration::from_secs(950), Duration::from_secs(1000));
        std::fs::write(&path, &first).unwrap();
        let rotating = Rotating::new(baton_kube::client::from_yaml(&first).await.unwrap());
        let asked: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let issued: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let task = tokio::spawn(keep_fresh(rotating, path.clone(), {
            let (asked, issued) = (asked.clone(), issued.clone());
            move |_client, yaml| {
                let (asked, issued) = (asked.clone(), issued.clone());
                async move {
                    asked.lock().unwrap().push(yaml);
                    let new = kubeconfig(SystemTime::now(), Duration::from_secs(1000));
                    issued.lock().unwrap().push(new.clone());
                    Ok(new)
                }
            }
        }));
        baton_testkit::wait_until_async(Duration::from_secs(3600), "two renewals", || {
            let n = asked.lock().unwrap().len();
            async move { (n >= 2).then_some(()) }
        })
        .await
        .unwrap();
        task.abort();
        let (asked, issued) = (asked.lock().unwrap(), issued.lock().unwrap());
        // The first renewal was asked with the old certificate, the second with the new
        // one, which was kept on disk in between.
        assert_eq!(asked[0], first);
        assert_eq!(asked[1], issued[0]);
        let kept = std::fs::read_to_string(&path).unwrap();
        assert!(
            issued.contains(&kept),
            "the newest certificate is kept on disk"
        );
    }

    #[test]
    fn renewal_falls_between_seventy_and_ninety_percent_of_the_life() {
        let from = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let to = from + Duration::from_secs(1_000);
        assert_eq!(renew_in(from, to, from, 0.7), Duration::from_secs(700));
        assert_eq!(
            renew_in(from, to, from + Duration::from_secs(100), 0.9),
            Duration::from_secs(800)
        );
        // Past the point (a node that was off): at once.
        assert_eq!(
            renew_in(from, to, from + Duration::from_secs(950), 0.7),
            Duration::ZERO
        );
    }
}
