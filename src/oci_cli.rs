//! `baton push`, `baton pull` and `baton images`: Wasm components and OCI registries.

use std::path::PathBuf;

use anyhow::{Context, Result};
use baton_oci::{Auth, OciConfig, PullPolicy, Registry};
use clap::Args;

/// How to reach a registry.
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Talk plain HTTP to this registry (host:port); repeatable.
    #[arg(long = "insecure-registry")]
    pub insecure: Vec<String>,
    /// Trust this CA certificate (PEM) for registries; repeatable.
    #[arg(long = "registry-ca")]
    pub ca: Vec<PathBuf>,
    /// Registry user (with --password).
    #[arg(long, env = "BATON_REGISTRY_USER")]
    pub username: Option<String>,
    /// Registry password.
    #[arg(long, env = "BATON_REGISTRY_PASSWORD")]
    pub password: Option<String>,
}

impl RegistryArgs {
    pub fn oci_config(&self, cache_dir: PathBuf) -> Result<OciConfig> {
        let mut cfg = OciConfig::new(cache_dir);
        cfg.insecure_registries = self.insecure.clone();
        for ca in &self.ca {
            cfg.extra_ca_pem.push(
                std::fs::read(ca).with_context(|| format!("failed to read {}", ca.display()))?,
            );
        }
        Ok(cfg)
    }

    fn auth(&self) -> Auth {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Auth::Basic {
                username: u.clone(),
                password: p.clone(),
            },
            _ => Auth::Anonymous,
        }
    }
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The component to push.
    pub file: PathBuf,
    /// Where to: REGISTRY/REPOSITORY:TAG.
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// What to pull: REGISTRY/REPOSITORY:TAG or @sha256:DIGEST.
    pub reference: String,
    /// The image cache to pull into.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// The image cache to list.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// The node's image cache under the default data directory of `baton up`.
fn default_cache(data_dir: PathBuf) -> PathBuf {
    data_dir.join("node/images")
}

fn progress(done: u64, total: u64) {
    eprintln!(
        "  {:>5.1}%  {done} / {total} bytes",
        if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        }
    );
}

pub async fn push(args: PushArgs) -> Result<()> {
    let wasm = std::fs::read(&args.file)
        .with_context(|| format!("failed to read {}", args.file.display()))?;
    // The push needs a cache directory for its own bookkeeping and keeps nothing: it is
    // removed when this function returns, however it returns.
    let scratch = tempfile::Builder::new()
        .prefix("baton-push-")
        .tempdir()
        .context("failed to make a scratch directory for the push")?;
    let registry = Registry::new(args.registry.oci_config(scratch.path().to_path_buf())?)?;
    eprintln!(
        "pushing {} ({} bytes) to {}",
        args.file.display(),
        wasm.len(),
        args.reference
    );
    let digest = registry
        .push(
            &wasm,
            &baton_oci::title_of(&args.file),
            &args.reference,
            &args.registry.auth(),
            Some(&progress),
        )
        .await
        .with_context(|| format!("failed to push to {}", args.reference))?;
    println!("{digest}");
    Ok(())
}

pub async fn pull(args: PullArgs, data_dir: PathBuf) -> Result<()> {
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_cache(data_dir));
    let registry = Registry::new(args.registry.oci_config(cache)?)?;
    let pulled = registry
        .pull(
            &args.reference,
            &args.registry.auth(),
            PullPolicy::Always,
            Some(&progress),
        )
        .await
        .with_context(|| format!("failed to pull {}", args.reference))?;
    println!(
        "{} {} {} bytes{}",
        pulled.manifest_digest,
        pulled.path.display(),
        pulled.size,
        if pulled.cached {
            " (already cached)"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn images(args: ImagesArgs, data_dir: PathBuf) -> Result<()> {
    let cache = args.cache_dir.unwrap_or_else(|| default_cache(data_dir));
    let c = baton_oci::Cache::open(&cache)?;
    println!("{:<60} {:<20} {:>10}", "REFERENCE", "DIGEST", "SIZE");
    for e in c.list() {
        println!(
            "{:<60} {:<20} {:>10}",
            e.reference,
            &e.manifest[..e.manifest.len().min(19)],
            e.size
        );
    }
    Ok(())
}
