//! The in-memory tail of a fill: the bytes not (or no longer) in its temp file.
//!
//! While a fill runs, the bytes it has received but not yet written to the file (its writes
//! are whole direct blocks, `fill::append`) are kept here, and readers at the live edge take
//! them from memory, as slices of the received buffers: no read back through the page cache.
//! The window is live: bytes the file holds leave it once it holds more than `LIVE_WINDOW`
//! (`on_disk`), so readers a few MiB behind the edge (the writer publishes every burst, at most
//! every 4 MiB) still read memory; the bytes the file does not hold never leave it.
//!
//! When writing the temp file fails (ENOSPC, EIO), the window fails too (`fail`): the bytes
//! already on disk stay readable from the (now unlinked) file, and every later byte is kept
//! here, in a window of at most `limit` bytes that slides forward as the upstream delivers.
//! Readers within the window keep streaming; a reader that falls more than `limit` bytes behind
//! the live edge gets an error (its body aborts, never a wrong byte) and its client retries,
//! which starts a fresh fill. The window is the bound on the memory one fill can pin.
//!
//! Owns: the window. Does not own: deciding to spill (`fill`) or reading files (`reader`).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

/// Bytes a failed fill keeps in memory for its readers.
pub(crate) const SPILL_WINDOW: usize = 16 << 20;
/// Bytes a running fill keeps in memory that its file holds too (plus those it does not yet
/// hold: at most a direct block and a chunk).
const LIVE_WINDOW: usize = 8 << 20;

#[derive(Debug)]
pub struct Spill {
    limit: usize,
    /// The least a chunk weighs (`MIN_WEIGHT`; 1 in tests of byte-exact sliding).
    min_weight: usize,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Bytes `[0, disk_len)` are in the file.
    disk_len: u64,
    /// The file grows no more (the disk failed): the window slides on by `limit`.
    failed: bool,
    /// Offset in the blob of the first byte of `chunks`; at most `disk_len` while live.
    start: u64,
    chunks: VecDeque<Bytes>,
    /// What `chunks` weigh against the window's bounds (`weight`).
    bytes: usize,
}

/// The least a chunk weighs against a window's bound, whatever its length: the bound then
/// caps the number of chunks too, so a body of tiny chunks cannot make the window hold an
/// entry per few bytes.
const MIN_WEIGHT: usize = 4096;

/// Where the bytes at an offset are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Located {
    /// In memory: up to the bytes asked for.
    Memory(Bytes),
    /// In the file, which holds the blob up to this offset.
    Disk(u64),
    /// Not arrived yet.
    NotYet,
}

/// A reader asked for bytes that already left the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("reader fell more than the pass-through window behind the upstream after a disk failure")]
pub struct FellBehind;

impl Spill {
    /// The window of a fill whose file holds nothing yet.
    pub fn live() -> Spill {
        Spill {
            limit: SPILL_WINDOW,
            min_weight: MIN_WEIGHT,
            window: Mutex::new(Window {
                disk_len: 0,
                failed: false,
                start: 0,
                chunks: VecDeque::new(),
                bytes: 0,
            }),
        }
    }

    /// A failed window: the file holds `disk_len` bytes and never more.
    #[cfg(test)]
    pub fn new(disk_len: u64, limit: usize) -> Spill {
        let spill = Spill {
            limit,
            min_weight: 1,
            ..Spill::live()
        };
        spill.on_disk(disk_len);
        spill.window.lock().expect("spill lock").start = disk_len;
        spill.fail(disk_len);
        spill
    }

    /// Appends the next bytes of the blob; a failed window drops the oldest beyond the limit
    /// (the newest chunk always stays, so the live edge is readable).
    pub fn push(&self, chunk: Bytes) {
        let mut window = self.window.lock().expect("spill lock");
        window.bytes += chunk.len().max(self.min_weight);
        window.chunks.push_back(chunk);
        if window.failed {
            while window.bytes > self.limit && window.chunks.len() > 1 {
                window.drop_front(self.min_weight);
            }
        }
    }

    /// The file now holds the blob up to `len`: the oldest chunks wholly before it leave the
    /// window while it holds more than `LIVE_WINDOW`.
    pub fn on_disk(&self, len: u64) {
        let mut window = self.window.lock().expect("spill lock");
        window.disk_len = len;
        while let Some(front) = window.chunks.front() {
            let on_disk = window.start + front.len() as u64 <= len;
            if !on_disk || window.bytes <= LIVE_WINDOW {
                break;
            }
            window.drop_front(self.min_weight);
        }
    }

    /// The file holds `disk_len` bytes and will hold no more: every later byte lives only
    /// here, in a window of at most `limit` bytes.
    pub fn fail(&self, disk_len: u64) {
        let mut window = self.window.lock().expect("spill lock");
        window.disk_len = disk_len;
        window.failed = true;
        while window.bytes > self.limit && window.chunks.len() > 1 {
            window.drop_front(self.min_weight);
        }
    }

    /// Where up to `max` bytes from blob offset `pos` are: in memory when the window holds
    /// them, else in the file when it does; neither is `FellBehind`.
    pub(crate) fn locate(&self, pos: u64, max: usize) -> Result<Located, FellBehind> {
        let window = self.window.lock().expect("spill lock");
        if pos < window.start {
            return match pos < window.disk_len {
                true => Ok(Located::Disk(window.disk_len)),
                false => Err(FellBehind),
            };
        }
        let mut offset = window.start;
        for chunk in &window.chunks {
            let end = offset + chunk.len() as u64;
            if pos < end {
                let from = (pos - offset) as usize;
                let to = chunk.len().min(from + max);
                return Ok(Located::Memory(chunk.slice(from..to)));
            }
            offset = end;
        }
        Ok(Located::NotYet)
    }
}

impl Window {
    fn drop_front(&mut self, min_weight: usize) {
        let old = self.chunks.pop_front().expect("a chunk to drop");
        self.start += old.len() as u64;
        self.bytes -= old.len().max(min_weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(bytes: &'static [u8]) -> Result<Located, FellBehind> {
        Ok(Located::Memory(Bytes::from_static(bytes)))
    }

    #[test]
    fn readers_inside_the_window_get_exact_bytes_and_laggards_an_error() {
        let spill = Spill::new(100, 8);
        spill.push(Bytes::from_static(b"abcd"));
        spill.push(Bytes::from_static(b"efgh"));
        assert_eq!(spill.locate(100, 10), memory(b"abcd"));
        assert_eq!(spill.locate(102, 10), memory(b"cd"));
        assert_eq!(spill.locate(105, 2), memory(b"fg"));
        assert_eq!(spill.locate(108, 2), Ok(Located::NotYet));
        assert_eq!(spill.locate(99, 2), Ok(Located::Disk(100)));
        spill.push(Bytes::from_static(b"ij"));
        assert_eq!(spill.locate(101, 1), Err(FellBehind), "slid out");
        assert_eq!(spill.locate(104, 10), memory(b"efgh"));
        assert_eq!(spill.locate(108, 10), memory(b"ij"));
    }

    #[test]
    fn a_chunk_larger_than_the_window_is_still_kept() {
        let spill = Spill::new(0, 2);
        spill.push(Bytes::from_static(b"hello"));
        assert_eq!(spill.locate(0, 99), memory(b"hello"));
    }

    #[test]
    fn a_live_window_holds_what_the_file_does_not_and_never_slides_past_it() {
        let spill = Spill::live();
        spill.push(Bytes::from_static(b"abcd"));
        spill.push(Bytes::from_static(b"efgh"));
        assert_eq!(spill.locate(1, 10), memory(b"bcd"));
        spill.on_disk(6);
        assert_eq!(spill.locate(1, 10), memory(b"bcd"), "recent bytes stay");
        // Past `LIVE_WINDOW`: "abcd" (on disk) leaves, "efgh" straddles the file's end and stays.
        spill.push(Bytes::from(vec![b'x'; LIVE_WINDOW]));
        spill.on_disk(6);
        assert_eq!(spill.locate(1, 10), Ok(Located::Disk(6)));
        assert_eq!(spill.locate(5, 10), memory(b"fgh"));
        assert_eq!(
            spill.locate(8 + LIVE_WINDOW as u64, 10),
            Ok(Located::NotYet)
        );
        // However much arrives, a live window keeps every byte the file does not hold.
        for _ in 0..10 {
            spill.push(Bytes::from(vec![b'x'; SPILL_WINDOW]));
        }
        assert_eq!(spill.locate(7, 1), memory(b"h"));
    }

    #[test]
    fn a_failed_live_window_keeps_the_file_and_slides_past_the_limit() {
        let spill = Spill::live();
        spill.push(Bytes::from_static(b"abcd"));
        spill.on_disk(4);
        spill.push(Bytes::from(vec![b'y'; SPILL_WINDOW]));
        spill.fail(4);
        assert_eq!(spill.locate(0, 2), Ok(Located::Disk(4)));
        assert_eq!(spill.locate(4, 1), memory(b"y"));
        spill.push(Bytes::from_static(b"z"));
        assert_eq!(spill.locate(4, 1), Err(FellBehind), "past the limit");
        assert_eq!(spill.locate(4 + SPILL_WINDOW as u64, 1), memory(b"z"));
    }

    #[test]
    fn a_live_window_of_tiny_chunks_holds_a_bounded_number_of_them() {
        let spill = Spill::live();
        for len in 1..=100_000u64 {
            spill.push(Bytes::from_static(b"x"));
            spill.on_disk(len);
        }
        let held = spill.window.lock().unwrap().chunks.len();
        assert!(held <= LIVE_WINDOW / MIN_WEIGHT + 1, "{held} chunks held");
        assert_eq!(
            spill.locate(99_999, 1),
            memory(b"x"),
            "the newest byte stays"
        );
    }
}
