//! Which Ingresses are Baton's to serve: those of an IngressClass whose controller is
//! [`CONTROLLER`], by name or, when an Ingress names none, as the cluster's default
//! class. The nodes route them; the controller manager writes their status. The API
//! server makes the class `baton`, marked default, when a cluster starts.

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

/// The controller an IngressClass names for Baton's nodes.
pub const CONTROLLER: &str = "baton.dev/ingress-controller";
/// The IngressClass a cluster starts with.
pub const CLASS: &str = "baton";
/// The annotation marking the cluster's default IngressClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The Ingress annotation that named a class before `spec.ingressClassName`.
const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// Whether an Ingress is Baton's to serve, given the cluster's IngressClasses.
pub fn is_ours(ing: &Ingress, classes: &[IngressClass]) -> bool {
    let ours = |c: &IngressClass| {
        c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER)
    };
    let named = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.clone())
        .or_else(|| {
            ing.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION).cloned())
        });
    match named {
        Some(name) => classes
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some(name.as_str()) && ours(c)),
        None => classes.iter().any(|c| {
            ours(c)
                && c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .is_some_and(|v| v == "true")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_ingress_is_ours_by_class_name_annotation_or_default_class() {
        let class = |name: &str, controller: &str, default: bool| -> IngressClass {
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": if default {
                    json!({DEFAULT_CLASS_ANNOTATION: "true"}) } else { json!({}) }},
                "spec": {"controller": controller},
            }))
            .unwrap()
        };
        let ingress = |spec: serde_json::Value, annotations: serde_json::Value| -> Ingress {
            serde_json::from_value(json!({
                "metadata": {"name": "i", "namespace": "shop", "annotations": annotations},
                "spec": spec,
            }))
            .unwrap()
        };
        let classes = [
            class("baton", CONTROLLER, true),
            class("nginx", "k8s.io/ingress-nginx", false),
        ];
        let named = |n: &str| ingress(json!({"ingressClassName": n}), json!({}));
        assert!(is_ours(&named("baton"), &classes));
        assert!(!is_ours(&named("nginx"), &classes));
        assert!(!is_ours(&named("missing"), &classes));
        let unnamed = ingress(json!({}), json!({}));
        assert!(is_ours(&unnamed, &classes));
        // No default class of ours: not ours.
        assert!(!is_ours(&unnamed, &classes[1..]));
        let legacy = ingress(json!({}), json!({LEGACY_CLASS_ANNOTATION: "nginx"}));
        assert!(!is_ours(&legacy, &classes));
    }
}
