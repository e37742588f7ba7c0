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

    /// Drops every tag mapping of one repository of one upstream, so its tags are asked of the
    /// upstream again. Returns how many were dropped.
    pub fn invalidate_repository(&self, upstream: &str, repository: &Repository) -> usize {
        let keys: Vec<Arc<TagKey>> = self
            .entries
            .iter()
            .filter(|(key, _)| &*key.upstream == upstream && key.repository == *repository)
            .map(|(key, _)| key)
            .collect();
        for key in &keys {
            self.entries.invalidate(key.as_ref());
        }
        keys.len()
    }

    /// Tag mappings held. Applies moka's pending bookkeeping first, which counts lazily.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Tags {
    fn default() -> Self {
        Tags::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(upstream: &str, repository: &str, tag: &str) -> TagKey {
        TagKey {
            upstream: upstream.into(),
            repository: Repository::parse(repository).unwrap(),
            tag: Tag::parse(tag).unwrap(),
        }
    }

    #[test]
    fn invalidating_a_repository_keeps_other_repositories_and_upstreams() {
        let tags = Tags::new();
        let entry = TagEntry {
            digest: Digest::of(b"x"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked: Instant::now(),
        };
        for k in [
            key("a.io", "team/app", "v1"),
            key("a.io", "team/app", "v2"),
            key("a.io", "team/other", "v1"),
            key("b.io", "team/app", "v1"),
        ] {
            tags.put(k, entry.clone());
        }
        let app = Repository::parse("team/app").unwrap();
        assert_eq!(tags.invalidate_repository("a.io", &app), 2);
        assert!(tags.get(&key("a.io", "team/app", "v1")).is_none());
        assert!(tags.get(&key("a.io", "team/other", "v1")).is_some());
        assert!(tags.get(&key("b.io", "team/app", "v1")).is_some());
    }
}
