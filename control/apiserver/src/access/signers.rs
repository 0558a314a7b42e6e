//! Who may decide and sign CertificateSigningRequests, as Kubernetes' CSR storage checks
//! it: writing `/approval` or `/status` is not enough on its own.
//!
//! - Adding an `Approved` or `Denied` condition needs the `approve` verb on the request's
//!   signer: the resource `signers` in `certificates.k8s.io`, named by the signer
//!   (`kubernetes.io/kube-apiserver-client`) or by its domain (`kubernetes.io/*`).
//! - Setting the certificate needs the `sign` verb on it the same way.
//!
//! Without it, anyone allowed to update approvals could approve their own request for
//! an API client certificate, naming any user and group, and so become that user.

use baton_auth::UserInfo;
use serde_json::Value;

use super::attributes;
use crate::error::{ApiError, ApiResult};
use crate::objects::Objects;
use crate::table::s;

const GROUP: &str = "certificates.k8s.io";

/// The decision conditions (`Approved`, `Denied`) a request holds.
fn decisions(o: &Value) -> Vec<&str> {
    o.pointer("/status/conditions")
        .and_then(Value::as_array)
        .map(|c| {
            c.iter()
                .filter_map(|c| c.get("type").and_then(Value::as_str))
                .filter(|t| matches!(*t, "Approved" | "Denied"))
                .collect()
        })
        .unwrap_or_default()
}

fn certificate(o: &Value) -> &str {
    s(o, "/status/certificate")
}

/// Whether `user` holds `verb` on `signer`, by its name or its domain's wildcard.
async fn holds(objects: &Objects, user: &UserInfo, verb: &str, signer: &str) -> bool {
    let mut names = vec![signer.to_string()];
    if let Some((domain, _)) = signer.split_once('/') {
        names.push(format!("{domain}/*"));
    }
    for name in names {
        let a = attributes(user, verb, GROUP, "signers", "", &name);
        if objects.access.authorize(objects, &a).await.allowed() {
            return true;
        }
    }
    false
}

/// Checks an update of a CertificateSigningRequest from `old` to `new`.
pub async fn csr_update(
    objects: &Objects,
    user: &UserInfo,
    new: &Value,
    old: &Value,
) -> ApiResult<()> {
    let decided = decisions(new).iter().any(|d| !decisions(old).contains(d));
    let signed = !certificate(new).is_empty() && certificate(new) != certificate(old);
    if user.is_superuser() || (!decided && !signed) {
        return Ok(());
    }
    let signer = s(new, "/spec/signerName");
    let name = s(new, "/metadata/name");
    for (needed, verb) in [(decided, "approve"), (signed, "sign")] {
        if needed && !holds(objects, user, verb, signer).await {
            return Err(ApiError::Forbidden {
                message: format!(
                    "certificatesigningrequests.{GROUP} {name:?} is forbidden: user {:?} (groups={:?}) cannot {verb} signers.{GROUP} {signer:?}",
                    user.name, user.groups
                ),
            });
        }
    }
    Ok(())
}
