//! Objects by the UID of their controller, as client-go's informers index them.
//!
//! A ReplicaSet's reconcile needs its own pods. Filtering the whole pod store for them
//! costs every pod in the cluster on every reconcile, and ReplicaSets reconcile on each
//! change to any of their pods: with 150,000 pods that is most of the controller
//! manager's time. This index follows the same watch events as the store, so a
//! reconcile reads only its own objects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::Resource;

type Refs<K> = HashMap<String, HashSet<ObjectRef<K>>>;
type OwnerOf<K> = HashMap<ObjectRef<K>, String>;

struct Index<K: Resource<DynamicType = ()>> {
    by_owner: Refs<K>,
    owner_of: OwnerOf<K>,
    /// A relist in progress: it replaces the index when it is done.
    building: Option<(Refs<K>, OwnerOf<K>)>,
}

/// Which objects each controller owns. Cheap to clone: clones share the index.
pub struct ByController<K: Resource<DynamicType = ()>> {
    inner: Arc<RwLock<Index<K>>>,
}

impl<K: Resource<DynamicType = ()>> Clone for ByController<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Resource<DynamicType = ()>> std::fmt::Debug for ByController<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owners = self.inner.read().map(|ix| ix.by_owner.len()).unwrap_or(0);
        f.debug_struct("ByController")
            .field("owners", &owners)
            .finish()
    }
}

impl<K: Resource<DynamicType = ()>> Default for ByController<K> {
    fn default() -> Self {
        Self {
            inner: Arc::new(RwLock::new(Index {
                by_owner: HashMap::new(),
                owner_of: HashMap::new(),
                building: None,
            })),
        }
    }
}

fn insert<K: Resource<DynamicType = ()>>(
    by_owner: &mut Refs<K>,
    owner_of: &mut OwnerOf<K>,
    obj: &K,
) {
    let key = ObjectRef::from_obj(obj);
    remove(by_owner, owner_of, &key);
    if let Some(owner) = baton_kube::pod::controller_of(obj.meta()) {
        by_owner
            .entry(owner.uid.clone())
            .or_default()
            .insert(key.clone());
        owner_of.insert(key, owner.uid.clone());
    }
}

fn remove<K: Resource<DynamicType = ()>>(
    by_owner: &mut Refs<K>,
    owner_of: &mut OwnerOf<K>,
    key: &ObjectRef<K>,
) {
    if let Some(old) = owner_of.remove(key) {
        if let Some(set) = by_owner.get_mut(&old) {
            set.remove(key);
            if set.is_empty() {
                by_owner.remove(&old);
            }
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone> ByController<K> {
    /// Follows one watch event, as the store's writer does.
    pub fn apply(&self, ev: &watcher::Event<K>) {
        let mut ix = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let ix = &mut *ix;
        match ev {
            watcher::Event::Apply(o) => insert(&mut ix.by_owner, &mut ix.owner_of, o),
            watcher::Event::Delete(o) => {
                remove(&mut ix.by_owner, &mut ix.owner_of, &ObjectRef::from_obj(o))
            }
            watcher::Event::Init => ix.building = Some((HashMap::new(), HashMap::new())),
            watcher::Event::InitApply(o) => {
                if let Some((by_owner, owner_of)) = &mut ix.building {
                    insert(by_owner, owner_of, o);
                }
            }
            watcher::Event::InitDone => {
                if let Some((by_owner, owner_of)) = ix.building.take() {
                    ix.by_owner = by_owner;
                    ix.owner_of = owner_of;
                }
            }
        }
    }

    /// The objects in `store` in namespace `ns` whose controller has `uid`.
    pub fn owned(&self, store: &Store<K>, ns: &str, uid: &str) -> Vec<Arc<K>> {
        let refs: Vec<ObjectRef<K>> = {
            let ix = self.inner.read().unwrap_or_else(|p| p.into_inner());
            ix.by_owner
                .get(uid)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default()
        };
        // The store is the truth: an object the index still names but the store has
        // changed (its owner, its namespace) is left out.
        refs.iter()
            .filter_map(|r| store.get(r))
            .filter(|o| {
                o.meta().namespace.as_deref() == Some(ns)
                    && baton_kube::pod::controller_of(o.meta()).is_some_and(|c| c.uid == uid)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::reflector;
    use serde_json::json;

    fn pod(name: &str, owner: Option<&str>) -> Pod {
        let refs = owner.map(|uid| {
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                    "uid": uid, "controller": true}])
        });
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("{name}-uid"),
                         "ownerReferences": refs}
        }))
        .unwrap()
    }

    fn names(pods: Vec<Arc<Pod>>) -> Vec<String> {
        let mut out: Vec<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn follows_applies_deletes_owner_changes_and_relists() {
        let (store, mut writer) = reflector::store::<Pod>();
        let ix = ByController::<Pod>::default();
        let mut apply = |ev: watcher::Event<Pod>| {
            writer.apply_watcher_event(&ev);
            ix.apply(&ev);
        };
        apply(watcher::Event::Apply(pod("a", Some("rs-1"))));
        apply(watcher::Event::Apply(pod("b", Some("rs-1"))));
        apply(watcher::Event::Apply(pod("c", Some("rs-2"))));
        apply(watcher::Event::Apply(pod("d", None)));
        assert_eq!(names(ix.owned(&store, "ns", "rs-1")), ["a", "b"]);
        assert!(ix.owned(&store, "other", "rs-1").is_empty());
        // Orphaned, adopted elsewhere, deleted.
        apply(watcher::Event::Apply(pod("a", None)));
        apply(watcher::Event::Apply(pod("d", Some("rs-2"))));
        apply(watcher::Event::Delete(pod("c", Some("rs-2"))));
        assert_eq!(names(ix.owned(&store, "ns", "rs-1")), ["b"]);
        assert_eq!(names(ix.owned(&store, "ns", "rs-2")), ["d"]);
        // A relist replaces everything once it is done.
        apply(watcher::Event::Init);
        apply(watcher::Event::InitApply(pod("e", Some("rs-1"))));
        apply(watcher::Event::InitDone);
        assert_eq!(names(ix.owned(&store, "ns", "rs-1")), ["e"]);
        assert!(ix.owned(&store, "ns", "rs-2").is_empty());
    }
}
