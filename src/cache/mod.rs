//! The local cache: the disk store, the in-memory index over it, manifests kept in memory, the
//! tag -> digest table, and the cache outcome every response reports.
//!
//! Filling (fetching a miss) is not here but in `fill`; deciding freshness of tags is in
//! `api::manifest`. This module answers "what do we hold?" and keeps that answer true.

pub mod evict;
mod fill_error;
pub mod index;
pub mod origins;
pub mod progress;
pub mod reader;
pub mod spill;
pub mod store;
pub mod tags;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::oci::digest::Digest;
pub use fill_error::FillError;
pub use index::{Entry, Index};
pub use origins::{Origin, Origins};
pub use progress::{drop_cached, open_cached, Progress};
pub use store::{Kind, Store};
pub use tags::{TagEntry, TagKey, Tags};

/// How a response was produced; the `X-Cache` header, log lines and metric labels all use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Served from the cache without asking the upstream.
    Hit,
    /// Fetched from the upstream by this request.
    Miss,
    /// Joined a fetch another request had started.
    Coalesced,
    /// Served from the cache after the upstream confirmed it is current.
    Revalidated,
    /// Served from the cache because the upstream could not be asked.
    Stale,
    /// Passed through without caching (tag lists, referrers, HEAD of an uncached blob).
    Bypass,
    /// Refused before any lookup.
    Denied,
    /// Failed; the status says why.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Coalesced => "COALESCED",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
            Outcome::Denied => "DENIED",
            Outcome::Error => "ERROR",
        }
    }
}

/// A manifest as served: the upstream's exact bytes and media type.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: Arc<str>,
    pub bytes: Bytes,
}

/// Everything the cache holds, shared by all requests.
pub struct Cache {
    pub store: Arc<Store>,
    pub index: Arc<Index>,
    /// Manifest bodies by digest, so manifest hits need no disk read.
    manifests: moka::sync::Cache<Digest, Manifest>,
    /// Manifests whose hit was written to their file's mtime within the last minute: a hot
    /// manifest costs one metadata write a minute, as a hot blob does (`progress::open_cached`).
    accessed: moka::sync::Cache<Digest, ()>,
    pub tags: Tags,
    /// Where each object came from and who holds it, for the policy access mode.
    pub origins: Arc<Origins>,
}

/// How often at most a manifest hit is recorded on disk.
const MANIFEST_ACCESS_GRANULARITY: std::time::Duration = std::time::Duration::from_secs(60);

impl Cache {
    /// Opens the store and rebuilds the index from what is on disk.
    pub fn open(config: &CacheConfig, metrics: Arc<Metrics>) -> std::io::Result<Cache> {
        let store = Arc::new(Store::open(&config.dir)?);
        let index = Arc::new(Index::new(Arc::clone(&store), config.max_size, metrics));
        let mut found = store.scan()?;
        // Oldest first, so the LRU order after a restart follows the recorded access times.
        found.sort_by_key(|object| object.touched);
        for object in found {
            index.insert(
                object.digest,
                Entry::new(object.kind, object.size, object.media_type),
            );
        }
        let origins = Arc::new(Origins::new(Arc::clone(&store)));
        origins.sweep(|digest| index.contains(digest))?;
        let tags = Tags::new();
        for (key, entry) in store.scan_tags()? {
            // A mapping to a manifest no longer cached (evicted, purged) is collected.
            if index.get_kind(Kind::Manifest, &entry.digest).is_none() {
                store.remove_tag(&key);
                continue;
            }
            tags.put(key, entry);
        }
        let manifests = moka::sync::Cache::builder()
            .max_capacity(config.manifest_memory)
            .weigher(|_, manifest: &Manifest| manifest.bytes.len().try_into().unwrap_or(u32::MAX))
            .build();
        let accessed = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(MANIFEST_ACCESS_GRANULARITY)
            .build();
        Ok(Cache {
            store,
            index,
            manifests,
            accessed,
            tags,
            origins,
        })
    }

    /// Records where a tag points now, in memory and on disk (for serving stale after a restart).
    pub fn remember_tag(&self, key: TagKey, entry: TagEntry) {
        self.tags.put(key.clone(), entry.clone());
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            if let Err(err) = store.write_tag(&key, &entry) {
                tracing::warn!(%err, "cannot persist tag mapping");
            }
        });
    }

    /// Records that the upstream has no such tag.
    pub fn forget_tag(&self, key: TagKey) {
        self.tags.put_missing(key.clone());
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.remove_tag(&key));
    }

    /// Evicts least recently used objects until the filesystem has `min_free` bytes available
    /// (or the cache is empty). Blocking: stats files. Returns the bytes freed.
    /// The bytes reserved by running fills count as already used.
    pub fn enforce_min_free(&self, min_free: u64) -> std::io::Result<u64> {
        self.enforce_free(min_free, 0)
    }

    /// Evicts least recently used objects until the filesystem has `min_free` bytes and
    /// `min_free_inodes` inodes available (or the cache is empty). The bytes reserved by
    /// running fills count as already used. Blocking: stats files. Returns the bytes freed.
    pub fn enforce_free(&self, min_free: u64, min_free_inodes: u64) -> std::io::Result<u64> {
        let min_free = min_free.saturating_add(self.index.reserved());
        let (available, inodes) = evict::free_space_and_inodes(self.store.dir())?;
        if available >= min_free && inodes >= min_free_inodes {
            return Ok(0);
        }
        let need = evict::Need {
            bytes: min_free.saturating_sub(available),
            inodes: min_free_inodes.saturating_sub(inodes),
        };
        let candidates = self
            .index
            .snapshot()
            .into_iter()
            .filter_map(|(digest, entry)| {
                let path = self.store.path(entry.kind, &digest);
                let touched = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
                Some(evict::Candidate {
                    digest,
                    kind: entry.kind,
                    size: entry.size,
                    touched,
                })
            })
            .collect();
        let mut freed = 0;
        for victim in evict::choose_victims(candidates, need) {
            let Some(removed) = self.index.take(victim.kind, &victim.digest) else {
                continue;
            };
            if victim.kind == Kind::Manifest {
                self.manifests.invalidate(&victim.digest);
            }
            self.index.delete(removed);
            freed += victim.size;
        }
        tracing::info!(
            freed,
            min_free,
            min_free_inodes,
            "evicted to keep free space"
        );
        Ok(freed)
    }

    /// Whether the filesystem keeps `min_free` bytes beside everything running fills have
    /// reserved, after evicting least recently used content to make room. Blocking. When even
    /// an empty cache could not make the room (the disk is mostly other data, or the blob is
    /// bigger than the disk), nothing is evicted: a refused fill must not wipe the cache.
    pub fn room_for_reservations(&self, min_free: u64) -> std::io::Result<bool> {
        let wanted = min_free.saturating_add(self.index.reserved());
        let available = evict::free_space(self.store.dir())?;
        if available.saturating_add(self.index.weighted_bytes()) < wanted {
            return Ok(false);
        }
        self.enforce_min_free(min_free)?;
        Ok(evict::free_space(self.store.dir())? >= wanted)
    }

    /// A cached manifest by digest, from memory or disk. A manifest the index lists but the disk
    /// cannot produce is dropped from the index, so the next request refetches it.
    pub async fn manifest(&self, digest: &Digest) -> Option<Manifest> {
        // The index decides what is cached: a copy in memory of a manifest the index evicted
        // is dropped, not served.
        if self.index.get_kind(Kind::Manifest, digest).is_none() {
            self.manifests.invalidate(digest);
            return None;
        }
        if let Some(manifest) = self.manifests.get(digest) {
            self.record_manifest_access(digest).await;
            return Some(manifest);
        }
        let store = Arc::clone(&self.store);
        let owned = digest.clone();
        let read = tokio::task::spawn_blocking(move || store.read_manifest(&owned)).await;
        match read {
            Ok(Ok(bytes)) if Digest::of(&bytes) == *digest => {
                // The type comes from the document, as when it was fetched, never the sidecar.
                let Ok(media_type) = crate::oci::manifest::media_type(&bytes) else {
                    self.drop_manifest(digest).await;
                    return None;
                };
                let manifest = Manifest {
                    digest: digest.clone(),
                    media_type: media_type.into(),
                    bytes: bytes.into(),
                };
                self.manifests.insert(digest.clone(), manifest.clone());
                self.record_manifest_access(digest).await;
                Some(manifest)
            }
            _ => {
                self.drop_manifest(digest).await;
                None
            }
        }
    }

    /// Takes a manifest the disk cannot produce faithfully out of the index and deletes its
    /// files, so neither the next request nor a restart finds it again.
    async fn drop_manifest(&self, digest: &Digest) {
        if let Some(removed) = self.index.take(Kind::Manifest, digest) {
            let index = Arc::clone(&self.index);
            let _ = tokio::task::spawn_blocking(move || index.delete(removed)).await;
        }
    }

    /// Records a manifest hit in its file's mtime, as blob hits are, so the LRU order rebuilt
    /// at start-up and `min_free` sweeps see hot manifests as hot. Awaited (once a minute per
    /// manifest at most), so the hit is on disk when the response goes out.
    async fn record_manifest_access(&self, digest: &Digest) {
        if self.accessed.contains_key(digest) {
            return;
        }
        self.accessed.insert(digest.clone(), ());
        let store = Arc::clone(&self.store);
        let owned = digest.clone();
        let _ = tokio::task::spawn_blocking(move || store.touch(Kind::Manifest, &owned)).await;
    }

    /// Removes a digest from the cache, as a blob and as a manifest: index first (so nothing
    /// new finds it), the in-memory manifest copy, then the files (only those the index named:
    /// a fill that committed the digest again since keeps its file). Readers that have the
    /// file open finish their download. A fill of the digest already under way is not stopped
    /// and will cache it again. Returns what was removed (the blob if both were), or `None`
    /// if the digest was not cached.
    pub async fn purge(&self, digest: &Digest) -> std::io::Result<Option<Entry>> {
        let manifest = self.index.take(Kind::Manifest, digest);
        let blob = self.index.take(Kind::Blob, digest);
        self.manifests.invalidate(digest);
        let entry = blob.as_ref().or(manifest.as_ref()).map(|r| r.entry.clone());
        let index = Arc::clone(&self.index);
        tokio::task::spawn_blocking(move || {
            for removed in blob.into_iter().chain(manifest) {
                index.delete(removed);
            }
        })
        .await
        .map_err(std::io::Error::other)?;
        Ok(entry)
    }

    /// Stores a manifest the caller has verified against its digest.
    pub async fn put_manifest(&self, manifest: Manifest) -> std::io::Result<()> {
        let store = Arc::clone(&self.store);
        let m = manifest.clone();
        tokio::task::spawn_blocking(move || {
            store.write_manifest(&m.digest, &m.media_type, &m.bytes)
        })
        .await
        .map_err(std::io::Error::other)??;
        let size = manifest.bytes.len() as u64;
        let entry = Entry::new(Kind::Manifest, size, Some(manifest.media_type.to_string()));
        self.index.insert(manifest.digest.clone(), entry);
        self.manifests.insert(manifest.digest.clone(), manifest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::oci::name::{Repository, Tag};

    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    fn open(dir: &std::path::Path, max_size: u64) -> Cache {
        let config = CacheConfig {
            dir: dir.to_path_buf(),
            max_size,
            ..CacheConfig::default()
        };
        Cache::open(&config, Arc::new(Metrics::new())).unwrap()
    }

    fn manifest(n: u8) -> Manifest {
        let bytes = Bytes::from(format!("{{\"schemaVersion\":2,\"n\":{n}}}"));
        Manifest {
            digest: Digest::of(&bytes),
            media_type: OCI_MANIFEST.into(),
            bytes,
        }
    }

    #[tokio::test]
    async fn an_evicted_manifest_is_not_served_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two manifests (each a file and a sidecar, a block or more each).
        let cache = open(dir.path(), 4 * 4096);
        let first = manifest(1);
        cache.put_manifest(first.clone()).await.unwrap();
        assert!(cache.manifest(&first.digest).await.is_some());
        for n in 2..6 {
            cache.put_manifest(manifest(n)).await.unwrap();
        }
        assert!(cache
            .index
            .get_kind(Kind::Manifest, &first.digest)
            .is_none());
        assert!(
            cache.manifest(&first.digest).await.is_none(),
            "evicted from the index and the disk, so gone from memory too"
        );
    }

    #[tokio::test]
    async fn purge_removes_a_manifest_from_memory_index_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 30);
        let m = manifest(1);
        cache.put_manifest(m.clone()).await.unwrap();
        let purged = cache.purge(&m.digest).await.unwrap().unwrap();
        assert_eq!(purged.kind, Kind::Manifest);
        assert!(cache.manifest(&m.digest).await.is_none());
        assert!(!cache.store.path(Kind::Manifest, &m.digest).exists());
        assert!(cache.purge(&m.digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tags_of_manifests_no_longer_cached_are_collected_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 30);
        let (kept, gone) = (manifest(1), manifest(2));
        cache.put_manifest(kept.clone()).await.unwrap();
        let key = |tag: &str| TagKey {
            upstream: "up".into(),
            repository: Repository::parse("team/app").unwrap(),
            tag: Tag::parse(tag).unwrap(),
            accept: crate::oci::accept::AcceptClass::parse(""),
        };
        for (tag, m) in [("kept", &kept), ("gone", &gone)] {
            let entry = TagEntry {
                digest: m.digest.clone(),
                media_type: OCI_MANIFEST.into(),
                checked_ms: 1,
            };
            cache.store.write_tag(&key(tag), &entry).unwrap();
        }
        drop(cache);
        let cache = open(dir.path(), 1 << 30);
        assert!(cache.tags.get(&key("kept")).is_some());
        assert!(cache.tags.get(&key("gone")).is_none());
        let left: Vec<String> = std::fs::read_dir(dir.path().join("tags/up/team/app"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.iter().all(|name| !name.starts_with("@gone@")),
            "{left:?}"
        );
        assert!(
            left.iter().any(|name| name.starts_with("@kept@")),
            "{left:?}"
        );
    }

    #[test]
    fn a_reservation_no_eviction_could_make_room_for_evicts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[cache]\ndir = \"{}\"\nmax_size = \"4PiB\"",
            dir.path().display()
        );
        let config = crate::config::Config::from_toml(&toml).unwrap();
        let cache = Cache::open(&config.cache, Arc::new(Metrics::new())).unwrap();
        let content = [7u8; 4096];
        let digest = Digest::of(&content);
        let (temp, mut file) = cache.store.temp_file().unwrap();
        file.write_all(&content).unwrap();
        cache.store.commit(&temp, Kind::Blob, &digest).unwrap();
        cache
            .index
            .insert(digest.clone(), Entry::new(Kind::Blob, 4096, None));

        // A petabyte fill: no filesystem here has the room, with or without the cached blob.
        let reservation = cache.index.reserve(1 << 50).expect("within max_size");
        assert!(!cache.room_for_reservations(0).unwrap());
        assert!(
            cache.index.get(&digest).is_some(),
            "the cache was not emptied for a fill that could not fit anyway"
        );
        assert!(cache.store.path(Kind::Blob, &digest).exists());
        drop(reservation);
        assert_eq!(cache.index.reserved(), 0);
    }
}
