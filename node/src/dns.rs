//! Names for OCI containers: the pod's `/etc/resolv.conf`, and a small DNS responder on
//! the node that answers the cluster's names (CoreDNS's job, for this node's pods).
//!
//! Components resolve cluster names inside the sandbox, without DNS (see
//! `baton-wasm-shim`'s `net.rs`). A Linux process asks a name server, so the node runs
//! one per bridge, on the bridge's address (the container pods' gateway), over UDP:
//! - a name under the cluster domain (`svc.ns.svc.cluster.local`, `pod.svc.ns.svc…`) is
//!   answered from the node's Service table ([`crate::proxy::Services`]): a Service's
//!   ClusterIP, which the node serves to its pods through the bridge; a headless
//!   Service's ready endpoint. An unknown one is NXDOMAIN;
//! - any other name is passed to the node's own name server (the first `nameserver` of
//!   its `/etc/resolv.conf`) and its answer handed back; with none, SERVFAIL.
//!
//! Only the bridge's own subnet is answered: the responder is no open resolver for
//! whoever else can route to the node. Messages are parsed and written with
//! `hickory-proto`. Every read is bounded: one UDP datagram, at most [`MAX_IN_FLIGHT`]
//! questions waiting on the upstream at once, and [`UPSTREAM_TIMEOUT`] for its answer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use baton_wasm_shim::NameResolver;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use k8s_openapi::api::core::v1::PodDNSConfig;

/// A pod's `dnsPolicy` and `dnsConfig`.
#[derive(Clone, Debug, Default)]
pub struct PodDns {
    pub policy: Option<String>,
    pub config: Option<PodDNSConfig>,
}

/// How long an answer may be cached by the asker: short, since Services change.
const TTL: u32 = 5;
/// Questions answered at once; more are dropped (the asker retries).
const MAX_IN_FLIGHT: usize = 256;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of the host's `/etc/resolv.conf` read.
const RESOLV_CONF_MAX: u64 = 64 << 10;

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("the DNS responder cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The host's resolver configuration: systemd-resolved's list of the real upstream
/// servers where it runs, else `/etc/resolv.conf`.
fn host_resolv_conf() -> String {
    use std::io::Read;
    let mut text = String::new();
    for path in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"] {
        if let Ok(f) = std::fs::File::open(path) {
            let _ = f.take(RESOLV_CONF_MAX).read_to_string(&mut text);
            return text;
        }
    }
    text
}

fn host_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// The pod's `/etc/resolv.conf`, as the kubelet writes it for its DNS policy:
/// `ClusterFirst` (the default) names `nameserver` with the search path of the pod's
/// namespace and `ndots:5`; `Default` copies the node's (from systemd-resolved's file
/// where there is one, as the kubelet does), but a loopback name server there is the
/// node's own and means nothing inside the pod, so it is left out, and with none left the
/// pod asks `nameserver` (which passes non-cluster names on); `None` has only what
/// `dnsConfig` gives, which the others are extended with.
pub fn resolv_conf(dns: &PodDns, nameserver: Ipv4Addr, namespace: &str, domain: &str) -> String {
    let (mut servers, mut searches, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match dns.policy.as_deref().unwrap_or("ClusterFirst") {
            "None" => Default::default(),
            "Default" => {
                let text = host_resolv_conf();
                let words = |key: &str| -> Vec<String> {
                    text.lines()
                        .filter_map(|l| l.trim().strip_prefix(key))
                        .flat_map(|rest| rest.split_whitespace().map(String::from))
                        .collect()
                };
                let mut servers: Vec<String> = words("nameserver")
                    .into_iter()
                    .filter(|s| s.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
                    .collect();
                if servers.is_empty() {
                    servers.push(nameserver.to_string());
                }
                (servers, words("search"), words("options"))
            }
            _ => (
                vec![nameserver.to_string()],
                vec![
                    format!("{namespace}.svc.{domain}"),
                    format!("svc.{domain}"),
                    domain.to_string(),
                ],
                vec!["ndots:5".to_string()],
            ),
        };
    if let Some(c) = &dns.config {
        servers.extend(c.nameservers.iter().flatten().cloned());
        searches.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let Some(name) = o.name.as_deref() else {
                continue;
            };
            // An option given again replaces the earlier one.
            options.retain(|x| x.split(':').next() != Some(name));
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            });
        }
    }
    let mut out = String::from("# Kubernetes-managed resolv.conf (written by Baton).\n");
    // The resolver reads at most three.
    for s in servers.iter().take(3) {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

/// What the responder does with one question.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A message to send back.
    Reply(Vec<u8>),
    /// A question for the upstream name server.
    Forward,
    /// Nothing: it was not a question.
    Drop,
}

/// Answers `query` from `names` if it asks for a name under `domain`.
fn answer(query: &[u8], names: &NameResolver, domain: &str) -> Answer {
    let Ok(q) = Message::from_vec(query) else {
        return Answer::Drop;
    };
    if q.message_type() != MessageType::Query {
        return Answer::Drop;
    }
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true);
    r.add_queries(q.queries().to_vec());
    let question = match (q.op_code(), q.queries()) {
        (OpCode::Query, [one]) => one,
        (OpCode::Query, _) => {
            r.set_response_code(ResponseCode::FormErr);
            return r.to_vec().map_or(Answer::Drop, Answer::Reply);
        }
        _ => {
            r.set_response_code(ResponseCode::NotImp);
            return r.to_vec().map_or(Answer::Drop, Answer::Reply);
        }
    };
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let suffix = format!(".{domain}");
    if !name.ends_with(&suffix) {
        return Answer::Forward;
    }
    r.set_authoritative(true);
    match names(name) {
        Some(IpAddr::V4(ip)) => {
            if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::A(A(ip)),
                ));
            }
            // Other types of a name that exists: no data, no error.
        }
        Some(IpAddr::V6(_)) => {}
        None => {
            r.set_response_code(ResponseCode::NXDomain);
        }
    }
    r.to_vec().map_or(Answer::Drop, Answer::Reply)
}

/// A SERVFAIL for `query`, when its upstream answer did not come.
fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(ResponseCode::ServFail);
    r.add_queries(q.queries().to_vec());
    r.to_vec().ok()
}

/// Asks `upstream` and returns its answer, if it came in time and is for this question.
async fn forward(upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    // The same ID, or it is not the answer to this question.
    (n >= 2 && query.len() >= 2 && buf[..2] == query[..2]).then(|| buf[..n].to_vec())
}

/// Serves DNS on `addr` (UDP) until dropped, answering cluster names under `domain` from
/// `names`, to the askers `clients` admits.
pub async fn serve(
    addr: SocketAddr,
    names: NameResolver,
    domain: String,
    clients: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
) -> Result<tokio::task::JoinHandle<()>, DnsError> {
    // Shared with other node agents on this host (test clusters of one pod range share
    // its bridge), as the Service proxy's listeners are.
    let sock = crate::proxy::listen_udp(addr).map_err(|source| DnsError::Bind { addr, source })?;
    let upstream = host_nameserver(&host_resolv_conf()).filter(|u| u.ip() != addr.ip());
    tracing::info!(%addr, ?upstream, "DNS responder for container pods");
    let sock = Arc::new(sock);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, from) = match sock.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive");
                    continue;
                }
            };
            if !clients(from.ip()) {
                continue;
            }
            let query = buf[..n].to_vec();
            match answer(&query, &names, &domain) {
                Answer::Reply(r) => {
                    let _ = sock.send_to(&r, from).await;
                }
                Answer::Drop => {}
                Answer::Forward => {
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        continue;
                    };
                    let sock = sock.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let reply = match upstream {
                            Some(u) => forward(u, &query).await,
                            None => None,
                        };
                        if let Some(r) = reply.or_else(|| server_failure(&query)) {
                            let _ = sock.send_to(&r, from).await;
                        }
                    });
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn names() -> NameResolver {
        Arc::new(|n: &str| {
            (n == "web.default.svc.cluster.local").then(|| IpAddr::from([10, 96, 0, 7]))
        })
    }

    fn ask(name: &str, ty: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str(name).unwrap(), ty));
        m.to_vec().unwrap()
    }

    fn reply(a: Answer) -> Message {
        match a {
            Answer::Reply(r) => Message::from_vec(&r).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn cluster_names_are_answered_and_others_forwarded() {
        let r = reply(answer(
            &ask("web.default.svc.cluster.local.", RecordType::A),
            &names(),
            "cluster.local",
        ));
        assert_eq!(r.id(), 4242);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert_eq!(
            r.answers()[0].data(),
            &RData::A(A(Ipv4Addr::new(10, 96, 0, 7)))
        );
        // The name exists, with no IPv6 address.
        let r = reply(answer(
            &ask("WEB.default.svc.cluster.local.", RecordType::AAAA),
            &names(),
            "cluster.local",
        ));
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
        let r = reply(answer(
            &ask("nope.default.svc.cluster.local.", RecordType::A),
            &names(),
            "cluster.local",
        ));
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        assert_eq!(
            answer(
                &ask("example.com.", RecordType::A),
                &names(),
                "cluster.local"
            ),
            Answer::Forward
        );
        // Not DNS at all: nothing is sent back.
        assert_eq!(answer(b"\x00", &names(), "cluster.local"), Answer::Drop);
        let fail = Message::from_vec(&server_failure(&ask("x.", RecordType::A)).unwrap()).unwrap();
        assert_eq!(fail.response_code(), ResponseCode::ServFail);
    }

    #[test]
    fn resolv_conf_follows_the_dns_policy() {
        let gw = Ipv4Addr::new(10, 171, 0, 1);
        let text = resolv_conf(&PodDns::default(), gw, "shop", "cluster.local");
        assert!(text.contains("nameserver 10.171.0.1\n"), "{text}");
        assert!(
            text.contains("search shop.svc.cluster.local svc.cluster.local cluster.local\n"),
            "{text}"
        );
        assert!(text.contains("options ndots:5\n"), "{text}");
        let custom = PodDns {
            policy: Some("None".into()),
            config: Some(PodDNSConfig {
                nameservers: Some(vec!["192.0.2.53".into()]),
                searches: Some(vec!["example.test".into()]),
                options: Some(vec![k8s_openapi::api::core::v1::PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("2".into()),
                }]),
            }),
        };
        let text = resolv_conf(&custom, gw, "shop", "cluster.local");
        assert!(!text.contains("10.171.0.1"), "{text}");
        assert!(text.contains("nameserver 192.0.2.53\nsearch example.test\noptions ndots:2\n"));
        assert_eq!(
            host_nameserver("# x\nnameserver 192.0.2.1\nnameserver 192.0.2.2\n"),
            Some("192.0.2.1:53".parse().unwrap())
        );
    }
}
