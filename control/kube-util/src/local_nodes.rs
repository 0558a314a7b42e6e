//! In-process calls from the API server to the node agents that run in its own process.
//!
//! `baton up` runs the API server and a node agent as one process. The API server reaches
//! a node's endpoint (logs, exec, attach, port-forward, stats) over mutually authenticated
//! TLS, which is what a remote node needs; for its own node that would only encrypt bytes
//! to itself, twice in each direction, and copy them across the kernel and a splice. A
//! node agent in the same process registers its endpoint here instead, and the API server
//! calls it as a function: a request in, a response out. A request that upgrades the
//! connection (exec, port-forward) carries the client's [`hyper::upgrade::OnUpgrade`] in
//! its extensions, so that the node's session runs on the client's own connection.
//!
//! Only code in the process can register, so a call carries the same trust as the
//! mutually authenticated link: the caller is the API server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

/// The body of a node's answer.
pub type NodeBody = http_body_util::combinators::BoxBody<bytes::Bytes, Infallible>;
/// A node's answer.
pub type NodeResponse = http::Response<NodeBody>;
/// A node's answer, to come.
pub type NodeFuture = Pin<Box<dyn Future<Output = NodeResponse> + Send>>;

/// A node's endpoint as a function.
pub type NodeService = Arc<dyn Fn(http::Request<()>) -> NodeFuture + Send + Sync>;

type Table = Mutex<HashMap<String, NodeService>>;

/// Node agents of this process, by node name. Clones share the table.
#[derive(Clone, Default)]
pub struct LocalNodes {
    services: Arc<Table>,
}

impl std::fmt::Debug for LocalNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.table().keys().cloned().collect();
        f.debug_struct("LocalNodes").field("nodes", &names).finish()
    }
}

/// A node's place in the table: dropping it takes the node out.
#[must_use = "the node leaves the table when this is dropped"]
pub struct Registration {
    node: String,
    services: Weak<Table>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("node", &self.node)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.services.upgrade() {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.node);
        }
    }
}

impl LocalNodes {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeService>> {
        // The table holds no invariant a panicking holder could break.
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `node`'s endpoint in this process with `serve`.
    pub fn register(
        &self,
        node: &str,
        serve: impl Fn(http::Request<()>) -> NodeFuture + Send + Sync + 'static,
    ) -> Registration {
        self.table().insert(node.to_string(), Arc::new(serve));
        Registration {
            node: node.to_string(),
            services: Arc::downgrade(&self.services),
        }
    }

    /// `node`'s endpoint, if that node runs in this process.
    pub fn service(&self, node: &str) -> Option<NodeService> {
        self.table().get(node).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_registered_node_is_called_until_its_registration_is_dropped() {
        let nodes = LocalNodes::default();
        assert!(nodes.service("n1").is_none());
        let reg = nodes.register("n1", |req| {
            let path = req.uri().path().to_string();
            Box::pin(async move { http::Response::new(Full::from(path).boxed()) })
        });
        let serve = nodes.clone().service("n1").expect("registered");
        let resp = serve(http::Request::get("/stats/summary").body(()).unwrap()).await;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"/stats/summary");
        assert!(nodes.service("n2").is_none(), "only the registered name");
        drop(reg);
        assert!(nodes.service("n1").is_none());
    }
}
