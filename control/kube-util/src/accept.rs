//! Accepting connections without running out of descriptors.
//!
//! A server that accepts every connection it is offered lets its clients decide how many
//! files it holds open. Thousands of nodes, each keeping a few pooled connections, or one
//! client that opens connections and abandons them, then use up the process's open-files
//! limit, and the next file anyone opens fails: the store's next log segment, a pod's log.
//! And `accept` failing with `EMFILE` returns at once, so a loop that retries at once
//! spins a core while nothing gets better.
//!
//! [`Acceptor`] holds connections to a share of the limit: when that many are open it
//! stops accepting, and new clients wait in the kernel's backlog until one closes. A
//! failed `accept` is retried after a pause that doubles up to a second, as Go's
//! `net/http` does. Each accepted connection carries a [`Permit`] that frees its place
//! when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection's place among those a listener may hold.
pub type Permit = OwnedSemaphorePermit;

/// Descriptors kept for everything that is not a connection: the store's files, logs,
/// sockets the process dials itself.
const RESERVED: u64 = 4_096;

/// The most connections one listener holds, for a process with `limit` open files: three
/// quarters of what is left after the reserve, and never fewer than 64.
pub fn connections_for(limit: u64) -> usize {
    let usable = limit.saturating_sub(RESERVED) / 4 * 3;
    usable.clamp(64, 1 << 20) as usize
}

/// The process's open-files limit now.
pub fn open_files_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Accepts from one listener, holding at most a fixed number of connections.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

impl Acceptor {
    /// At most [`connections_for`] the process's open-files limit.
    pub fn new(listener: TcpListener) -> Self {
        Self::with_limit(listener, connections_for(open_files_limit()))
    }

    pub fn with_limit(listener: TcpListener, connections: usize) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(connections.max(1))),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection, once there is room for it.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Permit) {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut pause = Duration::from_millis(5);
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => return (tcp, peer, permit),
                Err(e) => {
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_leaves_a_reserve() {
        assert_eq!(connections_for(1_024), 64);
        assert_eq!(connections_for(20_000), 11_928);
        assert_eq!(connections_for(u64::MAX), 1 << 20);
    }

    #[tokio::test]
    async fn a_full_acceptor_waits_until_a_connection_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = Acceptor::with_limit(listener, 1);
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (_s1, _, permit) = acceptor.accept().await;
        // The second client connects (the kernel's backlog) but is not accepted while
        // the first holds the one place.
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let second = acceptor.accept();
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut second)
                .await
                .is_err(),
            "accepted beyond the limit"
        );
        drop(permit);
        let (_s2, _, _permit) = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("accepted once the first place was freed");
    }
}
