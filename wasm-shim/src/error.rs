//! The sandbox's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{path} is not a valid Wasm component: {reason}")]
    InvalidComponent { path: PathBuf, reason: String },
    #[error("component exports neither wasi:cli/run nor wasi:http/incoming-handler (exports: {exports})")]
    UnknownKind { exports: String },
    #[error("component is a {found}, not a {wanted}")]
    WrongKind {
        found: &'static str,
        wanted: &'static str,
    },
    #[error("the component is a wasi:http proxy, not a command (wasi:cli/run), so it cannot run one; to look inside the pod, use `kubectl debug -it POD --image=TOOLBOX --target=CONTAINER` with a command component such as Baton's toolbox")]
    NotACommand,
    #[error("the component imports {interface}, which its container is not granted: add {capability:?} to the pod's baton.dev/capabilities annotation")]
    NotGranted {
        interface: String,
        capability: &'static str,
    },
    #[error("the component cannot be linked on this node: {0}")]
    Unlinkable(String),
    #[error("failed to set up the sandbox: {0}")]
    Setup(String),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// wasmtime's errors are anyhow-style; keep their whole chain as text, each cause once.
pub(crate) fn chain(e: &wasmtime::Error) -> String {
    baton_error_chain::chain(e.as_ref())
}
