//! The in-memory index: (kind, digest) -> size and media type of every committed object, kept
//! in least-recently-used order and bounded by `cache.max_size`. A blob and a manifest with the
//! same digest are two objects (two files), so they are two entries.
//!
//! `max_size` bounds real disk use: an object weighs what the filesystem allocated for it
//! (whole blocks, its media-type sidecar included, at least `MIN_WEIGHT`), read from the file
//! when it is indexed. So the index holds at most `max_size / MIN_WEIGHT` entries, and its
//! memory is bounded by that times the per-entry cost (README, "Disk and memory").
//!
//! The index is the only way content is found, so it must never name a file that is gone: an
//! entry leaves the index first and its file is deleted after, and a reader that still has the
//! file open keeps reading it to the end (POSIX unlink semantics). The file is deleted only if
//! it is still the one the entry named (`Store::remove_if`, by inode): a fill that committed
//! the digest again in between keeps its file. Capacity evictions happen
//! inside `insert`, so the disk is within `max_size` as soon as an insert returns; they are
//! counted in the metrics, and the exact bytes indexed are tracked for the disk-use gauge. A
//! running fill reserves its Content-Length here (`reserve`), counted against `max_size` with
//! the entries until it commits or fails. It does not fetch or verify anything.
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
    /// Bytes accounted against `max_size`; set by `Index::insert` from the file.
    weight: u64,
    /// The file's inode when indexed, so a removal deletes this file and no later one.
    inode: u64,
}

impl Entry {
    pub fn new(kind: Kind, size: u64, media_type: Option<String>) -> Entry {
        Entry {
            kind,
            size,
            media_type: media_type.map(Into::into),
            weight: weight(size),
            inode: 0,
        }
    }
}

/// The least an object weighs: one 4 KiB block, the usual allocation unit, so a million tiny
/// objects still count against `max_size` and the entry count stays bounded.
pub(crate) const MIN_WEIGHT: u64 = 4096;

/// Bytes an object whose file cannot be measured is accounted at: its size in 4 KiB blocks.
fn weight(size: u64) -> u64 {
    size.div_ceil(MIN_WEIGHT).max(1) * MIN_WEIGHT
}

/// The index key: the raw 32 hash bytes of a sha256 digest and the kind. The `Digest` string
/// is 71 bytes on the heap plus 24 inline; a million cached blobs would spend ~95 MB on keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key([u8; 32], Kind);

impl Key {
    fn of(kind: Kind, digest: &Digest) -> Key {
        let mut raw = [0u8; 32];
        // A `Digest` is always sha256 with 64 lowercase hex characters.
        hex::decode_to_slice(digest.hex(), &mut raw).expect("a parsed digest is valid hex");
        Key(raw, kind)
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
    /// Weight promised to running fills by their Content-Length (`Reservation`), counted
    /// against `max_weight` with the entries, so concurrent fills cannot overshoot `max_size`.
    reserved: u64,
}

impl Entries {
    fn removed(&mut self, entry: &Entry) {
        self.weight -= entry.weight;
        self.bytes -= entry.size;
    }
}

/// An entry taken out of the index whose file is still to be deleted (`Index::delete`).
#[derive(Debug)]
pub struct Removed {
    pub digest: Digest,
    pub entry: Entry,
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
                reserved: 0,
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

    /// Looks up a digest, the blob if both a blob and a manifest are cached, and marks it
    /// recently used.
    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        let mut entries = self.lock();
        match entries.lru.get(&Key::of(Kind::Blob, digest)) {
            Some(blob) => Some(blob.clone()),
            None => entries.lru.get(&Key::of(Kind::Manifest, digest)).cloned(),
        }
    }

    /// Looks up one kind of object and marks it recently used.
    pub(crate) fn get_kind(&self, kind: Kind, digest: &Digest) -> Option<Entry> {
        self.lock().lru.get(&Key::of(kind, digest)).cloned()
    }

    /// Whether a digest is indexed, without marking it used (a check is not a use).
    pub fn contains(&self, digest: &Digest) -> bool {
        let entries = self.lock();
        entries.lru.contains(&Key::of(Kind::Blob, digest))
            || entries.lru.contains(&Key::of(Kind::Manifest, digest))
    }

    /// Adds or replaces an entry as the most recently used, then evicts least recently used
    /// entries, deleting their files, until the index is within `max_size` again. An object
    /// larger than `max_size` on its own is evicted too.
    pub fn insert(&self, digest: Digest, entry: Entry) {
        self.insert_releasing(digest, entry, 0);
    }

    /// `insert`, releasing `reserved` weight of a fill's reservation under the same lock.
    fn insert_releasing(&self, digest: Digest, mut entry: Entry, reserved: u64) {
        if let Ok(footprint) = self.store.footprint(entry.kind, &digest) {
            entry.weight = footprint.allocated.max(MIN_WEIGHT);
            entry.inode = footprint.inode;
        }
        let evicted = {
            let mut entries = self.lock();
            entries.reserved -= reserved;
            entries.weight += entry.weight;
            entries.bytes += entry.size;
            if let Some(replaced) = entries.lru.put(Key::of(entry.kind, &digest), entry) {
                entries.removed(&replaced);
            }
            self.evict_over(&mut entries, 0)
        };
        self.evict_files(evicted);
    }

    /// Reserves room for a fill of `size` bytes: evicts least recently used entries until the
    /// entries, the reservations of other fills and this one fit `max_size`. `None` (and
    /// nothing evicted) when the other fills' reservations alone leave no room.
    pub(crate) fn reserve(&self, size: u64) -> Option<Reservation<'_>> {
        self.reserve_within(size, (1, 1))
    }

    /// `reserve`, but only while all reservations together stay within `numerator /
    /// denominator` of the capacity (a prefetch leaves the rest to real misses).
    pub(crate) fn reserve_within(
        &self,
        size: u64,
        (numerator, denominator): (u64, u64),
    ) -> Option<Reservation<'_>> {
        let needed = weight(size);
        let limit = self.max_weight / denominator.max(1) * numerator;
        let evicted = {
            let mut entries = self.lock();
            if entries.reserved.saturating_add(needed) > limit {
                return None;
            }
            let evicted = self.evict_over(&mut entries, needed);
            entries.reserved += needed;
            evicted
        };
        self.evict_files(evicted);
        Some(Reservation {
            index: self,
            weight: needed,
        })
    }

    /// Weight reserved by running fills.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved
    }

    /// Pops least recently used entries until `extra` more weight fits beside the entries and
    /// the reservations.
    fn evict_over(&self, entries: &mut Entries, extra: u64) -> Vec<(Key, Entry)> {
        let mut evicted = Vec::new();
        while entries.weight + entries.reserved + extra > self.max_weight {
            let Some((key, entry)) = entries.lru.pop_lru() else {
                break;
            };
            entries.removed(&entry);
            evicted.push((key, entry));
        }
        evicted
    }

    /// Counts and deletes the files of entries evicted from the index.
    fn evict_files(&self, evicted: Vec<(Key, Entry)>) {
        // Out of the index first, then off the disk.
        for (key, entry) in evicted {
            self.metrics.evictions.inc();
            self.metrics.evicted_bytes.inc_by(entry.size);
            self.delete(Removed {
                digest: key.digest(),
                entry,
            });
        }
    }
}

/// Room held in the index for a running fill, from its Content-Length. Released when dropped
/// (the fill failed), or turned into the committed entry by `commit`.
pub(crate) struct Reservation<'a> {
    index: &'a Index,
    weight: u64,
}

impl Reservation<'_> {
    /// Indexes the committed object in place of the reservation.
    pub fn commit(mut self, digest: Digest, entry: Entry) {
        let weight = std::mem::take(&mut self.weight);
        self.index.insert_releasing(digest, entry, weight);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.weight > 0 {
            self.index.lock().reserved -= self.weight;
        }
    }
}

impl Index {
    /// Takes one object out of the index; its file is the caller's to `delete`.
    pub fn take(&self, kind: Kind, digest: &Digest) -> Option<Removed> {
        let mut entries = self.lock();
        let entry = entries.lru.pop(&Key::of(kind, digest))?;
        entries.removed(&entry);
        Some(Removed {
            digest: digest.clone(),
            entry,
        })
    }

    /// Deletes the file of an entry taken out of the index, unless a fill has committed the
    /// digest again since (the file is not the entry's any more). Blocking.
    pub fn delete(&self, removed: Removed) {
        let Removed { digest, entry } = removed;
        match self.store.remove_if(entry.kind, &digest, entry.inode) {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(%digest, "kept a file committed after its removal was decided")
            }
            Err(err) => tracing::warn!(%digest, %err, "cannot delete a removed object"),
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

    /// Bytes accounted to cached objects: allocated blocks, sidecars included.
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

    /// A store in a fresh temp dir (kept alive by the returned guard).
    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        (dir, store)
    }

    /// What one small object weighs on this filesystem (a block, at least `MIN_WEIGHT`).
    fn unit(store: &Store) -> u64 {
        let digest = Digest::of(b"probe");
        let (temp, mut file) = store.temp_file().unwrap();
        file.write_all(b"probe").unwrap();
        store.commit(&temp, Kind::Blob, &digest).unwrap();
        let unit = store.footprint(Kind::Blob, &digest).unwrap().allocated;
        store.remove(Kind::Blob, &digest).unwrap();
        unit.max(MIN_WEIGHT)
    }

    #[test]
    fn running_fills_reserve_room_against_max_size() {
        let (_dir, store) = store();
        let unit = unit(&store);
        let index = Index::new(Arc::clone(&store), 4 * unit, Arc::new(Metrics::new()));
        let a = put(&store, &index, &[1; 1024]);
        let b = put(&store, &index, &[2; 1024]);
        let first = index.reserve(2 * unit).expect("room after the entries");
        assert!(index.get(&a).is_some() && index.get(&b).is_some());
        let second = index.reserve(2 * unit).expect("room after evicting");
        assert!(index.get(&a).is_none() && index.get(&b).is_none());
        assert!(!store.path(Kind::Blob, &a).exists());
        assert!(index.reserve(1).is_none(), "the fills hold all the room");
        drop(first);
        assert_eq!(index.reserved(), 2 * unit);
        let c = Digest::of(b"c");
        second.commit(c.clone(), Entry::new(Kind::Blob, 2 * unit, None));
        assert_eq!(index.reserved(), 0);
        assert_eq!(index.weighted_bytes(), 2 * unit);
        assert!(index.get(&c).is_some());
    }

    #[test]
    fn a_reservation_within_a_share_leaves_the_rest_to_ordinary_ones() {
        let (_dir, store) = store();
        let unit = unit(&store);
        let index = Index::new(Arc::clone(&store), 4 * unit, Arc::new(Metrics::new()));
        let half = (1, 2);
        let prefetch = index.reserve_within(2 * unit, half).expect("half is free");
        assert!(index.reserve_within(unit, half).is_none(), "past half");
        let miss = index
            .reserve(2 * unit)
            .expect("the other half stays for real misses");
        assert_eq!(index.reserved(), 4 * unit);
        drop((prefetch, miss));
        assert_eq!(index.reserved(), 0);
    }

    #[test]
    fn evicts_least_recently_used_and_deletes_its_file() {
        let (_dir, store) = store();
        let metrics = Arc::new(Metrics::new());
        let unit = unit(&store);
        let index = Index::new(Arc::clone(&store), 3 * unit, Arc::clone(&metrics));
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
        assert_eq!(index.weighted_bytes(), 3 * unit);
        assert_eq!(index.bytes(), 3 * 1024);
        assert_eq!(metrics.evictions.get(), 1);
        assert_eq!(metrics.evicted_bytes.get(), 1024);
    }

    #[test]
    fn small_objects_weigh_their_allocated_blocks_and_sidecars() {
        let (_dir, store) = store();
        let unit = unit(&store);
        // Room for ten 1-byte objects by their bytes, but only for two by their blocks.
        let index = Index::new(Arc::clone(&store), 2 * unit, Arc::new(Metrics::new()));
        let kept: Vec<Digest> = (0..10u8).map(|n| put(&store, &index, &[n])).collect();
        assert_eq!(index.len(), 2, "tiny objects still weigh a block each");
        let on_disk = kept
            .iter()
            .filter(|d| store.path(Kind::Blob, d).exists())
            .count();
        assert_eq!(on_disk, 2, "evicted files are gone from disk");
        let (digest, len) = store.write_test_manifest();
        index.insert(digest.clone(), Entry::new(Kind::Manifest, len, None));
        let entry = index.get_kind(Kind::Manifest, &digest).unwrap();
        assert!(
            entry.weight >= 2 * unit.min(4096),
            "manifest file + .type sidecar"
        );
    }

    #[test]
    fn a_blob_and_a_manifest_with_one_digest_are_two_entries() {
        let (_dir, store) = store();
        let index = Index::new(Arc::clone(&store), 1 << 30, Arc::new(Metrics::new()));
        let bytes = br#"{"schemaVersion":2,"layers":[]}"#;
        let digest = put(&store, &index, bytes);
        store
            .write_manifest(&digest, "application/vnd.oci.image.manifest.v1+json", bytes)
            .unwrap();
        index.insert(
            digest.clone(),
            Entry::new(Kind::Manifest, bytes.len() as u64, None),
        );
        assert_eq!(index.len(), 2);
        assert!(index.get_kind(Kind::Blob, &digest).is_some());
        assert!(index.get_kind(Kind::Manifest, &digest).is_some());
        assert_eq!(index.bytes(), 2 * bytes.len() as u64);
        let removed = index.take(Kind::Manifest, &digest).unwrap();
        index.delete(removed);
        assert!(
            index.get_kind(Kind::Blob, &digest).is_some(),
            "the blob stays"
        );
        assert!(store.path(Kind::Blob, &digest).exists());
        assert!(!store.path(Kind::Manifest, &digest).exists());
    }

    #[test]
    fn a_removal_decided_before_a_new_commit_keeps_the_new_file() {
        let (_dir, store) = store();
        let index = Index::new(Arc::clone(&store), 1 << 30, Arc::new(Metrics::new()));
        let digest = put(&store, &index, b"layer bytes");
        // The decision: eviction or purge takes the entry out of the index...
        let decided = index.take(Kind::Blob, &digest).unwrap();
        // ...a request misses, and its fill commits the digest again before the unlink.
        let refilled = put(&store, &index, b"layer bytes");
        assert_eq!(refilled, digest);
        index.delete(decided);
        assert!(
            store.path(Kind::Blob, &digest).exists(),
            "the new file is not deleted"
        );
        let entry = index.get_kind(Kind::Blob, &digest).unwrap();
        assert_eq!(entry.size, 11);
        // The new entry's own removal still deletes it.
        index.delete(index.take(Kind::Blob, &digest).unwrap());
        assert!(!store.path(Kind::Blob, &digest).exists());
    }
}
