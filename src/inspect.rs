//! `baton inspect FILE...`: what a component is and whether this Baton can run it:
//! its kind (a wasi:http handler or a wasi:cli command) and WASI version, the platform
//! interfaces its container must be granted (`baton.dev/capabilities`), and the imports
//! no Baton node provides, if any. Exits non-zero if one cannot run.

use std::path::PathBuf;

use anyhow::Result;
use baton_wasm_shim::{Capability, Runtime, RuntimeConfig};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Component files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Prints one line per file; the count of files that cannot run is the exit code.
pub fn inspect(args: InspectArgs) -> Result<u8> {
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 1,
        ..RuntimeConfig::default()
    })?;
    let mut unrunnable = 0u8;
    for file in &args.files {
        let name = file.display();
        let component = match rt.load_file(file) {
            Ok(c) => c,
            Err(e) => {
                println!("{name}: not loadable: {e}");
                unrunnable = unrunnable.saturating_add(1);
                continue;
            }
        };
        let kind = match rt.kind(&component) {
            Ok(k) => k.name(),
            Err(e) => {
                println!("{name}: not runnable: {e}");
                unrunnable = unrunnable.saturating_add(1);
                continue;
            }
        };
        let wasi = if rt.is_wasi_03(&component) {
            "0.3"
        } else {
            "0.2"
        };
        let mut needs: Vec<&str> = rt
            .imports(&component)
            .iter()
            .filter_map(|i| Capability::of_import(i))
            .map(Capability::name)
            .collect();
        needs.sort_unstable();
        needs.dedup();
        let needs = if needs.is_empty() {
            "none".to_string()
        } else {
            needs.join(",")
        };
        match rt.check_links(&component) {
            Ok(()) => println!("{name}: runs: {kind}, WASI {wasi}, capabilities: {needs}"),
            Err(e) => {
                println!("{name}: does not link: {kind}, WASI {wasi}: {e}");
                unrunnable = unrunnable.saturating_add(1);
            }
        }
    }
    Ok(unrunnable)
}
