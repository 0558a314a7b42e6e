//! Services: defaults, a cluster IP and node ports from their ranges, the rules of their
//! ports, and `kubectl get services`' columns.
//!
//! An address or port is a key in the store (`/registry/ranges/...`), created in the same
//! transaction as the Service and deleted in the same transaction as its deletion: two
//! API servers can never hand out the same one, and none is held without its Service.

use rand::Rng;
use serde_json::{json, Value};

use super::{age, name, Claim, Column, Hook, NameRule, Strategy};
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

    fn picks_claims(&self) -> bool {
        true
    }

    fn claims<'a>(
        &'a self,
        objects: &'a Objects,
        obj: &'a mut Value,
    ) -> Hook<'a, ApiResult<Vec<Claim>>> {
        Box::pin(claims(obj, objects))
    }

    fn held(&self, obj: &Value) -> Vec<String> {
        held(obj)
    }

    /// Allocated addresses are immutable once set.
    fn prepare_update(&self, old: &Value, new: &mut Value) {
        for k in ["clusterIP", "clusterIPs"] {
            if let Some(v) = old.pointer(&format!("/spec/{k}")) {
                new["spec"][k] = v.clone();
            }
        }
    }

    fn columns(&self) -> &[Column] {
        COLUMNS
    }
}

pub(crate) const IPS: &str = "/registry/ranges/serviceips/";
const NODE_PORTS: &str = "/registry/ranges/servicenodeports/";
const IP_TAKEN: &str = "provided IP is already allocated";
const PORT_TAKEN: &str = "provided port is already allocated";

/// Whether a value of a range is free now (a claim may still lose it to a concurrent
/// create: the create's transaction decides).
async fn free(objects: &Objects, key: &str) -> ApiResult<bool> {
    Ok(objects
        .store
        .get(key.as_bytes(), Default::default())
        .await?
        .is_none())
}

/// Defaults, then a cluster IP and node ports: the ones asked for if free, otherwise
/// random free ones.
async fn claims(obj: &mut Value, objects: &Objects) -> ApiResult<Vec<Claim>> {
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
    let mut claims = Vec::new();
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ty != "ExternalName" && !headless {
        let (ip, requested) = match spec.get("clusterIP").and_then(Value::as_str) {
            Some(ip) if !ip.is_empty() => {
                if !free(objects, &format!("{IPS}{ip}")).await? {
                    return Err(invalid_service("spec.clusterIP", ip, IP_TAKEN));
                }
                (ip.to_string(), true)
            }
            _ => (pick_ip(objects).await?, false),
        };
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
        claims.push(Claim {
            key: format!("{IPS}{ip}"),
            field: "spec.clusterIP",
            value: ip,
            requested,
            taken: IP_TAKEN,
        });
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                let asked = p
                    .get("nodePort")
                    .and_then(Value::as_i64)
                    .filter(|np| *np != 0);
                let (np, requested) = match asked {
                    Some(np) => {
                        if !(30000..=32767).contains(&np) {
                            return Err(invalid_service("spec.ports.nodePort", &np.to_string(), "provided port is not in the valid range. The range of valid ports is 30000-32767"));
                        }
                        let taken_by_sibling = claims.iter().any(|c: &Claim| {
                            c.value == np.to_string() && c.field == "spec.ports.nodePort"
                        });
                        if taken_by_sibling || !free(objects, &format!("{NODE_PORTS}{np}")).await? {
                            return Err(invalid_service(
                                "spec.ports.nodePort",
                                &np.to_string(),
                                PORT_TAKEN,
                            ));
                        }
                        (np, true)
                    }
                    None => (pick_node_port(objects, &claims).await?, false),
                };
                p.insert("nodePort".into(), json!(np));
                claims.push(Claim {
                    key: format!("{NODE_PORTS}{np}"),
                    field: "spec.ports.nodePort",
                    value: np.to_string(),
                    requested,
                    taken: PORT_TAKEN,
                });
            }
        }
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    obj["status"] = json!({"loadBalancer": {}});
    Ok(claims)
}

fn invalid_service(field: &str, value: &str, why: &str) -> ApiError {
    ApiError::Invalid {
        group: String::new(),
        kind: "Service".into(),
        name: String::new(),
        causes: vec![FieldError::invalid(field, value, why)],
    }
}

/// The range keys a Service holds.
fn held(svc: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = svc.pointer("/spec/clusterIP").and_then(Value::as_str) {
        if ip != "None" && !ip.is_empty() {
            keys.push(format!("{IPS}{ip}"));
        }
    }
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            keys.push(format!("{NODE_PORTS}{np}"));
        }
    }
    keys
}

/// Whether `ip` is in the Service range, 10.96.0.0/16, where ClusterIPs are given.
pub(crate) fn in_service_range(ip: &std::net::IpAddr) -> bool {
    matches!(ip, std::net::IpAddr::V4(v4) if v4.octets()[..2] == [10, 96])
}

async fn pick_ip(objects: &Objects) -> ApiResult<String> {
    // 10.96.0.0/16, skipping .0 and 10.96.0.1 (the `kubernetes` service's by convention).
    for _ in 0..64 {
        let n: u32 = rand::thread_rng().gen_range(2..65534);
        let ip = format!("10.96.{}.{}", n >> 8, n & 0xff);
        if free(objects, &format!("{IPS}{ip}")).await? {
            return Ok(ip);
        }
    }
    Err(ApiError::Internal {
        message: "failed to allocate a service IP: 64 random picks were all taken; the range is nearly full".into(),
    })
}

async fn pick_node_port(objects: &Objects, picked: &[Claim]) -> ApiResult<i64> {
    for _ in 0..64 {
        let port: i64 = rand::thread_rng().gen_range(30000..=32767);
        let mine = picked
            .iter()
            .any(|c| c.key == format!("{NODE_PORTS}{port}"));
        if !mine && free(objects, &format!("{NODE_PORTS}{port}")).await? {
            return Ok(port);
        }
    }
    Err(ApiError::Internal {
        message: "failed to allocate a node port: 64 random picks were all taken; the range is nearly full".into(),
    })
}
