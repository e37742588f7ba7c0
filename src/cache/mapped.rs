//! Read-only memory maps of verified blob files, shared by the responses that serve them, so a
//! hit goes from the page cache to the socket with one copy (the kernel's, into the socket)
//! instead of two (a `pread` into a buffer, then the socket write).
//!
//! This is the crate's one module with `unsafe` code: mapping a file and asking which of its
//! pages are resident have no safe interface. It was measured before it was written (64
//! node-like connections over 64 MiB blobs, see the README's side-by-side table): the extra copy
//! and the per-chunk buffer work were most of the CPU a hit cost beyond nginx's `sendfile`.
//!
//! Why the maps are sound, and how a failure under one is contained:
//! - Only verified, committed or passed-through files are mapped; nothing writes a blob file
//!   after its digest is verified, and the store only ever unlinks or renames it, which leaves
//!   a mapping valid. The map covers the file's length as the file itself reports it, never
//!   more, so no page past the end of the file is touched (that raises SIGBUS).
//! - A read of a mapped page that is not in memory goes to the disk, and a disk error there is
//!   a SIGBUS, not an error value. So a chunk is handed out from the map only when all its pages
//!   are resident (`mincore`); otherwise the caller reads it with `pread`, which reports a disk
//!   error as an error (and drops the blob from the cache) and brings the pages in. What is left
//!   is a page reclaimed under memory pressure after the check and before the socket write, then
//!   failing to read back: a disk failing on data it just read.
//! - A process other than berth truncating a file in the cache directory is outside the
//!   contract (the directory is berth's), as it is for any program that maps its own files.
//! - Mapped pages are page cache, counted as `RssFile`, not as berth's anonymous memory: the
//!   maps add no `RssAnon`.
//!
//! Maps live while any response body holds a slice of one (`Bytes` keep their owner); the
//! registry holds only weak references, so an evicted blob's disk space is freed when its last
//! response ends, as with an open file.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use memmap2::Mmap;

/// A file's identity (device, inode): responses serving the same file share one map.
type Key = (u64, u64);

/// Maps in use, to share; dead entries are swept when a new map is added.
static LIVE: Mutex<Vec<(Key, Weak<Mmap>)>> = Mutex::new(Vec::new());

/// The whole of `file` as `Bytes` backed by a shared read-only map, if the file holds at least
/// `len` bytes (a verified blob's length; nothing past it is ever sliced). `None` for an empty
/// file (a zero-length map does not exist) or when the file cannot be mapped: the caller reads.
pub fn map(file: &File, len: u64) -> Option<Bytes> {
    let meta = file.metadata().ok()?;
    if len == 0 || meta.len() < len || usize::try_from(meta.len()).is_err() {
        return None;
    }
    let key = (meta.dev(), meta.ino());
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    let shared = live
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, weak)| weak.upgrade());
    let map = match shared {
        Some(map) => map,
        None => {
            // SAFETY: a read-only shared map of a file no one writes or truncates (see the
            // module comment); its length is the file's current length.
            let map = Arc::new(unsafe { Mmap::map(file) }.ok()?);
            live.retain(|(_, weak)| weak.strong_count() > 0);
            live.push((key, Arc::downgrade(&map)));
            map
        }
    };
    drop(live);
    let len = usize::try_from(len).ok()?;
    Some(Bytes::from_owner(Whole(map)).slice(..len))
}

/// Whether every page under `bytes` (a slice of a map from `map`) is in memory, so that
/// reading it cannot touch the disk.
pub fn resident(bytes: &Bytes) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let page = page_size();
    let addr = bytes.as_ptr() as usize;
    let first = addr / page * page;
    let span = addr + bytes.len() - first;
    let mut pages = vec![0u8; span.div_ceil(page)];
    // SAFETY: `[first, first + span)` lies within one live mapping (the map is page-aligned and
    // `bytes` keeps it alive); `pages` has one byte per page of that range, as mincore writes.
    let rc = unsafe { libc::mincore(first as *mut libc::c_void, span, pages.as_mut_ptr()) };
    rc == 0 && pages.iter().all(|p| p & 1 == 1)
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

/// Lends the shared map to `Bytes`.
struct Whole(Arc<Mmap>);

impl AsRef<[u8]> for Whole {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_a_file_once_for_every_response_that_serves_it() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 10_000]).unwrap();
        let a = map(&file, 10_000).unwrap();
        let b = map(&file, 10_000).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(&a[..], &[7u8; 10_000][..]);
        assert!(resident(&a.slice(100..9_000)));
    }

    #[test]
    fn maps_nothing_past_the_end_of_the_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"short").unwrap();
        assert!(map(&file, 6).is_none());
        assert_eq!(&map(&file, 3).unwrap()[..], b"sho");
        assert!(map(&tempfile::tempfile().unwrap(), 0).is_none());
    }
}
