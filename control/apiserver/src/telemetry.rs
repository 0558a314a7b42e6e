//! The API server's own Prometheus metrics, served at `/metrics`.
//!
//! Names and labels are kube-apiserver's, so that the dashboards and alerts written for it
//! read Baton's: `apiserver_request_total` and `apiserver_request_duration_seconds` by
//! verb, group, version, resource, subresource and scope (and code, for the counter), and
//! `apiserver_current_inflight_requests` by request kind. The verb is kube-apiserver's
//! cleaned one: `LIST` for a GET of a collection, `WATCH` for a watch, `DELETECOLLECTION`,
//! `APPLY` for a server-side apply, `CONNECT` for exec, attach and port-forward.
//!
//! The embedded store's figures are served beside them, under etcd's names where etcd has
//! one (`etcd_server_has_leader`, `etcd_server_leader_changes_seen_total`,
//! `etcd_mvcc_db_total_size_in_bytes`, ...), read from the store when scraped.
//!
//! Reading `/metrics` is authorized as any non-resource URL is (`get` on `/metrics`).

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// kube-apiserver's buckets for `apiserver_request_duration_seconds`.
const DURATION_BUCKETS: [f64; 37] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.07, 0.08, 0.09,
    0.15, 0.25, 0.3, 0.35, 0.45,
];

/// What a request was, in kube-apiserver's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub endpoint: Endpoint,
    pub dry_run: String,
}

/// What a request asks of which resource: the labels every request metric has, and all
/// that `apiserver_longrunning_requests` has.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Endpoint {
    pub verb: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub scope: String,
    pub component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    #[prometheus(flatten)]
    request: RequestLabels,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    request_kind: String,
}

fn duration_histogram() -> Histogram {
    let mut buckets = DURATION_BUCKETS;
    buckets.sort_by(f64::total_cmp);
    Histogram::new(buckets)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabels {
    member: String,
}

/// The embedded store's series, under etcd's names where etcd has one; set from the
/// store's figures when scraped.
#[derive(Default)]
struct StoreSeries {
    has_leader: Gauge,
    is_leader: Gauge,
    leader_changes: Counter,
    term: Gauge,
    applied: Counter,
    revision: Gauge,
    compact_revision: Gauge,
    db_bytes: Gauge,
    lag: Family<MemberLabels, Gauge>,
    apply_lag: Gauge,
    latencies: Arc<StoreLatencies>,
}

/// The store's latency histograms, encoded as they are at the scrape (the store observes
/// into them; they are handed over with its figures).
#[derive(Debug, Default)]
struct StoreLatencies(std::sync::Mutex<Option<baton_store::Latencies>>);

impl prometheus_client::collector::Collector for StoreLatencies {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Some(l) = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        for (name, help, h) in [
            (
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by WAL.",
                &l.wal_fsync,
            ),
            (
                "etcd_disk_backend_commit_duration_seconds",
                "The latency distributions of commit called by backend.",
                &l.backend_commit,
            ),
            (
                "baton_store_proposal_duration_seconds",
                "From a batch of transactions proposed to its commit and apply.",
                &l.proposal,
            ),
        ] {
            h.encode(encoder.encode_descriptor(name, help, None, h.metric_type())?)?;
        }
        Ok(())
    }
}

impl StoreSeries {
    fn register(&self, r: &mut Registry) {
        let gauges = [
            (
                "etcd_server_has_leader",
                "Whether or not a leader exists. 1 is existence, 0 is not.",
                &self.has_leader,
            ),
            (
                "etcd_server_is_leader",
                "Whether or not this member is a leader. 1 if is, 0 otherwise.",
                &self.is_leader,
            ),
            (
                "baton_store_raft_term",
                "The Raft term this member is in.",
                &self.term,
            ),
            (
                "etcd_debugging_mvcc_current_revision",
                "The current revision of store.",
                &self.revision,
            ),
            (
                "etcd_debugging_mvcc_compact_revision",
                "The revision of the last compaction in store.",
                &self.compact_revision,
            ),
            (
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
                &self.db_bytes,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
        let counters = [
            (
                "etcd_server_leader_changes_seen",
                "The number of leader changes seen.",
                &self.leader_changes,
            ),
            (
                "etcd_server_proposals_applied",
                "The total number of consensus proposals applied.",
                &self.applied,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "baton_store_replication_lag_entries",
            "On the leader: log entries each member has yet to match",
            self.lag.clone(),
        );
        r.register(
            "baton_store_apply_lag_entries",
            "Log entries this member holds and has not applied yet",
            self.apply_lag.clone(),
        );
        r.register_collector(Box::new(self.latencies.clone()));
    }

    fn set(&self, m: &baton_store::StoreMetrics) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let s = &m.status;
        self.has_leader.set(i64::from(s.leader.is_some()));
        self.is_leader.set(i64::from(s.leader == Some(s.id)));
        // Counters follow the store's own totals.
        self.leader_changes
            .inc_by(m.leader_changes.saturating_sub(self.leader_changes.get()));
        self.applied
            .inc_by(s.applied_index.saturating_sub(self.applied.get()));
        self.term.set(n(s.term));
        self.revision.set(s.revision);
        self.compact_revision.set(s.compact_revision);
        self.db_bytes.set(n(m.db_bytes));
        self.apply_lag.set(n(m.apply_lag));
        *self.latencies.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.latencies.clone());
        self.lag.clear();
        for (member, lag) in &m.replication_lag {
            self.lag
                .get_or_create(&MemberLabels {
                    member: member.to_string(),
                })
                .set(n(*lag));
        }
    }
}

/// The API server's metrics and the registry that encodes them.
pub struct ApiMetrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    inflight: Family<KindLabels, Gauge<i64, AtomicI64>>,
    long_running: Family<Endpoint, Gauge<i64, AtomicI64>>,
    objects: Family<ResourceLabels, Gauge>,
    store: StoreSeries,
    /// Priority and fairness's waits and refusals ([`crate::fairness`]).
    pub flow: crate::fairness::FlowMetrics,
    scrape: std::sync::Mutex<()>,
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiMetrics").finish_non_exhaustive()
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<CodeLabels, Counter>::default();
        registry.register(
            "apiserver_request",
            "Counter of apiserver requests broken out for each verb, dry run value, group, version, resource, scope, component, and HTTP response code",
            requests.clone(),
        );
        let durations: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds for each verb, dry run value, group, version, resource, subresource, scope and component",
            durations.clone(),
        );
        let inflight = Family::<KindLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "apiserver_current_inflight_requests",
            "Maximal number of currently used inflight request limit of this apiserver per request kind in last second",
            inflight.clone(),
        );
        let long_running = Family::<Endpoint, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "apiserver_longrunning_requests",
            "Gauge of all active long-running apiserver requests broken out by verb, group, version, resource, scope and component. Not all requests are tracked this way",
            long_running.clone(),
        );
        let objects = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "apiserver_storage_objects",
            "Number of stored objects at the time of last check split by kind",
            objects.clone(),
        );
        let store = StoreSeries::default();
        store.register(&mut registry);
        let flow = crate::fairness::FlowMetrics::default();
        flow.register(&mut registry);
        Self {
            registry,
            requests,
            durations,
            inflight,
            long_running,
            objects,
            store,
            flow,
            scrape: std::sync::Mutex::new(()),
        }
    }
}

/// A request counted in flight until dropped.
#[derive(Debug)]
pub struct InFlight {
    gauge: Gauge<i64, AtomicI64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl ApiMetrics {
    /// Counts a request in flight, by kind (`readOnly` or `mutating`), until the guard
    /// is dropped.
    pub fn in_flight(&self, method: &http::Method) -> InFlight {
        let kind = match *method {
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS => "readOnly",
            _ => "mutating",
        };
        let gauge = self
            .inflight
            .get_or_create(&KindLabels {
                request_kind: kind.into(),
            })
            .clone();
        gauge.inc();
        InFlight { gauge }
    }

    /// Counts a long-running request while it lasts, as kube-apiserver does: a watch
    /// (WATCH), until the guard, held by the response's body, is dropped; a pod's exec,
    /// attach or port-forward (CONNECT), until whoever serves the stream drops it.
    pub fn long_running(&self, l: &RequestLabels) -> Option<InFlight> {
        if !matches!(l.endpoint.verb.as_str(), "WATCH" | "CONNECT") {
            return None;
        }
        let gauge = self.long_running.get_or_create(&l.endpoint).clone();
        gauge.inc();
        Some(InFlight { gauge })
    }

    /// Sets how many objects the store holds per resource (`deployments.apps`).
    fn set_storage_objects(&self, counts: &[(String, u64)]) {
        self.objects.clear();
        for (resource, n) in counts {
            self.objects
                .get_or_create(&ResourceLabels {
                    resource: resource.clone(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// Records one answered request.
    pub fn observe(&self, labels: RequestLabels, code: u16, took: Duration) {
        self.durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.requests
            .get_or_create(&CodeLabels {
                request: labels,
                code: code.to_string(),
            })
            .inc();
    }

    /// The metrics in the text exposition format, with the store's figures and its
    /// objects per resource ([`storage_objects`]) as they are now. One scrape at a time:
    /// setting the figures clears series that another scrape would otherwise encode
    /// half-written.
    pub fn encode(&self, store: &baton_store::StoreMetrics, objects: &[(String, u64)]) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.set_storage_objects(objects);
        self.store.set(store);
        let mut out = String::new();
        // Writing into a String cannot fail. The process's control loops (scheduler,
        // controllers) follow the API server's own families.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        baton_kube::telemetry::encode_into(&mut out);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// How many objects the store holds of each served resource, named as kube-apiserver
/// names them (`pods`, `deployments.apps`); versions of one resource share their objects
/// and are counted once. Counted from the store's key index, without reading a value.
pub fn storage_objects(
    objects: &crate::objects::Objects,
    served: &crate::resources::Served,
) -> Vec<(String, u64)> {
    let mut names = Vec::new();
    let mut prefixes: Vec<Vec<u8>> = Vec::new();
    for r in served.all() {
        let prefix = r.key_prefix().into_bytes();
        if !prefixes.contains(&prefix) {
            names.push(r.qualified());
            prefixes.push(prefix);
        }
    }
    let counts = objects.store.count_prefixes(&prefixes);
    names.into_iter().zip(counts).collect()
}

/// The labels of a request for `target` (None: a path that names no resource), as
/// kube-apiserver's request info would give them.
pub fn labels(
    target: Option<&crate::rest::Target>,
    method: &http::Method,
    query: &std::collections::HashMap<String, String>,
    content_type: &str,
) -> RequestLabels {
    let flag = |k: &str| matches!(query.get(k).map(String::as_str), Some("true" | "1"));
    let sub = target.and_then(|t| t.sub.clone()).unwrap_or_default();
    let named = target.is_some_and(|t| t.name.is_some());
    let verb = match (method.as_str(), target.is_some()) {
        _ if matches!(sub.as_str(), "exec" | "attach" | "portforward" | "proxy") => "CONNECT",
        ("GET", true) if flag("watch") => "WATCH",
        ("GET", true) if !named => "LIST",
        ("DELETE", true) if !named => "DELETECOLLECTION",
        ("PATCH", true) if content_type.starts_with("application/apply-patch") => "APPLY",
        (m, _) => m,
    };
    let (group, version, resource, scope) = match target {
        Some(t) => (
            t.res.group.clone(),
            t.res.version.clone(),
            t.res.plural.clone(),
            if named {
                "resource"
            } else if t.ns.is_some() {
                "namespace"
            } else {
                "cluster"
            },
        ),
        None => (String::new(), String::new(), String::new(), ""),
    };
    RequestLabels {
        endpoint: Endpoint {
            verb: verb.to_string(),
            group,
            version,
            resource,
            subresource: sub,
            scope: scope.to_string(),
            component: "apiserver".into(),
        },
        dry_run: query.get("dryRun").cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn of(method: http::Method, path: &str, query: &[(&str, &str)], ct: &str) -> RequestLabels {
        let served = crate::resources::Registry::new().snapshot();
        let q: HashMap<String, String> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels(crate::rest::route(&served, path).as_ref(), &method, &q, ct)
    }

    #[test]
    fn verbs_and_scopes_are_kube_apiservers() {
        use http::Method;
        let l = of(Method::GET, "/api/v1/namespaces/default/pods", &[], "");
        assert_eq!(
            (
                l.endpoint.verb.as_str(),
                l.endpoint.resource.as_str(),
                l.endpoint.scope.as_str()
            ),
            ("LIST", "pods", "namespace")
        );
        let l = of(Method::GET, "/api/v1/pods", &[("watch", "true")], "");
        assert_eq!(
            (l.endpoint.verb.as_str(), l.endpoint.scope.as_str()),
            ("WATCH", "cluster")
        );
        let l = of(
            Method::GET,
            "/apis/apps/v1/namespaces/d/deployments/web",
            &[],
            "",
        );
        assert_eq!(
            (
                l.endpoint.verb.as_str(),
                l.endpoint.group.as_str(),
                l.endpoint.scope.as_str()
            ),
            ("GET", "apps", "resource")
        );
        let l = of(
            Method::PATCH,
            "/api/v1/namespaces/d/configmaps/c",
            &[],
            "application/apply-patch+yaml",
        );
        assert_eq!(l.endpoint.verb, "APPLY");
        let l = of(Method::DELETE, "/api/v1/namespaces/d/configmaps", &[], "");
        assert_eq!(l.endpoint.verb, "DELETECOLLECTION");
        let l = of(Method::POST, "/api/v1/namespaces/d/pods/p/exec", &[], "");
        assert_eq!(
            (l.endpoint.verb.as_str(), l.endpoint.subresource.as_str()),
            ("CONNECT", "exec")
        );
        let l = of(Method::GET, "/version", &[], "");
        assert_eq!(
            (l.endpoint.verb.as_str(), l.endpoint.resource.as_str()),
            ("GET", "")
        );
    }

    #[test]
    fn requests_are_counted_and_timed_with_their_code() {
        let m = ApiMetrics::default();
        let l = of(
            http::Method::GET,
            "/api/v1/namespaces/default/pods",
            &[],
            "",
        );
        m.observe(l.clone(), 200, Duration::from_millis(3));
        m.observe(l.clone(), 200, Duration::from_millis(4));
        m.observe(l, 403, Duration::from_millis(1));
        {
            let _a = m.in_flight(&http::Method::POST);
            assert!(m
                .encode(&Default::default(), &[])
                .contains(r#"apiserver_current_inflight_requests{request_kind="mutating"} 1"#));
        }
        let text = m.encode(&Default::default(), &[]);
        assert!(
            text.contains(r#"apiserver_request_total{verb="LIST",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver",dry_run="",code="200"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"code="403"} 1"#), "{text}");
        assert!(
            text.contains(r#"apiserver_request_duration_seconds_count{verb="LIST",group="",version="v1",resource="pods",subresource="",scope="namespace",component="apiserver",dry_run=""} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"apiserver_current_inflight_requests{request_kind="mutating"} 0"#));
    }

    #[test]
    fn store_figures_are_served_under_etcds_names() {
        let m = ApiMetrics::default();
        let mut figures = baton_store::StoreMetrics {
            status: baton_store::Status {
                id: 1,
                leader: Some(1),
                term: 3,
                applied_index: 40,
                revision: 17,
                compact_revision: 5,
                members: Vec::new(),
            },
            leader_changes: 2,
            db_bytes: 4096,
            replication_lag: vec![(2, 0), (3, 12)],
            apply_lag: 1,
            latencies: baton_store::Latencies::default(),
        };
        figures.latencies.wal_fsync.observe(0.0015);
        let text = m.encode(&figures, &[]);
        for line in [
            "etcd_server_has_leader 1",
            "etcd_server_is_leader 1",
            "etcd_server_leader_changes_seen_total 2",
            "baton_store_raft_term 3",
            "etcd_server_proposals_applied_total 40",
            "etcd_debugging_mvcc_current_revision 17",
            "etcd_debugging_mvcc_compact_revision 5",
            "etcd_mvcc_db_total_size_in_bytes 4096",
            r#"baton_store_replication_lag_entries{member="3"} 12"#,
            "baton_store_apply_lag_entries 1",
            r#"etcd_disk_wal_fsync_duration_seconds_bucket{le="0.002"} 1"#,
            "etcd_disk_wal_fsync_duration_seconds_count 1",
            "etcd_disk_backend_commit_duration_seconds_count 0",
            "baton_store_proposal_duration_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // The counters follow the store's totals; a member gone from the leader's view
        // is gone from the series.
        figures.status.applied_index = 45;
        figures.replication_lag = vec![(2, 1)];
        let text = m.encode(&figures, &[]);
        assert!(text
            .lines()
            .any(|l| l == "etcd_server_proposals_applied_total 45"));
        assert!(!text.contains(r#"member="3""#), "{text}");
    }
}
