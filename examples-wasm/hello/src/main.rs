//! `hello`: a wasi:cli component. Prints its arguments and environment, then exits 0.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("hello from a baton pod: args={args:?}");
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.sort();
    for (k, v) in vars {
        println!("env {k}={v}");
    }
}
