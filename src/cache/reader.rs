//! Blob response bodies read from a file that is complete or still being filled.
//!
//! A reader sends bytes `[start, end)` of the file as the fill publishes them. It never sends the
//! final byte of its response before the whole blob is verified, so a client can never receive a
//! complete-looking body of wrong content: on a failed fill the body ends in an error instead.
//! Reads are positional (`pread`) on the blocking pool, so any number of readers share one file
//! handle. Choosing the range is the caller's job.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::watch;

use crate::body::{self, Body, BoxError};
use crate::fill::Progress;

/// Largest single read; bounds the memory one slow client can pin.
const CHUNK: u64 = 128 * 1024;

struct Reader {
    progress: watch::Receiver<Progress>,
    pos: u64,
    /// Exclusive; `None` until the blob's length is known.
    end: Option<u64>,
}

/// A body for bytes `start..end` (`end` None: to the end of the blob, however long it turns out).
pub fn blob_body(progress: watch::Receiver<Progress>, start: u64, end: Option<u64>) -> Body {
    let reader = Reader {
        progress,
        pos: start,
        end,
    };
    body::stream(futures_util::stream::unfold(
        reader,
        |mut reader| async move {
            match reader.next().await {
                Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), reader)),
                Ok(None) => None,
                Err(err) => {
                    reader.end = Some(reader.pos);
                    Some((Err(err), reader))
                }
            }
        },
    ))
}

impl Reader {
    async fn next(&mut self) -> Result<Option<Bytes>, BoxError> {
        loop {
            if self.end.is_some_and(|end| self.pos >= end) {
                return Ok(None);
            }
            let (file, readable) = self.readable()?;
            if let Some(file) = file.filter(|_| self.pos < readable) {
                let len = (readable - self.pos).min(CHUNK);
                let bytes = read_at(file, self.pos, len).await?;
                self.pos += bytes.len() as u64;
                return Ok(Some(bytes));
            }
            if self.progress.changed().await.is_err() && !self.is_verified() {
                return Err("blob fill was abandoned".into());
            }
        }
    }

    fn is_verified(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Verified { .. })
    }

    /// The file and how far into it this reader may go right now.
    fn readable(&mut self) -> Result<(Option<Arc<File>>, u64), BoxError> {
        let state = self.progress.borrow_and_update();
        match &*state {
            Progress::Connecting => Ok((None, 0)),
            Progress::Streaming { file, written, .. } => {
                // Hold back the response's last byte until the digest is verified.
                let limit = match self.end {
                    Some(end) => (*written).min(end.saturating_sub(1)),
                    None => *written,
                };
                Ok((Some(Arc::clone(file)), limit))
            }
            Progress::Verified { file, total } => {
                let end = self.end.map_or(*total, |end| end.min(*total));
                self.end = Some(end);
                Ok((Some(Arc::clone(file)), end))
            }
            Progress::Failed(error) => Err(error.clone().into()),
        }
    }
}

async fn read_at(file: Arc<File>, pos: u64, len: u64) -> Result<Bytes, BoxError> {
    let bytes = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
    })
    .await??;
    Ok(bytes)
}
