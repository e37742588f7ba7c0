//! The in-memory index: digest -> kind, size and media type of every committed object, kept in
//! least-recently-used order and bounded by `cache.max_size`.
//!
//! The index is the only way content is found, so it must never name a file that is gone: an
//! entry leaves the index first and its file is deleted after, and a reader that still has the
//! file open keeps reading it to the end (POSIX unlink semantics). Capacity evictions happen
//! inside `insert`, so the disk is within `max_size` as soon as an insert returns; they are
//! counted in the metrics, and the exact bytes indexed are tracked for the disk-use gauge. It
//! does not fetch or verify anything.
//!
//! The index is an `lru::LruCache` under a mutex rather than moka (which berth uses for its
//! smaller caches): at a million cached blobs moka's per-entry bookkeeping came to ~240 bytes,
//! against ~110 here (benches/index_memory.rs), and a lookup takes a short uncontended lock
//! instead of moka's read-buffer bookkeeping.

use std::sync::{Arc, Mutex, MutexGuard};

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

/// Bytes an object is accounted at: its size rounded up to whole KiB (at least 1 KiB), a rough
/// stand-in for filesystem blocks, so a million tiny objects still count against `max_size`.
fn weight(size: u64) -> u64 {
    size.div_ceil(1024).max(1) * 1024
}

/// The index key: the raw 32 hash bytes of a sha256 digest. The `Digest` string is 71 bytes
/// on the heap plus 24 inline; a million cached blobs would spend ~95 MB on keys alone.
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

struct Entries {
    lru: lru::LruCache<Key, Entry>,
    /// Sum of `weight` over the entries; kept at or under `max_weight` by `insert`.
    weight: u64,
    /// Exact bytes of the entries.
    bytes: u64,
}

impl Entries {
    fn removed(&mut self, entry: &Entry) {
        self.weight -= weight(entry.size);
        self.bytes -= entry.size;
    }
}

pub struct Index {
    entries: Mutex<Entries>,
    max_weight: u64,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl Index {
    pub fn new(store: Arc<Store>, max_size: u64, metrics: Arc<Metrics>) -> Index {
        Index {
            entries: Mutex::new(Entries {
                lru: lru::LruCache::unbounded(),
                weight: 0,
                bytes: 0,
            }),
            max_weight: max_size,
            store,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // The entries are consistent after every statement that can panic, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Looks up a digest and marks it recently used.
    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.lock().lru.get(&Key::of(digest)).cloned()
    }

    /// Whether a digest is indexed, without marking it used (a check is not a use).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().lru.contains(&Key::of(digest))
    }

    pub fn touch(&self, digest: &Digest) {
        let _ = self.lock().lru.get(&Key::of(digest));
    }

    /// Adds or replaces an entry as the most recently used, then evicts least recently used
    /// entries, deleting their files, until the index is within `max_size` again. An object
    /// larger than `max_size` on its own is evicted too.
    pub fn insert(&self, digest: Digest, entry: Entry) {
        let evicted = {
            let mut entries = self.lock();
            entries.weight += weight(entry.size);
            entries.bytes += entry.size;
            if let Some(replaced) = entries.lru.put(Key::of(&digest), entry) {
                entries.removed(&replaced);
            }
            let mut evicted = Vec::new();
            while entries.weight > self.max_weight {
                let Some((key, entry)) = entries.lru.pop_lru() else {
                    break;
                };
                entries.removed(&entry);
                evicted.push((key, entry));
            }
            evicted
        };
        // Out of the index first, then off the disk.
        for (key, entry) in evicted {
            let digest = key.digest();
            self.metrics.evictions.inc();
            self.metrics.evicted_bytes.inc_by(entry.size);
            if let Err(err) = self.store.remove(entry.kind, &digest) {
                tracing::warn!(%digest, %err, "cannot delete evicted object");
            }
        }
    }

    /// Drops an entry whose file turned out unreadable; the file is left to the caller.
    pub fn forget(&self, digest: &Digest) {
        let mut entries = self.lock();
        if let Some(entry) = entries.lru.pop(&Key::of(digest)) {
            entries.removed(&entry);
        }
    }

    pub fn len(&self) -> u64 {
        self.lock().lru.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, least recently used first; for eviction scans and stats, not the request
    /// path. The lock is held only to copy the raw entries; digests are spelled out after.
    pub fn snapshot(&self) -> Vec<(Digest, Entry)> {
        let raw: Vec<(Key, Entry)> = self
            .lock()
            .lru
            .iter()
            .rev()
            .map(|(key, entry)| (*key, entry.clone()))
            .collect();
        raw.into_iter()
            .map(|(key, entry)| (key.digest(), entry))
            .collect()
    }

    /// Bytes accounted to cached objects, rounded up to KiB per object.
    pub fn weighted_bytes(&self) -> u64 {
        self.lock().weight
    }

    /// Exact bytes of the cached objects (what `du` would show, less filesystem overhead).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
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
