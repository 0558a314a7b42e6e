//! `baton run`: one component, or one pod from a local manifest, without a cluster, like
//! `wasmtime run` and `wasmtime serve`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use baton_wasm_shim::{
    CliSpec, ComponentKind, ContainerSpec, HttpSpec, Mount, PodSpec, Runtime, RuntimeConfig,
};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The component to run (a .wasm file).
    #[arg(required_unless_present = "file")]
    component: Option<PathBuf>,
    /// Run the pod in this manifest instead; its images are paths to .wasm files.
    #[arg(short = 'f', long = "file", conflicts_with = "component")]
    file: Option<PathBuf>,
    /// Environment variables, KEY=VALUE.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Host directories to mount, HOST:GUEST (append :ro for read-only).
    #[arg(long = "dir")]
    dirs: Vec<String>,
    /// Where an HTTP component listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Memory limit in bytes.
    #[arg(long)]
    memory: Option<usize>,
    /// Stop a CLI component after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Where compiled components are cached.
    #[arg(long, env = "BATON_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not time requests and instance starts (the counts are kept): what the metrics
    /// benchmark compares against.
    #[arg(long)]
    no_metrics: bool,
    /// For a WASI 0.3 handler: requests one instance serves before a fresh one is made
    /// (as `wasmtime serve --max-instance-reuse-count`); 1, the default, is an instance per
    /// request. What a request leaves in the instance, the next one can see.
    #[arg(long, default_value_t = 1)]
    instance_reuse: u32,
    /// For a WASI 0.3 handler that reuses instances: requests one instance serves at once.
    #[arg(long, default_value_t = 16)]
    instance_concurrency: u32,
    /// Arguments for the component.
    #[arg(last = true)]
    args: Vec<String>,
}

fn pairs(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{kv:?} is not KEY=VALUE"))
        })
        .collect()
}

fn mounts(items: &[String]) -> Result<Vec<Mount>> {
    items
        .iter()
        .map(|d| {
            let (spec, read_only) = match d.strip_suffix(":ro") {
                Some(s) => (s, true),
                None => (d.as_str(), false),
            };
            let (host, guest) = spec
                .split_once(':')
                .with_context(|| format!("{d:?} is not HOST:GUEST"))?;
            Ok(Mount {
                host_path: PathBuf::from(host),
                guest_path: guest.to_string(),
                read_only,
            })
        })
        .collect()
}

pub async fn run(args: RunArgs) -> Result<i32> {
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: args.cache_dir.clone(),
        max_instances: 256,
        metrics: !args.no_metrics,
        ..RuntimeConfig::default()
    })?;
    if let Some(file) = &args.file {
        return run_pod(&runtime, file).await;
    }
    let path = args
        .component
        .as_deref()
        .expect("clap requires a component or -f");
    let component = runtime.load_file(path)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "component".into());
    match runtime.kind(&component)? {
        ComponentKind::Cli => {
            let spec = CliSpec {
                args: args.args.clone(),
                env: pairs(&args.env)?,
                mounts: mounts(&args.dirs)?,
                memory_bytes: args.memory.unwrap_or(0),
                timeout: args.timeout.map(Duration::from_secs),
                network: true,
                ..Default::default()
            };
            let out = runtime.run_cli(&component, &name, &spec).await?;
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            if out.exit.reason != "Completed" && out.exit.reason != "Error" {
                eprintln!("{}: {}", out.exit.reason, out.exit.message);
            }
            Ok(out.exit.code)
        }
        ComponentKind::Http => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("failed to listen on {}", args.listen))?;
            let spec = HttpSpec {
                env: pairs(&args.env)?,
                memory_bytes: args.memory.unwrap_or(0),
                reuse: (args.instance_reuse > 1).then_some(baton_wasm_shim::InstanceReuse {
                    requests: args.instance_reuse,
                    concurrent: args.instance_concurrency,
                }),
                ..Default::default()
            };
            let server = runtime.serve_http(&component, spec, listener)?;
            println!(
                "serving {} on http://{}",
                path.display(),
                server.local_addr()
            );
            tokio::signal::ctrl_c().await?;
            Ok(0)
        }
    }
}

/// Runs the pod of a local manifest; images are paths (relative to the manifest).
async fn run_pod(runtime: &Runtime, file: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read {}", file.display()))?;
    let pod: Pod = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a Pod manifest", file.display()))?;
    let spec = pod.spec.context("the Pod has no spec")?;
    let base = file.parent().unwrap_or(Path::new("."));
    let name = pod.metadata.name.unwrap_or_else(|| "pod".into());
    let mut containers = Vec::new();
    let mut cli_names = Vec::new();
    for c in &spec.containers {
        let image = c
            .image
            .as_deref()
            .with_context(|| format!("container {} has no image", c.name))?;
        let path = base.join(image);
        let component = runtime
            .load_file(&path)
            .with_context(|| format!("container {}", c.name))?;
        let env: Vec<(String, String)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        let port = c
            .ports
            .iter()
            .flatten()
            .next()
            .map(|p| p.container_port as u16);
        if runtime.kind(&component)? == ComponentKind::Cli {
            cli_names.push(c.name.clone());
        }
        containers.push(ContainerSpec {
            name: c.name.clone(),
            component,
            port,
            cli: CliSpec {
                args: c.args.clone().unwrap_or_default(),
                env: env.clone(),
                network: true,
                ..Default::default()
            },
            http: HttpSpec {
                env,
                ..Default::default()
            },
        });
    }
    // A loopback address of its own, as the node agent gives every pod; derived from the
    // process id so that two local runs do not collide.
    let pid = std::process::id();
    let ip = IpAddr::from([127, 1, (pid >> 8) as u8, (pid as u8).max(2)]);
    let mut running = runtime
        .start_pod(PodSpec {
            name: name.clone(),
            ip,
            containers,
            names: None,
        })
        .await?;
    for c in &spec.containers {
        if let Some(addr) = running.http_addr(&c.name) {
            println!("pod {name}: container {} serves http://{addr}", c.name);
        }
    }
    let mut code = 0;
    for c in cli_names {
        if let Some(out) = running.wait(&c).await {
            let out = out?;
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            println!(
                "pod {name}: container {c} exited {} ({})",
                out.exit.code, out.exit.reason
            );
            if out.exit.code != 0 {
                code = out.exit.code;
            }
        }
    }
    if spec
        .containers
        .iter()
        .any(|c| running.http_addr(&c.name).is_some())
    {
        tokio::signal::ctrl_c().await?;
    }
    Ok(code)
}
