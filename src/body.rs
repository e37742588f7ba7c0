//! The response body type every handler returns, and constructors for it.
//!
//! One boxed type keeps handler signatures plain. Streaming blob bodies are built in
//! `cache::reader`; this file only wraps.

use bytes::Bytes;
use futures_util::Stream;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every berth response. An `Err` frame aborts the transfer: hyper closes the
/// connection (HTTP/1.1) or resets the stream (HTTP/2), so a client never mistakes a failed
/// blob for a complete one.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn stream<S>(chunks: S) -> Body
where
    S: Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + 'static,
{
    BodyExt::boxed_unsync(StreamBody::new(chunks))
}
