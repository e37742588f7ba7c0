//! The in-memory tail of a fill whose disk failed: pass-through without caching.
//!
//! When writing a fill's temp file fails (ENOSPC, EIO), the bytes already on disk stay readable
//! from the (now unlinked) file, and every later byte is kept here, in a window of at most
//! `limit` bytes that slides forward as the upstream delivers. Readers within the window keep
//! streaming; a reader that falls more than `limit` bytes behind the live edge gets an error
//! (its body aborts, never a wrong byte) and its client retries, which starts a fresh fill.
//! The window is the bound on the memory one failed fill can pin.
//!
//! Owns: the window. Does not own: deciding to spill (`fill`) or reading files (`reader`).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

/// Bytes a failed fill keeps in memory for its readers.
pub(crate) const SPILL_WINDOW: usize = 16 << 20;

#[derive(Debug)]
pub struct Spill {
    /// Bytes `[0, disk_len)` are in the file; the window starts at or after this offset.
    disk_len: u64,
    limit: usize,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Offset in the blob of the first byte of `chunks`.
    start: u64,
    chunks: VecDeque<Bytes>,
    bytes: usize,
}

/// A reader asked for bytes that already left the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("reader fell more than the pass-through window behind the upstream after a disk failure")]
pub struct FellBehind;

impl Spill {
    pub fn new(disk_len: u64, limit: usize) -> Spill {
        Spill {
            disk_len,
            limit,
            window: Mutex::new(Window {
                start: disk_len,
                chunks: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    pub(crate) fn disk_len(&self) -> u64 {
        self.disk_len
    }

    /// Appends the next bytes of the blob, dropping the oldest beyond the limit (the newest
    /// chunk always stays, so the live edge is readable).
    pub fn push(&self, chunk: Bytes) {
        let mut window = self.window.lock().expect("spill lock");
        window.bytes += chunk.len();
        window.chunks.push_back(chunk);
        while window.bytes > self.limit && window.chunks.len() > 1 {
            let old = window.chunks.pop_front().expect("more than one chunk");
            window.start += old.len() as u64;
            window.bytes -= old.len();
        }
    }

    /// Up to `max` bytes from blob offset `pos` (at or past `disk_len`), `None` if `pos` is
    /// past what has arrived.
    pub fn read(&self, pos: u64, max: usize) -> Result<Option<Bytes>, FellBehind> {
        let window = self.window.lock().expect("spill lock");
        if pos < window.start {
            return Err(FellBehind);
        }
        let mut offset = window.start;
        for chunk in &window.chunks {
            let end = offset + chunk.len() as u64;
            if pos < end {
                let from = (pos - offset) as usize;
                let to = chunk.len().min(from + max);
                return Ok(Some(chunk.slice(from..to)));
            }
            offset = end;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_inside_the_window_get_exact_bytes_and_laggards_an_error() {
        let spill = Spill::new(100, 8);
        spill.push(Bytes::from_static(b"abcd"));
        spill.push(Bytes::from_static(b"efgh"));
        assert_eq!(spill.read(100, 10).unwrap().unwrap(), "abcd");
        assert_eq!(spill.read(102, 10).unwrap().unwrap(), "cd");
        assert_eq!(spill.read(105, 2).unwrap().unwrap(), "fg");
        assert_eq!(spill.read(108, 2).unwrap(), None, "not arrived yet");
        spill.push(Bytes::from_static(b"ij"));
        assert_eq!(
            spill.read(101, 1),
            Err(FellBehind),
            "slid out of the window"
        );
        assert_eq!(spill.read(104, 10).unwrap().unwrap(), "efgh");
        assert_eq!(spill.read(108, 10).unwrap().unwrap(), "ij");
    }

    #[test]
    fn a_chunk_larger_than_the_window_is_still_kept() {
        let spill = Spill::new(0, 2);
        spill.push(Bytes::from_static(b"hello"));
        assert_eq!(spill.read(0, 99).unwrap().unwrap(), "hello");
    }
}
