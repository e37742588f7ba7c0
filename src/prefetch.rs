//! Prefetch: when a client pulls an image whose config and layers are not all cached, the
//! fills of the missing ones start at once, so the node's later blob requests (containerd
//! asks 3 at a time, each paced by one stream) join fills already under way instead of
//! starting them one after another.
//!
//! Owns when a prefetch starts and its bounds; the fills themselves are ordinary `fill` fills
//! (keyed by upstream and digest, reserved against `cache.max_size` and `min_free`, verified,
//! completed even if no client joins), started through `Fills::prefetch`, which leaves a
//! quarter of `limits.max_fills` to real misses. Deliberately not here: who may pull (the
//! caller calls this only after authorizing the request, and the fills are for the request's
//! own upstream and repository, as the policy mode's holdings rule wants), and reading the
//! manifest (`access::holdings::Listed`, the digests a manifest says its repository holds,
//! read once per request for the holdings rule and for this).
//!
//! What starts it (`prefetch.trigger`): the GET of an image manifest (`manifest`), or the first
//! GET of one of its blobs within `PLAN_TTL` of that (`first_blob`), which proves a real pull:
//! tools that only resolve digests start nothing. Then the manifest GET only leaves a plan
//! (`plans::Plans`, bounded) that the blob GET takes; the blob it asks for goes through the
//! ordinary miss path, the plan's other blobs are prefetched. Never a HEAD: it only resolves a
//! digest; never an index: it does not say which platform the node will ask for. An image
//! whose prefetch runs starts nothing more (`plans::Prefetching`): 30 nodes asking for one
//! manifest at once start one prefetch. Prefetching pauses for an upstream that answered 429
//! in the last `PAUSE_AFTER_429` or whose circuit breaker is open: the node's own requests
//! then decide what is fetched.
//!
//! A manifest hit stays cheap: a manifest found complete (every blob it names cached) is
//! remembered by digest for `COMPLETE_RECHECK` in a bounded set, and its hits within that time
//! parse nothing. A blob evicted meanwhile is then not prefetched; the node's request fills it.

mod plans;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::access::holdings::Listed;
use crate::cache::progress::Progress;
use crate::cache::{Cache, Manifest};
use crate::config::{PrefetchConfig, PrefetchTrigger};
use crate::fill::{Fills, Job};
use crate::metrics::Metrics;
use crate::oci::digest::Digest;
use crate::oci::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
use crate::oci::name::Repository;
use crate::upstream::Upstream;
use plans::{ImageKey, NotEntered, Plans, Prefetching, Underway};

/// How long prefetching stays off for an upstream after it answered 429 to any request.
pub const PAUSE_AFTER_429: Duration = Duration::from_secs(60);

/// How long a manifest found complete skips the parse and the index lookups on its hits.
const COMPLETE_RECHECK: Duration = Duration::from_secs(30);

/// Most manifests remembered as complete; beyond it the least used are forgotten (and parsed
/// again on their next hit).
const COMPLETE_CAPACITY: u64 = 4096;

/// How long a manifest GET's plan waits for the first blob GET (`first_blob`): a node asks
/// for the blobs within a second of the manifest; a plan older than this was only a resolve.
const PLAN_TTL: Duration = Duration::from_secs(60);

/// Most plans waiting, and most blobs they list in all; beyond them the oldest give way.
const MAX_PLANS: usize = 1024;
const MAX_PLAN_BLOBS: usize = 16 * 1024;

/// Most images prefetching at once. Each holds a `max_total` permit while a fill of it runs,
/// so this is reached only when `max_total` is too; an image beyond it is left to the client.
const MAX_PREFETCHING: usize = 4096;

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
    /// `first_blob`: what each cold manifest GET left for its image's first blob GET.
    plans: Mutex<Plans>,
    /// The images whose prefetch runs now.
    prefetching: Prefetching,
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
            plans: Mutex::new(Plans::new(PLAN_TTL, MAX_PLANS, MAX_PLAN_BLOBS)),
            prefetching: Prefetching::new(MAX_PREFETCHING),
        }
    }

    /// After a manifest GET was answered to a client that may pull `repository` from
    /// `upstream`: with the `manifest` trigger, starts the fills of the blobs it lists that are
    /// not cached (`start`); with `first_blob`, leaves them for its first blob GET. Returns at
    /// once.
    pub fn manifest_served(
        &self,
        at: Fillers<'_>,
        upstream: &Arc<Upstream>,
        (repository, manifest): (&Repository, &Manifest),
        listed: &Listed<'_>,
    ) {
        if !self.config.enabled || !is_image_manifest(&manifest.media_type) {
            return;
        }
        if self.complete.contains_key(&manifest.digest) {
            return;
        }
        let key = ImageKey {
            upstream: Arc::clone(&upstream.name),
            repository: repository.clone(),
            manifest: manifest.digest.clone(),
        };
        let first_blob = self.config.trigger == PrefetchTrigger::FirstBlob;
        if self.prefetching.contains(&key) || first_blob && self.plan_waits(&key) {
            return;
        }
        let missing = missing_blobs(at.cache, listed.digests());
        if missing.is_empty() {
            self.complete.insert(manifest.digest.clone(), ());
            return;
        }
        match self.config.trigger {
            PrefetchTrigger::Manifest => self.start(at, upstream, key, missing),
            PrefetchTrigger::FirstBlob => {
                let mut plans = self.plans.lock().expect("prefetch lock");
                plans.insert(key, missing, Instant::now());
            }
        }
    }

    /// Before a blob GET (never a HEAD) of a client that may pull `repository` from `upstream`
    /// is served: with `first_blob`, the first of an image's blobs asked for starts the fills
    /// of its plan's other blobs (`start`). Returns at once.
    pub fn blob_requested(
        &self,
        at: Fillers<'_>,
        upstream: &Arc<Upstream>,
        repository: &Repository,
        digest: &Digest,
    ) {
        if !self.config.enabled || self.config.trigger != PrefetchTrigger::FirstBlob {
            return;
        }
        let taken = self.plans.lock().expect("prefetch lock").take(
            &upstream.name,
            repository,
            digest,
            Instant::now(),
        );
        if let Some((key, rest)) = taken.filter(|(_, rest)| !rest.is_empty()) {
            self.start(at, upstream, key, rest);
        }
    }

    fn plan_waits(&self, key: &ImageKey) -> bool {
        let plans = self.plans.lock().expect("prefetch lock");
        plans.contains(key, Instant::now())
    }

    /// Starts an image's prefetch: the fills of `missing`, at most `max_per_image` at once
    /// (the rest queue in one task per image), unless one runs for the image already.
    fn start(
        &self,
        at: Fillers<'_>,
        upstream: &Arc<Upstream>,
        key: ImageKey,
        missing: Vec<Digest>,
    ) {
        let underway = match self.prefetching.enter(key.clone()) {
            Ok(underway) => underway,
            Err(NotEntered::Prefetching) => return,
            Err(NotEntered::Full) => {
                let label = [Skip::MaxTotal.as_str()];
                let skipped = at.metrics.prefetch_skipped.with_label_values(&label);
                skipped.inc_by(missing.len() as u64);
                return;
            }
        };
        let queue = Queue {
            fills: Arc::clone(at.fills),
            cache: Arc::clone(at.cache),
            metrics: Arc::clone(at.metrics),
            upstream: Arc::clone(upstream),
            repository: key.repository,
            total: Arc::clone(&self.total),
            running: Arc::clone(&self.running),
            per_image: self.config.max_per_image,
            _underway: underway,
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
fn missing_blobs(cache: &Cache, listed: &[Digest]) -> Vec<Digest> {
    let mut seen = HashSet::new();
    listed
        .iter()
        .filter(|digest| seen.insert(*digest) && !cache.index.contains(digest))
        .cloned()
        .collect()
}

/// One image's prefetches: its missing blobs, started in order as the bounds allow.
struct Queue {
    fills: Arc<Fills>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    upstream: Arc<Upstream>,
    repository: Repository,
    total: Arc<Semaphore>,
    running: Arc<Mutex<Running>>,
    per_image: usize,
    /// The image's place among those prefetching, left when the queue ends.
    _underway: Underway,
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
