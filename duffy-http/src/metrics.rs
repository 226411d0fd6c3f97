//! Prometheus metrics, exposed through `prometheus-client` in the
//! Prometheus text format (0.0.4).
//!
//! Why that crate: it is the Prometheus project's own Rust client; it
//! keeps its metrics in a registry the service owns (no global recorder,
//! so several services in one test process keep their counts apart, and
//! the bench builds its own); its label sets are typed structs, so a
//! misspelt label does not compile; and its 0.0.4 encoder writes today's
//! exposition unchanged (names, labels, `endpoint` before `le`, the
//! content type scrapers already accept). `metrics` with
//! `metrics-exporter-prometheus` would have meant a global (or
//! thread-local) recorder and histograms configured by name.
//!
//! What is counted as it happens: requests per route and status class
//! with their latency, allocation outcomes, nodes handed out, sessions
//! failed, ignored query parameters, and, through the reconciler's
//! [`ReconcilerObserver`], installs started by reason, failed attempts and
//! given-up installs by reason, finished installs by outcome, sessions
//! ended by their expiry, and the duration of each reconciler pass. What is read at scrape time
//! ([`FarmReading`]): nodes per state and pool, Ready nodes per pool
//! against its target, live sessions and the oldest one's age, the pause
//! flag, and the store's write path ([`StoreStats`]: batch sizes and fsync
//! latency).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use duffy_backend_sqlite::{HistogramSnapshot, SqliteStore, WriteHistograms};
use duffy_core::{
    AttemptFailure, EngineError, Node, NodeState, OpDone, OpOutcome, PassReport, PoolKey, PoolTarget,
    ReconcilerObserver, Session, SessionState, Timestamp,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::ROUTES;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds of the request latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds of the reconciler pass duration buckets, in seconds: a
/// pass reads a few indexed rows and writes its decisions, milliseconds on
/// a healthy store.
const PASS_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// How a `/Node/get` ended: the `outcome` of `duffy_allocations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Nodes were handed out.
    Allocated,
    /// The pool had too few Ready nodes.
    Insufficient,
    /// The key's rate limit refused it.
    RateLimited,
    /// The project's quota refused it.
    Quota,
    /// Preparing a node for the project failed.
    PreparationFailed,
    /// The service is paused.
    Paused,
    /// The request was invalid (parameters, pool, project).
    Invalid,
    /// Anything else (the store failed, say).
    Error,
}

impl Allocation {
    /// Every outcome: each has a series from the start, at 0.
    pub const ALL: [Allocation; 8] = [
        Allocation::Allocated,
        Allocation::Insufficient,
        Allocation::RateLimited,
        Allocation::Quota,
        Allocation::PreparationFailed,
        Allocation::Paused,
        Allocation::Invalid,
        Allocation::Error,
    ];

    /// The `outcome` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Allocated => "allocated",
            Allocation::Insufficient => "insufficient",
            Allocation::RateLimited => "rate_limited",
            Allocation::Quota => "quota",
            Allocation::PreparationFailed => "preparation_failed",
            Allocation::Paused => "paused",
            Allocation::Invalid => "invalid",
            Allocation::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    state: &'static str,
    pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SessionLabel {
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The label of a status code's class.
fn status_class(status: u16) -> &'static str {
    match status / 100 {
        0 | 1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// What a store tells `/metrics` about its write path. The SQLite store
/// measures operations per group commit and the latency of each fsync of
/// its WAL ([`SqliteStore::write_histograms`]).
pub trait StoreStats: Send + Sync {
    /// The store's write-path distributions so far.
    fn write_histograms(&self) -> WriteHistograms;
}

impl StoreStats for SqliteStore {
    fn write_histograms(&self) -> WriteHistograms {
        SqliteStore::write_histograms(self)
    }
}

/// What `/metrics` reads from the store at each scrape: bounded reads,
/// not the whole farm's rows (Ready nodes are counted by the index the
/// claim uses).
#[derive(Debug, Clone, Default)]
pub struct FarmReading {
    /// Ready nodes per pool ([`Store::ready_counts`]).
    ///
    /// [`Store::ready_counts`]: duffy_core::Store::ready_counts
    pub ready: Vec<(PoolKey, u32)>,
    /// Every node that is not Ready ([`NOT_READY`]).
    pub others: Vec<Node>,
    /// The pools' standby targets.
    pub targets: Vec<PoolTarget>,
    /// Live sessions (allocating, handed out, or held after a failure).
    pub sessions: Vec<Session>,
    /// Whether allocations are paused.
    pub paused: bool,
    /// When it was read, for the sessions' ages.
    pub now: Timestamp,
}

/// Every state but Ready: what [`FarmReading::others`] is read with.
pub const NOT_READY: [NodeState; 6] = [
    NodeState::Active,
    NodeState::Provisioning,
    NodeState::Contextualizing,
    NodeState::Deployed,
    NodeState::Failed,
    NodeState::Reserved,
];

/// The service's counters and histograms, and the rendering of
/// `/metrics`. Cheap to update on every request (atomics behind a
/// read-locked map per labelled family).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histograms<EndpointLabel>,
    allocations: Family<OutcomeLabel, Counter>,
    nodes_allocated: Counter,
    sessions_failed: Counter,
    ignored: Family<EndpointLabel, Counter>,
    installs_started: Family<ReasonLabel, Counter>,
    attempts_failed: Family<ReasonLabel, Counter>,
    installs_failed: Family<ReasonLabel, Counter>,
    installs_finished: Family<OutcomeLabel, Counter>,
    pass_duration: Histogram,
    pass_failures: Counter,
    sessions_expired: Counter,
    /// When the pass under way started (one reconciler per store, so one
    /// pass at a time).
    pass_started: Mutex<Option<Instant>>,
    store: Option<StoreCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(None)
    }
}

impl Metrics {
    /// The service's metrics, with the write path of `store` when it
    /// measures one.
    pub fn new(store: Option<std::sync::Arc<dyn StoreStats>>) -> Self {
        let mut registry = Registry::default();
        // Series created up front (`let _ = family.get_or_create(..)`) are
        // scraped at 0 before their first event, as they always were.
        let allocations = Family::<OutcomeLabel, Counter>::default();
        for o in Allocation::ALL {
            let _ = allocations.get_or_create(&OutcomeLabel { outcome: o.as_str() });
        }
        registry.register("duffy_allocations", "/Node/get outcomes", allocations.clone());
        let nodes_allocated = Counter::default();
        registry.register("duffy_nodes_allocated", "Nodes handed out", nodes_allocated.clone());
        let sessions_failed = Counter::default();
        registry.register("duffy_sessions_failed", "Sessions marked failed with /Node/fail", sessions_failed.clone());
        let ignored = Family::<EndpointLabel, Counter>::default();
        for r in ROUTES.iter().filter(|r| r.ignores_unknown_parameters()) {
            let _ = ignored.get_or_create(&EndpointLabel { endpoint: r.label() });
        }
        registry.register(
            "duffy_ignored_parameters",
            "Query parameters a legacy endpoint did not know and ignored",
            ignored.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("duffy_http_requests", "Requests by endpoint and status class", requests.clone());
        let latency: Histograms<EndpointLabel> = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("duffy_http_request_duration_seconds", "Request latency by endpoint", latency.clone());

        let installs_started = Family::<ReasonLabel, Counter>::default();
        for reason in ["fill", "stale", "restart"] {
            let _ = installs_started.get_or_create(&ReasonLabel { reason });
        }
        registry.register(
            "duffy_installs_started",
            "Installs the reconciler started: to fill a pool's deficit, to replace a stale Ready node, or to \
             take over one a restart interrupted",
            installs_started.clone(),
        );
        let attempts_failed = Family::<ReasonLabel, Counter>::default();
        let installs_failed = Family::<ReasonLabel, Counter>::default();
        for reason in [attempt_reason(AttemptFailure::Installer), attempt_reason(AttemptFailure::TimedOut)] {
            let _ = attempts_failed.get_or_create(&ReasonLabel { reason });
            let _ = installs_failed.get_or_create(&ReasonLabel { reason });
        }
        registry.register(
            "duffy_install_attempts_failed",
            "Failed install attempts: the installer said so, or the attempt ran past install_timeout",
            attempts_failed.clone(),
        );
        registry.register(
            "duffy_installs_failed",
            "Installs given up after their last attempt (the node is Failed), by that attempt's reason",
            installs_failed.clone(),
        );
        let installs_finished = Family::<OutcomeLabel, Counter>::default();
        for outcome in ["installed", "failed", "superseded", "store_error"] {
            let _ = installs_finished.get_or_create(&OutcomeLabel { outcome });
        }
        registry.register(
            "duffy_installs_finished",
            "Installs that ended: the node Ready, Failed, taken by someone else meanwhile, or its result not \
             recorded",
            installs_finished.clone(),
        );
        let pass_duration = Histogram::new(PASS_BUCKETS);
        registry.register(
            "duffy_reconciler_pass_duration_seconds",
            "Time a reconciler pass takes to read, plan and start its operations",
            pass_duration.clone(),
        );
        let pass_failures = Counter::default();
        registry.register("duffy_reconciler_pass_failures", "Reconciler passes that failed", pass_failures.clone());
        let sessions_expired = Counter::default();
        registry.register(
            "duffy_sessions_expired",
            "Sessions the reconciler ended because their lifetime ran out (nodes reinstalled)",
            sessions_expired.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            allocations,
            nodes_allocated,
            sessions_failed,
            ignored,
            installs_started,
            attempts_failed,
            installs_failed,
            installs_finished,
            pass_duration,
            pass_failures,
            sessions_expired,
            pass_started: Mutex::new(None),
            store: store.map(StoreCollector),
        }
    }

    /// Records one request to the route labelled `endpoint` (a
    /// [`Route::label`](crate::api::Route::label), or `other`).
    pub fn observe(&self, endpoint: &'static str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { endpoint, status: status_class(status) }).inc();
        self.latency.get_or_create(&EndpointLabel { endpoint }).observe(took.as_secs_f64());
    }

    /// Records how a `/Node/get` ended, and the nodes it handed out.
    pub fn allocation(&self, outcome: Allocation, nodes: usize) {
        self.allocations.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
        self.nodes_allocated.inc_by(nodes as u64);
    }

    /// Records `n` query parameters that the route labelled `endpoint` did
    /// not know and ignored.
    pub fn ignored_parameters(&self, endpoint: &'static str, n: usize) {
        self.ignored.get_or_create(&EndpointLabel { endpoint }).inc_by(n as u64);
    }

    /// Records a session marked failed by its job.
    pub fn session_failed(&self) {
        self.sessions_failed.inc();
    }

    /// The Prometheus text exposition: what was counted, and the gauges of
    /// `farm` and of the store.
    pub fn render(&self, farm: &FarmReading) -> String {
        let mut scrape = Registry::default();
        register_farm(&mut scrape, farm);
        if let Some(store) = &self.store {
            scrape.register_collector(Box::new(store.clone()));
        }
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail, nor can the encoders but through
        // it; an error would only cut the text short, never panic.
        let _ = prometheus_text::encode(&mut out, &scrape);
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The gauges read at scrape time, in a registry of their own made for
/// the scrape, so nothing stale survives from an earlier one.
fn register_farm(reg: &mut Registry, farm: &FarmReading) {
    let mut counts: BTreeMap<(NodeState, String), i64> = NodeState::ALL.iter().map(|s| ((*s, none()), 0)).collect();
    for (pool, n) in &farm.ready {
        *counts.entry((NodeState::Ready, pool.to_string())).or_default() += i64::from(*n);
    }
    for n in &farm.others {
        let pool = n.image.as_ref().map_or_else(none, PoolKey::to_string);
        *counts.entry((n.state, pool)).or_default() += 1;
    }
    let nodes = Family::<NodeLabels, Gauge>::default();
    for ((state, pool), c) in counts {
        nodes.get_or_create(&NodeLabels { state: state.as_str(), pool }).set(c);
    }
    reg.register("duffy_nodes", "Nodes by state and pool (the image they carry, or none)", nodes);

    let paused = Gauge::<i64>::default();
    paused.set(i64::from(farm.paused));
    reg.register("duffy_paused", "Whether new allocations are paused", paused);

    let ready = Family::<PoolLabel, Gauge>::default();
    let target = Family::<PoolLabel, Gauge>::default();
    for t in &farm.targets {
        let _ = ready.get_or_create(&PoolLabel { pool: t.pool.to_string() });
        target.get_or_create(&PoolLabel { pool: t.pool.to_string() }).set(i64::from(t.standby));
    }
    for (pool, n) in &farm.ready {
        ready.get_or_create(&PoolLabel { pool: pool.to_string() }).set(i64::from(*n));
    }
    reg.register("duffy_pool_ready", "Ready nodes per pool (compare with duffy_pool_target)", ready);
    reg.register("duffy_pool_target", "Each pool's standby target: the Ready nodes it should have", target);

    let live = Family::<SessionLabel, Gauge>::default();
    let oldest = Family::<SessionLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for state in [SessionState::Allocating, SessionState::Prod, SessionState::Fail] {
        let _ = live.get_or_create(&SessionLabel { state: state.as_str() });
    }
    for s in &farm.sessions {
        let label = SessionLabel { state: s.state.as_str() };
        live.get_or_create(&label).inc();
        let age = farm.now.since(s.created_at).as_secs_f64();
        let g = oldest.get_or_create(&label);
        if age > g.get() {
            g.set(age);
        }
    }
    reg.register("duffy_sessions", "Live sessions by state (Allocating, Prod, Fail)", live);
    reg.register(
        "duffy_oldest_session_age_seconds",
        "Age of the oldest live session in each state, since it was created",
        oldest,
    );
}

fn none() -> String {
    "none".to_string()
}

fn attempt_reason(why: AttemptFailure) -> &'static str {
    match why {
        AttemptFailure::Installer => "installer",
        AttemptFailure::TimedOut => "timeout",
    }
}

impl ReconcilerObserver for Metrics {
    fn pass_started(&self) {
        *self.pass_started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn pass_finished(&self, result: Result<&PassReport, &EngineError>) {
        if let Some(started) = self.pass_started.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.pass_duration.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(r) => {
                let started = &self.installs_started;
                let fill = r.installs_started.saturating_sub(r.stale_installs_started);
                started.get_or_create(&ReasonLabel { reason: "fill" }).inc_by(fill as u64);
                started.get_or_create(&ReasonLabel { reason: "stale" }).inc_by(r.stale_installs_started as u64);
                started.get_or_create(&ReasonLabel { reason: "restart" }).inc_by(r.installs_restarted as u64);
            }
            Err(_) => {
                self.pass_failures.inc();
            }
        }
    }

    fn session_expired(&self, _session: &Session) {
        self.sessions_expired.inc();
    }

    fn install_attempt_failed(&self, _node: &Node, why: AttemptFailure, last: bool) {
        let label = ReasonLabel { reason: attempt_reason(why) };
        self.attempts_failed.get_or_create(&label).inc();
        if last {
            self.installs_failed.get_or_create(&label).inc();
        }
    }

    fn operation_finished(&self, done: &OpDone) {
        if !done.install {
            return;
        }
        let outcome = match done.outcome {
            OpOutcome::Installed => "installed",
            OpOutcome::InstallFailed(_) => "failed",
            OpOutcome::StoreFailed(_) => "store_error",
            _ => "superseded",
        };
        self.installs_finished.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// The store's write-path histograms, read at each scrape.
#[derive(Clone)]
struct StoreCollector(std::sync::Arc<dyn StoreStats>);

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let h = self.0.write_histograms();
        encode_histogram(
            &mut encoder,
            "duffy_store_batch_operations",
            "Write operations per store transaction (group commit batches them).",
            &h.batch_operations,
        )?;
        encode_histogram(
            &mut encoder,
            "duffy_store_fsync_duration_seconds",
            "Time each fsync of the store's write-ahead log takes.",
            &h.fsync_seconds,
        )
    }
}

fn encode_histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code

    use super::*;
    use duffy_core::{KeyId, SessionId};

    #[test]
    fn each_expired_session_is_counted() {
        let m = Metrics::default();
        let s = Session {
            id: SessionId("s".into()),
            project: "p".into(),
            key_id: KeyId(1),
            state: SessionState::Prod,
            pool: PoolKey::new("9", duffy_core::Arch::X86_64, None),
            nodes: vec![],
            created_at: Timestamp(0),
            delivered_at: Some(Timestamp(0)),
            lease_until: Some(Timestamp(10)),
            expires_at: Some(Timestamp(10)),
            hold_until: None,
            ended_at: None,
            end_reason: None,
            version: 2,
        };
        let text = m.render(&FarmReading::default());
        assert!(text.contains("duffy_sessions_expired_total 0\n"), "{text}");
        m.session_expired(&s);
        m.session_expired(&s);
        let text = m.render(&FarmReading::default());
        assert!(text.contains("duffy_sessions_expired_total 2\n"), "{text}");
    }
}
