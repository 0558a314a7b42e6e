//! The smaller kinds: namespaces, nodes, configuration, endpoints, events and leases.

use serde_json::{json, Value};

use super::{age, name, Column, Deletion, NameRule, Strategy};
use crate::defaults::{self, default, obj_mut};
use crate::table::{age_of, i, none_if_empty, s};
use crate::validation;

#[derive(Debug)]
pub struct Namespaces;
#[derive(Debug)]
pub struct Nodes;
#[derive(Debug)]
pub struct ConfigMaps;
#[derive(Debug)]
pub struct Secrets;
#[derive(Debug)]
pub struct ServiceAccounts;
#[derive(Debug)]
pub struct Endpoints;
#[derive(Debug)]
pub struct EndpointSlices;
#[derive(Debug)]
pub struct Events;
#[derive(Debug)]
pub struct Leases;

fn count(o: &Value, key: &str) -> usize {
    o.get(key).and_then(Value::as_object).map_or(0, |m| m.len())
}

static NAMESPACE_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Status", "string", 0, |o| {
        json!(o
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("Active"))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for Namespaces {
    /// A namespace's name is also a DNS label (`svc.NAMESPACE.svc`).
    fn name_rule(&self) -> NameRule {
        validation::dns1123_label
    }

    fn field_selectable(&self, field: &str) -> bool {
        field == "status.phase"
    }

    fn prepare_create(&self, obj: &mut Value) {
        obj_mut(obj, "spec")
            .entry("finalizers")
            .or_insert(json!(["kubernetes"]));
        obj["status"] = json!({"phase": "Active"});
    }

    /// The namespace controller empties it, then removes its finalizer.
    fn deletion(&self, _obj: &Value, _grace: Option<i64>) -> Deletion {
        Deletion::Terminating
    }

    /// Gone once the namespace controller has finalized it (`spec.finalizers` emptied
    /// through `/finalize`): a status write while it is emptied keeps it.
    fn finalized(&self, obj: &Value) -> bool {
        obj.pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
    }

    fn columns(&self) -> &[Column] {
        NAMESPACE_COLUMNS
    }
}

fn node_status(o: &Value) -> Value {
    let ready = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| s(c, "/type") == "Ready"))
        .map(|c| match s(c, "/status") {
            "True" => "Ready",
            _ => "NotReady",
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_string();
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    json!(status)
}

fn node_roles(o: &Value) -> Value {
    let roles: Vec<&str> = o
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .collect()
        })
        .unwrap_or_default();
    json!(none_if_empty(roles.join(",")))
}

fn node_ip(o: &Value) -> Value {
    let ip = o
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| s(x, "/type") == "InternalIP"))
        .map(|x| s(x, "/address").to_string())
        .unwrap_or_default();
    json!(none_if_empty(ip))
}

static NODE_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Status", "string", 0, node_status),
    Column::new("Roles", "string", 0, node_roles),
    Column::new("Age", "string", 0, age),
    Column::new("Version", "string", 0, |o| {
        json!(s(o, "/status/nodeInfo/kubeletVersion"))
    }),
    Column::new("Internal-IP", "string", 1, node_ip),
];

impl Strategy for Nodes {
    fn field_selectable(&self, field: &str) -> bool {
        field == "spec.unschedulable"
    }

    fn columns(&self) -> &[Column] {
        NODE_COLUMNS
    }
}

static CONFIGMAP_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Data", "integer", 0, |o| {
        json!(count(o, "data") + count(o, "binaryData"))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for ConfigMaps {
    fn columns(&self) -> &[Column] {
        CONFIGMAP_COLUMNS
    }
}

static SECRET_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Type", "string", 0, |o| {
        json!(o.get("type").and_then(Value::as_str).unwrap_or("Opaque"))
    }),
    Column::new("Data", "integer", 0, |o| json!(count(o, "data"))),
    Column::new("Age", "string", 0, age),
];

impl Strategy for Secrets {
    fn field_selectable(&self, field: &str) -> bool {
        field == "type"
    }

    fn prepare_create(&self, obj: &mut Value) {
        if let Some(m) = obj.as_object_mut() {
            if m.get("type").and_then(Value::as_str) == Some("") {
                m.remove("type");
            }
            default(m, "type", json!("Opaque"));
        }
        defaults::string_data(obj);
    }

    fn prepare_update(&self, _old: &Value, new: &mut Value) {
        defaults::string_data(new);
    }

    fn columns(&self) -> &[Column] {
        SECRET_COLUMNS
    }
}

static SERVICEACCOUNT_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Secrets", "integer", 0, |o| {
        json!(o
            .get("secrets")
            .and_then(Value::as_array)
            .map_or(0, Vec::len))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for ServiceAccounts {
    fn columns(&self) -> &[Column] {
        SERVICEACCOUNT_COLUMNS
    }
}

fn endpoints_list(o: &Value) -> Value {
    let mut eps = Vec::new();
    for subset in o
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<i64> = subset
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| i(p, "/port"))
            .collect();
        for a in subset
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in &ports {
                eps.push(format!("{}:{p}", s(a, "/ip")));
            }
        }
    }
    json!(none_if_empty(eps.join(",")))
}

static ENDPOINTS_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Endpoints", "string", 0, endpoints_list),
    Column::new("Age", "string", 0, age),
];

impl Strategy for Endpoints {
    fn columns(&self) -> &[Column] {
        ENDPOINTS_COLUMNS
    }
}

fn slice_ports(o: &Value) -> Value {
    let ports: Vec<String> = o
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| i(p, "/port").to_string())
        .collect();
    json!(none_if_empty(ports.join(",")))
}

fn slice_addresses(o: &Value) -> Value {
    let addrs: Vec<&str> = o
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("addresses").and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    json!(none_if_empty(addrs.join(",")))
}

static ENDPOINTSLICE_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("AddressType", "string", 0, |o| json!(s(o, "/addressType"))),
    Column::new("Ports", "string", 0, slice_ports),
    Column::new("Endpoints", "string", 0, slice_addresses),
    Column::new("Age", "string", 0, age),
];

impl Strategy for EndpointSlices {
    fn columns(&self) -> &[Column] {
        ENDPOINTSLICE_COLUMNS
    }
}

fn last_seen(o: &Value) -> Value {
    let last = [
        "/lastTimestamp",
        "/eventTime",
        "/metadata/creationTimestamp",
    ]
    .iter()
    .find_map(|p| o.pointer(p).and_then(Value::as_str));
    json!(age_of(last))
}

static EVENT_COLUMNS: &[Column] = &[
    Column::new("Last Seen", "string", 0, last_seen),
    Column::new("Type", "string", 0, |o| json!(s(o, "/type"))),
    Column::new("Reason", "string", 0, |o| json!(s(o, "/reason"))),
    Column::new("Object", "string", 0, |o| {
        json!(format!(
            "{}/{}",
            s(o, "/involvedObject/kind").to_lowercase(),
            s(o, "/involvedObject/name")
        ))
    }),
    Column::new("Message", "string", 0, |o| json!(s(o, "/message"))),
];

impl Strategy for Events {
    fn watch_cached(&self) -> bool {
        false
    }

    fn field_selectable(&self, field: &str) -> bool {
        field.starts_with("involvedObject.")
            || matches!(field, "reason" | "type" | "source" | "reportingComponent")
    }

    fn columns(&self) -> &[Column] {
        EVENT_COLUMNS
    }
}

static LEASE_COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Holder", "string", 0, |o| {
        json!(none_if_empty(s(o, "/spec/holderIdentity").to_string()))
    }),
    Column::new("Age", "string", 0, age),
];

impl Strategy for Leases {
    fn columns(&self) -> &[Column] {
        LEASE_COLUMNS
    }
}
