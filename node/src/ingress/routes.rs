//! Which backend an Ingress request goes to: the rules of every Ingress of the node's
//! class, merged into one table, matched as the Ingress API specifies.
//!
//! - **Hosts.** An exact host beats a wildcard (`*.example.com` matches one label in
//!   front of `example.com`, not two, not none), which beats a rule without a host.
//! - **Paths.** The longest matching path wins, and `Exact` beats `Prefix` at the same
//!   length. `Prefix` matches whole path elements: `/foo` matches `/foo`, `/foo/` and
//!   `/foo/bar`, not `/foobar`. `ImplementationSpecific` is `Prefix` here.
//! - **Ties** between Ingresses go to the oldest, as ingress-nginx resolves them.
//! - **Default backend.** The oldest Ingress's `spec.defaultBackend` takes what no rule
//!   matches; without one, 404.

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

/// A Service port, by number or by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl ServicePort {
    /// Whether it names the Service port `number` called `name`.
    pub fn is(&self, number: u16, name: &str) -> bool {
        match self {
            ServicePort::Number(n) => *n == number,
            ServicePort::Name(n) => n == name,
        }
    }
}

/// Where a matched request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub service: String,
    pub port: ServicePort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Wildcard(String),
    Any,
}

impl Host {
    fn parse(h: Option<&str>) -> Host {
        match h.map(str::to_ascii_lowercase) {
            None => Host::Any,
            Some(h) if h.is_empty() => Host::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => Host::Wildcard(suffix.to_string()),
                None => Host::Exact(h),
            },
        }
    }

    /// How well this host matches `host` (higher is better), if at all.
    fn rank(&self, host: &str) -> Option<u8> {
        match self {
            Host::Exact(h) => (h == host).then_some(2),
            Host::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .filter(|label| !label.is_empty() && !label.contains('.'))
                .map(|_| 1),
            Host::Any => Some(0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathKind {
    Exact,
    Prefix,
}

#[derive(Clone, Debug)]
struct Route {
    host: Host,
    kind: PathKind,
    path: String,
    backend: Option<Backend>,
    /// The Ingress's age rank: lower is older, and wins ties.
    age: usize,
}

/// The merged rules of the node's Ingresses.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
    default: Option<Backend>,
    /// Hosts with a TLS section: `(namespace, secret)` for each.
    pub tls: Vec<Tls>,
}

/// One `spec.tls` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub namespace: String,
    pub secret: String,
    pub hosts: Vec<String>,
}

fn backend_of(ns: &str, b: &IngressBackend) -> Option<Backend> {
    let svc = b.service.as_ref()?;
    let port = svc.port.as_ref()?;
    let port = match (port.number, &port.name) {
        (Some(n), _) => ServicePort::Number(u16::try_from(n).ok()?),
        (None, Some(name)) => ServicePort::Name(name.clone()),
        (None, None) => return None,
    };
    Some(Backend {
        namespace: ns.to_string(),
        service: svc.name.clone(),
        port,
    })
}

/// Whether Prefix path `prefix` matches request path `path`, element by element.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl Routes {
    /// The table of `ingresses` (already those of the node's class).
    pub fn build(ingresses: &[&Ingress]) -> Routes {
        let mut sorted: Vec<&Ingress> = ingresses.to_vec();
        sorted.sort_by(|a, b| {
            let key = |i: &Ingress| {
                (
                    i.metadata.creation_timestamp.clone().map(|t| t.0),
                    i.metadata.namespace.clone(),
                    i.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let mut out = Routes::default();
        for (age, ing) in sorted.iter().enumerate() {
            let ns = ing.metadata.namespace.clone().unwrap_or_default();
            let Some(spec) = &ing.spec else { continue };
            if out.default.is_none() {
                out.default = spec
                    .default_backend
                    .as_ref()
                    .and_then(|b| backend_of(&ns, b));
            }
            for rule in spec.rules.iter().flatten() {
                let host = Host::parse(rule.host.as_deref());
                for p in rule.http.iter().flat_map(|h| &h.paths) {
                    let kind = match p.path_type.as_str() {
                        "Exact" => PathKind::Exact,
                        _ => PathKind::Prefix,
                    };
                    out.routes.push(Route {
                        host: host.clone(),
                        kind,
                        path: p.path.clone().unwrap_or_else(|| "/".into()),
                        backend: backend_of(&ns, &p.backend),
                        age,
                    });
                }
            }
            for t in spec.tls.iter().flatten() {
                if let Some(secret) = &t.secret_name {
                    out.tls.push(Tls {
                        namespace: ns.clone(),
                        secret: secret.clone(),
                        hosts: t.hosts.clone().unwrap_or_default(),
                    });
                }
            }
        }
        out
    }

    /// The backend for a request to `host` (without a port) and `path`. `Err(())` when
    /// nothing matches and there is no default backend: 404.
    #[allow(clippy::result_unit_err)]
    pub fn route(&self, host: &str, path: &str) -> Result<&Backend, ()> {
        let host = host.to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let best = self
            .routes
            .iter()
            .filter_map(|r| {
                r.host.rank(host)?;
                let matched = match r.kind {
                    PathKind::Exact => r.path == path,
                    PathKind::Prefix => prefix_matches(&r.path, path),
                };
                matched.then_some(r)
            })
            .max_by(|a, b| {
                let score = |r: &Route| {
                    (
                        r.host.rank(host).unwrap_or(0),
                        r.path.trim_end_matches('/').len(),
                        r.kind == PathKind::Exact,
                        std::cmp::Reverse(r.age),
                    )
                };
                score(a).cmp(&score(b))
            });
        match best {
            Some(r) => r.backend.as_ref().ok_or(()),
            None => self.default.as_ref().ok_or(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(name: &str, created: &str, spec: serde_json::Value) -> Ingress {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
            "spec": spec,
        }))
        .unwrap()
    }

    fn path(p: &str, ty: &str, svc: &str) -> serde_json::Value {
        json!({"path": p, "pathType": ty,
               "backend": {"service": {"name": svc, "port": {"number": 80}}}})
    }

    fn svc(r: Result<&Backend, ()>) -> String {
        r.map(|b| b.service.clone())
            .unwrap_or_else(|()| "404".into())
    }

    #[test]
    fn hosts_exact_then_wildcard_then_any() {
        let a = ingress(
            "a",
            "2026-01-01T00:00:00Z",
            json!({"rules": [
                {"host": "shop.example.com", "http": {"paths": [path("/", "Prefix", "exact")]}},
                {"host": "*.example.com", "http": {"paths": [path("/", "Prefix", "wild")]}},
                {"http": {"paths": [path("/", "Prefix", "any")]}},
            ]}),
        );
        let r = Routes::build(&[&a]);
        assert_eq!(svc(r.route("shop.example.com", "/x")), "exact");
        assert_eq!(svc(r.route("SHOP.example.com.", "/x")), "exact");
        assert_eq!(svc(r.route("blog.example.com", "/x")), "wild");
        // One label only.
        assert_eq!(svc(r.route("a.b.example.com", "/x")), "any");
        assert_eq!(svc(r.route("example.com", "/x")), "any");
    }

    #[test]
    fn longest_path_wins_exact_beats_prefix_and_prefixes_match_whole_elements() {
        let a = ingress(
            "a",
            "2026-01-01T00:00:00Z",
            json!({"rules": [{"host": "h", "http": {"paths": [
                path("/", "Prefix", "root"),
                path("/api", "Prefix", "api"),
                path("/api/v1", "ImplementationSpecific", "v1"),
                path("/api", "Exact", "api-exact"),
            ]}}]}),
        );
        let r = Routes::build(&[&a]);
        assert_eq!(svc(r.route("h", "/")), "root");
        assert_eq!(svc(r.route("h", "/api")), "api-exact");
        assert_eq!(svc(r.route("h", "/api/")), "api");
        assert_eq!(svc(r.route("h", "/api/users")), "api");
        assert_eq!(svc(r.route("h", "/apix")), "root");
        assert_eq!(svc(r.route("h", "/api/v1/x")), "v1");
        assert_eq!(svc(r.route("other", "/")), "404");
    }

    #[test]
    fn the_oldest_ingress_wins_a_tie_and_gives_the_default_backend() {
        let old = ingress(
            "old",
            "2026-01-01T00:00:00Z",
            json!({"defaultBackend": {"service": {"name": "fallback", "port": {"name": "http"}}},
                   "rules": [{"host": "h", "http": {"paths": [path("/", "Prefix", "old")]}}]}),
        );
        let new = ingress(
            "new",
            "2026-02-01T00:00:00Z",
            json!({"defaultBackend": {"service": {"name": "later", "port": {"number": 8080}}},
                   "rules": [{"host": "h", "http": {"paths": [path("/", "Prefix", "new")]}}]}),
        );
        let r = Routes::build(&[&new, &old]);
        assert_eq!(svc(r.route("h", "/")), "old");
        let fallback = r.route("elsewhere", "/").unwrap();
        assert_eq!(fallback.service, "fallback");
        assert_eq!(fallback.port, ServicePort::Name("http".into()));
    }
}
