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
    /// Disk reads or writes of the cache that failed; each one was passed through or refetched.
    pub disk_errors: IntCounter,
    /// Fills whose upstream body failed mid-way and that continued with a Range request.
    pub fill_resumes: IntCounter,
    /// Requests and connections refused by a limit, by which limit.
    pub rejected: IntCounterVec,
    pub connections_open: IntGauge,
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
        let disk_errors = IntCounter::new(
            "berth_disk_errors_total",
            "Cache disk reads or writes that failed (content was passed through or refetched)",
        )
        .expect("valid metric");
        let fill_resumes = IntCounter::new(
            "berth_fill_resumes_total",
            "Fills resumed with a Range request after the upstream body failed",
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "berth_rejected_total",
                "Requests or connections refused by a limit",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let connections_open = IntGauge::new("berth_connections_open", "Client connections open")
            .expect("valid metric");
        for family in [
            Box::new(disk_errors.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(fill_resumes.clone()),
            Box::new(rejected.clone()),
            Box::new(connections_open.clone()),
        ] {
            registry.register(family).expect("unique metric");
        }
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
            disk_errors,
            fill_resumes,
            rejected,
            connections_open,
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
