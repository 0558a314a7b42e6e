//! Authentication: who a request is.
//!
//! In kube-apiserver's order, the first that recognizes the request wins:
//! - a bearer token from the static token file (`TOKEN,USER[,GROUP...]`);
//! - a ServiceAccount token (a JWT the cluster signed, for a pod that still exists);
//! - an X.509 client certificate the cluster CA signed (CN the user, O the groups),
//!   which the TLS layer has already verified.
//!
//! A token that is presented but not recognized is a 401, even with a certificate: a
//! client that sends a stale token should hear so. Every authenticated user is in
//! `system:authenticated`. Then impersonation headers (`kubectl --as`) may switch to
//! another user, which the real user must be allowed to `impersonate`.

use axum::http::HeaderMap;
use baton_auth::{UserInfo, ANONYMOUS, SERVICE_ACCOUNTS};

use super::{attributes, Access};
use crate::error::{ApiError, ApiResult};
use crate::objects::Objects;

/// The user a verified client certificate names (set by the TLS layer as a request
/// extension).
#[derive(Debug, Clone)]
pub struct ClientCertUser(pub UserInfo);

/// Reads the user from a DER certificate: CN is the name, each O a group.
pub fn user_of_certificate(der: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    (!name.is_empty()).then(|| UserInfo {
        name,
        groups,
        ..UserInfo::default()
    })
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// Who made the request: Ok(None) if it carries no credentials at all.
pub async fn authenticate(
    objects: &Objects,
    headers: &HeaderMap,
    cert: Option<&ClientCertUser>,
) -> ApiResult<Option<UserInfo>> {
    if let Some(token) = bearer(headers) {
        if let Some(u) = objects.access.pki().and_then(|p| p.authenticate(token)) {
            return Ok(Some(u.clone().authenticated()));
        }
        if let Some(u) = super::tokens::review(objects, token).await {
            return Ok(Some(u));
        }
        if let Some(u) = bootstrap_token(objects, token).await {
            return Ok(Some(u));
        }
        return Err(ApiError::Unauthorized);
    }
    Ok(cert.map(|c| c.0.clone().authenticated()))
}

/// The group every bootstrap token's user is in.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";

/// A bootstrap token (`ID.SECRET`, kubeadm's format) checked against its Secret
/// `kube-system/bootstrap-token-ID`: the user `system:bootstrap:ID`, in
/// `system:bootstrappers` and the token's extra groups, while it is unexpired and marked
/// for authentication.
async fn bootstrap_token(objects: &Objects, token: &str) -> Option<UserInfo> {
    let (id, secret) = token.split_once('.')?;
    let lower_alnum = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if !lower_alnum(id, 6) || !lower_alnum(secret, 16) {
        return None;
    }
    let secrets = crate::resources::builtin("Secret");
    let (obj, _) = objects
        .get(
            secrets,
            Some("kube-system"),
            &format!("bootstrap-token-{id}"),
            crate::objects::ReadAt::Latest,
        )
        .await
        .ok()??;
    if obj.get("type").and_then(|t| t.as_str()) != Some("bootstrap.kubernetes.io/token") {
        return None;
    }
    let field = |k: &str| -> Option<String> {
        use base64::Engine;
        let b64 = obj.pointer(&format!("/data/{k}"))?.as_str()?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        String::from_utf8(raw).ok()
    };
    // Compared as hashes: the time taken says nothing about how much was right.
    use sha2::Digest;
    let same = |a: &str, b: &str| sha2::Sha256::digest(a) == sha2::Sha256::digest(b);
    if field("token-id").as_deref() != Some(id) || !same(&field("token-secret")?, secret) {
        return None;
    }
    if field("usage-bootstrap-authentication").as_deref() != Some("true") {
        return None;
    }
    if let Some(exp) = field("expiration") {
        let Ok(exp) = k8s_openapi::chrono::DateTime::parse_from_rfc3339(&exp) else {
            return None;
        };
        if exp <= k8s_openapi::chrono::Utc::now() {
            tracing::info!(id, "an expired bootstrap token was refused");
            return None;
        }
    }
    let mut groups = vec![BOOTSTRAPPERS.to_string()];
    for g in field("auth-extra-groups").unwrap_or_default().split(',') {
        let g = g.trim();
        // kubeadm's rule: extra groups stay within the bootstrappers' namespace.
        if g.starts_with("system:bootstrappers:") && !groups.iter().any(|x| x == g) {
            groups.push(g.to_string());
        }
    }
    Some(
        UserInfo {
            name: format!("system:bootstrap:{id}"),
            groups,
            ..UserInfo::default()
        }
        .authenticated(),
    )
}

/// Applies `Impersonate-*` headers: the user the request then acts as, after checking
/// that `user` may impersonate each part of it.
pub async fn impersonate(
    access: &Access,
    objects: &Objects,
    user: UserInfo,
    headers: &HeaderMap,
) -> ApiResult<UserInfo> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(String::from))
            .collect()
    };
    let name = values("impersonate-user").into_iter().next();
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid").into_iter().next();
    let extra: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix("impersonate-extra-")?;
            let key = percent_decode(key);
            Some((key, v.to_str().ok()?.to_string()))
        })
        .collect();
    let Some(name) = name else {
        if !groups.is_empty() || uid.is_some() || !extra.is_empty() {
            return Err(ApiError::bad_request(
                "requested impersonation of groups, uid or extra without impersonating a user",
            ));
        }
        return Ok(user);
    };
    let check = |verb_attrs: baton_auth::Attributes| async move {
        access.require(objects, &verb_attrs).await
    };
    let mut as_user = UserInfo {
        name: name.clone(),
        ..UserInfo::default()
    };
    match UserInfo::service_account_parts(&name) {
        Some((ns, sa)) => {
            check(attributes(
                &user,
                "impersonate",
                "",
                "serviceaccounts",
                &ns,
                &sa,
            ))
            .await?;
            as_user.groups = vec![SERVICE_ACCOUNTS.into(), format!("{SERVICE_ACCOUNTS}:{ns}")];
        }
        None => check(attributes(&user, "impersonate", "", "users", "", &name)).await?,
    }
    for g in &groups {
        check(attributes(&user, "impersonate", "", "groups", "", g)).await?;
        if !as_user.groups.contains(g) {
            as_user.groups.push(g.clone());
        }
    }
    if let Some(uid) = uid {
        check(attributes(
            &user,
            "impersonate",
            "authentication.k8s.io",
            "uids",
            "",
            &uid,
        ))
        .await?;
        as_user.uid = uid;
    }
    for (k, v) in extra {
        let mut a = attributes(
            &user,
            "impersonate",
            "authentication.k8s.io",
            "userextras",
            "",
            &v,
        );
        a.subresource = k.clone();
        check(a).await?;
        as_user.extra.entry(k).or_default().push(v);
    }
    Ok(if name == ANONYMOUS {
        as_user
    } else {
        as_user.authenticated()
    })
}

/// Header names carry extra keys percent-encoded (`Impersonate-Extra-scopes%2Fx`).
fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("k={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}
