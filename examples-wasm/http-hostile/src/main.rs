//! `http-hostile`: a wasi:http component that misbehaves on some paths, so tests can check
//! that a bad request fails alone: `/loop` spins forever, `/memory` allocates until it is
//! stopped, `/trap` panics, `/work` burns 20 ms of CPU (a CPU-bound service under load),
//! `/count` answers how many requests this instance has seen (1 when every request gets a
//! fresh instance, whose memory is the component's image again); any other path answers
//! `ok`.
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// Requests this instance has answered on `/count`: in the data segment, which a reused
/// memory slot must have reset.
static SEEN: AtomicU64 = AtomicU64::new(0);

use wstd::http::body::Body;
use wstd::http::{Error, Request, Response};

#[wstd::http_server]
async fn main(req: Request<Body>) -> Result<Response<Body>, Error> {
    match req.uri().path() {
        "/loop" => {
            let mut x: u64 = 0;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        "/memory" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                black_box(&hoard);
            }
        }
        "/count" => {
            // Some heap too, so that the reset covers pages beyond the image's.
            let scratch = black_box(vec![7u8; 256 << 10]);
            let n = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
            Ok(Response::new(
                format!("seen {n} {}\n", scratch.len()).into(),
            ))
        }
        "/trap" => panic!("http-hostile panics on purpose"),
        "/work" => {
            let start = std::time::Instant::now();
            let mut x: u64 = 0;
            while start.elapsed() < std::time::Duration::from_millis(20) {
                for _ in 0..10_000 {
                    x = black_box(x.wrapping_add(1));
                }
            }
            Ok(Response::new(format!("worked {x}\n").into()))
        }
        _ => Ok(Response::new("ok\n".to_string().into())),
    }
}
