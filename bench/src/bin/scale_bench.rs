//! The scale run (`scripts/bench.sh scale`): hollow nodes, Deployments at a steady rate,
//! churn, and every SLO figure, at each size of the growth curve ([`baton_bench::scale`]).
//!
//! `BENCH_SCALE` lists the node counts (default `100,1000,5000`); each runs
//! `BENCH_PODS_PER_NODE` pods per node (default 30, the load test's density) created at
//! `BENCH_RATE` pods per second (default 300).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use baton_bench::env_or;
use baton_bench::scale::{run, Plan, Report};

#[tokio::main]
async fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: scale-bench BATON")?,
    );
    let sizes: String = env_or("BENCH_SCALE", "100,1000,5000".to_string());
    let per_node: usize = env_or("BENCH_PODS_PER_NODE", 30);
    let rate: f64 = env_or("BENCH_RATE", 300.0);
    let mut reports: Vec<Report> = Vec::new();
    for nodes in sizes
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
    {
        let plan = Plan {
            nodes,
            pods: nodes * per_node,
            rate,
            start_delay: Duration::ZERO,
            churn: true,
            deadline: Duration::from_secs(900),
        };
        let report = run(&bin, plan).await?;
        report.print();
        reports.push(report);
    }
    println!();
    println!("## Growth");
    println!("| nodes | pods | pod startup p99 ms | worst single-object p99 ms | worst list p99 ms | peak RSS MiB | CPU s | RSS bytes/object |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &reports {
        let worst = |lists: bool| {
            r.api
                .iter()
                .filter(|a| (a.verb == "LIST") == lists)
                .map(|a| a.p99)
                .fold(0.0, f64::max)
                * 1000.0
        };
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.plan.nodes,
            r.plan.pods,
            baton_bench::ms(r.startup_pct(0.99)),
            worst(false),
            worst(true),
            r.rss_peak_kib as f64 / 1024.0,
            r.cpu.as_secs_f64(),
            r.rss_peak_kib as f64 * 1024.0 / r.objects.max(1) as f64,
        );
    }
    for r in &reports {
        for m in r.missed() {
            println!("missed at {} nodes: {m}", r.plan.nodes);
        }
    }
    Ok(())
}
