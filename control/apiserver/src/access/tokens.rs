//! ServiceAccount tokens: JWTs (ES256) signed by the cluster's key, as kube-apiserver's
//! bound service account tokens.
//!
//! - TokenRequest (`POST .../serviceaccounts/NAME/token`, `kubectl create token`) issues
//!   one, for audiences (the issuer by default) and a lifetime (an hour by default, at
//!   least ten minutes, at most a day), optionally bound to a pod;
//! - a token authenticates while its signature, issuer, audience and times hold, its
//!   ServiceAccount still exists with the same uid, and the pod it is bound to still
//!   exists with the same uid: deleting the pod revokes the token;
//! - TokenReview asks the same question over the API;
//! - the OIDC discovery document and the JWKS (`/.well-known/openid-configuration`,
//!   `/openid/v1/jwks`) let another system check tokens without calling the API.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use baton_auth::UserInfo;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use serde_json::{json, Value};
use sha2::Digest;

use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::Objects;
use crate::resources;
use crate::table::{s, strings};

/// The issuer every token names, and the audience of tokens that name none: the
/// in-cluster address of the API, as Kubernetes' default.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const DEFAULT_SECONDS: i64 = 3600;
const MIN_SECONDS: i64 = 600;
const MAX_SECONDS: i64 = 24 * 3600;
/// A token longer than this is not one of ours (and is not parsed).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The key tokens are signed with.
pub struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish()
    }
}

impl Signer {
    /// Loads the signing key from `path` (PKCS#8), creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, crate::pki::PkiError> {
        let rng = SystemRandom::new();
        let malformed = || crate::pki::PkiError::Malformed {
            path: path.to_path_buf(),
            what: "service account signing key",
        };
        if !path.exists() {
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| malformed())?;
            crate::pki::write_private(path, pkcs8.as_ref())?;
        }
        let der = std::fs::read(path).map_err(|source| crate::pki::PkiError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|_| malformed())?;
        let kid = B64.encode(sha2::Sha256::digest(key.public_key().as_ref()));
        Ok(Self { key, kid, rng })
    }

    fn sign(&self, claims: &Value) -> ApiResult<String> {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| ApiError::internal("signing the token failed"))?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// The claims of a token this key signed, if the signature holds.
    fn verify(&self, token: &str) -> Option<Value> {
        if token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let (input, sig) = token.rsplit_once('.')?;
        let (header, claims) = input.split_once('.')?;
        let header: Value = serde_json::from_slice(&B64.decode(header).ok()?).ok()?;
        if header.get("alg").and_then(Value::as_str) != Some("ES256") {
            return None;
        }
        let public = UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        public
            .verify(input.as_bytes(), &B64.decode(sig).ok()?)
            .ok()?;
        serde_json::from_slice(&B64.decode(claims).ok()?).ok()
    }

    /// The public key as a JWKS.
    pub fn jwks(&self) -> Value {
        // An uncompressed P-256 point: 0x04, then x and y of 32 bytes each.
        let point = self.key.public_key().as_ref();
        json!({"keys": [{
            "use": "sig", "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": self.kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]})
    }
}

/// The OIDC discovery document, pointing at the JWKS under `issuer`.
pub fn openid_configuration() -> Value {
    json!({
        "issuer": ISSUER,
        "jwks_uri": format!("{ISSUER}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rfc3339(secs: i64) -> String {
    k8s_openapi::chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Answers a TokenRequest for ServiceAccount `ns/name`: the request echoed with its
/// defaults and a `status` holding the token.
///
/// A node (`node`) may ask only for tokens bound to a pod bound to it, as
/// NodeRestriction holds it: a node taken over cannot mint free-standing tokens for the
/// accounts its pods run as.
pub async fn request(
    objects: &Objects,
    ns: &str,
    name: &str,
    body: &Value,
    node: Option<&str>,
) -> ApiResult<Value> {
    let signer = objects.access.signer()?;
    let sas = resources::builtin("ServiceAccount");
    let sa = objects.get_known(sas, Some(ns), name).await?;
    let mut spec = body.get("spec").cloned().unwrap_or(json!({}));
    let seconds = match spec.get("expirationSeconds").and_then(Value::as_i64) {
        None => DEFAULT_SECONDS,
        Some(s) if s < MIN_SECONDS => {
            return Err(ApiError::Invalid {
                group: "authentication.k8s.io".into(),
                kind: "TokenRequest".into(),
                name: name.into(),
                causes: vec![FieldError::invalid(
                    "spec.expirationSeconds",
                    &s.to_string(),
                    "may not specify a duration less than 10 minutes",
                )],
            })
        }
        Some(s) => s.min(MAX_SECONDS),
    };
    spec["expirationSeconds"] = json!(seconds);
    let mut audiences = strings(spec.get("audiences"));
    if audiences.is_empty() {
        audiences.push(ISSUER.to_string());
    }
    spec["audiences"] = json!(audiences);
    let mut k8s = json!({
        "namespace": ns,
        "serviceaccount": {"name": name, "uid": s(&sa, "/metadata/uid")},
    });
    let bound = spec.get("boundObjectRef").filter(|b| !b.is_null());
    if let (Some(node), None) = (node, bound) {
        return Err(ApiError::Forbidden {
            message: format!("node {node:?} can only get tokens bound to one of its pods"),
        });
    }
    if let Some(bound) = bound {
        let kind = s(bound, "/kind");
        let bname = s(bound, "/name");
        if kind != "Pod" {
            return Err(ApiError::bad_request(format!(
                "cannot bind a token to a {kind:?}: only Pods are supported"
            )));
        }
        let pods = resources::builtin("Pod");
        let pod = objects.get_known(pods, Some(ns), bname).await?;
        if let Some(node) = node {
            if s(&pod, "/spec/nodeName") != node {
                return Err(ApiError::Forbidden {
                    message: format!("node {node:?} can only get tokens for pods bound to it; pod {bname:?} is not"),
                });
            }
        }
        let uid = s(&pod, "/metadata/uid");
        let want_uid = s(bound, "/uid");
        if !want_uid.is_empty() && want_uid != uid {
            return Err(ApiError::Conflict {
                group: String::new(),
                resource: "pods".into(),
                name: bname.into(),
                message: format!("the UID in the bound object reference ({want_uid}) does not match the UID in record ({uid}). The object might have been deleted and then recreated"),
            });
        }
        let pod_sa = pod
            .pointer("/spec/serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or("default");
        if pod_sa != name {
            return Err(ApiError::bad_request(format!(
                "cannot bind a token for ServiceAccount {name:?} to pod {bname:?}, which runs as {pod_sa:?}"
            )));
        }
        k8s["pod"] = json!({"name": bname, "uid": uid});
        if let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
            k8s["node"] = json!({"name": node});
        }
    }
    let now = now_secs();
    let claims = json!({
        "aud": audiences, "iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{name}"),
        "iat": now, "nbf": now, "exp": now + seconds,
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": k8s,
    });
    let token = signer.sign(&claims)?;
    Ok(json!({
        "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": rfc3339(now)},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": rfc3339(now + seconds)},
    }))
}

/// Why a token does not authenticate (for TokenReview's `status.error`).
pub async fn check(
    objects: &Objects,
    token: &str,
    audiences: &[String],
) -> Result<(UserInfo, Vec<String>), String> {
    let signer = objects.access.signer().map_err(|e| e.to_string())?;
    let claims = signer.verify(token).ok_or("invalid bearer token")?;
    if s(&claims, "/iss") != ISSUER {
        return Err("invalid bearer token".into());
    }
    let now = now_secs();
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let nbf = claims.get("nbf").and_then(Value::as_i64).unwrap_or(0);
    if now >= exp {
        return Err("token has expired".into());
    }
    if now + 60 < nbf {
        return Err("token is not valid yet".into());
    }
    let token_aud = strings(claims.get("aud"));
    let wanted: Vec<String> = if audiences.is_empty() {
        vec![ISSUER.to_string()]
    } else {
        audiences.to_vec()
    };
    let matched: Vec<String> = wanted
        .into_iter()
        .filter(|a| token_aud.contains(a))
        .collect();
    if matched.is_empty() {
        return Err("token audiences is invalid for the target audiences".into());
    }
    let k8s = &claims["kubernetes.io"];
    let ns = s(k8s, "/namespace");
    let name = s(k8s, "/serviceaccount/name");
    let sas = resources::builtin("ServiceAccount");
    let sa = objects
        .get_local_or_latest(sas, Some(ns), name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("service account {ns}/{name} has been deleted"))?;
    if s(&sa, "/metadata/uid") != s(k8s, "/serviceaccount/uid") {
        return Err(format!(
            "service account {ns}/{name} has been deleted and created again"
        ));
    }
    let mut user = UserInfo::service_account(ns, name, s(k8s, "/serviceaccount/uid"));
    if let Some(pod_name) = k8s.pointer("/pod/name").and_then(Value::as_str) {
        let pods = resources::builtin("Pod");
        let pod = objects
            .get_local_or_latest(pods, Some(ns), pod_name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("pod {ns}/{pod_name} has been deleted"))?;
        if s(&pod, "/metadata/uid") != s(k8s, "/pod/uid") {
            return Err(format!(
                "pod {ns}/{pod_name} has been deleted and created again"
            ));
        }
        user.extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            vec![pod_name.into()],
        );
        user.extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            vec![s(k8s, "/pod/uid").into()],
        );
    }
    if let Some(jti) = claims.get("jti").and_then(Value::as_str) {
        user.extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            vec![format!("JTI={jti}")],
        );
    }
    Ok((user, matched))
}

/// The user a ServiceAccount token authenticates as, for the API's own audience.
pub async fn review(objects: &Objects, token: &str) -> Option<UserInfo> {
    // Only something shaped like a JWT is worth a signature check.
    if token.matches('.').count() != 2 {
        return None;
    }
    match check(objects, token, &[]).await {
        Ok((u, _)) => Some(u),
        Err(why) => {
            tracing::debug!(reason = %why, "service account token refused");
            None
        }
    }
}
