//! berth: a pull-through caching edge proxy for container images.
//!
//! # Layout
//!
//! - `config`   TOML configuration, defaults, the embedded default, errors naming the key.
//! - `secret`   `Secret`, a string that never prints.
//! - `secrets`  pull secrets (docker, ECR, GCP files re-read on change): which applies to a
//!   request, and the ECR/GCP exchanges that turn cloud keys into registry logins.
//! - `error`    `ApiError` and the one mapping of any failure to an OCI error response.
//! - `body`     the response body type.
//! - `oci`      pure parsers: digests, names and references, API paths, byte ranges.
//! - `route`    request -> (upstream, repository): `?ns=`, host prefix, default, Docker Hub rules.
//! - `upstream` the registries berth fetches from: host patterns, HTTP client, token auth keyed
//!   by credentials, redirects.
//! - `cache`    disk store, in-memory index with LRU eviction, manifests in memory, tag table,
//!   blob readers over complete or growing files, the `Outcome` of each response.
//! - `fill`     single-flight blob fills: one upstream stream -> hasher + temp file -> readers.
//! - `flight`   single flight for small results (manifests, revalidations, tokens).
//! - `api`      the `/v2/` handlers as named phases.
//! - `server`   accept loop, HTTP/1.1 + HTTP/2, graceful shutdown.
//! - `metrics`  the `berth_*` Prometheus families.
//! - `load`     `berth load`: pulls whole images with N pullers, verifies, reports percentiles.
//!
//! # The life of one blob request
//!
//! ```text
//! server: accept -> hyper connection -> api::handle
//! api:    parse /v2/<name>/blobs/<digest>  (oci::name, oci::digest)
//!         route  ?ns= | host prefix | default_upstream  -> Target { upstream, repository }
//!         authorize (anonymous mode: everyone may pull)
//!         lookup cache::Index ---- hit ----> cache::reader streams the file        X-Cache: HIT
//!              \---- miss --> fill::Fills::join(digest)
//!                               first caller: spawn fill task -> upstream GET (auth, redirects)
//!                                   body -> blocking writer: sha256 + temp file, publish length
//!                                   end  -> verify digest+length -> fsync, rename, index
//!                               every caller (first one too): cache::reader over the temp file,
//!                                   up to the published length, last byte held until verified
//!                                                                            X-Cache: MISS | COALESCED
//! ```
//!
//! Manifests follow the same phases but are small: fetched whole (single flight), verified,
//! stored by digest and kept in memory; tags map to digests for `tag_ttl`, then revalidate
//! with a HEAD.

#![forbid(unsafe_code)]

pub mod api;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod fill;
pub mod flight;
pub mod load;
pub mod metrics;
pub mod oci;
pub mod route;
pub mod secret;
pub mod secrets;
pub mod server;
pub mod upstream;

use std::sync::Arc;

use crate::cache::Cache;
use crate::config::Config;
use crate::fill::Fills;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// Everything a request needs, shared by all of them.
pub struct AppState {
    pub config: Config,
    pub upstreams: Upstreams,
    pub cache: Arc<Cache>,
    pub fills: Arc<Fills>,
    pub metrics: Arc<Metrics>,
    manifest_flights: api::ManifestFlights,
    revalidations: api::RevalidationFlights,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cache directory {dir}: {source}")]
    Cache { dir: String, source: std::io::Error },
    #[error("upstream client: {0}")]
    Client(String),
}

impl AppState {
    /// Opens the cache (rebuilding the index from disk) and prepares the upstreams.
    pub async fn open(config: Config) -> Result<Arc<AppState>, StartError> {
        let cache_config = config.cache.clone();
        let cache = tokio::task::spawn_blocking(move || Cache::open(&cache_config))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|opened| opened)
            .map_err(|source| StartError::Cache {
                dir: config.cache.dir.display().to_string(),
                source,
            })?;
        let upstreams = Upstreams::new(&config).map_err(StartError::Client)?;
        Ok(Arc::new(AppState {
            fills: Arc::new(Fills::new(config.client.read_timeout)),
            upstreams,
            cache: Arc::new(cache),
            metrics: Arc::new(Metrics::new()),
            manifest_flights: Default::default(),
            revalidations: Default::default(),
            config,
        }))
    }
}
