//! `p3-tcp`: WASI 0.3 sockets, for the tests of the pod's network. Its first argument
//! picks what it does:
//! - `echo PORT`: serves a TCP echo on `0.0.0.0:PORT` (the pod's address, in a pod).
//! - `client HOST PORT WAIT_MS`: resolves HOST, connects (retrying for up to WAIT_MS while
//!   the server starts), checks three echoed lines and prints `echo ok from HOST:PORT`;
//!   exits non-zero with `cannot connect` if it never could.
//! - `listen-any`: listens on a socket it never bound and prints the address it got.
//! - `hog`: opens sockets until it is refused and prints how many it got.
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use wasip3::clocks::monotonic_clock;
use wasip3::sockets::ip_name_lookup::resolve_addresses;
use wasip3::sockets::types::{
    IpAddress, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress, TcpSocket,
};
use wasip3::wit_bindgen::StreamResult;

struct Tcp;

wasip3::cli::command::export!(Tcp);

impl wasip3::exports::cli::run::Guest for Tcp {
    async fn run() -> Result<(), ()> {
        let args = wasip3::cli::environment::get_arguments();
        let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
        let result = match arg(1) {
            "echo" => echo(arg(2).parse().unwrap_or(7000)).await,
            "client" => {
                let port = arg(3).parse().unwrap_or(7000);
                let wait_ms: u64 = arg(4).parse().unwrap_or(5000);
                client(arg(2), port, wait_ms * 1_000_000).await
            }
            "listen-any" => listen_any().await,
            "hog" => hog().await,
            other => Err(format!("unknown mode {other:?}")),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                say(&format!("p3-tcp: {e}")).await;
                Err(())
            }
        }
    }
}

/// Writes a line to stdout through 0.3's stream.
async fn say(line: &str) {
    let (mut tx, rx) = wasip3::wit_stream::new();
    let done = wasip3::cli::stdout::write_via_stream(rx);
    let _ = tx.write_all(format!("{line}\n").into_bytes()).await;
    drop(tx);
    let _ = done.await;
}

fn v4(ip: (u8, u8, u8, u8), port: u16) -> IpSocketAddress {
    IpSocketAddress::Ipv4(Ipv4SocketAddress { port, address: ip })
}

fn show(addr: &IpSocketAddress) -> String {
    match addr {
        IpSocketAddress::Ipv4(a) => {
            let (x, y, z, w) = a.address;
            format!("{x}.{y}.{z}.{w}:{}", a.port)
        }
        IpSocketAddress::Ipv6(a) => format!("[{:?}]:{}", a.address, a.port),
    }
}

async fn echo(port: u16) -> Result<(), String> {
    let sock = TcpSocket::create(IpAddressFamily::Ipv4).map_err(|e| format!("create: {e:?}"))?;
    sock.bind(v4((0, 0, 0, 0), port))
        .map_err(|e| format!("bind: {e:?}"))?;
    let mut conns = sock.listen().map_err(|e| format!("listen: {e:?}"))?;
    let local = sock.get_local_address().map_err(|e| format!("{e:?}"))?;
    say(&format!("p3-tcp listening on {}", show(&local))).await;
    // Each connection is served by a future of this task, polled beside the accept:
    // with a task per connection (`wasip3::spawn`, wit-bindgen 0.57 on wasmtime 48) a
    // second connection made no progress while the first one's task waited on its socket.
    let mut serving = FuturesUnordered::new();
    let mut accepting = true;
    while accepting || !serving.is_empty() {
        futures::select! {
            conn = conns.next().fuse() => match conn {
                Some(conn) => serving.push(serve(conn)),
                None => accepting = false,
            },
            () = serving.select_next_some() => {}
        }
    }
    Ok(())
}

/// Echoes one connection until its peer closes it.
async fn serve(conn: TcpSocket) {
    let (mut rx, _received) = conn.receive();
    let (mut tx, out) = wasip3::wit_stream::new();
    let sent = conn.send(out);
    loop {
        let (r, buf) = rx.read(Vec::with_capacity(4096)).await;
        match r {
            StreamResult::Complete(_) if !buf.is_empty() => {
                if !tx.write_all(buf).await.is_empty() {
                    break;
                }
            }
            StreamResult::Complete(_) => {}
            _ => break,
        }
    }
    drop(tx);
    let _ = sent.await;
}

async fn client(host: &str, port: u16, wait_ns: u64) -> Result<(), String> {
    let addrs = resolve_addresses(host.to_string())
        .await
        .map_err(|e| format!("resolve {host}: {e:?}"))?;
    let ip = addrs
        .into_iter()
        .find_map(|a| match a {
            IpAddress::Ipv4(a) => Some(a),
            IpAddress::Ipv6(_) => None,
        })
        .ok_or("no IPv4 address")?;
    let start = monotonic_clock::now();
    let sock = loop {
        let s = TcpSocket::create(IpAddressFamily::Ipv4).map_err(|e| format!("create: {e:?}"))?;
        match s.connect(v4(ip, port)).await {
            Ok(()) => break s,
            Err(e) if monotonic_clock::now() - start >= wait_ns => {
                return Err(format!("cannot connect to {host}:{port}: {e:?}"))
            }
            Err(_) => monotonic_clock::wait_for(20_000_000).await,
        }
    };
    let (mut tx, out) = wasip3::wit_stream::new();
    let sent = sock.send(out);
    let (mut rx, _received) = sock.receive();
    for i in 0..3 {
        let msg = format!("ping-{i}\n").into_bytes();
        if !tx.write_all(msg.clone()).await.is_empty() {
            return Err("write failed".into());
        }
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let (r, buf) = rx.read(Vec::with_capacity(msg.len() - got.len())).await;
            if !matches!(r, StreamResult::Complete(_)) {
                return Err("read failed: the connection closed".into());
            }
            got.extend(buf);
        }
        if got != msg {
            return Err(format!(
                "echo mismatch: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
    }
    drop(tx);
    let _ = sent.await;
    say(&format!("echo ok from {host}:{port}")).await;
    Ok(())
}

async fn listen_any() -> Result<(), String> {
    let sock = TcpSocket::create(IpAddressFamily::Ipv4).map_err(|e| format!("create: {e:?}"))?;
    let _conns = sock.listen().map_err(|e| format!("listen: {e:?}"))?;
    let local = sock.get_local_address().map_err(|e| format!("{e:?}"))?;
    say(&format!("listening on {}", show(&local))).await;
    Ok(())
}

async fn hog() -> Result<(), String> {
    let mut held = Vec::new();
    loop {
        match TcpSocket::create(IpAddressFamily::Ipv4) {
            Ok(s) => held.push(s),
            Err(e) => {
                say(&format!("opened {} sockets", held.len())).await;
                say(&format!("socket {} refused: {e:?}", held.len())).await;
                return Ok(());
            }
        }
        if held.len() > 100_000 {
            return Err("never refused".into());
        }
    }
}
