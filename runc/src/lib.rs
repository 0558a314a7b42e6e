//! # baton-runc: OCI containers through runc
//!
//! A pod may hold Linux containers beside its Wasm components. Baton runs them with the
//! system's `runc`, as containerd does under the kubelet: for each container it writes an
//! OCI runtime bundle (a `config.json` from [`ContainerConfig`], built with the
//! `oci-spec` crate, beside the container's root filesystem) and runs runc on it.
//!
//! ## One runc per container, in the foreground
//! [`Runc::run`] starts `runc run --keep` and keeps it as the container's parent: runc
//! passes the container's stdio through (so its output reaches the node's log writer as
//! a pipe), forwards signals, and exits with the container's status. `--keep` leaves the
//! stopped container's cgroup in place until [`Runc::delete`], so that its OOM kill count
//! can be read after it exits ([`Runc::oom_killed`]). A stop is `runc kill` with SIGTERM,
//! then SIGKILL after the grace period, which is the caller's clock.
//!
//! ## What a container gets by default
//! What containerd gives a Kubernetes container: its own mount, PID, IPC and UTS
//! namespaces, the pod's network namespace, Docker's default capability set, no new
//! privileges unless asked, the masked and read-only `/proc` paths of runc's default
//! spec, and the `RuntimeDefault` seccomp profile ([`seccomp`]).

mod runner;
pub mod seccomp;
mod spec;

pub use runner::{exit_code, Container, ExecProcess, Runc};
pub use spec::{BindMount, ContainerConfig, SeccompProfile};

/// Everything this crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// runc is not on the node.
    #[error("{binary} was not found on this node (install runc to run OCI containers)")]
    NotFound { binary: String },
    #[error("invalid container configuration: {0}")]
    Invalid(String),
    #[error("writing the runtime bundle {path}")]
    Bundle {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the runtime spec")]
    Spec(#[source] oci_spec::OciSpecError),
    #[error("starting runc")]
    Spawn(#[source] std::io::Error),
    #[error("making a terminal for runc exec")]
    Console(#[source] std::io::Error),
    /// runc ran and refused, in its own words.
    #[error("runc {command} {id}: {message}")]
    Runc {
        command: &'static str,
        id: String,
        message: String,
    },
}
