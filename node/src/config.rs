//! What a pod's containers see besides their component: environment and volumes, with
//! ConfigMap, Secret and downward-API references resolved, as the kubelet resolves them.
//!
//! - env: `value` (with `$(VAR)` expansion of earlier variables), `valueFrom`
//!   (`configMapKeyRef`, `secretKeyRef`, `fieldRef`, `resourceFieldRef`) and `envFrom`.
//! - volumes: `emptyDir` (one directory shared by the pod's containers), `configMap`,
//!   `secret` and `downwardAPI` (files written under the pod's directory and mounted
//!   read-only, rewritten by [`refresh_volumes`] when the objects change), `hostPath`,
//!   and `persistentVolumeClaim` (the bound volume: a locally provisioned one lives in
//!   the node's local volume directory, see `baton_kube::storage::LOCAL_VOLUME_PREFIX`).
//!
//! A reference to a missing object or key fails with the object's name, which the node
//! agent reports as `CreateContainerConfigError`; `optional: true` references are skipped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use baton_kube::storage::LOCAL_VOLUME_PREFIX;
use baton_wasm_shim::Mount;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ObjectFieldSelector, PersistentVolume, PersistentVolumeClaim, Pod,
    Secret, Volume,
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

/// Reads ConfigMaps and Secrets of one namespace once per resolution.
struct Objects {
    client: Client,
    namespace: String,
    configmaps: HashMap<String, Option<ConfigMap>>,
    secrets: HashMap<String, Option<Secret>>,
}

impl Objects {
    async fn configmap(&mut self, name: &str) -> Result<Option<&ConfigMap>, ConfigError> {
        if !self.configmaps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
            let cm = api.get_opt(name).await.map_err(|source| ConfigError::Api {
                kind: "configmap",
                name: name.into(),
                source: Box::new(source),
            })?;
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
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            let s = api.get_opt(name).await.map_err(|source| ConfigError::Api {
                kind: "secret",
                name: name.into(),
                source: Box::new(source),
            })?;
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

fn write_files(
    dir: &Path,
    volume: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Io {
        volume: volume.into(),
        source,
    };
    // Written to a fresh directory and swapped in, so a reader never sees half an update.
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    for (name, data) in files {
        if !plain_relative(name) {
            return Err(ConfigError::Volume {
                volume: volume.into(),
                message: format!("path {name:?} leaves the volume"),
            });
        }
        let p = tmp.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&p, data).map_err(io)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(io)
}

/// Writes the pod's configMap, secret and downwardAPI volumes, and makes its emptyDirs.
async fn write_volumes(
    objects: &mut Objects,
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
        } else if let Some(files) = projected(objects, pod, facts, v).await? {
            write_files(&dir, &v.name, &files)?;
            true
        } else {
            continue;
        };
        out.insert(v.name.clone(), (dir, read_only));
    }
    Ok(out)
}

/// The files of a configMap, secret or downwardAPI volume; None for an optional object
/// that does not exist. Other volume types are refused.
async fn projected(
    objects: &mut Objects,
    pod: &Pod,
    facts: &PodFacts,
    v: &Volume,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
    let (kind, name, items, optional) = if let Some(c) = &v.config_map {
        (
            "configmap",
            c.name.clone(),
            c.items.clone(),
            c.optional == Some(true),
        )
    } else if let Some(s) = &v.secret {
        (
            "secret",
            s.secret_name.clone().unwrap_or_default(),
            s.items.clone(),
            s.optional == Some(true),
        )
    } else if let Some(d) = &v.downward_api {
        let mut files = BTreeMap::new();
        for item in d.items.iter().flatten() {
            if let Some(f) = &item.field_ref {
                files.insert(item.path.clone(), field(pod, facts, f)?.into_bytes());
            }
        }
        return Ok(Some(files));
    } else {
        return Err(ConfigError::Volume {
            volume: v.name.clone(),
            message:
                "only emptyDir, configMap, secret, downwardAPI, hostPath and persistentVolumeClaim volumes are supported"
                    .into(),
        });
    };
    let Some(data) = objects.data(kind, &name).await? else {
        return if optional {
            Ok(Some(BTreeMap::new()))
        } else {
            Err(ConfigError::Missing { kind, name })
        };
    };
    Ok(Some(match items {
        None => data,
        Some(items) => {
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
                            name,
                            key: item.key,
                        })
                    }
                }
            }
            files
        }
    }))
}

/// One container's resolved environment and mounts.
#[derive(Debug, Clone, Default)]
pub struct ContainerConfig {
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
}

/// Resolves every container of the pod (init containers included), writing its volumes
/// under `pod_dir`.
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    facts: &PodFacts,
    pod_dir: &Path,
    dirs: HostDirs<'_>,
) -> Result<HashMap<String, ContainerConfig>, ConfigError> {
    let mut objects = Objects {
        client: client.clone(),
        namespace: pod.namespace().unwrap_or_else(|| "default".into()),
        configmaps: HashMap::new(),
        secrets: HashMap::new(),
    };
    let volumes = write_volumes(&mut objects, pod, facts, pod_dir, dirs).await?;
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
        out.insert(c.name.clone(), ContainerConfig { env, mounts });
    }
    Ok(out)
}

/// Checks, just before a container (re)starts, that each of its mounts still resolves to
/// the directory that was checked: a sibling container that shares a volume could
/// otherwise replace a checked subPath by a symlink between a check and a restart.
pub fn recheck_mounts(mounts: &[Mount]) -> Result<(), ConfigError> {
    for m in mounts {
        let now = m.host_path.canonicalize().ok();
        if now.as_deref() != Some(m.host_path.as_path()) {
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
    pod: &Pod,
    facts: &PodFacts,
    pod_dir: &Path,
    dirs: HostDirs<'_>,
) -> Result<(), ConfigError> {
    let mut objects = Objects {
        client: client.clone(),
        namespace: pod.namespace().unwrap_or_else(|| "default".into()),
        configmaps: HashMap::new(),
        secrets: HashMap::new(),
    };
    write_volumes(&mut objects, pod, facts, pod_dir, dirs)
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

    #[test]
    fn volume_files_are_swapped_in_whole_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("cfg");
        let files = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("sub/b".to_string(), b"2".to_vec()),
        ]);
        write_files(&v, "cfg", &files).unwrap();
        assert_eq!(std::fs::read(v.join("sub/b")).unwrap(), b"2");
        write_files(
            &v,
            "cfg",
            &BTreeMap::from([("a".to_string(), b"3".to_vec())]),
        )
        .unwrap();
        assert!(!v.join("sub/b").exists());
        let bad = BTreeMap::from([("../escape".to_string(), b"x".to_vec())]);
        assert!(write_files(&v, "cfg", &bad).is_err());
    }
}
