//! `config-watch KEY [INTERVAL_MS]`: reads wasi:config key KEY now and then, and prints
//! `KEY=value` (or `KEY is not set`) each time its value changes, logging the change
//! through wasi:logging too. Runs until stopped.
wit_bindgen::generate!({ path: "wit", world: "baton:probe/config-watch", generate_all });

use wasi::config::store;
use wasi::logging::logging::{log, Level};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let key = args.get(1).cloned().unwrap_or_else(|| "greeting".into());
    let every = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200);
    let mut last: Option<Option<String>> = None;
    loop {
        let now = match store::get(&key) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("config-watch: reading {key}: {e:?}");
                std::process::exit(1);
            }
        };
        if last.as_ref() != Some(&now) {
            match &now {
                Some(v) => println!("{key}={v}"),
                None => println!("{key} is not set"),
            }
            log(Level::Info, "config-watch", &format!("{key} changed"));
            last = Some(now);
        }
        std::thread::sleep(std::time::Duration::from_millis(every));
    }
}
