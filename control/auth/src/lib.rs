//! Access control's pure parts, kept apart from the API server so that they can be
//! tested (and reasoned about) without a store or a network:
//!
//! - [`UserInfo`]: who a request is, once authenticated (name, uid, groups);
//! - [`Attributes`]: what a request does, read from its method and path as
//!   kube-apiserver's `RequestInfoFactory` reads them (verb, namespace, API group,
//!   resource, subresource, name), or the non-resource path it asks for;
//! - [`rbac`]: Role, ClusterRole and their bindings, indexed for fast evaluation, with
//!   Kubernetes' matching rules (`*`, `*/subresource`, resourceNames, nonResourceURLs with
//!   a trailing `*`), the rules a user holds in a namespace (for SelfSubjectRulesReview),
//!   and the escalation check (a rule set covers another);
//! - [`node`]: the Node authorizer's decisions, given what the API server knows of which
//!   pods a node runs.
//!
//! The API server authenticates, builds the attributes, asks these, and answers 401 or
//! 403 in Kubernetes' words ([`Attributes::forbidden_message`]).

mod attributes;
pub mod node;
pub mod rbac;
mod user;

pub use attributes::Attributes;
pub use user::{UserInfo, ANONYMOUS, AUTHENTICATED, MASTERS, NODES, SERVICE_ACCOUNTS};

/// An authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the reason names what allowed it.
    Allow(String),
    /// Not allowed by this authorizer; another may still allow it.
    NoOpinion,
    /// Refused outright, whatever the others say; the reason says why.
    Deny(String),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}
