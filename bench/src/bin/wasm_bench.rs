//! Wasm runtime benchmark: the pod sandbox against `wasmtime serve`, cold start, density.
//!
//! - **Throughput:** `http-hello` served by `baton run` and by `wasmtime serve` (wasmtime-cli
//!   48, same file, same flags where they exist), one after the other, under the same load
//!   generator: keep-alive HTTP/1.1 connections, each sending requests back to back, for a
//!   fixed time. Prints requests/s, p50, p99, server CPU per request and the ratio; and
//!   Baton once more with `--no-metrics`, for what its request metrics cost.
//! - **Cold start:** in-process; a component is loaded from the on-disk cache, a pod is
//!   started with it, and a client waits for its first response. Prints p50/p99 of the load
//!   and of pod start to first response, over 200 pods.
//! - **Density:** in-process; 1,000 `http-hello` pods started in one runtime, each on its
//!   own loopback address. Prints resident memory per pod, idle and after one request each.
//! - **WASI 0.3:** `http-hello` built for 0.3 (`p3-http-hello`) beside the 0.2 build, both
//!   served by `baton run`, and beside `wasmtime serve` on the 0.3 build, which reuses an
//!   instance for up to 128 requests, 16 at once, by default. Baton gives each request a
//!   fresh instance unless asked (`--instance-reuse`): both ways, and `wasmtime serve`
//!   both ways. Prints requests/s, p50, p99 and the ratio.
//!
//! Usage: `wasm-bench BATON_BINARY WASMTIME_BINARY GUEST_DIR` (see `scripts/bench.sh wasm`).
//! `BENCH_SECS` sets the seconds per throughput cell (default 5); `BENCH_PARTS` picks parts
//! (`throughput,cold,density,p3`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use baton_bench::http::{self, get_once, measure};
use baton_bench::{env_or, ms, pct, rss_kib, wait_until, Procs};
use baton_testkit::process::announced_addr;
use baton_wasm_shim::{CliSpec, ContainerSpec, HttpSpec, PodSpec, Runtime, RuntimeConfig};

/// Which of a server's output streams says where it listens, and how.
enum Announces {
    Stdout(&'static str),
    Stderr(&'static str),
}

/// Starts a server process on port 0, reads the address it announces and waits until it
/// answers HTTP there.
async fn serve(cmd: &mut Command, announces: Announces) -> Result<(Procs, SocketAddr)> {
    let (out, err) = match announces {
        Announces::Stdout(_) => (Stdio::piped(), Stdio::null()),
        Announces::Stderr(_) => (Stdio::null(), Stdio::piped()),
    };
    let mut child = cmd
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let wait = Duration::from_secs(60);
    let addr = match announces {
        Announces::Stdout(m) => announced_addr(child.stdout.take().context("stdout")?, m, wait),
        Announces::Stderr(m) => announced_addr(child.stderr.take().context("stderr")?, m, wait),
    };
    let procs = Procs(vec![child]);
    let addr = addr.with_context(|| format!("{cmd:?} did not say where it listens"))?;
    wait_until("the server to answer", || async move {
        get_once(addr).await.is_ok()
    })
    .await?;
    Ok((procs, addr))
}

async fn throughput(baton: &Path, wasmtime: &Path, wasm: &Path, secs: f64) -> Result<()> {
    let cache = tempfile::tempdir()?;
    println!("## Throughput: http-hello, keep-alive HTTP/1.1, {secs} s per cell, same machine");
    println!("| clients | server | req/s | p50 ms | p99 ms | server CPU us/req | req/s ratio to wasmtime serve / tuned |");
    println!("|---|---|---|---|---|---|---|");
    let mut costs = Vec::new();
    for clients in [1usize, 16, 64] {
        // Baton with its request metrics (the default), then without them.
        let mut runs = Vec::new();
        for extra in [&[][..], &["--no-metrics"][..]] {
            let (procs, addr) = serve(
                Command::new(baton)
                    .arg("run")
                    .arg(wasm)
                    .args(["--listen", "127.0.0.1:0", "-e", "GREETING=hi"])
                    .args(extra)
                    .arg("--cache-dir")
                    .arg(cache.path())
                    .env("RUST_LOG", "error"),
                Announces::Stdout(" on http://"),
            )
            .await?;
            runs.push(measure(&procs, addr, clients, secs).await?);
            drop(procs);
        }
        let off = runs.pop().expect("two runs");
        let b = runs.pop().expect("two runs");
        costs.push((clients, 1.0 - b.rate / off.rate));
        let mut peers = Vec::new();
        for (name, options) in baton_bench::WASMTIME_PEERS {
            let (procs, addr) = serve(
                &mut baton_bench::wasmtime_serve(wasmtime, options, wasm),
                Announces::Stderr(" on http://"),
            )
            .await?;
            peers.push((name, measure(&procs, addr, clients, secs).await?));
            drop(procs);
        }
        let w = &peers[0].1;
        let ratios = |rate: f64| {
            peers
                .iter()
                .map(|(_, p)| format!("{:.2}x", rate / p.rate))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let mut rows = vec![
            ("baton", &b, ratios(b.rate)),
            ("baton --no-metrics", &off, ratios(off.rate)),
        ];
        for (name, p) in &peers {
            rows.push((name, p, format!("{:.2}x", p.rate / w.rate)));
        }
        for (name, r, ratio) in rows {
            println!(
                "| {clients} | {name} | {:.0} | {} | {} | {:.0} | {ratio} |",
                r.rate,
                ms(r.p50),
                ms(r.p99),
                r.cpu_us
            );
        }
    }
    println!("goal: >= 0.9x the requests/s of `wasmtime serve`");
    let costs: Vec<String> = costs
        .iter()
        .map(|(c, cost)| format!("{:+.1}% at {c}", cost * 100.0))
        .collect();
    println!(
        "cost of the request metrics (1 - req/s with them / without): {}; goal: under 3%",
        costs.join(", ")
    );
    Ok(())
}

/// The 0.3 build of http-hello beside its 0.2 build and beside `wasmtime serve`.
async fn wasi_03(baton: &Path, wasmtime: &Path, guests: &Path, secs: f64) -> Result<()> {
    let cache = tempfile::tempdir()?;
    let (p2, p3) = (
        guests.join("http-hello.wasm"),
        guests.join("p3-http-hello.wasm"),
    );
    println!();
    println!(
        "## WASI 0.3: http-hello built for 0.3 and for 0.2, keep-alive HTTP/1.1, {secs} s per cell"
    );
    println!("| clients | server | req/s | p50 ms | p99 ms | server CPU us/req | req/s ratio to wasmtime serve (0.3) |");
    println!("|---|---|---|---|---|---|---|");
    for clients in [1usize, 16, 64] {
        let mut rows = Vec::new();
        let reused: &[&str] = &["--instance-reuse", "128", "--instance-concurrency", "16"];
        for (name, wasm, extra) in [
            ("baton, 0.3 build", &p3, &[][..]),
            (
                "baton, 0.3 build, instances reused as wasmtime serve does",
                &p3,
                reused,
            ),
            ("baton, 0.2 build", &p2, &[][..]),
        ] {
            let (procs, addr) = serve(
                Command::new(baton)
                    .arg("run")
                    .arg(wasm)
                    .args(["--listen", "127.0.0.1:0", "-e", "GREETING=hi"])
                    .args(extra)
                    .arg("--cache-dir")
                    .arg(cache.path())
                    .env("RUST_LOG", "error"),
                Announces::Stdout(" on http://"),
            )
            .await?;
            rows.push((name, measure(&procs, addr, clients, secs).await?));
            drop(procs);
        }
        // wasmtime serve as it comes, then with an instance per request as Baton has.
        let mut peer = 0.0;
        for (name, options) in [
            ("wasmtime serve, 0.3 build", &[][..]),
            (
                "wasmtime serve, 0.3 build, an instance per request",
                &["--max-instance-reuse-count", "1"][..],
            ),
        ] {
            let (procs, addr) = serve(
                &mut baton_bench::wasmtime_serve(wasmtime, options, &p3),
                Announces::Stderr(" on http://"),
            )
            .await?;
            let r = measure(&procs, addr, clients, secs).await?;
            drop(procs);
            if peer == 0.0 {
                peer = r.rate;
            }
            rows.push((name, r));
        }
        for (name, r) in &rows {
            println!(
                "| {clients} | {name} | {:.0} | {} | {} | {:.0} | {:.2}x |",
                r.rate,
                ms(r.p50),
                ms(r.p99),
                r.cpu_us,
                r.rate / peer
            );
        }
    }
    println!("goal: baton on the 0.3 build >= 0.9x the requests/s of `wasmtime serve` on it");
    Ok(())
}

fn web_pod(component: &wasmtime::component::Component, ip: IpAddr) -> PodSpec {
    PodSpec {
        name: format!("pod-{ip}"),
        ip,
        containers: vec![ContainerSpec {
            name: "web".into(),
            component: component.clone(),
            port: Some(8080),
            cli: CliSpec::default(),
            http: HttpSpec {
                env: vec![("GREETING".into(), "hi".into())],
                ..Default::default()
            },
        }],
        names: None,
    }
}

/// One GET over a fresh connection, for `BENCH_COLD_PODS` pods (200 by default), each
/// split into its steps so that a tail can be placed: the pod's start, the connection,
/// and the first request (the component's instantiation and its answer).
async fn cold_start(wasm: &Path) -> Result<()> {
    let pods: u32 = env_or("BENCH_COLD_PODS", 200);
    let cache = tempfile::tempdir()?;
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    })?;
    rt.load_file(wasm)?; // compiles and fills the cache
    let (mut loads, mut firsts) = (Vec::new(), Vec::new());
    let (mut starts, mut connects, mut requests) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pods {
        let t0 = Instant::now();
        let component = rt.load_file(wasm)?;
        loads.push(t0.elapsed());
        let t1 = Instant::now();
        let ip = IpAddr::from([127, 3, (i / 250) as u8, (i % 250 + 1) as u8]);
        let pod = rt.start_pod(web_pod(&component, ip)).await?;
        starts.push(t1.elapsed());
        let t2 = Instant::now();
        let mut conn = http::connect(pod.http_addr("web").context("web serves")?).await?;
        connects.push(t2.elapsed());
        requests.push(http::request(&mut conn).await?);
        firsts.push(t1.elapsed());
    }
    println!();
    println!("## Cold start: {pods} pods, component from the on-disk cache");
    println!("| step | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    let row = |step: &str, v: &mut Vec<Duration>| {
        let (p50, p90) = (pct(v, 0.5), pct(v, 0.9));
        let (p99, max) = (pct(v, 0.99), pct(v, 1.0));
        println!(
            "| {step} | {} | {} | {} | {} |",
            ms(p50),
            ms(p90),
            ms(p99),
            ms(max)
        );
    };
    row("load the cached component", &mut loads);
    row("start the pod", &mut starts);
    row("connect", &mut connects);
    row("first request", &mut requests);
    row("pod start to first response", &mut firsts);

    // A node loads an image's component once and starts every later pod of it from the
    // same one (`node/src/images.rs`): the Deployment's case.
    let component = rt.load_file(wasm)?;
    let mut again = Vec::new();
    for i in 0..pods {
        let t0 = Instant::now();
        let ip = IpAddr::from([127, 5, (i / 250) as u8, (i % 250 + 1) as u8]);
        let pod = rt.start_pod(web_pod(&component, ip)).await?;
        get_once(pod.http_addr("web").context("web serves")?).await?;
        again.push(t0.elapsed());
    }
    row("the same, a component already loaded", &mut again);
    println!("goal: first response <= 1 ms after loading a cached component");
    Ok(())
}

async fn density(wasm: &Path, pods: u32) -> Result<()> {
    let rt = Runtime::new(RuntimeConfig::default())?;
    let component = rt.load_file(wasm)?;
    // One request first, so that the runtime's shared, one-time costs (code pages, the
    // first pool slot) are in the baseline rather than charged to the pods.
    let warm = rt
        .start_pod(web_pod(&component, IpAddr::from([127, 4, 255, 1])))
        .await?;
    get_once(warm.http_addr("web").context("web serves")?).await?;
    let me = std::process::id();
    let base = rss_kib(me);
    let mut running = Vec::new();
    for i in 0..pods {
        let ip = IpAddr::from([127, 4, (i / 250) as u8, (i % 250 + 1) as u8]);
        running.push(rt.start_pod(web_pod(&component, ip)).await?);
    }
    let idle = rss_kib(me);
    for chunk in running.chunks(16) {
        let gets: Vec<_> = chunk
            .iter()
            .filter_map(|p| p.http_addr("web"))
            .map(|a| tokio::spawn(get_once(a)))
            .collect();
        for g in gets {
            g.await??;
        }
    }
    let served = rss_kib(me);
    println!();
    println!("## Density: {pods} http-hello pods in one process");
    println!("| state | resident KiB per pod |");
    println!("|---|---|");
    println!(
        "| idle, after start | {:.1} |",
        idle.saturating_sub(base) as f64 / pods as f64
    );
    println!(
        "| after one request each | {:.1} |",
        served.saturating_sub(base) as f64 / pods as f64
    );
    println!("goal: <= 256 KiB per idle pod beyond the shared compiled code");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let usage = "usage: wasm-bench BATON_BINARY WASMTIME_BINARY GUEST_DIR";
    let baton = args.next().context(usage)?;
    let wasmtime = args.next().context(usage)?;
    let guests = args.next().context(usage)?;
    let wasm = guests.join("http-hello.wasm");
    let secs: f64 = env_or("BENCH_SECS", 5.0);
    // BENCH_PARTS picks parts, e.g. "cold,density"; all by default.
    let parts =
        std::env::var("BENCH_PARTS").unwrap_or_else(|_| "throughput,cold,density,p3".into());
    if parts.contains("throughput") {
        throughput(&baton, &wasmtime, &wasm, secs).await?;
    }
    if parts.contains("cold") {
        cold_start(&wasm).await?;
    }
    if parts.contains("density") {
        density(&wasm, env_or("BENCH_PODS", 1000)).await?;
    }
    if parts.contains("p3") {
        wasi_03(&baton, &wasmtime, &guests, secs).await?;
    }
    Ok(())
}
