//! Which repository is known to hold which digest, so cached content of one repository is never
//! served through another.
//!
//! The cache is content-addressed: one file per digest, whichever repository it came from. With
//! access control that would let anyone allowed to pull repository A read a blob of repository
//! B by guessing or learning its digest. So, in the policy access mode, berth serves a digest
//! through repository R only when R is known to hold it:
//! - a manifest served for R (fetched through R, or a tag of R resolved by R's upstream) is
//!   held by R, and so is everything it references (config, layers, index children, subject):
//!   a registry accepts a manifest only when its references exist in the same repository;
//! - otherwise R's upstream is asked (HEAD) first, and a yes is remembered.
//!
//! Concurrent confirmations of the same (R, digest) share one HEAD.
//!
//! The knowledge is in memory, bounded (LRU) and not persisted: after a restart, the first
//! manifest a client pulls re-teaches the blobs of that image, and a digest asked for without
//! its manifest costs one HEAD to the upstream. Only digests, never bytes, are kept here.

use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::flight::Flights;
use crate::oci::digest::Digest;
use crate::oci::name::Repository;
use crate::upstream::UpstreamError;

/// (upstream, repository, digest) triples remembered; a 16-byte key each, so a few tens of MiB
/// at most, enough for thousands of images of dozens of layers.
const MAX_KNOWN: u64 = 250_000;

type Key = u128;

pub struct Holdings {
    known: moka::sync::Cache<Key, ()>,
    confirmations: Flights<Key, Result<(), UpstreamError>>,
}

/// A collision-resistant key for the triple; truncating SHA-256 to 128 bits keeps collisions
/// out of reach while the entry stays small.
fn key(upstream: &str, repository: &Repository, digest: &Digest) -> Key {
    let mut hasher = Sha256::new();
    for part in [upstream, repository.as_str(), digest.as_str()] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let hash = hasher.finalize();
    u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"))
}

impl Holdings {
    pub fn new() -> Holdings {
        Holdings {
            known: moka::sync::Cache::new(MAX_KNOWN),
            confirmations: Flights::default(),
        }
    }

    pub fn record(&self, upstream: &str, repository: &Repository, digest: &Digest) {
        self.known.insert(key(upstream, repository, digest), ());
    }

    pub fn holds(&self, upstream: &str, repository: &Repository, digest: &Digest) -> bool {
        self.known.contains_key(&key(upstream, repository, digest))
    }

    /// Ok if the repository is known to hold the digest, or `ask` (the upstream's answer to a
    /// HEAD) says it does now; the answer is remembered.
    pub async fn confirm<F>(
        self: &Arc<Self>,
        upstream: &str,
        repository: &Repository,
        digest: &Digest,
        ask: impl FnOnce() -> F,
    ) -> Result<(), UpstreamError>
    where
        F: std::future::Future<Output = Result<(), UpstreamError>> + Send + 'static,
    {
        let key = key(upstream, repository, digest);
        if self.known.contains_key(&key) {
            return Ok(());
        }
        let holdings = Arc::clone(self);
        let (answer, _) = self
            .confirmations
            .run(key, move || {
                let asked = ask();
                async move {
                    asked.await?;
                    holdings.known.insert(key, ());
                    Ok(())
                }
            })
            .await;
        answer
    }
}

impl Default for Holdings {
    fn default() -> Self {
        Holdings::new()
    }
}

/// Every digest a manifest or index references: config, layers, `blobs` of artifact manifests,
/// index children and the subject. Unparsable documents reference nothing.
pub fn referenced_digests(manifest: &[u8]) -> Vec<Digest> {
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Document {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        blobs: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
        subject: Option<Descriptor>,
    }
    let Ok(document) = serde_json::from_slice::<Document>(manifest) else {
        return Vec::new();
    };
    document
        .config
        .into_iter()
        .chain(document.layers)
        .chain(document.blobs)
        .chain(document.manifests)
        .chain(document.subject)
        .filter_map(|descriptor| Digest::parse(&descriptor.digest).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    #[test]
    fn knowledge_is_per_upstream_and_repository() {
        let holdings = Holdings::new();
        let app = Repository::parse("team/app").unwrap();
        let other = Repository::parse("team/other").unwrap();
        holdings.record("a.io", &app, &digest('a'));
        assert!(holdings.holds("a.io", &app, &digest('a')));
        assert!(!holdings.holds("a.io", &other, &digest('a')));
        assert!(!holdings.holds("b.io", &app, &digest('a')));
        assert!(!holdings.holds("a.io", &app, &digest('b')));
    }

    #[tokio::test]
    async fn a_confirmation_asks_once_and_is_remembered() {
        let holdings = Arc::new(Holdings::new());
        let app = Repository::parse("team/app").unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let asked = Arc::clone(&asked);
            holdings
                .confirm("a.io", &app, &digest('a'), move || async move {
                    asked.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
                .unwrap();
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(holdings.holds("a.io", &app, &digest('a')));
    }

    #[tokio::test]
    async fn a_refusal_is_not_remembered() {
        let holdings = Arc::new(Holdings::new());
        let app = Repository::parse("team/app").unwrap();
        let refused = holdings
            .confirm("a.io", &app, &digest('a'), || async {
                Err(UpstreamError::Status {
                    status: http::StatusCode::NOT_FOUND,
                    retry_after: None,
                })
            })
            .await;
        assert!(refused.is_err());
        assert!(!holdings.holds("a.io", &app, &digest('a')));
    }

    #[test]
    fn manifests_and_indexes_reference_their_content() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": d('c'), "size": 1},
            "layers": [{"digest": d('1')}, {"digest": d('2')}],
            "subject": {"digest": d('5')},
        });
        let found: Vec<String> = referenced_digests(manifest.to_string().as_bytes())
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(found, [d('c'), d('1'), d('2'), d('5')]);
        let index = serde_json::json!({"manifests": [{"digest": d('a')}, {"digest": "bogus"}]});
        assert_eq!(
            referenced_digests(index.to_string().as_bytes()),
            [digest('a')]
        );
        assert!(referenced_digests(b"not json").is_empty());
    }
}
