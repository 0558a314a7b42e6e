//! The loop that turns stored CRDs into served resources, as kube-apiserver's
//! apiextensions controllers (naming, establishing, finalizing) do.
//!
//! Every API server runs it over its store, so each member of an HA control plane serves
//! the same resources: after any change to a CRD it lists all of them and
//! 1. accepts each CRD's names unless an older CRD or a built-in resource of the same
//!    group holds one of them (`NamesAccepted`);
//! 2. serves every accepted CRD's served versions (the registry swaps in one new table);
//! 3. records the outcome in each CRD's status (`NamesAccepted`, `Established`,
//!    `Terminating`, `acceptedNames`), with a compare-and-swap, so that members racing to
//!    write the same status lose nothing;
//! 4. empties a deleted CRD of its objects (each deleted as a client's delete would be:
//!    finalizers first) and then removes the cleanup finalizer, which deletes the CRD.
//!
//! While a CRD is terminating, the loop also wakes every second, since its objects'
//! finalizers are released by other writers it does not watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton_store::RangeRequest;
use serde_json::{json, Value};
use tracing::Instrument;

use super::{resources_of, CLEANUP_FINALIZER};
use crate::error::{ApiError, ApiResult};
use crate::objects::{Objects, ReadAt};
use crate::resources::{self, Resource, BUILTIN};
use crate::table::s;

/// Compiled resources of one CRD, kept while its spec and state are unchanged: compiling
/// rules again on every status write would cost for nothing.
type Cache = HashMap<(String, i64, bool), Result<Vec<Arc<Resource>>, String>>;

/// Serves the stored CRDs, and keeps doing so until the store closes.
pub async fn run(objects: Objects) {
    let crds = resources::builtin("CustomResourceDefinition").clone();
    let mut cache = Cache::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        match pass(&objects, &crds, &mut cache).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "serving CustomResourceDefinitions failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Lists the stored CRDs and serves them, once: an API server does this before it
/// takes requests, so that custom resources are served from its first request.
pub async fn serve_stored(objects: &Objects) -> ApiResult<()> {
    let crds = resources::builtin("CustomResourceDefinition");
    let page = objects
        .list(crds, None, ReadAt::Latest, 0, None, |_| true)
        .await?;
    sync(objects, crds, &page.items, &mut Cache::new()).await;
    Ok(())
}

/// Lists and syncs, then watches; returns Ok when the store is closed.
async fn pass(objects: &Objects, crds: &Resource, cache: &mut Cache) -> ApiResult<()> {
    loop {
        let page = objects
            .list(crds, None, ReadAt::Latest, 0, None, |_| true)
            .await?;
        let terminating = sync(objects, crds, &page.items, cache)
            .instrument(tracing::debug_span!("crd_sync", crds = page.items.len()))
            .await;
        let mut watch = match objects.store.watch(crds.key_prefix(), page.revision + 1) {
            Ok(w) => w,
            Err(baton_store::Error::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let tick = async {
            if terminating {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            ev = watch.next() => match ev {
                None | Some(Err(baton_store::Error::Closed)) => return Ok(()),
                // Any change, a progress mark, or a compaction: list again.
                Some(_) => {}
            },
            _ = tick => {}
        }
    }
}

/// One pass over all CRDs; returns whether any is being deleted.
async fn sync(objects: &Objects, crds: &Resource, items: &[Value], cache: &mut Cache) -> bool {
    let mut ordered: Vec<&Value> = items.iter().collect();
    // A CRD whose names were accepted keeps them (kube checks new names against the
    // accepted ones); between new ones, the older wins, as creation decides.
    let accepted = |c: &Value| {
        c.pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|x| s(x, "/type") == "NamesAccepted" && s(x, "/status") == "True")
    };
    ordered.sort_by_key(|c| {
        (
            !accepted(c),
            s(c, "/metadata/creationTimestamp").to_string(),
            s(c, "/metadata/name").to_string(),
        )
    });
    let mut taken: Vec<(String, String)> = BUILTIN
        .iter()
        .flat_map(|r| {
            let mut names = vec![r.plural.clone(), r.singular.clone(), r.kind.clone()];
            names.extend(r.short_names.iter().cloned());
            names.into_iter().map(|n| (r.group.clone(), n))
        })
        .collect();
    let mut served = Vec::new();
    let mut any_terminating = false;
    let mut live = Vec::new();
    let mut outcomes = Vec::new();
    for crd in ordered {
        let terminating = crd.pointer("/metadata/deletionTimestamp").is_some();
        any_terminating |= terminating;
        let group = s(crd, "/spec/group").to_string();
        let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
        let mut wanted = vec![
            s(&names, "/plural").to_string(),
            s(&names, "/kind").to_string(),
        ];
        if let Some(sg) = names.get("singular").and_then(Value::as_str) {
            wanted.push(sg.to_string());
        }
        wanted.extend(super::strings(names.get("shortNames")));
        let conflict = wanted
            .iter()
            .find(|n| taken.contains(&(group.clone(), (*n).clone())))
            .cloned();
        let key = (
            s(crd, "/metadata/uid").to_string(),
            crd.pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            terminating,
        );
        live.push(key.clone());
        let built = cache
            .entry(key)
            .or_insert_with(|| resources_of(crd, terminating));
        let outcome = match (&conflict, &*built) {
            (Some(name), _) => Err(format!("{name:?} is already in use")),
            (None, Err(e)) => Err(e.clone()),
            (None, Ok(rs)) => {
                taken.extend(wanted.iter().map(|n| (group.clone(), n.clone())));
                served.extend(rs.iter().cloned());
                Ok(())
            }
        };
        outcomes.push((crd, outcome, terminating, built.as_ref().ok().cloned()));
    }
    cache.retain(|k, _| live.contains(k));
    // Served before any status says so: a client that waits for `Established` may send
    // its first object at once, and must not be told the resource does not exist.
    objects.registry.set_custom(served);
    for (crd, outcome, terminating, built) in outcomes {
        if let Err(e) = write_status(objects, crds, crd, &outcome, terminating).await {
            tracing::debug!(error = %e, crd = s(crd, "/metadata/name"), "status not written");
        }
        if terminating {
            if let Err(e) = cleanup(objects, crds, crd, built.as_ref()).await {
                tracing::warn!(error = %e, crd = s(crd, "/metadata/name"), "cleanup failed");
            }
        }
    }
    any_terminating
}

fn condition(type_: &str, ok: bool, reason: &str, message: &str, old: &Value) -> Value {
    let status = if ok { "True" } else { "False" };
    // The transition time moves only when the status does.
    let since = old
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| s(c, "/type") == type_ && s(c, "/status") == status)
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(crate::rest::now()));
    json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
}

async fn write_status(
    objects: &Objects,
    crds: &Resource,
    crd: &Value,
    outcome: &Result<(), String>,
    terminating: bool,
) -> ApiResult<()> {
    let mut conditions = match outcome {
        Ok(()) => vec![
            condition(
                "NamesAccepted",
                true,
                "NoConflicts",
                "no conflicts found",
                crd,
            ),
            condition(
                "Established",
                true,
                "InitialNamesAccepted",
                "the initial names have been accepted",
                crd,
            ),
        ],
        Err(why) => vec![
            condition("NamesAccepted", false, "NameConflict", why, crd),
            condition(
                "Established",
                false,
                "NotAccepted",
                "not all names are accepted",
                crd,
            ),
        ],
    };
    if terminating {
        conditions.push(condition(
            "Terminating",
            true,
            "InstanceDeletionInProgress",
            "CustomResource deletion is in progress",
            crd,
        ));
    }
    let accepted = match outcome {
        Ok(()) => {
            let mut names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
            if names.get("singular").is_none() {
                names["singular"] = json!(s(crd, "/spec/names/kind").to_lowercase());
            }
            if names.get("listKind").is_none() {
                names["listKind"] = json!(format!("{}List", s(crd, "/spec/names/kind")));
            }
            names
        }
        Err(_) => crd
            .pointer("/status/acceptedNames")
            .cloned()
            .unwrap_or(json!({"plural": "", "kind": ""})),
    };
    let mut next = crd.clone();
    next["status"]["conditions"] = json!(conditions);
    next["status"]["acceptedNames"] = accepted;
    if next == *crd {
        return Ok(());
    }
    let rev = crate::objects::rv_of(crd).unwrap_or(0);
    objects
        .replace(crds, None, s(crd, "/metadata/name"), next, rev)
        .await
        .map(|_| ())
}

/// Deletes a terminating CRD's objects, then the CRD itself once none is left.
async fn cleanup(
    objects: &Objects,
    crds: &Resource,
    crd: &Value,
    served: Option<&Vec<Arc<Resource>>>,
) -> ApiResult<()> {
    let name = s(crd, "/metadata/name");
    // Every version shares the store keys; any one of them reaches every object.
    if let Some(res) = served.and_then(|rs| rs.first()) {
        let page = objects
            .store
            .range(RangeRequest {
                prefix: res.key_prefix().into_bytes(),
                start_after: None,
                limit: 0,
                revision: 0,
                serializable: false,
            })
            .await?;
        if !page.kvs.is_empty() {
            for kv in &page.kvs {
                let obj = objects.decode(kv)?;
                delete_object(objects, res, &obj, kv.mod_revision).await?;
            }
            return Ok(());
        }
    }
    let finalizers: Vec<Value> = crd
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
        return Ok(());
    }
    let rest: Vec<Value> = finalizers
        .into_iter()
        .filter(|f| f != CLEANUP_FINALIZER)
        .collect();
    let rev = crate::objects::rv_of(crd).unwrap_or(0);
    if rest.is_empty() {
        objects.remove(crds, None, name, rev, &[]).await?;
    } else {
        let mut next = crd.clone();
        next["metadata"]["finalizers"] = json!(rest);
        objects.replace(crds, None, name, next, rev).await?;
    }
    tracing::info!(
        crd = name,
        "CustomResourceDefinition deleted with its objects"
    );
    Ok(())
}

/// Deletes one custom object as a client's delete would: at once, or, if finalizers hold
/// it, by marking it for their owners to release.
async fn delete_object(objects: &Objects, res: &Resource, obj: &Value, rev: i64) -> ApiResult<()> {
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
    let name = s(obj, "/metadata/name");
    let held = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let result = if !held {
        objects.remove(res, ns, name, rev, &[]).await.map(|_| ())
    } else if obj.pointer("/metadata/deletionTimestamp").is_none() {
        let mut marked = obj.clone();
        marked["metadata"]["deletionTimestamp"] = json!(crate::rest::now());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        objects
            .replace(res, ns, name, marked, rev)
            .await
            .map(|_| ())
    } else {
        Ok(())
    };
    match result {
        // Someone else changed or deleted it: the next pass sees what is left.
        Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => Ok(()),
        other => other,
    }
}
