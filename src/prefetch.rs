//! Prefetch: when a client GETs an image manifest whose config and layers are not all cached,
//! the fills of the missing ones start at once, so the node's later blob requests (containerd
//! asks 3 at a time, each paced by one stream) join fills already under way instead of
//! starting them one after another.
//!
//! Owns when a prefetch starts and its bounds; the fills themselves are ordinary `fill` fills
//! (keyed by upstream and digest, reserved against `cache.max_size` and `min_free`, verified,
//! completed even if no client joins), started through `Fills::prefetch`, which leaves a
//! quarter of `limits.max_fills` to real misses. Deliberately not here: who may pull (the
//! caller calls this only after authorizing the request, and the fills are for the request's
//! own upstream and repository, as the policy mode's holdings rule wants), and reading the
//! manifest (`access::holdings::held_digests`, the digests a manifest says its repository holds).
//!
//! Only a GET of an image manifest starts anything: a HEAD only resolves a digest, and an
//! index does not say which platform the node will ask for. Prefetching pauses for an upstream
//! that answered 429 in the last `PAUSE_AFTER_429` or whose circuit breaker is open: the
//! node's own requests then decide what is fetched.
//!
//! A manifest hit stays cheap: a manifest found complete (every blob it names cached) is
//! remembered by digest for `COMPLETE_RECHECK` in a bounded set, and its hits within that time
//! parse nothing. A blob evicted meanwhile is then not prefetched; the node's request fills it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::cache::progress::Progress;
use crate::cache::{Cache, Manifest};
use crate::config::PrefetchConfig;
use crate::fill::{Fills, Job};
use crate::metrics::Metrics;
use crate::oci::digest::Digest;
use crate::oci::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
use crate::oci::name::Repository;
use crate::upstream::Upstream;

/// How long prefetching stays off for an upstream after it answered 429 to any request.
pub const PAUSE_AFTER_429: Duration = Duration::from_secs(60);

/// How long a manifest found complete skips the parse and the index lookups on its hits.
const COMPLETE_RECHECK: Duration = Duration::from_secs(30);

/// Most manifests remembered as complete; beyond it the least used are forgotten (and parsed
/// again on their next hit).
const COMPLETE_CAPACITY: u64 = 4096;

/// Prefetch fills under way, by upstream and digest: whether a client has joined each.
type Running = HashMap<(Arc<str>, Digest), bool>;

/// The prefetch bounds and the prefetch fills under way.
pub struct Prefetcher {
    config: PrefetchConfig,
    /// `max_total` permits; a prefetch fill holds one until it ends.
    total: Arc<Semaphore>,
    running: Arc<Mutex<Running>>,
    /// Image manifests whose blobs were all cached when last checked (`COMPLETE_RECHECK`).
    complete: moka::sync::Cache<Digest, ()>,
}

/// The shared parts a prefetch needs to start fills.
pub struct Fillers<'a> {
    pub fills: &'a Arc<Fills>,
    pub cache: &'a Arc<Cache>,
    pub metrics: &'a Arc<Metrics>,
}

impl Prefetcher {
    pub fn new(config: &PrefetchConfig) -> Prefetcher {
        Prefetcher {
            config: config.clone(),
            total: Arc::new(Semaphore::new(config.max_total)),
            running: Arc::new(Mutex::new(HashMap::new())),
            complete: moka::sync::Cache::builder()
                .max_capacity(COMPLETE_CAPACITY)
                .time_to_live(COMPLETE_RECHECK)
                .build(),
        }
    }

    /// After a manifest GET was answered to a client that may pull `repository` from
    /// `upstream`: starts the fills of the blobs it names that are not cached, at most
    /// `max_per_image` at once (the rest queue in one task per manifest), returning at once.
    pub fn manifest_served(
        &self,
        at: Fillers<'_>,
        upstream: &Arc<Upstream>,
        repository: &Repository,
        manifest: &Manifest,
    ) {
        if !self.config.enabled || !is_image_manifest(&manifest.media_type) {
            return;
        }
        if self.complete.contains_key(&manifest.digest) {
            return;
        }
        let missing = missing_blobs(at.cache, &manifest.bytes);
        if missing.is_empty() {
            self.complete.insert(manifest.digest.clone(), ());
            return;
        }
        let queue = Queue {
            fills: Arc::clone(at.fills),
            cache: Arc::clone(at.cache),
            metrics: Arc::clone(at.metrics),
            upstream: Arc::clone(upstream),
            repository: repository.clone(),
            total: Arc::clone(&self.total),
            running: Arc::clone(&self.running),
            per_image: self.config.max_per_image,
        };
        tokio::spawn(queue.run(missing));
    }

    /// A client's blob request joined a fill under way: if a prefetch started it, counts the
    /// first such join.
    pub fn joined(&self, upstream: &Arc<str>, digest: &Digest, metrics: &Metrics) {
        let key = (Arc::clone(upstream), digest.clone());
        let mut running = self.running.lock().expect("prefetch lock");
        if let Some(joined @ false) = running.get_mut(&key) {
            *joined = true;
            metrics.prefetch_joined.inc();
        }
    }
}

/// Image manifests only: an index's children are chosen by the node's platform, and other
/// documents (schema 1, unknown types) are not worth guessing about.
fn is_image_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// The manifest's blobs (config first, then layers in order) that are not in the cache.
fn missing_blobs(cache: &Cache, manifest: &[u8]) -> Vec<Digest> {
    let mut seen = HashSet::new();
    crate::access::holdings::held_digests(manifest)
        .into_iter()
        .filter(|digest| seen.insert(digest.clone()) && !cache.index.contains(digest))
        .collect()
}

/// One manifest's prefetches: its missing blobs, started in order as the bounds allow.
struct Queue {
    fills: Arc<Fills>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    upstream: Arc<Upstream>,
    repository: Repository,
    total: Arc<Semaphore>,
    running: Arc<Mutex<Running>>,
    per_image: usize,
}

/// Why a blob was not prefetched; the `reason` label of `berth_prefetch_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    Paused,
    FillsBusy,
    MaxTotal,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::Paused => "paused",
            Skip::FillsBusy => "fills_busy",
            Skip::MaxTotal => "max_total",
        }
    }
}

impl Queue {
    async fn run(self, missing: Vec<Digest>) {
        let mut watching = JoinSet::new();
        for (i, digest) in missing.iter().enumerate() {
            while watching.len() >= self.per_image {
                watching.join_next().await;
            }
            match self.start(digest) {
                Ok(Some(watch)) => {
                    watching.spawn(watch);
                }
                Ok(None) => {}
                // A paused upstream stays paused for the rest of this manifest.
                Err(Skip::Paused) => {
                    let rest = (missing.len() - i) as u64;
                    self.skipped(Skip::Paused, rest);
                    break;
                }
                Err(skip) => self.skipped(skip, 1),
            }
        }
        while watching.join_next().await.is_some() {}
    }

    fn skipped(&self, skip: Skip, count: u64) {
        self.metrics
            .prefetch_skipped
            .with_label_values(&[skip.as_str()])
            .inc_by(count);
    }

    /// Starts the fill of `digest` unless it is cached or under way (`None`); returns the task
    /// that follows it to its end.
    fn start(
        &self,
        digest: &Digest,
    ) -> Result<Option<impl std::future::Future<Output = ()>>, Skip> {
        if self.upstream.circuit_open() || self.upstream.rate_limited_within(PAUSE_AFTER_429) {
            return Err(Skip::Paused);
        }
        let permit = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Skip::MaxTotal)?;
        let job = Job {
            upstream: Arc::clone(&self.upstream),
            repository: self.repository.clone(),
            digest: digest.clone(),
            from_peer: false,
            prefetch: true,
        };
        // Hold the map across the start, so a client joining at once finds the entry.
        let key = (Arc::clone(&self.upstream.name), digest.clone());
        let mut running = self.running.lock().expect("prefetch lock");
        let joined = match self.fills.prefetch(&self.cache, &self.metrics, job) {
            Ok(Some(joined)) => joined,
            Ok(None) => return Ok(None),
            Err(_) => return Err(Skip::FillsBusy),
        };
        running.insert(key.clone(), false);
        drop(running);
        self.metrics.prefetch_started.inc();
        tracing::debug!(upstream = %self.upstream.name, %digest, "prefetch started");
        let (running, metrics) = (Arc::clone(&self.running), Arc::clone(&self.metrics));
        Ok(Some(follow(joined.progress, permit, running, key, metrics)))
    }
}

/// Waits for a prefetch fill to end, then frees its `max_total` permit and counts it as
/// completed without a client if it committed before any client joined.
async fn follow(
    mut progress: tokio::sync::watch::Receiver<Progress>,
    permit: OwnedSemaphorePermit,
    running: Arc<Mutex<Running>>,
    key: (Arc<str>, Digest),
    metrics: Arc<Metrics>,
) {
    let ended = progress
        .wait_for(|p| matches!(p, Progress::Verified { .. } | Progress::Failed(_)))
        .await
        .map(|p| matches!(&*p, Progress::Verified { spill: None, .. }))
        .unwrap_or(false);
    let joined = running
        .lock()
        .expect("prefetch lock")
        .remove(&key)
        .unwrap_or(true);
    if ended && !joined {
        metrics.prefetch_unjoined.inc();
    }
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_image_manifests_start_prefetches() {
        assert!(is_image_manifest(OCI_MANIFEST));
        assert!(is_image_manifest(DOCKER_MANIFEST));
        assert!(!is_image_manifest(crate::oci::manifest::OCI_INDEX));
        assert!(!is_image_manifest(crate::oci::manifest::DOCKER_LIST));
        assert!(!is_image_manifest(
            crate::oci::manifest::DOCKER_SCHEMA1_SIGNED
        ));
    }

    #[test]
    fn skip_reasons_are_the_metric_labels() {
        let labels: Vec<_> = [Skip::Paused, Skip::FillsBusy, Skip::MaxTotal]
            .iter()
            .map(|skip| skip.as_str())
            .collect();
        assert_eq!(labels, crate::metrics::PREFETCH_SKIPS);
    }
}
