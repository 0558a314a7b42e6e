//! `baton token list|create|delete`: bootstrap tokens for nodes, as kubeadm's are:
//! Secrets `kube-system/bootstrap-token-ID` of type `bootstrap.kubernetes.io/token`. A
//! token is printed as `baton1::CA-HASH::ID.SECRET`, so that a node checks the server's
//! CA before it trusts it, as it does with the cluster token.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use rand::Rng;

const TYPE: &str = "bootstrap.kubernetes.io/token";
const NAMESPACE: &str = "kube-system";

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// A server's data dir: its admin `kubeconfig`, and its CA for the token's hash.
    #[arg(long, env = "BATON_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    verb: TokenVerb,
}

#[derive(Subcommand, Debug)]
enum TokenVerb {
    /// The bootstrap tokens, with when each expires.
    List,
    /// Make a bootstrap token a node can join with.
    Create {
        /// How long it is good for (`30m`, `24h`, `7d`); `0` never expires.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// Revoke a bootstrap token (its ID, or the whole token).
    Delete { token: String },
}

fn parse_ttl(s: &str) -> Result<Option<std::time::Duration>> {
    if s == "0" {
        return Ok(None);
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .with_context(|| format!("--ttl {s}: not a duration"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" | "" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("--ttl {s}: the unit is s, m, h or d"),
    };
    if secs == 0 {
        bail!("--ttl {s}: give 0 for a token that never expires");
    }
    Ok(Some(std::time::Duration::from_secs(secs)))
}

fn random(n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

pub async fn token(args: TokenArgs, default_dir: PathBuf) -> Result<()> {
    let dir = args.data_dir.unwrap_or(default_dir);
    let yaml = std::fs::read_to_string(dir.join("kubeconfig")).with_context(|| {
        format!(
            "no admin kubeconfig in {}: give a server's --data-dir",
            dir.display()
        )
    })?;
    let client = baton_kube::client::from_yaml(&yaml)
        .await
        .context("failed to connect to the cluster")?;
    let secrets: Api<Secret> = Api::namespaced(client, NAMESPACE);
    match args.verb {
        TokenVerb::List => {
            let list = secrets
                .list(&ListParams::default().fields(&format!("type={TYPE}")))
                .await?;
            println!("{:<8} {:<22} DESCRIPTION", "ID", "EXPIRES");
            for s in list.items {
                let field = |k: &str| {
                    s.data
                        .as_ref()
                        .and_then(|d| d.get(k))
                        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                };
                println!(
                    "{:<8} {:<22} {}",
                    field("token-id").unwrap_or_default(),
                    field("expiration").unwrap_or_else(|| "<never>".into()),
                    field("description").unwrap_or_default()
                );
            }
        }
        TokenVerb::Create { ttl, description } => {
            let ca = std::fs::read_to_string(dir.join("pki/ca.crt"))
                .with_context(|| format!("no cluster CA in {}/pki", dir.display()))?;
            let (id, secret) = (random(6), random(16));
            let mut data = BTreeMap::from([
                ("token-id".to_string(), id.clone()),
                ("token-secret".to_string(), secret.clone()),
                ("usage-bootstrap-authentication".to_string(), "true".into()),
                ("usage-bootstrap-signing".to_string(), "true".into()),
                (
                    "auth-extra-groups".to_string(),
                    "system:bootstrappers:baton:default-node-token".into(),
                ),
            ]);
            if let Some(ttl) = parse_ttl(&ttl)? {
                let at =
                    k8s_openapi::chrono::Utc::now() + k8s_openapi::chrono::Duration::from_std(ttl)?;
                data.insert(
                    "expiration".into(),
                    at.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
                );
            }
            if let Some(d) = description {
                data.insert("description".into(), d);
            }
            let secret_obj = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("bootstrap-token-{id}")),
                    namespace: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                type_: Some(TYPE.into()),
                data: Some(
                    data.into_iter()
                        .map(|(k, v)| (k, ByteString(v.into_bytes())))
                        .collect(),
                ),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &secret_obj).await?;
            let token = baton_apiserver::join::Token::new(&ca, Some(&format!("{id}.{secret}")));
            println!("{token}");
        }
        TokenVerb::Delete { token } => {
            // The ID, `ID.SECRET`, or the whole `baton1::HASH::ID.SECRET`.
            let last = token.rsplit("::").next().unwrap_or(&token);
            let id = last.split('.').next().unwrap_or(last);
            secrets
                .delete(&format!("bootstrap-token-{id}"), &DeleteParams::default())
                .await
                .with_context(|| format!("failed to delete bootstrap token {id}"))?;
            println!("bootstrap token {id} deleted");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_read_with_their_units() {
        assert_eq!(parse_ttl("0").unwrap(), None);
        assert_eq!(parse_ttl("90s").unwrap().unwrap().as_secs(), 90);
        assert_eq!(parse_ttl("24h").unwrap().unwrap().as_secs(), 86_400);
        assert_eq!(parse_ttl("7d").unwrap().unwrap().as_secs(), 604_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("x").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
