//! Encryption at rest of chosen resources (Secrets, by default), configured by an
//! `EncryptionConfiguration` file as kube-apiserver's `--encryption-provider-config`:
//!
//! ```yaml
//! apiVersion: apiserver.config.k8s.io/v1
//! kind: EncryptionConfiguration
//! resources:
//! - resources: [secrets]
//!   providers:
//!   - aesgcm:
//!       keys:
//!       - {name: key2, secret: <base64 of 16, 24 or 32 bytes>}
//!       - {name: key1, secret: <...>}
//!   - identity: {}
//! ```
//!
//! The first provider of a resource's entry writes; every provider can read, so keys
//! rotate as in Kubernetes: add the new key first (old ones stay to read), restart, write
//! every object again (`kubectl get secrets -A -o json | kubectl replace -f -`), then drop
//! the old key. A value is stored as `k8s:enc:aesgcm:v1:NAME:` + nonce + AES-GCM
//! ciphertext, with the store key as additional data, so a value moved to another key
//! does not decrypt. A value without the prefix is plaintext (written before encryption
//! was configured, or by `identity`).

use std::path::{Path, PathBuf};

use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;

use crate::table::s;

const PREFIX: &[u8] = b"k8s:enc:";

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an EncryptionConfiguration")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "no key named {0:?} to decrypt with: is the encryption configuration missing a key it had?"
    )]
    UnknownKey(String),
    #[error("stored data did not decrypt (damaged, or moved from another key)")]
    Damaged,
    #[error("encryption failed")]
    Seal,
}

enum Provider {
    AesGcm(Vec<(String, LessSafeKey)>),
    Identity,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Provider::AesGcm(keys) => {
                let names: Vec<&str> = keys.iter().map(|(n, _)| n.as_str()).collect();
                f.debug_tuple("AesGcm").field(&names).finish()
            }
            Provider::Identity => f.write_str("Identity"),
        }
    }
}

#[derive(Debug)]
struct Rule {
    /// `secrets`, `deployments.apps`, `*.apps`, `*.*`.
    resources: Vec<String>,
    providers: Vec<Provider>,
}

/// What is encrypted, and with which keys.
#[derive(Debug)]
pub struct Encryption {
    rules: Vec<Rule>,
    rng: SystemRandom,
}

impl Encryption {
    /// Reads an EncryptionConfiguration file.
    pub fn load(path: &Path) -> Result<Self, EncryptionError> {
        let text = std::fs::read_to_string(path).map_err(|source| EncryptionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let doc: Value = serde_yaml::from_str(&text).map_err(|source| EncryptionError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(&doc).map_err(|why| EncryptionError::Invalid {
            path: path.to_path_buf(),
            why,
        })
    }

    fn from_value(doc: &Value) -> Result<Self, String> {
        if s(doc, "/kind") != "EncryptionConfiguration" {
            return Err("kind must be EncryptionConfiguration".into());
        }
        let mut rules = Vec::new();
        for (i, entry) in doc
            .get("resources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let resources: Vec<String> = entry
                .get("resources")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(String::from))
                .collect();
            if resources.is_empty() {
                return Err(format!("resources[{i}].resources is empty"));
            }
            let mut providers = Vec::new();
            for (j, p) in entry
                .get("providers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let at = format!("resources[{i}].providers[{j}]");
                if p.get("identity").is_some() {
                    providers.push(Provider::Identity);
                } else if let Some(g) = p.get("aesgcm") {
                    let mut keys = Vec::new();
                    for k in g
                        .get("keys")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let name = s(k, "/name").to_string();
                        let secret = base64::engine::general_purpose::STANDARD
                            .decode(s(k, "/secret"))
                            .map_err(|_| format!("{at}: key {name:?} is not base64"))?;
                        let alg = match secret.len() {
                            16 => &aead::AES_128_GCM,
                            32 => &aead::AES_256_GCM,
                            n => {
                                return Err(format!(
                                    "{at}: key {name:?} is {n} bytes; AES-GCM takes 16 or 32"
                                ))
                            }
                        };
                        if name.is_empty() || name.contains(':') {
                            return Err(format!("{at}: a key needs a name without ':'"));
                        }
                        let key = UnboundKey::new(alg, &secret)
                            .map_err(|_| format!("{at}: bad key {name:?}"))?;
                        keys.push((name, LessSafeKey::new(key)));
                    }
                    if keys.is_empty() {
                        return Err(format!("{at}: aesgcm needs at least one key"));
                    }
                    providers.push(Provider::AesGcm(keys));
                } else {
                    return Err(format!("{at}: only aesgcm and identity are supported"));
                }
            }
            if providers.is_empty() {
                return Err(format!("resources[{i}].providers is empty"));
            }
            rules.push(Rule {
                resources,
                providers,
            });
        }
        Ok(Self {
            rules,
            rng: SystemRandom::new(),
        })
    }

    /// Writes a configuration that encrypts Secrets under one new random 256-bit key, if
    /// `path` does not exist yet (mode 0600); then loads `path`.
    pub fn load_or_create(path: &Path) -> Result<Self, EncryptionError> {
        if !path.exists() {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| EncryptionError::Seal)?;
            let doc = format!(
                "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      - name: key1\n        secret: {}\n  - identity: {{}}\n",
                base64::engine::general_purpose::STANDARD.encode(key)
            );
            crate::pki::write_private(path, doc.as_bytes()).map_err(|e| {
                EncryptionError::Invalid {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                }
            })?;
        }
        Self::load(path)
    }

    /// The entry that names a resource (`plural` or `plural.group`), if any.
    fn rule_for(&self, qualified: &str) -> Option<&Rule> {
        let group = qualified.split_once('.').map(|(_, g)| g).unwrap_or("");
        self.rules.iter().find(|r| {
            r.resources.iter().any(|x| {
                x == qualified
                    || x == "*.*"
                    || (x.strip_prefix("*.") == Some(group) && !group.is_empty())
                    || (x == "*." && group.is_empty())
            })
        })
    }

    /// What to store for `plain`, a value of resource `qualified` under store key `key`.
    pub fn seal(
        &self,
        qualified: &str,
        key: &[u8],
        plain: Vec<u8>,
    ) -> Result<Vec<u8>, EncryptionError> {
        let Some(Provider::AesGcm(keys)) =
            self.rule_for(qualified).and_then(|r| r.providers.first())
        else {
            return Ok(plain);
        };
        let (name, k) = &keys[0];
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| EncryptionError::Seal)?;
        let mut data = plain;
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key),
            &mut data,
        )
        .map_err(|_| EncryptionError::Seal)?;
        let mut out = format!("k8s:enc:aesgcm:v1:{name}:").into_bytes();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The plaintext of a stored value read at store key `key`.
    pub fn open<'a>(
        &self,
        key: &[u8],
        stored: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, EncryptionError> {
        open_with(&self.rules, key, stored)
    }
}

fn open_with<'a>(
    rules: &[Rule],
    key: &[u8],
    stored: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, EncryptionError> {
    let Some(rest) = stored.strip_prefix(PREFIX) else {
        return Ok(std::borrow::Cow::Borrowed(stored));
    };
    let rest = rest.strip_prefix(b"aesgcm:v1:".as_slice()).ok_or_else(|| {
        EncryptionError::UnknownKey(String::from_utf8_lossy(rest).chars().take(24).collect())
    })?;
    let colon = rest
        .iter()
        .position(|b| *b == b':')
        .ok_or(EncryptionError::Damaged)?;
    let name = String::from_utf8_lossy(&rest[..colon]).into_owned();
    let body = &rest[colon + 1..];
    if body.len() < 12 + 16 {
        return Err(EncryptionError::Damaged);
    }
    let k = rules
        .iter()
        .flat_map(|r| &r.providers)
        .filter_map(|p| match p {
            Provider::AesGcm(keys) => Some(keys),
            Provider::Identity => None,
        })
        .flatten()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| k)
        .ok_or(EncryptionError::UnknownKey(name))?;
    let nonce =
        Nonce::try_assume_unique_for_key(&body[..12]).map_err(|_| EncryptionError::Damaged)?;
    let mut data = body[12..].to_vec();
    let plain = k
        .open_in_place(nonce, Aad::from(key), &mut data)
        .map_err(|_| EncryptionError::Damaged)?;
    let n = plain.len();
    data.truncate(n);
    Ok(std::borrow::Cow::Owned(data))
}

/// Reads a value without any configuration: plaintext passes, ciphertext is an error.
pub fn open_plain<'a>(
    key: &[u8],
    stored: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, EncryptionError> {
    open_with(&[], key, stored)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(keys: &[(&str, u8)]) -> Encryption {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(n, b)| json!({"name": n, "secret": base64::engine::general_purpose::STANDARD.encode([*b; 32])}))
            .collect();
        Encryption::from_value(&json!({"kind": "EncryptionConfiguration", "resources": [
            {"resources": ["secrets"], "providers": [{"aesgcm": {"keys": keys}}, {"identity": {}}]}
        ]}))
        .unwrap()
    }

    #[test]
    fn secrets_are_sealed_and_others_are_not() {
        let e = config(&[("k1", 1)]);
        let sealed = e
            .seal(
                "secrets",
                b"/registry/core/secrets/ns/a",
                b"{\"v\":\"hunter2\"}".to_vec(),
            )
            .unwrap();
        assert!(sealed.starts_with(b"k8s:enc:aesgcm:v1:k1:"));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            &*e.open(b"/registry/core/secrets/ns/a", &sealed).unwrap(),
            b"{\"v\":\"hunter2\"}"
        );
        let plain = e.seal("configmaps", b"k", b"{}".to_vec()).unwrap();
        assert_eq!(plain, b"{}");
        // Plaintext written before encryption still reads.
        assert_eq!(&*e.open(b"k", b"{}").unwrap(), b"{}");
    }

    #[test]
    fn a_value_does_not_open_under_another_key_or_when_damaged() {
        let e = config(&[("k1", 1)]);
        let sealed = e.seal("secrets", b"/a", b"{}".to_vec()).unwrap();
        assert!(matches!(
            e.open(b"/b", &sealed),
            Err(EncryptionError::Damaged)
        ));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(e.open(b"/a", &bad), Err(EncryptionError::Damaged)));
        assert!(matches!(
            open_plain(b"/a", &sealed),
            Err(EncryptionError::UnknownKey(_))
        ));
    }

    #[test]
    fn keys_rotate_new_first_old_still_reads() {
        let old = config(&[("k1", 1)]);
        let sealed_old = old.seal("secrets", b"/a", b"{}".to_vec()).unwrap();
        let rotated = config(&[("k2", 2), ("k1", 1)]);
        assert_eq!(&*rotated.open(b"/a", &sealed_old).unwrap(), b"{}");
        let sealed_new = rotated.seal("secrets", b"/a", b"{}".to_vec()).unwrap();
        assert!(sealed_new.starts_with(b"k8s:enc:aesgcm:v1:k2:"));
        let dropped = config(&[("k2", 2)]);
        assert!(dropped.open(b"/a", &sealed_new).is_ok());
        assert!(
            matches!(dropped.open(b"/a", &sealed_old), Err(EncryptionError::UnknownKey(n)) if n == "k1")
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let bad = |v: Value| Encryption::from_value(&v).unwrap_err();
        assert!(bad(json!({"kind": "Other"})).contains("EncryptionConfiguration"));
        assert!(bad(json!({"kind": "EncryptionConfiguration", "resources": [{"resources": ["secrets"], "providers": [{"aesgcm": {"keys": [{"name": "k", "secret": "c2hvcnQ="}]}}]}]})).contains("16 or 32"));
        assert!(bad(json!({"kind": "EncryptionConfiguration", "resources": [{"resources": ["secrets"], "providers": [{"kms": {}}]}]})).contains("only aesgcm"));
    }

    #[test]
    fn resource_patterns_match_as_kubernetes_matches_them() {
        let e = Encryption::from_value(&json!({"kind": "EncryptionConfiguration", "resources": [
            {"resources": ["*.apps"], "providers": [{"identity": {}}]}]}))
        .unwrap();
        assert!(e.rule_for("deployments.apps").is_some());
        assert!(e.rule_for("secrets").is_none());
    }
}
