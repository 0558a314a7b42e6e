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
    /// The container the instance runs for, whose share this memory is too.
    pub tally: Option<Arc<crate::usage::Tally>>,
}

impl Drop for Limits {
    fn drop(&mut self) {
        self.usage.release_memory(self.held);
        if let Some(t) = &self.tally {
            t.release_memory(self.held);
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
        if let Some(t) = &self.tally {
            t.grow_memory(delta);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.max_tables_elements)
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
