//! The `berth_peer_*` families: how the location's replicas serve each other. Registered into
//! the one registry of `metrics::Metrics`; the labels are the closed set `RESULTS`.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

/// Outcomes of a peer request as the asker saw it: the owner served it from its cache (`hit`)
/// or from a fill (`fill`; for a HEAD, from its upstream's HEAD), the asker fell back to the upstream (`fallback`), or the owner
/// refused it (`refused`: not configured there, denied, too busy).
pub const RESULTS: [&str; 4] = ["hit", "fill", "fallback", "refused"];

/// Outcomes of a request to the parent tier.
pub const PARENT_RESULTS: [&str; 3] = ["served", "refused", "fallback"];

pub struct ClusterMetrics {
    pub requests: IntCounterVec,
    pub parent_requests: IntCounterVec,
    pub bytes: prometheus::IntCounter,
    pub time_to_first_byte: Histogram,
    pub ring_size: IntGauge,
}

impl ClusterMetrics {
    pub fn new(registry: &Registry) -> ClusterMetrics {
        let metrics = ClusterMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "berth_peer_requests_total",
                    "Peer requests this replica sent to a blob's owner, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            parent_requests: IntCounterVec::new(
                Opts::new(
                    "berth_parent_requests_total",
                    "Blob requests this replica sent to its parent tier, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            bytes: prometheus::IntCounter::new(
                "berth_peer_bytes_total",
                "Blob bytes received from peers, as they arrive",
            )
            .expect("valid metric"),
            time_to_first_byte: Histogram::with_opts(
                HistogramOpts::new(
                    "berth_peer_time_to_first_byte_seconds",
                    "Time from a peer request to the owner's response head",
                )
                .buckets(vec![0.001, 0.005, 0.02, 0.1, 0.5, 1.0, 5.0, 30.0]),
            )
            .expect("valid metric"),
            ring_size: IntGauge::new("berth_peer_ring_size", "Members listed in the ring")
                .expect("valid metric"),
        };
        for result in RESULTS {
            metrics.requests.with_label_values(&[result]);
        }
        for result in PARENT_RESULTS {
            metrics.parent_requests.with_label_values(&[result]);
        }
        // A second registration (tests opening two states on one registry) is harmless.
        let _ = registry.register(Box::new(metrics.requests.clone()));
        let _ = registry.register(Box::new(metrics.bytes.clone()));
        let _ = registry.register(Box::new(metrics.parent_requests.clone()));
        let _ = registry.register(Box::new(metrics.time_to_first_byte.clone()));
        let _ = registry.register(Box::new(metrics.ring_size.clone()));
        metrics
    }
}
