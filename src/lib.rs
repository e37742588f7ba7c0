//! berth: a pull-through caching edge proxy for container images.
//!
//! # Layout
//!
//! - `access`   who may pull what: principals and their keys, platform policies, the token
//!   service's JWTs, slowing down wrong keys, which repository holds which digest.
//! - `config`   TOML configuration as plain data, one file per group of sections, sizes and
//!   durations (`units`), defaults, the embedded default, errors naming the key. A leaf:
//!   it imports nothing of the crate but `secret`; the checks that need domain knowledge
//!   (registry hosts and patterns, networks, cluster members and parent) are
//!   `check_config`'s, run at start-up and by `berth check-config`.
//! - `secret`   `Secret`, a string that never prints.
//! - `secrets`  pull secrets (docker, ECR, GCP files re-read on change): which applies to a
//!   request, and the ECR/GCP exchanges that turn cloud keys into registry logins.
//! - `error`    `ApiError`, the manifest flights' `ManifestError`, and the one mapping of any
//!   failure (`UpstreamError`, `FillError`, ...) to an OCI error response, admin's included.

//! - `body`     the response body type.
//! - `oci`      pure parsers, a leaf: digests, names and references, full image references
//!   (`oci::reference`), API paths, byte ranges, the one manifest model (`oci::manifest`: media
//!   type, typed descriptors, platforms, index children, `subject`, `urls`), the Accept class
//!   of a manifest request.
//! - `route`    request -> (upstream, repository): `?ns=`, host prefix, default, Docker Hub rules.

//! - `net`      outbound HTTP for everything that dials out: the pooled client (TLS roots, CA
//!   bundle, timeouts), the connector that applies the address rule after DNS, the rule.
//!   A leaf: it reads `config` only.
//! - `upstream` the registries berth fetches from: validated registry hosts and host patterns
//!   (and their start-up checks, `check`), token auth keyed by credentials, redirects, safe
//!   retries with jittered backoff, a circuit breaker each; over `net`'s client.
//! - `cache`    disk store (objects; tag files in `store::tag_files`), in-memory index with
//!   LRU eviction, manifests in memory, tag table, where each object came from and who holds
//!   it (`origins`, for the policy mode), a blob on its way to readers (`progress`: a fill's
//!   state, or a cached file opened), blob readers over complete or growing files (verified
//!   ones as slices of shared maps where the kernel sends the body: `mapped`, which also
//!   finds a slice's file and offset, `reader::Copier`), the
//!   in-memory window of a fill (`spill`: the bytes its file does not hold yet, or all the
//!   rest once its disk failed), the `Outcome` of each response,
//!   and `FillError`, which every reader of a failed fill sees.
//! - `cluster`  replicas of a location as one cache: rendezvous ring of blob owners, membership
//!   (static or DNS), the peer token, peer requests (asker and owner side), the parent tier.
//! - `fill`     single-flight blob fills: one upstream stream -> hasher + temp file -> readers;
//!   resumed with Range requests when the upstream body fails, passed through when the disk does;
//!   phases in files (`fetch`, `receive`, `write`, `append`: direct writes of the temp file;
//!   `cancel`: a prefetch giving its room to a real miss), failures as `cache::FillError`.
//! - `prefetch` a cold image's manifest GET (or its first blob GET: `plans`) starts the fills of
//!   its missing config and layers, once per image at a time, bounded, below real misses for
//!   `max_fills`, paused for an upstream that answers 429.
//! - `flight`   single flight for small results (manifests, revalidations, tokens).
//! - `api`      the `/v2/` handlers as named phases; `PeerAddr`, the client address the
//!   server puts in each request; the request log line written by hand (`request_line`).
//! - `server`   accept loop (open -> admit -> drain), HTTP/1.1 + HTTP/2, idle and head
//!   timeouts per connection, graceful shutdown (requests, then fills); plain-TCP connections
//!   send cached blob bodies from their files with `sendfile` (`server::sendfile`).
//! - `limits`   connection, fill and per-client caps (IPv6 by /64, trusted networks exempt),
//!   request size checks, write deadlines.
//! - `tls`      HTTPS serving: rustls acceptor with ALPN, reloaded when the PEM files change.
//! - `stamp`    "has this file changed?" (time, length, inode), for every file re-read on change.
//! - `metrics`  the `berth_*` Prometheus families.
//! - `logs`     the log writer: a thread and a bounded queue; request lines dropped (and
//!   counted) when it is full, every other line (policy decisions among them) never; request
//!   lines queued without `tracing`'s formatting once `serve` asks for it.
//! - `health`   readiness: serving, not shutting down, cache directory writable.
//! - `probe`    `berth health`: one GET of `/healthz`, for images without a shell or curl.
//! - `admin`    the admin listener: `/metrics`, `/healthz`, `/readyz`, token-guarded cache API
//!   and the access report.
//! - `warm`     `berth warm`: pre-pulls images through a running berth, with progress and a
//!   summary (`warm::summary`); references and manifests are read by `oci`.
//! - `load`     `berth load`: pulls whole images with N pullers, verifies, reports percentiles;
//!   uses only the upstream HTTP client and auth, and `oci`.
//!
//! The binary (`main.rs`, `cli.rs`) parses the command line and dispatches; `cli` holds each
//! subcommand's body and loads every config the same way (`Config::load_or_default`, then
//! `check_config`). Imports go one way: `tests/layout.rs` fails on any cycle between files.
//! Only what the binary, the benches, the fuzz targets and `tests/` name is `pub`; the rest
//! is `pub(crate)`.
//!
//! # The life of one blob request
//!
//! ```text
//! server: accept -> admit (connection caps) -> [TLS] -> hyper connection -> limits -> api::handle
//! api:    parse /v2/<name>/blobs/<digest>  (oci::name, oci::digest)
//!         route  ?ns= | host prefix | default_upstream  -> Target { upstream, repository }
//!         authorize access: anonymous mode, everyone; policy mode, Basic key or berth's token
//!                   -> principal -> policies allow pull of the repository?   401 | 403 DENIED
//!                   -> (policy mode) the upstream served the digest and the repository is
//!                      known to hold it there, or the upstream confirms (HEAD) or serves it
//!                      through the repository, verified  (access::holdings, cache::origins)
//!         lookup cache::Index -- hit --> cache::open_cached -> cache::reader streams it  X-Cache: HIT
//!              \---- miss --> fill::Fills::join(upstream, digest)
//!                               first caller: spawn fill task -> [cluster] the digest's owner
//!                                   replica's answer (peer request), else / on failure
//!                                   -> upstream GET (auth, redirects, over net::HttpClient
//!                                   and its address rule)
//!                                   Content-Length > max_blob_size -> 403; reserve its room
//!                                   body -> blocking writer: sha256 + window + temp file
//!                                   (O_DIRECT blocks), publish length
//!                                   body fails/trickles -> Range: bytes=<received>- , same hash
//!                                   disk fails -> unlink; rest through memory (spill), no commit
//!                                   end  -> verify digest+length -> fsync, rename, index
//!                               every caller (first one too): cache::reader over the window
//!                                   and the temp file, up to the published length, last byte
//!                                   held until verified
//!                                                                            X-Cache: MISS | COALESCED
//! ```
//!
//! `api::handle` stamps `X-Cache` and `X-Request-Id` on the head, counts the request and its
//! time to first byte, and wraps the body (`api::record`) so that the bytes served, the total
//! duration and the one log line per request are recorded when the body ends or is dropped.
//!
//! Manifests follow the same phases but are small: fetched whole (single flight), verified,
//! stored by digest and kept in memory; tags (per Accept class) map to digests for `tag_ttl`,
//! then revalidate with a HEAD.

// `deny`, not `forbid`: one module, `cache::mapped`, allows it, for measured reasons it states.
#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub(crate) mod api;
pub(crate) mod body;
pub mod cache;
pub mod cluster;
pub mod config;
pub(crate) mod error;
pub(crate) mod fill;
pub(crate) mod flight;
pub(crate) mod health;
pub(crate) mod limits;
pub mod load;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod oci;
pub mod prefetch;
pub mod probe;
pub mod route;
pub mod secret;
pub mod secrets;
pub mod server;
pub(crate) mod stamp;
pub(crate) mod tls;
pub mod upstream;
pub mod warm;

use std::sync::Arc;

use crate::access::Access;
use crate::cache::Cache;
use crate::config::Config;
use crate::fill::Fills;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// The checks of a parsed configuration that need domain knowledge (registry host names and
/// patterns, networks, what a cluster member or parent is); `Config::from_toml` did the plain
/// ones. Start-up and `berth check-config` run both.
pub fn check_config(config: &Config) -> Result<(), config::ConfigError> {
    upstream::check_config(&config.upstreams)?;
    cluster::check_config(&config.cluster)?;
    Ok(())
}

/// Everything a request needs, shared by all of them.
pub struct AppState {
    pub config: Config,
    pub upstreams: Upstreams,
    pub cache: Arc<Cache>,
    pub fills: Arc<Fills>,
    pub metrics: Arc<Metrics>,
    /// Set by the server (serving, shutting down); read by `/readyz`.
    pub readiness: Readiness,
    pub access: Access,
    /// The location's other replicas, when `[cluster]` makes this one of several.
    pub cluster: Option<Arc<cluster::Cluster>>,
    /// Starts the fills of an image's missing blobs when its manifest is fetched.
    pub prefetch: prefetch::Prefetcher,
    manifest_flights: api::ManifestFlights,
    revalidations: api::RevalidationFlights,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cache directory {dir}: {source}")]
    Cache { dir: String, source: std::io::Error },
    #[error("upstream client: {0}")]
    Client(#[source] upstream::SetupError),
    #[error("access: {0}")]
    Access(#[source] access::FilesError),
    #[error("{0}")]
    Cluster(#[from] cluster::ClusterError),
}

impl AppState {
    /// Requests waiting on a manifest fetch or tag revalidation that another request started.
    pub fn coalesced_waiting(&self) -> usize {
        self.manifest_flights.followers_waiting() + self.revalidations.followers_waiting()
    }

    /// Opens the cache (rebuilding the index from disk) and prepares the upstreams.
    pub async fn open(config: Config) -> Result<Arc<AppState>, StartError> {
        AppState::open_with_resolver(config, net::connect::system_resolver()).await
    }

    /// `open`, with upstream names resolved by `resolver` (tests make names resolve where
    /// they want; the address rule still judges what comes back).
    pub async fn open_with_resolver(
        config: Config,
        resolver: net::connect::Resolver,
    ) -> Result<Arc<AppState>, StartError> {
        check_config(&config)?;
        let metrics = Arc::new(Metrics::new());
        let cache_config = config.cache.clone();
        let cache_metrics = Arc::clone(&metrics);
        let cache = tokio::task::spawn_blocking(move || Cache::open(&cache_config, cache_metrics))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|opened| opened)
            .map_err(|source| StartError::Cache {
                dir: config.cache.dir.display().to_string(),
                source,
            })?;
        let cluster = cluster::Cluster::from_config(
            &config.cluster,
            &config.client,
            Arc::clone(&resolver),
            &metrics.registry,
        )?;
        let upstreams = Upstreams::with_resolver(&config, Arc::clone(&metrics), resolver)
            .map_err(StartError::Client)?;
        let cache = Arc::new(cache);
        let (min_free, min_free_inodes) = (config.cache.min_free, config.cache.min_free_inodes);
        if min_free.is_some() || min_free_inodes.is_some() {
            let floor = (min_free.unwrap_or(0), min_free_inodes.unwrap_or(0));
            tokio::spawn(keep_free_space(Arc::downgrade(&cache), floor));
        }
        let access = Access::open(&config.access, &config.platform)
            .map_err(StartError::Access)?
            .with_listener_tls(config.tls.is_some());
        Ok(Arc::new(AppState {
            fills: Arc::new(Fills::new(&config).with_cluster(cluster.clone())),
            cluster,
            upstreams,
            cache,
            metrics,
            readiness: Readiness::new(),
            access,
            prefetch: prefetch::Prefetcher::new(&config.prefetch),
            manifest_flights: Default::default(),
            revalidations: Default::default(),
            config,
        }))
    }
}

/// How often free space is checked against `cache.min_free` and `cache.min_free_inodes`.
const FREE_SPACE_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps `min_free` bytes and `min_free_inodes` inodes available on the cache filesystem for
/// as long as the cache lives.
async fn keep_free_space(cache: std::sync::Weak<Cache>, (min_free, min_inodes): (u64, u64)) {
    let mut ticks = tokio::time::interval(FREE_SPACE_CHECK);
    loop {
        ticks.tick().await;
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let result =
            tokio::task::spawn_blocking(move || cache.enforce_free(min_free, min_inodes)).await;
        if let Ok(Err(err)) = result {
            tracing::warn!(%err, "cannot check free space of the cache directory");
        }
    }
}
