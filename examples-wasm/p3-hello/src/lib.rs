//! `p3-hello`: a WASI 0.3 command (`wasi:cli/run@0.3.0`). Prints a greeting with its
//! arguments through 0.3's stdout stream; exits non-zero when its first argument is
//! `fail`.
struct Hello;

wasip3::cli::command::export!(Hello);

impl wasip3::exports::cli::run::Guest for Hello {
    async fn run() -> Result<(), ()> {
        let args = wasip3::cli::environment::get_arguments();
        let (mut tx, rx) = wasip3::wit_stream::new();
        let done = wasip3::cli::stdout::write_via_stream(rx);
        let line = format!(
            "hello from wasi 0.3, args={:?}\n",
            &args[1.min(args.len())..]
        );
        let unwritten = tx.write_all(line.into_bytes()).await;
        drop(tx);
        done.await.map_err(|_| ())?;
        if !unwritten.is_empty() || args.get(1).is_some_and(|a| a == "fail") {
            return Err(());
        }
        Ok(())
    }
}
