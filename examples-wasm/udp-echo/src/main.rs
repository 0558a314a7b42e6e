//! `udp-echo`: UDP over wasi:sockets, both ends.
//! - `MODE=serve` (the default): echoes each datagram on port `PORT` (default 5353) back
//!   to its sender, prefixed with `NAME` and a colon, so that a client can tell which
//!   replica answered (give it the pod's name through the downward API).
//! - `MODE=ping`: sends `COUNT` datagrams (default 3) to `TARGET:PORT` (a name or an
//!   address) from one socket and checks each reply; retries each for up to `WAIT_MS`
//!   (default 10000), since the server or its Service may still be starting. Prints the
//!   replies and exits 0 if every one came back, 1 otherwise.
use std::net::{ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn serve(port: u16) -> std::io::Result<()> {
    let socket = UdpSocket::bind(("0.0.0.0", port))?;
    let me = std::env::var("NAME").unwrap_or_default();
    println!("udp-echo serving on {}", socket.local_addr()?);
    let mut buf = [0u8; 65536];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let mut reply = format!("{me}:").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        socket.send_to(&reply, from)?;
    }
}

fn ping(target: &str, port: u16) -> Result<(), String> {
    let wait = Duration::from_millis(env_or("WAIT_MS", 10_000));
    let count: usize = env_or("COUNT", 3);
    let start = Instant::now();
    let addr = loop {
        match (target, port).to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => break a,
            _ if start.elapsed() >= wait => return Err(format!("cannot resolve {target}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    // wasi-libc has no receive timeout: poll a non-blocking socket instead.
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("non-blocking: {e}"))?;
    let mut buf = [0u8; 65536];
    for i in 0..count {
        let msg = format!("ping-{i}");
        let reply = 'sent: loop {
            socket
                .send_to(msg.as_bytes(), addr)
                .map_err(|e| format!("send to {addr}: {e}"))?;
            let sent = Instant::now();
            while sent.elapsed() < Duration::from_millis(300) {
                match socket.recv_from(&mut buf) {
                    Ok((n, _)) => break 'sent String::from_utf8_lossy(&buf[..n]).into_owned(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    // An ICMP unreachable from an earlier send: try again.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            if start.elapsed() >= wait {
                return Err(format!("no reply from {addr} ({target}:{port})"));
            }
        };
        if !reply.ends_with(&format!(":{msg}")) {
            return Err(format!("unexpected reply {reply:?} to {msg:?}"));
        }
        println!("reply {reply}");
    }
    Ok(())
}

fn main() {
    let port: u16 = env_or("PORT", 5353);
    match std::env::var("MODE").as_deref() {
        Ok("ping") => {
            let target = std::env::var("TARGET").unwrap_or_else(|_| "localhost".into());
            match ping(&target, port) {
                Ok(()) => println!("udp echo ok from {target}:{port}"),
                Err(e) => {
                    eprintln!("udp-echo: {e}");
                    std::process::exit(1);
                }
            }
        }
        _ => {
            if let Err(e) = serve(port) {
                eprintln!("udp-echo: {e}");
                std::process::exit(1);
            }
        }
    }
}
