//! The pod annotations that set up a component's platform interfaces (wasi:config,
//! wasi:keyvalue, …), read by the node that runs the pod and by the API server's node
//! authorizer, which lets a node read the ConfigMaps and Secrets they name.

use std::collections::BTreeMap;

/// Grants interfaces to every container (`config,keyvalue`);
/// `baton.dev/capabilities.<container>` grants them to one.
pub const CAPABILITIES: &str = "baton.dev/capabilities";
/// ConfigMaps (`name` or `configmap:name`) and Secrets (`secret:name`) whose keys are
/// wasi:config values.
pub const CONFIG_FROM: &str = "baton.dev/config-from";
/// The pod's wasi:keyvalue buckets: `name` (node-local) or `name=redis:SECRET`.
pub const BUCKETS: &str = "baton.dev/keyvalue-buckets";
/// Each bucket's cap in bytes.
pub const BUCKET_BYTES: &str = "baton.dev/keyvalue-bucket-bytes";

/// The objects [`CONFIG_FROM`] names: (kind, name), kind "configmap" or "secret".
pub fn config_sources(annotations: &BTreeMap<String, String>) -> Vec<(&'static str, String)> {
    annotations
        .get(CONFIG_FROM)
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.strip_prefix("secret:") {
            Some(name) => ("secret", name.to_string()),
            None => (
                "configmap",
                s.strip_prefix("configmap:").unwrap_or(s).to_string(),
            ),
        })
        .collect()
}

/// The buckets [`BUCKETS`] declares: name, and the Secret holding the URL of its Redis
/// (None: node-local). An error says which declaration is wrong.
pub fn buckets(
    annotations: &BTreeMap<String, String>,
) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    for decl in annotations
        .get(BUCKETS)
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, secret) = match decl.split_once('=') {
            None => (decl, None),
            Some((name, backend)) => match backend.trim().strip_prefix("redis:") {
                Some(secret) if is_dns_subdomain(secret.trim()) => {
                    (name.trim(), Some(secret.trim().to_string()))
                }
                _ => return Err(format!("{decl:?}: a backend is `redis:SECRET`")),
            },
        };
        if !is_dns_label(name) {
            return Err(format!(
                "{name:?} is not a bucket name (lowercase letters, digits and '-')"
            ));
        }
        out.push((name.to_string(), secret));
    }
    Ok(out)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
