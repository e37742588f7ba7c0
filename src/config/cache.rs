//! `[cache]`: where and how much berth keeps, and for how long tags are trusted.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{de_duration, de_opt_size, de_size};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory holding the content-addressed store; created if missing.
    #[serde(default = "default_cache_dir")]
    pub dir: PathBuf,
    /// Upper bound of the bytes kept on disk; least recently used content goes first.
    #[serde(default = "default_max_size", deserialize_with = "de_size")]
    pub max_size: u64,
    /// How long a tag -> digest mapping is served without asking the upstream again.
    #[serde(default = "default_tag_ttl", deserialize_with = "de_duration")]
    pub tag_ttl: Duration,
    /// Bytes of manifests kept in memory to answer manifest hits without disk reads.
    #[serde(default = "default_manifest_memory", deserialize_with = "de_size")]
    pub manifest_memory: u64,
    /// How long past its TTL a tag mapping (and its content) is still served while the upstream
    /// is unreachable, times out, or answers 5xx or 429.
    #[serde(default = "default_stale_if_error", deserialize_with = "de_duration")]
    pub stale_if_error: Duration,
    /// How long an upstream 404 for a tag is remembered, so a crash-looping pod does not hammer
    /// the upstream.
    #[serde(default = "default_negative_ttl", deserialize_with = "de_duration")]
    pub negative_ttl: Duration,
    /// Free space to keep on the cache's filesystem; least recently used content is evicted to
    /// keep it. Unset: only `max_size` bounds the cache.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub min_free: Option<u64>,
    /// Free inodes to keep on the cache's filesystem (many small objects can exhaust inodes
    /// before bytes); least recently used content is evicted to keep them. Unset: not watched.
    #[serde(default)]
    pub min_free_inodes: Option<u64>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: default_cache_dir(),
            max_size: default_max_size(),
            tag_ttl: default_tag_ttl(),
            manifest_memory: default_manifest_memory(),
            stale_if_error: default_stale_if_error(),
            negative_ttl: default_negative_ttl(),
            min_free: None,
            min_free_inodes: None,
        }
    }
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("berth-cache")
}

fn default_max_size() -> u64 {
    50 << 30
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(30)
}

fn default_manifest_memory() -> u64 {
    64 << 20
}

fn default_stale_if_error() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_negative_ttl() -> Duration {
    Duration::from_secs(10)
}
