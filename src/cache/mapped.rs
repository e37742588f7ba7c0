//! Read-only memory maps of verified blob files, shared by the responses that serve them, and
//! the registry of the maps alive now. A response body is a slice of a map (`Bytes`); on a
//! plain-TCP connection `server::sendfile` recognises such a slice by its address (`locate`)
//! and has the kernel send the same bytes from the file with `sendfile(2)`, so a hit's body
//! is never copied by berth nor by a `write` from berth's memory: page cache to socket, as
//! nginx does.
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
//!   error as an error (and drops the blob from the cache) and brings the pages in. A chunk
//!   sent with `sendfile` is read by the kernel from the file, not through the map: a page
//!   reclaimed after the check that then fails to read back is an `EIO` from the syscall,
//!   which ends that one connection. Only bytes berth itself copies out of a map (never: TLS
//!   and HTTP/2 bodies are read, `cache::reader::Copier`) could still meet a SIGBUS.
//! - An address is matched (`locate`) only while its map is registered, and a map leaves the
//!   registry before it is unmapped (`Drop for Mapping`): memory reused at a freed map's
//!   address is never taken for the map's file.
//! - A process other than berth truncating a file in the cache directory is outside the
//!   contract (the directory is berth's), as it is for any program that maps its own files.
//! - Mapped pages are page cache, counted as `RssFile`, not as berth's anonymous memory: the
//!   maps add no `RssAnon`.
//!
//! Maps live while any response body holds a slice of one (`Bytes` keep their owner); the
//! registry holds only weak references, so an evicted blob's disk space is freed when its last
//! response ends, as with an open file.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use memmap2::Mmap;

/// A file's identity (device, inode): responses serving the same file share one map.
type Key = (u64, u64);

/// The maps alive now: by file, to share one map among the responses serving it, and by
/// address, to tell a slice of a map from other memory. An entry is removed by its map's
/// `Drop`, before the unmap.
struct Registry {
    by_file: BTreeMap<Key, Weak<Mapping>>,
    /// Base address -> the map's length and its file.
    by_address: BTreeMap<usize, (usize, Arc<File>)>,
}

static LIVE: Mutex<Registry> = Mutex::new(Registry {
    by_file: BTreeMap::new(),
    by_address: BTreeMap::new(),
});

fn live() -> MutexGuard<'static, Registry> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// One file's map, shared by the `Bytes` slices of it.
struct Mapping {
    map: Mmap,
    key: Key,
}

impl Drop for Mapping {
    /// Leaves the registry first: the map itself is unmapped after this, when the fields drop,
    /// so no `locate` can match an address that is about to be freed.
    fn drop(&mut self) {
        let mut live = live();
        live.by_address.remove(&(self.map.as_ptr() as usize));
        let this: *const Mapping = self;
        if live
            .by_file
            .get(&self.key)
            .is_some_and(|weak| std::ptr::eq(weak.as_ptr(), this))
        {
            live.by_file.remove(&self.key);
        }
    }
}

/// The whole of `file` as `Bytes` backed by a shared read-only map, if the file holds at least
/// `len` bytes (a verified blob's length; nothing past it is ever sliced). `None` for an empty
/// file (a zero-length map does not exist) or when the file cannot be mapped: the caller reads.
pub fn map(file: &Arc<File>, len: u64) -> Option<Bytes> {
    let meta = file.metadata().ok()?;
    if len == 0 || meta.len() < len || usize::try_from(meta.len()).is_err() {
        return None;
    }
    let key = (meta.dev(), meta.ino());
    let mut live = live();
    let shared = live.by_file.get(&key).and_then(Weak::upgrade);
    let mapping = match shared {
        Some(mapping) => mapping,
        None => {
            // SAFETY: a read-only shared map of a file no one writes or truncates (see the
            // module comment); its length is the file's current length.
            let map = unsafe { Mmap::map(&**file) }.ok()?;
            let base = map.as_ptr() as usize;
            live.by_address.insert(base, (map.len(), Arc::clone(file)));
            let mapping = Arc::new(Mapping { map, key });
            live.by_file.insert(key, Arc::downgrade(&mapping));
            mapping
        }
    };
    drop(live);
    let len = usize::try_from(len).ok()?;
    Some(Bytes::from_owner(Whole(mapping)).slice(..len))
}

/// Where a slice of a live map lies in its file.
pub struct Located {
    pub file: Arc<File>,
    pub offset: u64,
    /// Bytes of the map from the slice's start to the map's end: how far a run of adjacent
    /// slices may extend within the same file.
    pub room: usize,
}

/// The file and offset of `bytes` if it lies wholly inside a live map; `None` for any other
/// memory (and for an empty slice). The caller holds `bytes`, so the map cannot go away while
/// the answer is used.
pub fn locate(bytes: &[u8]) -> Option<Located> {
    if bytes.is_empty() {
        return None;
    }
    let start = bytes.as_ptr() as usize;
    let live = live();
    let (&base, (len, file)) = live.by_address.range(..=start).next_back()?;
    let room = (base + len).checked_sub(start)?;
    (bytes.len() <= room).then(|| Located {
        file: Arc::clone(file),
        offset: (start - base) as u64,
        room,
    })
}

/// Pages asked about per `mincore` call: a `MAPPED_CHUNK` of 1 MiB in 4 KiB pages, plus the
/// partial pages at either end.
const PAGES_PER_CALL: usize = 258;

/// Whether every page under `bytes` (a slice of a map from `map`) is in memory, so that
/// reading it cannot touch the disk.
pub fn resident(bytes: &Bytes) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let page = page_size();
    let addr = bytes.as_ptr() as usize;
    let mut first = addr / page * page;
    let end = addr + bytes.len();
    let mut pages = [0u8; PAGES_PER_CALL];
    while first < end {
        let span = (end - first).min(PAGES_PER_CALL * page);
        let count = span.div_ceil(page);
        // SAFETY: `[first, first + span)` lies within one live mapping (the map is page-aligned
        // and `bytes` keeps it alive); `pages` has room for one byte per page of that range,
        // as mincore writes.
        let rc = unsafe { libc::mincore(first as *mut libc::c_void, span, pages.as_mut_ptr()) };
        if rc != 0 || pages[..count].iter().any(|p| p & 1 == 0) {
            return false;
        }
        first += span;
    }
    true
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

/// Lends the shared map to `Bytes`.
struct Whole(Arc<Mapping>);

impl AsRef<[u8]> for Whole {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(content: &[u8]) -> Arc<File> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(content).unwrap();
        Arc::new(file)
    }

    #[test]
    fn maps_a_file_once_for_every_response_that_serves_it() {
        let file = file_of(&[7u8; 10_000]);
        let a = map(&file, 10_000).unwrap();
        let b = map(&file, 10_000).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(&a[..], &[7u8; 10_000][..]);
        assert!(resident(&a.slice(100..9_000)));
    }

    #[test]
    fn maps_nothing_past_the_end_of_the_file() {
        let file = file_of(b"short");
        assert!(map(&file, 6).is_none());
        assert_eq!(&map(&file, 3).unwrap()[..], b"sho");
        assert!(map(&file_of(b""), 0).is_none());
    }

    #[test]
    fn locates_a_slice_of_a_live_map_in_its_file() {
        let file = file_of(&[3u8; 20_000]);
        let whole = map(&file, 20_000).unwrap();
        let found = locate(&whole[1_000..5_000]).unwrap();
        assert!(Arc::ptr_eq(&found.file, &file));
        assert_eq!(found.offset, 1_000);
        assert_eq!(found.room, 19_000);
        assert!(locate(&[3u8; 100]).is_none(), "other memory is not a map");
        assert!(locate(&whole[..0]).is_none());
    }

    #[test]
    fn a_dropped_map_is_never_matched_again() {
        let file = file_of(&[5u8; 8_192]);
        let whole = map(&file, 8_192).unwrap();
        let start = whole.as_ptr();
        drop(whole);
        assert_eq!(
            Arc::strong_count(&file),
            1,
            "the registry let go of the file"
        );
        let meta = file.metadata().unwrap();
        assert!(!live().by_file.contains_key(&(meta.dev(), meta.ino())));
        // A new map, often placed at the freed address, is found as itself, never as the old.
        let other = file_of(&[6u8; 8_192]);
        let again = map(&other, 8_192).unwrap();
        let found = locate(&again[..]).unwrap();
        assert!(
            Arc::ptr_eq(&found.file, &other),
            "reused at {start:?}: the old file"
        );
    }

    #[test]
    fn residency_of_a_slice_longer_than_one_mincore_call() {
        let file = file_of(&vec![1u8; 3 << 20]);
        let whole = map(&file, 3 << 20).unwrap();
        assert!(resident(&whole.slice(17..(3 << 20) - 5)));
    }
}
