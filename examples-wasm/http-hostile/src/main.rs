//! `http-hostile`: a wasi:http component that misbehaves on some paths, so tests can check
//! that a bad request fails alone: `/loop` spins forever, `/memory` allocates until it is
//! stopped, `/trap` panics; any other path answers `ok`.
use std::hint::black_box;

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
        "/trap" => panic!("http-hostile panics on purpose"),
        _ => Ok(Response::new("ok\n".to_string().into())),
    }
}
