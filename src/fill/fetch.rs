//! One fill as named phases: ask the owner replica, the parent or the upstream (`first_response`) -> reserve room -> open temp -> receive (the body
//! through the writer) -> verify -> commit. Each phase fails with a `FillError` that says what
//! failed; the readers learn of success or failure through `Progress`. Joining a fill and
//! running the task are `mod.rs`'s; the body's pacing and resumes, `receive`'s.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::Method;
use http::Response;
use hyper::body::Incoming;
use tokio::sync::{mpsc, watch};

use super::receive::{past_max_blob_size, Answerer};
use super::write::{verify, write_chunks, TempFile, Written, WRITE_QUEUE_CHUNKS};
use super::{Cancel, FillError, Fills, Job, Progress};
use crate::cache::index::Reservation;
use crate::cache::{Cache, Entry, Kind};
use crate::metrics::Metrics;

/// The upstreams an owner replica reported served a blob (`cluster::peer`); empty when the
/// bytes came from the job's upstream (or the parent tier) directly.
type Provenance = Vec<Arc<str>>;

/// A received blob, not yet verified: its temp file (deleted unless committed), the open file
/// readers are reading, and what the writer saw.
struct Received {
    temp: TempFile,
    file: Arc<File>,
    written: Written,
}

impl Fills {
    pub(super) async fn fetch(
        &self,
        cache: &Arc<Cache>,
        metrics: &Metrics,
        job: Job,
        (progress, by_peer, cancel): (&watch::Sender<Progress>, &AtomicBool, Option<&Cancel>),
    ) -> Result<(), FillError> {
        let (response, provenance, answerer) = self.first_response(&job).await?;
        by_peer.store(answerer != Answerer::Upstream, Ordering::Relaxed);
        let total = crate::upstream::content_length(response.headers());
        if let Some(length) = total.filter(|total| *total > self.max_blob_size) {
            return Err(FillError::TooLarge { length });
        }
        // Room for the promised bytes is held from now on, so fills running side by side
        // cannot together overshoot `max_size` or eat into `min_free`.
        let reservation = match total {
            Some(total) => Some(self.reserve(cache, metrics, total, job.prefetch).await?),
            None => None,
        };
        let (temp, file) = open_temp(cache, metrics).await?;
        progress.send_replace(Progress::Streaming {
            file: Arc::clone(&file),
            total,
            written: 0,
            spill: None,
        });
        let body = (response.into_body(), answerer);
        let received = self
            .receive_to_disk(&job, metrics, body, total, (temp, file), progress)
            .await?;
        let written = &received.written;
        if let Err(error) = verify(&job.digest, total, &written.digest, written.len) {
            if matches!(error, FillError::Mismatch { .. }) {
                metrics.digest_mismatches.inc();
            }
            return Err(error);
        }
        if !provenance.is_empty() && !self.keep_local && received.written.spilled.is_none() {
            // An owner replica sent the bytes and this one keeps no copy: readers finish from
            // the open file, and the temp file goes when `received` drops.
            progress.send_replace(Progress::Verified {
                file: Arc::clone(&received.file),
                total: received.written.len,
                spill: None,
            });
            return Ok(());
        }
        if cancel.is_some_and(|cancel| !cancel.begin_commit()) {
            // Cancelled for a real miss; the task that runs this fill is ending it.
            let retry_after = self.retry_after.clone();
            return Err(FillError::Full { retry_after });
        }
        let source = (reservation, provenance);
        commit(cache, metrics, &job, received, source, progress).await;
        Ok(())
    }

    /// Receives the body (with who sends it) through the blocking writer
    /// into `file`. Fails when the body failed for good, or when the final fsync did (the file
    /// then cannot be trusted).
    async fn receive_to_disk(
        &self,
        job: &Job,
        metrics: &Metrics,
        (body, answerer): (Incoming, Answerer),
        total: Option<u64>,
        (temp, file): (TempFile, Arc<File>),
        progress: &watch::Sender<Progress>,
    ) -> Result<Received, FillError> {
        let path = temp.0.clone().expect("temp path present until kept");
        let (chunks, queue) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        let writer = {
            let file = Arc::clone(&file);
            let progress = progress.clone();
            tokio::task::spawn_blocking(move || write_chunks(&file, &path, queue, &progress))
        };
        let read = self
            .receive(job, metrics, body, total, &chunks, answerer)
            .await;
        drop(chunks);
        let mut written = writer
            .await
            .map_err(|err| FillError::Disk(std::io::Error::other(err)))?;
        read.map_err(|error| match past_max_blob_size(&error) {
            // Berth's limit, not the upstream's doing: its breaker is not told.
            true => FillError::TooLarge {
                length: written.len,
            },
            false => FillError::from(error),
        })?;
        if let Some(err) = written.sync_error.take() {
            metrics.disk_errors.inc();
            return Err(FillError::Disk(err));
        }
        Ok(Received {
            temp,
            file,
            written,
        })
    }

    /// The owner's answer when another replica of the location owns the digest and serves it,
    /// else the parent tier's (`cluster.parent`), else the upstream's; with the upstreams the
    /// owner reports served the bytes (empty: the job's upstream alone). Should the owner's
    /// body fail, `receive` resumes from the upstream with a Range at the bytes already
    /// hashed, as for any upstream body.
    async fn first_response(
        &self,
        job: &Job,
    ) -> Result<(Response<Incoming>, Provenance, Answerer), FillError> {
        if let Some(cluster) = &self.cluster {
            if !job.from_peer {
                let asked = cluster.ask_owner(&job.upstream.name, &job.repository, &job.digest);
                if let Some(answer) = asked.await {
                    return Ok((answer.response, answer.provenance, Answerer::Owner));
                }
            }
            let asked = cluster.ask_parent(&job.upstream.name, &job.repository, &job.digest);
            if let Some(response) = asked.await {
                return Ok((response, Vec::new(), Answerer::Parent));
            }
        }
        let response = job
            .upstream
            .blob(Method::GET, &job.repository, &job.digest)
            .await?;
        Ok((response, Vec::new(), Answerer::Upstream))
    }

    /// Reserves `total` bytes in the cache (evicting to make room) against `max_size` and
    /// `min_free`; refused when the fills already running hold the room.
    async fn reserve<'c>(
        &self,
        cache: &'c Arc<Cache>,
        metrics: &Metrics,
        total: u64,
        prefetch: bool,
    ) -> Result<Reservation<'c>, FillError> {
        let full = || {
            metrics.rejected.with_label_values(&["fills"]).inc();
            FillError::Full {
                retry_after: self.retry_after.clone(),
            }
        };
        let reservation = match prefetch {
            true => cache.index.reserve_within(total, PREFETCH_ROOM),
            false => self.reserve_for_miss(cache, metrics, total).await,
        };
        let reservation = reservation.ok_or_else(full)?;
        let Some(min_free) = self.min_free else {
            return Ok(reservation);
        };
        let owned = Arc::clone(cache);
        let room = tokio::task::spawn_blocking(move || owned.room_for_reservations(min_free))
            .await
            .map_err(std::io::Error::other)
            .and_then(|room| room);
        match room {
            Ok(true) => Ok(reservation),
            Ok(false) => Err(full()),
            Err(err) => {
                metrics.disk_errors.inc();
                Err(FillError::Disk(err))
            }
        }
    }
}

impl Fills {
    /// `Index::reserve` for a real miss, which takes room from speculation: while there is no
    /// room, the youngest prefetch fill no request joined is cancelled and its reservation
    /// released (`cancel_unjoined_prefetch`). Bounded by the fills running.
    async fn reserve_for_miss<'c>(
        &self,
        cache: &'c Cache,
        metrics: &Metrics,
        total: u64,
    ) -> Option<Reservation<'c>> {
        for _ in 0..=self.max_fills {
            if let Some(reservation) = cache.index.reserve(total) {
                return Some(reservation);
            }
            let mut cancelled = self.cancel_unjoined_prefetch(metrics)?;
            // Its room is free once it ended: failed (cancelled), or verified and indexed
            // (then evictable) if it finished first; a closed channel means it is gone.
            let _ = cancelled
                .wait_for(|p| matches!(p, Progress::Failed(_) | Progress::Verified { .. }))
                .await;
        }
        cache.index.reserve(total)
    }
}

/// The share of `cache.max_size` that reservations may fill when a prefetch reserves: the
/// rest stays for real misses, which a speculative fill must never turn into "cache full".
pub(super) const PREFETCH_ROOM: (u64, u64) = (1, 2);

/// Creates the fill's temp file in the store; deleted again unless the fill commits it.
async fn open_temp(cache: &Cache, metrics: &Metrics) -> Result<(TempFile, Arc<File>), FillError> {
    let store = Arc::clone(&cache.store);
    match tokio::task::spawn_blocking(move || store.temp_file()).await {
        Ok(Ok((path, file))) => Ok((TempFile(Some(path)), Arc::new(file))),
        Ok(Err(err)) => {
            metrics.disk_errors.inc();
            Err(FillError::Disk(err))
        }
        Err(err) => Err(FillError::Disk(std::io::Error::other(err))),
    }
}

/// Publishes a verified blob: renamed into the store, indexed (in its reservation) and its
/// origin noted. After a disk failure (mid-fill, or at the rename) the verified bytes are
/// served from the open file or the spill window and nothing is cached.
async fn commit(
    cache: &Cache,
    metrics: &Metrics,
    job: &Job,
    received: Received,
    (reservation, provenance): (Option<Reservation<'_>>, Provenance),
    progress: &watch::Sender<Progress>,
) {
    let Received {
        temp,
        file,
        written,
    } = received;
    let verified = |spill| Progress::Verified {
        file: Arc::clone(&file),
        total: written.len,
        spill,
    };
    if let Some((err, spill)) = written.spilled {
        metrics.disk_errors.inc();
        tracing::warn!(digest = %job.digest, %err, "cache disk failed during a fill; passed the blob through without caching it");
        progress.send_replace(verified(Some(spill)));
        return;
    }
    let store = Arc::clone(&cache.store);
    let target = job.digest.clone();
    let path = temp.keep();
    let temp_path = path.clone();
    let committed =
        tokio::task::spawn_blocking(move || store.commit(&path, Kind::Blob, &target)).await;
    if let Err(err) = committed.map_err(std::io::Error::other).and_then(|r| r) {
        // The bytes are verified and still in the open file: serve them, cache nothing.
        metrics.disk_errors.inc();
        // Only the temp file is ours: the digest's path may hold another upstream's commit.
        let _ = std::fs::remove_file(temp_path);
        tracing::warn!(digest = %job.digest, %err, "cannot commit a verified blob; served it uncached");
        progress.send_replace(verified(None));
        return;
    }
    // The origin first: a request that finds the blob in the index must find where it came
    // from too (the holdings rule, and the provenance an owner replica reports).
    record_origin(cache, job, provenance).await;
    let entry = Entry::new(Kind::Blob, written.len, None);
    match reservation {
        Some(reservation) => reservation.commit(job.digest.clone(), entry),
        None => cache.index.insert(job.digest.clone(), entry),
    }
    metrics.fills_completed.inc();
    progress.send_replace(verified(None));
}

/// Notes where a committed blob came from (`cache::origins`), before readers see it verified:
/// the job's upstream and repository, and the other upstreams an owner replica reported.
async fn record_origin(cache: &Cache, job: &Job, provenance: Provenance) {
    let origins = Arc::clone(&cache.origins);
    let (digest, upstream, repository) = (
        job.digest.clone(),
        Arc::clone(&job.upstream.name),
        job.repository.clone(),
    );
    let _ = tokio::task::spawn_blocking(move || match provenance.is_empty() {
        true => origins.fetched(&digest, &upstream, &repository, true),
        false => origins.reported(&digest, &provenance, (&upstream, &repository), true),
    })
    .await;
}
