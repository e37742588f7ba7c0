//! Single-flight fills: one upstream fetch per missing blob, streamed to every client that asks
//! while it runs.
//!
//! A fill owns a temp file. The upstream body is hashed and appended to it on the blocking pool,
//! and each appended length is published on a `watch` channel. Every client, the first one
//! included, is a reader of that file up to the published length (`cache::reader`), so a client
//! that joins late starts at byte 0 from disk and no one waits for the fill to finish. When the
//! body ends, the digest and length are checked: a match is fsynced, renamed into the store and
//! indexed; anything else fails every reader (their bodies end in an error) and leaves nothing
//! behind. The fill runs in its own task, so it completes even if every client goes away.
//! Deciding whether to fill (the lookup) is the caller's job.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, watch};

use crate::cache::{Cache, Entry, Kind};
use crate::error::{ApiError, Code};
use crate::metrics::Metrics;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::name::Repository;
use crate::upstream::{Upstream, UpstreamError};

/// Where a fill is; readers decide what they may send from it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The upstream request is under way; no response head yet.
    Connecting,
    /// Bytes `[0, written)` of the file are on disk but not yet verified.
    Streaming {
        file: Arc<File>,
        total: Option<u64>,
        written: u64,
    },
    /// The whole blob is on disk and matches its digest.
    Verified { file: Arc<File>, total: u64 },
    /// The fill failed; nothing was cached.
    Failed(ApiError),
}

impl Progress {
    /// The state of a blob that is already in the cache.
    pub fn verified(file: File, total: u64) -> watch::Receiver<Progress> {
        let (_, rx) = watch::channel(Progress::Verified {
            file: Arc::new(file),
            total,
        });
        rx
    }
}

/// What a fill fetches.
pub struct Job {
    pub upstream: Arc<Upstream>,
    pub repository: Repository,
    pub digest: Digest,
}

/// The fills under way, by digest.
pub struct Fills {
    running: Mutex<HashMap<Digest, watch::Receiver<Progress>>>,
    read_timeout: Duration,
}

/// A reader's handle on a fill, and whether it started the fill or joined it.
pub struct Joined {
    pub progress: watch::Receiver<Progress>,
    pub coalesced: bool,
}

/// Bounded so a slow disk pushes back on the upstream read instead of buffering the blob.
const WRITE_QUEUE_CHUNKS: usize = 16;

impl Fills {
    pub fn new(read_timeout: Duration) -> Fills {
        Fills {
            running: Mutex::new(HashMap::new()),
            read_timeout,
        }
    }

    /// Joins the fill of `job.digest`, starting it if none runs.
    pub fn join(self: &Arc<Self>, cache: &Arc<Cache>, metrics: &Arc<Metrics>, job: Job) -> Joined {
        let mut running = self.running.lock().expect("fills lock");
        if let Some(progress) = running.get(&job.digest) {
            metrics.fill_followers.inc();
            return Joined {
                progress: progress.clone(),
                coalesced: true,
            };
        }
        // A fill may have committed between the caller's index lookup and this lock.
        if let Some(progress) = open_cached(cache, &job.digest) {
            return Joined {
                progress,
                coalesced: false,
            };
        }
        let (tx, rx) = watch::channel(Progress::Connecting);
        running.insert(job.digest.clone(), rx.clone());
        drop(running);
        metrics.fills_in_flight.inc();
        let fills = Arc::clone(self);
        let cache = Arc::clone(cache);
        let metrics = Arc::clone(metrics);
        tokio::spawn(async move {
            let digest = job.digest.clone();
            let outcome = fills.fetch(&cache, &metrics, job, &tx).await;
            if let Err(error) = outcome {
                metrics.fills_failed.inc();
                tracing::warn!(%digest, message = %error.message, detail = ?error.detail, "fill failed");
                tx.send_replace(Progress::Failed(error));
            }
            fills.running.lock().expect("fills lock").remove(&digest);
            metrics.fills_in_flight.dec();
        });
        Joined {
            progress: rx,
            coalesced: false,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.running.lock().expect("fills lock").len()
    }

    async fn fetch(
        &self,
        cache: &Cache,
        metrics: &Metrics,
        job: Job,
        progress: &watch::Sender<Progress>,
    ) -> Result<(), ApiError> {
        let response = job.upstream.get_blob(&job.repository, &job.digest).await?;
        let total = crate::upstream::content_length(response.headers());
        let store = Arc::clone(&cache.store);
        let (path, file) = tokio::task::spawn_blocking(move || store.temp_file())
            .await
            .map_err(std::io::Error::other)??;
        let temp = TempFile(Some(path));
        let file = Arc::new(file);
        progress.send_replace(Progress::Streaming {
            file: Arc::clone(&file),
            total,
            written: 0,
        });

        let (chunks, queue) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        let writer = {
            let file = Arc::clone(&file);
            let progress = progress.clone();
            tokio::task::spawn_blocking(move || write_chunks(&file, queue, &progress))
        };
        let received = metrics.upstream_bytes.with_label_values(&["blob"]);
        let read = self.pump(response.into_body(), chunks, &received).await;
        let (digest, written) = writer.await.map_err(std::io::Error::other)??;
        read?;
        if total.is_some_and(|total| total != written) {
            let detail = format!("upstream promised {total:?} bytes and sent {written}");
            return Err(UpstreamError::Invalid(detail).into());
        }
        if digest != job.digest {
            metrics.digest_mismatches.inc();
            let detail = format!("upstream sent {digest} for {}", job.digest);
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                "upstream content does not match its digest",
            )
            .with_detail(detail));
        }
        let store = Arc::clone(&cache.store);
        let target = job.digest.clone();
        let path = temp.keep();
        tokio::task::spawn_blocking(move || store.commit(&path, Kind::Blob, &target))
            .await
            .map_err(std::io::Error::other)??;
        cache
            .index
            .insert(job.digest.clone(), Entry::new(Kind::Blob, written, None));
        cache.index.settle();
        metrics.fills_completed.inc();
        progress.send_replace(Progress::Verified {
            file,
            total: written,
        });
        Ok(())
    }

    /// Moves the upstream body into the write queue, failing on a stall or a cut connection.
    async fn pump(
        &self,
        mut body: hyper::body::Incoming,
        chunks: mpsc::Sender<Bytes>,
        received: &prometheus::IntCounter,
    ) -> Result<(), ApiError> {
        loop {
            let frame = match tokio::time::timeout(self.read_timeout, body.frame()).await {
                Err(_) => return Err(UpstreamError::Timeout("blob body stalled".into()).into()),
                Ok(None) => return Ok(()),
                Ok(Some(Err(err))) => {
                    return Err(UpstreamError::Protocol(format!("blob body: {err}")).into())
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                received.inc_by(data.len() as u64);
                if chunks.send(data).await.is_err() {
                    // The writer stopped on a disk error; it reports that error itself.
                    return Ok(());
                }
            }
        }
    }
}

/// Appends queued chunks to the file, hashing them, and publishes each new length.
fn write_chunks(
    file: &File,
    mut queue: mpsc::Receiver<Bytes>,
    progress: &watch::Sender<Progress>,
) -> std::io::Result<(Digest, u64)> {
    let mut verifier = Verifier::new();
    let mut written = 0u64;
    let mut out = file;
    while let Some(chunk) = queue.blocking_recv() {
        verifier.update(&chunk);
        out.write_all(&chunk)?;
        written += chunk.len() as u64;
        progress.send_modify(|state| {
            if let Progress::Streaming { written: w, .. } = state {
                *w = written;
            }
        });
    }
    file.sync_data()?;
    Ok((verifier.finish(), written))
}

/// A cached blob opened for reading, or `None` (and the index entry dropped) if its file is gone.
pub fn open_cached(cache: &Cache, digest: &Digest) -> Option<watch::Receiver<Progress>> {
    let entry = cache.index.get(digest).filter(|e| e.kind == Kind::Blob)?;
    match cache.store.open_blob(Kind::Blob, digest) {
        Ok(file) => {
            record_access(&file);
            Some(Progress::verified(file, entry.size))
        }
        Err(err) => {
            tracing::warn!(%digest, %err, "indexed blob unreadable; dropping it");
            cache.index.forget(digest);
            None
        }
    }
}

/// Coarse enough that a hot blob costs one metadata write a minute, fine enough for LRU order.
const ACCESS_GRANULARITY: std::time::Duration = std::time::Duration::from_secs(60);

/// Records a hit in the file's mtime, which orders eviction after a restart and for `min_free`.
fn record_access(file: &File) {
    let now = std::time::SystemTime::now();
    let stale = file
        .metadata()
        .and_then(|m| m.modified())
        .map_or(true, |modified| {
            now.duration_since(modified)
                .is_ok_and(|age| age > ACCESS_GRANULARITY)
        });
    if stale {
        let _ = file.set_modified(now);
    }
}

/// Deletes an uncommitted temp file when the fill ends without committing it.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) -> PathBuf {
        self.0.take().expect("temp path present until kept")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
