//! What a pod's containers see besides their component: environment and volumes, with
//! ConfigMap, Secret and downward-API references resolved, as the kubelet resolves them.
//!
//! - env: `value` (with `$(VAR)` expansion of earlier variables), `valueFrom`
//!   (`configMapKeyRef`, `secretKeyRef`, `fieldRef`, `resourceFieldRef`) and `envFrom`.
//! - volumes: `emptyDir` (one directory shared by the pod's containers), `configMap`,
//!   `secret`, `downwardAPI` and `projected` (files written under the pod's directory and
//!   mounted read-only, rewritten by [`refresh_volumes`] when the objects change),
//!   `hostPath`,
//!   and `persistentVolumeClaim` (the bound volume: a locally provisioned one lives in
//!   the node's local volume directory, see `baton_kube::storage::LOCAL_VOLUME_PREFIX`).
//!
//! A projected `serviceAccountToken` is asked of the API server (TokenRequest, bound to
//! the pod, so that it dies with it) and asked again once 80% of its life has passed, as
//! the kubelet does; until then the token in the volume is kept.
//!
//! The ConfigMaps and Secrets are read at a pod's start, and for the periodic refresh
//! from the node's [`ObjectCache`], which reads each object at most once per
//! [`ObjectCache::refresh_ttl`] for all of the node's pods, as the kubelet's TTL-based
//! manager does: a node with 30 pods of one namespace asks for its `kube-root-ca.crt`
//! once, not 30 times, every refresh. That TTL is [`REFRESH_TTL`], or longer in a big
//! cluster: the control plane sets it on each Node from the cluster's size (5 minutes
//! at 5,000 nodes), as Kubernetes' TTL controller does.
//!
//! A reference to a missing object or key fails with the object's name, which the node
//! agent reports as `CreateContainerConfigError`; `optional: true` references are skipped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_kube::storage::LOCAL_VOLUME_PREFIX;
use baton_wasm_shim::Mount;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, PersistentVolume,
    PersistentVolumeClaim, Pod, Secret, ServiceAccount, ServiceAccountTokenProjection, Volume,
};
use kube::{Api, Client, ResourceExt};

/// Why a container's configuration could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{kind} \"{name}\" not found")]
    Missing { kind: &'static str, name: String },
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    MissingKey {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("reading {kind} {name}")]
    Api {
        kind: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("requesting a token of ServiceAccount {namespace}/{name}")]
    Token {
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("unsupported field path {0:?}")]
    FieldPath(String),
    #[error("volume {volume}: {message}")]
    Volume { volume: String, message: String },
    #[error("container {container} mounts volume {volume}, which the pod does not define")]
    NoSuchVolume { container: String, volume: String },
    #[error("writing volume {volume}")]
    Io {
        volume: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where a pod's volumes may lead on the node.
#[derive(Debug, Clone, Copy)]
pub struct HostDirs<'a> {
    /// Prefixes hostPath volumes (and PersistentVolumes with a node path) may name;
    /// none refuses them all.
    pub allowed: &'a [PathBuf],
    /// Where locally provisioned PersistentVolumes keep their data.
    pub local_volumes: &'a Path,
}

/// How old a ConfigMap or Secret read for another pod may be when a pod's volumes and
/// wasi:config values are refreshed. With the 15 s refresh, an edit reaches a running
/// pod within 25 s (the kubelet's defaults take up to two minutes).
pub const REFRESH_TTL: Duration = Duration::from_secs(10);

/// Objects kept longer than this unread are dropped (their pods are likely gone).
const FORGET_AFTER: Duration = Duration::from_secs(300);

/// The node's ConfigMaps and Secrets, as last read for any of its pods.
#[derive(Debug, Default)]
pub struct ObjectCache {
    configmaps: Mutex<Kept<ConfigMap>>,
    secrets: Mutex<Kept<Secret>>,
    /// The TTL the control plane set on this node, in seconds ([`ObjectCache::follow`]).
    node_ttl: std::sync::atomic::AtomicU64,
    /// Whether the Node followed last carried the annotation.
    knows_ttl: std::sync::atomic::AtomicBool,
}

/// The longest TTL a Node's annotation may set: a refresh still comes within the hour.
const MAX_NODE_TTL: Duration = Duration::from_secs(3600);

/// (namespace, name) → when it was read, and what was read (None: it did not exist).
type Kept<K> = HashMap<(String, String), (Instant, Option<K>)>;

impl ObjectCache {
    /// Takes the refresh TTL from this node's Node, as the control plane set it from the
    /// cluster's size (`node.alpha.kubernetes.io/ttl`, as the kubelet reads it). Absent or
    /// unreadable, it is 0: [`REFRESH_TTL`] alone.
    pub fn follow(&self, node: &k8s_openapi::api::core::v1::Node) {
        let secs = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(baton_kube::NODE_TTL_ANNOTATION))
            .and_then(|v| v.parse::<u64>().ok());
        self.knows_ttl
            .store(secs.is_some(), std::sync::atomic::Ordering::Relaxed);
        self.node_ttl
            .store(secs.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the Node followed last carried a TTL the node could read.
    pub fn knows_ttl(&self) -> bool {
        self.knows_ttl.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How old an object read for another pod may be at a refresh: the node's TTL, but
    /// never less than [`REFRESH_TTL`] (which shares one read among the node's pods) nor
    /// more than an hour.
    pub fn refresh_ttl(&self) -> Duration {
        let node = Duration::from_secs(self.node_ttl.load(std::sync::atomic::Ordering::Relaxed));
        node.clamp(REFRESH_TTL, MAX_NODE_TTL)
    }

    /// The object, as read within `max_age` if that is allowed (Some), or read now.
    async fn get<K>(
        kept: &Mutex<Kept<K>>,
        client: &Client,
        namespace: &str,
        name: &str,
        max_age: Option<Duration>,
        kind: &'static str,
    ) -> Result<Option<K>, ConfigError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + k8s_openapi::serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let key = (namespace.to_string(), name.to_string());
        let held = {
            let kept = kept.lock().unwrap_or_else(|p| p.into_inner());
            match (max_age, kept.get(&key)) {
                (Some(max_age), Some((at, obj))) if at.elapsed() < max_age => {
                    return Ok(obj.clone());
                }
                (_, found) => found.is_some(),
            }
        };
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        // A refresh, or a pod's start when the node holds a copy already, takes the API
        // server's cached copy (`resourceVersion=0`), as the kubelet's TTL-based manager
        // re-reads an object it has: every node asks for each namespace's objects once per
        // TTL and again for each pod, so these reads are many. Only a first read asks for
        // the latest.
        let read = if max_age.is_some() || held {
            match api.get_with(name, &kube::api::GetParams::any()).await {
                Ok(obj) => Ok(Some(obj)),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            api.get_opt(name).await
        };
        let obj = read.map_err(|source| ConfigError::Api {
            kind,
            name: name.into(),
            source: Box::new(source),
        })?;
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        kept.retain(|_, (at, _)| now.duration_since(*at) < FORGET_AFTER);
        kept.insert(key, (now, obj.clone()));
        Ok(obj)
    }
}

/// Reads ConfigMaps and Secrets of one namespace once per resolution.
struct Objects {
    client: Client,
    namespace: String,
    configmaps: HashMap<String, Option<ConfigMap>>,
    secrets: HashMap<String, Option<Secret>>,
    cache: Arc<ObjectCache>,
    /// How old a cached object may be: None reads every object afresh (a pod's start
    /// sees the objects as they are now).
    max_age: Option<Duration>,
}

/// The part of a token's life after which the node asks for a new one (the kubelet's).
const TOKEN_REFRESH_AT: f64 = 0.8;

/// When a JWT was issued and when it expires (seconds since the epoch), read from its
/// claims without checking its signature: the node only decides whether to renew it.
fn token_times(token: &[u8]) -> Option<(i64, i64)> {
    use base64::Engine;
    /// Only the two claims read; the others are skipped, not built.
    #[derive(serde::Deserialize)]
    struct Times {
        iat: i64,
        exp: i64,
    }
    let payload = std::str::from_utf8(token).ok()?.trim().split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let t: Times = serde_json::from_slice(&claims).ok()?;
    Some((t.iat, t.exp))
}

/// A projected ServiceAccount token, with when it was issued and expires.
#[derive(Debug, Clone)]
struct Token {
    bytes: Vec<u8>,
    iat: i64,
    exp: i64,
}

impl Token {
    fn parse(bytes: Vec<u8>) -> Option<Self> {
        let (iat, exp) = token_times(&bytes)?;
        Some(Self { bytes, iat, exp })
    }
}

/// What the node last wrote into one pod's volumes, kept in memory for its refreshes.
///
/// A pod's volumes are refreshed every minute or so; at 150,000 pods that is 2,000
/// refreshes a second, and each one read its token back from the file, parsed the
/// token's claims, and looked at the volume's links to learn that nothing had changed.
/// With this, a refresh whose files are the ones written last touches no file and
/// parses nothing. The files are the node's own (components see them read-only), so
/// what it wrote is what is there. A worker that starts afresh (a node restart) has an
/// empty memo and falls back on the files.
#[derive(Debug, Default)]
pub struct Written {
    /// The version (the digest of its files) each volume was last given.
    versions: HashMap<String, String>,
    /// The token at each (volume, path).
    tokens: HashMap<(String, String), Token>,
}

/// Whether a token issued at `iat`, expiring at `exp`, is still good to keep at `now`.
fn fresh(iat: i64, exp: i64, now: i64) -> bool {
    let renew_at = iat as f64 + (exp - iat) as f64 * TOKEN_REFRESH_AT;
    (now as f64) < renew_at && now < exp
}

impl Objects {
    fn new(
        client: &Client,
        cache: &Arc<ObjectCache>,
        pod: &Pod,
        max_age: Option<Duration>,
    ) -> Self {
        Self {
            client: client.clone(),
            namespace: pod.namespace().unwrap_or_else(|| "default".into()),
            configmaps: HashMap::new(),
            secrets: HashMap::new(),
            cache: cache.clone(),
            max_age,
        }
    }

    /// The pod's ServiceAccount token for a projected volume: `current` if it is still
    /// fresh, else a new one bound to the pod.
    async fn token(
        &mut self,
        pod: &Pod,
        source: &ServiceAccountTokenProjection,
        current: Option<Token>,
    ) -> Result<Token, ConfigError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(t) = current.filter(|t| fresh(t.iat, t.exp, now)) {
            return Ok(t);
        }
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: source.audience.iter().cloned().collect(),
                expiration_seconds: Some(source.expiration_seconds.unwrap_or(3600)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let issued = api
            .create_token_request(&sa, &Default::default(), &request)
            .await
            .map_err(|source| ConfigError::Token {
                namespace: self.namespace.clone(),
                name: sa.clone(),
                source: Box::new(source),
            })?;
        let bytes = issued
            .status
            .map(|s| s.token.into_bytes())
            .unwrap_or_default();
        // A token whose claims cannot be read is used as it is, and asked for again at
        // the next refresh.
        Ok(Token::parse(bytes.clone()).unwrap_or(Token {
            bytes,
            iat: 0,
            exp: 0,
        }))
    }

    async fn configmap(&mut self, name: &str) -> Result<Option<&ConfigMap>, ConfigError> {
        if !self.configmaps.contains_key(name) {
            let cm = ObjectCache::get(
                &self.cache.configmaps,
                &self.client,
                &self.namespace,
                name,
                self.max_age,
                "configmap",
            )
            .await?;
            self.configmaps.insert(name.into(), cm);
        }
        Ok(self.configmaps[name].as_ref())
    }

    /// The node directory of the volume bound to claim `claim`: its data in the node's
    /// local volume directory for a locally provisioned volume, or an allowed node path.
    async fn claimed_dir(
        &self,
        volume: &str,
        claim: &str,
        dirs: HostDirs<'_>,
    ) -> Result<PathBuf, ConfigError> {
        let refuse = |message: String| ConfigError::Volume {
            volume: volume.into(),
            message,
        };
        let api_err = |kind: &'static str, name: &str| {
            let name = name.to_string();
            move |source| ConfigError::Api {
                kind,
                name,
                source: Box::new(source),
            }
        };
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let pvc = claims
            .get_opt(claim)
            .await
            .map_err(api_err("persistentvolumeclaim", claim))?
            .ok_or_else(|| ConfigError::Missing {
                kind: "persistentvolumeclaim",
                name: claim.into(),
            })?;
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let pv_name = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| bound && !n.is_empty())
            .ok_or_else(|| refuse(format!("persistentvolumeclaim {claim:?} is not bound yet")))?;
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let pv = pvs
            .get_opt(&pv_name)
            .await
            .map_err(api_err("persistentvolume", &pv_name))?
            .ok_or_else(|| ConfigError::Missing {
                kind: "persistentvolume",
                name: pv_name.clone(),
            })?;
        let spec = pv.spec.unwrap_or_default();
        let path = spec
            .local
            .map(|l| l.path)
            .or(spec.host_path.map(|h| h.path))
            .ok_or_else(|| {
                refuse(format!(
                    "persistentvolume {pv_name:?} has no local or hostPath source this node can mount"
                ))
            })?;
        let Some(rest) = path.strip_prefix(LOCAL_VOLUME_PREFIX) else {
            return host_path(volume, &path, dirs.allowed);
        };
        // One plain name: the volume's own directory, never a path out of the root.
        if rest.is_empty() || !plain_relative(rest) || rest.contains('/') {
            return Err(refuse(format!(
                "local volume path {path:?} must name one directory"
            )));
        }
        let io = |source| ConfigError::Io {
            volume: volume.into(),
            source,
        };
        std::fs::create_dir_all(dirs.local_volumes).map_err(io)?;
        let root = dirs.local_volumes.canonicalize().map_err(io)?;
        let dir = root.join(rest);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refuse(format!("{path:?} is not a directory"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        let real = dir.canonicalize().map_err(io)?;
        if !real.starts_with(&root) {
            return Err(refuse(format!("{path:?} leads out of the node's volumes")));
        }
        Ok(real)
    }

    async fn secret(&mut self, name: &str) -> Result<Option<&Secret>, ConfigError> {
        if !self.secrets.contains_key(name) {
            let s = ObjectCache::get(
                &self.cache.secrets,
                &self.client,
                &self.namespace,
                name,
                self.max_age,
                "secret",
            )
            .await?;
            self.secrets.insert(name.into(), s);
        }
        Ok(self.secrets[name].as_ref())
    }

    /// The string data of a ConfigMap or Secret, or None if it does not exist.
    async fn data(
        &mut self,
        kind: &'static str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        Ok(match kind {
            "configmap" => self.configmap(name).await?.map(|cm| {
                let mut d: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.iter().flatten() {
                    d.insert(k.clone(), v.0.clone());
                }
                d
            }),
            _ => self.secret(name).await?.map(|s| {
                let mut d: BTreeMap<String, Vec<u8>> = s
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                for (k, v) in s.string_data.iter().flatten() {
                    d.insert(k.clone(), v.clone().into_bytes());
                }
                d
            }),
        })
    }

    async fn key(
        &mut self,
        kind: &'static str,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<String>, ConfigError> {
        let Some(data) = self.data(kind, name).await? else {
            return if optional {
                Ok(None)
            } else {
                Err(ConfigError::Missing {
                    kind,
                    name: name.into(),
                })
            };
        };
        match data.get(key) {
            Some(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
            None if optional => Ok(None),
            None => Err(ConfigError::MissingKey {
                kind: if kind == "configmap" {
                    "ConfigMap"
                } else {
                    "Secret"
                },
                namespace: self.namespace.clone(),
                name: name.into(),
                key: key.into(),
            }),
        }
    }
}

/// The pod facts the downward API exposes.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

fn field(pod: &Pod, facts: &PodFacts, f: &ObjectFieldSelector) -> Result<String, ConfigError> {
    let path = f.field_path.as_str();
    let labelled = |prefix: &str, map: &BTreeMap<String, String>| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| map.get(k).cloned().unwrap_or_default())
    };
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        "metadata.labels" => format_map(pod.labels()),
        "metadata.annotations" => format_map(pod.annotations()),
        _ => labelled("metadata.labels['", pod.labels())
            .or_else(|| labelled("metadata.annotations['", pod.annotations()))
            .ok_or_else(|| ConfigError::FieldPath(path.into()))?,
    })
}

fn format_map(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `$(VAR)` references to variables defined before, as Kubernetes expands them; `$$` is
/// a literal `$`, and unknown references stay as written.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn resource_field(c: &Container, resource: &str) -> String {
    let r = c.resources.as_ref();
    let (map, key) = match resource.split_once('.') {
        Some(("limits", k)) => (r.and_then(|r| r.limits.as_ref()), k),
        Some(("requests", k)) => (r.and_then(|r| r.requests.as_ref()), k),
        _ => (None, ""),
    };
    let q = map.and_then(|m| m.get(key)).map(|q| q.0.clone());
    // Whole units rounded up, cores for CPU, as the downward API's default divisor of 1.
    match q {
        Some(q) => baton_kube::quantity::whole(&q)
            .map(|v| v.to_string())
            .unwrap_or(q),
        None => "0".into(),
    }
}

/// Resolves a container's environment, in Kubernetes' order: `envFrom` first, then `env`.
async fn container_env(
    objects: &mut Objects,
    pod: &Pod,
    facts: &PodFacts,
    c: &Container,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(n, _)| *n != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = if let Some(r) = &from.config_map_ref {
            ("configmap", r.name.clone(), r.optional == Some(true))
        } else if let Some(r) = &from.secret_ref {
            ("secret", r.name.clone(), r.optional == Some(true))
        } else {
            continue;
        };
        match objects.data(kind, &name).await? {
            Some(data) => {
                for (k, v) in data {
                    set(
                        &mut env,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if optional => {}
            None => return Err(ConfigError::Missing { kind, name }),
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            let v = if let Some(r) = &from.config_map_key_ref {
                objects
                    .key("configmap", &r.name, &r.key, r.optional == Some(true))
                    .await?
            } else if let Some(r) = &from.secret_key_ref {
                objects
                    .key("secret", &r.name, &r.key, r.optional == Some(true))
                    .await?
            } else if let Some(f) = &from.field_ref {
                Some(field(pod, facts, f)?)
            } else {
                from.resource_field_ref
                    .as_ref()
                    .map(|r| resource_field(c, &r.resource))
            };
            match v {
                Some(v) => v,
                None => continue,
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &env)
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

/// The directory holding a pod's volumes on the node.
pub fn volumes_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("volumes")
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A relative path with only normal components: no root, no `..`, no `.` tricks.
fn plain_relative(p: &str) -> bool {
    use std::path::Component;
    !p.is_empty()
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// An absolute path without a `..` element.
fn plain_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|e| e == "..")
}

/// The node directory a container sees for `subPath` `sub` of the volume at `root`.
///
/// The directory is made if missing, one component at a time, and the result is then
/// resolved with every symlink followed and checked to be under the volume's own
/// resolved root: a symlink a guest planted in an emptyDir cannot lead a later mount out.
fn sub_path(root: &Path, volume: &str, sub: &str) -> Result<PathBuf, ConfigError> {
    let refuse = |why: &str| ConfigError::Volume {
        volume: volume.into(),
        message: format!("subPath {sub:?} {why}"),
    };
    if !plain_relative(sub) {
        return Err(refuse("must be a relative path without '..'"));
    }
    let io = |source| ConfigError::Io {
        volume: volume.into(),
        source,
    };
    let real_root = root.canonicalize().map_err(io)?;
    let mut at = real_root.clone();
    for c in Path::new(sub).components() {
        let std::path::Component::Normal(c) = c else {
            continue;
        };
        let next = at.join(c);
        match std::fs::symlink_metadata(&next) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&next).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        // Following a symlink here is what a mount would do; where it leads is checked.
        at = next.canonicalize().map_err(io)?;
        if !at.starts_with(&real_root) {
            return Err(refuse("leads out of its volume"));
        }
    }
    let meta = std::fs::metadata(&at).map_err(io)?;
    if !meta.is_dir() {
        return Err(refuse(
            "is not a directory (only directories can be mounted)",
        ));
    }
    Ok(at)
}

/// A hostPath volume's node directory, if the node allows it: resolved (symlinks
/// followed) and under one of the node's allowed prefixes. With none allowed (the
/// default), every hostPath volume is refused.
fn host_path(volume: &str, path: &str, allowed: &[PathBuf]) -> Result<PathBuf, ConfigError> {
    let refuse = |why: String| ConfigError::Volume {
        volume: volume.into(),
        message: why,
    };
    if allowed.is_empty() {
        return Err(refuse(format!(
            "hostPath {path:?} refused: this node allows no hostPath volumes (see `--allow-host-path`)"
        )));
    }
    if !plain_absolute(path) {
        return Err(refuse(format!(
            "hostPath {path:?} must be absolute and free of '..'"
        )));
    }
    let real = Path::new(path)
        .canonicalize()
        .map_err(|source| ConfigError::Io {
            volume: volume.into(),
            source,
        })?;
    let ok = allowed
        .iter()
        .any(|prefix| prefix.canonicalize().is_ok_and(|p| real.starts_with(p)));
    if !ok {
        return Err(refuse(format!(
            "hostPath {path:?} refused: it is not under a prefix this node allows"
        )));
    }
    Ok(real)
}

/// A version's name: a digest of its files' names and contents, so that the version in
/// place is known by its name alone.
fn version_name(files: &BTreeMap<String, Vec<u8>>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (name, data) in files {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    format!("..{:x}", h.finalize())
}

fn write_files(
    dir: &Path,
    volume: &str,
    files: &BTreeMap<String, Vec<u8>>,
    version: &str,
) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Io {
        volume: volume.into(),
        source,
    };
    for name in files.keys() {
        // `..data` and the versions beside it are the writer's own names.
        if !plain_relative(name) || name.starts_with("..") {
            return Err(ConfigError::Volume {
                volume: volume.into(),
                message: format!("path {name:?} leaves the volume"),
            });
        }
    }
    // The volume's directory stays (a component holds it open, as a preopen); each
    // version is written whole beside it, then `..data` is switched to it in one rename,
    // and every top-level name is a link through `..data`: a reader sees the old files
    // or the new ones, never half of each, and long-running components see updates.
    // A volume written for the first time (its directory made here) has no version to
    // compare and nothing stale beside it, so it takes half the calls of a rewrite: on a
    // node starting thousands of pods, these calls are much of its system time.
    let fresh = match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            true
        }
        Err(e) => return Err(io(e)),
    };
    let top: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|n| n.split('/').next().map(String::from))
        .collect();
    // A refresh whose files are those in place writes nothing, as the kubelet's atomic
    // writer compares its payload: on a node with thousands of pods, rewriting every
    // volume at every refresh was most of the node's system time.
    let in_place = !fresh
        && std::fs::read_link(dir.join("..data")).ok().as_deref() == Some(Path::new(version));
    if in_place {
        if top
            .iter()
            .all(|n| std::fs::symlink_metadata(dir.join(n)).is_ok())
        {
            return Ok(());
        }
    } else {
        let tmp = dir.join(version);
        if !fresh {
            // Left by a write cut short: its name says what it should hold, not that it does.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        std::fs::create_dir(&tmp).map_err(io)?;
        for (name, data) in files {
            let p = tmp.join(name);
            // `tmp` was just made: only a nested name needs directories of its own.
            if name.contains('/') {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
            }
            std::fs::write(&p, data).map_err(io)?;
        }
        if fresh {
            std::os::unix::fs::symlink(version, dir.join("..data")).map_err(io)?;
        } else {
            let link = dir.join("..data_tmp");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(version, &link).map_err(io)?;
            std::fs::rename(&link, dir.join("..data")).map_err(io)?;
        }
    }
    if !fresh {
        for entry in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "..data" || name == version {
                continue;
            }
            let stale = if name.starts_with("..") {
                true
            } else {
                !top.contains(&name)
            };
            if stale {
                let p = entry.path();
                let _ = match entry.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
            }
        }
    }
    for name in top {
        // A name already in place is kept as it is, as a link through `..data` or not.
        if let Err(e) = std::os::unix::fs::symlink(Path::new("..data").join(&name), dir.join(&name))
        {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(io(e));
            }
        }
    }
    Ok(())
}

/// Writes the pod's configMap, secret and downwardAPI volumes, and makes its emptyDirs.
async fn write_volumes(
    objects: &mut Objects,
    written: &mut Written,
    pod: &Pod,
    facts: &PodFacts,
    pod_dir: &Path,
    dirs: HostDirs<'_>,
) -> Result<HashMap<String, (PathBuf, bool)>, ConfigError> {
    let mut out = HashMap::new();
    let base = volumes_dir(pod_dir);
    let volumes: Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in &volumes {
        // The API server refuses such names; the node checks again rather than trust
        // whatever the store holds, since the name becomes a path on the node.
        if !is_dns_label(&v.name) {
            return Err(ConfigError::Volume {
                volume: v.name.clone(),
                message: "a volume name must be a DNS label".into(),
            });
        }
        let dir = base.join(&v.name);
        let io = |source| ConfigError::Io {
            volume: v.name.clone(),
            source,
        };
        let read_only = if v.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(io)?;
            false
        } else if let Some(h) = &v.host_path {
            let path = host_path(&v.name, &h.path, dirs.allowed)?;
            out.insert(v.name.clone(), (path, false));
            continue;
        } else if let Some(c) = &v.persistent_volume_claim {
            let path = objects.claimed_dir(&v.name, &c.claim_name, dirs).await?;
            out.insert(v.name.clone(), (path, c.read_only == Some(true)));
            continue;
        } else if let Some(files) = projected(objects, written, pod, facts, v, &dir).await? {
            let version = version_name(&files);
            if written.versions.get(&v.name) != Some(&version) {
                write_files(&dir, &v.name, &files, &version)?;
                written.versions.insert(v.name.clone(), version);
            }
            true
        } else {
            continue;
        };
        out.insert(v.name.clone(), (dir, read_only));
    }
    Ok(out)
}

/// The files of a configMap, secret, downwardAPI or projected volume; None for a volume
/// of another type that is not written here. `dir` is where the volume's files are now
/// (a token there that is still fresh is kept). Other volume types are refused.
async fn projected(
    objects: &mut Objects,
    written: &mut Written,
    pod: &Pod,
    facts: &PodFacts,
    v: &Volume,
    dir: &Path,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
    if let Some(c) = &v.config_map {
        let optional = c.optional == Some(true);
        return object_files(objects, "configmap", &c.name, c.items.as_deref(), optional)
            .await
            .map(Some);
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let optional = s.optional == Some(true);
        return object_files(objects, "secret", &name, s.items.as_deref(), optional)
            .await
            .map(Some);
    }
    if let Some(d) = &v.downward_api {
        return downward_files(pod, facts, d.items.as_deref()).map(Some);
    }
    let Some(p) = &v.projected else {
        return Err(ConfigError::Volume {
            volume: v.name.clone(),
            message:
                "only emptyDir, configMap, secret, downwardAPI, projected, hostPath and persistentVolumeClaim volumes are supported"
                    .into(),
        });
    };
    let mut files = BTreeMap::new();
    for source in p.sources.iter().flatten() {
        let part = if let Some(c) = &source.config_map {
            let optional = c.optional == Some(true);
            object_files(objects, "configmap", &c.name, c.items.as_deref(), optional).await?
        } else if let Some(s) = &source.secret {
            let optional = s.optional == Some(true);
            object_files(objects, "secret", &s.name, s.items.as_deref(), optional).await?
        } else if let Some(d) = &source.downward_api {
            downward_files(pod, facts, d.items.as_deref())?
        } else if let Some(t) = &source.service_account_token {
            // Taken out and put back below: the token itself is not copied.
            let key = (v.name.clone(), t.path.clone());
            let current = written
                .tokens
                .remove(&key)
                .or_else(|| std::fs::read(dir.join(&t.path)).ok().and_then(Token::parse));
            let token = objects.token(pod, t, current).await?;
            let bytes = token.bytes.clone();
            written.tokens.insert(key, token);
            BTreeMap::from([(t.path.clone(), bytes)])
        } else {
            return Err(ConfigError::Volume {
                volume: v.name.clone(),
                message: "a projected volume's sources may be configMap, secret, downwardAPI and serviceAccountToken".into(),
            });
        };
        files.extend(part);
    }
    Ok(Some(files))
}

/// The files of a ConfigMap or Secret (`kind`), all its keys or the `items` named.
async fn object_files(
    objects: &mut Objects,
    kind: &'static str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
    let Some(data) = objects.data(kind, name).await? else {
        return if optional {
            Ok(BTreeMap::new())
        } else {
            Err(ConfigError::Missing {
                kind,
                name: name.into(),
            })
        };
    };
    let Some(items) = items else {
        return Ok(data);
    };
    let mut files = BTreeMap::new();
    for item in items {
        match data.get(&item.key) {
            Some(d) => {
                files.insert(item.path.clone(), d.clone());
            }
            None if optional => {}
            None => {
                return Err(ConfigError::MissingKey {
                    kind: if kind == "configmap" {
                        "ConfigMap"
                    } else {
                        "Secret"
                    },
                    namespace: objects.namespace.clone(),
                    name: name.into(),
                    key: item.key.clone(),
                })
            }
        }
    }
    Ok(files)
}

/// The files of downwardAPI items: the pod's fields.
fn downward_files(
    pod: &Pod,
    facts: &PodFacts,
    items: Option<&[DownwardAPIVolumeFile]>,
) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
    let mut files = BTreeMap::new();
    for item in items.into_iter().flatten() {
        if let Some(f) = &item.field_ref {
            files.insert(item.path.clone(), field(pod, facts, f)?.into_bytes());
        }
    }
    Ok(files)
}

/// The pod annotation naming the volume whose `tls.crt` and `tls.key` (a
/// `kubernetes.io/tls` Secret's keys) its HTTP components serve HTTPS with.
pub const TLS_VOLUME_ANNOTATION: &str = "baton.dev/tls-volume";

/// The TLS server configuration of a pod's HTTP components, from the volume its
/// [`TLS_VOLUME_ANNOTATION`] names (written under `pod_dir` already); None without one.
pub fn serving_tls(
    pod: &Pod,
    pod_dir: &Path,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(volume) = pod.annotations().get(TLS_VOLUME_ANNOTATION) else {
        return Ok(None);
    };
    let refuse = |message: String| ConfigError::Volume {
        volume: volume.clone(),
        message,
    };
    if !is_dns_label(volume) {
        return Err(refuse(format!(
            "{TLS_VOLUME_ANNOTATION} must name a volume"
        )));
    }
    let dir = volumes_dir(pod_dir).join(volume);
    // Read through the volume's own links only, and never more than a certificate needs.
    let read = |name: &str| -> Result<Vec<u8>, ConfigError> {
        use std::io::Read;
        let mut data = Vec::new();
        std::fs::File::open(dir.join(name))
            .and_then(|f| f.take(1 << 20).read_to_end(&mut data))
            .map_err(|e| refuse(format!("reading {name} for {TLS_VOLUME_ANNOTATION}: {e}")))?;
        Ok(data)
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("tls.crt")?)
        .collect::<Result<_, _>>()
        .map_err(|e| refuse(format!("tls.crt: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&read("tls.key")?)
        .map_err(|e| refuse(format!("tls.key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| refuse(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| refuse(format!("tls.crt and tls.key: {e}")))?;
    Ok(Some(std::sync::Arc::new(config)))
}

/// The variables the kubelet gives every container for the `kubernetes` Service at
/// `ip:port`, ahead of the container's own (which win: a name it sets is not added).
pub fn api_server_env(env: &mut Vec<(String, String)>, ip: std::net::Ipv4Addr, port: u16) {
    let addr = format!("tcp://{ip}:{port}");
    let vars = [
        ("KUBERNETES_SERVICE_HOST", ip.to_string()),
        ("KUBERNETES_SERVICE_PORT", port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string()),
        ("KUBERNETES_PORT", addr.clone()),
        (&format!("KUBERNETES_PORT_{port}_TCP"), addr),
        (&format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (
            &format!("KUBERNETES_PORT_{port}_TCP_PORT"),
            port.to_string(),
        ),
        (&format!("KUBERNETES_PORT_{port}_TCP_ADDR"), ip.to_string()),
    ];
    let mut added: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| !env.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    added.append(env);
    *env = added;
}

/// One container's resolved environment and mounts.
#[derive(Debug, Clone, Default)]
pub struct ContainerConfig {
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Its wasi:config values: the keys of the objects `baton.dev/config-from` names,
    /// then its environment over them.
    pub wasi_config: BTreeMap<String, String>,
}

/// The keys of the objects `baton.dev/config-from` names, in order (a later object's
/// key wins). A missing object is an error, as a non-optional `envFrom` is.
async fn config_from(
    objects: &mut Objects,
    pod: &Pod,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut values = BTreeMap::new();
    for (kind, name) in crate::platform::config_sources(pod) {
        let data = objects
            .data(kind, &name)
            .await?
            .ok_or(ConfigError::Missing { kind, name })?;
        for (k, v) in data {
            values.insert(k, String::from_utf8_lossy(&v).into_owned());
        }
    }
    Ok(values)
}

fn wasi_config(
    from: &BTreeMap<String, String>,
    env: &[(String, String)],
) -> BTreeMap<String, String> {
    let mut values = from.clone();
    values.extend(env.iter().cloned());
    values
}

/// Every container's wasi:config values as the objects are now (for a running pod,
/// whose values follow its ConfigMaps and Secrets).
pub async fn refresh_wasi_config(
    client: &Client,
    cache: &Arc<ObjectCache>,
    pod: &Pod,
    facts: &PodFacts,
) -> Result<HashMap<String, BTreeMap<String, String>>, ConfigError> {
    let mut objects = Objects::new(client, cache, pod, Some(cache.refresh_ttl()));
    let from = config_from(&mut objects, pod).await?;
    let spec = pod.spec.clone().unwrap_or_default();
    let mut out = HashMap::new();
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let env = container_env(&mut objects, pod, facts, c).await?;
        out.insert(c.name.clone(), wasi_config(&from, &env));
    }
    Ok(out)
}

/// Resolves every container of the pod (init containers included), writing its volumes
/// under `pod_dir`.
pub async fn resolve(
    client: &Client,
    cache: &Arc<ObjectCache>,
    pod: &Pod,
    facts: &PodFacts,
    pod_dir: &Path,
    dirs: HostDirs<'_>,
    written: &mut Written,
) -> Result<HashMap<String, ContainerConfig>, ConfigError> {
    let mut objects = Objects::new(client, cache, pod, None);
    let volumes = write_volumes(&mut objects, written, pod, facts, pod_dir, dirs).await?;
    let from = config_from(&mut objects, pod).await?;
    let mut out = HashMap::new();
    let spec = pod.spec.clone().unwrap_or_default();
    let containers: Vec<Container> = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .collect();
    for c in &containers {
        let env = container_env(&mut objects, pod, facts, c).await?;
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let (dir, ro) = volumes
                .get(&m.name)
                .ok_or_else(|| ConfigError::NoSuchVolume {
                    container: c.name.clone(),
                    volume: m.name.clone(),
                })?;
            // subPathExpr expands the container's variables, as the kubelet does; the
            // result must stay inside the volume as a plain subPath must.
            let sub = match (&m.sub_path, &m.sub_path_expr) {
                (Some(sp), _) if !sp.is_empty() => Some(sp.clone()),
                (_, Some(e)) if !e.is_empty() => Some(expand(e, &env)),
                _ => None,
            };
            let host_path = match sub {
                Some(sp) => sub_path(dir, &m.name, &sp)?,
                None => dir.clone(),
            };
            if !plain_absolute(&m.mount_path) {
                return Err(ConfigError::Volume {
                    volume: m.name.clone(),
                    message: format!(
                        "mountPath {:?} must be absolute and free of '..'",
                        m.mount_path
                    ),
                });
            }
            // Mounts are kept resolved, so that [`recheck_mounts`] can tell, at every
            // start, that no component of the path was swapped for a symlink since.
            let host_path = host_path.canonicalize().map_err(|source| ConfigError::Io {
                volume: m.name.clone(),
                source,
            })?;
            mounts.push(Mount {
                host_path,
                guest_path: m.mount_path.clone(),
                read_only: *ro || m.read_only == Some(true),
            });
        }
        let wasi_config = wasi_config(&from, &env);
        out.insert(
            c.name.clone(),
            ContainerConfig {
                env,
                mounts,
                wasi_config,
            },
        );
    }
    Ok(out)
}

/// Whether `path`, kept resolved (absolute, without `.`, `..` or symlinks), still exists
/// with none of its components turned into a symlink: then it still resolves to itself.
/// One `openat2` with `RESOLVE_NO_SYMLINKS` asks that, where resolving the path again
/// would take a `readlink` per component. Where openat2 is missing (Linux before 5.6) or
/// filtered out (some seccomp profiles), the path is resolved again.
fn still_resolved(path: &Path) -> bool {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags, CWD};
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match openat2(CWD, path, flags, Mode::empty(), resolve) {
        Ok(_) => true,
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
            path.canonicalize().ok().as_deref() == Some(path)
        }
        Err(_) => false,
    }
}

/// Checks, just before a container (re)starts, that each of its mounts still resolves to
/// the directory that was checked: a sibling container that shares a volume could
/// otherwise replace a checked subPath by a symlink between a check and a restart.
pub fn recheck_mounts(mounts: &[Mount]) -> Result<(), ConfigError> {
    for m in mounts {
        if !still_resolved(&m.host_path) {
            return Err(ConfigError::Volume {
                volume: m.guest_path.clone(),
                message: format!(
                    "the directory mounted at {} changed since it was checked (a symlink?)",
                    m.guest_path
                ),
            });
        }
    }
    Ok(())
}

/// Rewrites the pod's configMap, secret and downwardAPI volumes from the objects as they
/// are now, as the kubelet's periodic sync does; the components see the new files.
pub async fn refresh_volumes(
    client: &Client,
    cache: &Arc<ObjectCache>,
    pod: &Pod,
    facts: &PodFacts,
    pod_dir: &Path,
    dirs: HostDirs<'_>,
    written: &mut Written,
) -> Result<(), ConfigError> {
    let mut objects = Objects::new(client, cache, pod, Some(cache.refresh_ttl()));
    write_volumes(&mut objects, written, pod, facts, pod_dir, dirs)
        .await
        .map(|_| ())
}

/// Registry credentials for `image` from the pod's `imagePullSecrets`
/// (`kubernetes.io/dockerconfigjson` Secrets); anonymous if none matches.
pub async fn pull_auth(client: &Client, pod: &Pod, image: &str) -> baton_oci::Auth {
    let registry = image.split('/').next().unwrap_or("");
    let names: Vec<String> = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    let api: Api<Secret> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    for name in names {
        let Ok(Some(secret)) = api.get_opt(&name).await else {
            continue;
        };
        let data = secret.data.unwrap_or_default();
        let Some(json) = data
            .get(".dockerconfigjson")
            .or_else(|| data.get(".dockercfg"))
        else {
            continue;
        };
        if let Some(auth) = baton_oci::Auth::from_docker_config(&json.0, registry) {
            return auth;
        }
    }
    baton_oci::Auth::Anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_waits_as_long_as_the_nodes_ttl_says_within_bounds() {
        let cache = ObjectCache::default();
        assert_eq!(cache.refresh_ttl(), REFRESH_TTL, "no annotation");
        let node = |ttl: &str| -> k8s_openapi::api::core::v1::Node {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n",
                "annotations": {baton_kube::NODE_TTL_ANNOTATION: ttl}}}))
            .unwrap()
        };
        cache.follow(&node("300"));
        assert_eq!(cache.refresh_ttl(), Duration::from_secs(300));
        cache.follow(&node("0"));
        assert_eq!(
            cache.refresh_ttl(),
            REFRESH_TTL,
            "never below the shared read"
        );
        cache.follow(&node("999999999"));
        assert_eq!(cache.refresh_ttl(), MAX_NODE_TTL);
        cache.follow(&node("soon"));
        assert_eq!(cache.refresh_ttl(), REFRESH_TTL, "nonsense is no TTL");
    }

    #[tokio::test]
    async fn the_refresh_reads_an_object_once_per_ttl_for_the_whole_node_and_a_start_afresh() {
        let api = baton_testkit::fake_api::FakeApi::default();
        // Absent: what was read is "none", which is kept as any answer is.
        api.fail("GET", "/configmaps/root-ca", 404);
        let client = api.client();
        let cache = Arc::new(ObjectCache::default());
        let pod = |name: &str| Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let gets = || {
            api.calls()
                .iter()
                .filter(|c| c.method == "GET" && c.path.ends_with("/configmaps/root-ca"))
                .count()
        };
        for p in ["a", "b", "c"] {
            let mut objects = Objects::new(&client, &cache, &pod(p), Some(REFRESH_TTL));
            objects.configmap("root-ca").await.unwrap();
        }
        assert_eq!(gets(), 1, "three pods' refreshes, one read");
        let mut start = Objects::new(&client, &cache, &pod("d"), None);
        start.configmap("root-ca").await.unwrap();
        assert_eq!(gets(), 2, "a pod's start reads afresh");
        let mut other = Objects::new(&client, &cache, &pod("e"), Some(Duration::ZERO));
        other.configmap("root-ca").await.unwrap();
        assert_eq!(gets(), 3, "an old read is read again");
    }

    #[tokio::test]
    async fn a_refresh_that_changes_nothing_touches_no_file_and_asks_for_no_token() {
        use base64::Engine;
        let api = baton_testkit::fake_api::FakeApi::default();
        let client = api.client();
        let cache = Arc::new(ObjectCache::default());
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("local");
        let facts = PodFacts {
            pod_ip: "10.0.0.2".into(),
            host_ip: "10.0.0.1".into(),
            node_name: "n".into(),
        };
        /// The node's side of a refresh, all but the pod and its memory fixed.
        struct Node<'a> {
            client: &'a Client,
            cache: &'a Arc<ObjectCache>,
            facts: &'a PodFacts,
            dir: &'a Path,
            local: &'a Path,
        }
        impl Node<'_> {
            async fn refresh(&self, pod: Pod, written: &mut Written) -> Result<(), ConfigError> {
                let dirs = HostDirs {
                    allowed: &[],
                    local_volumes: self.local,
                };
                refresh_volumes(
                    self.client,
                    self.cache,
                    &pod,
                    self.facts,
                    self.dir,
                    dirs,
                    written,
                )
                .await
            }
        }
        let node = Node {
            client: &client,
            cache: &cache,
            facts: &facts,
            dir: tmp.path(),
            local: &local,
        };
        let pod = |app: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": app}},
                "spec": {"containers": [], "volumes": [{"name": "v", "projected": {"sources": [
                    {"downwardAPI": {"items": [{"path": "labels",
                        "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                    {"serviceAccountToken": {"path": "token"}}]}}]}
            }))
            .unwrap()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let b64 = |v: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"ES256"}"#.into()),
            b64(format!(r#"{{"iat":{now},"exp":{}}}"#, now + 3600))
        );
        let token_requests = || {
            api.calls()
                .iter()
                .filter(|c| c.method == "POST" && c.path.ends_with("/token"))
                .count()
        };
        let vol = volumes_dir(tmp.path()).join("v");
        let mut written = Written::default();
        written.tokens.insert(
            ("v".into(), "token".into()),
            Token::parse(jwt.clone().into_bytes()).unwrap(),
        );
        node.refresh(pod("a"), &mut written).await.unwrap();
        assert_eq!(std::fs::read(vol.join("token")).unwrap(), jwt.as_bytes());
        assert_eq!(token_requests(), 0, "the token in memory is fresh");

        // Nothing changed: the files are not looked at (a link taken from under the node
        // is not noticed, which only the node itself could do).
        std::fs::remove_file(vol.join("labels")).unwrap();
        node.refresh(pod("a"), &mut written).await.unwrap();
        assert!(!vol.join("labels").exists());

        // A change is written, whole.
        node.refresh(pod("b"), &mut written).await.unwrap();
        assert_eq!(std::fs::read(vol.join("labels")).unwrap(), b"app=\"b\"");
        assert_eq!(token_requests(), 0);

        // A worker that starts afresh has no memory: it reads the token from its file.
        let mut afresh = Written::default();
        node.refresh(pod("b"), &mut afresh).await.unwrap();
        assert_eq!(token_requests(), 0, "the token in the file is fresh");
        // And a token it cannot read is asked for again.
        let mut afresh = Written::default();
        std::fs::write(vol.join("..data").join("token"), b"garbage").unwrap();
        let _ = node.refresh(pod("b"), &mut afresh).await;
        assert_eq!(token_requests(), 1);
    }

    #[test]
    fn a_token_is_kept_until_four_fifths_of_its_life() {
        use base64::Engine;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"ES256"}"#),
            b64(r#"{"iat":1000,"exp":4600,"sub":"x"}"#)
        );
        assert_eq!(token_times(jwt.as_bytes()), Some((1000, 4600)));
        assert!(fresh(1000, 4600, 1000));
        assert!(fresh(1000, 4600, 3879));
        assert!(!fresh(1000, 4600, 3880));
        assert!(!fresh(1000, 900, 950), "an expired token is never kept");
        // Whatever cannot be read is asked for again.
        assert_eq!(token_times(b"not a jwt"), None);
        assert_eq!(token_times(b"a.!!!.c"), None);
    }

    #[test]
    fn the_api_server_variables_come_first_and_give_way_to_the_containers_own() {
        let mut env = vec![
            ("KUBERNETES_SERVICE_PORT".to_string(), "8443".to_string()),
            ("APP".to_string(), "1".to_string()),
        ];
        api_server_env(&mut env, std::net::Ipv4Addr::new(10, 96, 0, 1), 443);
        let get = |k: &str| {
            env.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), ["10.96.0.1"]);
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), ["8443"]);
        assert_eq!(get("KUBERNETES_PORT_443_TCP"), ["tcp://10.96.0.1:443"]);
        assert_eq!(env.last().unwrap().0, "APP");
    }

    #[test]
    fn dependent_variables_expand() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)", &env), "x-$(B)-$(A)");
        assert_eq!(expand("plain", &env), "plain");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn sub_paths_stay_inside_their_volume_even_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        // What a guest could plant in an emptyDir: a link out, and one that stays in.
        std::os::unix::fs::symlink(&outside, vol.join("out")).unwrap();
        std::os::unix::fs::symlink("../vol/a", vol.join("in")).unwrap();
        let made = sub_path(&vol, "v", "a/b").unwrap();
        assert!(made.ends_with("vol/a/b") && made.is_dir());
        assert!(sub_path(&vol, "v", "in/b").unwrap().ends_with("vol/a/b"));
        for bad in ["out", "out/x", "/etc", "../outside", "a/../../outside", ""] {
            assert!(sub_path(&vol, "v", bad).is_err(), "{bad:?} was allowed");
        }
        assert!(!outside.join("x").exists(), "nothing was made outside");
        assert!(
            host_path("h", "/etc", &[]).is_err(),
            "hostPath is denied by default"
        );
        assert!(host_path("h", "/etc", &[dir.path().to_path_buf()]).is_err());
        assert!(host_path(
            "h",
            &outside.display().to_string(),
            &[dir.path().to_path_buf()]
        )
        .is_ok());
    }

    /// Writes a volume's files as a refresh would, with the version their digest names.
    fn write(
        dir: &Path,
        volume: &str,
        files: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), ConfigError> {
        write_files(dir, volume, files, &version_name(files))
    }

    #[test]
    fn a_first_write_makes_the_volume_and_links_its_names_through_data() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("pod/volumes/cfg");
        let files = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("sub/b".to_string(), b"2".to_vec()),
        ]);
        write(&v, "cfg", &files).unwrap();
        assert_eq!(std::fs::read(v.join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(v.join("sub/b")).unwrap(), b"2");
        assert_eq!(
            std::fs::read_link(v.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(
            std::fs::read_link(v.join("sub")).unwrap(),
            Path::new("..data/sub")
        );
        assert_eq!(
            std::fs::read_link(v.join("..data")).unwrap(),
            Path::new(&version_name(&files))
        );
        assert!(!v.join("..data_tmp").exists());
    }

    #[test]
    fn a_mount_whose_path_became_a_symlink_is_refused_at_the_next_start() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("vol/sub")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let mounts = [Mount {
            host_path: root.join("vol/sub"),
            guest_path: "/data".into(),
            read_only: false,
        }];
        recheck_mounts(&mounts).unwrap();
        // A sibling swaps a component for a symlink to somewhere else.
        std::fs::rename(root.join("vol/sub"), root.join("vol/old")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("vol/sub")).unwrap();
        assert!(recheck_mounts(&mounts).is_err());
        // And an inner one.
        std::fs::remove_file(root.join("vol/sub")).unwrap();
        std::fs::rename(root.join("vol"), root.join("vol2")).unwrap();
        std::os::unix::fs::symlink(root.join("vol2"), root.join("vol")).unwrap();
        std::fs::rename(root.join("vol2/old"), root.join("vol2/sub")).unwrap();
        assert!(recheck_mounts(&mounts).is_err());
        // Gone altogether.
        std::fs::remove_file(root.join("vol")).unwrap();
        assert!(recheck_mounts(&mounts).is_err());
    }

    #[test]
    fn volume_files_are_swapped_in_whole_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("cfg");
        let files = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("sub/b".to_string(), b"2".to_vec()),
        ]);
        write(&v, "cfg", &files).unwrap();
        assert_eq!(std::fs::read(v.join("sub/b")).unwrap(), b"2");
        write(
            &v,
            "cfg",
            &BTreeMap::from([("a".to_string(), b"3".to_vec())]),
        )
        .unwrap();
        assert!(!v.join("sub/b").exists());
        assert_eq!(std::fs::read(v.join("a")).unwrap(), b"3");
        // One version is left, behind `..data`, beside the links.
        let names: std::collections::BTreeSet<String> = std::fs::read_dir(&v)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n == "..data" || !n.starts_with(".."))
            .collect();
        assert_eq!(names, ["..data", "a"].map(String::from).into());
        let versions = |v: &Path| {
            std::fs::read_dir(v)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("..") && n != "..data")
                .count()
        };
        assert_eq!(versions(&v), 1);
        // The same files again: nothing is written, the file in place is the same one.
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(v.join("a")).unwrap().ino();
        write(
            &v,
            "cfg",
            &BTreeMap::from([("a".to_string(), b"3".to_vec())]),
        )
        .unwrap();
        assert_eq!(std::fs::metadata(v.join("a")).unwrap().ino(), ino);
        // A link removed from under it is put back.
        std::fs::remove_file(v.join("a")).unwrap();
        write(
            &v,
            "cfg",
            &BTreeMap::from([("a".to_string(), b"3".to_vec())]),
        )
        .unwrap();
        assert_eq!(std::fs::read(v.join("a")).unwrap(), b"3");
        assert_eq!(versions(&v), 1);
        // A directory held open (a component's preopen) sees the new files.
        let held = std::fs::File::open(&v).unwrap();
        write(
            &v,
            "cfg",
            &BTreeMap::from([("a".to_string(), b"4".to_vec())]),
        )
        .unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&held);
        assert_eq!(
            std::fs::read(format!("/proc/self/fd/{fd}/a")).unwrap(),
            b"4"
        );
        for bad in ["../escape", "..data", "..x/y"] {
            let bad = BTreeMap::from([(bad.to_string(), b"x".to_vec())]);
            assert!(write(&v, "cfg", &bad).is_err());
        }
    }
}
