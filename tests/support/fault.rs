//! Faults the tap injects into upstream responses: the misbehaviour a real registry never shows
//! on demand (wrong bytes, a cut body, a stall, 429/5xx, a slow or paused fill).
//!
//! Owns: what each fault does to one response, and the streaming body that carries it. A faulted
//! body is pumped frame by frame through a small bounded channel, so a 256 MiB blob is never held
//! in memory. Does not own: which request gets a fault (the tap's rules) or counting.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::client::BoxError;
use super::tap::Kind;

/// The body type the tap answers with: upstream's stream, a faulted stream or a canned error.
pub type TapBody = BoxBody<Bytes, BoxError>;

/// Stall points are capped so a stalled 256 MiB blob has sent "some bytes", not half of it.
const STALL_AT_MOST: u64 = 64 * 1024;

/// What the tap does to a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward untouched; injecting it clears the rule for that kind.
    None,
    /// Flip one byte in the middle of the body; length and headers stay intact.
    CorruptBlob,
    /// Send the headers with the full Content-Length, then this many bytes, then drop the
    /// connection. An offset at or past the end of the body cuts nothing.
    CutBlobAt(u64),
    /// Send the headers and some bytes (half the body, at most 64 KiB), then hang until the tap is
    /// dropped.
    Stall,
    /// Answer with this status and the OCI error envelope without asking upstream, with
    /// `Retry-After: <seconds>` when given.
    Status(u16, Option<u64>),
    /// Forward in chunks of at most this many bytes, waiting this long after each one.
    Slow(usize, Duration),
    /// Send this many bytes, then hold the body until `Tap::resume`. The deterministic way to
    /// have a second client join a fill in progress (`Tap::wait_paused` says when it is held).
    PauseAt(u64),
    /// Hold the request before it reaches the upstream, whatever its method, until
    /// `Tap::resume` (`Tap::wait_paused` counts it). How a test keeps a HEAD or a manifest GET
    /// in flight while other clients arrive.
    Hold,
    /// Drop the Content-Length and stream the body chunked, as some registries and CDNs do.
    Chunked,
    /// `Chunked`, with the first byte of the body flipped: a wrong blob of unannounced length.
    /// The body is held after its last byte until `Tap::resume` (`Tap::wait_paused` counts
    /// it), so a test sees what a client got before the proxy could know the blob is wrong.
    ChunkedCorrupt,
    /// Replace the response's Content-Type with this one, body untouched.
    ContentType(&'static str),
    /// Forward, but drop `Docker-Content-Digest` from the response, as some registries and
    /// CDNs do on HEAD.
    DropDigestHeader,
}

impl Fault {
    /// Faults that alter a successful upstream body; they apply to GETs only, since a HEAD has no
    /// body to fault.
    pub fn is_body_fault(&self) -> bool {
        !matches!(
            self,
            Fault::None | Fault::Status(..) | Fault::Hold | Fault::DropDigestHeader
        )
    }
}

/// Shared by the tap and every paused body: `released` opens the gate, `paused` counts bodies
/// that reached their pause point.
#[derive(Clone)]
pub(super) struct Gate {
    pub(super) released: watch::Sender<bool>,
    pub(super) paused: watch::Sender<usize>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            released: watch::Sender::new(false),
            paused: watch::Sender::new(0),
        }
    }
}

/// A canned registry error: `status` with the OCI `{"errors":[...]}` envelope (distribution spec,
/// "Error Codes"), as a registry or its rate limiter would send it.
pub(super) fn status_response(
    status: u16,
    retry_after: Option<u64>,
    kind: Kind,
) -> Response<TapBody> {
    let status = StatusCode::from_u16(status).expect("fault status is a valid HTTP status");
    let body = serde_json::json!({ "errors": [{
        "code": error_code(status, kind),
        "message": format!("injected by the test tap: {status}"),
        "detail": null,
    }]});
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(seconds) = retry_after {
        response = response.header(header::RETRY_AFTER, seconds);
    }
    let bytes = Bytes::from(serde_json::to_vec(&body).expect("error JSON"));
    response
        .body(Full::new(bytes).map_err(|e| match e {}).boxed())
        .expect("fault response is well formed")
}

fn error_code(status: StatusCode, kind: Kind) -> &'static str {
    match (status.as_u16(), kind) {
        (401, _) => "UNAUTHORIZED",
        (403, _) => "DENIED",
        (404, Kind::Blob) => "BLOB_UNKNOWN",
        (404, Kind::Manifest) => "MANIFEST_UNKNOWN",
        (404, _) => "NAME_UNKNOWN",
        (429, _) => "TOOMANYREQUESTS",
        (503, _) => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// Wraps upstream's body in `fault`. `length` is upstream's Content-Length, which the tap keeps
/// on the response, so a cut or stalled body is short against a promise the client already read.
/// `cut` is the connection's switch (see `CuttableIo`).
pub(super) fn faulted_body(
    fault: Fault,
    upstream: Incoming,
    length: Option<u64>,
    gate: Gate,
    cut: Arc<AtomicBool>,
) -> TapBody {
    let (tx, rx) = mpsc::channel(4);
    let plan = Plan::new(&fault, length);
    tokio::spawn(plan.pump(upstream, tx, gate));
    ChannelBody {
        rx,
        cut,
        cutting: false,
    }
    .boxed()
}

/// What the pump hands the response body, in order.
enum Piece {
    Data(Bytes),
    /// Upstream failed: pass the failure on, which aborts the client's connection.
    Failed(BoxError),
    /// Close the connection once everything before this point has reached the socket.
    Cut,
}

/// One fault turned into byte offsets, so the pump is a single loop for every mode.
struct Plan {
    /// Offset of the byte to flip.
    flip_at: Option<u64>,
    /// Offset where the stream stops, and what happens there.
    stop_at: Option<(u64, Stop)>,
    /// Largest piece to send, and the wait after each piece.
    pace: Option<(usize, Duration)>,
    /// Pause after the last byte, before the body ends.
    hold_at_end: bool,
}

#[derive(Clone, Copy)]
enum Stop {
    Cut,
    Stall,
    Pause,
}

type Sender = mpsc::Sender<Piece>;

impl Plan {
    fn new(fault: &Fault, length: Option<u64>) -> Plan {
        let mut plan = Plan {
            flip_at: None,
            stop_at: None,
            pace: None,
            hold_at_end: false,
        };
        let middle = length.unwrap_or(0) / 2;
        match *fault {
            Fault::CorruptBlob => plan.flip_at = Some(middle),
            Fault::CutBlobAt(n) => plan.stop_at = Some((n, Stop::Cut)),
            Fault::Stall => plan.stop_at = Some((middle.min(STALL_AT_MOST), Stop::Stall)),
            Fault::PauseAt(n) => plan.stop_at = Some((n, Stop::Pause)),
            Fault::Slow(chunk, delay) => plan.pace = Some((chunk.max(1), delay)),
            Fault::ChunkedCorrupt => {
                plan.flip_at = Some(0);
                plan.hold_at_end = true;
            }
            Fault::None | Fault::Status(..) | Fault::Hold | Fault::Chunked => {}
            Fault::ContentType(_) | Fault::DropDigestHeader => {}
        }
        plan
    }

    /// Streams upstream into `tx` under the plan. Returns when the body ends, the fault ends it,
    /// or the client goes away (the receiver is dropped).
    async fn pump(mut self, mut upstream: Incoming, tx: Sender, gate: Gate) {
        let mut sent = 0u64;
        while let Some(frame) = upstream.frame().await {
            let mut data = match frame.map(Frame::into_data) {
                Ok(Ok(data)) => data,
                Ok(Err(_trailers)) => continue,
                Err(e) => return drop(tx.send(Piece::Failed(e.into())).await),
            };
            while !data.is_empty() {
                if let Some((_, stop)) = self.stop_at.filter(|(at, _)| *at == sent) {
                    if !self.stop(stop, &tx, &gate).await {
                        return;
                    }
                    self.stop_at = None;
                    continue;
                }
                let piece = data.split_to(self.next_len(sent, data.len()));
                let piece = flip(piece, sent, self.flip_at);
                sent += piece.len() as u64;
                if tx.send(Piece::Data(piece)).await.is_err() {
                    return;
                }
                if let Some((_, delay)) = self.pace {
                    tokio::time::sleep(delay).await;
                }
            }
        }
        if self.hold_at_end {
            self.stop(Stop::Pause, &tx, &gate).await;
        }
    }

    /// How much of the next `available` bytes to send before the plan needs attention.
    fn next_len(&self, sent: u64, available: usize) -> usize {
        let mut len = available;
        if let Some((at, _)) = self.stop_at.filter(|(at, _)| *at > sent) {
            len = len.min((at - sent) as usize);
        }
        if let Some((chunk, _)) = self.pace {
            len = len.min(chunk);
        }
        len
    }

    /// Acts at the stop point; returns whether streaming goes on afterwards.
    async fn stop(&self, stop: Stop, tx: &Sender, gate: &Gate) -> bool {
        match stop {
            Stop::Cut => {
                let _ = tx.send(Piece::Cut).await;
                false
            }
            Stop::Stall => {
                tx.closed().await;
                false
            }
            Stop::Pause => {
                gate.paused.send_modify(|n| *n += 1);
                let mut released = gate.released.subscribe();
                tokio::select! {
                    _ = released.wait_for(|open| *open) => true,
                    _ = tx.closed() => false,
                }
            }
        }
    }
}

/// Flips the byte at absolute offset `at` if it falls inside `piece` (which starts at `start`).
fn flip(piece: Bytes, start: u64, at: Option<u64>) -> Bytes {
    match at {
        Some(at) if at >= start && at < start + piece.len() as u64 => {
            let mut copy = BytesMut::from(&piece[..]);
            copy[(at - start) as usize] ^= 0xff;
            copy.freeze()
        }
        _ => piece,
    }
}

/// A response body fed by the pump task.
struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    cut: Arc<AtomicBool>,
    /// Set once the cut point is reached; from then on the body never yields again.
    cutting: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.cutting {
            return Poll::Pending;
        }
        match ready!(this.rx.poll_recv(cx)) {
            None => Poll::Ready(None),
            Some(Piece::Data(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Piece::Failed(e)) => Poll::Ready(Some(Err(e))),
            Some(Piece::Cut) => {
                // Pending (never woken) makes hyper flush what it holds; the flush then fails in
                // `CuttableIo`, which ends the connection with every byte before the cut sent.
                // An error frame instead would drop hyper's unflushed buffer with the connection.
                this.cutting = true;
                this.cut.store(true, Ordering::SeqCst);
                Poll::Pending
            }
        }
    }
}

/// The tap's side of one client connection. Once a `Cut` body flips `cut`, the next flush,
/// which hyper issues after writing out its buffer, fails, and hyper drops the connection.
pub(super) struct CuttableIo {
    inner: TokioIo<TcpStream>,
    cut: Arc<AtomicBool>,
}

impl CuttableIo {
    pub(super) fn new(stream: TcpStream, cut: Arc<AtomicBool>) -> Self {
        CuttableIo {
            inner: TokioIo::new(stream),
            cut,
        }
    }
}

impl hyper::rt::Read for CuttableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        hyper::rt::Read::poll_read(Pin::new(&mut self.inner), cx, buf)
    }
}

impl hyper::rt::Write for CuttableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        hyper::rt::Write::poll_write(Pin::new(&mut self.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(hyper::rt::Write::poll_flush(Pin::new(&mut self.inner), cx))?;
        match self.cut.load(Ordering::SeqCst) {
            true => Poll::Ready(Err(std::io::ErrorKind::ConnectionAborted.into())),
            false => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        hyper::rt::Write::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}
