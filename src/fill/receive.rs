//! The upstream body of a fill into the write queue: paced against the rate floor, bounded by
//! `max_blob_size`, and resumed with `Range: bytes=<received>-` when it breaks part-way. What
//! happens to the queued bytes is `write`'s; whether they are right, `fetch`'s.

use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::CONTENT_RANGE;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Fills, Floor, Job};
use crate::metrics::Metrics;
use crate::upstream::{retry, Cause, UpstreamError};

/// Range requests one fill may make after its upstream body fails; each waits a jittered
/// backoff first, so a flapping upstream costs a fill a few seconds at most before it fails.
const MAX_RESUMES: u32 = 6;

/// Who answered a fill's first request. Only the job's upstream is judged by how its body
/// ends (its circuit breaker); an owner replica or the parent tier is not it, and an owner's
/// bytes count in `berth_peer_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answerer {
    Owner,
    Parent,
    Upstream,
}

impl Fills {
    /// Moves the upstream body into the write queue, resuming with Range requests when it
    /// fails part-way. `first` says who sends the first body: an owner replica's bytes are
    /// counted as peer bytes, and only the upstream's trickle counts against its breaker (the
    /// resumes come from the upstream).
    pub(super) async fn receive(
        &self,
        job: &Job,
        metrics: &Metrics,
        mut body: Incoming,
        total: Option<u64>,
        chunks: &mpsc::Sender<Bytes>,
        mut first: Answerer,
    ) -> Result<(), UpstreamError> {
        let mut received = 0u64;
        let mut skip = 0u64;
        let mut resumes = 0u32;
        let counted = metrics.upstream_bytes.with_label_values(&["blob"]);
        loop {
            let before = received;
            let pumped = self.pump(body, skip, chunks, &mut received).await;
            counted.inc_by(received - before);
            let sender = std::mem::replace(&mut first, Answerer::Upstream);
            if let (Answerer::Owner, Some(cluster)) = (sender, &self.cluster) {
                cluster.metrics.bytes.inc_by(received - before);
            }
            let mut error = match pumped {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if past_max_blob_size(&error) {
                return Err(error);
            }
            if below_floor(&error) && sender == Answerer::Upstream {
                // A trickle is no network blip: each one counts against the upstream's breaker
                // at once, not only when its fill runs out of resumes minutes later.
                job.upstream.body_too_slow();
            }
            // Every promised byte arrived and only the connection's end failed: verify it.
            if total.is_some_and(|total| received >= total) {
                return Ok(());
            }
            loop {
                if resumes >= MAX_RESUMES {
                    return Err(error);
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
                    Err(err) if !resumable(&err) => return Err(err),
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
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
                    return Err(UpstreamError::Protocol(Cause::new("blob body", err)))
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
                let why = format!("{PAST_MAX_BLOB_SIZE} ({})", self.max_blob_size);
                return Err(UpstreamError::Invalid(why.into()));
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
                "{BELOW_FLOOR}: {} bytes in {:?}",
                self.bytes, self.floor.window
            )));
        }
        *self = Pace::new(self.floor, now);
        Ok(())
    }
}

/// How `Pace::judge`'s error begins, so `receive` tells a trickle from a stall or a cut.
const BELOW_FLOOR: &str = "blob body slower than client.min_fill_rate";

/// What a body without a Content-Length that ran past `max_blob_size` fails with: berth's
/// limit, not the upstream's fault, and never resumed.
const PAST_MAX_BLOB_SIZE: &str = "blob without a Content-Length ran past limits.max_blob_size";

/// Whether `error` is a body that ran past `max_blob_size`.
pub(super) fn past_max_blob_size(error: &UpstreamError) -> bool {
    matches!(error, UpstreamError::Invalid(why) if why.to_string().starts_with(PAST_MAX_BLOB_SIZE))
}

fn below_floor(error: &UpstreamError) -> bool {
    matches!(error, UpstreamError::Timeout(why) if why.starts_with(BELOW_FLOOR))
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
                return Err(UpstreamError::Invalid(detail.into()));
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
        _ => Err(UpstreamError::Invalid(
            format!("asked for bytes {from}- and got Content-Range {content_range:?}").into(),
        )),
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;

    use crate::config::Config;
    use crate::fill::write::WRITE_QUEUE_CHUNKS;

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
        assert!(pumped.as_ref().is_err_and(below_floor), "{pumped:?}");
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
            matches!(&pumped, Err(error) if past_max_blob_size(error)),
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
