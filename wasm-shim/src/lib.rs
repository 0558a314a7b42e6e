//! # baton-wasm-shim: the pod sandbox
//!
//! A Baton pod is a group of WebAssembly components (and, later, OCI containers) that run
//! together. This crate runs them in wasmtime, narrowly: one [`Runtime`] per node owns the
//! wasmtime `Engine` (pooling allocator, epoch interruption, an on-disk cache of compiled
//! components), and everything else is per component or per request.
//!
//! ## Component kinds
//! What a component exports decides how it runs ([`ComponentKind`]):
//! - `wasi:cli/run`: a process, run to completion ([`Runtime::run_cli`]): a service that
//!   never returns, or a job with an exit code.
//! - `wasi:http/incoming-handler`: an HTTP service ([`Runtime::serve_http`]): a fresh
//!   instance per request from one pre-instantiated `InstancePre`, so one bad request
//!   (a trap, a loop, a memory hog) fails alone and the next is served.
//!
//! ## Limits
//! - Memory: a store limiter caps each instance's linear memory; a guest that hits it is
//!   stopped with reason `OOMKilled` (for HTTP, that request gets a 500).
//! - CPU: the engine's epoch ticks every [`RuntimeConfig::epoch_tick`]; a guest yields to
//!   the async runtime at every tick (so one spinning guest cannot starve the others), and
//!   is stopped with `DeadlineExceeded` once its time budget is spent.
//!
//! ## What is here and what is not yet
//! Here: kinds, the engine and cache, CLI runs with args, env and preopened dirs, HTTP
//! serving, memory and time limits, exit codes and reasons, container log files ([`logs`]),
//! pods whose HTTP components share a virtual localhost ([`PodSpec`], see `pod.rs` for the
//! design). Not yet: the same localhost for wasi:sockets, socket and handle caps.

mod cache;
mod cli;
mod error;
mod host;
mod http;
pub mod logs;
mod pod;
mod runtime;

pub use cli::{CliSpec, Mount};
pub use error::ShimError;
pub use http::{HttpServer, HttpSpec};
pub use pod::{ContainerSpec, Pod, PodSpec};
pub use runtime::{ComponentKind, Runtime, RuntimeConfig};

/// How a component run ended, in the terms of a Kubernetes container state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// `Completed`, `Error`, `OOMKilled` or `DeadlineExceeded`.
    pub reason: &'static str,
    pub message: String,
}
