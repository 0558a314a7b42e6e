//! Node selector terms, taints and tolerations, evaluated as Kubernetes evaluates them.
//! Label selectors are kube-core's `Selector`; node affinity adds what it lacks: `Gt` and
//! `Lt`, and `matchFields`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration,
};

type Labels = BTreeMap<String, String>;

fn requirement(key: &str, op: &str, values: &[String], labels: &Labels) -> bool {
    let v = labels.get(key);
    match op {
        "In" => v.is_some_and(|v| values.contains(v)),
        "NotIn" => v.is_none_or(|v| !values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        // Node affinity's numeric comparisons: one value, compared as integers.
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (v, values.first()) else {
                return false;
            };
            match (v.parse::<i64>(), bound.parse::<i64>()) {
                (Ok(v), Ok(b)) if op == "Gt" => v > b,
                (Ok(v), Ok(b)) => v < b,
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether a node matches one node selector term (all its requirements).
pub fn matches_term(term: &NodeSelectorTerm, node: &Node) -> bool {
    let empty = Labels::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let exprs = term.match_expressions.iter().flatten();
    let fields = term.match_fields.iter().flatten();
    let name = node.metadata.name.clone().unwrap_or_default();
    let by_fields = fields.clone().all(|f: &NodeSelectorRequirement| {
        let map = Labels::from([("metadata.name".to_string(), name.clone())]);
        requirement(
            &f.key,
            &f.operator,
            f.values.as_deref().unwrap_or(&[]),
            &map,
        )
    });
    // A term with no requirements matches nothing, as in Kubernetes.
    let any = exprs.clone().next().is_some() || fields.clone().next().is_some();
    any && by_fields
        && exprs.into_iter().all(|e| {
            requirement(
                &e.key,
                &e.operator,
                e.values.as_deref().unwrap_or(&[]),
                labels,
            )
        })
}

/// Whether one of `tolerations` tolerates `taint`.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_terms_and_tolerations() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"zone": "a", "cores": "8"}}
        }))
        .unwrap();
        let term: NodeSelectorTerm = serde_json::from_value(json!({
            "matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}],
            "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]
        }))
        .unwrap();
        assert!(matches_term(&term, &node));
        assert!(!matches_term(&NodeSelectorTerm::default(), &node));
        let taint: Taint = serde_json::from_value(
            json!({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}),
        )
        .unwrap();
        let exists: Toleration = serde_json::from_value(
            json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists"}),
        )
        .unwrap();
        let other: Toleration =
            serde_json::from_value(json!({"key": "x", "operator": "Exists"})).unwrap();
        assert!(tolerates(&[exists], &taint));
        assert!(!tolerates(&[other], &taint));
        let all: Toleration = serde_json::from_value(json!({"operator": "Exists"})).unwrap();
        assert!(tolerates(&[all], &taint));
    }
}
