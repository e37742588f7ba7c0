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
//! took a fifth of the CPU of a 64-client warm download. While a fill runs, the bytes its file
//! does not hold yet (and after a disk failure, the rest) come from the fill's in-memory window
//! (`spill`), as slices of the received buffers. A
//! verified file is served from a shared memory map instead, in larger slices, whenever the
//! pages of a slice are in memory (`mapped`) and the kernel, not berth, puts the body onto
//! the connection (`Copier`; `server::sendfile`): no copy by berth at all. A read
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
use super::spill::{Located, Spill};
use super::Cache;
use crate::body::{self, Body, BoxError};
use crate::metrics::Metrics;
use crate::oci::digest::Digest;

/// Largest single read; bounds the memory one slow client can pin.
const CHUNK: u64 = 256 * 1024;
/// Largest slice of a mapped blob per frame: it pins no memory of berth's, only page cache, so
/// it is larger, to spend less per frame; small enough that served bytes count as they go.
const MAPPED_CHUNK: usize = 1024 * 1024;

/// Who copies a response body's bytes onto the connection. A slice of a mapped file is handed
/// over only when the kernel does: `server::sendfile` sends it from the file, and a page lost to
/// a disk error between the residency check and the send fails the syscall (EIO) and ends that
/// connection. Copied in berth's own process (rustls encrypting it, h2 framing it) the same
/// page would raise SIGBUS and kill the process, so those bodies are read (`pread` reports the
/// error) and never mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copier {
    /// A plain-TCP HTTP/1.x connection: hyper hands body `Bytes` to the connection's IO as they
    /// are, and `server::sendfile` sends map slices from their file.
    Kernel,
    /// TLS, HTTP/2, or not known: bytes pass through berth's own code.
    Berth,
}

impl Copier {
    /// The copier of a request's bytes on a connection with or without TLS.
    pub fn of_connection(tls: bool, version: http::Version) -> Copier {
        if !tls && version <= http::Version::HTTP_11 {
            Copier::Kernel
        } else {
            Copier::Berth
        }
    }
}

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
    /// The verified file mapped (`mapped`), once it is verified; `None` while it is not
    /// (yet) mappable.
    mapped: Mapped,
}

enum Mapped {
    /// Not verified yet, or not tried.
    Untried,
    /// The map, and the file to check when the body ends (see `Drop for Reader`).
    Whole(Bytes, Arc<File>),
    /// Copied by berth (`Copier::Berth`), empty, passed through, or the map failed: read with
    /// `pread`.
    Unavailable,
}

/// Where the next bytes are and how far this reader may go right now.
struct Readable {
    file: Option<Arc<File>>,
    spill: Option<Arc<Spill>>,
    limit: u64,
    verified: bool,
}

/// A body for bytes `start..end` (`end` None: to the end of the blob, however long it turns out).
pub fn blob_body(
    progress: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
    evict: Option<Evict>,
    copier: Copier,
) -> Body {
    let mapped = match copier {
        Copier::Kernel => Mapped::Untried,
        Copier::Berth => Mapped::Unavailable,
    };
    let reader = Reader {
        progress,
        pos: start,
        end,
        evict,
        mapped,
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
                if readable.verified && readable.spill.is_none() {
                    if let Some(bytes) = self.mapped_chunk(&file, readable.limit) {
                        self.pos += bytes.len() as u64;
                        return Ok(Some(bytes));
                    }
                }
                let len = (readable.limit - self.pos).min(CHUNK);
                let bytes = match readable.spill {
                    Some(spill) => match spill.locate(self.pos, len as usize)? {
                        Located::Memory(bytes) => bytes,
                        Located::Disk(until) => {
                            self.read_file(file, len.min(until - self.pos)).await?
                        }
                        Located::NotYet => return Err("window behind its published length".into()),
                    },
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

    /// The next chunk as a slice of the file's map, if its pages are all in memory; `None`:
    /// read it instead (`cache::mapped` says why a page on disk must not be read through a map).
    fn mapped_chunk(&mut self, file: &Arc<File>, limit: u64) -> Option<Bytes> {
        if let Mapped::Untried = self.mapped {
            self.mapped = match super::mapped::map(file, limit) {
                Some(whole) => Mapped::Whole(whole, Arc::clone(file)),
                None => Mapped::Unavailable,
            };
        }
        let Mapped::Whole(whole, _) = &self.mapped else {
            return None;
        };
        let start = usize::try_from(self.pos).ok()?;
        let end = usize::try_from(limit).ok()?.min(whole.len());
        let chunk = whole.slice(start..end.min(start + MAPPED_CHUNK).max(start));
        (!chunk.is_empty() && super::mapped::resident(&chunk)).then_some(chunk)
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
                verified: false,
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
                    verified: false,
                })
            }
            Progress::Verified { file, total, spill } => {
                let end = self.end.map_or(*total, |end| end.min(*total));
                self.end = Some(end);
                Ok(Readable {
                    file: Some(Arc::clone(file)),
                    spill: spill.clone(),
                    limit: end,
                    verified: true,
                })
            }
            Progress::Failed(error) => Err(error.clone().into()),
        }
    }
}

impl Drop for Reader {
    /// A write from a map fails in the kernel, not in a read of ours, when the file lost the
    /// page (truncated under the map: never by berth): the body just ends early. Check the file
    /// is still whole, and drop the blob from the cache as a failed read would.
    fn drop(&mut self) {
        if let Mapped::Whole(whole, file) = &self.mapped {
            let shrunk = file
                .metadata()
                .map_or(true, |meta| meta.len() < whole.len() as u64);
            if let Some(evict) = self.evict.take().filter(|_| shrunk) {
                tracing::warn!(digest = %evict.digest, "cached blob shrank under a reader; dropping it");
                drop_cached(&evict.cache, &evict.metrics, &evict.digest);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Version;
    use http_body_util::BodyExt;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn only_a_plain_tcp_http1_connection_has_the_kernel_copy_the_body() {
        assert_eq!(
            Copier::of_connection(false, Version::HTTP_11),
            Copier::Kernel
        );
        assert_eq!(
            Copier::of_connection(false, Version::HTTP_10),
            Copier::Kernel
        );
        assert_eq!(Copier::of_connection(false, Version::HTTP_2), Copier::Berth);
        assert_eq!(Copier::of_connection(true, Version::HTTP_11), Copier::Berth);
        assert_eq!(Copier::of_connection(true, Version::HTTP_2), Copier::Berth);
    }

    /// The sizes of the frames of a whole cached 3 MiB file's body.
    async fn frame_sizes(copier: Copier) -> Vec<usize> {
        let blob: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&blob).unwrap();
        let progress = Progress::verified(file, blob.len() as u64);
        let mut body = blob_body(progress, 0, None, None, copier);
        let (mut sizes, mut received) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            sizes.push(data.len());
            received.extend_from_slice(&data);
        }
        assert!(received == blob);
        sizes
    }

    #[tokio::test]
    async fn a_body_berth_copies_is_read_and_never_a_slice_of_the_map() {
        // Reads come in `CHUNK`s; map slices in `MAPPED_CHUNK`s.
        let read = frame_sizes(Copier::Berth).await;
        assert!(read.iter().all(|&len| len as u64 <= CHUNK), "{read:?}");
        let mapped = frame_sizes(Copier::Kernel).await;
        assert_eq!(mapped, [MAPPED_CHUNK; 3]);
    }

    /// A running fill of "hello" whose file holds nothing yet: every byte is in its live window.
    fn streaming_from_memory() -> (watch::Sender<Progress>, Arc<File>, Body) {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let window = Arc::new(Spill::live());
        window.push(Bytes::from_static(b"hel"));
        window.push(Bytes::from_static(b"lo"));
        let (progress, rx) = watch::channel(Progress::Streaming {
            file: Arc::clone(&file),
            total: Some(5),
            written: 5,
            spill: Some(window),
        });
        let body = blob_body(rx, 0, None, None, Copier::Berth);
        (progress, file, body)
    }

    async fn next_data(body: &mut Body) -> Bytes {
        body.frame().await.unwrap().unwrap().into_data().unwrap()
    }

    #[tokio::test]
    async fn bytes_not_in_the_file_yet_come_from_the_window_all_but_the_last_until_verified() {
        let (progress, file, mut body) = streaming_from_memory();
        assert_eq!(next_data(&mut body).await, "hel");
        assert_eq!(
            next_data(&mut body).await,
            "l",
            "the last byte is held back"
        );
        file.write_all_at(b"hello", 0).unwrap();
        progress.send_replace(Progress::Verified {
            file,
            total: 5,
            spill: None,
        });
        assert_eq!(next_data(&mut body).await, "o");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_failed_fill_ends_a_body_read_from_the_window_in_an_error() {
        let (progress, _file, mut body) = streaming_from_memory();
        assert_eq!(next_data(&mut body).await, "hel");
        assert_eq!(next_data(&mut body).await, "l");
        let error = crate::cache::FillError::Disk(std::io::Error::other("wrong bytes"));
        progress.send_replace(Progress::Failed(Arc::new(error)));
        assert!(body.frame().await.unwrap().is_err(), "never the last byte");
    }
}
