//! The resources this API server serves: names, scope, verbs, subresources, and the
//! Kubernetes type each one (de)serializes through.

use serde_json::Value;

use crate::strategy::{self, Strategy};

/// How an object's body is checked against its Kubernetes type.
pub type TypeCheck = fn(&Value) -> Result<Value, serde_json::Error>;

/// Registers the resource's OpenAPI schema (and its parts) with a generator.
pub type SchemaOf = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

fn schema_of<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Value, serde_json::Error> {
    let typed: T = serde_json::from_value(v.clone())?;
    serde_json::to_value(typed)
}

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [&'static str],
    /// Deserializes into the k8s-openapi type and back: the typed view of a body.
    pub check: TypeCheck,
    /// The type's OpenAPI schema, from k8s-openapi (for `kubectl explain`).
    pub schema: SchemaOf,
    /// What the kind does differently from a plain object.
    pub strategy: &'static dyn Strategy,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }

    /// Store prefix of all objects of this resource.
    pub fn key_prefix(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{g}/{}/", self.plural)
    }

    /// Store prefix of the objects in one namespace (or all, for cluster-scoped ones).
    pub fn key_prefix_in(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/", self.key_prefix()),
            _ => self.key_prefix(),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/{name}", self.key_prefix()),
            _ => format!("{}{name}", self.key_prefix()),
        }
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

macro_rules! resource {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $ty:ty,
     short = [$($short:expr),*], cat = [$($cat:expr),*], sub = [$($sub:expr),*],
     strategy = $strategy:expr) => {
        Resource {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $ns,
            short_names: &[$($short),*],
            categories: &[$($cat),*],
            subresources: &[$($sub),*],
            check: roundtrip::<$ty>,
            schema: schema_of::<$ty>,
            strategy: &$strategy,
        }
    };
}

use k8s_openapi::api::{
    apps, autoscaling, batch, certificates, coordination, core, discovery, networking, rbac,
    scheduling,
};

/// Every resource served, in discovery order.
pub static RESOURCES: &[Resource] = &[
    resource!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        core::v1::Namespace,
        short = ["ns"],
        cat = [],
        sub = ["status", "finalize"],
        strategy = strategy::Namespaces
    ),
    resource!(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        true,
        core::v1::Pod,
        short = ["po"],
        cat = ["all"],
        sub = ["status", "log", "exec", "binding"],
        strategy = strategy::Pods
    ),
    resource!(
        "",
        "v1",
        "Node",
        "nodes",
        "node",
        false,
        core::v1::Node,
        short = ["no"],
        cat = [],
        sub = ["status"],
        strategy = strategy::Nodes
    ),
    resource!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        core::v1::Service,
        short = ["svc"],
        cat = ["all"],
        sub = ["status"],
        strategy = strategy::Services
    ),
    resource!(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        core::v1::Endpoints,
        short = ["ep"],
        cat = [],
        sub = [],
        strategy = strategy::Endpoints
    ),
    resource!(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        core::v1::ConfigMap,
        short = ["cm"],
        cat = [],
        sub = [],
        strategy = strategy::ConfigMaps
    ),
    resource!(
        "",
        "v1",
        "Secret",
        "secrets",
        "secret",
        true,
        core::v1::Secret,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::Secrets
    ),
    resource!(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        core::v1::ServiceAccount,
        short = ["sa"],
        cat = [],
        sub = [],
        strategy = strategy::ServiceAccounts
    ),
    resource!(
        "",
        "v1",
        "Event",
        "events",
        "event",
        true,
        core::v1::Event,
        short = ["ev"],
        cat = [],
        sub = [],
        strategy = strategy::Events
    ),
    resource!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        apps::v1::Deployment,
        short = ["deploy"],
        cat = ["all"],
        sub = ["status", "scale"],
        strategy = strategy::Deployments
    ),
    resource!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        apps::v1::ReplicaSet,
        short = ["rs"],
        cat = ["all"],
        sub = ["status", "scale"],
        strategy = strategy::ReplicaSets
    ),
    resource!(
        "batch",
        "v1",
        "Job",
        "jobs",
        "job",
        true,
        batch::v1::Job,
        short = [],
        cat = ["all"],
        sub = ["status"],
        strategy = strategy::Jobs
    ),
    resource!(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        discovery::v1::EndpointSlice,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::EndpointSlices
    ),
    resource!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        coordination::v1::Lease,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::Leases
    ),
    resource!(
        "",
        "v1",
        "ReplicationController",
        "replicationcontrollers",
        "replicationcontroller",
        true,
        core::v1::ReplicationController,
        short = ["rc"],
        cat = ["all"],
        sub = ["status", "scale"],
        strategy = strategy::ReplicationControllers
    ),
    resource!(
        "",
        "v1",
        "PodTemplate",
        "podtemplates",
        "podtemplate",
        true,
        core::v1::PodTemplate,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::PodTemplates
    ),
    resource!(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        "controllerrevision",
        true,
        apps::v1::ControllerRevision,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::ControllerRevisions
    ),
    resource!(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        autoscaling::v2::HorizontalPodAutoscaler,
        short = ["hpa"],
        cat = ["all"],
        sub = ["status"],
        strategy = strategy::HorizontalPodAutoscalers
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        "ingress",
        true,
        networking::v1::Ingress,
        short = ["ing"],
        cat = [],
        sub = ["status"],
        strategy = strategy::Ingresses
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        "ingressclass",
        false,
        networking::v1::IngressClass,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::IngressClasses
    ),
    resource!(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        "networkpolicy",
        true,
        networking::v1::NetworkPolicy,
        short = ["netpol"],
        cat = [],
        sub = [],
        strategy = strategy::NetworkPolicies
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        "role",
        true,
        rbac::v1::Role,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::Roles
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        true,
        rbac::v1::RoleBinding,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::RoleBindings { cluster: false }
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        false,
        rbac::v1::ClusterRole,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::Roles
    ),
    resource!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        rbac::v1::ClusterRoleBinding,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::RoleBindings { cluster: true }
    ),
    resource!(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        "priorityclass",
        false,
        scheduling::v1::PriorityClass,
        short = ["pc"],
        cat = [],
        sub = [],
        strategy = strategy::PriorityClasses
    ),
    resource!(
        "certificates.k8s.io",
        "v1",
        "CertificateSigningRequest",
        "certificatesigningrequests",
        "certificatesigningrequest",
        false,
        certificates::v1::CertificateSigningRequest,
        short = ["csr"],
        cat = [],
        sub = ["status"],
        strategy = strategy::CertificateSigningRequests
    ),
];

/// The API groups, in discovery order, with their versions.
pub fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&r.group) {
            out.push(r.group);
        }
    }
    out
}

/// The versions a group serves, the preferred one first.
pub fn versions_of(group: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !out.contains(&r.version) {
            out.push(r.version);
        }
    }
    out
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn in_group_version<'a>(
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static Resource> + 'a {
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

pub fn by_kind(kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.kind == kind)
}
