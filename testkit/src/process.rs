//! Servers under test bind port 0 and say where they listen; nothing picks a "free" port
//! first, since another process may take it between the pick and the bind.
//!
//! - A server that logs its address (docker-registry, etcd, `wasmtime serve`, `baton
//!   run`) is started on port 0, and [`announced_addr`] reads the address from its log.
//! - A server that must be known before it starts (the members of one Raft cluster name
//!   each other) gets a socket the test bound and keeps: [`pass_listener`] hands it to
//!   the child as file descriptor 3, as systemd's socket activation does, and the
//!   `baton server --listen-fd 3` takes it. A restarted member gets the same socket.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use crate::TimedOut;

/// The file descriptor a passed listener has in the child.
pub const LISTEN_FD: i32 = 3;

/// Reads `stream` (a child's stdout or stderr) until a line contains `marker` followed by
/// an address, and returns that address. The rest of the stream is read and dropped on a
/// thread of its own, so that the child never blocks on a full pipe.
pub fn announced_addr(
    stream: impl Read + Send + 'static,
    marker: &str,
    timeout: Duration,
) -> Result<SocketAddr, TimedOut> {
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = marker.to_string();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let found = line.split_once(needle.as_str()).and_then(|(_, rest)| {
                let rest = rest.trim_start_matches("http://");
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '/' || c == '"' || c == ',')
                    .unwrap_or(rest.len());
                rest[..end].parse::<SocketAddr>().ok()
            });
            if let (Some(addr), Some(tx)) = (found, &tx) {
                let _ = tx.send(addr);
            }
            if found.is_some() {
                tx = None;
            }
        }
    });
    rx.recv_timeout(timeout).map_err(|_| TimedOut {
        what: format!("a line saying {marker:?} and an address"),
        timeout,
    })
}

/// Makes `listener` the child's file descriptor [`LISTEN_FD`]. The test keeps its own
/// copy, so the port stays reserved for a restart.
#[allow(unsafe_code)]
pub fn pass_listener(cmd: &mut Command, listener: &TcpListener) {
    let fd = listener.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
    // fcntl, which are async-signal-safe. Rust opens sockets close-on-exec; dup2 makes a
    // copy without that flag, and if the socket already is fd 3 the flag is cleared.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == LISTEN_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, LISTEN_FD)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_read_from_a_log_line() {
        let log = "starting\ntime=x level=info msg=\"listening on 127.0.0.1:45753\" go=1\nmore\n";
        let addr = announced_addr(
            std::io::Cursor::new(log.as_bytes().to_vec()),
            "listening on ",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(addr, "127.0.0.1:45753".parse().unwrap());
        let url = "Serving HTTP on http://127.0.0.1:38187/\n";
        let addr = announced_addr(
            std::io::Cursor::new(url.as_bytes().to_vec()),
            "on http://",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(addr.port(), 38187);
    }

    #[test]
    fn a_log_without_the_line_times_out() {
        let err = announced_addr(
            std::io::Cursor::new(b"nothing here\n".to_vec()),
            "listening on ",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(err.to_string().contains("listening on"), "{err}");
    }

    #[test]
    fn a_passed_listener_is_fd_3_in_the_child() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut cmd = Command::new("sh");
        // The child sees fd 3 as a socket bound to our port.
        cmd.args(["-c", "readlink /proc/self/fd/3"]);
        pass_listener(&mut cmd, &l);
        let out = cmd.output().unwrap();
        let link = String::from_utf8_lossy(&out.stdout);
        assert!(link.starts_with("socket:"), "{link} (port {port})");
    }
}
