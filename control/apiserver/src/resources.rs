//! The resources this API server serves: names, scope, verbs, subresources, and the
//! Kubernetes type each one (de)serializes through.

use std::sync::{Arc, LazyLock, RwLock};

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
    // From the borrowed tree: no copy of the body before it is typed.
    let typed = T::deserialize(v)?;
    serde_json::to_value(typed)
}

/// What a resource's bodies are made of.
#[derive(Clone)]
pub enum Body {
    /// A built-in kind: its k8s-openapi type.
    Typed { check: TypeCheck, schema: SchemaOf },
    /// A custom kind: the structural schema of its CRD version (`openAPIV3Schema`).
    Schema(Arc<Value>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Typed { .. } => f.write_str("Typed"),
            Body::Schema(_) => f.write_str("Schema"),
        }
    }
}

/// One served resource: a plural name in one group-version.
#[derive(Debug)]
pub struct Resource {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub subresources: Vec<String>,
    /// The version objects are stored as (the CRD's storage version); every version of a
    /// resource shares its store keys, and reads present objects as the version asked.
    pub storage_version: String,
    /// The group objects are stored under and as: the resource's own, but for a resource
    /// that is another group's objects in another form (events.k8s.io Events are core
    /// Events); its strategy converts between the forms.
    pub storage_group: String,
    /// The uid and generation of the CRD that defined it ("" for built-ins): it names
    /// the OpenAPI document's content for clients' caches.
    pub definition_id: String,
    pub body: Body,
    /// What the kind does differently from a plain object.
    pub strategy: Arc<dyn Strategy>,
}

impl Resource {
    pub fn api_version(&self) -> String {
        gv(&self.group, &self.version)
    }

    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    pub fn has_sub(&self, sub: &str) -> bool {
        self.subresources.iter().any(|s| s == sub)
    }

    pub fn has_status(&self) -> bool {
        self.has_sub("status")
    }

    /// `plural.group`, or `plural` in the core group: how errors name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Store prefix of all objects of this resource.
    pub fn key_prefix(&self) -> String {
        let g = if self.storage_group.is_empty() {
            "core"
        } else {
            &self.storage_group
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
        self.strategy.verbs()
    }

    /// The apiVersion objects are stored with.
    pub fn stored_api_version(&self) -> String {
        gv(&self.storage_group, &self.storage_version)
    }

    /// Whether objects are stored in another form than this resource shows.
    pub fn converts(&self) -> bool {
        self.version != self.storage_version || self.group != self.storage_group
    }

    /// Checks a body against the resource's type and returns its typed form, with the
    /// fields the type does not know (which it dropped).
    pub fn decode(&self, v: &Value) -> Result<(Value, Vec<String>), String> {
        match &self.body {
            Body::Typed { check, .. } => {
                let typed = check(v).map_err(|e| e.to_string())?;
                let unknown = crate::validation::unknown_fields(v, &typed);
                Ok((typed, unknown))
            }
            Body::Schema(schema) => {
                let mut out = v.clone();
                let unknown = crate::crd::schema::prune(schema, &mut out);
                crate::crd::schema::apply_defaults(schema, &mut out);
                Ok((out, unknown))
            }
        }
    }
}

fn gv(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

macro_rules! resource {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $ty:ty,
     short = [$($short:expr),*], cat = [$($cat:expr),*], sub = [$($sub:expr),*],
     strategy = $strategy:expr) => {
        resource!($group, $version, $kind, $plural, $singular, $ns, $ty,
            short = [$($short),*], cat = [$($cat),*], sub = [$($sub),*],
            strategy = $strategy, stored_in = ($group, $version))
    };
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $ty:ty,
     short = [$($short:expr),*], cat = [$($cat:expr),*], sub = [$($sub:expr),*],
     strategy = $strategy:expr, stored_in = ($sgroup:expr, $sversion:expr)) => {
        Arc::new(Resource {
            group: $group.into(),
            version: $version.into(),
            kind: $kind.into(),
            plural: $plural.into(),
            singular: $singular.into(),
            namespaced: $ns,
            short_names: vec![$($short.into()),*],
            categories: vec![$($cat.into()),*],
            subresources: vec![$($sub.into()),*],
            storage_version: $sversion.into(),
            storage_group: $sgroup.into(),
            definition_id: String::new(),
            body: Body::Typed { check: roundtrip::<$ty>, schema: schema_of::<$ty> },
            strategy: Arc::new($strategy),
        })
    };
}

use k8s_openapi::api::{
    admissionregistration, apps, authentication, authorization, autoscaling, batch, certificates,
    coordination, core, discovery, networking, rbac, scheduling,
};

/// The built-in resources, in discovery order.
pub static BUILTIN: LazyLock<Vec<Arc<Resource>>> = LazyLock::new(|| {
    vec![
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
        sub = [
            "status",
            "log",
            "exec",
            "attach",
            "portforward",
            "ephemeralcontainers",
            "binding",
            "eviction"
        ],
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
        sub = ["token"],
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
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        "event",
        true,
        k8s_openapi::api::events::v1::Event,
        short = ["ev"],
        cat = [],
        sub = [],
        strategy = strategy::EventsV1,
        stored_in = ("", "v1")
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
        "autoscaling",
        "v1",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        autoscaling::v1::HorizontalPodAutoscaler,
        short = ["hpa"],
        cat = [],
        sub = ["status"],
        strategy = strategy::HorizontalPodAutoscalersV1,
        stored_in = ("autoscaling", "v2")
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
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "validatingadmissionpolicy",
        false,
        admissionregistration::v1::ValidatingAdmissionPolicy,
        short = [],
        cat = ["api-extensions"],
        sub = ["status"],
        strategy = strategy::ValidatingAdmissionPolicies
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicybinding",
        false,
        admissionregistration::v1::ValidatingAdmissionPolicyBinding,
        short = [],
        cat = ["api-extensions"],
        sub = [],
        strategy = strategy::ValidatingAdmissionPolicyBindings
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1alpha1",
        "MutatingAdmissionPolicy",
        "mutatingadmissionpolicies",
        "mutatingadmissionpolicy",
        false,
        admissionregistration::v1alpha1::MutatingAdmissionPolicy,
        short = [],
        cat = ["api-extensions"],
        sub = [],
        strategy = strategy::MutatingAdmissionPolicies
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1alpha1",
        "MutatingAdmissionPolicyBinding",
        "mutatingadmissionpolicybindings",
        "mutatingadmissionpolicybinding",
        false,
        admissionregistration::v1alpha1::MutatingAdmissionPolicyBinding,
        short = [],
        cat = ["api-extensions"],
        sub = [],
        strategy = strategy::MutatingAdmissionPolicyBindings
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        "mutatingwebhookconfiguration",
        false,
        admissionregistration::v1::MutatingWebhookConfiguration,
        short = [],
        cat = ["api-extensions"],
        sub = [],
        strategy = strategy::WebhookConfigurations
    ),
    resource!(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        "validatingwebhookconfiguration",
        false,
        admissionregistration::v1::ValidatingWebhookConfiguration,
        short = [],
        cat = ["api-extensions"],
        sub = [],
        strategy = strategy::WebhookConfigurations
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        false,
        authorization::v1::SelfSubjectAccessReview,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::SelfSubjectAccessReviews
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview",
        false,
        authorization::v1::SelfSubjectRulesReview,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::SelfSubjectRulesReviews
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        "subjectaccessreview",
        false,
        authorization::v1::SubjectAccessReview,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::SubjectAccessReviews
    ),
    resource!(
        "authorization.k8s.io",
        "v1",
        "LocalSubjectAccessReview",
        "localsubjectaccessreviews",
        "localsubjectaccessreview",
        true,
        authorization::v1::LocalSubjectAccessReview,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::SubjectAccessReviews
    ),
    resource!(
        "authentication.k8s.io",
        "v1",
        "SelfSubjectReview",
        "selfsubjectreviews",
        "selfsubjectreview",
        false,
        authentication::v1::SelfSubjectReview,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::SelfSubjectReviews
    ),
    resource!(
        "authentication.k8s.io",
        "v1",
        "TokenReview",
        "tokenreviews",
        "tokenreview",
        false,
        authentication::v1::TokenReview,
        short = [],
        cat = [],
        sub = [],
        strategy = strategy::TokenReviews
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
        sub = ["status", "approval"],
        strategy = strategy::CertificateSigningRequests
    ),
    resource!(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        k8s_openapi::api::policy::v1::PodDisruptionBudget,
        short = ["pdb"],
        cat = [],
        sub = ["status"],
        strategy = strategy::PodDisruptionBudgets
    ),
    resource!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        apps::v1::DaemonSet,
        short = ["ds"],
        cat = ["all"],
        sub = ["status"],
        strategy = strategy::DaemonSets
    ),
    resource!(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        apps::v1::StatefulSet,
        short = ["sts"],
        cat = ["all"],
        sub = ["status", "scale"],
        strategy = strategy::StatefulSets
    ),
    resource!(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        "cronjob",
        true,
        batch::v1::CronJob,
        short = ["cj"],
        cat = ["all"],
        sub = ["status"],
        strategy = strategy::CronJobs
    ),
    resource!(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        "storageclass",
        false,
        k8s_openapi::api::storage::v1::StorageClass,
        short = ["sc"],
        cat = [],
        sub = [],
        strategy = strategy::StorageClasses
    ),
    resource!(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        "persistentvolume",
        false,
        core::v1::PersistentVolume,
        short = ["pv"],
        cat = [],
        sub = ["status"],
        strategy = strategy::PersistentVolumes
    ),
    resource!(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        true,
        core::v1::PersistentVolumeClaim,
        short = ["pvc"],
        cat = [],
        sub = ["status"],
        strategy = strategy::PersistentVolumeClaims
    ),
    resource!(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        true,
        core::v1::ResourceQuota,
        short = ["quota"],
        cat = [],
        sub = ["status"],
        strategy = strategy::ResourceQuotas
    ),
    resource!(
        "",
        "v1",
        "LimitRange",
        "limitranges",
        "limitrange",
        true,
        core::v1::LimitRange,
        short = ["limits"],
        cat = [],
        sub = [],
        strategy = strategy::LimitRanges
    ),
    resource!(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        "customresourcedefinition",
        false,
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        short = ["crd", "crds"],
        cat = ["api-extensions"],
        sub = ["status"],
        strategy = crate::crd::Definitions
    ),
    measured("metrics.k8s.io/v1beta1", "NodeMetrics", "nodes", "nodemetrics", false, strategy::NodeMetricses),
    measured("metrics.k8s.io/v1beta1", "PodMetrics", "pods", "podmetrics", true, strategy::PodMetricses),
    measured("custom.metrics.k8s.io/v1beta2", "MetricValueList", "pods", "", true, strategy::PodCustomMetrics),
]
});

/// A metrics.k8s.io or custom.metrics.k8s.io kind: measured by the nodes, never stored
/// (see [`crate::metrics`]). A kind whose strategy serves metrics has them as its
/// subresources.
fn measured(
    group_version: &str,
    kind: &str,
    plural: &str,
    singular: &str,
    namespaced: bool,
    strategy: impl Strategy + 'static,
) -> Arc<Resource> {
    let (group, version) = group_version
        .split_once('/')
        .expect("a measured kind has a group");
    Arc::new(Resource {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: singular.into(),
        namespaced,
        short_names: vec![],
        categories: vec![],
        subresources: strategy.metrics().iter().map(|m| m.to_string()).collect(),
        storage_version: version.into(),
        storage_group: group.into(),
        definition_id: String::new(),
        body: Body::Schema(Arc::new(serde_json::json!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        }))),
        strategy: Arc::new(strategy),
    })
}

/// A built-in resource by kind.
pub fn builtin(kind: &str) -> &'static Arc<Resource> {
    BUILTIN
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("{kind} is a built-in kind"))
}

/// What is served at one moment: the built-in resources, then the custom ones.
#[derive(Clone, Debug)]
pub struct Served(Arc<Vec<Arc<Resource>>>);

impl Served {
    /// Whether this is the very snapshot `other` is (nothing was served or withdrawn
    /// between them).
    pub fn same(&self, other: &Served) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.0.iter()
    }

    /// The API groups, in discovery order.
    pub fn groups(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in self.all() {
            if !out.contains(&r.group.as_str()) {
                out.push(&r.group);
            }
        }
        out
    }

    /// The versions a group serves, the preferred one first (Kubernetes' version
    /// priority: GA before beta before alpha, higher numbers first).
    pub fn versions_of(&self, group: &str) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in self.all().filter(|r| r.group == group) {
            if !out.contains(&r.version.as_str()) {
                out.push(&r.version);
            }
        }
        out.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        out
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&Arc<Resource>> {
        self.all()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Resource>> + 'a {
        self.all()
            .filter(move |r| r.group == group && r.version == version)
    }
}

/// Orders versions as Kubernetes does: `v2` > `v1` > `v1beta2` > `v1beta1` > `v1alpha1`
/// > anything else (which sorts by name, after them).
fn version_priority(v: &str) -> (u8, u64, u64, std::cmp::Reverse<String>) {
    let parse = |s: &str| -> Option<(u64, u8, u64)> {
        let rest = s.strip_prefix('v')?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let major: u64 = rest[..digits].parse().ok()?;
        match &rest[digits..] {
            "" => Some((major, 3, 0)),
            tail => {
                let (level, n) = if let Some(n) = tail.strip_prefix("beta") {
                    (2, n)
                } else {
                    (1, tail.strip_prefix("alpha")?)
                };
                Some((major, level, n.parse().ok()?))
            }
        }
    };
    match parse(v) {
        Some((major, level, minor)) => (level, major, minor, std::cmp::Reverse(String::new())),
        None => (0, 0, 0, std::cmp::Reverse(v.to_string())),
    }
}

/// The resources served, which grow and shrink as CustomResourceDefinitions come and go.
/// Readers take a [`Served`] snapshot: one request sees one consistent table.
#[derive(Clone, Debug)]
pub struct Registry {
    current: Arc<RwLock<Served>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// The built-in resources only.
    pub fn new() -> Self {
        Self {
            current: Arc::new(RwLock::new(Served(Arc::new(BUILTIN.clone())))),
        }
    }

    pub fn snapshot(&self) -> Served {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves the built-in resources and these custom ones, from now on.
    pub fn set_custom(&self, custom: Vec<Arc<Resource>>) {
        let mut all = BUILTIN.clone();
        all.extend(custom);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Served(Arc::new(all));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_as_kubernetes_prefers_them() {
        let mut vs = vec!["v1alpha1", "foo", "v1beta1", "v2", "v1", "v1beta2", "v10"];
        vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(
            vs,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
