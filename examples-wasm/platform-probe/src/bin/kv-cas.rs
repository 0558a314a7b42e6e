//! `kv-cas BUCKET`: exercises wasi:keyvalue 0.2.0-draft2 (Spin's) and prints one line per
//! step: a signed counter, a batch, a paged listing, and a compare-and-swap that loses a
//! race and wins on its retry.
wit_bindgen::generate!({ path: "wit", world: "baton:probe/kv-cas", generate_all });

use wasi::keyvalue0_2_0_draft2::atomics::{self, Cas, CasError};
use wasi::keyvalue0_2_0_draft2::{batch, store};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "cas".into());
    let b = store::open(&name).expect("open");
    println!(
        "counter={}",
        atomics::increment(&b, "n", -5).expect("increment")
    );
    batch::set_many(
        &b,
        &[("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())],
    )
    .expect("set-many");
    let got = batch::get_many(&b, &["a".into(), "zz".into()]).expect("get-many");
    let shown: Vec<String> = got
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}:{}",
                v.as_deref()
                    .map_or("-".into(), |v| String::from_utf8_lossy(v).to_string())
            )
        })
        .collect();
    println!("batch={}", shown.join(","));
    let listed = b.list_keys(None).expect("list-keys");
    println!(
        "keys={} more={}",
        listed.keys.join(","),
        listed.cursor.is_some()
    );
    // Someone else writes between our read and our swap: the swap fails with a fresh
    // handle on the new value, and the retry wins.
    let cas = Cas::new(&b, "a").expect("cas");
    b.set("a", b"theirs").expect("set");
    match atomics::swap(cas, b"ours") {
        Err(CasError::CasFailed(again)) => {
            let seen = again.current().expect("current").unwrap_or_default();
            println!("lost to {}", String::from_utf8_lossy(&seen));
            atomics::swap(again, b"ours")
                .map_err(|_| "retry")
                .expect("retry");
        }
        _ => panic!("the swap should have lost"),
    }
    println!(
        "a={}",
        String::from_utf8_lossy(&b.get("a").unwrap().unwrap())
    );
}
