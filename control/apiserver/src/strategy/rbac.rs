//! rbac.authorization.k8s.io/v1: Roles, ClusterRoles and their bindings. Stored,
//! validated and held to the escalation check here; enforcing them is the authorizer's
//! job ([`crate::access`]).

use baton_auth::UserInfo;
use serde_json::{json, Value};

use super::{age, name, Column, Hook, Strategy};
use crate::access::escalation;
use crate::error::{ApiResult, FieldError};
use crate::objects::Objects;
use crate::table::{none_if_empty, s};

#[derive(Debug)]
pub struct Roles;
/// RoleBindings, or ClusterRoleBindings (`cluster`), which may name only ClusterRoles.
#[derive(Debug)]
pub struct RoleBindings {
    pub cluster: bool,
}

fn created_at(o: &Value) -> Value {
    json!(s(o, "/metadata/creationTimestamp"))
}

static ROLE_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Created At", "date", 0, created_at),
];

impl Strategy for Roles {
    fn columns(&self) -> &[Column] {
        ROLE_COLUMNS
    }

    fn admit<'a>(
        &'a self,
        objects: &'a Objects,
        user: &'a UserInfo,
        obj: &'a Value,
        old: Option<&'a Value>,
    ) -> Hook<'a, ApiResult<()>> {
        let ns = s(obj, "/metadata/namespace");
        Box::pin(escalation::role(objects, user, ns, obj, old))
    }
}

/// The subjects of one kind, comma-separated.
fn subjects(o: &Value, kind: &str) -> Value {
    let names: Vec<String> = o
        .get("subjects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|x| s(x, "/kind") == kind)
        .map(|x| match (kind, s(x, "/namespace")) {
            ("ServiceAccount", ns) if !ns.is_empty() => format!("{ns}/{}", s(x, "/name")),
            _ => s(x, "/name").to_string(),
        })
        .collect();
    json!(none_if_empty(names.join(", ")))
}

static BINDING_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Role", "string", 0, |o| {
        json!(format!(
            "{}/{}",
            s(o, "/roleRef/kind"),
            s(o, "/roleRef/name")
        ))
    }),
    Column::new("Age", "string", 0, age),
    Column::new("Users", "string", 1, |o| subjects(o, "User")),
    Column::new("Groups", "string", 1, |o| subjects(o, "Group")),
    Column::new("ServiceAccounts", "string", 1, |o| {
        subjects(o, "ServiceAccount")
    }),
];

impl Strategy for RoleBindings {
    fn admit<'a>(
        &'a self,
        objects: &'a Objects,
        user: &'a UserInfo,
        obj: &'a Value,
        old: Option<&'a Value>,
    ) -> Hook<'a, ApiResult<()>> {
        let ns = if self.cluster {
            ""
        } else {
            s(obj, "/metadata/namespace")
        };
        Box::pin(escalation::binding(objects, user, ns, obj, old))
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let kind = s(obj, "/roleRef/kind");
        let allowed: &[&str] = if self.cluster {
            &["ClusterRole"]
        } else {
            &["Role", "ClusterRole"]
        };
        if !allowed.contains(&kind) {
            let supported: Vec<String> = allowed.iter().map(|k| format!("{k:?}")).collect();
            errs.push(FieldError {
                field: "roleRef.kind".into(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {kind:?}: supported values: {}",
                    supported.join(", ")
                ),
            });
        }
        if s(obj, "/roleRef/name").is_empty() {
            errs.push(FieldError::required("roleRef.name"));
        }
        for (i, subject) in obj
            .get("subjects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if s(subject, "/name").is_empty() {
                errs.push(FieldError::required(format!("subjects[{i}].name")));
            }
            let kind = s(subject, "/kind");
            if !matches!(kind, "User" | "Group" | "ServiceAccount") {
                errs.push(FieldError {
                    field: format!("subjects[{i}].kind"),
                    reason: "FieldValueNotSupported",
                    message: format!("Unsupported value: {kind:?}: supported values: \"ServiceAccount\", \"User\", \"Group\""),
                });
            }
        }
    }

    /// A binding's role cannot change: a new role is a new binding.
    fn validate_update(&self, old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
        if old.get("roleRef") != new.get("roleRef") {
            errs.push(FieldError::invalid(
                "roleRef",
                &new.get("roleRef").map(Value::to_string).unwrap_or_default(),
                "cannot change roleRef",
            ));
        }
    }

    fn columns(&self) -> &[Column] {
        BINDING_COLUMNS
    }
}
