//! In-process links from the API server to the node agents that run in its own process.
//!
//! `baton up` runs the API server and a node agent as one process. The API server reaches
//! a node's endpoint (logs, exec, attach, port-forward, stats) over mutually authenticated
//! TLS, which is what a remote node needs; for its own node that would only encrypt bytes
//! to itself, twice in each direction, and cross the kernel twice. A node agent in the
//! same process registers a dialer here instead, and the API server asks it first.
//!
//! Only code in the process can register, so a dialed link carries the same trust as the
//! mutually authenticated one: the caller is the API server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::io::DuplexStream;

/// Bytes buffered each way on a link: a bulk transfer moves in large writes.
pub const LINK_BUFFER: usize = 256 << 10;

type Dialer = Arc<dyn Fn() -> DuplexStream + Send + Sync>;

/// Node agents of this process, by node name. Clones share the table.
#[derive(Clone, Default)]
pub struct LocalNodes {
    dialers: Arc<Mutex<HashMap<String, Dialer>>>,
}

impl std::fmt::Debug for LocalNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.table().keys().cloned().collect();
        f.debug_struct("LocalNodes").field("nodes", &names).finish()
    }
}

/// A node's place in the table: dropping it takes the node out.
#[must_use = "the node leaves the table when this is dropped"]
pub struct Registration {
    node: String,
    dialers: Weak<Mutex<HashMap<String, Dialer>>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("node", &self.node)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(d) = self.dialers.upgrade() {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.node);
        }
    }
}

impl LocalNodes {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Dialer>> {
        // The table holds no invariant a panicking holder could break.
        self.dialers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `node` in this process: `dial` returns the caller's end of a new connection
    /// to the node's endpoint, and serves the other end.
    pub fn register(
        &self,
        node: &str,
        dial: impl Fn() -> DuplexStream + Send + Sync + 'static,
    ) -> Registration {
        self.table().insert(node.to_string(), Arc::new(dial));
        Registration {
            node: node.to_string(),
            dialers: Arc::downgrade(&self.dialers),
        }
    }

    /// A new connection to `node`'s endpoint, if that node runs in this process.
    pub fn dial(&self, node: &str) -> Option<DuplexStream> {
        let dial = self.table().get(node).cloned()?;
        Some(dial())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_registered_node_is_dialed_until_its_registration_is_dropped() {
        let nodes = LocalNodes::default();
        assert!(nodes.dial("n1").is_none());
        let reg = nodes.register("n1", || {
            let (ours, theirs) = tokio::io::duplex(LINK_BUFFER);
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(theirs);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            ours
        });
        let mut link = nodes.clone().dial("n1").expect("registered");
        link.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        link.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert!(nodes.dial("n2").is_none(), "only the registered name");
        drop(reg);
        assert!(nodes.dial("n1").is_none());
    }
}
