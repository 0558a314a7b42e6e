//! Services: defaults, a cluster IP and node ports from their ranges, the rules of their
//! ports, and `kubectl get services`' columns.
//!
//! An address or port is claimed with a create-if-absent key in the store
//! (`/registry/ranges/...`), so two API servers can never hand out the same one; it goes
//! back when the Service is deleted or its create fails.

use rand::Rng;
use serde_json::{json, Value};

use super::{age, name, Column, Hook, NameRule, Strategy};
use crate::defaults::{default, obj_mut};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::objects::Objects;
use crate::table::{i, none_if_empty, s, selector_string};
use crate::validation;

#[derive(Debug)]
pub struct Services;

fn join_ports(svc: &Value) -> String {
    let parts: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{}:{np}/{proto}", i(p, "/port")),
                None => format!("{}/{proto}", i(p, "/port")),
            }
        })
        .collect();
    none_if_empty(parts.join(","))
}

fn external_ips(o: &Value) -> Value {
    let ext: Vec<String> = o
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|x| s(x, "/ip").to_string()).collect())
        .unwrap_or_default();
    json!(none_if_empty(ext.join(",")))
}

static COLUMNS: &[Column] = &[
    Column::new("Name", "string", 0, name),
    Column::new("Type", "string", 0, |o| {
        json!(o
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP"))
    }),
    Column::new("Cluster-IP", "string", 0, |o| {
        json!(none_if_empty(s(o, "/spec/clusterIP").to_string()))
    }),
    Column::new("External-IP", "string", 0, external_ips),
    Column::new("Port(s)", "string", 0, |o| json!(join_ports(o))),
    Column::new("Age", "string", 0, age),
    Column::new("Selector", "string", 1, |o| {
        json!(selector_string(o.pointer("/spec/selector")))
    }),
];

impl Strategy for Services {
    /// A Service's name is also a DNS label (`NAME.NAMESPACE.svc`).
    fn name_rule(&self) -> NameRule {
        validation::dns1123_label
    }

    fn validate(&self, obj: &Value, errs: &mut Vec<FieldError>) {
        let ty = obj
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP");
        let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
        if ty != "ExternalName"
            && obj.pointer("/spec/clusterIP").and_then(Value::as_str) != Some("None")
            && ports.is_none_or(|p| p.is_empty())
        {
            errs.push(FieldError::required("spec.ports"));
        }
        for (i, p) in ports.into_iter().flatten().enumerate() {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                errs.push(FieldError::invalid(
                    format!("spec.ports[{i}].port"),
                    &port.to_string(),
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
    }

    fn allocate<'a>(
        &'a self,
        objects: &'a Objects,
        obj: &'a mut Value,
        dry_run: bool,
    ) -> Hook<'a, ApiResult<()>> {
        Box::pin(allocate(obj, objects, dry_run))
    }

    fn release<'a>(&'a self, objects: &'a Objects, obj: &'a Value) -> Hook<'a, ()> {
        Box::pin(release(objects, obj))
    }

    /// Allocated addresses are immutable once set.
    fn prepare_update(&self, old: &Value, new: &mut Value) {
        for k in ["clusterIP", "clusterIPs"] {
            if let Some(v) = old.pointer(&format!("/spec/{k}")) {
                new["spec"][k] = v.clone();
            }
        }
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }
}

async fn allocate(obj: &mut Value, objects: &Objects, dry_run: bool) -> ApiResult<()> {
    let spec = obj_mut(obj, "spec");
    default(spec, "type", json!("ClusterIP"));
    default(spec, "sessionAffinity", json!("None"));
    default(spec, "ipFamilies", json!(["IPv4"]));
    default(spec, "ipFamilyPolicy", json!("SingleStack"));
    default(spec, "internalTrafficPolicy", json!("Cluster"));
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                default(p, "targetPort", port);
            }
        }
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ty != "ExternalName" && !headless {
        let ip = match spec.get("clusterIP").and_then(Value::as_str) {
            Some(ip) if !ip.is_empty() => {
                if !reserve(objects, "serviceips", ip, dry_run).await? {
                    return Err(invalid_service(
                        "spec.clusterIP",
                        ip,
                        "provided IP is already allocated",
                    ));
                }
                ip.to_string()
            }
            _ => allocate_ip(objects, dry_run).await?,
        };
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                match p
                    .get("nodePort")
                    .and_then(Value::as_i64)
                    .filter(|np| *np != 0)
                {
                    Some(np) => {
                        if !(30000..=32767).contains(&np) {
                            return Err(invalid_service("spec.ports.nodePort", &np.to_string(), "provided port is not in the valid range. The range of valid ports is 30000-32767"));
                        }
                        if !reserve(objects, "servicenodeports", &np.to_string(), dry_run).await? {
                            return Err(invalid_service(
                                "spec.ports.nodePort",
                                &np.to_string(),
                                "provided port is already allocated",
                            ));
                        }
                    }
                    None => {
                        let np = allocate_node_port(objects, dry_run).await?;
                        p.insert("nodePort".into(), json!(np));
                    }
                }
            }
        }
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    obj["status"] = json!({"loadBalancer": {}});
    Ok(())
}

fn invalid_service(field: &str, value: &str, why: &str) -> ApiError {
    ApiError::Invalid {
        group: String::new(),
        kind: "Service".into(),
        name: String::new(),
        causes: vec![FieldError::invalid(field, value, why)],
    }
}

/// Claims one value of a range (an IP or port) with a create-if-absent in the store, so
/// that two API servers can never hand out the same one. Ok(false): someone has it. A
/// store that cannot answer is an error of its own, not a taken value.
async fn reserve(objects: &Objects, range: &str, value: &str, dry_run: bool) -> ApiResult<bool> {
    let key = format!("/registry/ranges/{range}/{value}");
    if dry_run {
        let got = objects
            .store
            .get(key.as_bytes(), Default::default())
            .await?;
        return Ok(got.is_none());
    }
    match objects
        .store
        .put_if(key, "1", baton_store::Precondition::Absent)
        .await
    {
        Ok(_) => Ok(true),
        Err(baton_store::Error::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Gives an allocated IP or port back.
async fn release(objects: &Objects, svc: &Value) {
    let mut keys = Vec::new();
    if let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str) {
        if ip != "None" && !ip.is_empty() {
            keys.push(format!("/registry/ranges/serviceips/{ip}"));
        }
    }
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            keys.push(format!("/registry/ranges/servicenodeports/{np}"));
        }
    }
    for k in keys {
        let _ = objects.store.delete(k).await;
    }
}

async fn allocate_ip(objects: &Objects, dry_run: bool) -> ApiResult<String> {
    // 10.96.0.0/16, skipping .0 and 10.96.0.1 (the `kubernetes` service's by convention).
    for _ in 0..64 {
        let n: u32 = rand::thread_rng().gen_range(2..65534);
        let ip = format!("10.96.{}.{}", n >> 8, n & 0xff);
        if reserve(objects, "serviceips", &ip, dry_run).await? {
            return Ok(ip);
        }
    }
    Err(ApiError::Internal {
        message: "failed to allocate a service IP: 64 random picks were all taken; the range is nearly full".into(),
    })
}

async fn allocate_node_port(objects: &Objects, dry_run: bool) -> ApiResult<i64> {
    for _ in 0..64 {
        let port: i64 = rand::thread_rng().gen_range(30000..=32767);
        if reserve(objects, "servicenodeports", &port.to_string(), dry_run).await? {
            return Ok(port);
        }
    }
    Err(ApiError::Internal {
        message: "failed to allocate a node port: 64 random picks were all taken; the range is nearly full".into(),
    })
}
