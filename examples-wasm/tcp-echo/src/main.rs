//! `tcp-echo`: a wasi:sockets TCP echo server on the port in env `PORT` (default 7000).
use std::io::{Read, Write};
use std::net::TcpListener;

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7000);
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("tcp-echo listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let mut stream = stream?;
        let mut buf = [0u8; 4096];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    Ok(())
}
