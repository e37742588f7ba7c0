//! `FillError`: why a fill failed or was refused, with its cause kept. It lives with `Progress`,
//! not in `fill`, because every reader of the fill sees the same one (`Progress::Failed`);
//! `crate::error` turns it into a response, so no status or error code is chosen here.

use http::header::HeaderValue;

use crate::oci::digest::Digest;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The upstream refused, failed, or sent a body that broke past every resume.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream promised more than `limits.max_blob_size`; nothing was written.
    #[error("upstream Content-Length {length} is over limits.max_blob_size")]
    TooLarge { length: u64 },
    /// The bytes do not hash to the digest asked for; nothing was cached.
    #[error("upstream sent {got} for {want}")]
    Mismatch { want: Digest, got: Digest },
    /// `limits.max_fills` fills run already.
    #[error("too many blob fills in flight")]
    Busy { retry_after: HeaderValue },
    /// The running fills' reservations hold the room (`cache.max_size`, `cache.min_free`).
    #[error("the cache is full of blobs being fetched")]
    Full { retry_after: HeaderValue },
    /// The cache disk failed where the fill cannot pass the blob through (creating the temp
    /// file, the final fsync, checking free space).
    #[error("cache disk: {0}")]
    Disk(#[source] std::io::Error),
}
