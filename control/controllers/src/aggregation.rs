//! The ClusterRole aggregation controller: a ClusterRole with an `aggregationRule` holds
//! the rules of every ClusterRole its selectors match, so that installing a CRD with a
//! role labelled `rbac.authorization.k8s.io/aggregate-to-edit: "true"` extends `edit`
//! (and `admin`, which aggregates `edit`'s sources) without touching them.
//!
//! Any ClusterRole change looks at every aggregating role: there are few, and a label
//! change anywhere may add or remove rules from any of them.

use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::{Patch, PatchParams};
use kube::core::SelectorExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use crate::Ctx;

/// Why an aggregated role could not be written (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("writing the aggregated rules of ClusterRole {name}")]
pub struct Error {
    name: String,
    #[source]
    source: kube::Error,
}

/// The rules `role` aggregates from `all`, in name order without repeats; None if it
/// aggregates nothing.
pub fn aggregated_rules(role: &ClusterRole, all: &[Arc<ClusterRole>]) -> Option<Vec<PolicyRule>> {
    let selectors = role
        .aggregation_rule
        .as_ref()?
        .cluster_role_selectors
        .as_ref()?;
    let selectors: Vec<kube::core::Selector> = selectors
        .iter()
        .filter_map(|s| kube::core::Selector::try_from(s.clone()).ok())
        .collect();
    let mut sources: Vec<&Arc<ClusterRole>> = all
        .iter()
        .filter(|r| r.name_any() != role.name_any())
        .filter(|r| selectors.iter().any(|s| s.matches(r.labels())))
        .collect();
    sources.sort_by_key(|r| r.name_any());
    let mut rules: Vec<PolicyRule> = Vec::new();
    for rule in sources.iter().flat_map(|r| r.rules.iter().flatten()) {
        if !rules.contains(rule) {
            rules.push(rule.clone());
        }
    }
    Some(rules)
}

/// Every aggregating ClusterRole, for a change to any ClusterRole.
pub fn aggregating(ctx: &Ctx) -> Vec<ObjectRef<ClusterRole>> {
    ctx.clusterroles
        .state()
        .iter()
        .filter(|r| r.aggregation_rule.is_some())
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

pub async fn reconcile(role: Arc<ClusterRole>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(rules) = aggregated_rules(&role, &ctx.clusterroles.state()) else {
        return Ok(Action::await_change());
    };
    if role.rules.as_deref().unwrap_or_default() == rules.as_slice() {
        return Ok(Action::await_change());
    }
    let name = role.name_any();
    let api: Api<ClusterRole> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({"rules": rules});
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
        Err(source) => Err(Error { name, source }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn role(v: serde_json::Value) -> Arc<ClusterRole> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn an_aggregating_role_gathers_the_rules_of_the_roles_it_selects() {
        let pods = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]});
        let widgets =
            json!({"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["*"]});
        let all = vec![
            role(
                json!({"metadata": {"name": "edit"}, "aggregationRule": {"clusterRoleSelectors": [
                {"matchLabels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"}}]}}),
            ),
            role(
                json!({"metadata": {"name": "b-widgets", "labels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"}},
                        "rules": [widgets]}),
            ),
            role(
                json!({"metadata": {"name": "a-pods", "labels": {"rbac.authorization.k8s.io/aggregate-to-edit": "true"}},
                        "rules": [pods, pods]}),
            ),
            role(json!({"metadata": {"name": "other"}, "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]})),
        ];
        let got = aggregated_rules(&all[0], &all).unwrap();
        let want: Vec<PolicyRule> = serde_json::from_value(json!([pods, widgets])).unwrap();
        assert_eq!(got, want);
        assert!(aggregated_rules(&all[3], &all).is_none());
    }
}
