//! The blocking writer of a fill: queued chunks -> hasher + temp file (`append`), the length the
//! file holds published to the readers after each burst; a disk failure mid-way moves the rest into memory (`Spill`).
//! Also the verdict on what was written (`verify`, pure) and the temp file's clean-up. What to fetch
//! and what to do with the verdict is `fetch`'s.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};

use super::append::Appender;
use super::{FillError, Progress};
use crate::cache::spill::Spill;
use crate::oci::digest::{Digest, Verifier};
use crate::upstream::UpstreamError;

/// Bounded so a slow disk pushes back on the upstream read instead of buffering the blob.
pub(super) const WRITE_QUEUE_CHUNKS: usize = 16;

/// The most bytes written before readers hear of them while chunks keep arriving.
const PUBLISH_STEP: u64 = 4 * 1024 * 1024;

/// Chunks shorter than this are gathered into one (`gather`) before they enter the window and
/// the file, so a body of tiny chunks (a hostile upstream's, or small chunked frames) cannot
/// make either hold one entry per few bytes.
const SMALL_CHUNK: usize = 4096;
/// How long a small chunk waits for the next ones to join it: at most a thousand entries a
/// second from a trickle.
const GATHER_WAIT: Duration = Duration::from_millis(1);

/// What the writer saw.
pub(super) struct Written {
    pub(super) digest: Digest,
    pub(super) len: u64,
    /// The disk failed mid-fill: the error, and the window the rest of the blob went through.
    pub(super) spilled: Option<(std::io::Error, Arc<Spill>)>,
    /// The final fsync failed: the file's contents cannot be trusted, so the fill fails.
    pub(super) sync_error: Option<std::io::Error>,
}

/// Appends queued chunks to the file (`Appender`), hashing them, and publishes each new length.
/// Readers find the bytes the file does not hold yet in the fill's live window (`Spill`). On a
/// write error it unlinks the file and the window carries the rest (`Spill::fail`), so the
/// readers still get every byte and the hash still covers the whole blob.
pub(super) fn write_chunks(
    file: &File,
    path: &Path,
    mut queue: mpsc::Receiver<Bytes>,
    progress: &watch::Sender<Progress>,
) -> Written {
    let mut verifier = Verifier::new();
    let mut appender = Appender::open(file, path);
    let window = Arc::new(Spill::live());
    progress.send_modify(|state| {
        if let Progress::Streaming { spill, .. } = state {
            *spill = Some(Arc::clone(&window));
        }
    });
    let mut written = 0u64;
    let mut failed: Option<std::io::Error> = None;
    let mut published = 0u64;
    let mut next = queue.blocking_recv();
    while let Some(chunk) = next {
        let (chunk, after) = gather(chunk, &mut queue);
        verifier.update(&chunk);
        written += chunk.len() as u64;
        window.push(chunk.clone());
        if failed.is_none() {
            match appender.append(chunk) {
                Ok(()) => window.on_disk(appender.len()),
                Err(err) => failed = Some(fail(path, &appender, err, &window)),
            }
        }
        // Publish once per burst of queued chunks (every publish wakes every reader), and at
        // least every `PUBLISH_STEP` bytes, so readers keep streaming while the queue is full.
        next = after.or_else(|| queue.try_recv().ok());
        // After a disk failure, every chunk: the window holds only the newest bytes.
        let due = failed.is_some() || written - published >= PUBLISH_STEP;
        if next.is_none() || due {
            published = written;
            progress.send_modify(|state| {
                if let Progress::Streaming { written: w, .. } = state {
                    *w = written;
                }
            });
        }
        if next.is_none() {
            next = queue.blocking_recv();
        }
    }
    if failed.is_none() {
        match appender.finish() {
            Ok(()) => window.on_disk(appender.len()),
            Err(err) => failed = Some(fail(path, &appender, err, &window)),
        }
    }
    let sync_error = match failed {
        Some(_) => None,
        None => file.sync_data().err(),
    };
    Written {
        digest: verifier.finish(),
        len: written,
        spilled: failed.map(|err| (err, window)),
        sync_error,
    }
}

/// `first`, and when it is small the chunks queued after it (copied into one), until they are
/// `SMALL_CHUNK` long, a large chunk comes (returned second, not gathered) or `GATHER_WAIT`
/// has passed.
fn gather(first: Bytes, queue: &mut mpsc::Receiver<Bytes>) -> (Bytes, Option<Bytes>) {
    if first.len() >= SMALL_CHUNK {
        return (first, None);
    }
    let mut gathered = BytesMut::from(&first[..]);
    let deadline = Instant::now() + GATHER_WAIT;
    loop {
        match queue.try_recv() {
            Ok(chunk) if chunk.len() < SMALL_CHUNK => {
                gathered.extend_from_slice(&chunk);
                if gathered.len() >= SMALL_CHUNK {
                    return (gathered.freeze(), None);
                }
            }
            Ok(chunk) => return (gathered.freeze(), Some(chunk)),
            Err(TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(_) => return (gathered.freeze(), None),
        }
    }
}

/// The disk failed: unlinks the file, whose first `appender.len()` bytes stay readable through
/// the open handle; the window holds every later byte from now on.
fn fail(path: &Path, appender: &Appender, err: std::io::Error, window: &Spill) -> std::io::Error {
    let _ = std::fs::remove_file(path);
    window.fail(appender.len());
    err
}

/// Deletes an uncommitted temp file when the fill ends without committing it.
pub(super) struct TempFile(pub(super) Option<PathBuf>);

impl TempFile {
    pub(super) fn keep(mut self) -> PathBuf {
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

/// Whether the bytes received are the blob asked for: as long as the upstream promised (when it
/// did) and hashing to `want`. Any other outcome fails every reader and caches nothing.
pub(super) fn verify(
    want: &Digest,
    promised: Option<u64>,
    got: &Digest,
    len: u64,
) -> Result<(), FillError> {
    if promised.is_some_and(|total| total != len) {
        let detail = format!("upstream promised {promised:?} bytes and sent {len}");
        return Err(UpstreamError::Invalid(detail.into()).into());
    }
    if got != want {
        return Err(FillError::Mismatch {
            want: want.clone(),
            got: got.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> Digest {
        let mut verifier = Verifier::new();
        verifier.update(bytes);
        verifier.finish()
    }

    #[test]
    fn tiny_queued_chunks_are_gathered_into_one_and_a_large_one_is_left_whole() {
        let (tx, mut queue) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        for _ in 0..10 {
            tx.try_send(Bytes::from_static(b"ab")).unwrap();
        }
        tx.try_send(Bytes::from(vec![7u8; SMALL_CHUNK])).unwrap();
        let (gathered, after) = gather(Bytes::from_static(b"c"), &mut queue);
        assert_eq!(&gathered[..], &b"cabababababababababab"[..]);
        assert_eq!(after.map(|b| b.len()), Some(SMALL_CHUNK));
        // With nothing queued, a small chunk waits at most `GATHER_WAIT` and goes alone.
        let (alone, after) = gather(Bytes::from_static(b"d"), &mut queue);
        assert_eq!((&alone[..], after), (&b"d"[..], None));
    }

    #[test]
    fn the_promised_length_and_the_digest_verify() {
        let want = digest_of(b"blob");
        assert!(verify(&want, Some(4), &want, 4).is_ok());
        assert!(verify(&want, None, &want, 4).is_ok());
    }

    #[test]
    fn fewer_or_more_bytes_than_promised_fail_as_bad_upstream_content() {
        let want = digest_of(b"blob");
        for len in [3, 5] {
            let verdict = verify(&want, Some(4), &want, len);
            assert!(
                matches!(verdict, Err(FillError::Upstream(UpstreamError::Invalid(_)))),
                "{verdict:?}"
            );
        }
    }

    #[test]
    fn other_bytes_fail_as_a_mismatch_naming_both_digests() {
        let (want, got) = (digest_of(b"blob"), digest_of(b"evil"));
        let verdict = verify(&want, Some(4), &got, 4);
        match verdict {
            Err(FillError::Mismatch { want: w, got: g }) => assert_eq!((w, g), (want, got)),
            other => panic!("{other:?}"),
        }
    }
}
