//! API server benchmark: create, get, list and watch-delivery latency through kube-rs,
//! against `baton up` on the embedded store, at 1 and 64 concurrent clients.
//!
//! Usage: `api-bench BATON_BINARY` (see `scripts/bench.sh api`). `BENCH_OPS` sets the
//! operations per client per cell (default 300).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use baton_bench::{env_or, ms, pct, up};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": v}}))
        .expect("a valid ConfigMap")
}

async fn run<F, Fut>(clients: usize, ops: usize, f: F) -> Result<(f64, Vec<Duration>)>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(ops);
            for i in 0..ops {
                let t0 = Instant::now();
                f(c, i).await?;
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / start.elapsed().as_secs_f64(), all))
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: api-bench BATON_BINARY")?,
    );
    let ops: usize = env_or("BENCH_OPS", 300);
    let up = up(&bin, &[]).await?;
    let client = up.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    println!("API server benchmark: kube-rs over HTTPS against `baton up` (embedded store), {ops} ops per client per cell");
    println!("| op | clients | ops/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for clients in [1usize, 64] {
        let api = cms.clone();
        let (rate, mut lat) = run(clients, ops, move |c, i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &cm(&format!("c{clients}-{c}-{i}"), "x"),
                )
                .await?;
                Ok(())
            }
        })
        .await?;
        println!(
            "| create | {clients} | {rate:.0} | {} | {} |",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99))
        );
        let api = cms.clone();
        let (rate, mut lat) = run(clients, ops, move |c, i| {
            let api = api.clone();
            async move {
                api.get(&format!("c{clients}-{c}-{}", (i * 7) % ops))
                    .await?;
                Ok(())
            }
        })
        .await?;
        println!(
            "| get | {clients} | {rate:.0} | {} | {} |",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99))
        );
    }
    // Lists of a namespace with 100 objects.
    let listed: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-public");
    for i in 0..100 {
        listed
            .create(&PostParams::default(), &cm(&format!("l{i}"), "x"))
            .await?;
    }
    for clients in [1usize, 64] {
        let api = listed.clone();
        let (rate, mut lat) = run(clients, ops / 4, move |_, _| {
            let api = api.clone();
            async move {
                let l = api.list(&ListParams::default()).await?;
                anyhow::ensure!(l.items.len() == 100);
                Ok(())
            }
        })
        .await?;
        println!(
            "| list (100 objects) | {clients} | {rate:.0} | {} | {} |",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99))
        );
    }
    // Watch delivery: writers stamp the send time; a watcher measures its arrival.
    let watched: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-node-lease");
    for clients in [1usize, 64] {
        let rv = watched
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let mut stream = watched
            .watch(&WatchParams::default().timeout(290), &rv)
            .await?
            .boxed();
        let total = clients * (ops / 4);
        let collector = tokio::spawn(async move {
            let mut lat = Vec::new();
            while lat.len() < total {
                match stream.next().await {
                    Some(Ok(WatchEvent::Added(o))) => {
                        let sent: u128 = o
                            .data
                            .as_ref()
                            .and_then(|d| d.get("v"))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_nanos();
                        lat.push(Duration::from_nanos((now.saturating_sub(sent)) as u64));
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            lat
        });
        let api = watched.clone();
        run(clients, ops / 4, move |c, i| {
            let api = api.clone();
            async move {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)?
                    .as_nanos()
                    .to_string();
                api.create(
                    &PostParams::default(),
                    &cm(&format!("w{clients}-{c}-{i}"), &stamp),
                )
                .await?;
                Ok(())
            }
        })
        .await?;
        let mut lat = tokio::time::timeout(Duration::from_secs(60), collector).await??;
        anyhow::ensure!(
            lat.len() == total,
            "watch delivered {} of {total} events",
            lat.len()
        );
        println!(
            "| watch delivery | {clients} writers | - | {} | {} |",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99))
        );
    }
    println!("goal: p99 <= 10 ms for create and get at 64 clients (Kubernetes SLO: 1 s)");
    Ok(())
}
