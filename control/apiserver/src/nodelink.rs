//! The API server's link to node agents: node serving certificates, and `pods/log`
//! proxied to the node that runs the pod.
//!
//! The link is authenticated both ways with the cluster CA:
//! - a node agent asks for its serving certificate at
//!   `POST /baton/v1/nodes/NAME/certificate` with its own credentials (the user
//!   `system:node:NAME`, or an administrator); the certificate names the node's addresses,
//!   and is its identity toward other nodes too (`system:node:NAME` in `system:nodes`),
//!   which it tunnels Service traffic to. With `"usage": "client"` it asks for its
//!   client certificate instead (`system:node:NAME` in `system:nodes`), which it then
//!   calls the API with, so that every node acts as itself under the Node authorizer
//!   whatever credentials it joined with;
//! - the API server calls the node with a client certificate of its own
//!   (`system:apiserver`, client authentication only), which the node checks against the
//!   CA, and checks the node's certificate against the CA and the node's address.

use std::net::IpAddr;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::objects::{not_found, Objects, ReadAt};
use crate::pki::{Pki, User};
use crate::resources;
use crate::rest::Request;

/// Issues a node its serving certificate and key.
pub fn issue_certificate(pki: &Pki, user: &User, node: &str, body: &[u8]) -> Response {
    let allowed = user.name == format!("system:node:{node}")
        || user.groups.iter().any(|g| g == "system:masters")
        // `baton up`'s local node has the one node identity it was given.
        || (user.name == "system:node:local" && node == "local");
    if !allowed {
        return ApiError::Forbidden {
            message: format!(
                "user {:?} cannot get a certificate for node {node:?}",
                user.name
            ),
        }
        .into_response();
    }
    let asked: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if asked.get("usage").and_then(Value::as_str) == Some("client") {
        let groups = [baton_auth::NODES.to_string()];
        return match pki.issue_client_certificate(&format!("system:node:{node}"), &groups, 365) {
            Ok((cert, key)) => (
                StatusCode::OK,
                [(http::header::CONTENT_TYPE, "application/json")],
                json!({"certificate": cert, "key": key, "ca": pki.ca_pem}).to_string(),
            )
                .into_response(),
            Err(e) => ApiError::internal(e).into_response(),
        };
    }
    let addresses: Vec<String> = asked
        .get("addresses")
        .cloned()
        .and_then(|a| serde_json::from_value(a).ok())
        .unwrap_or_default();
    let ips: Vec<IpAddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
    // A node serves at its own address: a certificate for a ClusterIP (the `kubernetes`
    // Service's among them), or for an address no host has, would let it pose as
    // something else to whoever trusts the cluster CA.
    if let Some(bad) = ips.iter().find(|ip| {
        crate::strategy::service::in_service_range(ip)
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
    }) {
        return ApiError::bad_request(format!(
            "a node's serving certificate cannot name {bad}: not a node's address"
        ))
        .into_response();
    }
    if ips.is_empty() {
        return ApiError::bad_request(
            "a node certificate needs at least one IP address in \"addresses\"",
        )
        .into_response();
    }
    match pki.issue_node_certificate(node, &ips) {
        Ok((cert, key)) => {
            let body = json!({"certificate": cert, "key": key, "ca": pki.ca_pem});
            (
                StatusCode::OK,
                [(http::header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

fn q<'a>(req: &'a Request, k: &str) -> Option<&'a str> {
    req.query.get(k).map(String::as_str)
}

/// `GET pods/NAME/log`: finds the pod's node and streams the log from it.
pub async fn pod_logs(objects: &Objects, req: Request) -> Response {
    match proxy_logs(objects, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn proxy_logs(objects: &Objects, req: Request) -> ApiResult<Response> {
    let res = &*req.target.res;
    let ns = req.target.ns.clone().unwrap_or_else(|| "default".into());
    let name = req.target.name.clone().unwrap_or_default();
    let (pod, _) = objects
        .get(res, Some(&ns), &name, ReadAt::Latest)
        .await?
        .ok_or_else(|| not_found(res, &name))?;
    let container = pick_container(&pod, &name, q(&req, "container"))?;
    let node = node_of(&pod, &name)?;
    let mut query: Vec<String> = Vec::new();
    for k in [
        "follow",
        "tailLines",
        "sinceSeconds",
        "sinceTime",
        "timestamps",
        "previous",
        "limitBytes",
    ] {
        if let Some(v) = q(&req, k) {
            query.push(format!("{k}={}", baton_kube::client::url_escape(v)));
        }
    }
    let path = format!("/containerLogs/{ns}/{name}/{container}?{}", query.join("&"));
    node_get(objects, &node, &path).await
}

/// The container a pod subresource names, or the pod's only one.
fn pick_container(pod: &Value, name: &str, asked: Option<&str>) -> ApiResult<String> {
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(
            ["/spec/initContainers", "/spec/ephemeralContainers"]
                .into_iter()
                .flat_map(|p| {
                    pod.pointer(p)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                }),
        )
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
        .collect();
    match asked {
        Some(c) if containers.iter().any(|x| x == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        ))),
    }
}

/// The node a pod is bound to.
fn node_of(pod: &Value, name: &str) -> ApiResult<String> {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))
}

/// `GET nodes/NAME/proxy/PATH`: the node's own endpoint, as kube-apiserver proxies a
/// kubelet's (`/metrics` here).
pub async fn node_proxy(objects: &Objects, node: &str, path: &str) -> Response {
    match node_get(objects, node, &format!("/{path}")).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

type NodeSender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/1.1 connection to a node's endpoint over mutually authenticated TLS, and the
/// `Host` to name it with. The connection may be upgraded (exec, port-forward).
async fn node_connection(objects: &Objects, node: &str) -> ApiResult<(NodeSender, String)> {
    let nodes = resources::builtin("Node");
    let (node_obj, _) = objects
        .get(nodes, None, node, ReadAt::Latest)
        .await?
        .ok_or_else(|| not_found(nodes, node))?;
    let address: IpAddr = node_obj
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|x| x.get("type").and_then(Value::as_str) == Some("InternalIP"))
        })
        .and_then(|x| x.get("address").and_then(Value::as_str))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| ApiError::bad_request(format!("node {node} has no InternalIP address")))?;
    let port = node_obj
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::bad_request(format!("node {node} serves no logs endpoint")))?;
    let unavailable = |e: String| ApiError::Unavailable {
        message: format!("cannot reach node {node} at {address}:{port}: {e}"),
    };
    let tcp = tokio::net::TcpStream::connect((address, port))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(objects.kubelet_tls.clone().ok_or_else(|| {
        ApiError::Internal {
            message: "the API server has no client credentials for node agents".into(),
        }
    })?);
    let server_name = rustls::pki_types::ServerName::IpAddress(address.into());
    let stream = tls
        .connect(server_name, tcp)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    Ok((sender, format!("{address}:{port}")))
}

/// A node endpoint's JSON answer (its Summary, for metrics).
pub async fn node_json(objects: &Objects, node: &str, path: &str) -> ApiResult<Value> {
    use http_body_util::BodyExt;
    let resp = node_get(objects, node, path).await?;
    let body = http_body_util::Limited::new(resp.into_body(), 16 << 20)
        .collect()
        .await
        .map_err(|e| ApiError::Unavailable {
            message: format!("node {node}: {e}"),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::Internal {
        message: format!("node {node} answered {path} with malformed JSON: {e}"),
    })
}

/// A request to a node's endpoint, answered by the node agent in this process if it runs
/// here, otherwise sent over mutually authenticated TLS. The answer's body is streamed.
/// Without a node agent here, an upgrade the request carries (the client's
/// `OnUpgrade`) is not passed on: the caller splices the two connections.
async fn node_call(
    objects: &Objects,
    node: &str,
    mut ask: http::request::Builder,
    upgrade: &mut Option<hyper::upgrade::OnUpgrade>,
    hold: &mut Option<baton_kube::StreamHold>,
) -> ApiResult<Response> {
    if let Some(serve) = objects.local_nodes.service(node) {
        let mut req = ask.body(()).map_err(ApiError::internal)?;
        if let Some(u) = upgrade.take() {
            req.extensions_mut().insert(u);
        }
        if let Some(h) = hold.take() {
            req.extensions_mut().insert(h);
        }
        let (parts, body) = serve(req).await.into_parts();
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    let (mut sender, host) = node_connection(objects, node).await?;
    ask = ask.header(http::header::HOST, host);
    let req = ask
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ApiError::internal)?;
    let (parts, body) = sender
        .send_request(req)
        .await
        .map_err(|e| ApiError::Unavailable {
            message: format!("node {node}: {e}"),
        })?
        .into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// A GET to a node's endpoint, its body streamed back.
async fn node_get(objects: &Objects, node: &str, path: &str) -> ApiResult<Response> {
    let resp = node_call(
        objects,
        node,
        http::Request::get(path),
        &mut None,
        &mut None,
    )
    .await?;
    let status = resp.status();
    if !status.is_success() {
        use http_body_util::BodyExt;
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(if status == StatusCode::NOT_FOUND {
            ApiError::bad_request(text)
        } else {
            ApiError::Internal { message: text }
        });
    }
    let mut out = Response::new(Body::new(resp.into_body()));
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(out)
}

/// Headers of a stream upgrade that pass between the client and the node, both ways.
const UPGRADE_HEADERS: [&str; 8] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "x-stream-protocol-version",
    "sec-websocket-extensions",
];

/// `pods/NAME/exec`, `attach` and `portforward`: checks the request against the pod, then
/// passes the connection upgrade to the pod's node and, once both sides have switched
/// protocols, splices the two connections. The node speaks the stream protocols; the API
/// server only authenticates, authorizes and finds the node, as kube-apiserver's
/// upgrade-aware proxy does.
pub async fn pod_stream(
    objects: &Objects,
    req: Request,
    raw_query: Option<String>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    hold: Option<baton_kube::StreamHold>,
) -> Response {
    match proxy_stream(objects, req, raw_query, upgrade, hold).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn proxy_stream(
    objects: &Objects,
    req: Request,
    raw_query: Option<String>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    mut hold: Option<baton_kube::StreamHold>,
) -> ApiResult<Response> {
    let res = &*req.target.res;
    let sub = req.target.sub.clone().unwrap_or_default();
    let ns = req.target.ns.clone().unwrap_or_else(|| "default".into());
    let name = req.target.name.clone().unwrap_or_default();
    let (pod, _) = objects
        .get(res, Some(&ns), &name, ReadAt::Latest)
        .await?
        .ok_or_else(|| not_found(res, &name))?;
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    if matches!(phase, "Succeeded" | "Failed") {
        return Err(ApiError::bad_request(format!(
            "cannot {sub} into a container in a completed pod; current phase is {phase}"
        )));
    }
    let node = node_of(&pod, &name)?;
    let path = match sub.as_str() {
        "portforward" => format!("/portForward/{ns}/{name}"),
        s => {
            let container = pick_container(&pod, &name, q(&req, "container"))?;
            format!("/{s}/{ns}/{name}/{container}")
        }
    };
    let is_upgrade = req
        .headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
    let upgrade = upgrade.filter(|_| is_upgrade).ok_or_else(|| {
        ApiError::bad_request(format!(
            "pods/{sub} needs a connection upgrade to a streaming protocol (WebSocket)"
        ))
    })?;
    let uri = match raw_query.filter(|q| !q.is_empty()) {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut ask = http::Request::builder().method(req.method.clone()).uri(uri);
    for h in UPGRADE_HEADERS {
        for v in req.headers.get_all(h) {
            ask = ask.header(h, v);
        }
    }
    // In this process, the node takes the client's connection itself; otherwise the
    // upgrade stays here, for the splice.
    let mut upgrade = Some(upgrade);
    let mut resp = node_call(objects, &node, ask, &mut upgrade, &mut hold).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        use http_body_util::BodyExt;
        let status = resp.status();
        let text = http_body_util::Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(if status.is_client_error() {
            ApiError::bad_request(text)
        } else {
            ApiError::Internal { message: text }
        });
    }
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for h in UPGRADE_HEADERS {
        for v in resp.headers().get_all(h) {
            out.headers_mut().append(h, v.clone());
        }
    }
    let Some(upgrade) = upgrade else {
        return Ok(out);
    };
    let node_side = hyper::upgrade::on(&mut resp);
    let span =
        tracing::info_span!("pod_stream", sub = %sub, pod = %format!("{ns}/{name}"), node = %node);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let _hold = hold;
            let (client, node) = match tokio::join!(upgrade, node_side) {
                (Ok(c), Ok(n)) => (c, n),
                (c, n) => {
                    tracing::info!(
                        client = c.is_ok(),
                        node = n.is_ok(),
                        "stream upgrade failed"
                    );
                    return;
                }
            };
            let (mut client, mut node) = (TokioIo::new(client), TokioIo::new(node));
            // Either side closing ends both: the node then stops what the stream ran.
            // Buffers the size of kubectl's frames (32 KiB) and more, so that a bulk
            // transfer is not cut into 8 KiB TLS records.
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut node,
                64 << 10,
                64 << 10,
            )
            .await;
        },
        span,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serving_certificate_names_only_a_nodes_own_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let node = User::new("system:node:n1", &[baton_auth::NODES]);
        let ask = |addresses: &[&str]| {
            let body = json!({"addresses": addresses}).to_string();
            issue_certificate(&pki, &node, "n1", body.as_bytes()).status()
        };
        assert_eq!(ask(&["10.0.0.5"]), StatusCode::OK);
        assert_eq!(ask(&["127.0.0.1"]), StatusCode::OK, "nodes on one machine");
        for bad in [
            "10.96.0.1",
            "10.96.3.4",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert_eq!(ask(&["10.0.0.5", bad]), StatusCode::BAD_REQUEST, "{bad}");
        }
        // Another node's certificate is not this node's to ask for.
        let body = json!({"addresses": ["10.0.0.5"]}).to_string();
        let other = issue_certificate(&pki, &node, "n2", body.as_bytes()).status();
        assert_eq!(other, StatusCode::FORBIDDEN);
    }
}
