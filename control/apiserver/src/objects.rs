//! Objects in the store: JSON values under `/registry/<group>/<plural>/[<ns>/]<name>`, whose
//! `resourceVersion` is the store revision that last wrote them (never stored, always set
//! from the key's mod_revision on read, as the Kubernetes etcd3 storage does).

use std::time::Duration;

use baton_store::{
    Compare, CompareOp, KeyValue, Op, OpResult, Precondition, RangeRequest, ReadOptions, Revision,
    Store, Txn,
};
use serde_json::Value;
use tracing::Instrument;

use crate::error::{ApiError, ApiResult, FieldError};
use crate::resources::{Registry, Resource};
use crate::strategy::Claim;

/// Reads and writes API objects through the store.
#[derive(Clone, Debug)]
pub struct Objects {
    pub store: Store,
    /// What is served: the built-in resources and those CRDs define.
    pub registry: Registry,
    /// Who may do what, for the checks made inside requests (escalation, reviews).
    pub access: crate::access::Access,
    /// What is encrypted at rest, and with which keys (none: everything is plaintext).
    pub encryption: Option<std::sync::Arc<crate::encryption::Encryption>>,
    /// The admission policies and their bindings, compiled.
    pub policies: crate::cache::Cache<crate::policy::Policies>,
    /// How the API server calls node agents (logs, exec, metrics): the cluster CA and
    /// its `system:apiserver` client certificate. None until the PKI is known.
    pub kubelet_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Node agents in this process, reached without TLS (`baton up`).
    pub local_nodes: baton_kube::local_nodes::LocalNodes,
    /// What watches and lists are served from when they can be ([`crate::watchcache`]).
    pub caches: crate::watchcache::WatchCaches,
}

impl Objects {
    /// Objects in `store`, serving the built-in resources until CRDs add more.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            registry: Registry::new(),
            access: crate::access::Access::default(),
            encryption: None,
            policies: crate::cache::Cache::new(crate::policy::PREFIX),
            kubelet_tls: None,
            local_nodes: Default::default(),
            caches: Default::default(),
        }
    }

    /// Encrypts what `encryption` names before it is stored, and decrypts on read.
    pub fn with_encryption(mut self, encryption: crate::encryption::Encryption) -> Self {
        self.encryption = Some(std::sync::Arc::new(encryption));
        self
    }

    /// An object as stored at `kv`, decrypted if it was encrypted.
    pub(crate) fn decode(&self, kv: &KeyValue) -> ApiResult<Value> {
        let plain = match &self.encryption {
            Some(e) => e.open(&kv.key, &kv.value),
            None => crate::encryption::open_plain(&kv.key, &kv.value),
        }
        .map_err(ApiError::internal)?;
        let mut v: Value = serde_json::from_slice(&plain).map_err(ApiError::internal)?;
        set_rv(&mut v, kv.mod_revision);
        Ok(v)
    }

    /// An object read through `res`: stored as the resource's storage version (and
    /// group), it is shown as the version asked (CRD versions convert with `None`: only
    /// `apiVersion` changes; events.k8s.io Events rename their fields).
    pub(crate) fn decode_as(&self, kv: &KeyValue, res: &Resource) -> ApiResult<Value> {
        let mut v = self.decode(kv)?;
        if res.converts() {
            res.strategy.stored_to_served(&mut v);
            v["apiVersion"] = Value::String(res.api_version());
        }
        Ok(v)
    }

    /// What is stored for `obj` at `key`: its storage form, encrypted if configured.
    pub(crate) fn encode(&self, obj: &Value, res: &Resource, key: &str) -> ApiResult<Vec<u8>> {
        let plain = if res.converts() {
            let mut obj = obj.clone();
            res.strategy.served_to_stored(&mut obj);
            obj["apiVersion"] = Value::String(res.stored_api_version());
            serde_json::to_vec(&WithoutRv(&obj))
        } else {
            // Most kinds are stored as served: written from the borrowed object, with no
            // copy of it made to leave out one field.
            serde_json::to_vec(&WithoutRv(obj))
        }
        .map_err(ApiError::internal)?;
        match &self.encryption {
            Some(e) => e
                .seal(&res.qualified(), key.as_bytes(), plain)
                .map_err(ApiError::internal),
            None => Ok(plain),
        }
    }
}

/// An object as stored: without `metadata.resourceVersion`, which the store's revision
/// of the key gives back when it is read.
struct WithoutRv<'a>(&'a Value);

impl serde::Serialize for WithoutRv<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        /// `metadata` without its `resourceVersion`.
        struct Meta<'a>(&'a serde_json::Map<String, Value>);
        impl serde::Serialize for Meta<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let len = self.0.len() - usize::from(self.0.contains_key("resourceVersion"));
                let mut m = s.serialize_map(Some(len))?;
                for (k, v) in self.0.iter().filter(|(k, _)| *k != "resourceVersion") {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
        let Value::Object(map) = self.0 else {
            return self.0.serialize(s);
        };
        let mut m = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            match v {
                Value::Object(meta) if k == "metadata" => m.serialize_entry(k, &Meta(meta))?,
                _ => m.serialize_entry(k, v)?,
            }
        }
        m.end()
    }
}

pub(crate) fn set_rv(obj: &mut Value, rev: Revision) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rev.to_string()));
    }
}

/// The revision in an object's `metadata.resourceVersion`, if it is one.
pub(crate) fn rv_of(obj: &Value) -> Option<Revision> {
    obj.pointer("/metadata/resourceVersion")?
        .as_str()?
        .parse()
        .ok()
}

/// How a read picks its revision (`resourceVersion` and `resourceVersionMatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// Unset: the latest, linearizable.
    Latest,
    /// "0": any revision; served from the local member.
    Any,
    /// At least this revision.
    NotOlderThan(Revision),
    /// Exactly this revision (may be compacted: 410).
    Exact(Revision),
}

impl ReadAt {
    pub fn parse(rv: Option<&str>, rv_match: Option<&str>) -> ApiResult<Self> {
        let rv = match rv {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?,
            ),
        };
        match (rv, rv_match) {
            (None, None | Some("")) => Ok(ReadAt::Latest),
            (None, Some(m)) => Err(ApiError::bad_request(format!(
                "resourceVersionMatch {m} is forbidden when resourceVersion is not provided"
            ))),
            (Some(0), None | Some("") | Some("NotOlderThan")) => Ok(ReadAt::Any),
            (Some(0), Some("Exact")) => Err(ApiError::bad_request(
                "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
            )),
            (Some(n), None | Some("") | Some("NotOlderThan")) => Ok(ReadAt::NotOlderThan(n)),
            (Some(n), Some("Exact")) => Ok(ReadAt::Exact(n)),
            (_, Some(m)) => Err(ApiError::bad_request(format!(
                "unsupported resourceVersionMatch {m:?}"
            ))),
        }
    }
}

/// The continue token: where the next page starts and the revision all pages read at.
pub(crate) fn encode_continue(rev: Revision, after: &[u8]) -> String {
    use base64::Engine;
    let token =
        serde_json::json!({"v": "baton/1", "rv": rev, "start": String::from_utf8_lossy(after)});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

pub(crate) fn decode_continue(token: &str) -> ApiResult<(Revision, Vec<u8>)> {
    use base64::Engine;
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rev = v.get("rv").and_then(Value::as_i64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rev, start.as_bytes().to_vec()))
}

/// One page of a list.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    pub revision: Revision,
    pub continue_token: Option<String>,
}

impl Objects {
    async fn wait_for_revision(&self, rev: Revision) -> ApiResult<()> {
        // NotOlderThan a revision this member has not applied yet: wait briefly, as the
        // watch cache does, then give up with the Kubernetes "too large" answer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.store.local_revision() < rev {
            if tokio::time::Instant::now() > deadline {
                return Err(ApiError::Timeout {
                    message: format!(
                        "Too large resource version: {rev}, current: {}",
                        self.store.local_revision()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn read_options(at: ReadAt) -> ReadOptions {
        match at {
            ReadAt::Latest => ReadOptions {
                revision: 0,
                serializable: false,
            },
            ReadAt::Any | ReadAt::NotOlderThan(_) => ReadOptions {
                revision: 0,
                serializable: true,
            },
            ReadAt::Exact(r) => ReadOptions {
                revision: r,
                serializable: true,
            },
        }
    }

    /// Reads one object; None if absent.
    pub async fn get(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        at: ReadAt,
    ) -> ApiResult<Option<(Value, Revision)>> {
        if let ReadAt::NotOlderThan(r) = at {
            self.wait_for_revision(r).await?;
        }
        let key = res.key(ns, name);
        let (kv, _) = self
            .store
            .get_with_revision(key.as_bytes(), Self::read_options(at))
            .await?;
        kv.map(|kv| Ok((self.decode_as(&kv, res)?, kv.mod_revision)))
            .transpose()
    }

    /// One object as this member's store holds it now (as [`ReadAt::Any`] reads it),
    /// from the resource's watch cache once that has caught up with the store
    /// ([`crate::watchcache::WatchCaches::caught_up`]): what admission reads on every
    /// create, for no store read.
    pub async fn get_local(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<Option<Value>> {
        if let Some(cache) = self.caches.caught_up(self, res).await {
            return Ok(cache.current(&res.key(ns, name)).map(|(v, _)| v));
        }
        Ok(self.get(res, ns, name, ReadAt::Any).await?.map(|(v, _)| v))
    }

    /// One object from this member's store as [`Objects::get_local`] reads it, or, when
    /// it is not there, at the latest revision: what kube-apiserver's authenticators and
    /// token requests do with their informers, a live lookup on a miss, so that an
    /// object created a moment ago through another member is not taken to be missing.
    pub async fn get_local_or_latest(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<Option<Value>> {
        match self.get_local(res, ns, name).await? {
            Some(found) => Ok(Some(found)),
            None => Ok(self
                .get(res, ns, name, ReadAt::Latest)
                .await?
                .map(|(v, _)| v)),
        }
    }

    /// [`Objects::get_local_or_latest`], with 404 when the object is not found.
    pub async fn get_known(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<Value> {
        self.get_local_or_latest(res, ns, name)
            .await?
            .ok_or_else(|| not_found(res, name))
    }

    /// The objects of `res` in `ns` (all namespaces if None) as this member's store
    /// holds them now, from the watch cache as [`Objects::get_local`] reads.
    pub async fn list_local(&self, res: &Resource, ns: Option<&str>) -> ApiResult<Vec<Value>> {
        if let Some(cache) = self.caches.caught_up(self, res).await {
            let scope = res.key_prefix_in(ns);
            return Ok(cache.objects_in(&scope).iter().map(|o| o.value()).collect());
        }
        Ok(self
            .list(res, ns, ReadAt::Any, 0, None, |_| true)
            .await?
            .items)
    }

    pub async fn get_or_404(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<(Value, Revision)> {
        self.get(res, ns, name, ReadAt::Latest)
            .await?
            .ok_or_else(|| not_found(res, name))
    }

    /// Lists objects, filtered by `keep`, in pages of `limit` (0: all).
    pub async fn list(
        &self,
        res: &Resource,
        ns: Option<&str>,
        at: ReadAt,
        limit: usize,
        cont: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> ApiResult<Page> {
        let prefix = res.key_prefix_in(ns);
        let (mut revision, mut start_after) = match cont {
            Some(c) => {
                let (rev, after) = decode_continue(c)?;
                (rev, Some(after))
            }
            None => (0, None),
        };
        let mut serializable = false;
        if cont.is_none() {
            match at {
                ReadAt::Latest => {}
                ReadAt::Any => serializable = true,
                ReadAt::NotOlderThan(r) => {
                    self.wait_for_revision(r).await?;
                    serializable = true;
                }
                ReadAt::Exact(r) => {
                    revision = r;
                    serializable = true;
                }
            }
        } else {
            serializable = true;
        }
        let mut items = Vec::new();
        loop {
            let want = if limit == 0 {
                0
            } else {
                (limit - items.len()).max(1)
            };
            let page = self
                .store
                .range(RangeRequest {
                    prefix: prefix.clone().into_bytes(),
                    start_after: start_after.clone(),
                    limit: want,
                    revision,
                    serializable,
                })
                .await?;
            revision = page.revision;
            let last = page.kvs.last().map(|kv| kv.key.clone());
            for kv in &page.kvs {
                let obj = self.decode_as(kv, res)?;
                if keep(&obj) {
                    items.push(obj);
                }
            }
            if !page.more {
                return Ok(Page {
                    items,
                    revision,
                    continue_token: None,
                });
            }
            start_after = last;
            if limit > 0 && items.len() >= limit {
                let token = encode_continue(revision, start_after.as_deref().unwrap_or_default());
                return Ok(Page {
                    items,
                    revision,
                    continue_token: Some(token),
                });
            }
        }
    }

    /// Creates an object, with the range values it claims, in one transaction: 409
    /// AlreadyExists if the object's key is taken; if a claimed value was taken meanwhile,
    /// 422 for a value the object asked for, or a Conflict for a picked one (pick again).
    /// The object is taken and given back as written, with its resourceVersion, so that
    /// a write makes no copy of it.
    pub async fn create(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        claims: &[Claim],
    ) -> ApiResult<Value> {
        let key = res.key(ns, name);
        let txn = Txn::new()
            .when(
                std::iter::once(Compare::absent(key.clone()))
                    .chain(claims.iter().map(|c| Compare::absent(c.key.clone()))),
            )
            .and_then(
                std::iter::once(Op::put(key.clone(), self.encode(&obj, res, &key)?))
                    .chain(claims.iter().map(|c| Op::put(c.key.clone(), key.clone()))),
            )
            .or_else(
                std::iter::once(Op::get(key.clone()))
                    .chain(claims.iter().map(|c| Op::get(c.key.clone()))),
            );
        let resp = self
            .store
            .txn(txn)
            .instrument(commit_span("create", &key))
            .await?;
        if resp.succeeded {
            set_rv(&mut obj, resp.revision);
            return Ok(obj);
        }
        let present = |r: Option<&OpResult>| matches!(r, Some(OpResult::Get { kv: Some(_) }));
        if present(resp.results.first()) {
            return Err(ApiError::AlreadyExists {
                group: res.group.clone(),
                resource: res.plural.clone(),
                name: name.into(),
            });
        }
        let taken = claims
            .iter()
            .zip(resp.results.iter().skip(1))
            .find(|(_, r)| present(Some(r)))
            .map(|(c, _)| c);
        match taken {
            Some(c) if c.requested => Err(ApiError::Invalid {
                group: res.group.clone(),
                kind: res.kind.clone(),
                name: name.into(),
                causes: vec![FieldError::invalid(c.field, &c.value, c.taken)],
            }),
            _ => Err(conflict(res, name)),
        }
    }

    /// Replaces an object if it is still at `expected` (its mod revision); the object is
    /// given back as written, as by [`Objects::create`].
    pub async fn replace(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        expected: Revision,
    ) -> ApiResult<Value> {
        let key = res.key(ns, name);
        let value = self.encode(&obj, res, &key)?;
        let span = commit_span("update", &key);
        match self
            .store
            .put_if(key, value, Precondition::ModRevision(expected))
            .instrument(span)
            .await
        {
            Ok(rev) => {
                set_rv(&mut obj, rev);
                Ok(obj)
            }
            Err(baton_store::Error::Conflict {
                current_revision: 0,
                ..
            }) => Err(not_found(res, name)),
            Err(baton_store::Error::Conflict { .. }) => Err(conflict(res, name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes an object if it is still at `expected`, with the range values it holds
    /// (`held`), in one transaction; returns the deletion revision.
    pub async fn remove(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        expected: Revision,
        held: &[String],
    ) -> ApiResult<Revision> {
        let key = res.key(ns, name);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then(
                std::iter::once(Op::delete(key.clone()))
                    .chain(held.iter().map(|k| Op::delete(k.clone()))),
            )
            .or_else([Op::get(key.clone())]);
        let resp = self
            .store
            .txn(txn)
            .instrument(commit_span("delete", &key))
            .await?;
        if resp.succeeded {
            return Ok(resp.revision);
        }
        match resp.results.first() {
            Some(OpResult::Get { kv: Some(_) }) => Err(conflict(res, name)),
            _ => Err(not_found(res, name)),
        }
    }
}

/// The span of one write's round through the store: proposed, replicated by Raft to a
/// quorum, applied. In a trace it shows how much of a request the commit was.
fn commit_span(op: &'static str, key: &str) -> tracing::Span {
    tracing::info_span!(target: baton_kube::trace::TARGET, "store_commit", op, key)
}

pub(crate) fn not_found(res: &Resource, name: &str) -> ApiError {
    ApiError::NotFound {
        group: res.group.clone(),
        resource: res.plural.clone(),
        name: name.into(),
    }
}

pub(crate) fn conflict(res: &Resource, name: &str) -> ApiError {
    let qualified = res.qualified();
    ApiError::Conflict {
        group: res.group.clone(),
        resource: res.plural.clone(),
        name: name.into(),
        message: format!("Operation cannot be fulfilled on {qualified} {name:?}: the object has been modified; please apply your changes to the latest version and try again"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_object_is_stored_without_its_resource_version_and_with_all_else() {
        let obj = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "resourceVersion": "42", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "resourceVersion": "kept"}]}});
        let stored: Value =
            serde_json::from_slice(&serde_json::to_vec(&WithoutRv(&obj)).unwrap()).unwrap();
        let mut want = obj.clone();
        want["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        assert_eq!(stored, want);
        // Not an object (never stored, but not refused here either).
        assert_eq!(
            serde_json::to_string(&WithoutRv(&json!([1]))).unwrap(),
            "[1]"
        );
    }
}
