//! Joining a cluster with one token, as k3s does.
//!
//! The first member makes the **cluster token**, `baton1::HASH::SECRET`: HASH is the
//! SHA-256 of the cluster CA's certificate (PEM), so that a joiner can check the server it
//! first talks to before trusting it, and SECRET is 32 random bytes.
//!
//! The files that make the cluster one identity (the [`BUNDLE_FILES`]: the cluster CA,
//! the ServiceAccount signing key, the API server's client certificate toward nodes, the
//! static tokens, the store CA, the encryption configuration) are kept in the store as
//! one **bundle**, sealed with AES-256-GCM under a key derived from SECRET: whoever reads
//! the store without the token learns nothing from it.
//!
//! Nodes join with the **node token** ([`Token::node_token`]): the same hash, and a
//! secret derived from SECRET one way, which the API server takes as a bootstrap token
//! (a node's first certificate) and nothing more.
//!
//! A joiner fetches `/cacerts` without trusting the server, checks its hash against the
//! token, then asks `/baton/v1/join` over TLS verified by that CA, with SECRET as its
//! bearer token. The answer carries the sealed bundle and the store members' addresses;
//! the joiner opens the bundle with its token, writes the files, issues itself a member
//! certificate from the store CA and joins the store. Each member keeps its own serving
//! certificate, for its own addresses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;
use ring::aead;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Where the sealed bundle is kept in the store.
pub const BUNDLE_KEY: &str = "/baton/cluster/bundle";

/// The files of a member's `pki` directory that are one set for the whole cluster.
pub const BUNDLE_FILES: &[&str] = &[
    "ca.crt",
    "ca.key",
    "service-account.key",
    "apiserver-kubelet-client.crt",
    "apiserver-kubelet-client.key",
    "tokens",
    "store-ca.crt",
    "store-ca.key",
    "encryption-config.yaml",
];

const PREFIX: &str = "baton1";
/// Bounds what a joiner reads from a server it does not trust yet.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("not a cluster token: expected baton1::<64 hex digits>::<secret>")]
    Malformed,
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the bundle cannot be opened with this token: it belongs to another cluster, or the token is wrong")]
    WrongToken,
    #[error("the bundle is malformed")]
    Bundle(#[source] serde_json::Error),
    #[error("the bundle's file {0} is not base64")]
    BundleEncoding(String),
    #[error("the bundle names a file that is not part of a cluster's identity: {0}")]
    UnknownFile(String),
    #[error(transparent)]
    Write(#[from] crate::pki::PkiError),
    #[error("{path} belongs to another cluster: its CA does not match the token's")]
    OtherCluster { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JoinError + '_ {
    move |source| JoinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cluster token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    ca_hash: [u8; 32],
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: tokens end up in logs through Debug.
        f.debug_struct("Token")
            .field("ca_hash", &hex(&self.ca_hash))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}::{}::{}", hex(&self.ca_hash), self.secret)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The hash a token carries for a CA certificate (PEM, as served by `/cacerts`).
pub fn ca_hash(ca_pem: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(ca_pem).into()
}

impl Token {
    /// A new token for the cluster whose CA is `ca_pem`, with `secret` or a random one.
    pub fn new(ca_pem: &str, secret: Option<&str>) -> Self {
        let secret = secret.map(String::from).unwrap_or_else(|| {
            let mut b = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut b);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        });
        Self {
            ca_hash: ca_hash(ca_pem.as_bytes()),
            secret,
        }
    }

    pub fn parse(s: &str) -> Result<Self, JoinError> {
        let mut parts = s.trim().splitn(3, "::");
        let (Some(PREFIX), Some(hash), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(JoinError::Malformed);
        };
        if hash.len() != 64 || secret.len() < 16 || secret.chars().any(char::is_whitespace) {
            return Err(JoinError::Malformed);
        }
        let mut ca_hash = [0u8; 32];
        for (i, byte) in ca_hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16)
                .map_err(|_| JoinError::Malformed)?;
        }
        Ok(Self {
            ca_hash,
            secret: secret.to_string(),
        })
    }

    /// The token kept at `path`, or a new one for `ca_pem` written there (mode 0600).
    /// A kept token for another CA is refused: the data dir is another cluster's.
    pub fn load_or_create(path: &Path, ca_pem: &str) -> Result<Self, JoinError> {
        if path.exists() {
            let t = Self::parse(&std::fs::read_to_string(path).map_err(io(path))?)?;
            if !t.verifies_ca(ca_pem.as_bytes()) {
                return Err(JoinError::OtherCluster {
                    path: path.to_path_buf(),
                });
            }
            return Ok(t);
        }
        let t = Self::new(ca_pem, None);
        t.save(path)?;
        Ok(t)
    }

    /// Writes the token to `path`, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), JoinError> {
        Ok(crate::pki::write_private(
            path,
            format!("{self}\n").as_bytes(),
        )?)
    }

    /// Whether `ca_pem` is the CA this token names.
    pub fn verifies_ca(&self, ca_pem: &[u8]) -> bool {
        ca_hash(ca_pem) == self.ca_hash
    }

    /// The secret, as a joiner presents it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether a presented secret is this token's. Both sides are hashed first, so the
    /// comparison's time says nothing about how much of the secret was right.
    pub fn admits(&self, presented: &str) -> bool {
        sha2::Sha256::digest(presented.as_bytes()) == sha2::Sha256::digest(self.secret.as_bytes())
    }

    /// The node token: the same CA hash, with a secret derived from this one. It joins
    /// nodes (it is a bootstrap token's credential) but cannot join servers or open the
    /// bundle, and this token's secret cannot be worked back from it: a node that leaks
    /// its token gives away no server's keys.
    pub fn node_token(&self) -> Token {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
        let tag = ring::hmac::sign(&key, b"baton node token v1");
        Token {
            ca_hash: self.ca_hash,
            secret: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref()),
        }
    }

    fn key(&self) -> aead::LessSafeKey {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"baton cluster bundle v1");
        let prk = salt.extract(self.secret.as_bytes());
        let okm = prk
            .expand(&[b"aes-256-gcm"], &aead::AES_256_GCM)
            .expect("32 bytes are within HKDF-SHA256's output limit");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }
}

/// The cluster's shared files, by name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bundle(pub BTreeMap<String, Vec<u8>>);

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Bundle {
    /// The [`BUNDLE_FILES`] present in `pki_dir`.
    pub fn read(pki_dir: &Path) -> Result<Self, JoinError> {
        let mut files = BTreeMap::new();
        for name in BUNDLE_FILES {
            let path = pki_dir.join(name);
            match std::fs::read(&path) {
                Ok(s) => {
                    files.insert(name.to_string(), s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(Self(files))
    }

    /// Writes the files into `pki_dir`, each readable by its owner only. Only the names
    /// of [`BUNDLE_FILES`] are written: a bundle cannot name a path of its own.
    pub fn write(&self, pki_dir: &Path) -> Result<(), JoinError> {
        std::fs::create_dir_all(pki_dir).map_err(io(pki_dir))?;
        for (name, content) in &self.0 {
            let Some(known) = BUNDLE_FILES.iter().find(|f| **f == name.as_str()) else {
                return Err(JoinError::UnknownFile(name.clone()));
            };
            let path = pki_dir.join(known);
            crate::pki::write_private(&path, content)?;
        }
        Ok(())
    }

    /// The bundle sealed under `token`: a random nonce, then the ciphertext and tag.
    pub fn seal(&self, token: &Token) -> Vec<u8> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        // Files are base64 in the sealed JSON: keys are binary (DER) as often as PEM.
        let b64 = base64::engine::general_purpose::STANDARD;
        let files: BTreeMap<&str, String> = self
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), b64.encode(v)))
            .collect();
        let mut data = serde_json::to_vec(&files).expect("a map of strings serialises");
        token
            .key()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(PREFIX.as_bytes()),
                &mut data,
            )
            .expect("a bundle is far below AES-GCM's length limit");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        out
    }

    /// Opens what [`Bundle::seal`] made with the same token.
    pub fn open(sealed: &[u8], token: &Token) -> Result<Self, JoinError> {
        if sealed.len() < aead::NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err(JoinError::WrongToken);
        }
        let (nonce, rest) = sealed.split_at(aead::NONCE_LEN);
        let nonce =
            aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| JoinError::WrongToken)?;
        let mut data = rest.to_vec();
        let plain = token
            .key()
            .open_in_place(nonce, aead::Aad::from(PREFIX.as_bytes()), &mut data)
            .map_err(|_| JoinError::WrongToken)?;
        let files: BTreeMap<String, String> =
            serde_json::from_slice(plain).map_err(JoinError::Bundle)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        files
            .into_iter()
            .map(|(k, v)| match b64.decode(v) {
                Ok(v) => Ok((k, v)),
                Err(_) => Err(JoinError::BundleEncoding(k)),
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// What `/baton/v1/join` answers a joiner that presented the token's secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinAnswer {
    /// The sealed bundle, base64.
    pub bundle: String,
    /// The store members' addresses (`host:port`), to join the store through.
    pub members: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_names_its_ca() {
        let t = Token::new("CA PEM", None);
        let back = Token::parse(&t.to_string()).unwrap();
        assert_eq!(back, t);
        assert!(back.verifies_ca(b"CA PEM"));
        assert!(!back.verifies_ca(b"another CA"));
        assert!(back.admits(t.secret()));
        assert!(!back.admits("guess"));
        assert!(
            !format!("{t:?}").contains(t.secret()),
            "Debug shows the secret"
        );
        for bad in [
            "",
            "baton1::abc::secretsecretsecret",
            "k10::0000000000000000000000000000000000000000000000000000000000000000::secretsecretsecret",
            "baton1::zz00000000000000000000000000000000000000000000000000000000000000::secretsecretsecret",
            "baton1::0000000000000000000000000000000000000000000000000000000000000000::short",
        ] {
            assert!(Token::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_bundle_opens_only_with_its_token() {
        let t = Token::new("CA", None);
        let mut b = Bundle::default();
        b.0.insert("ca.key".into(), b"KEY".to_vec());
        b.0.insert("service-account.key".into(), vec![0x30, 0x82, 0xff, 0x00]);
        let sealed = b.seal(&t);
        assert!(!String::from_utf8_lossy(&sealed).contains("KEY"));
        assert_eq!(Bundle::open(&sealed, &t).unwrap(), b);
        let other = Token::new("CA", None);
        assert!(matches!(
            Bundle::open(&sealed, &other),
            Err(JoinError::WrongToken)
        ));
        assert!(Bundle::open(&sealed[..10], &t).is_err());
    }

    #[test]
    fn a_bundle_writes_only_the_files_it_may() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Bundle::default();
        b.0.insert("../escape".into(), b"x".to_vec());
        assert!(matches!(
            b.write(dir.path()),
            Err(JoinError::UnknownFile(_))
        ));
        assert!(!dir.path().parent().unwrap().join("escape").exists());
        let mut b = Bundle::default();
        b.0.insert("tokens".into(), b"t,admin".to_vec());
        b.write(dir.path()).unwrap();
        assert_eq!(Bundle::read(dir.path()).unwrap(), b);
    }

    #[test]
    fn a_kept_token_for_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let t = Token::load_or_create(&path, "CA one").unwrap();
        assert_eq!(Token::load_or_create(&path, "CA one").unwrap(), t);
        assert!(matches!(
            Token::load_or_create(&path, "CA two"),
            Err(JoinError::OtherCluster { .. })
        ));
    }
}
