//! Platform interfaces: what a component may use beyond WASI proper, backed by what the
//! node is given for its container.
//!
//! - **wasi:config** ([`config`]): runtime configuration, read from a [`ConfigVars`]
//!   that the node fills from the container's env and ConfigMaps and updates in place.
//! - **wasi:keyvalue** ([`keyvalue`]): buckets the pod declares, each a [`Bucket`] the
//!   node opens (node-local, or Redis).
//! - **wasi:logging** ([`logging`]): records go to the container's stderr, so to its log.
//! - **wasi:otel** ([`otel`]): spans to the node's trace exporter, log records to the
//!   container log, metrics dropped and counted.
//!
//! Each interface is a [`Capability`] granted per container ([`Platform::granted`]).
//! Every one is in the linker, so that a component can be checked against its grant
//! before it starts ([`Platform::admit`]): a component that imports an interface its
//! container was not granted is refused with [`ShimError::NotGranted`], naming it,
//! rather than failing at its first call.
//!
//! The functions are registered by hand rather than generated from WIT: each interface
//! is offered under every version its toolchains produce (wasmtime's
//! `wasi:config@0.2.0-rc.1`, Spin's `wasi:config@0.2.0-draft-2024-09-27`, …), which
//! differ in the version string only.

pub mod config;
pub mod keyvalue;
mod logging;
pub mod otel;
mod spin;

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::Linker;

pub use config::ConfigVars;
pub use keyvalue::{Bucket, KvError, MemoryBucket};

use crate::host::Host;
use crate::ShimError;

/// A platform interface, as granted by name (`baton.dev/capabilities: config,keyvalue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    Config,
    KeyValue,
    Logging,
    Otel,
}

impl Capability {
    pub const ALL: [Capability; 4] = [
        Capability::Config,
        Capability::KeyValue,
        Capability::Logging,
        Capability::Otel,
    ];

    /// The name it is granted by.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Config => "config",
            Capability::KeyValue => "keyvalue",
            Capability::Logging => "logging",
            Capability::Otel => "otel",
        }
    }

    /// The interfaces it grants: WIT packages, or single interfaces of a package
    /// (Spin's, which Baton backs with the same things).
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            Capability::Config => &["wasi:config/", "fermyon:spin/variables@", "spin:variables/"],
            Capability::KeyValue => &[
                "wasi:keyvalue/",
                "fermyon:spin/key-value@",
                "spin:key-value/",
            ],
            Capability::Logging => &["wasi:logging/"],
            Capability::Otel => &["wasi:otel/"],
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The capability an import (`wasi:config/store@0.2.0-rc.1`) needs, if any.
    pub fn of_import(import: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.prefixes().iter().any(|p| import.starts_with(p)))
    }
}

/// A set of [`Capability`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities(u8);

impl Capabilities {
    pub fn with(self, c: Capability) -> Self {
        Self(self.0 | 1 << c as u8)
    }

    pub fn has(self, c: Capability) -> bool {
        self.0 & (1 << c as u8) != 0
    }

    /// A comma-separated list of names (`config, keyvalue`); an unknown name is an error
    /// that lists the known ones.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut set = Self::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let c = Capability::parse(name).ok_or_else(|| {
                let known: Vec<_> = Capability::ALL.iter().map(|c| c.name()).collect();
                format!("unknown capability {name:?} (known: {})", known.join(", "))
            })?;
            set = set.with(c);
        }
        Ok(set)
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        iter.into_iter().fold(Self::default(), Self::with)
    }
}

/// What a container's components get of the platform interfaces: which are granted,
/// and what backs them. Cheap to clone; every instance of the container shares it.
#[derive(Clone, Default)]
pub struct Platform {
    granted: Capabilities,
    config: ConfigVars,
    buckets: Arc<BTreeMap<String, Arc<dyn Bucket>>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("granted", &self.granted)
            .field("buckets", &self.buckets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Platform {
    pub fn new(granted: Capabilities) -> Self {
        Self {
            granted,
            ..Self::default()
        }
    }

    /// Its wasi:config values: the node keeps a clone to update them.
    pub fn with_config(mut self, config: ConfigVars) -> Self {
        self.config = config;
        self
    }

    /// A wasi:keyvalue bucket its components open by `name`.
    pub fn with_bucket(mut self, name: impl Into<String>, bucket: Arc<dyn Bucket>) -> Self {
        Arc::make_mut(&mut self.buckets).insert(name.into(), bucket);
        self
    }

    pub fn granted(&self) -> Capabilities {
        self.granted
    }

    pub fn config(&self) -> &ConfigVars {
        &self.config
    }

    pub(crate) fn bucket(&self, name: &str) -> Option<Arc<dyn Bucket>> {
        self.buckets.get(name).cloned()
    }

    /// Refuses a component that imports a platform interface this container was not
    /// granted, or one the node does not provide.
    pub(crate) fn admit(&self, imports: &[String]) -> Result<(), ShimError> {
        for import in imports {
            let Some(c) = Capability::of_import(import) else {
                continue;
            };
            if !self.granted.has(c) {
                return Err(ShimError::NotGranted {
                    interface: import.clone(),
                    capability: c.name(),
                });
            }
        }
        Ok(())
    }
}

/// A store's share of its container's platform.
pub(crate) struct StorePlatform {
    pub platform: Platform,
    /// Where wasi:logging writes: the same stream as the instance's stderr.
    pub log_sink: Option<Box<dyn wasmtime_wasi::cli::StdoutStream>>,
}

/// Writes one line to where the instance's log records go (its stderr), if anywhere. A
/// line that cannot be written is not the guest's failure.
pub(crate) fn write_log_line(host: &Host, line: &str) -> impl std::future::Future<Output = ()> {
    use tokio::io::AsyncWriteExt as _;
    // Taken now: the host's state is not to be held across the write.
    let sink = host.log_sink.as_ref().map(|s| s.async_stream());
    let line = line.to_string();
    async move {
        let Some(w) = sink else { return };
        let mut w = Box::into_pin(w);
        let _ = w.write_all(line.as_bytes()).await;
        let _ = w.flush().await;
    }
}

/// Registers every platform interface. A call checks nothing more than the linker does:
/// [`Platform::admit`] kept an ungranted component from starting.
pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    config::add_to_linker(linker)?;
    keyvalue::add_to_linker(linker)?;
    logging::add_to_linker(linker)?;
    otel::add_to_linker(linker)?;
    spin::add_to_linker(linker)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_admitted_by_their_grant() {
        let imports = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let platform = Platform::new(Capabilities::parse("config, logging").unwrap());
        assert!(platform
            .admit(&imports(&[
                "wasi:cli/environment@0.2.0",
                "wasi:config/store@0.2.0-rc.1",
                "wasi:logging/logging@0.1.0-draft",
            ]))
            .is_ok());
        let refused = platform
            .admit(&imports(&["wasi:keyvalue/store@0.2.0-draft"]))
            .unwrap_err();
        assert!(
            matches!(&refused, ShimError::NotGranted { interface, capability: "keyvalue" }
                if interface == "wasi:keyvalue/store@0.2.0-draft"),
            "{refused}"
        );
        // A package whose name only starts like one is not it.
        assert_eq!(Capability::of_import("wasi:configx/store@1.0.0"), None);
        // Spin's variables and key-value are granted as config and keyvalue.
        assert_eq!(
            Capability::of_import("fermyon:spin/variables@2.0.0"),
            Some(Capability::Config)
        );
        assert_eq!(
            Capability::of_import("spin:key-value/key-value@3.0.0"),
            Some(Capability::KeyValue)
        );
        assert_eq!(Capability::of_import("fermyon:spin/llm@2.0.0"), None);
        assert!(Capabilities::parse("config,files").is_err());
    }
}
