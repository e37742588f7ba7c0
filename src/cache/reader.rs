//! Blob response bodies read from a file that is complete or still being filled.
//!
//! A reader sends bytes `[start, end)` of the file as the fill publishes them. It never sends the
//! final byte of its response (of a blob of unknown length: the newest byte) before the whole
//! blob is verified, so a client can never receive a
//! complete-looking body of wrong content: on a failed fill the body ends in an error instead.
//! Reads are positional (`pread`), so any number of readers share one file handle. A read is
//! first tried in place without waiting for the disk (`RWF_NOWAIT`): a hit in the page cache,
//! the common case for a warm blob, costs no thread hop. Only a read that would wait goes to the
//! blocking pool. Read buffers are reused (`Pooled`); allocating and zeroing a buffer per chunk
//! took a fifth of the CPU of a 64-client warm download. After a disk failure during a fill,
//! bytes past the file's good length come from the fill's in-memory window (`spill`). A read
//! error on a cached blob drops it from the cache (the next request refetches) and ends this
//! body in an error: a body cannot be resumed mid-way. Choosing the range is the caller's job.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use rustix::io::ReadWriteFlags;

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::watch;

use super::progress::{drop_cached, Progress};
use super::spill::Spill;
use super::Cache;
use crate::body::{self, Body, BoxError};
use crate::metrics::Metrics;
use crate::oci::digest::Digest;

/// Largest single read; bounds the memory one slow client can pin.
const CHUNK: u64 = 256 * 1024;

/// What to drop from the cache when a read of the file fails.
pub struct Evict {
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub digest: Digest,
}

struct Reader {
    progress: watch::Receiver<Progress>,
    pos: u64,
    /// Exclusive; `None` until the blob's length is known.
    end: Option<u64>,
    evict: Option<Evict>,
}

/// Where the next bytes are and how far this reader may go right now.
struct Readable {
    file: Option<Arc<File>>,
    spill: Option<Arc<Spill>>,
    limit: u64,
}

/// A body for bytes `start..end` (`end` None: to the end of the blob, however long it turns out).
pub fn blob_body(
    progress: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
    evict: Option<Evict>,
) -> Body {
    let reader = Reader {
        progress,
        pos: start,
        end,
        evict,
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
            let readable = self.readable()?;
            if let Some(file) = readable.file.filter(|_| self.pos < readable.limit) {
                let len = (readable.limit - self.pos).min(CHUNK);
                let bytes = match readable.spill {
                    Some(spill) if self.pos >= spill.disk_len() => spill
                        .read(self.pos, len as usize)?
                        .ok_or("spill window behind its published length")?,
                    Some(spill) => {
                        self.read_file(file, len.min(spill.disk_len() - self.pos))
                            .await?
                    }
                    None => self.read_file(file, len).await?,
                };
                self.pos += bytes.len() as u64;
                return Ok(Some(bytes));
            }
            if self.progress.changed().await.is_err() && !self.is_verified() {
                return Err("blob fill was abandoned".into());
            }
        }
    }

    async fn read_file(&mut self, file: Arc<File>, len: u64) -> Result<Bytes, BoxError> {
        match read_at(file, self.pos, len).await {
            Ok(bytes) => Ok(bytes),
            Err(err) => {
                if let Some(evict) = self.evict.take() {
                    tracing::warn!(digest = %evict.digest, %err, offset = self.pos, "cached blob unreadable; dropping it");
                    drop_cached(&evict.cache, &evict.metrics, &evict.digest);
                }
                Err(err)
            }
        }
    }

    fn is_verified(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Verified { .. })
    }

    fn readable(&mut self) -> Result<Readable, BoxError> {
        let state = self.progress.borrow_and_update();
        match &*state {
            Progress::Connecting => Ok(Readable {
                file: None,
                spill: None,
                limit: 0,
            }),
            Progress::Streaming {
                file,
                written,
                spill,
                ..
            } => {
                // Hold back the response's last byte until the digest is verified. Of a blob
                // of unknown length any byte may be the last: hold back the newest one, so the
                // last chunk and the chunked terminator go out only once it is verified.
                let limit = match self.end {
                    Some(end) => (*written).min(end.saturating_sub(1)),
                    None => (*written).saturating_sub(1),
                };
                Ok(Readable {
                    file: Some(Arc::clone(file)),
                    spill: spill.clone(),
                    limit,
                })
            }
            Progress::Verified { file, total, spill } => {
                let end = self.end.map_or(*total, |end| end.min(*total));
                self.end = Some(end);
                Ok(Readable {
                    file: Some(Arc::clone(file)),
                    spill: spill.clone(),
                    limit: end,
                })
            }
            Progress::Failed(error) => Err(error.clone().into()),
        }
    }
}

async fn read_at(file: Arc<File>, pos: u64, len: u64) -> Result<Bytes, BoxError> {
    let len = len as usize;
    let mut buf = Pooled::take(len);
    let mut filled = 0;
    while filled < len {
        let mut slices = [IoSliceMut::new(&mut buf.buf[filled..len])];
        match rustix::io::preadv2(
            &*file,
            &mut slices,
            pos + filled as u64,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => break,
            Ok(n) => filled += n,
            // EAGAIN: not in the page cache. EOPNOTSUPP (some filesystems), EINTR and any
            // other error: the blocking read below retries and decides.
            Err(_) => break,
        }
    }
    if filled < len {
        buf = tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf.buf[filled..len], pos + filled as u64)
                .map(|()| buf)
        })
        .await??;
    }
    buf.len = len;
    Ok(Bytes::from_owner(buf))
}

/// Read buffers are this size, whatever the read.
const BUFFER: usize = CHUNK as usize;
/// Idle buffers kept for reuse: enough for 64 busy downloads, 16 MiB at most.
const MAX_IDLE: usize = 64;

static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A read buffer lent to a response body: `Bytes` of its first `len` bytes, returned to the
/// idle list when hyper has written them and drops the `Bytes`.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl Pooled {
    fn take(len: usize) -> Pooled {
        debug_assert!(len <= BUFFER);
        let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Pooled {
            // Zeroed once when created; reused buffers are overwritten by the next read.
            buf: idle.unwrap_or_else(|| vec![0; BUFFER]),
            len: 0,
        }
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() == BUFFER && idle.len() < MAX_IDLE {
            idle.push(buf);
        }
    }
}
