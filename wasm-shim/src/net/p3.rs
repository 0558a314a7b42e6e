//! wasi:sockets 0.3 in the pod's network: the same rewriting, names and caps as 0.2's.
//!
//! wasmtime-wasi's 0.3 socket host runs unchanged except for the functions that take an
//! address, make a socket or hand one out, which are shadowed here as [`super`] does for
//! 0.2. Two things differ from 0.2:
//! - 0.3's `listen` binds an unbound socket itself, to the wildcard, which would be every
//!   address of the node. The shadow binds it to the pod's address first.
//! - 0.3 hands accepted sockets out through a stream, with no host call per accept to
//!   count them. The shadow relays that stream and counts each socket on its way through
//!   ([`Admit`]); one past the pod's cap is closed, since a 0.3 stream has no per-item
//!   error to refuse it with.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::channel::mpsc;
use futures::StreamExt as _;
use wasmtime::component::{
    Access, Accessor, Destination, Linker, Resource, ResourceType, Source, StreamConsumer,
    StreamProducer, StreamReader, StreamResult,
};
use wasmtime::{AsContextMut as _, StoreContextMut};
use wasmtime_wasi::p3::bindings::sockets::ip_name_lookup::HostWithStore as _;
use wasmtime_wasi::p3::bindings::sockets::types::{
    ErrorCode, HostTcpSocket, HostTcpSocketWithStore as _, HostUdpSocket, HostUdpSocketWithStore,
    IpAddressFamily, IpSocketAddress, TcpSocket, UdpSocket,
};
use wasmtime_wasi::p3::sockets::SocketResult;
use wasmtime_wasi::sockets::{WasiSockets, WasiSocketsCtxView, WasiSocketsView as _};

use crate::host::Host;

/// The wasi:sockets 0.3 version wasmtime-wasi 48 registers.
const SOCKETS: &str = "0.3.0";

/// The getter wasmtime-wasi's own 0.3 socket host is registered with.
fn sockets(h: &mut Host) -> WasiSocketsCtxView<'_> {
    h.sockets()
}

/// A socket result as the guest gets it: an error code, or a trap.
fn to_guest<T>(r: SocketResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(e.downcast()?)),
    }
}

/// 0.3 has no `new-socket-limit` code.
fn limit() -> ErrorCode {
    ErrorCode::Other(Some("the pod's socket limit is reached".into()))
}

/// Shadows wasmtime-wasi's 0.3 socket functions that reach the network by address.
/// Called by [`super::add_to_linker`] while shadowing is allowed.
pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    let mut types = linker.instance(&format!("wasi:sockets/types@{SOCKETS}"))?;
    types.func_wrap(
        "[static]tcp-socket.create",
        |mut store, (family,): (IpAddressFamily,)| {
            let host = store.data_mut();
            if !host.net.pod.admit_socket() {
                return Ok((Err(limit()),));
            }
            let pod = host.net.pod.clone();
            let made = pod.make_socket(|| HostTcpSocket::create(&mut host.sockets(), family));
            let made = match made {
                Ok(made) => to_guest(made)?,
                Err(_) => Err(ErrorCode::Other(None)),
            };
            match &made {
                Ok(socket) => {
                    host.net.live.insert(socket.rep());
                }
                Err(_) => pod.release_sockets(1),
            }
            Ok((made,))
        },
    )?;
    types.func_wrap_async(
        "[method]tcp-socket.bind",
        |mut store, (this, addr): (Resource<TcpSocket>, IpSocketAddress)| {
            Box::new(async move {
                let host = store.data_mut();
                let addr: IpSocketAddress = host.net.pod.bind_addr(addr.into()).into();
                let bound = HostTcpSocket::bind(&mut host.sockets(), this, addr).await;
                Ok((to_guest(bound)?,))
            })
        },
    )?;
    types.func_wrap_concurrent(
        "[method]tcp-socket.connect",
        |acc: &Accessor<Host>, (this, addr): (Resource<TcpSocket>, IpSocketAddress)| {
            Box::pin(async move {
                let addr: IpSocketAddress = acc
                    .with(|mut a| a.data_mut().net.pod.connect_addr(addr.into()))
                    .into();
                let view = acc.with_getter::<WasiSockets>(sockets);
                let connected = WasiSockets::connect(&view, this, addr).await;
                Ok::<_, wasmtime::Error>((to_guest(connected)?,))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]tcp-socket.listen",
        |mut store, (this,): (Resource<TcpSocket>,)| {
            Box::new(async move {
                if let Err(code) = bind_if_unbound(&mut store, this.rep()).await? {
                    return Ok((Err(code),));
                }
                let listening = {
                    let access = Access::<Host, WasiSockets>::new(store.as_context_mut(), sockets);
                    match WasiSockets::listen(access, this).await {
                        Ok(stream) => stream,
                        Err(e) => return Ok((Err(e.downcast()?),)),
                    }
                };
                // Room for one: a listener takes a connection from the kernel only when
                // the guest is about to read one.
                let (tx, rx) = mpsc::channel(0);
                listening.pipe(&mut store, Admit { tx })?;
                let relayed = StreamReader::new(&mut store, Accepted { rx, next: None })?;
                Ok((Ok(relayed),))
            })
        },
    )?;
    types.resource(
        "tcp-socket",
        ResourceType::host::<TcpSocket>(),
        |mut store, rep| {
            let host = store.data_mut();
            host.net.forget(rep);
            HostTcpSocket::drop(&mut host.sockets(), Resource::new_own(rep))
        },
    )?;
    types.func_wrap_async(
        "[static]udp-socket.create",
        |mut store, (family,): (IpAddressFamily,)| {
            Box::new(async move {
                let host = store.data_mut();
                if !host.net.pod.admit_socket() {
                    return Ok((Err(limit()),));
                }
                let ns = host.net.pod.netns().cloned();
                let made = {
                    let mut view = host.sockets();
                    super::made_inside(ns, HostUdpSocket::create(&mut view, family))
                        .await
                        .unwrap_or_else(|| Err(ErrorCode::Other(None).into()))
                };
                let made: Result<Resource<UdpSocket>, ErrorCode> = to_guest(made)?;
                match &made {
                    Ok(socket) => {
                        host.net.live.insert(socket.rep());
                    }
                    Err(_) => host.net.pod.release_sockets(1),
                }
                Ok((made,))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]udp-socket.bind",
        |mut store, (this, addr): (Resource<UdpSocket>, IpSocketAddress)| {
            Box::new(async move {
                let host = store.data_mut();
                let addr: IpSocketAddress = host.net.pod.bind_addr(addr.into()).into();
                let bound = HostUdpSocket::bind(&mut host.sockets(), this, addr).await;
                Ok((to_guest(bound)?,))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]udp-socket.connect",
        |mut store, (this, addr): (Resource<UdpSocket>, IpSocketAddress)| {
            Box::new(async move {
                let host = store.data_mut();
                let addr: IpSocketAddress = host.net.pod.connect_addr(addr.into()).into();
                let connected = HostUdpSocket::connect(&mut host.sockets(), this, addr).await;
                Ok((to_guest(connected)?,))
            })
        },
    )?;
    types.func_wrap_concurrent(
        "[method]udp-socket.send",
        |acc: &Accessor<Host>,
         (this, data, remote): (Resource<UdpSocket>, Vec<u8>, Option<IpSocketAddress>)| {
            Box::pin(async move {
                let remote = remote.map(|a| {
                    acc.with(|mut h| h.data_mut().net.pod.connect_addr(a.into()))
                        .into()
                });
                let view = acc.with_getter::<WasiSockets>(sockets);
                let sent =
                    <WasiSockets as HostUdpSocketWithStore<Host>>::send(&view, this, data, remote)
                        .await;
                Ok::<_, wasmtime::Error>((to_guest(sent)?,))
            })
        },
    )?;
    types.resource(
        "udp-socket",
        ResourceType::host::<UdpSocket>(),
        |mut store, rep| {
            let host = store.data_mut();
            host.net.forget(rep);
            HostUdpSocket::drop(&mut host.sockets(), Resource::new_own(rep))
        },
    )?;
    let mut lookup = linker.instance(&format!("wasi:sockets/ip-name-lookup@{SOCKETS}"))?;
    lookup.func_wrap_concurrent(
        "resolve-addresses",
        |acc: &Accessor<Host>, (name,): (String,)| {
            Box::pin(async move {
                // As in 0.2: an address literal resolves to itself in wasmtime-wasi, so a
                // name the pod knows is handed on as its address.
                let name = acc.with(move |mut a| match a.data_mut().net.pod.resolve(&name) {
                    Some(ip) => ip.to_string(),
                    None => name,
                });
                let view = acc.with_getter::<WasiSockets>(sockets);
                let resolved = WasiSockets::resolve_addresses(&view, name).await?;
                Ok::<_, wasmtime::Error>((resolved,))
            })
        },
    )?;
    Ok(())
}

/// Binds an unbound IPv4 socket to the pod's address before `listen`, which would bind
/// it to the node's wildcard.
async fn bind_if_unbound(
    store: &mut StoreContextMut<'_, Host>,
    rep: u32,
) -> wasmtime::Result<Result<(), ErrorCode>> {
    let host = store.data_mut();
    if host.net.pod.netns().is_some() {
        // A namespace of its own: the wildcard there is the pod's.
        return Ok(Ok(()));
    }
    let ip = host.net.pod.ip;
    let mut view = host.sockets();
    let family = HostTcpSocket::get_address_family(&mut view, Resource::new_borrow(rep))?;
    if !matches!(family, IpAddressFamily::Ipv4) || !ip.is_ipv4() {
        return Ok(Ok(()));
    }
    match HostTcpSocket::get_local_address(&mut view, Resource::new_borrow(rep)) {
        // Unbound, or connecting, where bind answers invalid-state as listen would.
        Err(e) if matches!(e.downcast_ref(), Some(ErrorCode::InvalidState)) => {
            let addr = SocketAddr::new(ip, 0).into();
            to_guest(HostTcpSocket::bind(&mut view, Resource::new_borrow(rep), addr).await)
        }
        _ => Ok(Ok(())),
    }
}

/// Takes what a 0.3 listener accepts and counts each socket against the pod's cap, or
/// closes it past the cap, before handing it on to [`Accepted`].
struct Admit {
    tx: mpsc::Sender<Resource<TcpSocket>>,
}

impl StreamConsumer<Host> for Admit {
    type Item = Resource<TcpSocket>;

    fn poll_consume(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut store: StoreContextMut<'_, Host>,
        mut src: Source<'_, Self::Item>,
        finish: bool,
    ) -> Poll<wasmtime::Result<StreamResult>> {
        // Take nothing until the guest's side has room for it.
        match self.tx.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Ok(StreamResult::Dropped)),
            Poll::Pending if finish => return Poll::Ready(Ok(StreamResult::Cancelled)),
            Poll::Pending => return Poll::Pending,
        }
        let mut item = None;
        src.read(&mut store, &mut item)?;
        if let Some(socket) = item {
            let host = store.data_mut();
            if host.net.pod.admit_socket() {
                host.net.live.insert(socket.rep());
                if let Err(e) = self.tx.try_send(socket) {
                    // The guest dropped its stream since poll_ready.
                    let socket = e.into_inner();
                    let host = store.data_mut();
                    host.net.forget(socket.rep());
                    HostTcpSocket::drop(&mut host.sockets(), socket)?;
                    return Poll::Ready(Ok(StreamResult::Dropped));
                }
            } else {
                tracing::debug!("closed an accepted connection: the pod's socket limit");
                HostTcpSocket::drop(&mut host.sockets(), socket)?;
            }
        }
        Poll::Ready(Ok(StreamResult::Completed))
    }
}

/// The stream of accepted sockets the guest reads.
struct Accepted {
    rx: mpsc::Receiver<Resource<TcpSocket>>,
    next: Option<Resource<TcpSocket>>,
}

impl StreamProducer<Host> for Accepted {
    type Item = Resource<TcpSocket>;
    type Buffer = Option<Resource<TcpSocket>>;

    fn poll_produce<'a>(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut store: StoreContextMut<'a, Host>,
        mut dst: Destination<'a, Self::Item, Self::Buffer>,
        finish: bool,
    ) -> Poll<wasmtime::Result<StreamResult>> {
        let this = &mut *self;
        if this.next.is_none() {
            match this.rx.poll_next_unpin(cx) {
                Poll::Ready(Some(s)) => this.next = Some(s),
                Poll::Ready(None) => return Poll::Ready(Ok(StreamResult::Dropped)),
                Poll::Pending if finish => return Poll::Ready(Ok(StreamResult::Cancelled)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // An empty destination is a readiness check: one is waiting.
        if dst.remaining(&mut store) == Some(0) {
            return Poll::Ready(Ok(StreamResult::Completed));
        }
        dst.set_buffer(this.next.take());
        Poll::Ready(Ok(StreamResult::Completed))
    }
}
