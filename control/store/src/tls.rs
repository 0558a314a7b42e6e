//! Mutual TLS between members, and for the store's clients.
//!
//! The store has a CA of its own, as etcd has beside Kubernetes' CA: a certificate the
//! cluster CA signs for a user or a node must not open the store, which holds every
//! Secret and skips validation. [`StoreCa`] makes and loads it (`store-ca.crt`,
//! `store-ca.key`), and issues two kinds of certificate:
//! - a **member** certificate (organisation [`MEMBERS_GROUP`]), for a member's server and
//!   for the Raft and forwarding calls it makes to its peers;
//! - a **client** certificate, for `baton store` and other processes that use the store
//!   API but are not members.
//!
//! A member's server ([`StoreTls::server_config`]) refuses a connection without a
//! certificate from the store CA at the handshake. Raft's routes also require a member
//! certificate: a store client may read and write keys, but not speak for a member.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The organisation of member certificates.
pub const MEMBERS_GROUP: &str = "baton:store-members";

/// How long an issued certificate is good for. Members issue theirs at each start, so a
/// year leaves ample room; the CA outlives them.
const CERT_DAYS: u64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verification cannot be set up")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{what} is not usable PEM")]
    Pem { what: &'static str },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The store's CA: its certificate and, where certificates are issued, its key.
#[derive(Clone)]
pub struct StoreCa {
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for StoreCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCa").finish_non_exhaustive()
    }
}

impl StoreCa {
    /// The file names the CA is kept under in a PKI directory.
    pub const CERT_FILE: &'static str = "store-ca.crt";
    pub const KEY_FILE: &'static str = "store-ca.key";

    /// Loads the CA from `dir`, making one if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let (crt, key) = (dir.join(Self::CERT_FILE), dir.join(Self::KEY_FILE));
        if !crt.exists() || !key.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let ca = Self::generate()?;
            write_private(&key, ca.key_pem.as_bytes())?;
            std::fs::write(&crt, &ca.cert_pem).map_err(io(&crt))?;
        }
        Self::load(dir)
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let (crt, key) = (dir.join(Self::CERT_FILE), dir.join(Self::KEY_FILE));
        let ca = Self {
            cert_pem: std::fs::read_to_string(&crt).map_err(io(&crt))?,
            key_pem: std::fs::read_to_string(&key).map_err(io(&key))?,
        };
        // Fail here, not at the first handshake.
        ca.issuer()?;
        Ok(ca)
    }

    /// Writes the CA into `dir` (the key with mode 0600), where [`StoreCa::load`] finds it.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&dir.join(Self::KEY_FILE), self.key_pem.as_bytes())?;
        let crt = dir.join(Self::CERT_FILE);
        std::fs::write(&crt, &self.cert_pem).map_err(io(&crt))
    }

    /// A new CA, in memory.
    pub fn generate() -> Result<Self, TlsError> {
        let (cert_pem, key_pem) = new_ca("baton-store-ca")?;
        Ok(Self { cert_pem, key_pem })
    }

    fn issuer(&self) -> Result<rcgen::Issuer<'static, KeyPair>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// The TLS identity of member `id` reached at `addrs` (each `host[:port]`): a
    /// certificate good for serving and for calling its peers.
    pub fn member(&self, id: u64, addrs: &[&str]) -> Result<StoreTls, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("baton-store-member-{id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, MEMBERS_GROUP);
        let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        hosts.extend(addrs.iter().map(|a| host_of(a).to_string()));
        hosts.sort();
        hosts.dedup();
        for h in hosts {
            params.subject_alt_names.push(match h.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.as_str().try_into()?),
            });
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params)
    }

    /// A client identity for `name`, which may use the store API but is no member.
    pub fn client(&self, name: &str) -> Result<StoreTls, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<StoreTls, TlsError> {
        let now = std::time::SystemTime::now();
        // An hour of slack for clocks a little behind the issuer's.
        params.not_before = (now - std::time::Duration::from_secs(3600)).into();
        params.not_after = (now + std::time::Duration::from_secs(CERT_DAYS * 86_400)).into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        StoreTls::from_pem(&self.cert_pem, &cert.pem(), &key.serialize_pem())
    }
}

/// A self-signed CA named `common_name`, good until 2036: its certificate and key (PEM).
/// The store CA and the cluster CA are both made so.
pub fn new_ca(common_name: &str) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `host` of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, _)) if !h.contains(':') => h,
        _ => addr,
    }
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// One party's TLS identity toward the store: the store CA it trusts, and its own
/// certificate and key.
#[derive(Clone)]
pub struct StoreTls {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Kept to write the identity out (`baton store` credentials).
    pem: (String, String),
}

impl std::fmt::Debug for StoreTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTls").finish_non_exhaustive()
    }
}

impl StoreTls {
    /// An identity from PEM: the store CA's certificate, then this party's certificate
    /// and private key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let certs = |pem: &str, what| {
            let v = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| TlsError::Pem { what })?;
            if v.is_empty() {
                return Err(TlsError::Pem { what });
            }
            Ok(v)
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::Pem {
            what: "the private key",
        })?;
        Ok(Self {
            ca: certs(ca_pem, "the store CA's certificate")?,
            chain: certs(cert_pem, "the certificate")?,
            key: Arc::new(key),
            pem: (cert_pem.to_string(), key_pem.to_string()),
        })
    }

    /// Reads an identity from three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// The certificate and key, as PEM.
    pub fn cert_and_key_pem(&self) -> (&str, &str) {
        (&self.pem.0, &self.pem.1)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }

    /// A member's server side: a certificate from the store CA is required of every
    /// client, at the handshake.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// The client side: the member's name is checked against the store CA, and this
    /// identity's certificate is presented.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?)
    }
}

/// Whether a verified peer certificate (DER) is a member's.
pub(crate) fn is_member(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    // Bound before it is returned: the iterator borrows `cert`, which ends here.
    let member = cert
        .subject()
        .iter_organization()
        .any(|o| o.as_str() == Ok(MEMBERS_GROUP));
    member
}

/// An HTTP client of members: plain HTTP without an identity (in-process tests), HTTPS
/// with one.
#[derive(Clone, Debug)]
pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    pub(crate) scheme: &'static str,
}

impl Http {
    pub(crate) fn new(
        tls: Option<&StoreTls>,
        tune: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> Result<Self, crate::Error> {
        // No member or store route redirects; without a policy reqwest skips its
        // redirect bookkeeping on every call.
        let mut builder = tune(
            reqwest::Client::builder()
                .tcp_nodelay(true)
                .redirect(reqwest::redirect::Policy::none()),
        );
        let invalid = |e: TlsError| crate::Error::InvalidRequest {
            reason: format!("TLS client configuration: {e}"),
        };
        let (cfg, scheme) = match tls {
            Some(tls) => (tls.client_config().map_err(invalid)?, "https"),
            // A plain client still gets a TLS configuration of its own, which trusts
            // nothing: reqwest would otherwise look for a process-wide crypto provider.
            None => (
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(e.into()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
                "http",
            ),
        };
        builder = builder.use_preconfigured_tls(cfg);
        let client = builder.build().map_err(|source| crate::Error::Transport {
            addr: "(client)".into(),
            source,
        })?;
        Ok(Self { client, scheme })
    }

    pub(crate) fn url(&self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_addresses() {
        assert_eq!(host_of("127.0.0.1:2380"), "127.0.0.1");
        assert_eq!(host_of("[::1]:2380"), "::1");
        assert_eq!(host_of("store.example:2380"), "store.example");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn members_and_clients_are_told_apart() {
        let ca = StoreCa::generate().unwrap();
        let member = ca.member(1, &["10.1.0.2:2380"]).unwrap();
        let client = ca.client("admin").unwrap();
        assert!(is_member(&member.chain[0]));
        assert!(!is_member(&client.chain[0]));
        member.server_config().unwrap();
        client.client_config().unwrap();
    }

    #[test]
    fn the_ca_is_made_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = StoreCa::load_or_create(dir.path()).unwrap();
        let b = StoreCa::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cert_pem, b.cert_pem);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(StoreCa::KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
