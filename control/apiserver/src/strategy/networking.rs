//! networking.k8s.io/v1: Ingresses, IngressClasses and NetworkPolicies, stored and shown
//! as `kubectl get` shows them.

use serde_json::{json, Value};

use super::{age, name, Column, Strategy};
use crate::table::{none_if_empty, s, selector_string};

#[derive(Debug)]
pub struct Ingresses;
#[derive(Debug)]
pub struct IngressClasses;
#[derive(Debug)]
pub struct NetworkPolicies;

fn items<'a>(o: &'a Value, ptr: &str) -> impl Iterator<Item = &'a Value> {
    o.pointer(ptr)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn hosts(o: &Value) -> Value {
    let hosts: Vec<&str> = items(o, "/spec/rules")
        .map(|r| match s(r, "/host") {
            "" => "*",
            h => h,
        })
        .collect();
    json!(if hosts.is_empty() {
        "*".to_string()
    } else {
        hosts.join(",")
    })
}

fn addresses(o: &Value) -> Value {
    let addrs: Vec<&str> = items(o, "/status/loadBalancer/ingress")
        .map(|a| match s(a, "/ip") {
            "" => s(a, "/hostname"),
            ip => ip,
        })
        .collect();
    json!(addrs.join(","))
}

static INGRESS_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Class", "string", 0, |o| {
        json!(none_if_empty(s(o, "/spec/ingressClassName").to_string()))
    }),
    Column::new("Hosts", "string", 0, hosts),
    Column::new("Address", "string", 0, addresses),
    Column::new("Ports", "string", 0, |o| {
        json!(if items(o, "/spec/tls").next().is_some() {
            "80, 443"
        } else {
            "80"
        })
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for Ingresses {
    fn columns(&self) -> &[Column] {
        INGRESS_COLUMNS
    }

    fn mutate<'a>(
        &'a self,
        objects: &'a crate::objects::Objects,
        obj: &'a mut Value,
    ) -> super::Hook<'a, crate::error::ApiResult<()>> {
        Box::pin(default_class(objects, obj))
    }
}

/// The DefaultIngressClass admission plugin: a new Ingress that names no class (neither
/// `spec.ingressClassName` nor the older annotation) gets the default IngressClass, the
/// newest if several are marked.
async fn default_class(
    objects: &crate::objects::Objects,
    obj: &mut Value,
) -> crate::error::ApiResult<()> {
    let named = !s(obj, "/spec/ingressClassName").is_empty()
        || obj
            .pointer("/metadata/annotations/kubernetes.io~1ingress.class")
            .is_some();
    if named {
        return Ok(());
    }
    let classes = crate::resources::builtin("IngressClass");
    let page = objects
        .list(
            classes,
            None,
            crate::objects::ReadAt::Latest,
            0,
            None,
            |c| {
                c.pointer("/metadata/annotations")
                    .and_then(|a| a.get(baton_kube::ingress::DEFAULT_CLASS_ANNOTATION))
                    .and_then(Value::as_str)
                    == Some("true")
            },
        )
        .await?;
    let newest = page
        .items
        .iter()
        .max_by_key(|c| s(c, "/metadata/creationTimestamp").to_string());
    if let (Some(class), Some(spec)) = (newest, obj.get_mut("spec").and_then(Value::as_object_mut))
    {
        spec.insert("ingressClassName".into(), json!(s(class, "/metadata/name")));
    }
    Ok(())
}

static INGRESSCLASS_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Controller", "string", 0, |o| {
        json!(s(o, "/spec/controller"))
    }),
    Column::new("Parameters", "string", 0, |o| {
        let p = o.pointer("/spec/parameters");
        json!(match p {
            Some(p) => format!("{}/{}", s(p, "/kind"), s(p, "/name")),
            None => "<none>".to_string(),
        })
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for IngressClasses {
    fn columns(&self) -> &[Column] {
        INGRESSCLASS_COLUMNS
    }
}

static NETWORKPOLICY_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Pod-Selector", "string", 0, |o| {
        json!(selector_string(o.pointer("/spec/podSelector")))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for NetworkPolicies {
    fn columns(&self) -> &[Column] {
        NETWORKPOLICY_COLUMNS
    }
}
