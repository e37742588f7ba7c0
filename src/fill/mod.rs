//! Single-flight fills: one upstream fetch per missing blob, streamed to every client that asks
//! while it runs.
//!
//! A fill owns a temp file. The upstream body is hashed and appended to it on the blocking pool
//! (`O_DIRECT` where the filesystem allows, see `append`), and each length the file holds is
//! published on a `watch` channel. Every client, the first one
//! included, is a reader of that file up to the published length (`cache::reader`), so a client
//! that joins late starts at byte 0 from disk and no one waits for the fill to finish. When the
//! body ends, the digest and length are checked: a match is fsynced, renamed into the store and
//! indexed; anything else fails every reader (their bodies end in an error) and leaves nothing
//! behind. The fill runs in its own task, so it completes even if every client goes away.
//! Deciding whether to fill (the lookup) is the caller's job.
//!
//! A fill is keyed by upstream and digest: only requests routed to the same upstream join it,
//! so a slow or hostile upstream's fill never holds (or fails) the clients of another one.
//!
//! Faults, and what a fill does about them:
//! - The upstream body fails mid-way (cut, stalled past `client.read_timeout`, protocol error):
//!   the fill asks again with `Range: bytes=<received>-` (a 206 continues the same file and the
//!   same hasher, so verification still covers the whole blob; a 200 has its first bytes
//!   skipped), with jittered backoff, at most `MAX_RESUMES` times. Readers just wait.
//! - The disk fails (ENOSPC, EIO): the temp file is unlinked, the rest of the blob goes to
//!   readers through an in-memory window (`cache::spill`), it is still verified, and nothing is
//!   cached; `berth_disk_errors_total` rises.
//! - The upstream body trickles (slower than `client.min_fill_rate` over `client.min_fill_window`,
//!   yet never silent for `read_timeout`): abandoned and resumed as after a stall, so it cannot
//!   pin the fill or its `max_fills` slot.
//! - The blob is too long (`limits.max_blob_size`): a longer Content-Length is refused before a
//!   byte is written; a body without one is cut off there. A Content-Length is reserved in the
//!   index (and against `cache.min_free`) when the fill starts, so concurrent fills cannot
//!   overshoot `cache.max_size`; without room, 503 + Retry-After.
//! - Too many fills at once (`limits.max_fills`), or of one configured upstream
//!   (`limits.upstream_fill_share` of them): a new one is refused with 503 + Retry-After.
//! - Fills of one upstream keep failing by its doing (cut, trickling, wrong bytes): after
//!   `client.breaker_threshold` in a row its circuit breaker opens (`upstream::breaker`), so
//!   its next requests, and the resumes of its fills still running, fail at once.
//! - No room for a real miss while prefetches hold reservations: the youngest prefetch fill no
//!   request joined is cancelled (its reservation released), then the next, until the miss fits.
//!
//! The files, in the order a fill runs: this one (joining, the running set, shutdown; and
//! opening a cached blob), `fetch` (the phases: ask -> reserve -> open temp -> receive ->
//! verify -> commit), `receive` (the upstream body into the write queue, paced and resumed with
//! Range requests), `write` (the blocking writer: hasher + temp file + published length),
//! `append` (the temp file's writes: direct, past the page cache, in aligned blocks) and
//! `error` (`FillError`, what a failed fill tells its readers; `crate::error` maps it to a
//! response).

mod append;
mod cancel;
mod fetch;
mod receive;
mod write;

pub use crate::cache::FillError;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::HeaderValue;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::cache::{open_cached, Cache, Progress};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::digest::Digest;
use crate::oci::name::Repository;
use crate::upstream::Upstream;
use cancel::Cancel;

/// What a fill fetches.
pub struct Job {
    pub upstream: Arc<Upstream>,
    pub repository: Repository,
    pub digest: Digest,
    /// The request came from another replica of the location: fill from the upstream, never
    /// ask the ring again (an owner that disagrees about the ring fills itself).
    pub from_peer: bool,
    /// Started ahead of any client (`prefetch`): its reservation may not take the room real
    /// misses need (`fetch::PREFETCH_ROOM`).
    pub prefetch: bool,
}

struct Running {
    progress: watch::Receiver<Progress>,
    task: AbortHandle,
    /// Where the bytes come from: in the policy access mode only a request through the same
    /// upstream may join (`join_own`).
    upstream: Arc<str>,
    repository: Repository,
    /// The configured upstream (its `host`, a pattern for the hosts it matched), whose fills
    /// together may hold at most `max_upstream_fills`.
    source: Arc<str>,
    /// Started by another replica's peer request: counted against `max_peer_fills`.
    from_peer: bool,
    /// Set for a prefetch fill: notified to cancel it, giving its room to a real miss
    /// (`cancel_unjoined_prefetch`). Never set for a fill a client started.
    cancel: Option<Arc<Cancel>>,
    /// A request joined the fill: a prefetch is no longer speculative, and is never cancelled.
    joined: bool,
    /// Which fill this is, in the order fills started: the youngest prefetch is cancelled
    /// first, and a finished fill removes only its own entry.
    id: u64,
}

/// A fill is shared only by requests routed to the same upstream: a request for the same digest
/// from another upstream must not wait on (or be failed by) a slow or hostile upstream's fill.
/// It starts its own fill, or is a hit once either one has committed the blob.
#[derive(Clone, PartialEq, Eq, Hash)]
struct FillKey {
    upstream: Arc<str>,
    digest: Digest,
}

/// The fills under way, by upstream and digest.
pub struct Fills {
    running: Mutex<HashMap<FillKey, Running>>,
    /// The `id` of the next fill started.
    next_id: AtomicU64,
    /// The number of fills running, for graceful shutdown to wait on.
    count: watch::Sender<usize>,
    read_timeout: Duration,
    /// `client.min_fill_rate` over `client.min_fill_window`.
    floor: Floor,
    /// `limits.max_blob_size` (capped by `cache.max_size`).
    max_blob_size: u64,
    /// `cache.min_free`, which a fill's reservation counts against.
    min_free: Option<u64>,
    max_fills: usize,
    /// The share of `max_fills` the fills of one configured upstream may hold
    /// (`limits.upstream_fill_share`), so a slow or hostile upstream whose fills pile up
    /// cannot take every slot from the clients of the others.
    max_upstream_fills: usize,
    /// The share of `max_fills` peer requests may hold (`cluster.peer_fill_share`), so the
    /// location's other replicas cannot take every slot from this replica's own clients.
    max_peer_fills: usize,
    retry_after: HeaderValue,
    /// The location's replicas: a miss asks the digest's owner first (`cluster::peer`).
    cluster: Option<Arc<Cluster>>,
    /// `cluster.keep_local`: whether bytes an owner replica sent are cached here too, or only
    /// passed through to this fill's readers.
    keep_local: bool,
}

/// The slowest a fill may go: at least `rate` bytes per second over each `window`.
#[derive(Clone, Copy)]
struct Floor {
    rate: u64,
    window: Duration,
}

/// A reader's handle on a fill, and whether it started the fill or joined it.
pub struct Joined {
    pub progress: watch::Receiver<Progress>,
    pub coalesced: bool,
}

impl Fills {
    pub fn new(config: &Config) -> Fills {
        Fills {
            running: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            count: watch::Sender::new(0),
            read_timeout: config.client.read_timeout,
            floor: Floor {
                rate: config.client.min_fill_rate,
                window: config.client.min_fill_window,
            },
            max_blob_size: config.max_blob_size(),
            min_free: config.cache.min_free,
            max_fills: config.limits.max_fills,
            max_upstream_fills: share(config.limits.max_fills, config.limits.upstream_fill_share),
            max_peer_fills: share(config.limits.max_fills, config.cluster.peer_fill_share),
            retry_after: HeaderValue::from(config.limits.retry_after.as_secs().max(1)),
            cluster: None,
            keep_local: config.cluster.keep_local,
        }
    }

    /// Fills that ask the owner of a digest, then the parent tier, before the upstream.
    pub fn with_cluster(self, cluster: Option<Arc<Cluster>>) -> Fills {
        Fills { cluster, ..self }
    }

    /// Joins the fill of `job.digest`, starting it if none runs and the cap allows one more.
    pub fn join(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
    ) -> Result<Joined, FillError> {
        let joined = self.join_where(cache, metrics, job, 0, |_| true)?;
        Ok(joined.expect("any source is accepted"))
    }

    /// Joins or starts a fill whose bytes come from `job.upstream`, for the policy access mode:
    /// a running fill from that upstream is joined when it runs through `job.repository` or when
    /// `held` (the repository is known to hold the digest there). `None` when the digest is
    /// cached or is being filled from elsewhere: the caller decides again.
    pub(crate) fn join_own(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
        held: bool,
    ) -> Result<Option<Joined>, FillError> {
        let (upstream, repository) = (Arc::clone(&job.upstream.name), job.repository.clone());
        self.join_where(cache, metrics, job, 0, |source| {
            source.is_some_and(|(u, r)| *u == upstream && (held || *r == repository))
        })
    }

    /// Starts a fill of `job.digest` ahead of any client (`prefetch`), unless it is cached or
    /// being filled from the same upstream (`None`). Real misses keep a quarter of `max_fills`
    /// (at least one slot): a prefetch that would take those is refused (`Busy`), never queued.
    pub fn prefetch(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
    ) -> Result<Option<Joined>, FillError> {
        let kept = (self.max_fills / 4).max(1);
        self.join_where(cache, metrics, job, kept, |_| false)
    }

    /// The upstream and repository of the fill of `digest` from `upstream` under way, if any.
    pub fn filling(&self, upstream: &Arc<str>, digest: &Digest) -> Option<(Arc<str>, Repository)> {
        let key = FillKey {
            upstream: Arc::clone(upstream),
            digest: digest.clone(),
        };
        let running = self.running.lock().expect("fills lock");
        let fill = running.get(&key)?;
        Some((Arc::clone(&fill.upstream), fill.repository.clone()))
    }

    /// Joins the running fill of `job.digest` if `accept` takes its source, else serves the
    /// cached object if `accept(None)`, else starts a fill (cap permitting, `kept` slots of it
    /// left free for others).
    fn join_where(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
        kept: usize,
        accept: impl Fn(Option<(&Arc<str>, &Repository)>) -> bool,
    ) -> Result<Option<Joined>, FillError> {
        let key = FillKey {
            upstream: Arc::clone(&job.upstream.name),
            digest: job.digest.clone(),
        };
        let mut running = self.running.lock().expect("fills lock");
        if let Some(fill) = running.get_mut(&key) {
            if !accept(Some((&fill.upstream, &fill.repository))) {
                return Ok(None);
            }
            fill.joined = true;
            metrics.fill_followers.inc();
            return Ok(Some(Joined {
                progress: fill.progress.clone(),
                coalesced: true,
            }));
        }
        // A fill may have committed between the caller's index lookup and this lock.
        if cache.index.contains(&job.digest) && !accept(None) {
            return Ok(None);
        }
        if let Some(progress) = open_cached(cache, metrics, &job.digest) {
            return Ok(Some(Joined {
                progress,
                coalesced: false,
            }));
        }
        if self.no_room_for(&running, &job, kept) {
            if kept == 0 {
                metrics.rejected.with_label_values(&["fills"]).inc();
            }
            return Err(FillError::Busy {
                retry_after: self.retry_after.clone(),
            });
        }
        let (tx, rx) = watch::channel(Progress::Connecting);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = job.prefetch.then(|| Arc::new(Cancel::default()));
        let (repository, from_peer) = (job.repository.clone(), job.from_peer);
        let source = Arc::clone(&job.upstream.metric_label);
        let fill = Running {
            progress: rx.clone(),
            task: self.start(cache, metrics, job, (id, cancel.clone()), tx),
            upstream: Arc::clone(&key.upstream),
            repository,
            source,
            from_peer,
            cancel,
            joined: false,
            id,
        };
        running.insert(key, fill);
        self.count.send_replace(running.len());
        Ok(Some(Joined {
            progress: rx,
            coalesced: false,
        }))
    }

    /// Spawns the fill's task; a prefetch's (with `cancel`) ends early, failed as "cache full",
    /// when `cancel` is notified.
    fn start(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
        (id, cancel): (u64, Option<Arc<Cancel>>),
        tx: watch::Sender<Progress>,
    ) -> AbortHandle {
        metrics.fills_in_flight.inc();
        let fills = Arc::clone(self);
        let cache = Arc::clone(cache);
        let metrics = Arc::clone(metrics);
        let task_key = FillKey {
            upstream: Arc::clone(&job.upstream.name),
            digest: job.digest.clone(),
        };
        let task = tokio::spawn(async move {
            let (digest, upstream) = (job.digest.clone(), Arc::clone(&job.upstream));
            // Set when another replica or the parent tier answered first: the fill's end then
            // says nothing of the job's upstream.
            let by_peer = AtomicBool::new(false);
            let fetch = fills.fetch(&cache, &metrics, job, (&tx, &by_peer, cancel.as_deref()));
            // The fetch (and the room it reserved) is gone by the end of this statement,
            // before the readers learn the fill failed.
            let (outcome, cancelled) = match &cancel {
                Some(cancel) => tokio::select! {
                    outcome = fetch => (outcome, false),
                    () = cancel.notified() => {
                        let retry_after = fills.retry_after.clone();
                        (Err(FillError::Full { retry_after }), true)
                    }
                },
                None => (fetch.await, false),
            };
            // The fetch may have seen the cancel first (at its commit).
            let cancelled = cancelled || cancel.is_some_and(|cancel| cancel.was_cancelled());
            let judged = !cancelled && !by_peer.load(Ordering::Relaxed);
            if let Some(delivered) = upstream_verdict(&outcome).filter(|_| judged) {
                upstream.fill_ended(delivered);
            }
            // Out of the running set before its readers hear the end: a request that comes
            // after a reader saw the failure starts a fill of its own instead of joining this.
            fills.finished(&task_key, id);
            if let Err(error) = outcome {
                // A cancelled prefetch did not fail: `cancel_unjoined_prefetch` counted it.
                if !cancelled {
                    metrics.fills_failed.inc();
                    tracing::warn!(%digest, error = %error, "fill failed");
                }
                tx.send_replace(Progress::Failed(Arc::new(error)));
            }
            metrics.fills_in_flight.dec();
        });
        task.abort_handle()
    }

    /// Whether starting `job`'s fill would pass a cap: `max_fills` (less `kept` slots), the
    /// share of it one configured upstream may hold (less a quarter of that when slots are
    /// kept, so prefetches leave the upstream's own misses room too), or the share peer
    /// requests may hold.
    fn no_room_for(&self, running: &HashMap<FillKey, Running>, job: &Job, kept: usize) -> bool {
        if running.len() + kept >= self.max_fills {
            return true;
        }
        let source = &job.upstream.metric_label;
        let from_source = running.values().filter(|f| f.source == *source).count();
        let kept_by_source = match kept {
            0 => 0,
            _ => (self.max_upstream_fills / 4).max(1),
        };
        if from_source + kept_by_source >= self.max_upstream_fills {
            return true;
        }
        job.from_peer && running.values().filter(|f| f.from_peer).count() >= self.max_peer_fills
    }

    /// Cancels the youngest prefetch fill no request joined, so a real miss can have its
    /// room; its progress, to wait on until it ended. Counted in
    /// `berth_prefetch_skipped_total{reason="cancelled"}`. `None` when there is none.
    pub(super) fn cancel_unjoined_prefetch(
        &self,
        metrics: &Metrics,
    ) -> Option<watch::Receiver<Progress>> {
        let mut running = self.running.lock().expect("fills lock");
        let mut unjoined: Vec<_> = running
            .iter()
            .filter(|(_, fill)| !fill.joined)
            .filter_map(|(key, fill)| Some((fill.id, key, fill.cancel.as_ref()?)))
            .collect();
        unjoined.sort_unstable_by_key(|(id, ..)| std::cmp::Reverse(*id));
        // The youngest that has not begun to commit.
        let key = unjoined
            .into_iter()
            .find(|(.., cancel)| cancel.cancel())
            .map(|(_, key, _)| key.clone())?;
        // Out of the running set at once: no request joins a fill that is going away.
        let fill = running.remove(&key)?;
        self.count.send_replace(running.len());
        drop(running);
        metrics
            .prefetch_skipped
            .with_label_values(&[crate::metrics::PREFETCH_CANCELLED])
            .inc();
        tracing::info!(digest = %key.digest, "prefetch cancelled to give its room to a miss");
        Some(fill.progress)
    }

    /// Removes fill `id`'s entry, unless it went already (a cancelled prefetch) and another
    /// fill of the same key took its place.
    fn finished(&self, key: &FillKey, id: u64) {
        let mut running = self.running.lock().expect("fills lock");
        if running.get(key).is_some_and(|fill| fill.id == id) {
            running.remove(key);
        }
        self.count.send_replace(running.len());
    }

    pub fn in_flight(&self) -> usize {
        self.running.lock().expect("fills lock").len()
    }

    /// Waits until no fill runs (each commits or fails on its own), at most `grace`; then
    /// aborts the rest, which deletes their temp files. For graceful shutdown.
    pub async fn drain(&self, grace: Duration) {
        let mut count = self.count.subscribe();
        if tokio::time::timeout(grace, count.wait_for(|n| *n == 0))
            .await
            .is_ok()
        {
            return;
        }
        let mut running = self.running.lock().expect("fills lock");
        tracing::warn!(
            fills = running.len(),
            "fills still running after the shutdown grace period; discarding them"
        );
        for (_, fill) in running.drain() {
            fill.task.abort();
        }
        self.count.send_replace(0);
    }
}

/// `percent` of `max_fills`, at least one.
fn share(max_fills: usize, percent: u8) -> usize {
    (max_fills * usize::from(percent) / 100).max(1)
}

/// What a fill's end says about its upstream, for its circuit breaker: `Some(true)` when the
/// blob arrived and verified, `Some(false)` when the upstream failed it (no usable answer, a
/// body cut or stalled past every resume or slower than the floor, the wrong length or the
/// wrong bytes), `None` when the end says nothing about it (a refusal such as 404 is an answer,
/// the size limit and a full or failing disk are berth's, an open circuit was already counted;
/// a connection failure was counted by `Upstream::send` itself).
fn upstream_verdict(outcome: &Result<(), FillError>) -> Option<bool> {
    use crate::upstream::UpstreamError as E;
    match outcome {
        Ok(()) => Some(true),
        Err(FillError::Mismatch { .. })
        | Err(FillError::Upstream(E::Protocol(_) | E::Timeout(_) | E::Invalid(_))) => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamError;

    #[test]
    fn only_failures_of_the_upstreams_making_count_against_its_breaker() {
        let digest: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let cut = FillError::Upstream(UpstreamError::Protocol("body cut".into()));
        let trickle = FillError::Upstream(UpstreamError::Timeout("slower than the floor".into()));
        let mismatch = FillError::Mismatch {
            want: digest.clone(),
            got: digest,
        };
        for bad in [cut, trickle, mismatch] {
            assert_eq!(upstream_verdict(&Err(bad)), Some(false));
        }
        assert_eq!(upstream_verdict(&Ok(())), Some(true));
        let not_its_doing = [
            FillError::TooLarge { length: 1 << 40 },
            FillError::Disk(std::io::Error::other("EIO")),
            FillError::Upstream(UpstreamError::CircuitOpen("open".into())),
        ];
        for error in not_its_doing {
            let shown = format!("{error:?}");
            assert_eq!(upstream_verdict(&Err(error)), None, "{shown}");
        }
    }
}
