//! The rule of the policy access mode for cached content: a digest is served for repository R
//! on upstream U only when U served those bytes (the object's provenance) AND R is known to hold
//! the digest on U. Otherwise U must show it, through R, before anything is served.
//!
//! The cache is content-addressed: one file per digest, whichever repository and upstream it
//! came from. Without the rule, anyone allowed to pull one repository could read another's
//! blobs by guessing or learning their digests; and since some upstreams are run by others (an
//! external registry on a `public` upstream, another org's registry), the rule must hold
//! against a hostile upstream and a crafted manifest, not only against a curious client:
//! - R is known to hold a digest on U when it was fetched through R from U, when it is listed
//!   by a manifest fetched through R on U (config, layers without `urls`, index children:
//!   a registry accepts a manifest only when these exist in the same repository; never the
//!   `subject`, which registries accept dangling, nor foreign layers, which live elsewhere),
//!   or when U confirmed it for R with a HEAD;
//! - a HEAD (or a tag's `Docker-Content-Digest`) from U is believed only when U is in the
//!   object's provenance: an upstream that never served the bytes could answer 200 for any
//!   digest. Any other upstream has to serve the bytes through R, verified against the digest.
//!
//! The facts (provenance and holders per digest, persisted with the cache) are
//! `cache::origins`; this file holds the decision (`decide`, pure), the manifest reader (what
//! a manifest says R holds) and the single flights of confirmations and verifications.

use sha2::{Digest as _, Sha256};

use crate::cache::Origin;
use crate::flight::Flights;
use crate::oci::digest::Digest;
use crate::oci::manifest::Manifest;
use crate::oci::name::Repository;

/// What must happen before a digest may be served for repository R on upstream U.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// U served these bytes and R is known to hold them there: serve from the cache, or from
    /// any fill (its bytes are verified against the same digest).
    Serve,
    /// U served the bytes (or is filling them now) but R's holding is unknown: U must confirm
    /// it for R (HEAD) first.
    Confirm,
    /// The bytes are cached, or being filled, from other upstreams only: U must serve them
    /// through R, verified, before they are served for R.
    Verify,
    /// Nothing is cached or known: fetch through R from U, as any miss.
    Fill,
}

/// The rule, over the facts. `cached`: the object is in the cache; `filling`: the upstream of
/// a fill of it under way, whose bytes count as U's only when U is that upstream.
pub fn decide(
    origin: &Origin,
    upstream: &str,
    repository: &Repository,
    cached: bool,
    filling: Option<&str>,
) -> Decision {
    let served = origin.served_by(upstream) || filling == Some(upstream);
    match (served, origin.held_by(upstream, repository)) {
        (true, true) => Decision::Serve,
        (true, false) => Decision::Confirm,
        (false, _) if cached || filling.is_some() => Decision::Verify,
        (false, _) => Decision::Fill,
    }
}

/// A collision-resistant key for (upstream, repository, digest); truncating SHA-256 to 128 bits
/// keeps collisions out of reach while the key stays small.
pub fn key(upstream: &str, repository: &Repository, digest: &Digest) -> u128 {
    let mut hasher = Sha256::new();
    for part in [upstream, repository.as_str(), digest.as_str()] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let hash = hasher.finalize();
    u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"))
}

/// The asking side: concurrent confirmations (HEAD) and verifications (GET and hash) of the
/// same (upstream, repository, digest) share one upstream request each.
#[derive(Default)]
pub struct Holdings {
    pub(crate) confirmations: Flights<u128, Result<(), crate::error::ApiError>>,
    pub(crate) verifications: Flights<u128, Result<(), crate::error::ApiError>>,
}

impl Holdings {
    pub fn new() -> Holdings {
        Holdings::default()
    }
}

/// The digests a manifest fetched through R says R holds: config, layers and artifact `blobs`
/// without `urls`, index children. Never the subject. Documents the manifest model refuses
/// (`oci::manifest::Manifest::parse`) hold nothing.
pub fn held_digests(manifest: &[u8]) -> Vec<Digest> {
    let Ok(manifest) = Manifest::parse(manifest) else {
        return Vec::new();
    };
    manifest
        .contents()
        .filter(|descriptor| descriptor.urls.is_none())
        .map(|descriptor| descriptor.digest.clone())
        .collect()
}

/// A manifest's `held_digests`, read at most once however many ask (the holdings rule and
/// prefetch both want them for the same request), and only when one does.
pub struct Listed<'a> {
    bytes: &'a [u8],
    digests: std::sync::OnceLock<Vec<Digest>>,
}

impl<'a> Listed<'a> {
    pub fn new(bytes: &'a [u8]) -> Listed<'a> {
        Listed {
            bytes,
            digests: std::sync::OnceLock::new(),
        }
    }

    pub fn digests(&self) -> &[Digest] {
        self.digests.get_or_init(|| held_digests(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn d(c: char) -> String {
        digest(c).to_string()
    }

    fn origin(from: &[&str], held: &[(&str, &str)]) -> Origin {
        let mut text = String::from("berth-origin 1\n");
        for u in from {
            text.push_str(&format!("from {u}\n"));
        }
        for (u, r) in held {
            text.push_str(&format!("held {u} {r}\n"));
        }
        let sum = hex::encode(Sha256::digest(text.as_bytes()));
        Origin::decode(format!("{text}sum {sum}\n").as_bytes()).unwrap()
    }

    #[test]
    fn content_is_served_only_from_its_provenance_to_its_holders() {
        let app = Repository::parse("team/app").unwrap();
        let evil = Repository::parse("evil/app").unwrap();
        let known = origin(&["victim.io"], &[("victim.io", "team/app")]);
        assert_eq!(
            decide(&known, "victim.io", &app, true, None),
            Decision::Serve
        );
        // Another repository on the same upstream: that upstream may confirm it.
        assert_eq!(
            decide(&known, "victim.io", &evil, true, None),
            Decision::Confirm
        );
        // Another upstream never confirms by HEAD, even for a repository it lists as holder.
        let listed = origin(&["victim.io"], &[("evil.io", "evil/app")]);
        assert_eq!(
            decide(&listed, "evil.io", &evil, true, None),
            Decision::Verify
        );
        assert_eq!(
            decide(&listed, "evil.io", &evil, false, Some("victim.io")),
            Decision::Verify
        );
        // A fill under way counts for its own upstream only.
        let empty = Origin::default();
        assert_eq!(
            decide(&empty, "victim.io", &app, false, Some("victim.io")),
            Decision::Confirm
        );
        assert_eq!(
            decide(&empty, "evil.io", &evil, false, None),
            Decision::Fill
        );
    }

    #[test]
    fn manifests_hold_their_content_but_not_their_subject_or_foreign_layers() {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": d('c'), "size": 1},
            "layers": [
                {"digest": d('1'), "size": 1},
                {"digest": d('2'), "size": 1, "urls": ["https://example.com/layer"]},
                {"digest": d('3'), "size": 1},
            ],
            "subject": {"digest": d('5'), "size": 1},
        });
        assert_eq!(
            held_digests(manifest.to_string().as_bytes()),
            [digest('c'), digest('1'), digest('3')]
        );
        let index = serde_json::json!({"manifests": [{"digest": d('a'), "size": 1}]});
        assert_eq!(held_digests(index.to_string().as_bytes()), [digest('a')]);
        let artifact = serde_json::json!({
            "mediaType": "application/vnd.oci.artifact.manifest.v1+json",
            "blobs": [{"digest": d('b'), "size": 1}],
            "subject": {"digest": d('5'), "size": 1},
        });
        assert_eq!(held_digests(artifact.to_string().as_bytes()), [digest('b')]);
        // `urls: null` names no other place: the layer is the repository's.
        let null_urls = format!(
            r#"{{"config":{{"digest":"{}","size":1}},"layers":[{{"digest":"{}","size":1,"urls":null}}]}}"#,
            d('c'),
            d('7')
        );
        assert_eq!(held_digests(null_urls.as_bytes()).len(), 2);
    }

    #[test]
    fn a_document_with_a_bogus_descriptor_holds_nothing() {
        let bogus_digest = serde_json::json!({"manifests": [{"digest": d('a'), "size": 1}, {"digest": "bogus", "size": 1}]});
        let no_size = serde_json::json!({"config": {"digest": d('c')}, "layers": []});
        for document in [
            bogus_digest.to_string(),
            no_size.to_string(),
            "not json".into(),
        ] {
            assert!(held_digests(document.as_bytes()).is_empty(), "{document}");
        }
    }
}
