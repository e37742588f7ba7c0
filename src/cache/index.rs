//! The in-memory index: digest -> kind, size and media type of every committed object, kept in
//! least-recently-used order and bounded by `cache.max_size`.
//!
//! The index is the only way content is found, so it must never name a file that is gone: an
//! entry leaves the index first and its file is deleted after (moka's eviction listener), and a
//! reader that still has the file open keeps reading it to the end (POSIX unlink semantics).
//! Capacity evictions are counted in the metrics, and the exact bytes indexed are tracked for
//! the disk-use gauge. It does not fetch or verify anything.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::store::{Kind, Store};
use crate::metrics::Metrics;
use crate::oci::digest::Digest;

/// What the index knows about one object on disk.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub size: u64,
    /// Manifests only: the `Content-Type` the upstream served them with.
    pub media_type: Option<Arc<str>>,
}

impl Entry {
    pub fn new(kind: Kind, size: u64, media_type: Option<String>) -> Entry {
        Entry {
            kind,
            size,
            media_type: media_type.map(Into::into),
        }
    }
}

/// Weights are in KiB because moka weighs entries with a u32: bytes would cap a blob at 4 GiB.
fn weight(size: u64) -> u32 {
    size.div_ceil(1024).clamp(1, u64::from(u32::MAX)) as u32
}

/// The index key: the raw 32 hash bytes of a sha256 digest. The `Digest` string is 71 bytes
/// on the heap plus 24 inline; a million cached blobs would spend ~95 MB on keys alone
/// (benches/index_memory.rs measures the whole entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key([u8; 32]);

impl Key {
    fn of(digest: &Digest) -> Key {
        let mut raw = [0u8; 32];
        // A `Digest` is always sha256 with 64 lowercase hex characters.
        hex::decode_to_slice(digest.hex(), &mut raw).expect("a parsed digest is valid hex");
        Key(raw)
    }

    fn digest(&self) -> Digest {
        Digest::from_sha256(self.0)
    }
}

pub struct Index {
    entries: moka::sync::Cache<Key, Entry>,
    /// Exact bytes of the indexed objects: added on insert, subtracted for every removal
    /// (replaced, forgotten, evicted). Signed because moka may report a replacement's removal
    /// before the insert that caused it has been added.
    bytes: Arc<AtomicI64>,
}

impl Index {
    pub fn new(store: Arc<Store>, max_size: u64, metrics: Arc<Metrics>) -> Index {
        let bytes = Arc::new(AtomicI64::new(0));
        let removed = Arc::clone(&bytes);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_size.div_ceil(1024))
            .weigher(|_, entry: &Entry| weight(entry.size))
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |key: Arc<Key>, entry: Entry, cause| {
                removed.fetch_sub(entry.size as i64, Ordering::Relaxed);
                // Replaced entries describe the same file; only capacity evictions delete.
                if cause == RemovalCause::Size {
                    let digest = key.digest();
                    metrics.evictions.inc();
                    metrics.evicted_bytes.inc_by(entry.size);
                    if let Err(err) = store.remove(entry.kind, &digest) {
                        tracing::warn!(%digest, %err, "cannot delete evicted object");
                    }
                }
            })
            .build();
        Index { entries, bytes }
    }

    /// Looks up a digest and marks it recently used.
    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.entries.get(&Key::of(digest))
    }

    pub fn touch(&self, digest: &Digest) {
        let _ = self.entries.get(&Key::of(digest));
    }

    pub fn insert(&self, digest: Digest, entry: Entry) {
        self.bytes.fetch_add(entry.size as i64, Ordering::Relaxed);
        self.entries.insert(Key::of(&digest), entry);
    }

    /// Drops an entry whose file turned out unreadable; the file is left to the caller.
    pub fn forget(&self, digest: &Digest) {
        self.entries.invalidate(&Key::of(digest));
    }

    /// Applies pending evictions now, so the disk stays within `max_size` after every commit.
    pub fn settle(&self) {
        self.entries.run_pending_tasks();
    }

    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, in no particular order; for eviction scans and stats, not the request path.
    pub fn snapshot(&self) -> Vec<(Digest, Entry)> {
        self.entries
            .iter()
            .map(|(key, entry)| (key.digest(), entry))
            .collect()
    }

    /// Bytes accounted to cached objects, rounded up to KiB per object.
    pub fn weighted_bytes(&self) -> u64 {
        self.entries.weighted_size() * 1024
    }

    /// Exact bytes of the cached objects (what `du` would show, less filesystem overhead).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn put(store: &Store, index: &Index, content: &[u8]) -> Digest {
        let (temp, mut file) = store.temp_file().unwrap();
        file.write_all(content).unwrap();
        let digest = Digest::of(content);
        store.commit(&temp, Kind::Blob, &digest).unwrap();
        index.insert(
            digest.clone(),
            Entry::new(Kind::Blob, content.len() as u64, None),
        );
        index.settle();
        digest
    }

    #[test]
    fn evicts_least_recently_used_and_deletes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let metrics = Arc::new(Metrics::new());
        let index = Index::new(Arc::clone(&store), 3 * 1024, Arc::clone(&metrics));
        let a = put(&store, &index, &[1; 1024]);
        let b = put(&store, &index, &[2; 1024]);
        let c = put(&store, &index, &[3; 1024]);
        assert!(index.get(&a).is_some(), "a is now the most recently used");
        let d = put(&store, &index, &[4; 1024]);
        assert!(index.get(&b).is_none(), "b was least recently used");
        assert!(!store.path(Kind::Blob, &b).exists());
        for kept in [&a, &c, &d] {
            assert!(index.get(kept).is_some());
            assert!(store.path(Kind::Blob, kept).exists());
        }
        assert!(index.weighted_bytes() <= 3 * 1024);
        assert_eq!(index.bytes(), 3 * 1024);
        assert_eq!(metrics.evictions.get(), 1);
        assert_eq!(metrics.evicted_bytes.get(), 1024);
    }
}
