//! The tag table: (upstream, repository, tag, Accept class) -> the digest and media type it
//! pointed at, and when the upstream last confirmed that; and the negative table of tags the
//! upstream said do not exist. Keyed by the Accept class because one tag answers different
//! manifests, or a 404, to clients accepting different manifest types (`oci::accept`): a 404 to
//! a client without the OCI types is never served to one with them.
//!
//! Entries are not expired by age here: a stale mapping is still worth having when the upstream
//! is down, so whether an entry is fresh, or still servable as stale, is decided by the caller
//! against the upstream's TTLs. Mappings are written through to disk (`Store::write_tag`) so a
//! restart during an upstream outage can still serve them. Times are `WallClock` milliseconds:
//! comparable with what was persisted before a restart, and driven by tokio's clock so tests
//! can advance it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::oci::accept::AcceptClass;
use crate::oci::digest::Digest;
use crate::oci::name::{Repository, Tag};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub upstream: Arc<str>,
    pub repository: Repository,
    pub tag: Tag,
    /// What the asking client accepts, which decides what the upstream answers.
    pub accept: AcceptClass,
}

#[derive(Debug, Clone)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: Arc<str>,
    /// When the upstream last said this tag points at `digest` (`WallClock` milliseconds).
    pub(crate) checked_ms: u64,
}

/// Unix time in milliseconds, advanced by tokio's clock (so `tokio::time::pause` and `advance`
/// move it) from a wall-clock reading taken at start-up.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    base: Instant,
    base_ms: u64,
}

impl WallClock {
    pub fn new() -> WallClock {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        WallClock {
            base: Instant::now(),
            base_ms,
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }

    /// How long ago `ms` was; zero for times in the future (a clock step backwards).
    pub fn age(&self, ms: u64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(ms))
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::new()
    }
}

/// Bounded, so a client enumerating random tags cannot grow memory without limit.
const MAX_TAGS: u64 = 200_000;

pub struct Tags {
    entries: moka::sync::Cache<TagKey, TagEntry>,
    /// Tags the upstream answered 404 for, with when it did.
    missing: moka::sync::Cache<TagKey, u64>,
    pub clock: WallClock,
}

impl Tags {
    pub fn new() -> Tags {
        Tags {
            entries: moka::sync::Cache::new(MAX_TAGS),
            missing: moka::sync::Cache::new(MAX_TAGS),
            clock: WallClock::new(),
        }
    }

    pub fn get(&self, key: &TagKey) -> Option<TagEntry> {
        self.entries.get(key)
    }

    pub fn put(&self, key: TagKey, entry: TagEntry) {
        self.missing.invalidate(&key);
        self.entries.insert(key, entry);
    }

    /// Records an upstream 404 for the tag; the mapping, if any, is dropped.
    pub(crate) fn put_missing(&self, key: TagKey) {
        self.entries.invalidate(&key);
        self.missing.insert(key, self.clock.now_ms());
    }

    /// Whether the upstream said the tag does not exist less than `ttl` ago.
    pub(crate) fn is_missing(&self, key: &TagKey, ttl: Duration) -> bool {
        self.missing
            .get(key)
            .is_some_and(|at| self.clock.age(at) < ttl)
    }

    /// Drops every tag mapping of one repository of one upstream, so its tags are asked of the
    /// upstream again. Returns how many were dropped.
    pub(crate) fn invalidate_repository(&self, upstream: &str, repository: &Repository) -> usize {
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

    fn one_key() -> TagKey {
        TagKey {
            upstream: "r.test".into(),
            repository: Repository::parse("team/app").unwrap(),
            tag: Tag::parse("v1").unwrap(),
            accept: AcceptClass::parse("application/vnd.oci.image.manifest.v1+json"),
        }
    }

    #[test]
    fn a_missing_tag_for_one_accept_class_is_not_missing_for_another() {
        let tags = Tags::new();
        let old_client = TagKey {
            accept: AcceptClass::parse("application/vnd.docker.distribution.manifest.v2+json"),
            ..one_key()
        };
        tags.put_missing(old_client.clone());
        assert!(tags.is_missing(&old_client, Duration::from_secs(10)));
        assert!(!tags.is_missing(&one_key(), Duration::from_secs(10)));
        let entry = TagEntry {
            digest: Digest::of(b"x"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_ms: tags.clock.now_ms(),
        };
        tags.put(one_key(), entry);
        assert!(tags.get(&old_client).is_none());
        assert!(tags.is_missing(&old_client, Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_tag_is_remembered_for_its_ttl_only() {
        let tags = Tags::new();
        tags.put_missing(one_key());
        assert!(tags.is_missing(&one_key(), Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!tags.is_missing(&one_key(), Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wall_clock_follows_tokio_time() {
        let clock = WallClock::new();
        let start = clock.now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms() - start, 90_000);
        assert_eq!(clock.age(start), Duration::from_secs(90));
        assert_eq!(clock.age(clock.now_ms() + 5), Duration::ZERO);
    }

    #[test]
    fn a_new_mapping_clears_a_negative_entry() {
        let tags = Tags::new();
        tags.put_missing(one_key());
        let entry = TagEntry {
            digest: Digest::of(b"x"),
            media_type: "m".into(),
            checked_ms: tags.clock.now_ms(),
        };
        tags.put(one_key(), entry);
        assert!(!tags.is_missing(&one_key(), Duration::from_secs(10)));
        assert_eq!(
            tags.invalidate_repository("r.test", &one_key().repository),
            1
        );
        assert!(tags.get(&one_key()).is_none());
    }

    fn key(upstream: &str, repository: &str, tag: &str) -> TagKey {
        TagKey {
            upstream: upstream.into(),
            repository: Repository::parse(repository).unwrap(),
            tag: Tag::parse(tag).unwrap(),
            accept: AcceptClass::parse("*/*"),
        }
    }

    #[test]
    fn invalidating_a_repository_keeps_other_repositories_and_upstreams() {
        let tags = Tags::new();
        let entry = TagEntry {
            digest: Digest::of(b"x"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_ms: 0,
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
