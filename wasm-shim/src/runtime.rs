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
    /// How often the engine's epoch advances while guests are being preempted: the
    /// granularity of CPU deadlines, of CPU quotas and of yielding a busy guest to the
    /// others. 250 µs keeps a neighbour's wait behind spinning guests to a fraction of a
    /// millisecond; the tick is one atomic increment, a yield a few microseconds, and a
    /// guest yields only after running a whole tick in one go. While no guest has been
    /// preempted for [`CALM_AFTER`], the epoch advances [`CALM_FACTOR`] times less often
    /// (see [`Pace`]).
    pub epoch_tick: Duration,
    /// Per-pod caps on sockets, outgoing requests and handles.
    pub net_limits: NetLimits,
    /// Largest component file [`Runtime::load_file`] reads.
    pub max_component_bytes: u64,
    /// Threads that run guests, per tier (0: one per CPU). They are separate from the
    /// threads of the process's own work, so that busy guests cannot starve it; guests
    /// that keep the CPU busy run on a second, lower-priority tier (see `tiers.rs`).
    pub guest_threads: usize,
    /// The nice value of the guest threads (0 to 19). 0 by default, for a process that
    /// only runs guests (`baton run`); a node that shares its process with the API server,
    /// the store, probes and heartbeats runs its guests at 10, so that its own work goes
    /// first. The long-running tier is 9 levels lower still (at most 19).
    pub guest_nice: i32,
    /// CA certificates (PEM) that components' outgoing HTTPS trusts beside the public web
    /// roots: a node gives the cluster CA, so that components can verify the API server.
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Whether requests and instance starts are timed for the metrics (`stats.rs`). On by
    /// default; counts of requests, exits and loads are kept either way.
    pub metrics: bool,
    /// Where the spans components send through wasi:otel go (the node's trace
    /// exporter); None drops them, counted.
    pub guest_spans: Option<crate::platform::otel::SpanSink>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_instances: 1000,
            max_memory_bytes: 256 << 20,
            epoch_tick: Duration::from_micros(250),
            net_limits: NetLimits::default(),
            max_component_bytes: 128 << 20,
            guest_threads: 0,
            guest_nice: 0,
            extra_ca_pem: Vec::new(),
            metrics: true,
            guest_spans: None,
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

/// WASI 0.3's HTTP handler export (any 0.3.x, as the linker matches by semver).
const P3_HTTP_EXPORT: &str = "wasi:http/handler@0.3";
/// WASI 0.3's command export.
const P3_CLI_EXPORT: &str = "wasi:cli/run@0.3";

/// How long a guest task may run before it yields at every epoch tick: long enough for a
/// request or a component's start, short against a neighbour's patience.
const FRESH: Duration = Duration::from_millis(2);

/// Why the store stopped a guest whose container was stopped.
#[derive(Debug, thiserror::Error)]
#[error("killed: its container was stopped")]
pub(crate) struct Killed;

/// The node's Wasm runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Arc<Linker<Host>>,
    cfg: RuntimeConfig,
    _ticker: Arc<Ticker>,
    guests: Arc<crate::tiers::GuestThreads>,
    pub(crate) pods: Arc<crate::usage::Registry>,
    /// The TLS client of components' outgoing HTTPS ([`crate::https`]).
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) stats: Arc<crate::stats::RuntimeStats>,
    /// wasi:otel's sink and counts.
    pub(crate) otel: Arc<crate::platform::otel::Otel>,
    /// The plain-HTTP components served on this runtime, by address.
    pub(crate) local_http: Arc<crate::http::LocalServers>,
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
        // Every instance runs on an async fiber stack of its own; the pool's default of
        // 1,000 stacks would cap the node there, whatever max_instances says.
        pool.total_stacks(cfg.max_instances);
        pool.max_memory_size(cfg.max_memory_bytes);
        // A freed slot's dirty pages, up to these sizes, are found with PAGEMAP_SCAN
        // (Linux 6.7 and later; elsewhere the low addresses are reset) and copied back
        // to the image rather than dropped with madvise. An madvise on a multi-threaded
        // process flushes every core's TLB by interrupt, which a profile showed to be a
        // quarter of an HTTP request's CPU; and the next request on the slot then takes
        // no page faults. A warm slot keeps only the pages its last instance dirtied.
        pool.pagemap_scan(wasmtime::Enabled::Auto);
        pool.linear_memory_keep_resident(512 << 10);
        pool.table_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| ShimError::Setup(chain(&e)))?;
        let mut linker = Linker::new(&engine);
        // Includes wasi:cli's `exit-with-code` (stable since WASI 0.2.12), for components
        // that report any exit code; Rust's std on wasip2 only reports success (0) or
        // failure (1).
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| ShimError::Setup(chain(&e)))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| ShimError::Setup(chain(&e)))?;
        // WASI 0.3 beside 0.2, and wasi:http's types and client (outgoing requests go
        // through the same hooks as 0.2's). Both versions' sockets are then shadowed onto
        // the pod's network by `net::add_to_linker`, which must come after them.
        wasmtime_wasi::p3::add_to_linker(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p3::add_to_linker(&mut linker))
            .map_err(|e| ShimError::Setup(chain(&e)))?;
        crate::net::add_to_linker(&mut linker).map_err(|e| ShimError::Setup(chain(&e)))?;
        crate::procs::add_to_linker(&mut linker).map_err(|e| ShimError::Setup(chain(&e)))?;
        crate::platform::add_to_linker(&mut linker).map_err(|e| ShimError::Setup(chain(&e)))?;
        let guests = crate::tiers::GuestThreads::new(cfg.guest_threads, cfg.guest_nice)
            .map_err(|e| ShimError::Setup(format!("starting the guest threads: {e}")))?;
        let pods: Arc<crate::usage::Registry> = Arc::default();
        let tls = crate::https::client_config(&cfg.extra_ca_pem)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e2, s2, tick, pods2) = (engine.clone(), stop.clone(), cfg.epoch_tick, pods.clone());
        let capacity = crate::usage::CPU_PERIOD * guests.threads as u32;
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let mut next_rebalance = Instant::now() + crate::usage::CPU_PERIOD;
                let mut pace = Pace::new(tick);
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(pace.next(crate::usage::preemptions()));
                    e2.increment_epoch();
                    if Instant::now() >= next_rebalance {
                        // From now, not from when it was due: after a stall, one rebalance
                        // on a full period of use, not a burst of them on none.
                        next_rebalance = Instant::now() + crate::usage::CPU_PERIOD;
                        pods2.rebalance(capacity);
                    }
                }
            })
            .map_err(|e| ShimError::Setup(e.to_string()))?;
        let otel = Arc::new(crate::platform::otel::Otel::new(cfg.guest_spans.clone()));
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            cfg,
            _ticker: Arc::new(Ticker { stop }),
            guests: Arc::new(guests),
            pods,
            tls,
            stats: Arc::default(),
            otel,
            local_http: Arc::default(),
        })
    }

    /// The threads that run guests, per tier: how many instances can run at once.
    pub(crate) fn guest_threads(&self) -> usize {
        self.guests.threads
    }

    /// Runs a task of the pod whose account is `usage` on the guest threads: counted as
    /// one of its tasks while it lives, and its polls charged to it as CPU time.
    pub(crate) fn spawn_guest<F>(
        &self,
        usage: &Arc<crate::usage::Usage>,
        task: Option<Arc<crate::usage::Task>>,
        fut: F,
    ) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.guests
            .spawn(crate::usage::Metered::new(usage.clone(), fut).for_task(task))
    }

    /// [`Runtime::spawn_guest`], also telling when the task's future has been dropped
    /// (finished or aborted), and with it every socket and listener it held: what a stop
    /// that must free the pod's ports waits for.
    pub(crate) fn spawn_guest_tracked<F>(
        &self,
        usage: &Arc<crate::usage::Usage>,
        task: Option<Arc<crate::usage::Task>>,
        fut: F,
    ) -> (tokio::task::JoinHandle<F::Output>, crate::pod::Gone)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (guard, gone) = crate::pod::Gone::new();
        let task = self.spawn_guest(usage, task, async move {
            let _guard = guard;
            fut.await
        });
        (task, gone)
    }

    /// Where node work that mostly calls this runtime's components in process belongs
    /// (the Ingress's client connections): the threads that start the guests' requests.
    /// A request read there, and the instance that answers it, then run on one thread,
    /// rather than waking a guest thread and being woken back for every request. Work
    /// spawned there is not charged to any pod. `None` when guests share the caller's
    /// runtime.
    pub fn data_plane(&self) -> Option<tokio::runtime::Handle> {
        self.guests.handle()
    }

    /// Enters the guest threads' runtime, so that I/O objects made now register there.
    pub(crate) fn enter_guests(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        self.guests.enter()
    }

    /// What every pod with anything still alive uses of the node.
    pub fn usage(&self) -> Vec<crate::usage::PodUsage> {
        self.pods.snapshot()
    }

    /// The runtime's node-wide counts: component loads, instance starts.
    pub fn stats(&self) -> crate::stats::RuntimeUsage {
        crate::stats::RuntimeUsage {
            otel: self.otel.snapshot(),
            ..self.stats.snapshot()
        }
    }

    /// The time now, if requests are timed.
    pub(crate) fn clock(&self) -> Option<Instant> {
        self.cfg.metrics.then(Instant::now)
    }

    /// The network of a component run on its own: the node's loopback, no name overrides.
    pub(crate) fn loopback_net(&self) -> Arc<PodNet> {
        PodNet::new(
            IpAddr::from([127, 0, 0, 1]),
            None,
            self.cfg.net_limits,
            self.tls.clone(),
        )
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// Loads (compiling or from the cache) the component in a file.
    ///
    /// This blocks (reading, compiling): async callers run it on a blocking thread. The
    /// read is bounded by [`RuntimeConfig::max_component_bytes`], and only a regular file
    /// is read: a FIFO or a device named as an image is refused without being opened for
    /// a blocking read.
    pub fn load_file(&self, path: &Path) -> Result<Component, ShimError> {
        let wasm = read_bounded(path, self.cfg.max_component_bytes)?;
        self.load_bytes(&wasm, path)
    }

    /// Loads a component from bytes (`source` names it in errors).
    pub fn load_bytes(&self, wasm: &[u8], source: &Path) -> Result<Component, ShimError> {
        let (component, from_cache) =
            crate::cache::load(&self.engine, wasm, source, self.cfg.cache_dir.as_deref())?;
        self.stats.loaded(from_cache);
        Ok(component)
    }

    /// What a component is, from its exports.
    pub fn kind(&self, component: &Component) -> Result<ComponentKind, ShimError> {
        self.describe(component).map(|info| info.kind)
    }

    /// Every interface a component imports (`wasi:filesystem/preopens@0.2.0`, …): what
    /// it may reach beyond its own memory.
    pub fn imports(&self, component: &Component) -> Vec<String> {
        component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// Refuses a component whose imports this node's linker does not provide (an
    /// interface of another platform, say), naming the first one missing.
    pub fn check_links(&self, component: &Component) -> Result<(), ShimError> {
        self.linker
            .instantiate_pre(component)
            .map(|_| ())
            .map_err(|e| ShimError::Unlinkable(chain(&e)))
    }

    /// Whether a component targets WASI 0.3: it exports 0.3's `wasi:http/handler` or
    /// `wasi:cli/run`. (Its imports may mix versions: Rust's std on wasm32-wasip2 imports
    /// 0.2's cli interfaces whatever else the component uses.) One that exports both
    /// versions runs as 0.3, as `wasmtime run` does.
    pub fn is_wasi_03(&self, component: &Component) -> bool {
        component
            .component_type()
            .exports(&self.engine)
            .any(|(name, _)| name.starts_with(P3_HTTP_EXPORT) || name.starts_with(P3_CLI_EXPORT))
    }

    /// What a component is and every interface it exports.
    pub fn describe(
        &self,
        component: &Component,
    ) -> Result<crate::usage::ComponentInfo, ShimError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let kind = if exports.iter().any(|e| {
            e.starts_with("wasi:http/incoming-handler@0.2") || e.starts_with(P3_HTTP_EXPORT)
        }) {
            ComponentKind::Http
        } else if exports
            .iter()
            .any(|e| e.starts_with("wasi:cli/run@0.2") || e.starts_with(P3_CLI_EXPORT))
        {
            ComponentKind::Cli
        } else {
            return Err(ShimError::UnknownKind {
                exports: exports.join(", "),
            });
        };
        Ok(crate::usage::ComponentInfo {
            kind,
            exports: exports.into(),
        })
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
        (wasi, platform): (WasiCtx, crate::platform::StorePlatform),
        memory_bytes: usize,
        budget: Option<Duration>,
        net: Arc<PodNet>,
        killed: Option<Arc<AtomicBool>>,
        task: Option<Arc<crate::usage::Task>>,
    ) -> (Store<Host>, Arc<AtomicBool>) {
        let hit_memory = Arc::new(AtomicBool::new(false));
        let mut table = ResourceTable::new();
        table.set_max_capacity(self.cfg.net_limits.max_handles);
        let usage = net.usage.clone();
        let instance = usage.instance();
        let net = StoreNet::new(net);
        let host = Host {
            _instance: instance,
            hooks: net.hooks(),
            net,
            wasi,
            http: WasiHttpCtx::new(),
            table,
            platform: platform.platform,
            log_sink: platform.log_sink,
            otel: self.otel.clone(),
            limits: Limits {
                memory_bytes: if memory_bytes == 0 {
                    self.cfg.max_memory_bytes
                } else {
                    memory_bytes.min(self.cfg.max_memory_bytes)
                },
                max_tables_elements: 1 << 20,
                hit_memory: hit_memory.clone(),
                usage: usage.clone(),
                held: 0,
                task: None,
                host_held: 0,
            }
            .for_task(task),
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        // WASI 0.3's streams, futures and tasks live in the component model's own handle
        // tables, which the resource table's cap does not reach: the same cap there.
        store.set_max_component_handles(self.cfg.net_limits.max_handles);
        let deadline = budget.map(|b| Instant::now() + b);
        let tick = self.cfg.epoch_tick;
        store.epoch_deadline_callback(move |_| {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(DeadlineExceeded.into());
            }
            // Its container was stopped: whatever task the instance runs in, it ends now.
            if killed
                .as_ref()
                .is_some_and(|k| k.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Err(Killed.into());
            }
            // A pod past its CPU quota is parked until its period ends.
            if let Some(until) = usage.throttled_until() {
                crate::usage::mark_preempted();
                let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(until));
                return Ok(UpdateDeadline::YieldCustom(1, Box::pin(sleep)));
            }
            // A task's first few milliseconds run without yielding (a request or a start
            // is over before then); after that it yields at every tick it runs through.
            if let Some((poll, total)) = crate::usage::running_for() {
                if total < FRESH || poll < tick {
                    return Ok(UpdateDeadline::Continue(1));
                }
            }
            crate::usage::mark_preempted();
            // tokio's own yield, not a self-wake: the task is deferred until the worker's
            // queue is drained, and a worker that drains its queue looks for I/O first.
            // With spinning guests on every worker, a self-wake would leave new
            // connections unnoticed until tokio's periodic I/O check (61 polls of a tick).
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store.set_epoch_deadline(1);
        (store, hit_memory)
    }
}

/// With no guest preempted for this long, the epoch ticks [`CALM_FACTOR`] times slower.
pub const CALM_AFTER: Duration = Duration::from_millis(50);
/// How much slower the epoch ticks when guests are calm.
pub const CALM_FACTOR: u32 = 4;

/// The epoch ticker's pace. A fine tick only matters to a guest that runs through it,
/// and every such guest is preempted (or parked for its quota), so the ticker slows down
/// when none has been for a while and speeds up at the next preemption. A node of short
/// requests, or an idle one, then wakes a thousand times a second instead of four
/// thousand; each wake-up is a context switch taken from the guests on a small machine.
/// A spinner that starts meanwhile runs its first [`FRESH`] unpreempted anyway, so it
/// is preempted at most one slow tick later than at the fine pace.
#[derive(Debug)]
struct Pace {
    tick: Duration,
    /// Preemptions counted at the last tick.
    seen: u64,
    /// How long no preemption has been seen.
    calm: Duration,
}

impl Pace {
    fn new(tick: Duration) -> Self {
        Self {
            tick,
            seen: 0,
            calm: Duration::ZERO,
        }
    }

    /// The next sleep, given the process's preemptions so far.
    fn next(&mut self, preemptions: u64) -> Duration {
        if preemptions != self.seen {
            self.seen = preemptions;
            self.calm = Duration::ZERO;
        }
        let sleep = if self.calm >= CALM_AFTER {
            self.tick * CALM_FACTOR
        } else {
            self.tick
        };
        self.calm += sleep;
        sleep
    }
}

/// Reads a regular file of at most `max` bytes. The file is opened non-blocking, so a
/// FIFO cannot hold the caller until a writer appears, and checked through the open
/// handle, so it cannot be swapped between the check and the read.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ShimError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ShimError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ShimError::InvalidComponent {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > max {
        return Err(ShimError::InvalidComponent {
            path: path.to_path_buf(),
            reason: format!("{} bytes, more than the {max}-byte limit", meta.len()),
        });
    }
    let mut wasm = Vec::with_capacity(meta.len() as usize);
    // The length can change under us; the read is bounded all the same.
    file.take(max + 1).read_to_end(&mut wasm).map_err(io)?;
    if wasm.len() as u64 > max {
        return Err(ShimError::InvalidComponent {
            path: path.to_path_buf(),
            reason: format!("more than the {max}-byte limit"),
        });
    }
    Ok(wasm)
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[test]
    fn the_epoch_slows_down_when_calm_and_speeds_up_at_a_preemption() {
        let tick = Duration::from_micros(250);
        let mut pace = Pace::new(tick);
        // Fine until CALM_AFTER has passed without a preemption.
        let fine_ticks = (CALM_AFTER.as_micros() / tick.as_micros()) as usize;
        for _ in 0..fine_ticks {
            assert_eq!(pace.next(0), tick);
        }
        assert_eq!(pace.next(0), tick * CALM_FACTOR);
        assert_eq!(pace.next(0), tick * CALM_FACTOR);
        // A preemption: fine at once, and for CALM_AFTER after the last one.
        assert_eq!(pace.next(1), tick);
        assert_eq!(pace.next(2), tick);
        for _ in 0..fine_ticks - 1 {
            assert_eq!(pace.next(2), tick);
        }
        assert_eq!(pace.next(2), tick * CALM_FACTOR);
    }
}
