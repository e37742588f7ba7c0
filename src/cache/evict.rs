//! Choosing what to evict when the filesystem runs short of `cache.min_free` bytes or
//! `cache.min_free_inodes` inodes.
//!
//! `cache.max_size` is enforced by the index itself (an insert over the budget deletes the least
//! recently used files). Free space is different: other tenants of the
//! filesystem use it too, so it is checked from outside (`statvfs`) and, when short, the least
//! recently used objects go first, by the access time recorded in each file's mtime. The choice
//! is a pure function; the caller removes what it returns from the index, then from disk.

use std::path::Path;
use std::time::SystemTime;

use super::store::Kind;
use crate::oci::digest::Digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub digest: Digest,
    pub kind: Kind,
    pub size: u64,
    pub touched: SystemTime,
}

/// What eviction must free: bytes (`min_free`) and inodes (`min_free_inodes`: a filesystem
/// can run out of inodes with bytes to spare when it holds many small objects).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Need {
    pub bytes: u64,
    pub(crate) inodes: u64,
}

impl From<u64> for Need {
    fn from(bytes: u64) -> Need {
        Need { bytes, inodes: 0 }
    }
}

/// Inodes an object holds: its file, and a manifest's media-type sidecar.
fn inodes(kind: Kind) -> u64 {
    match kind {
        Kind::Blob => 1,
        Kind::Manifest => 2,
    }
}

/// The least recently touched candidates that together free at least `need` (all of them if
/// they do not).
pub(crate) fn choose_victims(
    mut candidates: Vec<Candidate>,
    need: impl Into<Need>,
) -> Vec<Candidate> {
    let need = need.into();
    candidates.sort_by(|a, b| a.touched.cmp(&b.touched).then_with(|| b.size.cmp(&a.size)));
    let mut freed = Need::default();
    candidates
        .into_iter()
        .take_while(|candidate| {
            let take = freed.bytes < need.bytes || freed.inodes < need.inodes;
            freed.bytes += candidate.size;
            freed.inodes += inodes(candidate.kind);
            take
        })
        .collect()
}

/// Bytes available to unprivileged users on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    free_space_and_inodes(dir).map(|(bytes, _)| bytes)
}

/// Bytes and inodes available to unprivileged users on the filesystem holding `dir`.
pub(crate) fn free_space_and_inodes(dir: &Path) -> std::io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok((stat.f_bavail.saturating_mul(stat.f_frsize), stat.f_favail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn candidate(n: u8, size: u64, age_secs: u64) -> Candidate {
        Candidate {
            digest: Digest::of(&[n]),
            kind: Kind::Blob,
            size,
            touched: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_secs),
        }
    }

    /// Candidates 1, 2, 3, ... of the given `(size, age_secs)`.
    fn numbered(specs: &[(u64, u64)]) -> Vec<Candidate> {
        (1..)
            .zip(specs)
            .map(|(n, &(size, age))| candidate(n, size, age))
            .collect()
    }

    #[test]
    fn the_oldest_go_first_until_enough_is_freed() {
        let candidates = numbered(&[(100, 10), (100, 30), (100, 20)]);
        let victims = choose_victims(candidates, 150);
        let chosen: Vec<u64> = victims.iter().map(|v| v.size).collect();
        assert_eq!(chosen.len(), 2);
        assert_eq!(victims[0].digest, Digest::of(&[2]));
        assert_eq!(victims[1].digest, Digest::of(&[3]));
        assert!(choose_victims(vec![candidate(1, 5, 1)], 0).is_empty());
    }

    #[test]
    fn short_of_inodes_evicts_by_count_even_with_bytes_to_spare() {
        let candidates = numbered(&[(10, 30), (10, 20), (10, 10)]);
        let need = Need {
            bytes: 0,
            inodes: 2,
        };
        let victims = choose_victims(candidates, need);
        let chosen: Vec<Digest> = victims.into_iter().map(|v| v.digest).collect();
        assert_eq!(chosen, [Digest::of(&[1]), Digest::of(&[2])]);
    }

    #[test]
    fn free_space_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
    }

    proptest! {
        /// The eviction invariant: what is chosen frees enough (or is everything), is the
        /// oldest, and nothing is chosen that was not needed.
        #[test]
        fn victims_are_the_oldest_and_just_enough(
            sizes in proptest::collection::vec((1u64..1000, 0u64..1000), 0..50),
            need in 0u64..20_000,
        ) {
            let candidates: Vec<Candidate> = sizes
                .iter()
                .enumerate()
                .map(|(i, (size, age))| candidate(i as u8, *size, *age))
                .collect();
            let total: u64 = candidates.iter().map(|c| c.size).sum();
            let victims = choose_victims(candidates.clone(), need);
            let freed: u64 = victims.iter().map(|v| v.size).sum();
            prop_assert!(freed >= need.min(total));
            if let Some(last) = victims.last() {
                prop_assert!(freed - last.size < need, "the last victim was needed");
                let newest_victim = victims.iter().map(|v| v.touched).max().unwrap();
                let kept_older = candidates
                    .iter()
                    .filter(|c| !victims.contains(c))
                    .any(|c| c.touched < newest_victim);
                prop_assert!(!kept_older, "an older object was kept while a newer one went");
            }
        }
    }
}
