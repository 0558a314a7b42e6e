//! `cargo run --example greeter-operator`: the Greeter operator against the cluster of
//! `$KUBECONFIG` (for `baton up`, its data dir's `kubeconfig`). See `operator.rs`.

#[path = "operator.rs"]
mod operator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    operator::install(&client).await?;
    println!("greeter-operator: the Greeter CRD is established; reconciling Greeters");
    operator::run(client).await;
    Ok(())
}
