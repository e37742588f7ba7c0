//! The tag table: (upstream, repository, tag) -> the digest and media type it pointed at, and
//! when the upstream last confirmed that.
//!
//! Entries are not expired by age here: a stale mapping is still worth having when the upstream
//! is down. Whether an entry is fresh is decided by the caller against the upstream's TTL.

use std::sync::Arc;

use tokio::time::Instant;

use crate::oci::digest::Digest;
use crate::oci::name::{Repository, Tag};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub upstream: Arc<str>,
    pub repository: Repository,
    pub tag: Tag,
}

#[derive(Debug, Clone)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: Arc<str>,
    /// When the upstream last said this tag points at `digest`.
    pub checked: Instant,
}

/// Bounded, so a client enumerating random tags cannot grow memory without limit.
const MAX_TAGS: u64 = 200_000;

pub struct Tags {
    entries: moka::sync::Cache<TagKey, TagEntry>,
}

impl Tags {
    pub fn new() -> Tags {
        Tags {
            entries: moka::sync::Cache::new(MAX_TAGS),
        }
    }

    pub fn get(&self, key: &TagKey) -> Option<TagEntry> {
        self.entries.get(key)
    }

    pub fn put(&self, key: TagKey, entry: TagEntry) {
        self.entries.insert(key, entry);
    }
}

impl Default for Tags {
    fn default() -> Self {
        Tags::new()
    }
}
