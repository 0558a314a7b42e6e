//! The short scale run: hollow nodes and pods through Deployments, then churn, with
//! Kubernetes' SLOs as assertions (API calls p99 ≤ 1 s, lists ≤ 30 s, pod startup
//! p99 ≤ 5 s). The full run is `scripts/bench.sh scale` ([`baton_bench::scale`]).

use std::path::Path;
use std::time::Duration;

use baton_bench::env_or;
use baton_bench::scale::{run, Plan};

/// The suite's size is what a debug build on two cores, beside the rest of the suite,
/// creates well within its SLOs: 100 nodes and 1,000 pods. `BATON_SCALE_NODES`,
/// `BATON_SCALE_PODS` and `BATON_SCALE_RATE` run the short version
/// (500, 15,000, 300) against a release build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_nodes_and_deployments_within_the_slos() {
    let pods = env_or("BATON_SCALE_PODS", 1_000usize);
    let plan = Plan {
        nodes: env_or("BATON_SCALE_NODES", 100),
        pods,
        rate: env_or("BATON_SCALE_RATE", 50.0),
        start_delay: Duration::ZERO,
        churn: true,
        deadline: Duration::from_secs(600),
    };
    let report = run(Path::new(env!("CARGO_BIN_EXE_baton")), plan)
        .await
        .expect("the scale run completes");
    report.print();
    let missed = report.missed();
    assert!(missed.is_empty(), "SLOs missed: {missed:#?}");
    assert!(
        report.startup.len() >= pods,
        "every pod's startup was measured: {}",
        report.startup.len()
    );
}
