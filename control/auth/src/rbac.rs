//! Role-based access control with Kubernetes' semantics.
//!
//! [`Policy`] holds every Role, ClusterRole and binding, indexed by namespace, and is
//! kept current by the API server as the objects change. A request is allowed when a
//! ClusterRoleBinding, or a RoleBinding in the request's namespace, names the user (or
//! one of its groups, or its ServiceAccount) and its role has a rule that matches. A
//! RoleBinding to a ClusterRole grants that ClusterRole's rules in its namespace only.
//! Nothing is ever denied here: RBAC only adds.
//!
//! [`covers`] is the escalation check: whoever writes a role or a binding must already
//! hold every permission it grants (unless allowed to `escalate` or `bind`).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef, Subject};
use serde_json::Value;

use crate::{Attributes, Decision, UserInfo};

/// The four kinds a [`Policy`] is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Role,
    ClusterRole,
    RoleBinding,
    ClusterRoleBinding,
}

impl Kind {
    /// The kind whose objects a store resource holds, by plural name.
    pub fn of_plural(plural: &str) -> Option<Kind> {
        Some(match plural {
            "roles" => Kind::Role,
            "clusterroles" => Kind::ClusterRole,
            "rolebindings" => Kind::RoleBinding,
            "clusterrolebindings" => Kind::ClusterRoleBinding,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
struct Binding {
    role_ref: RoleRef,
    subjects: Vec<Subject>,
}

/// Every role and binding of the cluster, ready to answer "may this user do this".
#[derive(Debug, Clone, Default)]
pub struct Policy {
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    bindings: HashMap<String, BTreeMap<String, Binding>>,
    cluster_bindings: BTreeMap<String, Binding>,
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn rules_of(obj: &Value) -> Vec<PolicyRule> {
    obj.get("rules")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .unwrap_or_default()
}

impl Policy {
    /// Adds or replaces one stored object (as the API stores it).
    pub fn apply(&mut self, kind: Kind, obj: &Value) {
        let ns = str_at(obj, "/metadata/namespace").to_string();
        let name = str_at(obj, "/metadata/name").to_string();
        match kind {
            Kind::Role => {
                self.roles.insert((ns, name), rules_of(obj));
            }
            Kind::ClusterRole => {
                self.cluster_roles.insert(name, rules_of(obj));
            }
            Kind::RoleBinding | Kind::ClusterRoleBinding => {
                let Some(role_ref) = obj
                    .get("roleRef")
                    .and_then(|r| serde_json::from_value::<RoleRef>(r.clone()).ok())
                else {
                    self.remove(kind, &ns, &name);
                    return;
                };
                let subjects = obj
                    .get("subjects")
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .unwrap_or_default();
                let b = Binding { role_ref, subjects };
                if kind == Kind::RoleBinding {
                    self.bindings.entry(ns).or_default().insert(name, b);
                } else {
                    self.cluster_bindings.insert(name, b);
                }
            }
        }
    }

    /// Forgets one object.
    pub fn remove(&mut self, kind: Kind, ns: &str, name: &str) {
        match kind {
            Kind::Role => {
                self.roles.remove(&(ns.to_string(), name.to_string()));
            }
            Kind::ClusterRole => {
                self.cluster_roles.remove(name);
            }
            Kind::RoleBinding => {
                if let Some(m) = self.bindings.get_mut(ns) {
                    m.remove(name);
                    if m.is_empty() {
                        self.bindings.remove(ns);
                    }
                }
            }
            Kind::ClusterRoleBinding => {
                self.cluster_bindings.remove(name);
            }
        }
    }

    /// The rules a role reference grants, read from a binding in `ns` ("" for a
    /// ClusterRoleBinding); None if the role does not exist.
    pub fn role_rules(&self, role_ref: &RoleRef, ns: &str) -> Option<&[PolicyRule]> {
        match role_ref.kind.as_str() {
            "Role" if !ns.is_empty() => self
                .roles
                .get(&(ns.to_string(), role_ref.name.clone()))
                .map(Vec::as_slice),
            "ClusterRole" => self.cluster_roles.get(&role_ref.name).map(Vec::as_slice),
            _ => None,
        }
    }

    /// The bindings that apply in `ns` and name `user`: every ClusterRoleBinding, then
    /// the namespace's RoleBindings, each with what it is called in a reason.
    fn applying<'a>(
        &'a self,
        user: &'a UserInfo,
        ns: &'a str,
    ) -> impl Iterator<Item = (String, &'a Binding, &'a str, &'a Subject)> + 'a {
        let cluster = self
            .cluster_bindings
            .iter()
            .map(|(n, b)| (format!("ClusterRoleBinding {n:?}"), b, ""));
        let local = (!ns.is_empty())
            .then(|| self.bindings.get(ns))
            .flatten()
            .into_iter()
            .flatten()
            .map(move |(n, b)| (format!("RoleBinding \"{n}/{ns}\""), b, ns));
        cluster.chain(local).filter_map(move |(what, b, bns)| {
            b.subjects
                .iter()
                .find(|s| applies_to(s, user, bns))
                .map(|s| (what, b, bns, s))
        })
    }

    /// RBAC's answer: Allow with the binding that allowed it, or NoOpinion.
    pub fn authorize(&self, a: &Attributes) -> Decision {
        for (what, b, bns, subject) in self.applying(&a.user, &a.namespace) {
            let Some(rules) = self.role_rules(&b.role_ref, bns) else {
                continue;
            };
            if rules.iter().any(|r| rule_allows(r, a)) {
                return Decision::Allow(format!(
                    "RBAC: allowed by {what} of {} {:?} to {} {:?}",
                    b.role_ref.kind, b.role_ref.name, subject.kind, subject.name
                ));
            }
        }
        Decision::NoOpinion
    }

    /// Every rule `user` holds in `ns` ("" for what it holds cluster-wide), in binding
    /// order, as SelfSubjectRulesReview reports and the escalation check compares.
    pub fn rules_for(&self, user: &UserInfo, ns: &str) -> Vec<PolicyRule> {
        let mut out = Vec::new();
        for (_, b, bns, _) in self.applying(user, ns) {
            if let Some(rules) = self.role_rules(&b.role_ref, bns) {
                out.extend(rules.iter().cloned());
            }
        }
        out
    }
}

/// Whether a binding's subject names the user; a ServiceAccount subject without a
/// namespace means the binding's own.
fn applies_to(s: &Subject, user: &UserInfo, binding_ns: &str) -> bool {
    match s.kind.as_str() {
        "User" => s.name == user.name,
        "Group" => user.in_group(&s.name),
        "ServiceAccount" => {
            let ns = s
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.as_service_account() == Some((ns, s.name.as_str()))
        }
        _ => false,
    }
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

fn opt(v: &Option<Vec<String>>) -> &[String] {
    v.as_deref().unwrap_or(&[])
}

/// Whether one rule allows a request.
pub fn rule_allows(rule: &PolicyRule, a: &Attributes) -> bool {
    if !has(&rule.verbs, &a.verb) {
        return false;
    }
    if !a.resource_request {
        return opt(&rule.non_resource_urls).iter().any(|u| {
            u == "*" || *u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
        });
    }
    if !has(opt(&rule.api_groups), &a.api_group) {
        return false;
    }
    let combined = a.combined_resource();
    let resource_ok = opt(&rule.resources).iter().any(|r| {
        r == "*"
            || *r == combined
            || (!a.subresource.is_empty() && r.strip_prefix("*/") == Some(a.subresource.as_str()))
    });
    if !resource_ok {
        return false;
    }
    let names = opt(&rule.resource_names);
    names.is_empty() || names.contains(&a.name)
}

/// Whether `owner`'s rules grant everything `requested` grants; if not, the parts of
/// `requested` that nothing in `owner` covers, one verb, group, resource and name each.
pub fn covers(owner: &[PolicyRule], requested: &[PolicyRule]) -> Result<(), Vec<PolicyRule>> {
    let mut missing = Vec::new();
    for rule in requested.iter().flat_map(atomic) {
        if !owner.iter().any(|o| rule_covers(o, &rule)) {
            missing.push(rule);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// A rule split into rules of one verb, group, resource and name (or one verb and URL).
fn atomic(r: &PolicyRule) -> Vec<PolicyRule> {
    let one = |s: &String| Some(vec![s.clone()]);
    let mut out = Vec::new();
    for verb in &r.verbs {
        for url in opt(&r.non_resource_urls) {
            out.push(PolicyRule {
                verbs: vec![verb.clone()],
                non_resource_urls: one(url),
                ..PolicyRule::default()
            });
        }
        for group in opt(&r.api_groups) {
            for res in opt(&r.resources) {
                let names = opt(&r.resource_names);
                if names.is_empty() {
                    out.push(PolicyRule {
                        verbs: vec![verb.clone()],
                        api_groups: one(group),
                        resources: one(res),
                        ..PolicyRule::default()
                    });
                }
                for name in names {
                    out.push(PolicyRule {
                        verbs: vec![verb.clone()],
                        api_groups: one(group),
                        resources: one(res),
                        resource_names: one(name),
                        ..PolicyRule::default()
                    });
                }
            }
        }
    }
    out
}

/// Whether `owner` grants all of the atomic rule `r`.
fn rule_covers(owner: &PolicyRule, r: &PolicyRule) -> bool {
    let first = |v: &Option<Vec<String>>| opt(v).first().cloned().unwrap_or_default();
    if !has(&owner.verbs, &r.verbs[0]) {
        return false;
    }
    if r.non_resource_urls.is_some() {
        let url = first(&r.non_resource_urls);
        return opt(&owner.non_resource_urls).iter().any(|u| {
            u == "*" || *u == url || u.strip_suffix('*').is_some_and(|p| url.starts_with(p))
        });
    }
    if !has(opt(&owner.api_groups), &first(&r.api_groups)) {
        return false;
    }
    let res = first(&r.resources);
    let sub = res.split_once('/').map(|(_, s)| s);
    let resource_ok = opt(&owner.resources)
        .iter()
        .any(|o| o == "*" || *o == res || (sub.is_some() && o.strip_prefix("*/") == sub));
    if !resource_ok {
        return false;
    }
    let owner_names = opt(&owner.resource_names);
    match opt(&r.resource_names).first() {
        _ if owner_names.is_empty() => true,
        Some(n) => owner_names.contains(n),
        None => false,
    }
}

/// A rule as kube prints it in an escalation refusal.
pub fn describe(r: &PolicyRule) -> String {
    let list = |v: &[String]| {
        let q: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
        format!("[{}]", q.join(" "))
    };
    let mut parts = Vec::new();
    if let Some(g) = &r.api_groups {
        parts.push(format!("APIGroups:{}", list(g)));
    }
    if let Some(x) = &r.resources {
        parts.push(format!("Resources:{}", list(x)));
    }
    if let Some(x) = &r.resource_names {
        parts.push(format!("ResourceNames:{}", list(x)));
    }
    if let Some(x) = &r.non_resource_urls {
        parts.push(format!("NonResourceURLs:{}", list(x)));
    }
    parts.push(format!("Verbs:{}", list(&r.verbs)));
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule(v: Value) -> PolicyRule {
        serde_json::from_value(v).unwrap()
    }

    fn req(user: &UserInfo, method: &str, path: &str) -> Attributes {
        Attributes::from_request(user.clone(), method, path, None)
    }

    fn policy() -> Policy {
        let mut p = Policy::default();
        p.apply(
            Kind::ClusterRole,
            &json!({"metadata": {"name": "view"}, "rules": [
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["apps"], "resources": ["*/scale"], "verbs": ["get"]},
            ]}),
        );
        p.apply(
            Kind::Role,
            &json!({"metadata": {"name": "one-secret", "namespace": "a"}, "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s1"], "verbs": ["get"]},
            ]}),
        );
        p.apply(
            Kind::RoleBinding,
            &json!({"metadata": {"name": "alice-view", "namespace": "a"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                    "subjects": [{"kind": "User", "name": "alice"}]}),
        );
        p.apply(
            Kind::RoleBinding,
            &json!({"metadata": {"name": "sa-secret", "namespace": "a"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "one-secret"},
                    "subjects": [{"kind": "ServiceAccount", "name": "app"}]}),
        );
        p.apply(
            Kind::ClusterRole,
            &json!({"metadata": {"name": "discovery"}, "rules": [
                {"nonResourceURLs": ["/api", "/api/*", "/healthz"], "verbs": ["get"]}]}),
        );
        p.apply(
            Kind::ClusterRoleBinding,
            &json!({"metadata": {"name": "discovery"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "discovery"},
                    "subjects": [{"kind": "Group", "name": "system:authenticated"}]}),
        );
        p
    }

    #[test]
    fn a_rolebinding_to_a_clusterrole_grants_it_in_its_namespace_only() {
        let p = policy();
        let alice = UserInfo::new("alice", &["system:authenticated"]);
        assert!(p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/a/pods"))
            .allowed());
        assert!(p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/a/pods/p/log"))
            .allowed());
        assert!(!p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/b/pods"))
            .allowed());
        assert!(!p.authorize(&req(&alice, "GET", "/api/v1/pods")).allowed());
        assert!(!p
            .authorize(&req(&alice, "DELETE", "/api/v1/namespaces/a/pods/p"))
            .allowed());
        assert!(!p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/a/secrets"))
            .allowed());
        assert!(p
            .authorize(&req(
                &alice,
                "GET",
                "/apis/apps/v1/namespaces/a/deployments/d/scale"
            ))
            .allowed());
        assert!(!p
            .authorize(&req(
                &alice,
                "GET",
                "/apis/apps/v1/namespaces/a/deployments/d"
            ))
            .allowed());
        let Decision::Allow(why) = p.authorize(&req(&alice, "GET", "/api/v1/namespaces/a/pods"))
        else {
            panic!()
        };
        assert_eq!(
            why,
            r#"RBAC: allowed by RoleBinding "alice-view/a" of ClusterRole "view" to User "alice""#
        );
    }

    #[test]
    fn resource_names_service_accounts_and_paths_match_as_kubernetes_matches_them() {
        let p = policy();
        let sa = UserInfo::service_account("a", "app", "u");
        assert!(p
            .authorize(&req(&sa, "GET", "/api/v1/namespaces/a/secrets/s1"))
            .allowed());
        assert!(!p
            .authorize(&req(&sa, "GET", "/api/v1/namespaces/a/secrets/s2"))
            .allowed());
        // A rule naming objects never allows a list: it would show the others.
        assert!(!p
            .authorize(&req(&sa, "GET", "/api/v1/namespaces/a/secrets"))
            .allowed());
        // The same account name in another namespace is another account.
        let other = UserInfo::service_account("b", "app", "u");
        assert!(!p
            .authorize(&req(&other, "GET", "/api/v1/namespaces/a/secrets/s1"))
            .allowed());
        assert!(p.authorize(&req(&sa, "GET", "/api/v1")).allowed());
        assert!(p.authorize(&req(&sa, "GET", "/healthz")).allowed());
        assert!(!p.authorize(&req(&sa, "GET", "/apis")).allowed());
        assert!(!p.authorize(&req(&sa, "POST", "/api")).allowed());
    }

    #[test]
    fn removed_objects_grant_nothing() {
        let mut p = policy();
        let alice = UserInfo::new("alice", &[]);
        p.remove(Kind::RoleBinding, "a", "alice-view");
        assert!(!p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/a/pods"))
            .allowed());
        let mut p = policy();
        p.remove(Kind::ClusterRole, "", "view");
        assert!(!p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/a/pods"))
            .allowed());
    }

    #[test]
    fn covers_needs_every_verb_group_resource_and_name() {
        let owner = vec![
            rule(
                json!({"apiGroups": [""], "resources": ["pods", "*/status"], "verbs": ["get", "list"]}),
            ),
            rule(
                json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s1"], "verbs": ["get"]}),
            ),
            rule(json!({"nonResourceURLs": ["/api/*"], "verbs": ["get"]})),
        ];
        let ok = |r: Value| covers(&owner, &[rule(r)]).is_ok();
        assert!(ok(
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]})
        ));
        assert!(ok(
            json!({"apiGroups": [""], "resources": ["pods/status", "services/status"], "verbs": ["list"]})
        ));
        assert!(ok(
            json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s1"], "verbs": ["get"]})
        ));
        assert!(ok(
            json!({"nonResourceURLs": ["/api/v1"], "verbs": ["get"]})
        ));
        assert!(!ok(
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "delete"]})
        ));
        assert!(!ok(
            json!({"apiGroups": ["", "apps"], "resources": ["pods"], "verbs": ["get"]})
        ));
        assert!(!ok(
            json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
        ));
        assert!(!ok(
            json!({"apiGroups": [""], "resources": ["*"], "verbs": ["get"]})
        ));
        assert!(!ok(
            json!({"apiGroups": ["*"], "resources": ["pods"], "verbs": ["*"]})
        ));
        let Err(missing) = covers(
            &owner,
            &[rule(
                json!({"apiGroups": [""], "resources": ["pods", "secrets"], "verbs": ["get"]}),
            )],
        ) else {
            panic!()
        };
        assert_eq!(missing.len(), 1);
        assert_eq!(
            describe(&missing[0]),
            r#"{APIGroups:[""], Resources:["secrets"], Verbs:["get"]}"#
        );
    }

    #[test]
    fn rules_for_lists_cluster_and_namespace_grants() {
        let p = policy();
        let alice = UserInfo::new("alice", &["system:authenticated"]);
        assert_eq!(p.rules_for(&alice, "a").len(), 3);
        assert_eq!(p.rules_for(&alice, "b").len(), 1);
    }
}
