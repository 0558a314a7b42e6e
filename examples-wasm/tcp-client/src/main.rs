//! `tcp-client`: connects to `localhost:PORT` (env `TARGET`, `PORT`), sends a few lines and
//! checks that each comes back; waits up to `WAIT_MS` for the server to appear. Exits 0 if
//! every echo matched, 1 otherwise.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "localhost".into());
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7000);
    // A sibling may still be starting: retry until `WAIT_MS` (default 5000) has passed.
    let wait = Duration::from_millis(
        std::env::var("WAIT_MS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(5000),
    );
    let start = Instant::now();
    let mut stream = loop {
        match TcpStream::connect((target.as_str(), port)) {
            Ok(s) => break s,
            Err(e) if start.elapsed() >= wait => {
                eprintln!("tcp-client: cannot connect to {target}:{port}: {e}");
                std::process::exit(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    for i in 0..3 {
        let msg = format!("ping-{i}\n");
        stream.write_all(msg.as_bytes()).expect("write");
        let mut got = vec![0u8; msg.len()];
        if let Err(e) = stream.read_exact(&mut got) {
            eprintln!("tcp-client: read failed: {e}");
            std::process::exit(1);
        }
        if got != msg.as_bytes() {
            eprintln!(
                "tcp-client: echo mismatch: {:?}",
                String::from_utf8_lossy(&got)
            );
            std::process::exit(1);
        }
    }
    println!("echo ok from {target}:{port}");
}
