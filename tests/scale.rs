//! The short scale run: 500 hollow nodes and 15,000 pods through Deployments, then churn,
//! with Kubernetes' SLOs as assertions (API calls p99 ≤ 1 s, lists ≤ 30 s, pod startup
//! p99 ≤ 5 s). The full run is `scripts/bench.sh scale` ([`baton_bench::scale`]).

use std::path::Path;
use std::time::Duration;

use baton_bench::scale::{run, Plan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_hollow_nodes_and_fifteen_thousand_pods_within_the_slos() {
    let plan = Plan {
        nodes: 500,
        pods: 15_000,
        rate: 300.0,
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
        report.startup.len() >= 15_000,
        "every pod's startup was measured: {}",
        report.startup.len()
    );
}
