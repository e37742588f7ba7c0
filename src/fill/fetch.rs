//! One fill as named phases: ask the upstream -> reserve room -> open temp -> receive (the body
//! through the writer) -> verify -> commit. Each phase fails with a `FillError` that says what
//! failed; the readers learn of success or failure through `Progress`. Joining a fill and
//! running the task are `mod.rs`'s; the body's pacing and resumes, `receive`'s.

use std::fs::File;
use std::sync::Arc;

use http::Method;
use tokio::sync::{mpsc, watch};

use super::write::{verify, write_chunks, TempFile, Written, WRITE_QUEUE_CHUNKS};
use super::{FillError, Fills, Job, Progress};
use crate::cache::index::Reservation;
use crate::cache::{Cache, Entry, Kind};
use crate::metrics::Metrics;

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
        progress: &watch::Sender<Progress>,
    ) -> Result<(), FillError> {
        let response = job
            .upstream
            .blob(Method::GET, &job.repository, &job.digest)
            .await?;
        let total = crate::upstream::content_length(response.headers());
        if let Some(length) = total.filter(|total| *total > self.max_blob_size) {
            return Err(FillError::TooLarge { length });
        }
        // Room for the promised bytes is held from now on, so fills running side by side
        // cannot together overshoot `max_size` or eat into `min_free`.
        let reservation = match total {
            Some(total) => Some(self.reserve(cache, metrics, total).await?),
            None => None,
        };
        let (temp, file) = open_temp(cache, metrics).await?;
        progress.send_replace(Progress::Streaming {
            file: Arc::clone(&file),
            total,
            written: 0,
            spill: None,
        });
        let body = response.into_body();
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
        commit(cache, metrics, &job, received, reservation, progress).await;
        Ok(())
    }

    /// Receives the body through the blocking writer into `file`. Fails when the body failed
    /// for good, or when the final fsync did (the file then cannot be trusted).
    async fn receive_to_disk(
        &self,
        job: &Job,
        metrics: &Metrics,
        body: hyper::body::Incoming,
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
        let read = self.receive(job, metrics, body, total, &chunks).await;
        drop(chunks);
        let mut written = writer
            .await
            .map_err(|err| FillError::Disk(std::io::Error::other(err)))?;
        read?;
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

    /// Reserves `total` bytes in the cache (evicting to make room) against `max_size` and
    /// `min_free`; refused when the fills already running hold the room.
    async fn reserve<'c>(
        &self,
        cache: &'c Arc<Cache>,
        metrics: &Metrics,
        total: u64,
    ) -> Result<Reservation<'c>, FillError> {
        let full = || {
            metrics.rejected.with_label_values(&["fills"]).inc();
            FillError::Full {
                retry_after: self.retry_after.clone(),
            }
        };
        let reservation = cache.index.reserve(total).ok_or_else(full)?;
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
    reservation: Option<Reservation<'_>>,
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
    let entry = Entry::new(Kind::Blob, written.len, None);
    match reservation {
        Some(reservation) => reservation.commit(job.digest.clone(), entry),
        None => cache.index.insert(job.digest.clone(), entry),
    }
    record_origin(cache, job).await;
    metrics.fills_completed.inc();
    progress.send_replace(verified(None));
}

/// Notes where a committed blob came from (`cache::origins`), before readers see it verified.
async fn record_origin(cache: &Cache, job: &Job) {
    let origins = Arc::clone(&cache.origins);
    let (digest, upstream, repository) = (
        job.digest.clone(),
        Arc::clone(&job.upstream.name),
        job.repository.clone(),
    );
    let _ =
        tokio::task::spawn_blocking(move || origins.fetched(&digest, &upstream, &repository, true))
            .await;
}
