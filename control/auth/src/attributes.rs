use crate::UserInfo;

/// What a request does, in the terms authorization speaks (kube's `authorizer.Attributes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub user: UserInfo,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`,
    /// or a special verb (`impersonate`, `bind`, `escalate`, `use`); for a non-resource
    /// request, the lowercase HTTP method.
    pub verb: String,
    pub resource_request: bool,
    /// "" for cluster-scoped requests.
    pub namespace: String,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    /// The request path (what non-resource rules match).
    pub path: String,
}

/// Path segments that a namespace itself has as subresources, rather than being the
/// resources in it.
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

impl Attributes {
    /// Reads a request as kube-apiserver's `RequestInfoFactory` does: `/api/v1/...` and
    /// `/apis/GROUP/VERSION/...` are resource requests; everything else (discovery,
    /// OpenAPI, health) is a non-resource request on its path. A GET without a name is a
    /// `list`, or a `watch` with `watch=true`; a list or watch that selects one name by
    /// `metadata.name=` is checked against rules naming it; a DELETE without a name is a
    /// `deletecollection`.
    pub fn from_request(user: UserInfo, method: &str, path: &str, query: Option<&str>) -> Self {
        let mut a = Attributes {
            user,
            path: path.to_string(),
            verb: method.to_ascii_lowercase(),
            ..Self::default()
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let rest = match parts.as_slice() {
            ["api", v, rest @ ..] if !rest.is_empty() => {
                a.api_version = v.to_string();
                rest
            }
            ["apis", g, v, rest @ ..] if !rest.is_empty() => {
                a.api_group = g.to_string();
                a.api_version = v.to_string();
                rest
            }
            _ => return a,
        };
        a.resource_request = true;
        let mut rest = rest;
        let mut special = false;
        if matches!(rest.first(), Some(&("watch" | "proxy"))) && rest.len() >= 2 {
            a.verb = rest[0].to_string();
            special = a.verb == "proxy";
            rest = &rest[1..];
        } else {
            a.verb = match method {
                "POST" => "create",
                "GET" | "HEAD" => "get",
                "PUT" => "update",
                "PATCH" => "patch",
                "DELETE" => "delete",
                _ => "",
            }
            .to_string();
        }
        if rest.first() == Some(&"namespaces") {
            if let Some(ns) = rest.get(1) {
                a.namespace = ns.to_string();
                if rest.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
                    rest = &rest[2..];
                }
            }
        }
        if let Some(r) = rest.first() {
            a.resource = r.to_string();
        }
        if let Some(n) = rest.get(1) {
            a.name = n.to_string();
        }
        if !special {
            if let Some(s) = rest.get(2) {
                a.subresource = s.to_string();
            }
        }
        let q: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        let get = |k: &str| q.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        if a.name.is_empty() && a.verb == "get" {
            a.verb = if matches!(get("watch"), Some("true" | "1")) {
                "watch"
            } else {
                "list"
            }
            .to_string();
            if let Some(name) = get("fieldSelector").and_then(exact_name) {
                a.name = name;
            }
        }
        if a.name.is_empty() && a.verb == "delete" {
            a.verb = "deletecollection".to_string();
        }
        // A WebSocket upgrade is a GET, but it opens a stream that runs commands or
        // reaches the pod's ports: kube-apiserver (1.31+) asks for `create`, as it does
        // for the SPDY POST, so that read-only roles cannot exec.
        if a.verb == "get"
            && a.resource == "pods"
            && matches!(a.subresource.as_str(), "exec" | "attach" | "portforward")
        {
            a.verb = "create".to_string();
        }
        a
    }

    /// `resource/subresource`, or the resource alone.
    pub fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// What a refusal says, word for word as kube-apiserver says it, so that scripts
    /// and people reading it find what they know.
    pub fn forbidden_message(&self, reason: &str) -> String {
        let who = &self.user.name;
        let mut msg = if !self.resource_request {
            format!(
                "forbidden: User {who:?} cannot {} path {:?}",
                self.verb, self.path
            )
        } else {
            let qualified = if self.api_group.is_empty() {
                self.resource.clone()
            } else {
                format!("{}.{}", self.resource, self.api_group)
            };
            let subject = if self.name.is_empty() {
                format!("{qualified} is forbidden")
            } else {
                format!("{qualified} {:?} is forbidden", self.name)
            };
            let scope = if self.namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace {:?}", self.namespace)
            };
            format!(
                "{subject}: User {who:?} cannot {} resource {:?} in API group {:?} {scope}",
                self.verb,
                self.combined_resource(),
                self.api_group
            )
        };
        if !reason.is_empty() {
            msg.push_str(": ");
            msg.push_str(reason);
        }
        msg
    }
}

/// The name a field selector requires exactly (`metadata.name=x` or `==`), if it does.
fn exact_name(selector: &str) -> Option<String> {
    let mut found = None;
    for term in selector.split(',') {
        let term = term.trim();
        if let Some(v) = term
            .strip_prefix("metadata.name==")
            .or_else(|| term.strip_prefix("metadata.name="))
        {
            if found.is_some() {
                return None;
            }
            found = Some(v.to_string());
        }
    }
    found.filter(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: &str, path: &str, query: &str) -> Attributes {
        Attributes::from_request(UserInfo::new("u", &[]), method, path, Some(query))
    }

    #[test]
    fn verbs_resources_and_names_are_read_from_the_path() {
        let a = attrs("GET", "/api/v1/namespaces/ns/pods", "");
        assert_eq!(
            (a.verb.as_str(), a.namespace.as_str(), a.resource.as_str()),
            ("list", "ns", "pods")
        );
        let a = attrs(
            "GET",
            "/api/v1/namespaces/ns/pods",
            "watch=true&fieldSelector=metadata.name%3Dweb",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("watch", "web"));
        let a = attrs("GET", "/api/v1/namespaces/ns/pods/web/log", "");
        assert_eq!(a.combined_resource(), "pods/log");
        assert_eq!(a.verb, "get");
        // Streams opened by a WebSocket GET are creations, as the SPDY POST is.
        for sub in ["exec", "attach", "portforward"] {
            let a = attrs("GET", &format!("/api/v1/namespaces/ns/pods/web/{sub}"), "");
            assert_eq!((a.verb.as_str(), a.subresource.as_str()), ("create", sub));
        }
        let a = attrs("DELETE", "/apis/apps/v1/namespaces/ns/deployments", "");
        assert_eq!(
            (a.verb.as_str(), a.api_group.as_str()),
            ("deletecollection", "apps")
        );
        // A namespace's own subresources are not resources inside it.
        let a = attrs("PUT", "/api/v1/namespaces/ns/finalize", "");
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.subresource.as_str()),
            ("namespaces", "ns", "finalize")
        );
        let a = attrs("GET", "/api/v1/namespaces/ns", "");
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.namespace.as_str()),
            ("namespaces", "ns", "ns")
        );
        let a = attrs("GET", "/api/v1/nodes/n1/proxy/stats/summary", "");
        assert_eq!(
            (
                a.verb.as_str(),
                a.resource.as_str(),
                a.name.as_str(),
                a.subresource.as_str()
            ),
            ("get", "nodes", "n1", "proxy")
        );
        let a = attrs(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            "",
        );
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("create", ""));
    }

    #[test]
    fn discovery_and_health_are_non_resource_requests() {
        for p in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps",
            "/apis/apps/v1",
            "/openapi/v3",
            "/healthz",
        ] {
            let a = attrs("GET", p, "");
            assert!(!a.resource_request, "{p}");
            assert_eq!(a.verb, "get");
            assert_eq!(a.path, p);
        }
    }

    #[test]
    fn refusals_are_worded_as_kubernetes_words_them() {
        let a = attrs("GET", "/api/v1/namespaces/ns/secrets", "");
        assert_eq!(
            a.forbidden_message(""),
            r#"secrets is forbidden: User "u" cannot list resource "secrets" in API group "" in the namespace "ns""#
        );
        let a = attrs("DELETE", "/api/v1/nodes/n2", "");
        assert_eq!(
            a.forbidden_message(""),
            r#"nodes "n2" is forbidden: User "u" cannot delete resource "nodes" in API group "" at the cluster scope"#
        );
        let a = attrs("GET", "/apis/apps/v1/namespaces/ns/deployments/d/scale", "");
        assert_eq!(
            a.forbidden_message(""),
            r#"deployments.apps "d" is forbidden: User "u" cannot get resource "deployments/scale" in API group "apps" in the namespace "ns""#
        );
        let a = attrs("GET", "/metrics", "");
        assert_eq!(
            a.forbidden_message(""),
            r#"forbidden: User "u" cannot get path "/metrics""#
        );
    }

    #[test]
    fn only_an_exact_single_name_selector_names_the_object() {
        assert_eq!(exact_name("metadata.name=a"), Some("a".into()));
        assert_eq!(
            exact_name("metadata.name==a,spec.nodeName=n"),
            Some("a".into())
        );
        assert_eq!(exact_name("metadata.name!=a"), None);
        assert_eq!(exact_name("metadata.name=a,metadata.name=b"), None);
        assert_eq!(exact_name("metadata.name=../x"), None);
    }
}
