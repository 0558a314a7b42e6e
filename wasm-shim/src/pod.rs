//! A pod: several components started together, sharing one virtual localhost.
//!
//! # How the virtual localhost works (HTTP)
//! Every pod gets its own loopback address (`127.x.y.z`, chosen by the node agent). Its
//! HTTP components listen on that address at their container port, so two pods can both
//! serve port 8080 on one node, and the node reaches a pod's ports at `podIP:port`.
//! When a component of the pod sends a wasi:http request to `localhost:P` (or
//! `127.0.0.1:P`), the request is rewritten to `podIP:P` before it leaves, so it reaches
//! its sibling and never another pod. Loopback TCP was chosen over routing requests
//! in-process through wasmtime's body types because it is one code path for siblings, the
//! node and (later) Services, at a cost of one loopback connection per request.
//!
//! wasi:sockets traffic does not get this rewrite yet: a socket component binds the
//! node's real addresses (issue "Wasm runtime").

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use wasmtime::component::Component;
use wasmtime_wasi_http::{
    default_send_request, Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks,
};

use crate::cli::{CliOutcome, CliSpec};
use crate::error::ShimError;
use crate::http::{HttpServer, HttpSpec};
use crate::runtime::{ComponentKind, Runtime};

/// The wasi:http hooks of a pod's components: `localhost` means the pod.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PodHooks {
    pub pod_ip: IpAddr,
}

impl Default for PodHooks {
    fn default() -> Self {
        Self {
            pod_ip: IpAddr::from([127, 0, 0, 1]),
        }
    }
}

/// Points a request for `localhost:P` at `pod_ip:P`.
pub(crate) fn rewrite_localhost(uri: &http::Uri, pod_ip: IpAddr) -> Option<http::Uri> {
    let auth = uri.authority()?;
    let local = matches!(auth.host(), "localhost" | "127.0.0.1" | "[::1]" | "::1");
    if !local || pod_ip == IpAddr::from([127, 0, 0, 1]) {
        return None;
    }
    let port = auth.port_u16().unwrap_or(80);
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(format!("{pod_ip}:{port}").parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for PodHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: IoFuture,
    ) -> Box<
        dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, IoFuture)>>
            + Send,
    > {
        if let Some(uri) = rewrite_localhost(request.uri(), self.pod_ip) {
            *request.uri_mut() = uri;
        }
        drop(fut);
        Box::new(async move {
            let (res, io) = default_send_request(request, options).await?;
            Ok((res.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
        })
    }
}

/// One container of a pod.
#[derive(Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub component: Component,
    /// For HTTP components: the port they serve (their container port).
    pub port: Option<u16>,
    pub cli: CliSpec,
    pub http: HttpSpec,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish()
    }
}

/// A pod to start.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    /// The pod's own loopback address; `localhost` inside the pod means this.
    pub ip: IpAddr,
    pub containers: Vec<ContainerSpec>,
}

/// A running pod; its components stop when it is dropped.
#[derive(Debug)]
pub struct Pod {
    pub ip: IpAddr,
    servers: Vec<(String, HttpServer)>,
    processes: Vec<(String, JoinHandle<Result<CliOutcome, ShimError>>)>,
}

impl Pod {
    /// Where the node reaches an HTTP container.
    pub fn http_addr(&self, container: &str) -> Option<SocketAddr> {
        self.servers
            .iter()
            .find(|(n, _)| n == container)
            .map(|(_, s)| s.local_addr())
    }

    /// Waits for a CLI container to finish.
    pub async fn wait(&mut self, container: &str) -> Option<Result<CliOutcome, ShimError>> {
        let i = self.processes.iter().position(|(n, _)| n == container)?;
        let (_, task) = self.processes.remove(i);
        Some(
            task.await
                .unwrap_or_else(|e| Err(ShimError::Setup(format!("container task failed: {e}")))),
        )
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for (_, t) in &self.processes {
            t.abort();
        }
    }
}

impl Runtime {
    /// Starts every container of a pod: HTTP components listen on `ip:port`, CLI
    /// components run as processes.
    pub async fn start_pod(&self, spec: PodSpec) -> Result<Pod, ShimError> {
        let mut pod = Pod {
            ip: spec.ip,
            servers: Vec::new(),
            processes: Vec::new(),
        };
        let hooks = PodHooks { pod_ip: spec.ip };
        for c in spec.containers {
            match self.kind(&c.component)? {
                ComponentKind::Http => {
                    let port = c.port.ok_or_else(|| {
                        ShimError::Setup(format!("HTTP container {} has no port", c.name))
                    })?;
                    let addr = SocketAddr::new(spec.ip, port);
                    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                        ShimError::Setup(format!(
                            "container {} cannot listen on {addr}: {e}",
                            c.name
                        ))
                    })?;
                    let server =
                        self.serve_http_with(&c.component, c.http.clone(), listener, hooks)?;
                    pod.servers.push((c.name, server));
                }
                ComponentKind::Cli => {
                    let rt = self.clone();
                    let name = c.name.clone();
                    let task = tokio::spawn(async move {
                        rt.run_cli_with(&c.component, &c.name, &c.cli, hooks).await
                    });
                    pod.processes.push((name, task));
                }
            }
        }
        Ok(pod)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_means_the_pod() {
        let ip = IpAddr::from([127, 1, 0, 7]);
        let u: http::Uri = "http://localhost:8081/x?y=1".parse().unwrap();
        assert_eq!(
            rewrite_localhost(&u, ip).unwrap().to_string(),
            "http://127.1.0.7:8081/x?y=1"
        );
        let u: http::Uri = "http://127.0.0.1/".parse().unwrap();
        assert_eq!(
            rewrite_localhost(&u, ip).unwrap().to_string(),
            "http://127.1.0.7:80/"
        );
        let u: http::Uri = "http://example.com:8081/".parse().unwrap();
        assert!(rewrite_localhost(&u, ip).is_none());
    }
}
