//! `hello`: a wasi:cli component. Prints its arguments and environment, then exits 0.
//! With env `TICKS=N` it then prints `tick 1` … `tick N`, one every `TICK_MS`
//! milliseconds (default 200), as a service writing a log over time does. With env
//! `STATE_FILE` it first keeps state there, as a service with a volume does: it prints
//! `state found: …` if the file exists, else writes `STATE` to it and prints
//! `state written: …`.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("hello from a baton pod: args={args:?}");
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.sort();
    for (k, v) in vars {
        println!("env {k}={v}");
    }
    if let Ok(path) = std::env::var("STATE_FILE") {
        match std::fs::read_to_string(&path) {
            Ok(s) => println!("state found: {}", s.trim()),
            Err(_) => {
                let v = std::env::var("STATE").unwrap_or_else(|_| "first run".into());
                match std::fs::write(&path, format!("{v}\n")) {
                    Ok(()) => println!("state written: {v}"),
                    Err(e) => println!("state not written: {e}"),
                }
            }
        }
    }
    let num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (ticks, every) = (num("TICKS", 0), num("TICK_MS", 200));
    for i in 1..=ticks {
        std::thread::sleep(std::time::Duration::from_millis(every));
        println!("tick {i}");
    }
}
