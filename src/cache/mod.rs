//! The local cache: the disk store, the in-memory index over it, manifests kept in memory, the
//! tag -> digest table, and the cache outcome every response reports.
//!
//! Filling (fetching a miss) is not here but in `fill`; deciding freshness of tags is in
//! `api::manifest`. This module answers "what do we hold?" and keeps that answer true.

pub mod evict;
pub mod index;
pub mod origins;
pub mod reader;
pub mod spill;
pub mod store;
pub mod tags;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::oci::digest::Digest;
pub use index::{Entry, Index};
pub use origins::{Origin, Origins};
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
    pub index: Index,
    /// Manifest bodies by digest, so manifest hits need no disk read.
    manifests: moka::sync::Cache<Digest, Manifest>,
    pub tags: Tags,
    /// Where each object came from and who holds it, for the policy access mode.
    pub origins: Arc<Origins>,
}

impl Cache {
    /// Opens the store and rebuilds the index from what is on disk.
    pub fn open(config: &CacheConfig, metrics: Arc<Metrics>) -> std::io::Result<Cache> {
        let store = Arc::new(Store::open(&config.dir)?);
        let index = Index::new(Arc::clone(&store), config.max_size, metrics);
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
            tags.put(key, entry);
        }
        let manifests = moka::sync::Cache::builder()
            .max_capacity(config.manifest_memory)
            .weigher(|_, manifest: &Manifest| manifest.bytes.len().try_into().unwrap_or(u32::MAX))
            .build();
        Ok(Cache {
            store,
            index,
            manifests,
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
    pub fn enforce_min_free(&self, min_free: u64) -> std::io::Result<u64> {
        let available = evict::free_space(self.store.dir())?;
        if available >= min_free {
            return Ok(0);
        }
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
        for victim in evict::choose_victims(candidates, min_free - available) {
            self.index.forget(&victim.digest);
            self.manifests.invalidate(&victim.digest);
            self.store.remove(victim.kind, &victim.digest)?;
            freed += victim.size;
        }
        tracing::info!(freed, min_free, "evicted to keep free space");
        Ok(freed)
    }

    /// A cached manifest by digest, from memory or disk. A manifest the index lists but the disk
    /// cannot produce is dropped from the index, so the next request refetches it.
    pub async fn manifest(&self, digest: &Digest) -> Option<Manifest> {
        if let Some(manifest) = self.manifests.get(digest) {
            self.index.touch(digest);
            return Some(manifest);
        }
        self.index
            .get(digest)
            .filter(|e| e.kind == Kind::Manifest)?;
        let store = Arc::clone(&self.store);
        let owned = digest.clone();
        let read = tokio::task::spawn_blocking(move || store.read_manifest(&owned)).await;
        match read {
            Ok(Ok((bytes, media_type))) if Digest::of(&bytes) == *digest => {
                let manifest = Manifest {
                    digest: digest.clone(),
                    media_type: media_type.into(),
                    bytes: bytes.into(),
                };
                self.manifests.insert(digest.clone(), manifest.clone());
                Some(manifest)
            }
            _ => {
                self.index.forget(digest);
                None
            }
        }
    }

    /// Removes an object from the cache: index first (so nothing new finds it), the in-memory
    /// manifest copy, then the file. Readers that have the file open finish their download. A
    /// fill of the digest already under way is not stopped and will cache it again. Returns what
    /// was removed, or `None` if the digest was not cached.
    pub async fn purge(&self, digest: &Digest) -> std::io::Result<Option<Entry>> {
        let Some(entry) = self.index.get(digest) else {
            return Ok(None);
        };
        self.index.forget(digest);
        self.manifests.invalidate(digest);
        let store = Arc::clone(&self.store);
        let (kind, owned) = (entry.kind, digest.clone());
        tokio::task::spawn_blocking(move || store.remove(kind, &owned))
            .await
            .map_err(std::io::Error::other)??;
        Ok(Some(entry))
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
