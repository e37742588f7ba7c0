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
use tokio::time::Instant;

use crate::cache::index::Reservation;
use crate::cache::spill::{Spill, SPILL_WINDOW};
use crate::cache::{Cache, Entry, Kind};
use crate::config::Config;
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
    retry_after: HeaderValue,
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

/// Bounded so a slow disk pushes back on the upstream read instead of buffering the blob.
const WRITE_QUEUE_CHUNKS: usize = 16;

/// Range requests one fill may make after its upstream body fails; each waits a jittered
/// backoff first, so a flapping upstream costs a fill a few seconds at most before it fails.
const MAX_RESUMES: u32 = 6;

impl Fills {
    pub fn new(config: &Config) -> Fills {
        Fills {
            running: Mutex::new(HashMap::new()),
            count: watch::Sender::new(0),
            read_timeout: config.client.read_timeout,
            floor: Floor {
                rate: config.client.min_fill_rate,
                window: config.client.min_fill_window,
            },
            max_blob_size: config.max_blob_size(),
            min_free: config.cache.min_free,
            max_fills: config.limits.max_fills,
            retry_after: HeaderValue::from(config.limits.retry_after.as_secs().max(1)),
        }
    }

    /// Joins the fill of `job.digest`, starting it if none runs and the cap allows one more.
    pub fn join(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
    ) -> Result<Joined, ApiError> {
        let joined = self.join_where(cache, metrics, job, 0, |_| true)?;
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
        self.join_where(cache, metrics, job, 0, |source| {
            source.is_some_and(|(u, r)| *u == upstream && (held || *r == repository))
        })
    }

    /// Starts a fill of `job.digest` ahead of any client (`prefetch`), unless it is cached or
    /// being filled from the same upstream (`None`). Real misses keep a quarter of `max_fills`
    /// (at least one slot): a prefetch that would take those is refused (`Err`), never queued.
    pub fn prefetch(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        metrics: &Arc<Metrics>,
        job: Job,
    ) -> Result<Option<Joined>, ApiError> {
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
    ) -> Result<Option<Joined>, ApiError> {
        let key = FillKey {
            upstream: Arc::clone(&job.upstream.name),
            digest: job.digest.clone(),
        };
        let mut running = self.running.lock().expect("fills lock");
        if let Some(fill) = running.get(&key) {
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
        if running.len() + kept >= self.max_fills {
            if kept == 0 {
                metrics.rejected.with_label_values(&["fills"]).inc();
            }
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
        let task_key = key.clone();
        let (upstream, repository) = (Arc::clone(&job.upstream.name), job.repository.clone());
        let task = tokio::spawn(async move {
            let digest = job.digest.clone();
            let outcome = fills.fetch(&cache, &metrics, job, &tx).await;
            if let Err(error) = outcome {
                metrics.fills_failed.inc();
                tracing::warn!(%digest, error = %error, "fill failed");
                tx.send_replace(Progress::Failed(error));
            }
            fills.finished(&task_key);
            metrics.fills_in_flight.dec();
        });
        running.insert(
            key,
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

    fn finished(&self, key: &FillKey) {
        let mut running = self.running.lock().expect("fills lock");
        running.remove(key);
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
        cache: &Arc<Cache>,
        metrics: &Metrics,
        job: Job,
        progress: &watch::Sender<Progress>,
    ) -> Result<(), ApiError> {
        let response = job
            .upstream
            .blob(Method::GET, &job.repository, &job.digest)
            .await?;
        let total = crate::upstream::content_length(response.headers());
        if let Some(total) = total.filter(|total| *total > self.max_blob_size) {
            return Err(too_large(total));
        }
        // Room for the promised bytes is held from now on, so fills running side by side
        // cannot together overshoot `max_size` or eat into `min_free`.
        let reservation = match total {
            Some(total) => Some(self.reserve(cache, metrics, total).await?),
            None => None,
        };
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
            // Only the temp file is ours: the digest's path may hold another upstream's commit.
            let _ = std::fs::remove_file(temp_path);
            tracing::warn!(digest = %job.digest, %err, "cannot commit a verified blob; served it uncached");
            progress.send_replace(Progress::Verified {
                file,
                total: written.len,
                spill: None,
            });
            return Ok(());
        }
        let entry = Entry::new(Kind::Blob, written.len, None);
        match reservation {
            Some(reservation) => reservation.commit(job.digest.clone(), entry),
            None => cache.index.insert(job.digest.clone(), entry),
        }
        record_origin(cache, &job).await;
        metrics.fills_completed.inc();
        progress.send_replace(Progress::Verified {
            file,
            total: written.len,
            spill: None,
        });
        Ok(())
    }

    /// Reserves `total` bytes in the cache (evicting to make room) against `max_size` and
    /// `min_free`; a 503 when the fills already running hold the room.
    async fn reserve<'c>(
        &self,
        cache: &'c Arc<Cache>,
        metrics: &Metrics,
        total: u64,
    ) -> Result<Reservation<'c>, ApiError> {
        let full = || {
            metrics.rejected.with_label_values(&["fills"]).inc();
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "the cache is full of blobs being fetched; retry shortly",
            )
            .with_header(RETRY_AFTER, self.retry_after.clone())
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
                Err(err.into())
            }
        }
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
    /// counting what it queued in `received`. Fails on a stall, a body slower than the floor
    /// (`Floor`), a broken body, or one longer than `max_blob_size`.
    async fn pump<B>(
        &self,
        mut body: B,
        mut skip: u64,
        chunks: &mpsc::Sender<Bytes>,
        received: &mut u64,
    ) -> Result<(), UpstreamError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut pace = Pace::new(self.floor, Instant::now());
        loop {
            let deadline = pace.window_end().min(Instant::now() + self.read_timeout);
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) if Instant::now() < pace.window_end() => {
                    return Err(UpstreamError::Timeout("blob body stalled".into()))
                }
                // The window ended while waiting: judge it, then keep waiting.
                Err(_) => {
                    pace.judge(Instant::now())?;
                    continue;
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(err))) => {
                    return Err(UpstreamError::Protocol(format!("blob body: {err}")))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            pace.arrived(data.len() as u64);
            if skip > 0 {
                let n = skip.min(data.len() as u64);
                data.advance(n as usize);
                skip -= n;
            }
            if data.is_empty() {
                continue;
            }
            *received += data.len() as u64;
            if *received > self.max_blob_size {
                return Err(UpstreamError::Invalid(format!(
                    "blob without a Content-Length ran past limits.max_blob_size ({})",
                    self.max_blob_size
                )));
            }
            let queued = Instant::now();
            if chunks.send(data).await.is_err() {
                // The writer is gone (it panicked); the fill fails when its result is read.
                return Ok(());
            }
            // Time our own disk held the body back is not the upstream's slowness.
            pace.paused(queued.elapsed());
            if Instant::now() >= pace.window_end() {
                pace.judge(Instant::now())?;
            }
        }
    }
}

/// One body's progress against the `Floor`: bytes seen in the current window.
struct Pace {
    floor: Floor,
    started: Instant,
    bytes: u64,
}

impl Pace {
    fn new(floor: Floor, now: Instant) -> Pace {
        Pace {
            floor,
            started: now,
            bytes: 0,
        }
    }

    fn window_end(&self) -> Instant {
        self.started + self.floor.window
    }

    fn arrived(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    fn paused(&mut self, held: Duration) {
        self.started += held;
    }

    /// At the end of a window: a new window if the body kept to the floor, else the error
    /// that abandons it (the fill then resumes with a Range request, as after a stall).
    fn judge(&mut self, now: Instant) -> Result<(), UpstreamError> {
        let wanted = (self.floor.rate as f64 * self.floor.window.as_secs_f64()) as u64;
        if self.bytes < wanted {
            return Err(UpstreamError::Timeout(format!(
                "blob body slower than client.min_fill_rate: {} bytes in {:?}",
                self.bytes, self.floor.window
            )));
        }
        *self = Pace::new(self.floor, now);
        Ok(())
    }
}

/// The refusal of a blob over `limits.max_blob_size`: permanent, so a 4xx clients do not retry.
fn too_large(length: u64) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        Code::Denied,
        "blob is larger than this mirror caches (limits.max_blob_size)",
    )
    .with_detail(format!("upstream Content-Length {length}"))
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
    let _ = cache.index.take(Kind::Blob, digest);
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
    use http_body::Frame;

    /// A body of `chunks` chunks of `size` bytes, each after `gap` of (virtual) time.
    fn trickle(
        chunks: u32,
        size: usize,
        gap: Duration,
    ) -> impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames = futures_util::stream::unfold(0u32, move |n| async move {
            if n == chunks {
                return None;
            }
            tokio::time::sleep(gap).await;
            let frame = Frame::data(Bytes::from(vec![b'x'; size]));
            Some((Ok(frame), n + 1))
        });
        http_body_util::StreamBody::new(Box::pin(frames))
    }

    /// Pumps `body` into a drained queue, as a fill would.
    async fn pump_all(
        config: &str,
        body: impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin,
    ) -> (Result<(), UpstreamError>, u64) {
        let fills = Fills::new(&Config::from_toml(config).unwrap());
        let (chunks, mut queue) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        tokio::spawn(async move { while queue.recv().await.is_some() {} });
        let mut received = 0;
        let pumped = fills.pump(body, 0, &chunks, &mut received).await;
        (pumped, received)
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_every_29_seconds_is_abandoned_at_the_rate_floor() {
        // Each byte arrives inside the 30 s read timeout: only the floor can end this body.
        let config = "[client]\nread_timeout = \"30s\"\nmin_fill_rate = \"64KiB\"\n\
                      min_fill_window = \"30s\"";
        let (pumped, received) = pump_all(config, trickle(1000, 1, Duration::from_secs(29))).await;
        assert!(
            matches!(&pumped, Err(UpstreamError::Timeout(why)) if why.contains("min_fill_rate")),
            "{pumped:?}"
        );
        assert!(received <= 2, "abandoned in the first window: {received}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_above_the_floor_is_taken_whole() {
        let config = "[client]\nmin_fill_rate = \"64KiB\"\nmin_fill_window = \"1s\"";
        let fast = trickle(50, 128 << 10, Duration::from_millis(500));
        let (pumped, received) = pump_all(config, fast).await;
        assert!(pumped.is_ok(), "{pumped:?}");
        assert_eq!(received, 50 * (128 << 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_without_length_stops_at_max_blob_size() {
        let config = "[cache]\nmax_size = \"1MiB\"\n[limits]\nmax_blob_size = \"64KiB\"";
        let (pumped, received) = pump_all(config, trickle(100, 4096, Duration::ZERO)).await;
        assert!(
            matches!(pumped, Err(UpstreamError::Invalid(_))),
            "{pumped:?}"
        );
        assert!(received <= (64 << 10) + 4096);
    }

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
