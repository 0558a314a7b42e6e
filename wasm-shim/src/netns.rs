//! Sockets made inside a pod's network namespace.
//!
//! A pod that runs OCI containers beside its components has a Linux network namespace
//! (the node makes it; see `baton-node`'s `netns.rs`), and `localhost` there must mean the
//! same thing to a container and to a component. A socket belongs to the namespace of the
//! thread that made it, for its whole life, and everything else done with it (bind,
//! connect, accept, I/O) follows the socket, not the thread. So only the `socket(2)` call
//! has to happen inside: [`NetworkNamespace::enter`] moves the calling thread in with
//! `setns(2)`, runs the one call, and moves it back before returning, on whatever thread
//! the guest happens to run. No thread is ever left inside a pod's namespace: a failure to
//! move back aborts the process, since every later socket made on that thread would land
//! in the wrong pod.
//!
//! The two `setns` calls cost a few microseconds per socket; the pods of components only
//! have no namespace and pay nothing.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// An open network namespace (a file under `/run/netns`, or a `/proc/PID/ns/net`).
#[derive(Debug)]
pub struct NetworkNamespace {
    file: File,
    path: PathBuf,
}

/// The node's own namespace, where every thread comes back to. `/proc/self` names the
/// main thread, which never enters a pod's namespace.
fn home() -> std::io::Result<&'static File> {
    static HOME: OnceLock<Result<File, String>> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| std::io::Error::other(format!("opening the node's network namespace: {e}")))
}

impl NetworkNamespace {
    /// Opens the namespace at `path`; the pod keeps it open, so it lives at least as
    /// long as the pod's sockets could be made in it.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        home()?;
        Ok(Self {
            file: File::open(path)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `make` on this thread inside the namespace, and comes back.
    pub fn enter<T>(&self, make: impl FnOnce() -> T) -> std::io::Result<T> {
        let home = home()?;
        move_into_link_name_space(self.file.as_fd(), Some(LinkNameSpaceType::Network))?;
        struct Back(&'static File);
        impl Drop for Back {
            fn drop(&mut self) {
                if let Err(e) =
                    move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))
                {
                    eprintln!("baton: a thread could not leave a pod's network namespace: {e}");
                    std::process::abort();
                }
            }
        }
        let _back = Back(home);
        Ok(make())
    }

    /// A TCP listener on every address of the namespace at `port`.
    pub fn listen(&self, port: u16) -> std::io::Result<tokio::net::TcpListener> {
        let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
        let l = self.enter(|| std::net::TcpListener::bind(addr))??;
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    }

    /// A TCP connection made from inside the namespace.
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let socket = self.enter(|| match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        })??;
        socket.connect(addr).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket made inside a fresh namespace sees only that namespace's loopback, and
    /// the thread that made it is back home afterwards.
    #[test]
    fn sockets_are_made_inside_and_the_thread_comes_back() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: making a network namespace needs root");
            return;
        }
        // A namespace of our own, as the node makes them.
        let name = format!("baton-shim-test-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(ip(&["netns", "add", &name]), "ip netns add");
        let path = format!("/run/netns/{name}");
        let ns = NetworkNamespace::open(Path::new(&path)).unwrap();
        assert!(ip(&["netns", "delete", &name]), "ip netns delete");
        let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let inside = ns
            .enter(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
            .unwrap();
        assert_ne!(inside, before);
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            before
        );
        // Still open here though its name is gone. A port taken inside is free outside,
        // and taken for a second socket made inside.
        let inside = ns
            .enter(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let port = inside.local_addr().unwrap().port();
        let outside = std::net::TcpListener::bind(("127.0.0.1", port));
        assert!(outside.is_ok(), "{outside:?}");
        let again = ns
            .enter(|| std::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        assert!(again.is_err(), "{again:?}");
    }
}
