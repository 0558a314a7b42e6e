//! `hostile`: misbehaves on purpose, so tests can check the sandbox contains it. The mode is
//! the first argument (or env `MODE`):
//! - `loop`: spins forever;
//! - `memory`: allocates until it is stopped;
//! - `trap`: panics (a Wasm trap);
//! - `read-host`: tries to read host files outside its mounts, prints what it could read,
//!   exits 0 only if everything was denied;
//! - `sockets`: opens sockets until refused, prints how many it got.
use std::hint::black_box;

fn main() {
    let mode = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("MODE").ok())
        .unwrap_or_default();
    match mode.as_str() {
        "loop" => {
            let mut x: u64 = 0;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        "memory" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                black_box(&hoard);
            }
        }
        "trap" => panic!("hostile guest panics on purpose"),
        "read-host" => {
            let mut leaked = 0;
            for path in [
                "/etc/passwd",
                "/etc/hostname",
                "/proc/self/environ",
                "../../etc/passwd",
                "/data/../../etc/passwd",
                "/",
            ] {
                match std::fs::read_dir(path)
                    .map(|_| ())
                    .or_else(|_| std::fs::read(path).map(|_| ()))
                {
                    Ok(()) => {
                        println!("LEAK: could read {path}");
                        leaked += 1;
                    }
                    Err(e) => println!("denied {path}: {e}"),
                }
            }
            std::process::exit(if leaked == 0 { 0 } else { 3 });
        }
        "sockets" => {
            let mut held = Vec::new();
            for i in 0..10_000 {
                // Port 0: the system picks, so only a cap can refuse.
                match std::net::TcpListener::bind(("0.0.0.0", 0)) {
                    Ok(l) => held.push(l),
                    Err(e) => {
                        println!("socket {i} refused: {e}");
                        break;
                    }
                }
            }
            println!("opened {} sockets", held.len());
        }
        other => {
            eprintln!("hostile: unknown mode {other:?} (loop, memory, trap, read-host, sockets)");
            std::process::exit(2);
        }
    }
}
