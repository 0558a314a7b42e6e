//! Per-store host state: WASI, wasi:http, the resource table, and the limits that record
//! why a guest was stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Caps an instance's memory, and its pod's memory over all of the pod's instances, and
/// remembers whether a cap was hit, so that a trap that follows can be reported as
/// OOMKilled rather than as a plain error.
#[derive(Debug)]
pub(crate) struct Limits {
    pub memory_bytes: usize,
    pub max_tables_elements: usize,
    pub hit_memory: Arc<AtomicBool>,
    /// The pod's account, and how much of it this instance holds.
    pub usage: Arc<crate::usage::Usage>,
    pub held: usize,
    /// The task the instance runs for, whose share (and its container's) this memory is
    /// too, with the host-side state counted in `host_held`.
    pub task: Option<Arc<crate::usage::Task>>,
    pub host_held: usize,
}

/// What the host holds for every instance beside its linear memory and tables: the store's
/// state as laid out. A lower bound: what that state points to on the heap (resource
/// table entries, stream buffers) grows with use, bounded by other caps (handles, output
/// budgets), and is not counted.
pub(crate) const HOST_STATE_BYTES: usize = std::mem::size_of::<Host>();

/// A table element is a pointer to a function, held by the host.
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

impl Limits {
    /// Starts counting the task's host-side state.
    pub fn for_task(mut self, task: Option<Arc<crate::usage::Task>>) -> Self {
        if let Some(t) = &task {
            t.grow_memory(HOST_STATE_BYTES);
            self.host_held = HOST_STATE_BYTES;
        }
        self.task = task;
        self
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        self.usage.release_memory(self.held);
        if let Some(t) = &self.task {
            t.release_memory(self.held + self.host_held);
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = desired.saturating_sub(current);
        if desired > self.memory_bytes || !self.usage.grow_memory(delta) {
            self.hit_memory.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        self.held += delta;
        if let Some(t) = &self.task {
            t.grow_memory(delta);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_tables_elements {
            return Ok(false);
        }
        if let Some(t) = &self.task {
            let bytes = desired.saturating_sub(current) * TABLE_ELEMENT_BYTES;
            t.grow_memory(bytes);
            self.host_held += bytes;
        }
        Ok(true)
    }
}

pub(crate) struct Host {
    pub hooks: crate::net::PodHooks,
    pub net: crate::net::StoreNet,
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub limits: Limits,
    /// Counts this instance in its pod's usage until the store is dropped.
    pub _instance: crate::usage::InstanceGuard,
    /// The platform interfaces' backing (wasi:config, wasi:keyvalue).
    pub platform: crate::platform::Platform,
    /// wasi:otel's node-wide sink and counts.
    pub otel: Arc<crate::platform::otel::Otel>,
    /// Where wasi:logging records go: the instance's stderr.
    pub log_sink: Option<Box<dyn wasmtime_wasi::cli::StdoutStream>>,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}
