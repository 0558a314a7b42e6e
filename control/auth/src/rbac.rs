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

use std::collections::{BTreeMap, BTreeSet, HashMap};

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

/// The bindings of one scope (a namespace, or "" for the ClusterRoleBindings), and who
/// they name, so that a request looks up its user's few keys instead of scanning them.
#[derive(Debug, Clone, Default)]
struct Scope {
    bindings: BTreeMap<String, Binding>,
    users: HashMap<String, BTreeSet<String>>,
    groups: HashMap<String, BTreeSet<String>>,
    /// By `namespace/name`.
    service_accounts: HashMap<String, BTreeSet<String>>,
}

impl Scope {
    fn keys<'a>(
        subjects: &'a [Subject],
        scope: &'a str,
    ) -> impl Iterator<Item = (SubjectKind, String)> + 'a {
        subjects.iter().filter_map(move |s| match s.kind.as_str() {
            "User" => Some((SubjectKind::User, s.name.clone())),
            "Group" => Some((SubjectKind::Group, s.name.clone())),
            "ServiceAccount" => {
                let ns = s
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(scope);
                Some((SubjectKind::ServiceAccount, format!("{ns}/{}", s.name)))
            }
            _ => None,
        })
    }

    fn index(&mut self, kind: SubjectKind) -> &mut HashMap<String, BTreeSet<String>> {
        match kind {
            SubjectKind::User => &mut self.users,
            SubjectKind::Group => &mut self.groups,
            SubjectKind::ServiceAccount => &mut self.service_accounts,
        }
    }

    fn insert(&mut self, scope: &str, name: String, b: Binding) {
        self.remove(scope, &name);
        for (kind, key) in Scope::keys(&b.subjects, scope) {
            self.index(kind)
                .entry(key)
                .or_default()
                .insert(name.clone());
        }
        self.bindings.insert(name, b);
    }

    fn remove(&mut self, scope: &str, name: &str) {
        let Some(old) = self.bindings.remove(name) else {
            return;
        };
        for (kind, key) in Scope::keys(&old.subjects, scope) {
            let index = self.index(kind);
            if let Some(set) = index.get_mut(&key) {
                set.remove(name);
                if set.is_empty() {
                    index.remove(&key);
                }
            }
        }
    }

    /// The names of the bindings that name `user`, in name order.
    fn naming<'a>(&'a self, user: &UserInfo) -> BTreeSet<&'a str> {
        let mut sets: Vec<&'a BTreeSet<String>> = Vec::new();
        sets.extend(self.users.get(&user.name));
        sets.extend(user.groups.iter().filter_map(|g| self.groups.get(g)));
        if let Some((ns, name)) = user.as_service_account() {
            sets.extend(self.service_accounts.get(&format!("{ns}/{name}")));
        }
        sets.into_iter().flatten().map(String::as_str).collect()
    }
}

#[derive(Debug, Clone, Copy)]
enum SubjectKind {
    User,
    Group,
    ServiceAccount,
}

/// Every role and binding of the cluster, ready to answer "may this user do this".
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Roles by namespace, then name.
    roles: HashMap<String, HashMap<String, Vec<PolicyRule>>>,
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    /// Bindings by namespace; "" holds the ClusterRoleBindings.
    scopes: HashMap<String, Scope>,
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn rules_of(obj: &Value) -> Vec<PolicyRule> {
    obj.get("rules")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .unwrap_or_default()
}

/// The scope of a binding kind: its namespace, or "" for a ClusterRoleBinding.
fn scope_of(kind: Kind, ns: &str) -> &str {
    if kind == Kind::ClusterRoleBinding {
        ""
    } else {
        ns
    }
}

impl Policy {
    /// Adds or replaces one stored object (as the API stores it).
    pub fn apply(&mut self, kind: Kind, obj: &Value) {
        let ns = str_at(obj, "/metadata/namespace").to_string();
        let name = str_at(obj, "/metadata/name").to_string();
        match kind {
            Kind::Role => {
                self.roles
                    .entry(ns)
                    .or_default()
                    .insert(name, rules_of(obj));
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
                let scope = scope_of(kind, &ns).to_string();
                self.scopes.entry(scope.clone()).or_default().insert(
                    &scope,
                    name,
                    Binding { role_ref, subjects },
                );
            }
        }
    }

    /// Forgets one object.
    pub fn remove(&mut self, kind: Kind, ns: &str, name: &str) {
        match kind {
            Kind::Role => {
                if let Some(m) = self.roles.get_mut(ns) {
                    m.remove(name);
                    if m.is_empty() {
                        self.roles.remove(ns);
                    }
                }
            }
            Kind::ClusterRole => {
                self.cluster_roles.remove(name);
            }
            Kind::RoleBinding | Kind::ClusterRoleBinding => {
                let scope = scope_of(kind, ns);
                if let Some(sc) = self.scopes.get_mut(scope) {
                    sc.remove(scope, name);
                    if sc.bindings.is_empty() {
                        self.scopes.remove(scope);
                    }
                }
            }
        }
    }

    /// The rules a role reference grants, read from a binding in `ns` ("" for a
    /// ClusterRoleBinding); None if the role does not exist.
    pub fn role_rules(&self, role_ref: &RoleRef, ns: &str) -> Option<&[PolicyRule]> {
        match role_ref.kind.as_str() {
            "Role" if !ns.is_empty() => self
                .roles
                .get(ns)
                .and_then(|m| m.get(&role_ref.name))
                .map(Vec::as_slice),
            "ClusterRole" => self.cluster_roles.get(&role_ref.name).map(Vec::as_slice),
            _ => None,
        }
    }

    /// The bindings that apply in `ns` and name `user`: the ClusterRoleBindings, then
    /// the namespace's RoleBindings, each with its scope and name.
    fn applying<'a>(
        &'a self,
        user: &'a UserInfo,
        ns: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a Binding)> + 'a {
        let local = (!ns.is_empty()).then_some(ns);
        std::iter::once("")
            .chain(local)
            .filter_map(move |scope| Some((scope, self.scopes.get(scope)?)))
            .flat_map(move |(scope, sc)| {
                sc.naming(user)
                    .into_iter()
                    .filter_map(move |name| Some((scope, name, sc.bindings.get(name)?)))
                    .collect::<Vec<_>>()
            })
    }

    /// RBAC's answer: Allow with the binding that allowed it, or NoOpinion.
    pub fn authorize(&self, a: &Attributes) -> Decision {
        for (scope, name, b) in self.applying(&a.user, &a.namespace) {
            let Some(rules) = self.role_rules(&b.role_ref, scope) else {
                continue;
            };
            if rules.iter().any(|r| rule_allows(r, a)) {
                let what = if scope.is_empty() {
                    format!("ClusterRoleBinding {name:?}")
                } else {
                    format!("RoleBinding \"{name}/{scope}\"")
                };
                let subject = b
                    .subjects
                    .iter()
                    .find(|s| applies_to(s, &a.user, scope))
                    .map(|s| format!("{} {:?}", s.kind, s.name))
                    .unwrap_or_default();
                return Decision::Allow(format!(
                    "RBAC: allowed by {what} of {} {:?} to {subject}",
                    b.role_ref.kind, b.role_ref.name
                ));
            }
        }
        Decision::NoOpinion
    }

    /// Every rule `user` holds in `ns` ("" for what it holds cluster-wide), in binding
    /// order, as SelfSubjectRulesReview reports and the escalation check compares.
    pub fn rules_for(&self, user: &UserInfo, ns: &str) -> Vec<PolicyRule> {
        let mut out = Vec::new();
        for (scope, _, b) in self.applying(user, ns) {
            if let Some(rules) = self.role_rules(&b.role_ref, scope) {
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
    let resource_ok = opt(&rule.resources).iter().any(|r| {
        r == "*"
            || names_combined(r, a)
            || (!a.subresource.is_empty() && r.strip_prefix("*/") == Some(a.subresource.as_str()))
    });
    if !resource_ok {
        return false;
    }
    let names = opt(&rule.resource_names);
    names.is_empty() || names.contains(&a.name)
}

/// Whether a rule's resource is the request's `resource[/subresource]`, without building
/// that string on every check.
fn names_combined(r: &str, a: &Attributes) -> bool {
    if a.subresource.is_empty() {
        return r == a.resource;
    }
    r.strip_prefix(a.resource.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(a.subresource.as_str())
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
    fn a_binding_replaced_with_other_subjects_stops_naming_the_old_ones() {
        let mut p = policy();
        let alice = UserInfo::new("alice", &[]);
        let bob = UserInfo::new("bob", &[]);
        p.apply(
            Kind::RoleBinding,
            &json!({"metadata": {"name": "alice-view", "namespace": "a"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                    "subjects": [{"kind": "User", "name": "bob"}]}),
        );
        assert!(!p
            .authorize(&req(&alice, "GET", "/api/v1/namespaces/a/pods"))
            .allowed());
        assert!(p
            .authorize(&req(&bob, "GET", "/api/v1/namespaces/a/pods"))
            .allowed());
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
