//! The node-wide runtime: one wasmtime `Engine`, its settings, and component loading.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi_http::WasiHttpCtx;

use crate::error::{chain, ShimError};
use crate::host::{Host, Limits};
use crate::net::{NetLimits, PodNet, StoreNet};

/// Node settings that size the engine.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; None disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Component instances alive at once on this node (the pooling allocator's slots):
    /// every running CLI component and every in-flight HTTP request takes one.
    pub max_instances: u32,
    /// Largest linear memory any instance may have; pods ask for less with
    /// `resources.limits.memory`.
    pub max_memory_bytes: usize,
    /// How often the engine's epoch advances: the granularity of CPU deadlines and of
    /// yielding a busy guest to the others.
    pub epoch_tick: Duration,
    /// Per-pod caps on sockets, outgoing requests and handles.
    pub net_limits: NetLimits,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_instances: 1000,
            max_memory_bytes: 256 << 20,
            epoch_tick: Duration::from_millis(10),
            net_limits: NetLimits::default(),
        }
    }
}

/// What a component is, told from its exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComponentKind {
    /// Exports `wasi:cli/run`.
    Cli,
    /// Exports `wasi:http/incoming-handler`.
    Http,
}

impl ComponentKind {
    pub fn name(self) -> &'static str {
        match self {
            ComponentKind::Cli => "wasi:cli command",
            ComponentKind::Http => "wasi:http proxy",
        }
    }
}

/// Why the store stopped a guest.
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded: the guest ran past its time budget")]
pub(crate) struct DeadlineExceeded;

/// The node's Wasm runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Arc<Linker<Host>>,
    cfg: RuntimeConfig,
    _ticker: Arc<Ticker>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("cfg", &self.cfg).finish()
    }
}

/// Advances the epoch from a thread of its own; stops when the runtime is dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig) -> Result<Self, ShimError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let mut pool = PoolingAllocationConfig::default();
        // One component instance may hold several core instances, memories and tables
        // (the std adapter and the program); size the pools for a few each.
        pool.total_component_instances(cfg.max_instances);
        pool.total_core_instances(cfg.max_instances * 4);
        pool.total_memories(cfg.max_instances * 2);
        pool.total_tables(cfg.max_instances * 4);
        pool.max_memory_size(cfg.max_memory_bytes);
        // Freed slots keep their pages resident up to this size, so reusing a slot for the
        // next request costs no page faults.
        pool.linear_memory_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| ShimError::Setup(chain(&e)))?;
        let mut linker = Linker::new(&engine);
        // Includes wasi:cli's `exit-with-code`, for components that report any exit code;
        // Rust's std on wasip2 only reports success (0) or failure (1).
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| ShimError::Setup(chain(&e)))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| ShimError::Setup(chain(&e)))?;
        crate::net::add_to_linker(&mut linker).map_err(|e| ShimError::Setup(chain(&e)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e2, s2, tick) = (engine.clone(), stop.clone(), cfg.epoch_tick);
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    e2.increment_epoch();
                }
            })
            .map_err(|e| ShimError::Setup(e.to_string()))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cfg,
            _ticker: Arc::new(Ticker { stop }),
        })
    }

    /// The network of a component run on its own: the node's loopback, no name overrides.
    pub(crate) fn loopback_net(&self) -> Arc<PodNet> {
        PodNet::new(IpAddr::from([127, 0, 0, 1]), None, self.cfg.net_limits)
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Loads (compiling or from the cache) the component in a file.
    pub fn load_file(&self, path: &Path) -> Result<Component, ShimError> {
        let wasm = std::fs::read(path).map_err(|source| ShimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        crate::cache::load(&self.engine, &wasm, path, self.cfg.cache_dir.as_deref())
    }

    /// Loads a component from bytes (`source` names it in errors).
    pub fn load_bytes(&self, wasm: &[u8], source: &Path) -> Result<Component, ShimError> {
        crate::cache::load(&self.engine, wasm, source, self.cfg.cache_dir.as_deref())
    }

    /// What a component is, from its exports.
    pub fn kind(&self, component: &Component) -> Result<ComponentKind, ShimError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        if exports
            .iter()
            .any(|e| e.starts_with("wasi:http/incoming-handler@0.2"))
        {
            Ok(ComponentKind::Http)
        } else if exports.iter().any(|e| e.starts_with("wasi:cli/run@0.2")) {
            Ok(ComponentKind::Cli)
        } else {
            Err(ShimError::UnknownKind {
                exports: exports.join(", "),
            })
        }
    }

    /// Refuses a component of another kind than the way it is about to be run.
    pub(crate) fn expect_kind(
        &self,
        component: &Component,
        wanted: ComponentKind,
    ) -> Result<(), ShimError> {
        let found = self.kind(component)?;
        if found != wanted {
            return Err(ShimError::WrongKind {
                found: found.name(),
                wanted: wanted.name(),
            });
        }
        Ok(())
    }

    /// A store for one instance, with its memory cap (0: the runtime maximum) and time budget.
    pub(crate) fn store(
        &self,
        wasi: WasiCtx,
        memory_bytes: usize,
        budget: Option<Duration>,
        net: Arc<PodNet>,
    ) -> (Store<Host>, Arc<AtomicBool>) {
        let hit_memory = Arc::new(AtomicBool::new(false));
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.cfg.net_limits.max_handles);
        let net = StoreNet::new(net);
        let host = Host {
            hooks: net.hooks(),
            net,
            wasi,
            http: WasiHttpCtx::new(),
            table,
            limits: Limits {
                memory_bytes: if memory_bytes == 0 {
                    self.cfg.max_memory_bytes
                } else {
                    memory_bytes.min(self.cfg.max_memory_bytes)
                },
                max_tables_elements: 1 << 20,
                hit_memory: hit_memory.clone(),
            },
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        let deadline = budget.map(|b| Instant::now() + b);
        store.epoch_deadline_callback(move |_| match deadline {
            Some(d) if Instant::now() >= d => Err(DeadlineExceeded.into()),
            // Yield at every tick, so a busy guest shares the thread with its neighbours.
            _ => Ok(UpdateDeadline::Yield(1)),
        });
        store.set_epoch_deadline(1);
        (store, hit_memory)
    }
}
