//! Prometheus metrics: one registry holding every `berth_*` family.
//!
//! Labels are small closed sets (route, method, status class, cache outcome, upstream name from
//! config); never a digest or a client-chosen repository. Rendering the text format is here;
//! serving it is the server's job.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Requests by route, method, status class and cache outcome.
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Body bytes sent to clients, by source (cache or upstream fill).
    pub bytes_served: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub fills_in_flight: IntGauge,
    pub fills_completed: IntCounter,
    /// Requests that joined a fill someone else started.
    pub fill_followers: IntCounter,
    /// Fills whose bytes did not match the digest; each one is an upstream serving wrong content.
    pub digest_mismatches: IntCounter,
    pub manifest_fetch_seconds: Histogram,
    /// Tag requests answered from a stale mapping because the upstream failed.
    pub stale_served: IntCounter,
    /// Tag requests answered 404 from the negative cache without asking the upstream.
    pub negative_hits: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("berth_requests_total", "Registry API requests answered"),
            &["route", "method", "status", "cache"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "berth_request_duration_seconds",
                "Time to the response head",
            ),
            &["route"],
        )
        .expect("valid metric");
        let bytes_served = IntCounterVec::new(
            Opts::new("berth_served_bytes_total", "Blob bytes sent to clients"),
            &["source"],
        )
        .expect("valid metric");
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "berth_upstream_requests_total",
                "Requests sent to upstream registries",
            ),
            &["upstream", "kind"],
        )
        .expect("valid metric");
        let fills_in_flight =
            IntGauge::new("berth_fills_in_flight", "Blob fills under way").expect("valid metric");
        let fills_completed = IntCounter::new(
            "berth_fills_completed_total",
            "Blob fills verified and committed",
        )
        .expect("valid metric");
        let fill_followers = IntCounter::new(
            "berth_fill_followers_total",
            "Blob requests that joined a fill already under way",
        )
        .expect("valid metric");
        let digest_mismatches = IntCounter::new(
            "berth_digest_mismatches_total",
            "Upstream blobs whose bytes did not match their digest",
        )
        .expect("valid metric");
        let manifest_fetch_seconds = Histogram::with_opts(HistogramOpts::new(
            "berth_manifest_fetch_seconds",
            "Time to fetch a manifest from an upstream",
        ))
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(request_seconds.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(bytes_served.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(upstream_requests.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(fills_in_flight.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(fills_completed.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(fill_followers.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(digest_mismatches.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(manifest_fetch_seconds.clone()))
            .expect("unique metric");
        let stale_served = IntCounter::new(
            "berth_stale_served_total",
            "Tag requests served from a stale mapping while the upstream failed",
        )
        .expect("valid metric");
        let negative_hits = IntCounter::new(
            "berth_negative_hits_total",
            "Tag requests answered 404 from the negative cache",
        )
        .expect("valid metric");
        registry
            .register(Box::new(stale_served.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(negative_hits.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            requests,
            request_seconds,
            bytes_served,
            upstream_requests,
            fills_in_flight,
            fills_completed,
            fill_followers,
            digest_mismatches,
            manifest_fetch_seconds,
            stale_served,
            negative_hits,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
