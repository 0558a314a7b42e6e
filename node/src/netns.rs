//! A pod's network namespace, for pods that run OCI containers.
//!
//! A Wasm-only pod needs none: its components' sockets are the node's, on a loopback
//! address of the pod's own (see `baton-wasm-shim`'s `net.rs`). A Linux process cannot be
//! given a private address that way, so a pod with a container gets a namespace, named
//! `baton-<uid>` under `/run/netns` (where `ip netns` keeps them), with its loopback up
//! and the pod's address on it: inside, the pod's address and `localhost` are the pod's
//! own, and two pods both listen on one port.
//!
//! The node reaches into it (probes, port-forward, the service proxy) with sockets made
//! inside: [`NetNs::connect`] makes its socket on a thread that has entered the namespace,
//! and a socket belongs to the namespace it was made in for its whole life.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a namespace could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
    #[error("running `ip` (iproute2) for the pod's network namespace")]
    Spawn(#[source] std::io::Error),
}

/// One pod's network namespace; [`NetNs::delete`] removes it, and so does its drop (the
/// node's own stop included). Each is recorded as a file in the node's `netns/` folder
/// while it exists, so that a node killed before it could remove them removes them at its
/// next start ([`remove_leftovers`]).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    ip: Ipv4Addr,
    record: PathBuf,
    deleted: std::sync::atomic::AtomicBool,
}

async fn ip(args: &[&str]) -> Result<(), NetNsError> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(NetNsError::Spawn)?;
    if !out.status.success() {
        return Err(NetNsError::Ip {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// How long a connection into a namespace may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl NetNs {
    /// Makes the namespace `baton-<id>` with its loopback up and `ip` on it, recorded in
    /// `records`. One left by an earlier run of the node under the same name is replaced.
    pub async fn create(id: &str, ip_addr: Ipv4Addr, records: &Path) -> Result<Self, NetNsError> {
        let name = format!("baton-{id}");
        let _ = ip(&["netns", "delete", &name]).await;
        let record = records.join(&name);
        std::fs::create_dir_all(records)
            .and_then(|_| std::fs::write(&record, b""))
            .map_err(NetNsError::Spawn)?;
        ip(&["netns", "add", &name]).await?;
        let ns = NetNs {
            path: Path::new("/run/netns").join(&name),
            name,
            ip: ip_addr,
            record,
            deleted: Default::default(),
        };
        let set_up = async {
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]).await?;
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{ip_addr}/32"),
                "dev",
                "lo",
            ])
            .await
        };
        if let Err(e) = set_up.await {
            ns.delete().await;
            return Err(e);
        }
        Ok(ns)
    }

    /// What a container's spec names to join it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Opens a TCP connection from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let std = in_namespace(self.path.clone(), move || {
            let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await?;
        tokio::net::TcpStream::from_std(std)
    }

    /// A listener inside the namespace.
    pub async fn listen(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let path = self.path.clone();
        let std = in_namespace(path, move || {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .await?;
        tokio::net::TcpListener::from_std(std)
    }

    /// Removes the namespace; what still has it open (nothing, once the pod's containers
    /// are gone) keeps it alive until it closes.
    pub async fn delete(&self) {
        if self.deleted.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if let Err(e) = ip(&["netns", "delete", &self.name]).await {
            tracing::warn!(error = %e, "removing a pod's network namespace");
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.deleted.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        // Synchronous: a drop cannot await, and it may run as the node's runtime stops.
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Removes the namespaces recorded in `records` by an earlier run of the node that did not
/// remove them (it was killed): their pods' containers are gone, and the pods' workers
/// make new ones.
pub fn remove_leftovers(records: &Path) {
    for e in std::fs::read_dir(records).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("baton-") {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &name])
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_file(e.path());
    }
}

/// Runs `make` on a thread of its own that has entered the namespace at `path`, and ends
/// after: a socket belongs to the namespace it was made in for its whole life, and no
/// pooled thread is ever left in a pod's namespace.
async fn in_namespace<T: Send + 'static>(
    path: PathBuf,
    make: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let made = (|| {
                let target = std::fs::File::open(&path)?;
                rustix::thread::move_into_link_name_space(
                    target.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                make()
            })();
            let _ = tx.send(made);
        })?;
    rx.await.map_err(std::io::Error::other)?
}
