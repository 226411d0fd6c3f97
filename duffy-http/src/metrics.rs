//! Prometheus metrics: request counts and latency histograms per endpoint,
//! allocation outcomes, and (read at scrape time from the store) nodes per
//! state and pool.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use duffy_core::{Node, NodeState, PoolKey};

use crate::api::ROUTES;

/// How many `endpoint` labels there are: one per route, and `other` for
/// unknown paths (the last).
const ENDPOINTS: usize = ROUTES.len() + 1;

/// The `endpoint` label of index `i` (see [`Metrics::endpoint_index`]).
fn endpoint_label(i: usize) -> &'static str {
    ROUTES.get(i).map_or("other", |r| r.label())
}

/// Upper bounds of the latency histogram buckets, in seconds.
pub const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Allocation outcomes counted.
pub const OUTCOMES: [&str; 8] =
    ["allocated", "insufficient", "rate_limited", "quota", "preparation_failed", "paused", "invalid", "error"];

#[derive(Debug, Default)]
struct EndpointStats {
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// The service's counters. Lock-free; cheap to update on every request.
#[derive(Debug, Default)]
pub struct Metrics {
    endpoints: [EndpointStats; ENDPOINTS],
    outcomes: [AtomicU64; OUTCOMES.len()],
    nodes_allocated: AtomicU64,
    sessions_failed: AtomicU64,
    ignored_parameters: [AtomicU64; ENDPOINTS],
}

impl Metrics {
    /// The index of an `endpoint` label (a route's, see
    /// [`Route::label`](crate::api::Route::label)); any other is `other`.
    pub fn endpoint_index(label: &str) -> usize {
        ROUTES.iter().position(|r| r.label() == label).unwrap_or(ENDPOINTS - 1)
    }

    /// Records one request.
    pub fn observe(&self, endpoint: usize, status: u16, took: Duration) {
        let e = &self.endpoints[endpoint.min(ENDPOINTS - 1)];
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        e.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            e.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        e.count.fetch_add(1, Ordering::Relaxed);
        e.sum_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records an allocation outcome (one of [`OUTCOMES`]).
    pub fn allocation(&self, outcome: &str, nodes: usize) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
        self.nodes_allocated.fetch_add(nodes as u64, Ordering::Relaxed);
    }

    /// Records `n` query parameters that `endpoint` (see
    /// [`Metrics::endpoint_index`]) did not know and ignored.
    pub fn ignored_parameters(&self, endpoint: usize, n: usize) {
        self.ignored_parameters[endpoint.min(ENDPOINTS - 1)].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records a session marked failed by its job.
    pub fn session_failed(&self) {
        self.sessions_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition, with node gauges from `nodes`.
    pub fn render(&self, nodes: &[Node], paused: bool) -> String {
        let mut out = String::with_capacity(8192);
        let _ = writeln!(out, "# HELP duffy_nodes Nodes by state and pool (the image they carry, or none).");
        let _ = writeln!(out, "# TYPE duffy_nodes gauge");
        let mut counts: std::collections::BTreeMap<(NodeState, String), u64> = Default::default();
        for s in NodeState::ALL {
            counts.insert((s, "none".into()), 0);
        }
        for n in nodes {
            let pool = n.image.as_ref().map(PoolKey::to_string).unwrap_or_else(|| "none".into());
            *counts.entry((n.state, pool)).or_default() += 1;
        }
        for ((state, pool), c) in counts {
            let _ = writeln!(out, "duffy_nodes{{state=\"{state}\",pool=\"{pool}\"}} {c}");
        }
        let _ = writeln!(out, "# HELP duffy_paused Whether new allocations are paused.");
        let _ = writeln!(out, "# TYPE duffy_paused gauge");
        let _ = writeln!(out, "duffy_paused {}", u8::from(paused));
        let _ = writeln!(out, "# HELP duffy_allocations_total /Node/get outcomes.");
        let _ = writeln!(out, "# TYPE duffy_allocations_total counter");
        for (i, o) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "duffy_allocations_total{{outcome=\"{o}\"}} {}",
                self.outcomes[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP duffy_nodes_allocated_total Nodes handed out.");
        let _ = writeln!(out, "# TYPE duffy_nodes_allocated_total counter");
        let _ = writeln!(out, "duffy_nodes_allocated_total {}", self.nodes_allocated.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP duffy_sessions_failed_total Sessions marked failed with /Node/fail.");
        let _ = writeln!(out, "# TYPE duffy_sessions_failed_total counter");
        let _ = writeln!(out, "duffy_sessions_failed_total {}", self.sessions_failed.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP duffy_ignored_parameters_total Query parameters a legacy endpoint did not know and ignored."
        );
        let _ = writeln!(out, "# TYPE duffy_ignored_parameters_total counter");
        for (i, r) in ROUTES.iter().enumerate().filter(|(_, r)| r.ignores_unknown_parameters()) {
            let e = r.label();
            let v = self.ignored_parameters[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "duffy_ignored_parameters_total{{endpoint=\"{e}\"}} {v}");
        }
        let _ = writeln!(out, "# HELP duffy_http_requests_total Requests by endpoint and status class.");
        let _ = writeln!(out, "# TYPE duffy_http_requests_total counter");
        for i in 0..ENDPOINTS {
            let e = endpoint_label(i);
            for (c, n) in self.endpoints[i].by_class.iter().enumerate() {
                let v = n.load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(out, "duffy_http_requests_total{{endpoint=\"{e}\",status=\"{}xx\"}} {v}", c + 1);
                }
            }
        }
        let _ = writeln!(out, "# HELP duffy_http_request_duration_seconds Request latency by endpoint.");
        let _ = writeln!(out, "# TYPE duffy_http_request_duration_seconds histogram");
        for i in 0..ENDPOINTS {
            let e = endpoint_label(i);
            let s = &self.endpoints[i];
            let count = s.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let mut cum = 0;
            for (b, le) in BUCKETS.iter().enumerate() {
                cum += s.buckets[b].load(Ordering::Relaxed);
                let _ =
                    writeln!(out, "duffy_http_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"{le}\"}} {cum}");
            }
            let _ = writeln!(out, "duffy_http_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"+Inf\"}} {count}");
            let sum = s.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "duffy_http_request_duration_seconds_sum{{endpoint=\"{e}\"}} {sum}");
            let _ = writeln!(out, "duffy_http_request_duration_seconds_count{{endpoint=\"{e}\"}} {count}");
        }
        out
    }
}
