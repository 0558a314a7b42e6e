//! The network of pods that run OCI containers: a namespace per pod, linked to a bridge
//! on the node.
//!
//! A Wasm-only pod needs none of this: its components' sockets are the node's, on a
//! loopback address of the pod's own (see `baton-wasm-shim`'s `net.rs`). A Linux process
//! cannot be given a private address that way, so a pod with a container gets a network
//! namespace, `baton-<uid>` under `/run/netns` (where `ip netns` keeps them), as a
//! Kubernetes pod does:
//! - its loopback is up, so `localhost` inside is the pod's own, shared by its containers
//!   and (through `baton-wasm-shim`'s `NetworkNamespace`) its components;
//! - a veth pair links it to the node's [`Bridge`]: `eth0` inside holds the pod's routed
//!   address, with the bridge's address as the default gateway.
//!
//! The routed address is the pod's loopback address moved to the node's routed range
//! ([`Bridge::routed`]: `127.A.B.C` becomes `10.A.B.C`), so the node's address manager
//! stays the one place that hands addresses out, and every node of a cluster, having a
//! pod range of its own, has a routed range of its own too.
//!
//! The node reaches a pod at that address through the bridge (probes, the Service proxy,
//! port-forward), and the pod reaches the node at the bridge's address: its DNS responder
//! (`dns.rs`) and, through a local route for the Service range, every ClusterIP
//! ([`Bridge::up`]). Traffic beyond the node is not forwarded (the bridge's forwarding is
//! off): that needs NAT rules, which the node does not manage.
//!
//! Everything is made with iproute2 (`ip`), in two batches per pod.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_wasm_shim::NetworkNamespace;
use tokio::io::AsyncWriteExt;

/// The Service range, whose ClusterIPs the node serves locally to container pods.
pub const SERVICE_RANGE: &str = "10.96.0.0/16";

/// Why a pod's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("`ip {args}` failed: {message}")]
    Ip { args: String, message: String },
    #[error("running `ip` (iproute2) for the pods' network")]
    Spawn(#[source] std::io::Error),
    #[error("opening the pod's network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod range {0:?} has no routed twin: want a 127.x.y.z/N range with N >= 16")]
    Range(String),
}

/// Runs `ip ARGS`, with `batch` as its standard input when given (`-batch -`).
async fn ip(args: &[&str], batch: Option<&str>) -> Result<(), NetNsError> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(args)
        .stdin(if batch.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(NetNsError::Spawn)?;
    if let (Some(text), Some(mut stdin)) = (batch, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(NetNsError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(NetNsError::Spawn)?;
    if !out.status.success() {
        let mut shown = args.join(" ");
        if let Some(text) = batch {
            shown = format!("{shown} <<< {}", text.trim().replace('\n', "; "));
        }
        return Err(NetNsError::Ip {
            args: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The synchronous `ip`, for drops, which cannot await.
fn ip_now(args: &[&str]) {
    let _ = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// The node's bridge, which its container pods' veths join. Dropping it removes it.
#[derive(Debug)]
pub struct Bridge {
    name: String,
    /// The bridge's own address: the pods' gateway and the node's address to them.
    gateway: Ipv4Addr,
    prefix: u8,
    /// Set by [`Bridge::up`] when the bridge is this node's (it made it, now or in a run
    /// that was killed): the record of that, which the drop removes with the bridge.
    made: std::sync::OnceLock<PathBuf>,
}

/// `127.A.B.C` as `10.A.B.C`.
fn twin(ip: Ipv4Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(10, o[1], o[2], o[3])
}

/// The loopback address whose routed twin is `ip` (`10.A.B.C` as `127.A.B.C`), for a pod
/// that reported its routed address and comes back to a restarted node agent.
pub fn loopback_of(ip: Ipv4Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(127, o[1], o[2], o[3])
}

impl Bridge {
    /// The bridge for the pod range `pod_cidr` (a loopback range), not yet made.
    pub fn for_range(pod_cidr: &str) -> Result<Self, NetNsError> {
        let err = || NetNsError::Range(pod_cidr.to_string());
        let (base, prefix) = crate::ipam::parse_range(pod_cidr).ok_or_else(err)?;
        // The twin of a /8../15 would overlap the Service range (10.96/16).
        if !base.is_loopback() || !(16..=30).contains(&prefix) {
            return Err(err());
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let net = u32::from(twin(base)) & mask;
        let service = u32::from(Ipv4Addr::new(10, 96, 0, 0));
        if net >> 16 == service >> 16 {
            return Err(err());
        }
        Ok(Self {
            name: format!("bt{net:08x}"),
            gateway: Ipv4Addr::from(net + 1),
            prefix,
            made: Default::default(),
        })
    }

    /// Makes the bridge (or uses the one that exists), with its address, and the local
    /// route that makes the node answer for every ClusterIP it is sent. `records` keeps a
    /// file per bridge the node made, so that a run after a kill knows its own.
    pub async fn up(&self, records: &Path) -> Result<(), NetNsError> {
        let record = records.join(&self.name);
        // One that exists already and is not recorded is another node agent's on this
        // host (a test cluster of the same pod range): it is used, and left to it.
        if !Path::new("/sys/class/net").join(&self.name).exists() {
            std::fs::create_dir_all(records)
                .and_then(|_| std::fs::write(&record, b""))
                .map_err(NetNsError::Spawn)?;
            if let Err(e) = ip(&["link", "add", &self.name, "type", "bridge"], None).await {
                let _ = std::fs::remove_file(&record);
                return Err(e);
            }
        }
        if record.exists() {
            let _ = self.made.set(record);
        }
        let addr = format!("{}/{}", self.gateway, self.prefix);
        ip(&["addr", "replace", &addr, "dev", &self.name], None).await?;
        ip(&["link", "set", &self.name, "up"], None).await?;
        // The node does not route its pods' traffic on to other networks (it has no NAT
        // for them), even where the host forwards for others (Docker's hosts do).
        let forwarding = format!("/proc/sys/net/ipv4/conf/{}/forwarding", self.name);
        std::fs::write(&forwarding, b"0").map_err(NetNsError::Spawn)?;
        ip(
            &["route", "replace", "local", SERVICE_RANGE, "dev", "lo"],
            None,
        )
        .await
    }

    /// The pod's routed address, for its loopback address `pod_ip`.
    pub fn routed(&self, pod_ip: Ipv4Addr) -> Ipv4Addr {
        twin(pod_ip)
    }

    /// The node's address on the bridge: the pods' gateway and name server.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Whether `ip` is on the bridge's subnet (one of its pods, or the node).
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(ip) & mask == u32::from(self.gateway) & mask
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let Some(record) = self.made.get() else {
            return;
        };
        // The Service route stays: another node agent on this host may still use it.
        ip_now(&["link", "delete", &self.name]);
        let _ = std::fs::remove_file(record);
    }
}

/// One pod's network namespace; [`NetNs::delete`] removes it (and its veth with it), and
/// so does its drop (the node's own stop included). Each is recorded as a file in the
/// node's `netns/` folder while it exists, so that a node killed before it could remove
/// them removes them at its next start ([`remove_leftovers`]).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    ns: Arc<NetworkNamespace>,
    ip: Ipv4Addr,
    record: PathBuf,
    deleted: std::sync::atomic::AtomicBool,
}

/// How long a connection into a namespace may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl NetNs {
    /// Makes the namespace `baton-<id>`, recorded in `records`, linked to `bridge` with
    /// `ip` inside. One left by an earlier run of the node under the same name is
    /// replaced.
    pub async fn create(
        id: &str,
        ip_addr: Ipv4Addr,
        bridge: &Bridge,
        records: &Path,
    ) -> Result<Self, NetNsError> {
        let name = format!("baton-{id}");
        let path = Path::new("/run/netns").join(&name);
        let veth = format!("bv{:08x}", u32::from(ip_addr));
        if path.exists() {
            let _ = ip(&["netns", "delete", &name], None).await;
        }
        if Path::new("/sys/class/net").join(&veth).exists() {
            let _ = ip(&["link", "delete", &veth], None).await;
        }
        let record = records.join(&name);
        std::fs::create_dir_all(records)
            .and_then(|_| std::fs::write(&record, b""))
            .map_err(NetNsError::Spawn)?;
        let outside = format!(
            "netns add {name}\n\
             link add {veth} type veth peer name eth0 netns {name}\n\
             link set {veth} master {bridge} up\n",
            bridge = bridge.name(),
        );
        let inside = format!(
            "link set lo up\n\
             addr add {ip_addr}/{prefix} dev eth0\n\
             link set eth0 up\n\
             route add default via {gateway}\n",
            prefix = bridge.prefix,
            gateway = bridge.gateway,
        );
        let made = async {
            ip(&["-batch", "-"], Some(&outside)).await?;
            ip(&["-n", &name, "-batch", "-"], Some(&inside)).await?;
            NetworkNamespace::open(&path).map_err(|source| NetNsError::Open {
                path: path.clone(),
                source,
            })
        };
        match made.await {
            Ok(ns) => Ok(NetNs {
                name,
                ns: Arc::new(ns),
                ip: ip_addr,
                record,
                deleted: Default::default(),
            }),
            Err(e) => {
                let _ = ip(&["netns", "delete", &name], None).await;
                let _ = ip(&["link", "delete", &veth], None).await;
                let _ = std::fs::remove_file(&record);
                Err(e)
            }
        }
    }

    /// What a container's spec names to join it.
    pub fn path(&self) -> &Path {
        self.ns.path()
    }

    /// The open namespace, where the pod's components make their sockets.
    pub fn namespace(&self) -> &Arc<NetworkNamespace> {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Opens a TCP connection from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.ns.connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// Removes the namespace, and with it the pod's end of the veth and so the node's;
    /// what still has it open (nothing, once the pod's containers are gone) keeps it
    /// alive until it closes.
    pub async fn delete(&self) {
        if self.deleted.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if let Err(e) = ip(&["netns", "delete", &self.name], None).await {
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
        ip_now(&["netns", "delete", &self.name]);
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
            ip_now(&["netns", "delete", &name]);
        }
        let _ = std::fs::remove_file(e.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_range_has_a_routed_twin_of_its_own() {
        let b = Bridge::for_range("127.171.0.0/24").unwrap();
        assert_eq!(b.gateway(), Ipv4Addr::new(10, 171, 0, 1));
        assert_eq!(b.name(), "bt0aab0000");
        assert_eq!(
            b.routed(Ipv4Addr::new(127, 171, 0, 5)),
            Ipv4Addr::new(10, 171, 0, 5)
        );
        assert_eq!(
            loopback_of(Ipv4Addr::new(10, 171, 0, 5)),
            Ipv4Addr::new(127, 171, 0, 5)
        );
        assert!(b.holds(Ipv4Addr::new(10, 171, 0, 200)));
        assert!(!b.holds(Ipv4Addr::new(10, 171, 1, 2)));
        assert!(!b.holds(Ipv4Addr::new(192, 0, 2, 1)));
        let b = Bridge::for_range("127.128.16.0/20").unwrap();
        assert_eq!(b.gateway(), Ipv4Addr::new(10, 128, 16, 1));
        for bad in ["127.96.0.0/24", "127.0.0.0/8", "10.0.0.0/24", "nonsense"] {
            assert!(Bridge::for_range(bad).is_err(), "{bad}");
        }
    }
}
