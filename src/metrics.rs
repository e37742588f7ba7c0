//! Prometheus metrics: one registry holding every `berth_*` family.
//!
//! Labels are small closed sets: route, method (GET, HEAD, other), status class, cache
//! outcome, object kind, and the upstream's configured `host` (for a host pattern, the pattern
//! itself, so a client naming random hosts under `*.azurecr.io` cannot grow the series count).
//! Never a digest, a repository or anything else a client chooses. Names use base units and
//! `_total` for counters; README's "Metrics" section maps them to the distribution registry's
//! `registry_proxy_*` counters. Rendering the text format is here; serving it is `admin`'s job.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The values of the `route` label; `api::RouteKind` produces them.
pub(crate) const ROUTES: [&str; 7] = [
    "ping",
    "manifest",
    "blob",
    "tags",
    "referrers",
    "token",
    "other",
];

/// Where served bytes came from: `cache` for hits (and revalidated or stale serves), `upstream`
/// for bytes that arrived from a registry for this request or a fill it joined.
pub(crate) const SOURCES: [&str; 2] = ["cache", "upstream"];

/// Why a missing blob of a manifest was not prefetched: its upstream answered 429 lately or its
/// breaker is open, the fills left for real misses are all that remains of `limits.max_fills`,
/// or `prefetch.max_total` prefetches run already.
pub const PREFETCH_SKIPS: [&str; 3] = ["paused", "fills_busy", "max_total"];

/// The `reason` of a prefetch that started but gave its reserved room to a real miss in a full
/// cache (`fill::Fills::cancel_unjoined_prefetch`), beside `PREFETCH_SKIPS`.
pub const PREFETCH_CANCELLED: &str = "cancelled";

/// Request latencies: from a millisecond (a hit's head) to ten minutes (a multi-GiB layer's body).
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0,
];

pub struct Metrics {
    pub registry: Registry,
    /// Requests by route, method, status class and cache outcome; counted at the response head.
    pub requests: IntCounterVec,
    /// Time from the request to its response head, by route.
    pub time_to_first_byte: HistogramVec,
    /// Time from the request to the end of its body (or the client going away), by route.
    pub request_seconds: HistogramVec,
    /// Body bytes sent to clients, by route and source.
    pub bytes_served: IntCounterVec,
    /// Of those, bytes the kernel sent from a cached file with `sendfile` (`server::sendfile`).
    pub sendfile_bytes: IntCounter,
    /// Requests sent to upstreams (each redirect hop is one), by upstream and status class;
    /// `error` when no response came (connect failure, timeout, protocol error).
    pub upstream_requests: IntCounterVec,
    /// Time to an upstream's response head, by upstream.
    pub upstream_seconds: HistogramVec,
    /// Body bytes received from upstreams for the cache, by kind (blob, manifest).
    pub upstream_bytes: IntCounterVec,
    /// Registry token fetches, by upstream and result (ok, error).
    pub token_fetches: IntCounterVec,
    pub fills_in_flight: IntGauge,
    pub fills_completed: IntCounter,
    /// Fills that ended without caching anything: upstream error, cut body, mismatch, disk.
    pub fills_failed: IntCounter,
    /// Requests that joined a fill someone else started.
    pub fill_followers: IntCounter,
    /// Fills whose bytes did not match the digest; each one is an upstream serving wrong content.
    pub digest_mismatches: IntCounter,
    pub manifest_fetch_seconds: Histogram,
    /// Tag requests answered from a stale mapping because the upstream failed.
    pub stale_served: IntCounter,
    /// Tag requests answered 404 from the negative cache without asking the upstream.
    pub negative_hits: IntCounter,
    /// Disk reads or writes of the cache that failed; each one was passed through or refetched.
    pub disk_errors: IntCounter,
    /// Fills whose upstream body failed mid-way and that continued with a Range request.
    pub fill_resumes: IntCounter,
    /// Requests and connections refused by a limit, by which limit.
    pub rejected: IntCounterVec,
    /// Prefetch fills started by an image's manifest or first blob GET (`prefetch`), those a
    /// client's blob request then joined, those that committed with no client joining, and
    /// blobs not prefetched, by why (`PREFETCH_SKIPS`).
    pub prefetch_started: IntCounter,
    pub prefetch_joined: IntCounter,
    pub prefetch_unjoined: IntCounter,
    pub prefetch_skipped: IntCounterVec,
    pub connections_open: IntGauge,
    /// Objects deleted to keep the cache within `cache.max_size`, and their bytes.
    pub evictions: IntCounter,
    pub evicted_bytes: IntCounter,
    /// Set at scrape time from the index and the filesystem (`admin`).
    pub cache_bytes: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_max_bytes: IntGauge,
    pub filesystem_avail_bytes: IntGauge,
    pub filesystem_size_bytes: IntGauge,
    /// 1 while `/readyz` would answer 200; set at scrape time.
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
    HistogramVec::new(opts, labels).expect("valid metric")
}

impl Metrics {
    /// One table: every family, its help text and labels, then its registration. It reads as one
    /// list, so it stays one function (the house's size rule excepts tables).
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::new(),
            requests: counter_vec(
                "berth_requests_total",
                "Registry API requests answered",
                &["route", "method", "status", "cache"],
            ),
            time_to_first_byte: histogram_vec(
                "berth_time_to_first_byte_seconds",
                "Time from a request to its response head",
                &["route"],
            ),
            request_seconds: histogram_vec(
                "berth_request_duration_seconds",
                "Time from a request to the end of its response body",
                &["route"],
            ),
            bytes_served: counter_vec(
                "berth_served_bytes_total",
                "Response body bytes sent to clients",
                &["route", "source"],
            ),
            sendfile_bytes: counter(
                "berth_sendfile_bytes_total",
                "Body bytes sent from cached files with sendfile (plain-TCP HTTP/1.x hits)",
            ),
            upstream_requests: counter_vec(
                "berth_upstream_requests_total",
                "Requests sent to upstream registries, by status class",
                &["upstream", "status"],
            ),
            upstream_seconds: histogram_vec(
                "berth_upstream_request_duration_seconds",
                "Time to an upstream registry's response head",
                &["upstream"],
            ),
            upstream_bytes: counter_vec(
                "berth_upstream_received_bytes_total",
                "Body bytes received from upstream registries for the cache",
                &["kind"],
            ),
            token_fetches: counter_vec(
                "berth_token_fetches_total",
                "Registry token fetches",
                &["upstream", "result"],
            ),
            fills_in_flight: gauge("berth_fills_in_flight", "Blob fills under way"),
            fills_completed: counter(
                "berth_fills_completed_total",
                "Blob fills verified and committed",
            ),
            fills_failed: counter(
                "berth_fills_failed_total",
                "Blob fills that ended without caching anything",
            ),
            fill_followers: counter(
                "berth_fill_followers_total",
                "Blob requests that joined a fill already under way",
            ),
            digest_mismatches: counter(
                "berth_digest_mismatches_total",
                "Upstream blobs and manifests whose bytes did not match their digest",
            ),
            manifest_fetch_seconds: Histogram::with_opts(HistogramOpts::new(
                "berth_manifest_fetch_seconds",
                "Time to fetch a manifest from an upstream",
            ))
            .expect("valid metric"),
            stale_served: counter(
                "berth_stale_served_total",
                "Tag requests served from a stale mapping while the upstream failed",
            ),
            negative_hits: counter(
                "berth_negative_hits_total",
                "Tag requests answered 404 from the negative cache",
            ),
            disk_errors: counter(
                "berth_disk_errors_total",
                "Cache disk reads or writes that failed (content was passed through or refetched)",
            ),
            fill_resumes: counter(
                "berth_fill_resumes_total",
                "Fills resumed with a Range request after the upstream body failed",
            ),
            rejected: counter_vec(
                "berth_rejected_total",
                "Requests or connections refused by a limit",
                &["limit"],
            ),
            prefetch_started: counter(
                "berth_prefetch_started_total",
                "Blob fills started by an image's manifest or first blob GET, ahead of any client",
            ),
            prefetch_joined: counter(
                "berth_prefetch_joined_total",
                "Prefetch fills a client's blob request joined while they ran",
            ),
            prefetch_unjoined: counter(
                "berth_prefetch_completed_unjoined_total",
                "Prefetch fills that committed without any client joining them",
            ),
            prefetch_skipped: counter_vec(
                "berth_prefetch_skipped_total",
                "Missing blobs of a manifest not prefetched, by why",
                &["reason"],
            ),
            connections_open: gauge("berth_connections_open", "Client connections open"),
            evictions: counter(
                "berth_evictions_total",
                "Cached objects deleted to stay within cache.max_size",
            ),
            evicted_bytes: counter(
                "berth_evicted_bytes_total",
                "Bytes of cached objects deleted to stay within cache.max_size",
            ),
            cache_bytes: gauge("berth_cache_disk_bytes", "Bytes of cached objects on disk"),
            cache_entries: gauge(
                "berth_cache_entries",
                "Cached objects (blobs and manifests)",
            ),
            cache_max_bytes: gauge(
                "berth_cache_max_bytes",
                "The configured cache.max_size in bytes",
            ),
            filesystem_avail_bytes: gauge(
                "berth_cache_filesystem_avail_bytes",
                "Bytes available to berth on the cache directory's filesystem",
            ),
            filesystem_size_bytes: gauge(
                "berth_cache_filesystem_size_bytes",
                "Size in bytes of the cache directory's filesystem",
            ),
            ready: gauge("berth_ready", "1 when berth is ready to serve (as /readyz)"),
            build_info: IntGaugeVec::new(
                Opts::new("berth_build_info", "Always 1; the version in a label"),
                &["version"],
            )
            .expect("valid metric"),
        };
        metrics.register_all();
        metrics.initialise_known_series();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.time_to_first_byte.clone()),
            Box::new(self.request_seconds.clone()),
            Box::new(self.bytes_served.clone()),
            Box::new(self.sendfile_bytes.clone()),
            Box::new(self.upstream_requests.clone()),
            Box::new(self.upstream_seconds.clone()),
            Box::new(self.upstream_bytes.clone()),
            Box::new(self.token_fetches.clone()),
            Box::new(self.fills_in_flight.clone()),
            Box::new(self.fills_completed.clone()),
            Box::new(self.fills_failed.clone()),
            Box::new(self.fill_followers.clone()),
            Box::new(self.digest_mismatches.clone()),
            Box::new(self.manifest_fetch_seconds.clone()),
            Box::new(self.stale_served.clone()),
            Box::new(self.negative_hits.clone()),
            Box::new(self.disk_errors.clone()),
            Box::new(self.fill_resumes.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.prefetch_started.clone()),
            Box::new(self.prefetch_joined.clone()),
            Box::new(self.prefetch_unjoined.clone()),
            Box::new(self.prefetch_skipped.clone()),
            Box::new(self.connections_open.clone()),
            Box::new(self.evictions.clone()),
            Box::new(self.evicted_bytes.clone()),
            Box::new(self.cache_bytes.clone()),
            Box::new(self.cache_entries.clone()),
            Box::new(self.cache_max_bytes.clone()),
            Box::new(self.filesystem_avail_bytes.clone()),
            Box::new(self.filesystem_size_bytes.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.build_info.clone()),
            Box::new(crate::logs::dropped_lines().clone()),
        ];
        for collector in collectors {
            self.registry.register(collector).expect("unique metric");
        }
    }

    /// Series whose label values are known up front start at zero, so `rate()` and ratios work
    /// from the first scrape instead of appearing only after the first event.
    fn initialise_known_series(&self) {
        for route in ROUTES {
            self.time_to_first_byte.with_label_values(&[route]);
            self.request_seconds.with_label_values(&[route]);
            for source in SOURCES {
                self.bytes_served.with_label_values(&[route, source]);
            }
        }
        for kind in ["blob", "manifest"] {
            self.upstream_bytes.with_label_values(&[kind]);
        }
        for reason in PREFETCH_SKIPS.into_iter().chain([PREFETCH_CANCELLED]) {
            self.prefetch_skipped.with_label_values(&[reason]);
        }
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
    }

    /// Starts the per-upstream series of a configured upstream at zero.
    pub(crate) fn initialise_upstream(&self, upstream: &str) {
        self.upstream_seconds.with_label_values(&[upstream]);
        for result in ["ok", "error"] {
            self.token_fetches.with_label_values(&[upstream, result]);
        }
    }

    /// Counts one upstream request: its status class (or `error`) and its time to the head.
    pub(crate) fn observe_upstream(
        &self,
        upstream: &str,
        status: Option<http::StatusCode>,
        secs: f64,
    ) {
        let class = status.map_or("error", status_class);
        self.upstream_requests
            .with_label_values(&[upstream, class])
            .inc();
        self.upstream_seconds
            .with_label_values(&[upstream])
            .observe(secs);
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

/// The `method` label: GET, HEAD or `other`. A client may send any token as a method
/// (`PROPFIND`, `X1`, `X2`, ...), and each new label value is a new series kept forever.
pub(crate) fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// `2xx`-style class of a status: the `status` label of request metrics.
pub(crate) fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_are_exposed_before_any_traffic() {
        let metrics = Metrics::new();
        metrics.initialise_upstream("ghcr.io");
        let text = metrics.render();
        for family in [
            "berth_request_duration_seconds_bucket{route=\"blob\"",
            "berth_served_bytes_total{route=\"manifest\",source=\"cache\"} 0",
            "berth_token_fetches_total{result=\"ok\",upstream=\"ghcr.io\"} 0",
            "berth_evictions_total 0",
            "berth_build_info{version=",
        ] {
            assert!(text.contains(family), "{family} missing from\n{text}");
        }
    }

    #[test]
    fn the_method_label_is_get_head_or_other() {
        let invented = http::Method::from_bytes(b"X-INVENTED-1234").unwrap();
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(method_label(&http::Method::HEAD), "HEAD");
        assert_eq!(method_label(&http::Method::DELETE), "other");
        assert_eq!(method_label(&invented), "other");
    }

    #[test]
    fn upstream_failures_without_a_response_are_class_error() {
        let metrics = Metrics::new();
        metrics.observe_upstream("a.io", None, 0.1);
        metrics.observe_upstream("a.io", Some(http::StatusCode::BAD_GATEWAY), 0.1);
        let requests = &metrics.upstream_requests;
        assert_eq!(requests.with_label_values(&["a.io", "error"]).get(), 1);
        assert_eq!(requests.with_label_values(&["a.io", "5xx"]).get(), 1);
    }
}
