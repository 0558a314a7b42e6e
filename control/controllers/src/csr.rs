//! CertificateSigningRequests: kube-controller-manager's `csrapproving` and `csrsigning`
//! in one reconciler.
//!
//! - **Approving.** A request for `kubernetes.io/kube-apiserver-client-kubelet` is
//!   approved by itself when it asks for exactly a node's client identity
//!   (`CN=system:node:NAME`, `O=system:nodes`, client usages only) and comes from a
//!   bootstrap token (a node joining) or from that very node (a node renewing). Anything
//!   else waits for `kubectl certificate approve`.
//! - **Signing.** An approved request for one of the signers the cluster CA stands for
//!   (`kube-apiserver-client-kubelet`, `kube-apiserver-client`, `kubelet-serving`) gets a
//!   certificate with the subject the request asked for, the usages it named, and
//!   `spec.expirationSeconds` (default a year) of life. A request that cannot be signed
//!   (its CSR does not parse, or its signature does not verify) is marked `Failed`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::Ctx;

pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
const API_CLIENT: &str = "kubernetes.io/kube-apiserver-client";
const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
/// kube-controller-manager's `--cluster-signing-duration` default.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// The cluster CA, which signs what this controller approves.
#[derive(Clone)]
pub struct Signer {
    pub ca_pem: String,
    pub ca_key_pem: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{what} CertificateSigningRequest {name}")]
pub struct Error {
    what: &'static str,
    name: String,
    #[source]
    source: kube::Error,
}

fn condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn new_condition(kind: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    let now = Time(k8s_openapi::chrono::Utc::now());
    CertificateSigningRequestCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// What a CSR's PEM asks for.
struct Asked {
    common_name: Option<String>,
    organizations: Vec<String>,
    params: rcgen::CertificateSigningRequestParams,
}

fn parse(csr: &CertificateSigningRequest) -> Result<Asked, String> {
    let pem = String::from_utf8(csr.spec.request.0.clone())
        .map_err(|_| "spec.request is not PEM text".to_string())?;
    // from_pem checks the request's self-signature: the key it names made it.
    let params = rcgen::CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| format!("spec.request is not a valid certificate request: {e}"))?;
    let mut common_name = None;
    let mut organizations = Vec::new();
    for (kind, value) in params.params.distinguished_name.iter() {
        let text = match value {
            rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
            rcgen::DnValue::Utf8String(s) => s.clone(),
            _ => continue,
        };
        match kind {
            rcgen::DnType::CommonName => common_name = Some(text),
            rcgen::DnType::OrganizationName => organizations.push(text),
            _ => {}
        }
    }
    Ok(Asked {
        common_name,
        organizations,
        params,
    })
}

/// Why a request for a node's client certificate may be approved without a person.
fn auto_approval(csr: &CertificateSigningRequest, asked: &Asked) -> Option<&'static str> {
    if csr.spec.signer_name != KUBELET_CLIENT {
        return None;
    }
    let cn = asked.common_name.as_deref()?;
    let node = cn.strip_prefix("system:node:").filter(|n| !n.is_empty())?;
    if asked.organizations != ["system:nodes"] {
        return None;
    }
    let client_usages = ["digital signature", "key encipherment", "client auth"];
    let usages = csr.spec.usages.clone().unwrap_or_default();
    if !usages.iter().any(|u| u == "client auth")
        || usages.iter().any(|u| !client_usages.contains(&u.as_str()))
    {
        return None;
    }
    let groups = csr.spec.groups.clone().unwrap_or_default();
    let user = csr.spec.username.as_deref().unwrap_or_default();
    if groups.iter().any(|g| g == "system:bootstrappers") {
        return Some("Auto approving a new node's client certificate (bootstrap token)");
    }
    if user == format!("system:node:{node}") {
        return Some("Auto approving a node's renewal of its own client certificate");
    }
    None
}

pub async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let name = csr.name_any();
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let denied = condition(&csr, "Denied") || condition(&csr, "Failed");
    let signed = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    let ours =
        [KUBELET_CLIENT, API_CLIENT, KUBELET_SERVING].contains(&csr.spec.signer_name.as_str());
    if denied || signed || !ours {
        // Settled, or another signer's to decide: this controller leaves it alone.
        return Ok(Action::await_change());
    }
    let asked = match parse(&csr) {
        Ok(a) => a,
        Err(why) => {
            return fail(&api, &csr, &name, why).await;
        }
    };
    if !condition(&csr, "Approved") {
        let Some(reason) = auto_approval(&csr, &asked) else {
            // A person decides.
            return Ok(Action::await_change());
        };
        let mut approved = (*csr).clone();
        let status = approved.status.get_or_insert_with(Default::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(new_condition("Approved", "AutoApproved", reason.into()));
        tracing::info!(csr = %name, user = ?csr.spec.username, "approved");
        // The approval comes back as a change, and is signed then.
        let written = api
            .replace_subresource(
                "approval",
                &name,
                &PostParams::default(),
                serde_json::to_vec(&approved).unwrap_or_default(),
            )
            .await;
        return outcome(written, "approving", &name);
    }
    let Some(signer) = ctx.signer.as_ref() else {
        return Ok(Action::await_change());
    };
    // An approval by hand does not widen what a signer issues.
    if let Err(why) = signer_allows(&csr, &asked) {
        return fail(&api, &csr, &name, why).await;
    }
    let lifetime = csr
        .spec
        .expiration_seconds
        .map(|s| Duration::from_secs(s.max(600) as u64))
        .unwrap_or(DEFAULT_LIFETIME)
        .min(DEFAULT_LIFETIME);
    let cert = match sign(signer, asked, &csr, lifetime) {
        Ok(c) => c,
        Err(why) => return fail(&api, &csr, &name, why).await,
    };
    let mut done = (*csr).clone();
    done.status.get_or_insert_with(Default::default).certificate =
        Some(k8s_openapi::ByteString(cert.into_bytes()));
    let written = api
        .replace_status(
            &name,
            &PostParams::default(),
            serde_json::to_vec(&done).unwrap_or_default(),
        )
        .await;
    if written.is_ok() {
        tracing::info!(csr = %name, signer = %csr.spec.signer_name, "signed");
    }
    outcome(written, "signing", &name)
}

/// What a write of the request means for the reconciler: done, looked at again soon (it
/// changed or went meanwhile), or an error to retry.
// The reconciler's own error, returned as it returns it; boxing it here alone gains nothing.
#[allow(clippy::result_large_err)]
fn outcome<T>(
    written: Result<T, kube::Error>,
    what: &'static str,
    name: &str,
) -> Result<Action, Error> {
    match written {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        Err(source) => Err(Error {
            what,
            name: name.to_string(),
            source,
        }),
    }
}

/// What each signer may issue, as Kubernetes' signers restrict it: a kubelet client
/// certificate is a node's client identity, a kubelet serving certificate a node's
/// server identity for DNS names and IPs; an API client certificate may name anyone.
fn signer_allows(csr: &CertificateSigningRequest, asked: &Asked) -> Result<(), String> {
    let usages = csr.spec.usages.clone().unwrap_or_default();
    let node_identity = asked.common_name.as_deref().is_some_and(|cn| {
        cn.strip_prefix("system:node:")
            .is_some_and(|n| !n.is_empty())
    }) && asked.organizations == ["system:nodes"];
    let only = |allowed: &[&str]| usages.iter().all(|u| allowed.contains(&u.as_str()));
    match csr.spec.signer_name.as_str() {
        KUBELET_CLIENT => {
            if !node_identity {
                return Err(
                    "kube-apiserver-client-kubelet signs only CN=system:node:NAME, O=system:nodes"
                        .into(),
                );
            }
            if !only(&["digital signature", "key encipherment", "client auth"]) {
                return Err("kube-apiserver-client-kubelet signs client usages only".into());
            }
            if !asked.params.params.subject_alt_names.is_empty() {
                return Err(
                    "kube-apiserver-client-kubelet signs no subject alternative names".into(),
                );
            }
        }
        KUBELET_SERVING => {
            if !node_identity {
                return Err(
                    "kubelet-serving signs only CN=system:node:NAME, O=system:nodes".into(),
                );
            }
            if !only(&["digital signature", "key encipherment", "server auth"]) {
                return Err("kubelet-serving signs server usages only".into());
            }
            let names_hosts =
                asked.params.params.subject_alt_names.iter().all(|s| {
                    matches!(s, rcgen::SanType::DnsName(_) | rcgen::SanType::IpAddress(_))
                });
            if !names_hosts {
                return Err("kubelet-serving signs DNS names and IP addresses only".into());
            }
        }
        _ => {
            if !only(&["digital signature", "key encipherment", "client auth"]) {
                return Err("kube-apiserver-client signs client usages only".into());
            }
        }
    }
    Ok(())
}

fn sign(
    signer: &Signer,
    asked: Asked,
    csr: &CertificateSigningRequest,
    lifetime: Duration,
) -> Result<String, String> {
    let key = rcgen::KeyPair::from_pem(&signer.ca_key_pem)
        .map_err(|e| format!("the cluster CA's key is unusable: {e}"))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&signer.ca_pem, key)
        .map_err(|e| format!("the cluster CA is unusable: {e}"))?;
    let mut req = asked.params;
    // The CA decides what the certificate may do and for how long, not the request.
    let usages = csr.spec.usages.clone().unwrap_or_default();
    let p = &mut req.params;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.extended_key_usages = usages
        .iter()
        .filter_map(|u| match u.as_str() {
            "client auth" => Some(rcgen::ExtendedKeyUsagePurpose::ClientAuth),
            "server auth" => Some(rcgen::ExtendedKeyUsagePurpose::ServerAuth),
            _ => None,
        })
        .collect();
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    if usages.iter().any(|u| u == "key encipherment") {
        p.key_usages.push(rcgen::KeyUsagePurpose::KeyEncipherment);
    }
    if csr.spec.signer_name != KUBELET_SERVING {
        // Client certificates name a user, not hosts.
        p.subject_alt_names.clear();
    }
    // A serial of its own, though a renewal may reuse its key.
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = std::time::SystemTime::now();
    p.not_before = (now - Duration::from_secs(300)).into();
    p.not_after = (now + lifetime).into();
    let cert = req
        .signed_by(&issuer)
        .map_err(|e| format!("signing failed: {e}"))?;
    Ok(cert.pem())
}

async fn fail(
    api: &Api<CertificateSigningRequest>,
    csr: &CertificateSigningRequest,
    name: &str,
    why: String,
) -> Result<Action, Error> {
    tracing::info!(csr = %name, reason = %why, "cannot be signed");
    let mut failed = csr.clone();
    failed
        .status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new)
        .push(new_condition("Failed", "SigningFailed", why));
    let written = api
        .replace_status(
            name,
            &PostParams::default(),
            serde_json::to_vec(&failed).unwrap_or_default(),
        )
        .await;
    outcome(written, "failing", name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;

    fn csr_for(cn: &str, orgs: &[&str], user: &str, groups: &[&str]) -> CertificateSigningRequest {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, *o);
        }
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(pem.into_bytes()),
                signer_name: KUBELET_CLIENT.into(),
                usages: Some(vec!["digital signature".into(), "client auth".into()]),
                username: Some(user.into()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_a_nodes_own_client_identity_is_approved_by_itself() {
        let ok = |c: &CertificateSigningRequest| auto_approval(c, &parse(c).unwrap()).is_some();
        let boot = ["system:bootstrappers", "system:authenticated"];
        assert!(ok(&csr_for(
            "system:node:n1",
            &["system:nodes"],
            "system:bootstrap:abcdef",
            &boot
        )));
        assert!(ok(&csr_for(
            "system:node:n1",
            &["system:nodes"],
            "system:node:n1",
            &["system:nodes"]
        )));
        // Another node's identity, by a node.
        assert!(!ok(&csr_for(
            "system:node:n2",
            &["system:nodes"],
            "system:node:n1",
            &["system:nodes"]
        )));
        // An admin's identity, by a bootstrap token.
        assert!(!ok(&csr_for(
            "system:node:n1",
            &["system:masters"],
            "system:bootstrap:abcdef",
            &boot
        )));
        assert!(!ok(&csr_for(
            "admin",
            &[],
            "system:bootstrap:abcdef",
            &boot
        )));
        // Server usages are not a client's.
        let mut serving = csr_for(
            "system:node:n1",
            &["system:nodes"],
            "system:bootstrap:abcdef",
            &boot,
        );
        serving.spec.usages = Some(vec!["server auth".into()]);
        assert!(!ok(&serving));
    }

    #[test]
    fn a_signed_certificate_names_what_was_asked_and_chains_to_the_ca() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let signer = Signer {
            ca_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
        };
        let csr = csr_for(
            "system:node:n1",
            &["system:nodes"],
            "system:bootstrap:abcdef",
            &["system:bootstrappers"],
        );
        let pem = sign(
            &signer,
            parse(&csr).unwrap(),
            &csr,
            Duration::from_secs(3600),
        )
        .unwrap();
        let der = rustls_pemfile_der(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "system:node:n1");
        assert!(cert
            .verify_signature(Some(
                &x509_parser::parse_x509_certificate(ca_cert.der())
                    .unwrap()
                    .1
                    .tbs_certificate
                    .subject_pki
            ))
            .is_ok());
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(life <= 3600 + 300, "{life}");
    }

    #[test]
    fn a_signer_issues_only_its_kind_of_certificate() {
        let boot = ["system:bootstrappers"];
        let node = csr_for("system:node:n1", &["system:nodes"], "admin", &boot);
        assert!(signer_allows(&node, &parse(&node).unwrap()).is_ok());
        // Approved by hand, an admin's identity is still not a kubelet client's.
        let admin = csr_for("admin", &["system:masters"], "admin", &boot);
        assert!(signer_allows(&admin, &parse(&admin).unwrap()).is_err());
        let mut serving = node.clone();
        serving.spec.signer_name = KUBELET_SERVING.into();
        assert!(
            signer_allows(&serving, &parse(&serving).unwrap()).is_err(),
            "client usages"
        );
        serving.spec.usages = Some(vec!["server auth".into()]);
        assert!(signer_allows(&serving, &parse(&serving).unwrap()).is_ok());
        let mut api_client = admin.clone();
        api_client.spec.signer_name = API_CLIENT.into();
        assert!(signer_allows(&api_client, &parse(&api_client).unwrap()).is_ok());
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }
}
