//! wasi:config (runtime config): a component reads keys its node gives it, rather than
//! environment variables fixed at its start.
//!
//! The values are a [`ConfigVars`], shared by the node and every instance of the
//! container. The node replaces them when their source changes (a ConfigMap is
//! edited), and the next `get` sees the new values: a component that reads a key per
//! request, or now and then, follows its configuration without a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use wasmtime::component::{ComponentType, Lift, Linker, Lower};

use crate::host::Host;

/// The interface's versions in use: wasmtime's (`wasmtime-wasi-config`), and the draft
/// Spin and wasmCloud components import. Their functions and types are the same.
const VERSIONS: &[&str] = &["0.2.0-rc.1", "0.2.0-draft", "0.2.0-draft-2024-09-27"];

/// A container's configuration: key to value.
#[derive(Clone, Debug, Default)]
pub struct ConfigVars(Arc<RwLock<Arc<BTreeMap<String, String>>>>);

impl ConfigVars {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(values))))
    }

    /// Replaces every value; instances read the new ones from their next call.
    pub fn set(&self, values: BTreeMap<String, String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(values);
    }

    /// The values now.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, String>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// wasi:config's `error`; the node's values never fail to read, so it is not returned.
#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(variant)]
enum ConfigError {
    #[component(name = "upstream")]
    #[allow(dead_code)]
    Upstream(String),
    #[component(name = "io")]
    #[allow(dead_code)]
    Io(String),
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    for version in VERSIONS {
        let mut store = linker.instance(&format!("wasi:config/store@{version}"))?;
        store.func_wrap("get", |store, (key,): (String,)| {
            let values = store.data().platform.config().snapshot();
            Ok((Ok::<_, ConfigError>(values.get(&key).cloned()),))
        })?;
        store.func_wrap("get-all", |store, (): ()| {
            let values = store.data().platform.config().snapshot();
            let all: Vec<(String, String)> =
                values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            Ok((Ok::<_, ConfigError>(all),))
        })?;
    }
    Ok(())
}
