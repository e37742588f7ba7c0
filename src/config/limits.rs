//! `[limits]`: caps and timeouts on the serving side, and their checks.

use std::time::Duration;

use serde::Deserialize;

use super::units::{de_duration, de_opt_size, de_size_usize};
use super::{invalid, Config, ConfigError};

/// Caps and timeouts on the serving side. Over a cap berth answers 503 (or 429 for one client
/// over its share) with `Retry-After`, instead of queueing without bound.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open client connections; one more is answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Blob fills from upstreams running at once; a miss beyond it is answered 503.
    #[serde(default = "default_max_fills")]
    pub max_fills: usize,
    /// The share of `max_fills` the fills of one configured upstream may hold, in percent: a
    /// slow or hostile upstream whose fills pile up cannot lock the others' clients out.
    #[serde(default = "default_upstream_fill_share")]
    pub upstream_fill_share: u8,
    /// Requests in flight (bodies included) from one client IP; one more is answered 429.
    #[serde(default = "default_max_client_requests")]
    pub max_client_requests: usize,
    /// Longest request target (path and query) accepted; longer ones get 414.
    #[serde(default = "default_max_uri_bytes", deserialize_with = "de_size_usize")]
    pub max_uri_bytes: usize,
    /// Largest request head (names and values of all headers); larger ones get 431.
    #[serde(
        default = "default_max_header_bytes",
        deserialize_with = "de_size_usize"
    )]
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Time a client has to send a complete request head (slowloris).
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub header_read_timeout: Duration,
    /// Time a client may refuse to take response bytes before its connection is dropped.
    #[serde(default = "default_write_timeout", deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// On SIGTERM: how long downloads and fills in flight get to finish.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// The `Retry-After` berth sends when it refuses work because of these limits.
    #[serde(default = "default_retry_after", deserialize_with = "de_duration")]
    pub retry_after: Duration,
    /// Largest blob berth fetches and caches; a longer one is refused before a byte is written.
    /// Default 16 GiB, or `cache.max_size` if that is smaller; never more than `cache.max_size`.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_blob_size: Option<u64>,
    /// A connection with no request in flight for this long is closed (HTTP/1.1 keep-alive and
    /// HTTP/2 alike), so idle connections cannot hold `max_connections` slots.
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(default = "default_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Open connections from one client address (an IPv6 client: its /64); one more is
    /// closed at once. Clients in `trusted_networks` are exempt.
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// CIDR blocks exempt from `max_client_connections`: nodes behind SNAT or a load
    /// balancer, and the location's own replicas.
    #[serde(default)]
    pub trusted_networks: Vec<ipnet::IpNet>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            max_fills: default_max_fills(),
            upstream_fill_share: default_upstream_fill_share(),
            max_client_requests: default_max_client_requests(),
            max_uri_bytes: default_max_uri_bytes(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            header_read_timeout: default_header_read_timeout(),
            write_timeout: default_write_timeout(),
            shutdown_grace: default_shutdown_grace(),
            retry_after: default_retry_after(),
            max_blob_size: None,
            idle_timeout: default_idle_timeout(),
            h2_max_concurrent_streams: default_h2_max_concurrent_streams(),
            max_client_connections: default_max_client_connections(),
            trusted_networks: Vec::new(),
        }
    }
}

impl Config {
    pub(super) fn validate_limits(&self) -> Result<(), ConfigError> {
        if let Some(key) = self.prefetch.zero_count() {
            return Err(invalid(key, "must be greater than zero"));
        }
        let limits = &self.limits;
        let counts = [
            ("limits.max_connections", limits.max_connections),
            ("limits.max_fills", limits.max_fills),
            ("limits.max_client_requests", limits.max_client_requests),
            ("limits.max_headers", limits.max_headers),
            (
                "limits.max_client_connections",
                limits.max_client_connections,
            ),
            (
                "limits.h2_max_concurrent_streams",
                limits.h2_max_concurrent_streams as usize,
            ),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if !(1..=100).contains(&limits.upstream_fill_share) {
            return Err(invalid(
                "limits.upstream_fill_share",
                "a percentage: 1 to 100",
            ));
        }
        if limits.max_uri_bytes < 256 {
            return Err(invalid("limits.max_uri_bytes", "must be at least 256"));
        }
        if limits.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "must be at least 1KiB"));
        }
        if let Some(max_blob_size) = limits.max_blob_size {
            if max_blob_size == 0 || max_blob_size > self.cache.max_size {
                return Err(invalid(
                    "limits.max_blob_size",
                    "must be greater than zero and at most cache.max_size",
                ));
            }
        }
        if self.client.min_fill_window.is_zero() {
            return Err(invalid(
                "client.min_fill_window",
                "must be greater than zero",
            ));
        }
        if self.client.breaker_threshold == 0 {
            return Err(invalid(
                "client.breaker_threshold",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

fn default_max_connections() -> usize {
    4096
}

fn default_max_fills() -> usize {
    256
}

fn default_upstream_fill_share() -> u8 {
    50
}

fn default_max_client_requests() -> usize {
    256
}

fn default_max_uri_bytes() -> usize {
    8 << 10
}

fn default_max_header_bytes() -> usize {
    32 << 10
}

fn default_max_headers() -> usize {
    100
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_write_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_retry_after() -> Duration {
    Duration::from_secs(1)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

fn default_h2_max_concurrent_streams() -> u32 {
    128
}

fn default_max_client_connections() -> usize {
    128
}
