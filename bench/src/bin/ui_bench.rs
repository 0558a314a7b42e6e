//! The dashboard with 1,000 pods: time to interactive in headless Chromium.
//!
//! `baton up` holds a Deployment of 1,000 `http-hello` replicas; once every pod exists and
//! the scheduler has said why it cannot place it, Playwright
//! (`tests/ui/tti-bench.mjs`) opens the dashboard's pod list and its overview, signed in
//! with a token, several times each. A page counts as interactive when its live table
//! shows every pod and the browser's main thread is free to run the next task: from the
//! navigation's start to that moment is the figure.
//!
//! The replicas ask for a node label no node has, so they stay Pending: a quiet cluster,
//! so that the figure is the dashboard's. (With 1,000 pods running on one node, the
//! cluster's own traffic still starves the API server: that is issue 19's to fix.)
//!
//! There is no peer in this run: the
//! Kubernetes dashboard and Headlamp need a registry this machine cannot reach.
//!
//! `BENCH_PODS` (default 1000) replicas; `BENCH_RUNS` (default 5) page loads per view.
//! Usage: `ui-bench BATON_BINARY` (see `scripts/bench.sh ui`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use baton_bench::{env_or, up};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;

/// kubectl against the benchmark's cluster.
fn kubectl(kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("kubectl")?;
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(stdin.unwrap_or("").as_bytes())?;
    drop(input);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: ui-bench BATON_BINARY")?,
    );
    let root =
        std::fs::canonicalize(baton_testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join(".."))?;
    let guests = std::fs::canonicalize(root.join("examples-wasm/dist"))?;
    let n: usize = env_or("BENCH_PODS", 1000);
    let runs: usize = env_or("BENCH_RUNS", 5);
    let up = up(&bin, &[]).await?;
    let kubeconfig = up.data_dir().join("kubeconfig");
    let kc = |args: &[&str]| kubectl(&kubeconfig, args, None);
    kc(&["create", "serviceaccount", "bench"])?;
    kc(&[
        "create",
        "clusterrolebinding",
        "bench",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:bench",
    ])?;
    let token = kc(&["create", "token", "bench"])?.trim().to_string();
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: many}}\nspec:\n  replicas: {n}\n  selector: {{matchLabels: {{app: many}}}}\n  template:\n    metadata: {{labels: {{app: many}}}}\n    spec:\n      nodeSelector: {{bench: nowhere}}\n      containers:\n      - {{name: web, image: {}, ports: [{{containerPort: 8080}}]}}\n",
        guests.join("http-hello.wasm").display()
    );
    kubectl(&kubeconfig, &["apply", "-f", "-"], Some(&deployment))?;
    let pods: Api<Pod> = Api::namespaced(up.client.clone(), "default");
    let unschedulable = || async {
        pods.list(&ListParams::default().labels("app=many"))
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|p| {
                        baton_kube::pod::condition(p, "PodScheduled")
                            .is_some_and(|c| c.reason.as_deref() == Some("Unschedulable"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    baton_testkit::wait_until_async(
        Duration::from_secs(600),
        "every replica created and found unschedulable",
        || async { (unschedulable().await == n).then_some(()) },
    )
    .await?;
    let addr = {
        let text = std::fs::read_to_string(&kubeconfig)?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("server: ").map(String::from))
            .context("the kubeconfig's server")?
    };
    println!(
        "## Dashboard time to interactive: {n} pods, headless Chromium, {runs} loads per view"
    );
    let out = Command::new("node")
        .arg(root.join("tests/ui/tti-bench.mjs"))
        .current_dir(root.join("tests/ui"))
        .env("BATON_URL", addr)
        .env("TOKEN", token)
        .env("PODS", n.to_string())
        .env("RUNS", runs.to_string())
        .output()
        .context("node")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "the browser run failed");
    println!("goal: under 1 s");
    Ok(())
}
