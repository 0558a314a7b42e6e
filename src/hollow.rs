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
    /// The kubeconfig of the cluster they join (its user must be allowed to write Nodes,
    /// Leases, pod status and Events: an administrator's, as kubemark's).
    #[arg(long)]
    kubeconfig: PathBuf,
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
    let mut client = None;
    for i in 0..args.count {
        if i % args.nodes_per_client.max(1) == 0 {
            client = Some(
                baton_kube::client::multiplexed_from_yaml(&yaml)
                    .await
                    .context("failed to connect to the cluster")?,
            );
        }
        let name = format!("{}{i}", args.prefix);
        let mut cfg = baton_node::hollow::HollowConfig::new(&name, dir.join(&name));
        cfg.start_delay = Duration::from_millis(args.start_delay_ms);
        cfg.heartbeat = Duration::from_secs(args.heartbeat_secs.max(1));
        let client = client.clone().context("a client")?;
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
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
