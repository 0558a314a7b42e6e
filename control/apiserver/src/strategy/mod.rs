//! What each kind does differently from a plain object: the registry's strategies.
//!
//! kube-apiserver gives every resource a strategy (defaults, validation, what an update
//! may change, how a deletion proceeds, how it prints). Baton does the same. The REST
//! handlers in [`crate::rest`] do what every resource does, and ask the resource's
//! [`Strategy`] wherever kinds differ; no handler asks which kind it serves. A resource is
//! an entry in [`crate::resources`] with its strategy; a kind that behaves like a plain
//! object uses [`Plain`].

mod admission;
mod core;
mod events;
mod metrics;
mod networking;
mod platform;
mod pod;
mod quota;
mod rbac;
mod reviews;
pub(crate) mod service;
mod sets;
mod storage;
mod workloads;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use baton_auth::UserInfo;
use serde_json::{json, Value};

use crate::error::{ApiResult, FieldError};
use crate::objects::Objects;
use crate::selectors::LabelSelector;
use crate::table;
use crate::validation;

pub use self::core::{
    ConfigMaps, EndpointSlices, Endpoints, Events, Leases, Namespaces, Nodes, Secrets,
    ServiceAccounts,
};
pub use admission::{
    MutatingAdmissionPolicies, MutatingAdmissionPolicyBindings, ValidatingAdmissionPolicies,
    ValidatingAdmissionPolicyBindings, WebhookConfigurations,
};
pub use events::EventsV1;
pub use metrics::{NodeMetricses, PodCustomMetrics, PodMetricses};
pub use networking::{IngressClasses, Ingresses, NetworkPolicies};
pub use platform::{
    CertificateSigningRequests, ControllerRevisions, HorizontalPodAutoscalers,
    HorizontalPodAutoscalersV1, PodDisruptionBudgets, PodTemplates, PriorityClasses,
};
pub use pod::Pods;
pub use quota::{LimitRanges, ResourceQuotas};
pub use rbac::{RoleBindings, Roles};
pub use reviews::{
    SelfSubjectAccessReviews, SelfSubjectReviews, SelfSubjectRulesReviews, SubjectAccessReviews,
    TokenReviews,
};
pub use service::Services;
pub use sets::{CronJobs, DaemonSets, StatefulSets};
pub use storage::{PersistentVolumeClaims, PersistentVolumes, StorageClasses};
pub use workloads::{Deployments, Jobs, ReplicaSets, ReplicationControllers};

/// A hook's future: it may read and write the store.
pub type Hook<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The rule a kind's names follow.
pub type NameRule = fn(&str) -> Result<(), String>;

/// How a column's cell is made from an object.
#[derive(Debug, Clone)]
pub enum Cell {
    /// A built-in kind's code.
    Fn(fn(&Value) -> Value),
    /// A CRD's `additionalPrinterColumns[].jsonPath`.
    Path(crate::jsonpath::JsonPath),
}

/// One printer column and how its cell is made, kept together so they cannot drift apart.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: Cow<'static, str>,
    /// `string`, `integer`, `date`…
    pub type_: Cow<'static, str>,
    /// `name` for the Name column; a CRD column's own format otherwise.
    pub format: Cow<'static, str>,
    pub description: Cow<'static, str>,
    /// 0: always shown; 1: shown with `-o wide`.
    pub priority: i32,
    pub cell: Cell,
}

impl Column {
    pub const fn new(
        name: &'static str,
        type_: &'static str,
        priority: i32,
        cell: fn(&Value) -> Value,
    ) -> Self {
        Self {
            name: Cow::Borrowed(name),
            type_: Cow::Borrowed(type_),
            format: Cow::Borrowed(""),
            description: Cow::Borrowed(""),
            priority,
            cell: Cell::Fn(cell),
        }
    }

    /// Its definition in a Table.
    pub fn definition(&self) -> Value {
        let format = if self.name == "Name" {
            "name"
        } else {
            &self.format
        };
        json!({"name": self.name, "type": self.type_, "format": format, "description": self.description, "priority": self.priority})
    }

    /// Its cell for one object.
    pub fn cell(&self, obj: &Value) -> Value {
        match &self.cell {
            Cell::Fn(f) => f(obj),
            Cell::Path(p) => p.cell(obj, &self.type_),
        }
    }
}

/// The object's name cell.
pub fn name(o: &Value) -> Value {
    json!(table::s(o, "/metadata/name"))
}

/// The object's age cell.
pub fn age(o: &Value) -> Value {
    table::age(o)
}

/// What a kind without columns of its own prints.
pub static NAME_AGE: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Age", "string", 0, age),
];

/// A value from a shared range that a new object takes, as a store key that must not
/// exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    /// Where the value is in the object, and the value, for the error if it is taken.
    pub field: &'static str,
    pub value: String,
    /// The object asked for this value; otherwise it was picked, and another pick may do.
    pub requested: bool,
    /// Why a requested value cannot be had: `provided IP is already allocated`.
    pub taken: &'static str,
}

/// Where a kind keeps what its scale subresource reads and writes (JSON pointers).
#[derive(Debug, Clone)]
pub struct ScalePaths {
    pub spec_replicas: Cow<'static, str>,
    pub status_replicas: Cow<'static, str>,
    pub selector: SelectorAt,
}

/// Where a kind keeps the selector its Scale reports.
#[derive(Debug, Clone)]
pub enum SelectorAt {
    /// `spec.selector`: a label selector, or a ReplicationController's plain map.
    Spec,
    /// A label selector already written as a string (a CRD's `labelSelectorPath`).
    String(String),
    None,
}

impl Default for ScalePaths {
    fn default() -> Self {
        Self {
            spec_replicas: Cow::Borrowed("/spec/replicas"),
            status_replicas: Cow::Borrowed("/status/replicas"),
            selector: SelectorAt::Spec,
        }
    }
}

/// How a deletion proceeds once no finalizer holds the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Removed now.
    Immediate,
    /// Marked with a deletion timestamp this many seconds ahead; whoever runs the object
    /// (a pod's node) finishes the deletion.
    Graceful(i64),
    /// Marked and shown as terminating while a controller empties it (a namespace).
    Terminating,
}

/// Every verb a stored kind serves.
pub const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Where a kind holds a pod spec (see [`Strategy::pod_spec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSpecAt {
    /// A pod: its `spec`.
    Pod,
    /// A workload: the pod template's spec at this JSON pointer.
    Template(&'static str),
}

/// What a kind does differently. Every method's default is what a plain object does.
pub trait Strategy: Send + Sync + std::fmt::Debug {
    /// The verbs the kind serves (discovery lists them; others get 405).
    fn verbs(&self) -> &'static [&'static str] {
        ALL_VERBS
    }

    /// For a kind that is a question rather than an object (the access and token
    /// reviews): the answer to a create by `user`, which is never stored. Any other kind
    /// gives the body back, to be stored.
    fn answer<'a>(
        &'a self,
        _objects: &'a Objects,
        _user: &'a UserInfo,
        _namespace: Option<&'a str>,
        body: Value,
    ) -> Result<Hook<'a, ApiResult<Value>>, Value> {
        Err(body)
    }

    /// For a kind that is measured rather than stored (metrics.k8s.io): what a get
    /// (`name`: one item, or NotFound) or a list finds, read from where it is measured.
    /// Such a kind has nothing in the store.
    fn measure<'a>(
        &'a self,
        _objects: &'a Objects,
        _namespace: Option<&'a str>,
        _name: Option<&'a str>,
        _labels: &'a LabelSelector,
    ) -> Option<Hook<'a, ApiResult<Vec<Value>>>> {
        None
    }

    /// For a kind whose subresources are measured metrics (custom.metrics.k8s.io): their
    /// names, each served by a `get` only.
    fn metrics(&self) -> &'static [&'static str] {
        &[]
    }

    /// The MetricValueList a get of subresource `metric` finds: for the object `name`, or
    /// for those `labels` picks when the name is `*`.
    fn metric<'a>(
        &'a self,
        _objects: &'a Objects,
        _namespace: Option<&'a str>,
        _name: &'a str,
        _metric: &'a str,
        _labels: &'a LabelSelector,
    ) -> Option<Hook<'a, ApiResult<Value>>> {
        None
    }

    /// Mutating admission of a new object that reads other objects (the ServiceAccount
    /// plugin on pods), after defaults and before validation.
    fn mutate<'a>(&'a self, _objects: &'a Objects, _obj: &'a mut Value) -> Hook<'a, ApiResult<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Where the kind holds a pod spec, for PodSecurity admission: a pod's own (checked
    /// and refused) or a workload's template (warned about only).
    fn pod_spec(&self) -> Option<PodSpecAt> {
        None
    }

    /// Checks of a write that depend on who writes (the RBAC escalation check), after
    /// validation; `old` is the stored object on update.
    fn admit<'a>(
        &'a self,
        _objects: &'a Objects,
        _user: &'a UserInfo,
        _obj: &'a Value,
        _old: Option<&'a Value>,
    ) -> Hook<'a, ApiResult<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether lists and watches of the kind are served from a watch cache. Events are
    /// not, as kube-apiserver keeps none for them (`DefaultWatchCacheSizes`): hundreds
    /// are written a second at scale and few are ever read, so a cache would hold every
    /// one of them in memory for the sake of an occasional `kubectl get events`.
    fn watch_cached(&self) -> bool {
        true
    }

    /// The rule `metadata.name` follows.
    fn name_rule(&self) -> NameRule {
        validation::dns1123_subdomain
    }

    /// Fields besides `metadata.name` and `metadata.namespace` a field selector may name.
    fn field_selectable(&self, _field: &str) -> bool {
        false
    }

    /// The kind's own rules, beyond metadata.
    fn validate(&self, _obj: &Value, _errs: &mut Vec<FieldError>) {}

    /// Rules on what an update may change (fields that are immutable once set).
    fn validate_update(&self, _old: &Value, _new: &Value, _errs: &mut Vec<FieldError>) {}

    /// Everything a write is checked against: the kind's rules, and on update (`old`) the
    /// update rules. A kind whose rules themselves depend on the old object (a CRD's
    /// transition rules, ratcheting) takes over the whole check here.
    fn validate_write(&self, obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
        self.validate(obj, errs);
        if let Some(old) = old {
            self.validate_update(old, obj, errs);
        }
    }

    /// Whether a new object may be created at all (a kind whose CRD is being deleted may
    /// not); the answer's error is the request's.
    fn admit_create(&self, _obj: &Value) -> ApiResult<()> {
        Ok(())
    }

    /// Defaults and initial status of a new object, before it is validated.
    fn prepare_create(&self, _obj: &mut Value) {}

    /// Records who creates the object, where the kind keeps that (a
    /// CertificateSigningRequest's requester), after [`Strategy::prepare_create`].
    fn prepare_create_by(&self, _user: &UserInfo, _obj: &mut Value) {}

    /// Whether [`Strategy::claims`] picks values (rather than only checking those asked
    /// for): a create whose pick was taken meanwhile then picks again, from a copy of
    /// the object as it came.
    fn picks_claims(&self) -> bool {
        false
    }

    /// What a new object takes from shared ranges (a Service's address and node ports):
    /// it picks values that look free, writes them into the object, and returns them as
    /// claims, which the create writes in the same store transaction as the object. So
    /// a value is never held without its object, even if the server dies in between.
    fn claims<'a>(
        &'a self,
        _objects: &'a Objects,
        _obj: &'a mut Value,
    ) -> Hook<'a, ApiResult<Vec<Claim>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The claim keys an object holds: deleted in the same transaction as the object.
    fn held(&self, _obj: &Value) -> Vec<String> {
        Vec::new()
    }

    /// Keeps what an update may not change, and normalizes what every write normalizes.
    fn prepare_update(&self, _old: &Value, _new: &mut Value) {}

    /// Defaults of a `/status` write, after the new status replaced the old (what the
    /// status writer may not change, it gets back).
    fn prepare_status_update(&self, _old: &Value, _new: &mut Value) {}

    /// Checks of an `/approval` write, after the new conditions replaced the old.
    fn prepare_approval_update(&self, _old: &Value, _new: &mut Value) -> ApiResult<()> {
        Ok(())
    }

    /// How the deletion of `obj` proceeds; `grace` is what the request asked for. For an
    /// object already marked, a grace period shorter than the one it has shortens it; a
    /// longer one changes nothing.
    fn deletion(&self, _obj: &Value, _grace: Option<i64>) -> Deletion {
        Deletion::Immediate
    }

    /// Whether a marked object whose metadata finalizers are all gone has nothing else
    /// left to wait for (a namespace also waits for its `spec.finalizers`), so that the
    /// update that took the last one away removes it.
    fn finalized(&self, _obj: &Value) -> bool {
        true
    }

    /// Where the scale subresource reads and writes replicas and the selector.
    fn scale_paths(&self) -> ScalePaths {
        ScalePaths::default()
    }

    /// Whether strategic merge patches apply: they need the merge keys of a built-in
    /// type, so custom resources refuse them with 415, as kube-apiserver does (kubectl
    /// then sends a merge patch).
    fn strategic_merge(&self) -> bool {
        true
    }

    /// Rewrites an object read from the store into this resource's form, for a resource
    /// that serves another group's stored objects (events.k8s.io/v1 Events are core/v1
    /// Events).
    fn stored_to_served(&self, _obj: &mut Value) {}

    /// Rewrites an object of this resource into the form it is stored in.
    fn served_to_stored(&self, _obj: &mut Value) {}

    /// The columns `kubectl get` shows.
    fn columns(&self) -> &[Column] {
        NAME_AGE
    }
}

/// A kind with no behaviour of its own.
#[derive(Debug)]
pub struct Plain;

impl Strategy for Plain {}

#[cfg(test)]
mod tests {
    #[test]
    fn every_resource_prints_its_name_first_but_events() {
        for r in crate::resources::BUILTIN.iter() {
            let first = &r.strategy.columns()[0].name;
            let want = if r.kind == "Event" {
                "Last Seen"
            } else {
                "Name"
            };
            assert_eq!(first, want, "{}", r.kind);
        }
    }
}
