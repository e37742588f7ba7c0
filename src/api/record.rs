//! The record of one request: its id, and what is only known when its body ends.
//!
//! The response head is counted in `handle`; the body is wrapped here so that the bytes sent
//! (`berth_served_bytes_total`, counted per frame so long downloads show up while they run), the
//! total duration and the one log line per request are recorded exactly once: when the body
//! ends, fails, or is dropped because the client went away. Nothing secret is logged: the path
//! (no query) and the fields named below.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::{Histogram, IntCounter};
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::cache::Outcome;

/// A request id: the client's `X-Request-Id` when it is a sane token, else a fresh random one,
/// so a log line can be matched to a client's report and to the upstream's logs.
pub fn request_id(headers: &HeaderMap) -> String {
    let given = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        });
    match given {
        Some(id) => id.to_string(),
        None => format!("{:016x}", rand::random::<u64>()),
    }
}

/// Where served bytes came from; `None` for responses that carry no content (errors, pings).
pub fn source(route: &str, outcome: Outcome) -> Option<&'static str> {
    match outcome {
        Outcome::Hit | Outcome::Revalidated | Outcome::Stale => Some("cache"),
        Outcome::Miss | Outcome::Coalesced => Some("upstream"),
        Outcome::Bypass if route != "ping" => Some("upstream"),
        Outcome::Bypass | Outcome::Denied | Outcome::Error => None,
    }
}

/// Everything the log line and the end-of-body metrics need.
pub(crate) struct Record {
    pub id: String,
    pub method: Method,
    pub path: String,
    pub route: &'static str,
    pub upstream: Option<Arc<str>>,
    /// The principal the access policies saw (policy mode), allowed or denied.
    pub principal: Option<String>,
    pub status: StatusCode,
    pub outcome: Outcome,
    /// Why the request failed, for the log line (already free of secrets: `ApiError` details
    /// carry no credentials or signed URLs).
    pub error: Option<String>,
    pub started: Instant,
    pub(crate) time_to_first_byte: std::time::Duration,
    /// Counts the body bytes as they are sent, for the request's source.
    pub served: Option<IntCounter>,
    /// Observes the total duration when the body ends.
    pub duration: Histogram,
}

/// How a body ended: all of it sent, an error frame (a failed fill), or dropped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Failed,
    Aborted,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Failed => "failed",
            End::Aborted => "aborted",
        }
    }
}

/// Wraps a response body so the record is completed when it ends. `content_length` is the
/// response's `Content-Length` (0 for HEAD): hyper stops polling a body once that many bytes
/// went out, so reaching it is how a streamed body's completion is recognised.
pub(crate) fn observe(body: Body, record: Record, content_length: Option<u64>) -> Body {
    let expected = content_length.or(body.size_hint().exact());
    Observed {
        inner: body,
        record: Some(record),
        bytes: 0,
        expected,
    }
    .boxed_unsync()
}

struct Observed {
    inner: Body,
    record: Option<Record>,
    bytes: u64,
    /// The body's exact length if known up front: reaching it counts as complete even if the
    /// connection drops the body before polling its end.
    expected: Option<u64>,
}

impl Observed {
    fn finish(&mut self, end: End) {
        let Some(record) = self.record.take() else {
            return;
        };
        let elapsed = record.started.elapsed();
        record.duration.observe(elapsed.as_secs_f64());
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
        super::request_line::RequestLine {
            id: &record.id,
            method: record.method.as_str(),
            path: &record.path,
            route: record.route,
            upstream: record.upstream.as_deref().unwrap_or("-"),
            principal: record.principal.as_deref().unwrap_or("-"),
            status: record.status.as_u16(),
            cache: record.outcome.as_str(),
            bytes: self.bytes,
            body: end.as_str(),
            ttfb_ms: ms(record.time_to_first_byte),
            ms: ms(elapsed),
            error: record.error.as_deref(),
        }
        // A line with a principal records an allow or deny decision of the policy mode: an
        // audit line, never dropped. The others may be, when the log queue is full (`logs`).
        .log(record.principal.is_some());
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    self.bytes += len;
                    if let Some(served) = self.record.as_ref().and_then(|r| r.served.as_ref()) {
                        served.inc_by(len);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(End::Failed),
            Poll::Ready(None) => self.finish(End::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended, and HEAD bodies are never polled.
        let complete =
            self.inner.is_end_stream() || self.expected.is_some_and(|len| self.bytes >= len);
        self.finish(if complete {
            End::Complete
        } else {
            End::Aborted
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids_are_kept_only_when_sane() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert("x-request-id", "has space".parse().unwrap());
        let generated = request_id(&headers);
        assert_eq!(generated.len(), 16);
        assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }

    #[test]
    fn bytes_come_from_the_cache_only_for_cache_outcomes() {
        assert_eq!(source("blob", Outcome::Hit), Some("cache"));
        assert_eq!(source("manifest", Outcome::Revalidated), Some("cache"));
        assert_eq!(source("blob", Outcome::Coalesced), Some("upstream"));
        assert_eq!(source("tags", Outcome::Bypass), Some("upstream"));
        assert_eq!(source("ping", Outcome::Bypass), None);
        assert_eq!(source("blob", Outcome::Error), None);
    }

    #[tokio::test]
    async fn counts_every_byte_sent() {
        let metrics = crate::metrics::Metrics::new();
        let served = metrics.bytes_served.with_label_values(&["blob", "cache"]);
        let record = Record {
            id: "t".into(),
            method: Method::GET,
            path: "/v2/x/blobs/y".into(),
            route: "blob",
            upstream: None,
            principal: None,
            status: StatusCode::OK,
            outcome: Outcome::Hit,
            error: None,
            started: Instant::now(),
            time_to_first_byte: std::time::Duration::ZERO,
            served: Some(served.clone()),
            duration: metrics.request_seconds.with_label_values(&["blob"]),
        };
        let body = observe(crate::body::full(vec![7u8; 1000]), record, Some(1000));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 1000);
        assert_eq!(served.get(), 1000);
        let observed = metrics.request_seconds.with_label_values(&["blob"]);
        assert_eq!(observed.get_sample_count(), 1);
    }
}
