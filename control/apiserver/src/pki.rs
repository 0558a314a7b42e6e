//! The cluster's certificates and tokens, made at first start and kept in the data dir.
//!
//! - `ca.crt`, `ca.key`: the cluster CA (ECDSA P-256), which signs the serving certificate.
//! - `apiserver.crt`, `apiserver.key`: the serving certificate, for `localhost`,
//!   `127.0.0.1`, `::1`, the host name and any extra names given.
//! - `tokens`: one bearer token per line, `TOKEN,USER[,GROUP...]` (the static token file
//!   format of kube-apiserver): the admin (`system:masters`), the scheduler, the
//!   controller manager and the local node agent. A component missing from an older file
//!   is added to it.
//! - `service-account.key`: the ECDSA P-256 key ServiceAccount tokens are signed with.
//! - `kubeconfig`: the admin's kubeconfig, with the CA and the admin token.
//!
//! Files holding secrets are written with mode 0600.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use rand::RngCore;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("{path} holds no usable {what}")]
    Malformed { path: PathBuf, what: &'static str },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Who a token belongs to.
pub type User = baton_auth::UserInfo;

/// The users a new token file has: each component's own identity (groups after the
/// name), as kube-apiserver's components each have theirs.
const COMPONENTS: &[&str] = &[
    "admin,system:masters",
    "system:kube-controller-manager",
    "system:kube-scheduler",
    "system:node:local,system:nodes",
];
/// The loaded certificates and tokens.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub admin_token: String,
    tokens: Arc<HashMap<String, User>>,
    signer: Arc<crate::access::tokens::Signer>,
    cert_pem: String,
    key_pem: String,
    ca_key_pem: String,
    /// The API server's client identity toward node agents (`system:apiserver`).
    kubelet_client: (String, String),
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl Pki {
    /// Loads the PKI from `dir`, creating whatever is missing.
    pub fn load_or_create(dir: &Path, extra_names: &[String]) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let ca_crt = dir.join("ca.crt");
        let ca_key = dir.join("ca.key");
        if !ca_crt.exists() || !ca_key.exists() {
            let (cert, key) = baton_store::tls::new_ca("baton-ca")?;
            write_private(&ca_key, key.as_bytes())?;
            fs::write(&ca_crt, cert).map_err(io(&ca_crt))?;
        }
        let ca_pem = fs::read_to_string(&ca_crt).map_err(io(&ca_crt))?;
        let ca_key_pem = fs::read_to_string(&ca_key).map_err(io(&ca_key))?;

        let crt = dir.join("apiserver.crt");
        let key = dir.join("apiserver.key");
        if !crt.exists() || !key.exists() {
            let ca_key = KeyPair::from_pem(&ca_key_pem)?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
            let mut names: Vec<String> = vec![
                "localhost".into(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                "kubernetes.default.svc.cluster.local".into(),
            ];
            if let Ok(h) = fs::read_to_string("/etc/hostname") {
                let h = h.trim();
                if !h.is_empty() {
                    names.push(h.to_string());
                }
            }
            names.extend(extra_names.iter().cloned());
            let mut params = CertificateParams::new(names)?;
            // 10.96.0.1: the `kubernetes` Service, which components reach it by.
            for ip in ["127.0.0.1", "::1", crate::kubernetes_service::CLUSTER_IP] {
                params
                    .subject_alt_names
                    .push(SanType::IpAddress(ip.parse().expect("literal IP")));
            }
            for n in extra_names {
                if let Ok(ip) = n.parse() {
                    params.subject_alt_names.push(SanType::IpAddress(ip));
                }
            }
            params
                .distinguished_name
                .push(DnType::CommonName, "baton-apiserver");
            params.not_after = rcgen::date_time_ymd(2036, 1, 1);
            let serving_key = KeyPair::generate()?;
            let cert = params.signed_by(&serving_key, &issuer)?;
            write_private(&key, serving_key.serialize_pem().as_bytes())?;
            fs::write(&crt, cert.pem()).map_err(io(&crt))?;
        }
        let cert_pem = fs::read_to_string(&crt).map_err(io(&crt))?;
        let key_pem = fs::read_to_string(&key).map_err(io(&key))?;

        let client_crt = dir.join("apiserver-kubelet-client.crt");
        let client_key = dir.join("apiserver-kubelet-client.key");
        if !client_crt.exists() || !client_key.exists() {
            let ca_key = KeyPair::from_pem(&ca_key_pem)?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "system:apiserver");
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            params.not_after = rcgen::date_time_ymd(2036, 1, 1);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write_private(&client_key, key.serialize_pem().as_bytes())?;
            fs::write(&client_crt, cert.pem()).map_err(io(&client_crt))?;
        }
        let kubelet_client = (
            fs::read_to_string(&client_crt).map_err(io(&client_crt))?,
            fs::read_to_string(&client_key).map_err(io(&client_key))?,
        );

        let tokens_path = dir.join("tokens");
        let existing = fs::read_to_string(&tokens_path).unwrap_or_default();
        let mut lines = existing.clone();
        for c in COMPONENTS {
            let user = c.split(',').next().unwrap_or_default();
            let known = existing.lines().any(|l| l.split(',').nth(1) == Some(user));
            if !known {
                if !lines.is_empty() && !lines.ends_with('\n') {
                    lines.push('\n');
                }
                lines.push_str(&format!("{},{c}\n", random_token()));
            }
        }
        if lines != existing {
            write_private(&tokens_path, lines.as_bytes())?;
        }
        let mut tokens = HashMap::new();
        let mut admin_token = None;
        for line in fs::read_to_string(&tokens_path)
            .map_err(io(&tokens_path))?
            .lines()
        {
            let mut parts = line.trim().split(',');
            let (Some(token), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            if token.is_empty() {
                continue;
            }
            let groups: Vec<String> = parts.map(String::from).collect();
            if name == "admin" && admin_token.is_none() {
                admin_token = Some(token.to_string());
            }
            tokens.insert(
                token.to_string(),
                User {
                    name: name.to_string(),
                    groups,
                    ..User::default()
                },
            );
        }
        let admin_token = admin_token.ok_or(PkiError::Malformed {
            path: tokens_path,
            what: "admin token",
        })?;
        let signer = Arc::new(crate::access::tokens::Signer::load_or_create(
            &dir.join("service-account.key"),
        )?);
        Ok(Self {
            dir: dir.to_path_buf(),
            signer,
            ca_pem,
            admin_token,
            tokens: Arc::new(tokens),
            cert_pem,
            key_pem,
            ca_key_pem,
            kubelet_client,
        })
    }

    /// The token of a user (admin, a node, the controllers), if there is one.
    pub fn token_of(&self, name: &str) -> Option<String> {
        self.tokens
            .iter()
            .find(|(_, u)| u.name == name)
            .map(|(t, _)| t.clone())
    }

    pub fn authenticate(&self, token: &str) -> Option<&User> {
        self.tokens.get(token)
    }

    /// The CA's private key (PEM), for the controller that signs approved
    /// CertificateSigningRequests.
    pub fn ca_key_pem(&self) -> &str {
        &self.ca_key_pem
    }

    /// The key ServiceAccount tokens are signed with.
    pub fn service_account_signer(&self) -> Arc<crate::access::tokens::Signer> {
        self.signer.clone()
    }

    /// A client certificate and key for `user` in `groups`, signed by the cluster CA and
    /// valid for `days`: what `baton kubeconfig` gives a teammate.
    pub fn issue_client_certificate(
        &self,
        user: &str,
        groups: &[String],
        days: u32,
    ) -> Result<(String, String), PkiError> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.ca_pem, ca_key)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, g.as_str());
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = std::time::SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A kubeconfig for `user` with a client certificate, naming every API server of
    /// `servers`: the context `baton` the first, `baton-2`, `baton-3`, ... the others,
    /// so that a user whose server is down goes on with `--context baton-2`.
    pub fn kubeconfig_with_certificate(
        &self,
        servers: &[String],
        user: &str,
        cert_pem: &str,
        key_pem: &str,
        namespace: &str,
    ) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let ca = b64(&self.ca_pem);
        let name = |i: usize| match i {
            0 => "baton".to_string(),
            i => format!("baton-{}", i + 1),
        };
        let mut clusters = String::new();
        let mut contexts = String::new();
        for (i, server) in servers.iter().enumerate() {
            let n = name(i);
            clusters.push_str(&format!(
                "- name: {n}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n"
            ));
            contexts.push_str(&format!(
                "- name: {n}\n  context:\n    cluster: {n}\n    user: {user}\n    namespace: {namespace}\n"
            ));
        }
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n{clusters}users:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n{contexts}current-context: baton\n",
            b64(cert_pem),
            b64(key_pem)
        )
    }

    /// The rustls server configuration, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let crt_path = self.dir.join("apiserver.crt");
        let key_path = self.dir.join("apiserver.key");
        let certs: Vec<_> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|_| PkiError::Malformed {
                    path: crt_path.clone(),
                    what: "certificate",
                })?;
        let key = <rustls::pki_types::PrivateKeyDer<'_> as rustls::pki_types::pem::PemObject>::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|_| PkiError::Malformed { path: key_path, what: "private key" })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(self.ca_pem.as_bytes()) {
            let c = c.map_err(|_| PkiError::Malformed {
                path: self.dir.join("ca.crt"),
                what: "CA certificate",
            })?;
            roots.add(c)?;
        }
        // A client certificate is optional (tokens are the other way in), but one that is
        // presented must chain to the cluster CA and be meant for client authentication.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// A serving certificate and key for node agent `node` at `ips`, signed by the CA:
    /// the node's kubelet endpoint serves with it, and presents it to other nodes'
    /// endpoints as `system:node:NODE` when it tunnels Service traffic to them.
    pub fn issue_node_certificate(
        &self,
        node: &str,
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String), PkiError> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.ca_pem, ca_key)?;
        let mut params = CertificateParams::new(vec![node.to_string()])?;
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, format!("system:node:{node}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, baton_auth::NODES);
        // Client too: the node presents it to other nodes for tunnels of Service
        // traffic (baton-node's `tunnel`), as the node it is.
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The TLS client configuration the API server calls node agents with: it trusts the
    /// cluster CA and presents the `system:apiserver` client certificate.
    pub fn kubelet_client_config(&self) -> Result<rustls::ClientConfig, PkiError> {
        let path = self.dir.join("apiserver-kubelet-client.crt");
        let malformed = |what| PkiError::Malformed {
            path: path.clone(),
            what,
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|_| malformed("CA certificate"))?)
                .map_err(|_| malformed("CA certificate"))?;
        }
        let certs: Vec<_> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(self.kubelet_client.0.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|_| malformed("certificate"))?;
        let key = <rustls::pki_types::PrivateKeyDer<'_> as rustls::pki_types::pem::PemObject>::from_pem_slice(self.kubelet_client.1.as_bytes())
            .map_err(|_| malformed("private key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?)
    }

    /// A kubeconfig for `user` against `server` (an https URL).
    pub fn kubeconfig(&self, server: &str, user: &str, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: baton\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: baton\n  context:\n    cluster: baton\n    user: {user}\n    namespace: default\ncurrent-context: baton\n"
        )
    }

    /// Writes the admin kubeconfig to `path` (mode 0600).
    pub fn write_kubeconfig(&self, path: &Path, server: &str) -> Result<(), PkiError> {
        write_private(
            path,
            self.kubeconfig(server, "admin", &self.admin_token)
                .as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), &[]).unwrap();
        let b = Pki::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.admin_token, b.admin_token);
        assert!(a.authenticate(&a.admin_token).is_some());
        assert!(a.authenticate("nope").is_none());
        a.server_config().unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
