//! The watch cache: one store watch per resource keeps an in-memory copy of its objects and
//! a ring of its recent changes, and the API server serves watches and lists from them, as
//! kube-apiserver's cacher does.
//!
//! Without it every API watch was a store watch of its own, and every watcher decoded and
//! matched every change of its resource: 5,000 node agents each watching their pods meant
//! 5,000 decodes of each pod update. Here a change is decoded once, kept as one
//! [`Cached`] version (serialised at most once, however many watchers send it), and handed
//! only to the watchers that can match it:
//! - a watcher whose field selector pins a field (`spec.nodeName=NODE`) is indexed by that
//!   field's value, and gets a change only if the object's old or new version has it;
//! - a watcher scoped to a namespace is indexed by `metadata.namespace`;
//! - every other watcher gets every change, and filters it.
//!
//! What the cache answers, and what it leaves to the store:
//! - a watch from "now" (`resourceVersion` unset or 0) starts with the cache's objects;
//!   unset first waits until the cache holds the store's latest revision (a linearizable
//!   read of the revision only), as kube-apiserver's consistent reads from cache do;
//! - a watch from a revision still in the ring replays the ring after it;
//! - lists with `resourceVersion` unset, 0 or NotOlderThan, without a continue token, are
//!   served from memory, in pages whose continue token reads the rest from the store at
//!   the page's revision;
//! - anything else (an older revision, Exact, a resource served in another version than it
//!   is stored, a cache that lags) goes to the store as before, so the cache never changes
//!   an answer, only what it costs.
//!
//! A watcher that leaves [`WATCHER_QUEUE`] changes unsent is closed, as kube-apiserver
//! closes a slow watcher; its client resumes from the last revision it saw. When the
//! cache's own store watch fails it reads the prefix again and closes its watchers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use baton_store::{EventKind, RangeRequest, Revision, WatchEvent};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::error::ApiResult;
use crate::objects::Objects;
use crate::resources::Resource;
use crate::selectors::{field_text, Selectable};

/// Changes kept per resource for watches that resume from a revision.
pub const RING: usize = 8192;
/// Changes a watcher may leave unsent before it is closed as slow.
pub const WATCHER_QUEUE: usize = 4096;
/// How often every watcher hears the cache's revision, which it sends in its next
/// bookmark (their pace is the watcher's: see `rest::BookmarkPace`).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How soon the store tells the cache of revisions that did not touch it: how far behind
/// "the latest" an idle cache can be.
const EAGER_PROGRESS: Duration = Duration::from_millis(5);
/// How long a request waits for the cache to reach the revision it needs before it is
/// served from the store instead.
const CATCH_UP: Duration = Duration::from_millis(500);
/// How long an update waits for the cache to hold what the member's store has applied
/// before it starts from the cached copy anyway (its compare then catches a stale one).
const UPDATE_CATCH_UP: Duration = Duration::from_millis(100);
/// Objects read per store range while the cache loads.
const LOAD_PAGE: usize = 1000;

/// One version of an object, as compact as it can be kept: its JSON (what lists and
/// watchers send) and the few values selectors read. A decoded `serde_json::Value` costs
/// several times its JSON (a B-tree node per JSON object), and the cache holds every
/// object of a resource plus a ring of old versions, so nothing stays decoded; a
/// rendering that needs the whole object (a Table, metadata only) parses it.
#[derive(Debug)]
pub struct Cached {
    json: Bytes,
    /// `metadata.labels`, string values only.
    labels: Box<[(Box<str>, Box<str>)]>,
    /// (dotted path, value as a field selector compares it) for `metadata.name`,
    /// `metadata.namespace` and whatever else the kind lets a field selector name.
    fields: Box<[(Box<str>, Box<str>)]>,
}

impl Cached {
    /// Keeps `value` as JSON, and the values of the fields `selectable` names (by dotted
    /// path).
    pub fn new(value: &Value, selectable: &dyn Fn(&str) -> bool) -> Arc<Self> {
        let labels = Selectable::labels(value)
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        let mut fields = Vec::new();
        selectable_fields(value, &mut String::new(), selectable, &mut fields);
        Arc::new(Self {
            json: Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
            labels,
            fields: fields.into_boxed_slice(),
        })
    }

    /// The object as JSON, shared by every watcher and list that sends this version.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The whole object, parsed again.
    pub fn value(&self) -> Value {
        // It was serialised from a Value here, so it parses.
        serde_json::from_slice(&self.json).unwrap_or_default()
    }

    /// The object with only its `metadata` parsed (the rest is skipped, not built): what
    /// a PartialObjectMetadata rendering needs.
    pub fn metadata_only(&self) -> Value {
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(default)]
            metadata: Value,
        }
        let head: Option<Head> = serde_json::from_slice(&self.json).ok();
        serde_json::json!({"metadata": head.map(|h| h.metadata).unwrap_or_default()})
    }
}

impl Selectable for Cached {
    fn labels(&self) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A field not kept is one no selector may name, or one the object does not have:
    /// either way it compares as "".
    fn field(&self, path: &str) -> std::borrow::Cow<'_, str> {
        self.fields
            .iter()
            .find(|(p, _)| &**p == path)
            .map_or("".into(), |(_, v)| (&**v).into())
    }
}

/// Collects (path, value) for the members of `obj` at the paths `keep` accepts, or that
/// every kind selects on. Field selectors name JSON object members only (never array
/// elements), so arrays are not entered.
fn selectable_fields(
    obj: &Value,
    path: &mut String,
    keep: &dyn Fn(&str) -> bool,
    out: &mut Vec<(Box<str>, Box<str>)>,
) {
    let Some(map) = obj.as_object() else {
        return;
    };
    for (k, child) in map {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k);
        if matches!(path.as_str(), "metadata.name" | "metadata.namespace") || keep(path) {
            out.push((path.as_str().into(), field_text(child).into_owned().into()));
        } else {
            selectable_fields(child, path, keep, out);
        }
        path.truncate(len);
    }
}

/// What one revision did to one key.
#[derive(Debug)]
pub struct Change {
    pub revision: Revision,
    pub key: String,
    pub prev: Option<Arc<Cached>>,
    /// None: deleted.
    pub cur: Option<Arc<Cached>>,
    /// For a delete, the last version at the deleting revision (what `DELETED` carries).
    pub gone: Option<Arc<Cached>>,
}

/// What a watcher receives.
#[derive(Clone, Debug)]
pub enum Message {
    Change(Arc<Change>),
    /// Everything up to this revision has been sent.
    Progress(Revision),
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// With the current objects; `consistent` first catches up with the store's latest.
    Now { consistent: bool },
    /// With the changes after this revision.
    After(Revision),
}

/// A watch served by the cache.
#[derive(Debug)]
pub struct Subscription {
    /// For [`Start::Now`]: the objects in scope, in key order.
    pub initial: Vec<Arc<Cached>>,
    /// For [`Start::After`]: the ring's changes after the revision, in order.
    pub replay: Vec<Arc<Change>>,
    /// The revision `initial` or `replay` brings the watcher to: `rx` has what follows.
    pub revision: Revision,
    pub rx: mpsc::Receiver<Message>,
    inner: Arc<Inner>,
}

impl Subscription {
    /// The cache's revision, if nothing waits in `rx`: then every change up to it was
    /// either received or did not concern this watcher, since changes are sent, and the
    /// revision moved, under the lock taken here. What a bookmark may say without waiting
    /// for the cache's next progress report; None while changes wait.
    pub fn drained_revision(&self) -> Option<Revision> {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        self.rx.is_empty().then_some(state.revision)
    }
}

/// A list served by the cache.
#[derive(Debug)]
pub struct CachedPage {
    pub items: Vec<Arc<Cached>>,
    pub revision: Revision,
    /// The last key of a full page with more keys after it.
    pub more_after: Option<String>,
}

/// How a list picks its revision, as far as the cache is concerned.
#[derive(Clone, Copy, Debug)]
pub enum ListAt {
    /// The latest (a linearizable read of the revision, then memory).
    Latest,
    /// Any revision.
    Any,
    NotOlderThan(Revision),
}

/// What [`WatchCaches::look_up`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    /// Not there, in a cache that has caught up with the store's latest revision.
    Missing,
    /// Not there, and the cache did not catch up within a moment: unknown.
    Behind,
    /// No cache can answer: caching is off, the cache is still loading, or it cannot
    /// be brought up to date at once (over etcd) and did not hold the object. Ask the
    /// store.
    NoCache,
}

/// The caches of all resources, made on first use.
#[derive(Clone, Debug, Default)]
pub struct WatchCaches {
    by_prefix: Arc<Mutex<HashMap<String, Cacher>>>,
    /// While true the caches take in no change ([`WatchCaches::hold`]).
    held: Arc<watch::Sender<bool>>,
    /// Off: everything is served from the store (kube-apiserver's `--watch-cache=false`).
    disabled: bool,
}

impl WatchCaches {
    pub fn disabled() -> Self {
        Self {
            disabled: true,
            ..Self::default()
        }
    }

    /// The cache of `res`, started now if it is the first use; None for a resource served
    /// in another form than it is stored (the cache keeps the stored form).
    pub fn of(&self, objects: &Objects, res: &Resource) -> Option<Cacher> {
        if !self.cacheable(res) {
            return None;
        }
        let prefix = res.key_prefix();
        let mut map = self.by_prefix.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&prefix) {
            if c.made_for(res) {
                return Some(c.clone());
            }
            if let Some(feed) = c.inner.feed.get() {
                feed.abort();
            }
        }
        let cacher = Cacher::start(objects.clone(), prefix.clone(), res, self.held.clone());
        map.insert(prefix, cacher.clone());
        Some(cacher)
    }

    /// Stops every cache taking in changes until the guard is dropped, so that a test can
    /// make the caches fall behind the store, as a loaded server's may.
    #[doc(hidden)]
    pub fn hold(&self) -> Hold {
        self.held.send_replace(true);
        Hold(self.held.clone())
    }

    /// The cache of `res` if one runs already: what a write may read from without
    /// starting a cache as a side effect (a cache starts for lists and watches).
    pub fn running(&self, res: &Resource) -> Option<Cacher> {
        if !self.cacheable(res) {
            return None;
        }
        let map = self.by_prefix.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&res.key_prefix())
            .filter(|c| c.made_for(res))
            .cloned()
    }

    /// The object `name` as a running cache of `res` holds it, with its revision (see
    /// [`Cacher::current`]); None when no cache runs or it does not hold the object.
    pub fn current(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Option<(Value, Revision)> {
        self.running(res)?.current(&res.key(ns, name))
    }

    /// A lookup that an eventually consistent view may answer, as kube-apiserver's Node
    /// authorizer answers from the graph its informers build: `find` on the cache of
    /// `res` (started if need be) as it is, and, only when that finds nothing, once more
    /// after the cache has caught up with the store's latest revision, so that what was
    /// written a moment ago is not taken to be missing. A found answer never waits: a
    /// cache a second behind under load made every such check wait for it and then scan
    /// the store, which fed the load that put it behind.
    pub async fn look_up<T>(
        &self,
        objects: &Objects,
        res: &Resource,
        find: impl Fn(&Cacher) -> Option<T>,
    ) -> Lookup<T> {
        let Some(cacher) = self.of(objects, res) else {
            return Lookup::NoCache;
        };
        if !cacher.reach(None).await {
            // Still loading: the store answers until it has.
            return Lookup::NoCache;
        }
        if let Some(found) = find(&cacher) {
            return Lookup::Found(found);
        }
        if objects.store.is_external() {
            // Over etcd an idle cache hears of progress only every few seconds: waiting
            // for it would hold every miss that long, so a miss asks the store.
            return Lookup::NoCache;
        }
        match cacher.ready_for(ListAt::Latest).await {
            Ok(true) => find(&cacher).map_or(Lookup::Missing, Lookup::Found),
            _ => Lookup::Behind,
        }
    }

    /// [`WatchCaches::current`] once the running cache holds everything this member's
    /// store had applied when asked (for at most [`UPDATE_CATCH_UP`]): where an update
    /// starts. A copy even a moment behind the store fails the write's compare, and such
    /// a failure costs a Raft entry carrying the whole object, then a read of the store,
    /// and a node's status write right after its previous one would often find the cache
    /// a moment behind.
    /// Over etcd, where progress is heard only every few seconds, the copy as it is.
    pub async fn current_applied(
        &self,
        objects: &Objects,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Option<(Value, Revision)> {
        let cacher = self.running(res)?;
        if !objects.store.is_external() {
            let applied = objects.store.local_revision();
            cacher.reach_within(Some(applied), UPDATE_CATCH_UP).await;
        }
        cacher.current(&res.key(ns, name))
    }

    /// The cache of `res` (started now if need be) once it holds everything this
    /// member's store has applied, so that what it answers is what a read of the local
    /// store would: what admission reads on every create instead of the store, as
    /// kube-apiserver's admission plugins read their informers, but never older than
    /// this member's store. None: no cache, or one that did not catch up within a moment
    /// (over etcd always, where an idle cache hears of progress only every few seconds);
    /// read the store.
    pub async fn caught_up(&self, objects: &Objects, res: &Resource) -> Option<Cacher> {
        if objects.store.is_external() {
            return None;
        }
        let applied = objects.store.local_revision();
        let cacher = self.of(objects, res)?;
        cacher.reach(Some(applied)).await.then_some(cacher)
    }

    /// Whether `res` is served from a cache at all (the cache keeps the stored form).
    fn cacheable(&self, res: &Resource) -> bool {
        !self.disabled && !res.converts() && res.strategy.watch_cached()
    }

    /// Objects and watchers per cached resource, for the metrics.
    pub fn sizes(&self) -> Vec<(String, usize, usize)> {
        let map = self.by_prefix.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .map(|c| {
                let s = c.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                (
                    c.inner.resource.clone(),
                    s.objects.len(),
                    s.watchers.senders.len(),
                )
            })
            .collect()
    }
}

/// While it lives, the caches take in no change ([`WatchCaches::hold`]).
#[doc(hidden)]
#[derive(Debug)]
pub struct Hold(Arc<watch::Sender<bool>>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// The cache of one resource.
#[derive(Clone, Debug)]
pub struct Cacher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    prefix: String,
    resource: String,
    /// The definition the cache was made for (see [`Resource::definition_id`]).
    definition_id: String,
    /// What the kind lets field selectors read, kept decoded in each [`Cached`].
    strategy: Arc<dyn crate::strategy::Strategy>,
    /// The task that feeds the cache, stopped when a newer cache replaces this one.
    feed: OnceLock<tokio::task::AbortHandle>,
    state: Mutex<State>,
    /// The revision the cache holds everything up to; None until it has loaded.
    revision: watch::Sender<Option<Revision>>,
    store: baton_store::Store,
    held: Arc<watch::Sender<bool>>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Arc<Cached>>,
    /// The keys of the objects bound to each node (`spec.nodeName`, for pods): what the
    /// Node authorizer asks on every ConfigMap and Secret read of a node.
    by_node: HashMap<Box<str>, BTreeSet<String>>,
    ring: VecDeque<Arc<Change>>,
    /// Every change after this revision is in the ring.
    since: Revision,
    revision: Revision,
    watchers: Watchers,
}

#[derive(Debug, Default)]
struct Watchers {
    next_id: u64,
    senders: HashMap<u64, mpsc::Sender<Message>>,
    /// Watchers that get every change.
    everything: HashSet<u64>,
    /// field → value → watchers pinned to it.
    pinned: HashMap<String, HashMap<String, HashSet<u64>>>,
    pins: HashMap<u64, (String, String)>,
}

impl Watchers {
    fn add(&mut self, pin: Option<(String, String)>) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let id = self.next_id;
        self.next_id += 1;
        self.senders.insert(id, tx);
        match pin {
            Some((field, value)) => {
                self.pinned
                    .entry(field.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default()
                    .insert(id);
                self.pins.insert(id, (field, value));
            }
            None => {
                self.everything.insert(id);
            }
        }
        rx
    }

    fn remove(&mut self, id: u64) {
        self.senders.remove(&id);
        self.everything.remove(&id);
        if let Some((field, value)) = self.pins.remove(&id) {
            if let Some(values) = self.pinned.get_mut(&field) {
                if let Some(ids) = values.get_mut(&value) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        values.remove(&value);
                    }
                }
                if values.is_empty() {
                    self.pinned.remove(&field);
                }
            }
        }
    }

    /// Sends a change to the watchers that may match it.
    fn dispatch(&mut self, change: &Arc<Change>) {
        let mut targets: Vec<u64> = self.everything.iter().copied().collect();
        for (field, values) in &self.pinned {
            let mut seen: Option<std::borrow::Cow<'_, str>> = None;
            for obj in [&change.prev, &change.cur].into_iter().flatten() {
                let v = obj.field(field);
                if seen.as_deref() == Some(&*v) {
                    continue;
                }
                if let Some(ids) = values.get(&*v) {
                    targets.extend(ids.iter().copied());
                }
                seen = Some(v);
            }
        }
        targets.sort_unstable();
        targets.dedup();
        for id in targets {
            self.send(id, Message::Change(change.clone()));
        }
    }

    fn broadcast(&mut self, msg: Message) {
        let ids: Vec<u64> = self.senders.keys().copied().collect();
        for id in ids {
            self.send(id, msg.clone());
        }
    }

    fn send(&mut self, id: u64, msg: Message) {
        let Some(tx) = self.senders.get(&id) else {
            return;
        };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(watcher = id, "closing a slow watcher");
                self.remove(id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.remove(id),
        }
    }
}

/// Why the cache's own watch stopped.
enum Stop {
    /// The store is shut down: the cache ends.
    Closed,
    Failed(baton_store::Error),
    Decode(crate::error::ApiError),
}

impl Cacher {
    fn start(
        objects: Objects,
        prefix: String,
        res: &Resource,
        held: Arc<watch::Sender<bool>>,
    ) -> Self {
        let (revision, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            prefix,
            resource: res.plural.clone(),
            definition_id: res.definition_id.clone(),
            strategy: res.strategy.clone(),
            feed: OnceLock::new(),
            state: Mutex::new(State::default()),
            revision,
            store: objects.store.clone(),
            held,
        });
        let span = tracing::info_span!("watch_cache", resource = %inner.resource);
        let feed = tokio::spawn(inner.clone().feed(objects).instrument(span));
        let _ = inner.feed.set(feed.abort_handle());
        Self { inner }
    }

    /// Waits until the cache holds everything up to `rev` (any revision if None); false
    /// if it did not within [`CATCH_UP`].
    async fn reach(&self, rev: Option<Revision>) -> bool {
        self.reach_within(rev, CATCH_UP).await
    }

    /// [`Cacher::reach`], waiting at most `within`.
    async fn reach_within(&self, rev: Option<Revision>, within: Duration) -> bool {
        let mut rx = self.inner.revision.subscribe();
        let reached = async {
            rx.wait_for(|have| match (have, rev) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(have), Some(want)) => *have >= want,
            })
            .await
            .is_ok()
        };
        tokio::time::timeout(within, reached).await.unwrap_or(false)
    }

    /// The store's latest revision, read linearizably.
    async fn latest(&self) -> ApiResult<Revision> {
        let page = self
            .inner
            .store
            .range(RangeRequest {
                prefix: self.inner.prefix.clone().into_bytes(),
                start_after: None,
                limit: 1,
                revision: 0,
                serializable: false,
            })
            .await?;
        Ok(page.revision)
    }

    async fn ready_for(&self, at: ListAt) -> ApiResult<bool> {
        let want = match at {
            ListAt::Latest => Some(self.latest().await?),
            ListAt::Any => None,
            ListAt::NotOlderThan(r) => Some(r),
        };
        Ok(self.reach(want).await)
    }

    /// Starts a watch of the keys under `scope` (the resource's prefix, or a namespace's
    /// part of it), indexed by `pin` when its selector pins a field. None: the cache cannot
    /// serve it (the revision left the ring, or the cache lags); ask the store.
    pub async fn subscribe(
        &self,
        start: Start,
        scope: &str,
        pin: Option<(String, String)>,
    ) -> ApiResult<Option<Subscription>> {
        let ready = match start {
            Start::Now { consistent: true } => self.ready_for(ListAt::Latest).await?,
            Start::Now { consistent: false } => self.reach(None).await,
            Start::After(rev) => {
                // Compacted revisions get their 410 from the store, as before.
                if rev < self.inner.store.compact_revision() {
                    return Ok(None);
                }
                self.reach(Some(rev)).await
            }
        };
        if !ready {
            return Ok(None);
        }
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let (initial, replay) = match start {
            Start::Now { .. } => (state.in_scope(scope), Vec::new()),
            Start::After(rev) => {
                if rev < state.since {
                    return Ok(None);
                }
                let replay = state
                    .ring
                    .iter()
                    .filter(|c| c.revision > rev && c.key.starts_with(scope))
                    .cloned()
                    .collect();
                (Vec::new(), replay)
            }
        };
        let rx = state.watchers.add(pin);
        Ok(Some(Subscription {
            initial,
            replay,
            revision: state.revision,
            rx,
            inner: self.inner.clone(),
        }))
    }

    /// Whether this cache was made for `res` as it is defined now: a resource redefined
    /// (a CRD's new generation) may select on other fields than those the cache kept.
    fn made_for(&self, res: &Resource) -> bool {
        self.inner.definition_id == res.definition_id
    }

    /// The object at `key` as the cache holds it now, with its revision: what a change may
    /// start from instead of a read of the store, as kube-apiserver's GuaranteedUpdate
    /// starts from its cached object. It may be behind the store; the write's compare
    /// finds that. None before the cache has loaded, or for a key it does not hold.
    pub fn current(&self, key: &str) -> Option<(Value, Revision)> {
        self.inner.revision.borrow().as_ref()?;
        let obj = {
            let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.objects.get(key)?.clone()
        };
        let value = obj.value();
        let rev = crate::objects::rv_of(&value)?;
        Some((value, rev))
    }

    /// The objects under `scope` bound to `node` (by `spec.nodeName`), from the node
    /// index: as many as the node runs there, however many the scope holds.
    pub fn on_node(&self, node: &str, scope: &str) -> Vec<Arc<Cached>> {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(keys) = state.by_node.get(node) else {
            return Vec::new();
        };
        keys.range(scope.to_string()..)
            .take_while(|k| k.starts_with(scope))
            .filter_map(|k| state.objects.get(k).cloned())
            .collect()
    }

    /// The version of the object at `key` the cache holds now, if it holds one.
    pub fn cached(&self, key: &str) -> Option<Arc<Cached>> {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.objects.get(key).cloned()
    }

    /// The objects under `scope` as the cache holds them now.
    pub fn objects_in(&self, scope: &str) -> Vec<Arc<Cached>> {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_scope(scope)
    }

    /// Lists the objects under `scope` that `keep` accepts, `limit` at most (0: all). None:
    /// the cache cannot serve it in time; ask the store.
    pub async fn list(
        &self,
        at: ListAt,
        scope: &str,
        limit: usize,
        keep: impl Fn(&Cached) -> bool,
    ) -> ApiResult<Option<CachedPage>> {
        if !self.ready_for(at).await? {
            return Ok(None);
        }
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut items = Vec::new();
        let mut more_after = None;
        let mut last = None;
        for (key, obj) in state.range(scope) {
            if limit > 0 && items.len() == limit {
                more_after = last;
                break;
            }
            if keep(obj) {
                items.push(obj.clone());
                last = Some(key.clone());
            }
        }
        Ok(Some(CachedPage {
            items,
            revision: state.revision,
            more_after,
        }))
    }
}

/// The field the cache indexes its objects by (a pod's node).
pub(crate) const NODE_NAME: &str = "spec.nodeName";

/// Adds `key` to `node`'s keys in a node index.
fn index(by_node: &mut HashMap<Box<str>, BTreeSet<String>>, key: &str, node: impl Into<Box<str>>) {
    by_node
        .entry(node.into())
        .or_default()
        .insert(key.to_string());
}

/// The node an object is bound to, if its kind keeps `spec.nodeName` and it has one.
fn bound_to(obj: &Cached) -> Option<&str> {
    obj.fields
        .iter()
        .find(|(p, _)| &**p == NODE_NAME)
        .map(|(_, v)| &**v)
        .filter(|v| !v.is_empty())
}

impl State {
    /// Keeps `obj` at `key`, and its place in the node index.
    fn put(&mut self, key: &str, obj: Arc<Cached>) -> Option<Arc<Cached>> {
        let now = bound_to(&obj).map(Box::<str>::from);
        let prev = self.objects.insert(key.to_string(), obj);
        let was = prev.as_deref().and_then(bound_to);
        if was != now.as_deref() {
            self.unindex(key, was.map(Box::<str>::from));
            if let Some(node) = now {
                index(&mut self.by_node, key, node);
            }
        }
        prev
    }

    /// Drops the object at `key`, and its place in the node index.
    fn take(&mut self, key: &str) -> Option<Arc<Cached>> {
        let prev = self.objects.remove(key)?;
        self.unindex(key, bound_to(&prev).map(Box::<str>::from));
        Some(prev)
    }

    /// The node index of `objects`, as [`State::put`] keeps it.
    fn node_index(objects: &BTreeMap<String, Arc<Cached>>) -> HashMap<Box<str>, BTreeSet<String>> {
        let mut by_node = HashMap::new();
        for (key, obj) in objects {
            if let Some(node) = bound_to(obj) {
                index(&mut by_node, key, node);
            }
        }
        by_node
    }

    fn unindex(&mut self, key: &str, node: Option<Box<str>>) {
        let Some(node) = node else { return };
        if let Some(keys) = self.by_node.get_mut(&node) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(&node);
            }
        }
    }

    fn range<'a>(&'a self, scope: &'a str) -> impl Iterator<Item = (&'a String, &'a Arc<Cached>)> {
        self.objects
            .range(scope.to_string()..)
            .take_while(move |(k, _)| k.starts_with(scope))
    }

    fn in_scope(&self, scope: &str) -> Vec<Arc<Cached>> {
        self.range(scope).map(|(_, o)| o.clone()).collect()
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.watchers.dispatch(&change);
        self.ring.push_back(change);
        while self.ring.len() > RING {
            if let Some(old) = self.ring.pop_front() {
                self.since = old.revision;
            }
        }
    }
}

impl Inner {
    fn keep(&self, obj: &Value) -> Arc<Cached> {
        Cached::new(obj, &|path| self.strategy.field_selectable(path))
    }

    /// Loads the prefix and follows it, reloading after a failed watch, until the store
    /// shuts down.
    async fn feed(self: Arc<Self>, objects: Objects) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let stop = self.load_and_follow(&objects).await;
            let why = match stop {
                Stop::Closed => return,
                Stop::Failed(baton_store::Error::Closed) => return,
                Stop::Failed(e) => baton_kube::error::chain(&e).to_string(),
                Stop::Decode(e) => e.to_string(),
            };
            tracing::warn!(error = %why, "watch cache reloads");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn load(
        &self,
        objects: &Objects,
    ) -> Result<(BTreeMap<String, Arc<Cached>>, Revision), Stop> {
        let mut loaded = BTreeMap::new();
        let mut revision = 0;
        let mut start_after = None;
        loop {
            let page = self
                .store
                .range(RangeRequest {
                    prefix: self.prefix.clone().into_bytes(),
                    start_after: start_after.take(),
                    limit: LOAD_PAGE,
                    revision,
                    serializable: true,
                })
                .await
                .map_err(Stop::Failed)?;
            revision = page.revision;
            for kv in &page.kvs {
                let obj = objects.decode(kv).map_err(Stop::Decode)?;
                loaded.insert(
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    self.keep(&obj),
                );
            }
            if !page.more {
                return Ok((loaded, revision));
            }
            start_after = page.kvs.last().map(|kv| kv.key.clone());
        }
    }

    async fn load_and_follow(&self, objects: &Objects) -> Stop {
        let (loaded, revision) = match self.load(objects).await {
            Ok(l) => l,
            Err(stop) => return stop,
        };
        let mut w =
            match self
                .store
                .watch_progressing(self.prefix.clone(), revision + 1, EAGER_PROGRESS)
            {
                Ok(w) => w,
                Err(e) => return Stop::Failed(e),
            };
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            tracing::debug!(objects = loaded.len(), revision, "watch cache loaded");
            // Watchers of the old contents end; their clients resume from what they saw.
            let by_node = State::node_index(&loaded);
            *state = State {
                objects: loaded,
                by_node,
                since: revision,
                revision,
                ..State::default()
            };
        }
        self.revision.send_replace(Some(revision));
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.tick().await;
        loop {
            let item = tokio::select! {
                item = w.next() => item,
                _ = progress.tick() => {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    let rev = state.revision;
                    state.watchers.broadcast(Message::Progress(rev));
                    continue;
                }
            };
            let Some(item) = item else {
                return Stop::Closed;
            };
            let rev = match item {
                Err(e) => return Stop::Failed(e),
                Ok(WatchEvent::Progress(rev)) => {
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.revision = state.revision.max(rev);
                    state.revision
                }
                Ok(WatchEvent::Events(re)) => {
                    if *self.held.borrow() {
                        let mut held = self.held.subscribe();
                        let _ = held.wait_for(|h| !*h).await;
                    }
                    // Decoded before the lock is taken: lists and new watchers do not
                    // wait on the parsing.
                    let mut puts = Vec::with_capacity(re.events.len());
                    for ev in &re.events {
                        puts.push(match ev.kind {
                            EventKind::Put => match objects.decode(&ev.kv) {
                                Ok(obj) => Some(self.keep(&obj)),
                                Err(e) => return Stop::Decode(e),
                            },
                            EventKind::Delete => None,
                        });
                    }
                    let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    for (ev, put) in re.events.iter().zip(puts) {
                        let key = String::from_utf8_lossy(&ev.kv.key).into_owned();
                        match put {
                            Some(obj) => {
                                let prev = state.put(&key, obj.clone());
                                state.record(Change {
                                    revision: re.revision,
                                    key,
                                    prev,
                                    cur: Some(obj),
                                    gone: None,
                                });
                            }
                            None => {
                                let Some(prev) = state.take(&key) else {
                                    continue;
                                };
                                let mut last = prev.value();
                                crate::objects::set_rv(&mut last, re.revision);
                                state.record(Change {
                                    revision: re.revision,
                                    key,
                                    prev: Some(prev),
                                    cur: None,
                                    gone: Some(self.keep(&last)),
                                });
                            }
                        }
                    }
                    state.revision = state.revision.max(re.revision);
                    state.revision
                }
            };
            self.revision.send_if_modified(|have| {
                let newer = *have != Some(rev);
                *have = Some(rev);
                newer
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(node: &str) -> Arc<Cached> {
        Cached::new(
            &json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {"nodeName": node}}),
            &|p| p == "spec.nodeName",
        )
    }

    #[test]
    fn the_node_index_follows_binds_moves_and_deletes() {
        let mut state = State::default();
        let nodes = |s: &State, node: &str| -> Vec<String> {
            s.by_node
                .get(node)
                .map(|k| k.iter().cloned().collect())
                .unwrap_or_default()
        };
        state.put("/pods/a/p", pod(""));
        assert!(state.by_node.is_empty(), "an unbound pod is on no node");
        state.put("/pods/a/p", pod("n1"));
        state.put("/pods/b/q", pod("n1"));
        assert_eq!(nodes(&state, "n1"), ["/pods/a/p", "/pods/b/q"]);
        state.put("/pods/a/p", pod("n2"));
        assert_eq!(nodes(&state, "n1"), ["/pods/b/q"]);
        assert_eq!(nodes(&state, "n2"), ["/pods/a/p"]);
        assert!(state.take("/pods/b/q").is_some());
        assert!(state.take("/pods/b/q").is_none());
        assert!(
            !state.by_node.contains_key("n1"),
            "an emptied node is dropped"
        );
        let on = |node: &str, scope: &str| -> usize {
            state
                .by_node
                .get(node)
                .map_or(0, |k| k.iter().filter(|k| k.starts_with(scope)).count())
        };
        assert_eq!(on("n2", "/pods/a/"), 1);
        assert_eq!(on("n2", "/pods/b/"), 0);
    }

    fn change(prev: Option<Arc<Cached>>, cur: Option<Arc<Cached>>) -> Arc<Change> {
        Arc::new(Change {
            revision: 7,
            key: "/registry/pods/default/p".into(),
            prev,
            cur,
            gone: None,
        })
    }

    fn pin(node: &str) -> Option<(String, String)> {
        Some(("spec.nodeName".into(), node.into()))
    }

    fn got(rx: &mut mpsc::Receiver<Message>) -> usize {
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    #[test]
    fn a_change_reaches_the_watchers_pinned_to_its_old_or_new_value_and_the_unpinned() {
        let mut w = Watchers::default();
        let mut a = w.add(pin("a"));
        let mut b = w.add(pin("b"));
        let mut c = w.add(pin("c"));
        let mut all = w.add(None);
        // Bound to a: a sees it arrive.
        w.dispatch(&change(Some(pod("")), Some(pod("a"))));
        assert_eq!(
            (got(&mut a), got(&mut b), got(&mut c), got(&mut all)),
            (1, 0, 0, 1)
        );
        // Moved from a to b (as a replaced binding would): both see it, once each.
        w.dispatch(&change(Some(pod("a")), Some(pod("b"))));
        assert_eq!(
            (got(&mut a), got(&mut b), got(&mut c), got(&mut all)),
            (1, 1, 0, 1)
        );
        // Deleted from b.
        w.dispatch(&change(Some(pod("b")), None));
        assert_eq!(
            (got(&mut a), got(&mut b), got(&mut c), got(&mut all)),
            (0, 1, 0, 1)
        );
    }

    #[test]
    fn a_version_keeps_its_json_and_only_the_values_selectors_read() {
        let obj = json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web", "n": 1},
                          "annotations": {"big": "x"}, "resourceVersion": "9"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "i"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready"}]},
        });
        let pods = crate::resources::builtin("Pod");
        let kept = Cached::new(&obj, &|p| pods.strategy.field_selectable(p));
        let fields: Vec<(&str, &str)> = kept.fields.iter().map(|(p, v)| (&**p, &**v)).collect();
        assert_eq!(
            fields,
            [
                ("metadata.name", "p"),
                ("metadata.namespace", "ns"),
                ("spec.nodeName", "n1"),
                ("status.phase", "Running")
            ]
        );
        assert_eq!(kept.labels.len(), 1, "string values only");
        assert_eq!(kept.value(), obj, "the whole object is still there");
        for (labels, fields) in [
            ("app=web", "spec.nodeName=n1,status.phase=Running"),
            ("app!=web", ""),
            ("n", ""),
            ("", "spec.nodeName!=n1"),
            ("", "spec.restartPolicy="),
            ("", "metadata.name=p,metadata.namespace=ns"),
        ] {
            let ls = crate::selectors::LabelSelector::parse(labels).unwrap();
            let fs = crate::selectors::FieldSelector::parse(fields, pods).unwrap();
            assert_eq!(
                ls.matches(&*kept) && fs.matches(&*kept),
                ls.matches(&obj) && fs.matches(&obj),
                "{labels} / {fields}"
            );
        }
    }

    #[test]
    fn a_slow_watcher_is_closed_and_a_gone_one_forgotten() {
        let mut w = Watchers::default();
        let mut slow = w.add(pin("a"));
        let gone = w.add(pin("a"));
        drop(gone);
        for _ in 0..=WATCHER_QUEUE {
            w.dispatch(&change(None, Some(pod("a"))));
        }
        assert!(w.senders.is_empty(), "both are dropped");
        assert!(w.pinned.is_empty() && w.pins.is_empty());
        assert_eq!(
            got(&mut slow),
            WATCHER_QUEUE,
            "what was queued is still read"
        );
        assert!(slow.try_recv().is_err());
    }
}
