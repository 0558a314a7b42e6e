//! `kv-counter BUCKET [count|fill|stay]`: counts in wasi:keyvalue bucket BUCKET.
//! - `count` (the default): adds one to the counter `hits` and prints `hits=N`.
//! - `stay`: the same, then keeps running (a Deployment's replica).
//! - `fill`: writes values of 1 KiB until the bucket refuses one, prints the refusal,
//!   then counts as `count` does: a full bucket still serves its reads and rewrites.
wit_bindgen::generate!({ path: "wit", world: "baton:probe/kv-counter", generate_all });

use wasi::keyvalue0_2_0_draft::{atomics, store};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).cloned().unwrap_or_else(|| "counters".into());
    let mode = args.get(2).map(String::as_str).unwrap_or("count");
    let bucket = match store::open(&name) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kv-counter: opening {name}: {e:?}");
            std::process::exit(1);
        }
    };
    if mode == "fill" {
        for i in 0..100_000 {
            if let Err(e) = bucket.set(&format!("blob-{i}"), &[b'x'; 1024]) {
                println!("refused after {i} values: {e:?}");
                break;
            }
        }
    }
    match atomics::increment(&bucket, "hits", 1) {
        Ok(n) => println!("hits={n}"),
        Err(e) => {
            eprintln!("kv-counter: incrementing: {e:?}");
            std::process::exit(1);
        }
    }
    if mode == "stay" {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
