//! `baton hollow-nodes`: many node agents in one process, with scripted sandboxes, for
//! measuring the control plane at scale ([`baton_node::hollow`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct HollowArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// The kubeconfig of the cluster they join: an administrator's. Each node asks with
    /// it for a client certificate of its own (`system:node:NAME` in `system:nodes`),
    /// approves the request as `kubectl certificate approve` would, and goes on as
    /// itself, so that its requests meet the Node authorizer, NodeRestriction and the
    /// nodes' priority levels, as a real node's do.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Every node uses the kubeconfig's user instead of an identity of its own: lighter
    /// on the API server than real nodes are (no Node authorizer).
    #[arg(long)]
    shared_identity: bool,
    /// Their names are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "hollow-")]
    prefix: String,
    /// How long a container takes to start, in milliseconds.
    #[arg(long, default_value_t = 0)]
    start_delay_ms: u64,
    /// Lease renewals, in seconds.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Nodes per API client. One by default: each node has its HTTP/2 connection to the
    /// API server, as each kubelet has. More share one, which is lighter on the API
    /// server than real nodes are (up to 1,000 streams per connection).
    #[arg(long, default_value_t = 1)]
    nodes_per_client: usize,
    /// Where pod directories go (by default a directory under the temporary directory,
    /// removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub async fn hollow_nodes(args: HollowArgs) -> Result<()> {
    let yaml = std::fs::read_to_string(&args.kubeconfig)
        .with_context(|| format!("failed to read {}", args.kubeconfig.display()))?;
    let (dir, own_dir) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("baton-hollow-{}", std::process::id())),
            true,
        ),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let admin = baton_kube::client::multiplexed_from_yaml(&yaml)
        .await
        .context("failed to connect to the cluster")?;
    let mut client = None;
    for i in 0..args.count {
        let name = format!("{}{i}", args.prefix);
        if args.shared_identity && i % args.nodes_per_client.max(1) == 0 {
            client = Some(
                baton_kube::client::multiplexed_from_yaml(&yaml)
                    .await
                    .context("failed to connect to the cluster")?,
            );
        }
        let shared = if args.shared_identity {
            Some(client.clone().context("a client")?)
        } else {
            None
        };
        let mut cfg = baton_node::hollow::HollowConfig::new(&name, dir.join(&name));
        cfg.start_delay = Duration::from_millis(args.start_delay_ms);
        cfg.heartbeat = Duration::from_secs(args.heartbeat_secs.max(1));
        let (admin, yaml) = (admin.clone(), yaml.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let client = match shared {
                Some(c) => c,
                None => match node_identity(&admin, &yaml, &name).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(node = %name, error = %baton_kube::error::chain(&*e), "hollow node got no identity");
                        return;
                    }
                },
            };
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = baton_node::hollow::run(client, cfg, shutdown).await {
                tracing::warn!(node = %name, error = %baton_kube::error::chain(&e), "hollow node failed");
            }
        });
    }
    println!("{} hollow nodes are running", args.count);
    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    if own_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// How long a node waits for its certificate to be signed.
const SIGNING_WAIT: Duration = Duration::from_secs(300);

/// A client of node `name`'s own identity: a key made here, a CertificateSigningRequest
/// for `system:node:NAME` created and approved with the administrator's client `admin`
/// (the controller manager signs it), then the kubeconfig `yaml` with that certificate.
async fn node_identity(
    admin: &kube::Client,
    yaml: &str,
    name: &str,
) -> Result<kube::Client, anyhow::Error> {
    use base64::Engine;
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let (key, request) = crate::join::node_client_request(name)?;
    let api: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": format!("hollow-csr-{name}-")},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(&request),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "key encipherment", "client auth"],
        },
    }))?;
    let (post, patch) = (PostParams::default(), PatchParams::default());
    let created = retry(|| api.create(&post, &csr)).await?;
    let csr_name = created
        .metadata
        .name
        .context("the created request has no name")?;
    let approval = Patch::Merge(serde_json::json!({"status": {"conditions": [{
        "type": "Approved", "status": "True", "reason": "HollowNode",
        "message": "a hollow node's own identity, approved by the hollow-nodes process",
    }]}}));
    retry(|| api.patch_approval(&csr_name, &patch, &approval)).await?;
    let signed = |c: Option<&CertificateSigningRequest>| {
        c.and_then(|c| c.status.as_ref()?.certificate.as_ref())
            .is_some_and(|b| !b.0.is_empty())
    };
    let csr = tokio::time::timeout(
        SIGNING_WAIT,
        kube::runtime::wait::await_condition(api.clone(), &csr_name, signed),
    )
    .await
    .with_context(|| format!("{csr_name} was not signed within {SIGNING_WAIT:?}"))??;
    let cert = csr
        .and_then(|c| c.status?.certificate)
        .context("the signed request is gone")?;
    let cert_pem = String::from_utf8(cert.0).context("the certificate is not PEM")?;
    Ok(baton_kube::client::with_client_certificate(yaml, &cert_pem, &key.serialize_pem()).await?)
}

/// Runs a request again, up to ten times a second apart, while the API server sheds load
/// (5,000 nodes asking at once are refused with 429 by priority and fairness).
async fn retry<T, F, Fut>(mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if tries < 10 => {
                tracing::debug!(error = %e, "retrying");
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}
