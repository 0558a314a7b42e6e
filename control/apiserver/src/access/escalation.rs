//! The escalation check on roles and bindings, as Kubernetes' RBAC storage makes it:
//! nobody grants a permission they do not hold.
//!
//! - Writing a Role or ClusterRole needs every rule it has to be held already (in the
//!   namespace, or cluster-wide for a ClusterRole), or the `escalate` verb on it. A
//!   ClusterRole with an aggregationRule may gather anything, so it needs everything.
//! - Writing a binding needs every rule of the role it references to be held already,
//!   or the `bind` verb on that role.
//!
//! A write that changes neither the rules nor the grant (labels, finalizers, owner
//! references: what the garbage collector writes) is not checked.

use baton_auth::rbac::{self, covers};
use baton_auth::UserInfo;
use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef};
use serde_json::Value;

use super::attributes;
use crate::error::{ApiError, ApiResult};
use crate::objects::Objects;
use crate::table::s;

const GROUP: &str = "rbac.authorization.k8s.io";

fn rules(obj: &Value) -> Vec<PolicyRule> {
    obj.get("rules")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .unwrap_or_default()
}

fn refused(plural: &str, name: &str, user: &UserInfo, missing: &[PolicyRule]) -> ApiError {
    let listed: Vec<String> = missing.iter().map(rbac::describe).collect();
    ApiError::Forbidden {
        message: format!(
            "{plural}.{GROUP} {name:?} is forbidden: user {:?} (groups={:?}) is attempting to grant RBAC permissions not currently held:\n{}",
            user.name,
            user.groups,
            listed.join("\n")
        ),
    }
}

/// Checks a write of a Role (`namespace` set) or ClusterRole.
pub async fn role(
    objects: &Objects,
    user: &UserInfo,
    namespace: &str,
    obj: &Value,
    old: Option<&Value>,
) -> ApiResult<()> {
    let plural = if namespace.is_empty() {
        "clusterroles"
    } else {
        "roles"
    };
    let aggregation = obj.get("aggregationRule").filter(|a| !a.is_null());
    if let Some(old) = old {
        if rules(old) == rules(obj) && old.get("aggregationRule") == obj.get("aggregationRule") {
            return Ok(());
        }
    }
    if user.is_superuser() {
        return Ok(());
    }
    let name = s(obj, "/metadata/name");
    let escalate = attributes(user, "escalate", GROUP, plural, namespace, name);
    if objects.access.authorize(objects, &escalate).await.allowed() {
        return Ok(());
    }
    let wanted = if aggregation.is_some() {
        // An aggregated role may come to hold anything.
        vec![
            PolicyRule {
                api_groups: Some(vec!["*".into()]),
                resources: Some(vec!["*".into()]),
                verbs: vec!["*".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                non_resource_urls: Some(vec!["*".into()]),
                verbs: vec!["*".into()],
                ..PolicyRule::default()
            },
        ]
    } else {
        rules(obj)
    };
    let held = objects.access.with_policy(|p| p.rules_for(user, namespace));
    covers(&held, &wanted).map_err(|missing| refused(plural, name, user, &missing))
}

/// Checks a write of a RoleBinding (`namespace` set) or ClusterRoleBinding.
pub async fn binding(
    objects: &Objects,
    user: &UserInfo,
    namespace: &str,
    obj: &Value,
    old: Option<&Value>,
) -> ApiResult<()> {
    if let Some(old) = old {
        if old.get("roleRef") == obj.get("roleRef") && old.get("subjects") == obj.get("subjects") {
            return Ok(());
        }
    }
    if user.is_superuser() {
        return Ok(());
    }
    let plural = if namespace.is_empty() {
        "clusterrolebindings"
    } else {
        "rolebindings"
    };
    let name = s(obj, "/metadata/name");
    let role_ref: RoleRef = obj
        .get("roleRef")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .ok_or_else(|| ApiError::bad_request("roleRef is required"))?;
    let role_plural = if role_ref.kind == "Role" {
        "roles"
    } else {
        "clusterroles"
    };
    let bind = attributes(user, "bind", GROUP, role_plural, namespace, &role_ref.name);
    if objects.access.authorize(objects, &bind).await.allowed() {
        return Ok(());
    }
    let Some(granted) = objects.access.with_policy(|p| {
        p.role_rules(&role_ref, namespace)
            .map(<[PolicyRule]>::to_vec)
    }) else {
        return Err(ApiError::Forbidden {
            message: format!(
                "{plural}.{GROUP} {name:?} is forbidden: user {:?} cannot bind {} {:?}, which does not exist, without the bind permission on it",
                user.name, role_ref.kind, role_ref.name
            ),
        });
    };
    let held = objects.access.with_policy(|p| p.rules_for(user, namespace));
    covers(&held, &granted).map_err(|missing| refused(plural, name, user, &missing))
}
