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
//!
//! Faults, and what a fill does about them:
//! - The upstream body fails mid-way (cut, stalled past `client.read_timeout`, protocol error):
//!   the fill asks again with `Range: bytes=<received>-` (a 206 continues the same file and the
//!   same hasher, so verification still covers the whole blob; a 200 has its first bytes
//!   skipped), with jittered backoff, at most `MAX_RESUMES` times. Readers just wait.
//! - The disk fails (ENOSPC, EIO): the temp file is unlinked, the rest of the blob goes to
//!   readers through an in-memory window (`cache::spill`), it is still verified, and nothing is
//!   cached; `berth_disk_errors_total` rises.
//! - Too many fills at once (`limits.max_fills`): a new one is refused with 503 + Retry-After.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{HeaderValue, CONTENT_RANGE, RETRY_AFTER};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::cache::spill::{Spill, SPILL_WINDOW};
use crate::cache::{Cache, Entry, Kind};
use crate::error::{ApiError, Code};
use crate::metrics::Metrics;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::name::Repository;
use crate::upstream::{retry, Upstream, UpstreamError};

/// Where a fill is; readers decide what they may send from it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The upstream request is under way; no response head yet.
    Connecting,
    /// Bytes `[0, written)` are received but not yet verified: in the file, or past
    /// `spill.disk_len()` in the spill window after a disk failure.
    Streaming {
        file: Arc<File>,
        total: Option<u64>,
        written: u64,
        spill: Option<Arc<Spill>>,
    },
    /// The whole blob matches its digest. With a spill it was passed through, not cached.
    Verified {
        file: Arc<File>,
        total: u64,
        spill: Option<Arc<Spill>>,
    },
    /// The fill failed; nothing was cached.
    Failed(ApiError),
}

impl Progress {
    /// The state of a blob that is already in the cache.
    pub fn verified(file: File, total: u64) -> watch::Receiver<Progress> {
        let (_, rx) = watch::channel(Progress::Verified {
            file: Arc::new(file),
            total,
            spill: None,
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

struct Running {
    progress: watch::Receiver<Progress>,
    task: AbortHandle,
    /// Where the bytes come from: in the policy access mode only a request through the same
    /// upstream may join (`join_own`).
    upstream: Arc<str>,
    repository: Repository,
}

/// The fills under way, by digest.
pub struct Fills {
    running: Mutex<HashMap<Digest, Running>>,
    /// The number of fills running, for graceful shutdown to wait on.
    count: watch::Sender<usize>,
    read_timeout: Duration,
    max_fills: usize,
    retry_after: HeaderValue,
}

/// A reader's handle on a fill, and whether it started the fill or joined it.
pub struct Joined {
    pub progress: watch::Receiver<Progress>,
    pub coalesced: bool,
}

/// Bounded so a slow disk pushes back on the upstream read instead of buffering the blob.
const WRITE_QUEUE_CHUNKS: usize = 16;

/// Range requests one fill may make after its upstream body fails; each waits a jittered
/// backoff first, so a flapping upstream costs a fill a few seconds at most before it fails.
const MAX_RESUMES: u32 = 6;

impl Fills {
    pub fn new(read_timeout: Duration, max_fills: usize, retry_after: Duration) -> Fills {
        Fills {
            running: Mutex::new(HashMap::new()),
            count: watch::Sender::new(0),
            read_timeout,
            max_fills,
            retry_after: HeaderValue::from(retry_after.as_secs().max(1)),
        }
    }

    /// Joins the fill of `job.digest`, starting it if none runs and the cap allows one more.
    pub fn join(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
    ) -> Result<Joined, ApiError> {
        let joined = self.join_where(cache, metrics, job, |_| true)?;
        Ok(joined.expect("any source is accepted"))
    }

    /// Joins or starts a fill whose bytes come from `job.upstream`, for the policy access mode:
    /// a running fill from that upstream is joined when it runs through `job.repository` or when
    /// `held` (the repository is known to hold the digest there). `None` when the digest is
    /// cached or is being filled from elsewhere: the caller decides again.
    pub fn join_own(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
        held: bool,
    ) -> Result<Option<Joined>, ApiError> {
        let (upstream, repository) = (Arc::clone(&job.upstream.name), job.repository.clone());
        self.join_where(cache, metrics, job, |source| {
            source.is_some_and(|(u, r)| *u == upstream && (held || *r == repository))
        })
    }

    /// The upstream and repository of the fill of `digest` under way, if any.
    pub fn filling(&self, digest: &Digest) -> Option<(Arc<str>, Repository)> {
        let running = self.running.lock().expect("fills lock");
        let fill = running.get(digest)?;
        Some((Arc::clone(&fill.upstream), fill.repository.clone()))
    }

    /// Joins the running fill of `job.digest` if `accept` takes its source, else serves the
    /// cached object if `accept(None)`, else starts a fill (cap permitting).
    fn join_where(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
        accept: impl Fn(Option<(&Arc<str>, &Repository)>) -> bool,
    ) -> Result<Option<Joined>, ApiError> {
        let mut running = self.running.lock().expect("fills lock");
        if let Some(fill) = running.get(&job.digest) {
            if !accept(Some((&fill.upstream, &fill.repository))) {
                return Ok(None);
            }
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
        if running.len() >= self.max_fills {
            metrics.rejected.with_label_values(&["fills"]).inc();
            let error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "too many blob fills in flight; retry shortly",
            )
            .with_header(RETRY_AFTER, self.retry_after.clone());
            return Err(error);
        }
        let (tx, rx) = watch::channel(Progress::Connecting);
        metrics.fills_in_flight.inc();
        let fills = Arc::clone(self);
        let cache = Arc::clone(cache);
        let metrics = Arc::clone(metrics);
        let digest = job.digest.clone();
        let (upstream, repository) = (Arc::clone(&job.upstream.name), job.repository.clone());
        let task = tokio::spawn(async move {
            let digest = job.digest.clone();
            let outcome = fills.fetch(&cache, &metrics, job, &tx).await;
            if let Err(error) = outcome {
                metrics.fills_failed.inc();
                tracing::warn!(%digest, message = %error.message, detail = ?error.detail, "fill failed");
                tx.send_replace(Progress::Failed(error));
            }
            fills.finished(&digest);
            metrics.fills_in_flight.dec();
        });
        running.insert(
            digest,
            Running {
                progress: rx.clone(),
                task: task.abort_handle(),
                upstream,
                repository,
            },
        );
        self.count.send_replace(running.len());
        Ok(Some(Joined {
            progress: rx,
            coalesced: false,
        }))
    }

    fn finished(&self, digest: &Digest) {
        let mut running = self.running.lock().expect("fills lock");
        running.remove(digest);
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

    async fn fetch(
        &self,
        cache: &Cache,
        metrics: &Metrics,
        job: Job,
        progress: &watch::Sender<Progress>,
    ) -> Result<(), ApiError> {
        let response = job
            .upstream
            .blob(Method::GET, &job.repository, &job.digest)
            .await?;
        let total = crate::upstream::content_length(response.headers());
        let store = Arc::clone(&cache.store);
        let (path, file) = match tokio::task::spawn_blocking(move || store.temp_file()).await {
            Ok(Ok(created)) => created,
            Ok(Err(err)) => {
                metrics.disk_errors.inc();
                return Err(err.into());
            }
            Err(err) => return Err(std::io::Error::other(err).into()),
        };
        let temp = TempFile(Some(path.clone()));
        let file = Arc::new(file);
        progress.send_replace(Progress::Streaming {
            file: Arc::clone(&file),
            total,
            written: 0,
            spill: None,
        });

        let (chunks, queue) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        let writer = {
            let file = Arc::clone(&file);
            let progress = progress.clone();
            tokio::task::spawn_blocking(move || write_chunks(&file, &path, queue, &progress))
        };
        let read = self
            .receive(&job, metrics, response.into_body(), total, &chunks)
            .await;
        drop(chunks);
        let written = writer.await.map_err(std::io::Error::other)?;
        read?;
        if let Some(err) = written.sync_error {
            metrics.disk_errors.inc();
            return Err(err.into());
        }
        if total.is_some_and(|total| total != written.len) {
            let detail = format!("upstream promised {total:?} bytes and sent {}", written.len);
            return Err(UpstreamError::Invalid(detail).into());
        }
        if written.digest != job.digest {
            metrics.digest_mismatches.inc();
            let detail = format!("upstream sent {} for {}", written.digest, job.digest);
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                "upstream content does not match its digest",
            )
            .with_detail(detail));
        }
        if let Some((err, spill)) = written.spilled {
            metrics.disk_errors.inc();
            tracing::warn!(digest = %job.digest, %err, "cache disk failed during a fill; passed the blob through without caching it");
            progress.send_replace(Progress::Verified {
                file,
                total: written.len,
                spill: Some(spill),
            });
            return Ok(());
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
            let _ = std::fs::remove_file(temp_path);
            let _ = std::fs::remove_file(cache.store.path(Kind::Blob, &job.digest));
            tracing::warn!(digest = %job.digest, %err, "cannot commit a verified blob; served it uncached");
            progress.send_replace(Progress::Verified {
                file,
                total: written.len,
                spill: None,
            });
            return Ok(());
        }
        cache.index.insert(
            job.digest.clone(),
            Entry::new(Kind::Blob, written.len, None),
        );
        record_origin(cache, &job).await;
        metrics.fills_completed.inc();
        progress.send_replace(Progress::Verified {
            file,
            total: written.len,
            spill: None,
        });
        Ok(())
    }

    /// Moves the upstream body into the write queue, resuming with Range requests when it
    /// fails part-way.
    async fn receive(
        &self,
        job: &Job,
        metrics: &Metrics,
        mut body: Incoming,
        total: Option<u64>,
        chunks: &mpsc::Sender<Bytes>,
    ) -> Result<(), ApiError> {
        let mut received = 0u64;
        let mut skip = 0u64;
        let mut resumes = 0u32;
        let counted = metrics.upstream_bytes.with_label_values(&["blob"]);
        loop {
            let before = received;
            let pumped = self.pump(body, skip, chunks, &mut received).await;
            counted.inc_by(received - before);
            let mut error = match pumped {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            // Every promised byte arrived and only the connection's end failed: verify it.
            if total.is_some_and(|total| received >= total) {
                return Ok(());
            }
            loop {
                if resumes >= MAX_RESUMES {
                    return Err(error.into());
                }
                tokio::time::sleep(retry::jittered(resumes, rand::random())).await;
                resumes += 1;
                metrics.fill_resumes.inc();
                tracing::info!(digest = %job.digest, offset = received, %error, "upstream blob body failed; resuming with a Range request");
                match resume(job, received, total).await {
                    Ok((rest, to_skip)) => {
                        body = rest;
                        skip = to_skip;
                        break;
                    }
                    Err(err) if !resumable(&err) => return Err(err.into()),
                    Err(err) => error = err,
                }
            }
        }
    }

    /// Moves one upstream body into the write queue, dropping its first `skip` bytes and
    /// counting what it queued in `received`. Fails on a stall or a broken body.
    async fn pump(
        &self,
        mut body: Incoming,
        mut skip: u64,
        chunks: &mpsc::Sender<Bytes>,
        received: &mut u64,
    ) -> Result<(), UpstreamError> {
        loop {
            let frame = match tokio::time::timeout(self.read_timeout, body.frame()).await {
                Err(_) => return Err(UpstreamError::Timeout("blob body stalled".into())),
                Ok(None) => return Ok(()),
                Ok(Some(Err(err))) => {
                    return Err(UpstreamError::Protocol(format!("blob body: {err}")))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if skip > 0 {
                let n = skip.min(data.len() as u64);
                data.advance(n as usize);
                skip -= n;
            }
            if data.is_empty() {
                continue;
            }
            *received += data.len() as u64;
            if chunks.send(data).await.is_err() {
                // The writer is gone (it panicked); the fill fails when its result is read.
                return Ok(());
            }
        }
    }
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

/// Asks for the rest of the blob from byte `from`. Returns the body and how many of its
/// leading bytes are already held (0 for a matching 206, `from` for a 200 of the whole blob).
async fn resume(
    job: &Job,
    from: u64,
    total: Option<u64>,
) -> Result<(Incoming, u64), UpstreamError> {
    let response = job
        .upstream
        .get_blob_range(&job.repository, &job.digest, from)
        .await?;
    if response.status() != StatusCode::PARTIAL_CONTENT {
        let length = crate::upstream::content_length(response.headers());
        if let (Some(length), Some(total)) = (length, total) {
            if length != total {
                let detail = format!("blob was {total} bytes, a re-fetch promises {length}");
                return Err(UpstreamError::Invalid(detail));
            }
        }
        return Ok((response.into_body(), from));
    }
    let content_range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match parse_content_range(content_range) {
        Some((start, size)) if start == from && (total.is_none() || size == total) => {
            Ok((response.into_body(), 0))
        }
        _ => Err(UpstreamError::Invalid(format!(
            "asked for bytes {from}- and got Content-Range {content_range:?}"
        ))),
    }
}

/// `bytes START-END/SIZE` -> (START, SIZE), SIZE `None` for `*`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, size) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let size = match size.trim() {
        "*" => None,
        size => Some(size.parse().ok()?),
    };
    Some((start, size))
}

/// Failures worth another Range request: the upstream was unreachable or the body broke again.
/// A refusal (4xx), a bad answer or an open circuit ends the fill.
fn resumable(error: &UpstreamError) -> bool {
    match error {
        UpstreamError::Connect(_) | UpstreamError::Timeout(_) | UpstreamError::Protocol(_) => true,
        UpstreamError::Status { status, .. } => status.is_server_error(),
        _ => false,
    }
}

/// What the writer saw.
struct Written {
    digest: Digest,
    len: u64,
    /// The disk failed mid-fill: the error, and the window the rest of the blob went through.
    spilled: Option<(std::io::Error, Arc<Spill>)>,
    /// The final fsync failed: the file's contents cannot be trusted, so the fill fails.
    sync_error: Option<std::io::Error>,
}

/// Appends queued chunks to the file, hashing them, and publishes each new length. On a write
/// error it unlinks the file and carries on in memory (`Spill`), so the readers still get
/// every byte and the hash still covers the whole blob.
fn write_chunks(
    file: &File,
    path: &Path,
    mut queue: mpsc::Receiver<Bytes>,
    progress: &watch::Sender<Progress>,
) -> Written {
    let mut verifier = Verifier::new();
    let mut written = 0u64;
    let mut spilled: Option<(std::io::Error, Arc<Spill>)> = None;
    let mut out = file;
    while let Some(chunk) = queue.blocking_recv() {
        verifier.update(&chunk);
        if spilled.is_none() {
            if let Err(err) = out.write_all(&chunk) {
                // Bytes before this chunk are whole in the file; this one may be partial.
                let _ = std::fs::remove_file(path);
                let spill = Arc::new(Spill::new(written, SPILL_WINDOW));
                progress.send_modify(|state| {
                    if let Progress::Streaming { spill: slot, .. } = state {
                        *slot = Some(Arc::clone(&spill));
                    }
                });
                spilled = Some((err, spill));
            }
        }
        if let Some((_, spill)) = &spilled {
            spill.push(chunk.clone());
        }
        written += chunk.len() as u64;
        progress.send_modify(|state| {
            if let Progress::Streaming { written: w, .. } = state {
                *w = written;
            }
        });
    }
    let sync_error = match spilled {
        Some(_) => None,
        None => file.sync_data().err(),
    };
    Written {
        digest: verifier.finish(),
        len: written,
        spilled,
        sync_error,
    }
}

/// A cached blob opened for reading, or `None` (the index entry dropped and the file deleted,
/// so the caller refetches) if its file is gone, unreadable or not the indexed size.
pub fn open_cached(
    cache: &Cache,
    metrics: &Metrics,
    digest: &Digest,
) -> Option<watch::Receiver<Progress>> {
    let entry = cache.index.get(digest).filter(|e| e.kind == Kind::Blob)?;
    let opened = cache.store.open_blob(Kind::Blob, digest).and_then(|file| {
        let len = file.metadata()?.len();
        if len != entry.size {
            let message = format!("file holds {len} bytes, the index {}", entry.size);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                message,
            ));
        }
        Ok(file)
    });
    match opened {
        Ok(file) => {
            record_access(&file);
            Some(Progress::verified(file, entry.size))
        }
        Err(err) => {
            tracing::warn!(%digest, %err, "indexed blob unreadable; dropping it");
            drop_cached(cache, metrics, digest);
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

/// Forgets a cached blob that turned out unreadable and deletes its file, so the next request
/// fetches it again.
pub fn drop_cached(cache: &Cache, metrics: &Metrics, digest: &Digest) {
    metrics.disk_errors.inc();
    cache.index.forget(digest);
    if let Err(err) = cache.store.remove(Kind::Blob, digest) {
        tracing::warn!(%digest, %err, "cannot delete an unreadable blob");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_of_a_206_is_read_strictly() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range(""), None);
    }
}
