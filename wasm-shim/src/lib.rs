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
//! - CPU: guests run on threads of their own ([`RuntimeConfig::guest_threads`]), apart
//!   from the node's work and at a lower priority, and guests that keep the CPU busy on a
//!   tier lower still, so that short requests preempt them (`tiers.rs`). The engine's epoch ticks every
//!   [`RuntimeConfig::epoch_tick`]; a guest yields at every tick (so one spinning guest
//!   cannot starve the others), is parked until the period ends once its pod has used its
//!   CPU quota (`resources.limits.cpu` per [`CPU_PERIOD`], as CFS does; see `usage.rs`),
//!   and is stopped with `DeadlineExceeded` once its time budget is spent.
//! - Lifetime: everything a pod runs is a task the pod owns; stopping a container or
//!   dropping the pod aborts it at the guest's next tick, and an HTTP request whose client
//!   goes away is stopped the same way. [`Runtime::usage`] counts what each pod still has
//!   alive (instances, tasks, sockets), so that a test, or an operator, can see zero.
//! - Handles and sockets: see [`NetLimits`]; a pod past its socket cap gets
//!   `new-socket-limit`, an instance past its handle cap traps alone.
//!
//! ## The pod's network
//! Components of one pod share a virtual localhost, for wasi:http outgoing and for
//! wasi:sockets TCP: a loopback address per pod, and rewriting of `localhost` to it. How and
//! why (rather than a network namespace per pod) is in `net.rs`. Only IPv4 is virtualised.
//! A pod that also runs OCI containers has a network namespace, and its components make
//! their sockets inside it ([`Pod::join_network_namespace`], `netns.rs`).

mod cache;
mod cli;
mod error;
mod exec;
mod host;
mod http;
mod https;
pub mod logs;
mod net;
mod netns;
pub mod platform;
mod pod;
mod procs;
mod runtime;
pub mod stats;
mod tiers;
mod usage;

pub use cli::{CliOutcome, CliSpec, Mount, StdinPipe};
pub use error::ShimError;
pub use exec::{ExecIo, ExecSpec, Execution, PodHandle, Terminal};
pub use http::{HttpServer, HttpSpec, InstanceReuse, LocalHttp};
pub use net::{NameResolver, NetLimits};
pub use netns::NetworkNamespace;
pub use platform::{Bucket, Capabilities, Capability, ConfigVars, KvError, MemoryBucket, Platform};
pub use pod::{ContainerSpec, Pod, PodSpec};
pub use runtime::{read_bounded, ComponentKind, Runtime, RuntimeConfig};
pub use usage::{ComponentInfo, ContainerUsage, PodUsage, TaskInfo, TaskKind, CPU_PERIOD};
/// A compiled component, loaded by [`Runtime::load_file`]; callers need not depend on wasmtime.
pub use wasmtime::component::Component;

/// How a component run ended, in the terms of a Kubernetes container state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// `Completed`, `Error`, `OOMKilled` or `DeadlineExceeded`.
    pub reason: &'static str,
    pub message: String,
}
