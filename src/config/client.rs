//! `[client]`: how berth talks to every upstream (timeouts, CA bundle, retries, breaker,
//! HTTP/2 windows, the slowest fill tolerated).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{de_duration, de_size, de_window};

/// How berth talks to every upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Time allowed between sending a request and receiving the response head.
    #[serde(default = "default_response_timeout", deserialize_with = "de_duration")]
    pub response_timeout: Duration,
    /// Longest silence tolerated inside a response body before the fetch counts as stalled.
    #[serde(default = "default_read_timeout", deserialize_with = "de_duration")]
    pub read_timeout: Duration,
    /// Extra PEM CA bundle trusted on top of the webpki roots, for self-hosted registries.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Extra attempts for a request that failed without reaching the upstream, timed out, or
    /// was answered 429/503 with a short `Retry-After`.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Longest `Retry-After` berth waits out itself; a longer one goes back to the client.
    #[serde(default = "default_max_retry_after", deserialize_with = "de_duration")]
    pub max_retry_after: Duration,
    /// Consecutive connection failures or timeouts that open an upstream's circuit breaker.
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long an open breaker fails requests at once before one probe may try again.
    #[serde(default = "default_breaker_cooldown", deserialize_with = "de_duration")]
    pub breaker_cooldown: Duration,
    /// HTTP/2 receive window of one upstream stream (one blob): at most this much is in flight
    /// per round trip, so it bounds a fill's speed to `window / RTT`.
    #[serde(default = "default_h2_stream_window", deserialize_with = "de_window")]
    pub h2_stream_window: u32,
    /// HTTP/2 receive window of one upstream connection, shared by its streams; also the most
    /// an upstream connection can buffer while fills stall on the disk.
    #[serde(
        default = "default_h2_connection_window",
        deserialize_with = "de_window"
    )]
    pub h2_connection_window: u32,
    /// Slowest a blob fill may be, in bytes per second over `min_fill_window`; a slower body is
    /// abandoned (and resumed, as one resume attempt), so an upstream sending a byte just
    /// inside `read_timeout` cannot hold a fill and its `max_fills` slot for hours. 0: no floor.
    #[serde(default = "default_min_fill_rate", deserialize_with = "de_size")]
    pub min_fill_rate: u64,
    /// The window `min_fill_rate` is measured over.
    #[serde(default = "default_min_fill_window", deserialize_with = "de_duration")]
    pub min_fill_window: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            read_timeout: default_read_timeout(),
            ca_file: None,
            retries: default_retries(),
            max_retry_after: default_max_retry_after(),
            breaker_threshold: default_breaker_threshold(),
            breaker_cooldown: default_breaker_cooldown(),
            h2_stream_window: default_h2_stream_window(),
            h2_connection_window: default_h2_connection_window(),
            min_fill_rate: default_min_fill_rate(),
            min_fill_window: default_min_fill_window(),
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_retries() -> u32 {
    2
}

fn default_max_retry_after() -> Duration {
    Duration::from_secs(5)
}

fn default_breaker_threshold() -> u32 {
    5
}

fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}

fn default_h2_stream_window() -> u32 {
    8 << 20
}

fn default_h2_connection_window() -> u32 {
    16 << 20
}

fn default_min_fill_rate() -> u64 {
    64 << 10
}

fn default_min_fill_window() -> Duration {
    Duration::from_secs(30)
}
