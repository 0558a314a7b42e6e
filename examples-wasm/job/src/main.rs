//! `job`: computes the number of primes below `N` (env, default 100000), prints it, writes
//! it to `$OUT_DIR/result.txt` (default `/data`), and exits with env `EXIT_CODE` (default 0;
//! through wasi:cli 0.2 a non-zero code arrives as 1).
fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut sieve = vec![true; n as usize];
    let mut count = 0u64;
    for i in 2..n as usize {
        if sieve[i] {
            count += 1;
            let mut j = i * i;
            while j < n as usize {
                sieve[j] = false;
                j += i;
            }
        }
    }
    let line = format!("primes below {n}: {count}");
    println!("{line}");
    let dir = std::env::var("OUT_DIR").unwrap_or_else(|_| "/data".into());
    if let Err(e) = std::fs::write(format!("{dir}/result.txt"), format!("{line}\n")) {
        eprintln!("job: cannot write {dir}/result.txt: {e}");
    }
    let code: i32 = std::env::var("EXIT_CODE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::process::exit(code);
}
