//! `toolbox`: a small shell for looking inside a Baton pod, as a wasi:cli command. It is
//! what `kubectl exec` and `kubectl debug` run in pods whose own components have no shell.
//!
//! One binary, many commands, picked by argv[0] as busybox does (`kubectl exec POD -- ls
//! /data`), or given after another name (`toolbox ls /data`; a container's argv[0] is its
//! name): a name alone, that is no command, starts `sh`. `sh` reads command lines from
//! stdin (or `sh -c "LINE; LINE"`), one command per line or per `;`, words split on
//! blanks with '…' and "…" quoting. Commands:
//!
//! - `echo ARGS…`, `cat [FILE…]` (stdin without files), `ls [-l] [PATH…]`, `env`,
//!   `pwd`, `true`, `false`, `exit [N]`;
//! - `ps`: the pod's live tasks (each container's process or server, requests in flight,
//!   exec'd commands) with their CPU time and memory, from Baton's `baton:pod/processes`
//!   host interface (`wasm-shim/wit/pod.wit`);
//! - `get URL` (alias `curl`): an HTTP GET over wasi:http; prints the body, fails on
//!   status ≥ 400;
//! - `tcp HOST PORT`: connects, sends stdin, prints what comes back;
//! - `lookup NAME`: the addresses a name resolves to;
//! - `tar cf - PATH…` writes an archive to stdout; `tar xf - [-C DIR]` unpacks stdin (the
//!   two commands `kubectl cp` runs; `m`, `v` and `--no-same-*` are accepted and ignored);
//! - `test -d|-f|-e PATH`; `tty`: whether stdout is a terminal, and its size (from
//!   `COLUMNS` and `LINES`, which Baton sets for `kubectl exec -t`);
//! - `sleep [SECONDS]` (forever without one): a container that waits to be exec'd into;
//! - `spin [SECONDS]`: keeps a CPU busy; `hog MIB`: holds that much memory, then sleeps.
//!
//! Exit status is the last command's: 0 on success, 1 on failure, 127 for an unknown
//! command, or N from `exit N`, reported through wasi:cli's `exit-with-code`.
use std::io::{Read, Write};
use std::net::ToSocketAddrs;

wit_bindgen::generate!({
    path: "../../wasm-shim/wit",
    world: "baton:pod/host",
});

use baton::pod::processes;

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .map(|a| {
            a.rsplit('/')
                .next()
                .unwrap_or(a)
                .trim_end_matches(".wasm")
                .to_string()
        })
        .unwrap_or_default();
    // Called by a command's name (exec), or by another (`toolbox`, or the container's
    // name, which Baton gives a container as argv[0]): then the command follows, and
    // without one it is a shell.
    if COMMANDS.contains(&name.as_str()) {
        args[0] = name;
    } else if !args.is_empty() {
        args.remove(0);
    }
    if args.is_empty() {
        args.push("sh".into());
    }
    exit(run(&args));
}

/// Ends the program with `code`. Rust's std reports only success or failure on wasip2, so
/// any other code goes through `exit-with-code`.
fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    match code {
        0 => std::process::exit(0),
        c => {
            wasip2::cli::exit::exit_with_code(c.clamp(1, 255) as u8);
            std::process::exit(1)
        }
    }
}

const COMMANDS: &[&str] = &[
    "sh", "echo", "cat", "ls", "env", "pwd", "true", "false", "exit", "get", "curl", "tcp", "nc",
    "lookup", "nslookup", "sleep", "spin", "hog", "tar", "test", "ps", "tty",
];

/// Runs one command; returns its status.
fn run(args: &[String]) -> i32 {
    let (cmd, rest) = (args[0].as_str(), &args[1..]);
    let result = match cmd {
        "sh" => return shell(rest),
        "echo" => {
            println!("{}", rest.join(" "));
            Ok(())
        }
        "cat" => cat(rest),
        "ls" => ls(rest),
        "env" => {
            let mut vars: Vec<(String, String)> = std::env::vars().collect();
            vars.sort();
            for (k, v) in vars {
                println!("{k}={v}");
            }
            Ok(())
        }
        "pwd" => std::env::current_dir()
            .map(|d| println!("{}", d.display()))
            .map_err(|e| e.to_string()),
        "true" => Ok(()),
        "false" => return 1,
        "exit" => exit(rest.first().and_then(|c| c.parse().ok()).unwrap_or(0)),
        "ps" => {
            ps();
            Ok(())
        }
        "tty" => {
            if wasip2::cli::terminal_stdout::get_terminal_stdout().is_none() {
                println!("not a tty");
                return 1;
            }
            let var = |k| std::env::var(k).unwrap_or_else(|_| "?".into());
            println!("terminal {}x{}", var("COLUMNS"), var("LINES"));
            Ok(())
        }
        "get" | "curl" => get(rest),
        "tar" => tar(rest),
        "test" => {
            let ok = match rest {
                [flag, path] => {
                    let m = std::fs::metadata(path);
                    match flag.as_str() {
                        "-d" => m.is_ok_and(|m| m.is_dir()),
                        "-f" => m.is_ok_and(|m| m.is_file()),
                        "-e" => m.is_ok(),
                        _ => false,
                    }
                }
                _ => false,
            };
            return if ok { 0 } else { 1 };
        }
        "tcp" | "nc" => tcp(rest),
        "lookup" | "nslookup" => lookup(rest),
        "sleep" => {
            let secs: Option<f64> = rest.first().and_then(|s| s.parse().ok());
            match secs {
                Some(s) => std::thread::sleep(std::time::Duration::from_secs_f64(s)),
                None => loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                },
            }
            Ok(())
        }
        "spin" => {
            let secs: f64 = rest
                .first()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::MAX);
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                for i in 0..100_000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                }
                std::hint::black_box(x);
            }
            Ok(())
        }
        "hog" => {
            let mib: usize = rest.first().and_then(|s| s.parse().ok()).unwrap_or(16);
            let mut held = vec![0u8; mib << 20];
            // Touch every page, so the memory is really held.
            for i in (0..held.len()).step_by(4096) {
                held[i] = 1;
            }
            println!("holding {mib} MiB");
            let _ = std::io::stdout().flush();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                std::hint::black_box(&held);
            }
        }
        other => Err(format!("{other}: command not found")),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{cmd}: {e}");
            if e.ends_with("command not found") {
                127
            } else {
                1
            }
        }
    }
}

/// `sh -c "LINE"`, or lines from stdin until it ends or `exit`.
fn shell(args: &[String]) -> i32 {
    if args.first().map(String::as_str) == Some("-c") {
        let line = args.get(1).cloned().unwrap_or_default();
        return run_line(&line);
    }
    let mut status = 0;
    let mut line = String::new();
    loop {
        print!("$ ");
        let _ = std::io::stdout().flush();
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => return status,
            Ok(_) => status = run_line(&line),
        }
    }
}

fn run_line(line: &str) -> i32 {
    let mut status = 0;
    for part in line.split(';') {
        let words = split_words(part);
        if !words.is_empty() {
            status = run(&words);
            let _ = std::io::stdout().flush();
        }
    }
    status
}

/// Splits on blanks, keeping quoted text together.
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut has = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                has = true;
            }
            (None, c) if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        words.push(cur);
    }
    words
}

fn cat(files: &[String]) -> Result<(), String> {
    let mut out = std::io::stdout();
    if files.is_empty() {
        std::io::copy(&mut std::io::stdin(), &mut out).map_err(|e| e.to_string())?;
        return Ok(());
    }
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| format!("{f}: {e}"))?;
        std::io::copy(&mut file, &mut out).map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(())
}

fn ls(args: &[String]) -> Result<(), String> {
    let long = args.iter().any(|a| a == "-l");
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let paths = if paths.is_empty() {
        vec![".".to_string()]
    } else {
        paths.into_iter().cloned().collect()
    };
    for p in &paths {
        let meta = std::fs::metadata(p).map_err(|e| format!("{p}: {e}"))?;
        if !meta.is_dir() {
            println!("{}", entry(p, &meta, long));
            continue;
        }
        let mut names: Vec<(String, std::fs::Metadata)> = std::fs::read_dir(p)
            .map_err(|e| format!("{p}: {e}"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().ok()?,
                ))
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (n, m) in names {
            println!("{}", entry(&n, &m, long));
        }
    }
    Ok(())
}

fn entry(name: &str, meta: &std::fs::Metadata, long: bool) -> String {
    let kind = if meta.is_dir() { "/" } else { "" };
    if long {
        let t = if meta.is_dir() { 'd' } else { '-' };
        format!("{t} {:>10} {name}{kind}", meta.len())
    } else {
        format!("{name}{kind}")
    }
}

fn get(args: &[String]) -> Result<(), String> {
    let url = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .ok_or("usage: get URL")?;
    let url = if url.contains("://") {
        url.clone()
    } else {
        format!("http://{url}")
    };
    wstd::runtime::block_on(async move {
        let req = wstd::http::Request::get(url.as_str())
            .body(wstd::http::body::Body::empty())
            .map_err(|e| e.to_string())?;
        let resp = wstd::http::Client::new()
            .send(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let bytes = body.contents().await.map_err(|e| e.to_string())?;
        std::io::stdout()
            .write_all(bytes)
            .map_err(|e| e.to_string())?;
        if status.as_u16() >= 400 {
            return Err(format!("{url}: HTTP {status}"));
        }
        Ok(())
    })
}

fn tcp(args: &[String]) -> Result<(), String> {
    let (host, port) = match args {
        [h, p, ..] => (h.clone(), p.parse::<u16>().map_err(|e| e.to_string())?),
        _ => return Err("usage: tcp HOST PORT".into()),
    };
    let mut stream = std::net::TcpStream::connect((host.as_str(), port))
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    eprintln!("connected to {host}:{port}");
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())?;
    stream.write_all(&input).map_err(|e| e.to_string())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    stream.read_to_end(&mut back).map_err(|e| e.to_string())?;
    std::io::stdout()
        .write_all(&back)
        .map_err(|e| e.to_string())
}

fn lookup(args: &[String]) -> Result<(), String> {
    let name = args.first().ok_or("usage: lookup NAME")?;
    let addrs = (name.as_str(), 0)
        .to_socket_addrs()
        .map_err(|e| format!("{name}: {e}"))?;
    for a in addrs {
        println!("{}", a.ip());
    }
    Ok(())
}

/// `tar cf - PATH…` or `tar xf - [-C DIR]`, with the option forms kubectl uses (`-xmf`,
/// `cf`, `--no-same-owner`…).
fn tar(args: &[String]) -> Result<(), String> {
    let mut create = false;
    let mut extract = false;
    let mut dir: Option<String> = None;
    let mut paths = Vec::new();
    let mut it = args.iter().peekable();
    let mut first = true;
    while let Some(a) = it.next() {
        if a == "-C" {
            dir = it.next().cloned();
        } else if a.starts_with("--") {
            // --no-same-permissions, --no-same-owner: nothing to do without owners.
        } else if a == "-" {
            // The archive is stdin or stdout.
        } else if a.starts_with('-') || first {
            let flags = a.trim_start_matches('-');
            if flags.chars().all(|c| "cxmfvzpo".contains(c)) {
                create |= flags.contains('c');
                extract |= flags.contains('x');
            } else {
                paths.push(a.clone());
            }
        } else {
            paths.push(a.clone());
        }
        first = false;
    }
    if create == extract {
        return Err("usage: tar cf - PATH... | tar xf - [-C DIR]".into());
    }
    if extract {
        let base = std::path::PathBuf::from(dir.unwrap_or_else(|| ".".into()));
        return untar(std::io::stdin(), &base);
    }
    let mut builder = tar::Builder::new(std::io::stdout());
    for p in &paths {
        // Names inside the archive are relative, as GNU tar writes them.
        add(
            &mut builder,
            std::path::Path::new(p),
            p.trim_start_matches('/'),
        )?;
    }
    builder.finish().map_err(|e| e.to_string())
}

/// Adds a file or a directory tree. Headers are written by hand: the tar crate reads
/// platform metadata (owners, modes) that WASI does not have.
fn add(
    b: &mut tar::Builder<std::io::Stdout>,
    path: &std::path::Path,
    name: &str,
) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut h = tar::Header::new_gnu();
    h.set_mtime(mtime);
    if meta.is_dir() {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty()).map_err(err)?;
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(err)?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let child = format!(
                "{}/{}",
                name.trim_end_matches('/'),
                e.file_name().to_string_lossy()
            );
            add(b, &e.path(), &child)?;
        }
    } else if meta.is_file() {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(meta.len());
        let f = std::fs::File::open(path).map_err(err)?;
        b.append_data(&mut h, name, f).map_err(err)?;
    }
    // Anything else (a symlink, a FIFO) is left out: a copy follows no links.
    Ok(())
}

/// Unpacks regular files and directories under `base`; refuses names that would lead
/// out of it, and skips links and devices.
fn untar(input: impl Read, base: &std::path::Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry.path().map_err(|e| e.to_string())?.into_owned();
        if name.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        }) {
            return Err(format!(
                "{}: leads out of {}",
                name.display(),
                base.display()
            ));
        }
        let dest = base.join(&name);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("{}: {e}", parent.display()))?;
                }
                let mut f =
                    std::fs::File::create(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
                std::io::copy(&mut entry, &mut f)
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// `ps`: one line per live task of the pod.
fn ps() {
    println!(
        "{:>5} {:<16} {:<8} {:>8} {:>9} {:>10}  COMMAND",
        "PID", "CONTAINER", "KIND", "AGE", "CPU", "MEMORY"
    );
    for p in processes::list_processes() {
        println!(
            "{:>5} {:<16} {:<8} {:>8} {:>9} {:>10}  {}",
            p.pid,
            p.container,
            p.kind,
            duration(p.age_ms),
            format!("{:.3}s", p.cpu_ns as f64 / 1e9),
            format!("{:.1}MiB", p.memory_bytes as f64 / (1 << 20) as f64),
            p.command
        );
    }
}

/// `12s`, `3m04s`, `2h05m`: an age as ps prints it, short.
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}
