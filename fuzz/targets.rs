//! The bodies of berth's fuzz targets, one function per kind of attacker-controlled input.
//! Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`, nightly) and the bounded
//! proptest run in the test suite (`tests/fuzz.rs`, stable), so both exercise the same code.
//! Each takes arbitrary bytes and must not panic; where a parser accepts, the result is also
//! checked against an invariant of its type.
//!
//! A new target goes in three places: a function here, a `fuzz_targets/<name>.rs` binary with
//! its `[[bin]]` in `fuzz/Cargo.toml` and a seed corpus in `fuzz/corpus/<name>`, and a
//! proptest case in `tests/fuzz.rs`.

use std::sync::OnceLock;

use berth::config::Config;
use berth::oci::digest::Digest;
use berth::oci::manifest::Manifest;
use berth::oci::name::{split_api_path, ApiPath, Reference, Repository, Tag};
use berth::oci::range::{parse_range, RangeRequest};
use berth::oci::reference::{ImageRef, Orgs};
use berth::secrets::SecretKind;
use berth::upstream::challenge::{parse_challenges, token_url, Challenge};
use berth::upstream::Upstreams;

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The part of a request path after `/v2/`, then the name and reference it names.
pub fn api_path(data: &[u8]) {
    let Some(path) = text(data) else { return };
    let Some(parsed) = split_api_path(path) else {
        return;
    };
    let (name, reference) = match parsed {
        ApiPath::Manifest { name, reference } => (name, Some(reference)),
        ApiPath::Blob { name, digest } => (name, Some(digest)),
        ApiPath::Referrers { name, digest } => (name, Some(digest)),
        ApiPath::Tags { name } | ApiPath::BlobUpload { name } => (name, None),
        ApiPath::Catalog => return,
    };
    if let Ok(repository) = Repository::parse(name) {
        assert_eq!(repository.as_str(), name, "a valid name is kept as sent");
        assert!(
            !repository.as_str().contains(".."),
            "no traversal in a valid name"
        );
        assert!(!repository.as_str().contains('\0'));
    }
    if let Some(reference) = reference {
        if let Ok(parsed) = Reference::parse(reference) {
            assert!(
                !parsed.as_str().contains('/'),
                "a reference never holds a path"
            );
        }
    }
}

/// Names, tags and references alone, and whole image references (`berth resolve`, `berth
/// warm`, `berth load`, the access report): what parses re-parses from its API name and shown
/// reference to the same thing, so the name a pull sends is the name that was meant.
pub fn reference(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(reference) = Reference::parse(text) {
        let again = Reference::parse(reference.as_str()).expect("a parsed reference re-parses");
        assert_eq!(again.as_str(), reference.as_str());
    }
    if let Ok(tag) = Tag::parse(text) {
        assert!(tag.as_str().len() <= 128, "tags are at most 128 characters");
    }
    if let Ok(repository) = Repository::parse(text) {
        assert!(repository.components().all(|c| !c.is_empty()));
    }
    static UPSTREAMS: OnceLock<Upstreams> = OnceLock::new();
    let upstreams = UPSTREAMS.get_or_init(|| {
        Upstreams::new(&Config::embedded_default()).expect("the default config builds")
    });
    let _ = berth::route::resolve_image(upstreams, text);
    let orgs = Orgs {
        own: Some("my-org"),
        domain: "registry.cpln.io",
    };
    for orgs in [None, Some(orgs)] {
        let Ok(image) = ImageRef::parse(text, orgs) else {
            continue;
        };
        // A pinned tag is only kept next to the digest that wins over it.
        if image.pinned_tag.is_some() {
            assert!(image.reference.digest().is_some(), "{text:?}");
        }
        let name = image.api_name();
        let written = match (&image.pinned_tag, &image.reference) {
            (Some(tag), Reference::Digest(digest)) => format!("{name}:{tag}@{digest}"),
            (None, Reference::Digest(digest)) => format!("{name}@{digest}"),
            (_, Reference::Tag(tag)) => format!("{name}:{tag}"),
        };
        let again = ImageRef::parse(&written, None);
        assert_eq!(again.as_ref(), Ok(&image), "{text:?} as {written:?}");
    }
}

/// A manifest request's `Accept` header: its class and the canonical header sent upstream,
/// which must be a valid header value of the same class.
pub fn accept(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let class = berth::oci::accept::AcceptClass::parse(text);
    if let Some(value) = class.header_value() {
        let sent = value.to_str().expect("the canonical Accept is ASCII");
        assert_eq!(berth::oci::accept::AcceptClass::parse(sent), class);
    }
    let hex = class.to_hex();
    assert_eq!(berth::oci::accept::AcceptClass::from_hex(&hex), Some(class));
}

pub fn digest(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(digest) = Digest::parse(text) {
        assert_eq!(digest.as_str().len(), "sha256:".len() + 64);
        assert_eq!(Digest::parse(digest.as_str()).unwrap(), digest);
        assert!(digest.hex().bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

/// A registry name from a request (`?ns=` after percent-decoding, or a path's first
/// component): anything accepted is lower-case `[a-z0-9.-]` with an optional port, prints as
/// it parses, and matches a pattern only inside the pattern's own domain.
pub fn registry_host(data: &[u8]) {
    use berth::upstream::host::RegistryHost;
    use berth::upstream::pattern;
    let Some(text) = text(data) else { return };
    let Ok(host) = RegistryHost::parse(text) else {
        return;
    };
    let shown = host.as_str();
    assert!(shown
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b)));
    assert_eq!(RegistryHost::parse(shown).unwrap(), host);
    assert!(shown.len() <= 253 + 6);
    for (family, suffix) in [
        ("*.gcr.io", ".gcr.io"),
        ("*-docker.pkg.dev", "-docker.pkg.dev"),
    ] {
        if pattern::matches(family, &host) {
            assert!(
                host.port().is_none() && host.name().ends_with(suffix),
                "{shown}"
            );
        }
    }
}

/// A `Range` header against a blob size taken from the first 8 bytes.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let Some(header) = text(&data[8..]) else {
        return;
    };
    if let RangeRequest::Partial(range) = parse_range(Some(header), size) {
        assert!(
            range.start <= range.end && range.end < size,
            "{range:?} of {size}"
        );
        assert_eq!(range.len(), range.end - range.start + 1);
        let _ = range.content_range(size);
    }
}

pub fn www_authenticate(data: &[u8]) {
    let Some(header) = text(data) else { return };
    for challenge in parse_challenges(header) {
        if let Challenge::Bearer {
            realm,
            service,
            scope,
        } = challenge
        {
            assert!(!realm.is_empty(), "a Bearer challenge always has a realm");
            let scopes: Vec<String> = scope.into_iter().collect();
            let _ = token_url(&realm, service.as_deref(), &scopes);
        }
    }
}

/// A manifest document from an upstream or a target, read both ways (`oci::manifest`): the
/// media type the server serves it as becomes a header; the typed model (`berth warm`, `berth
/// load`, the holdings rule) round-trips, and holds only the content it lists.
pub fn manifest(data: &[u8]) {
    let media_type = berth::oci::manifest::embedded_media_type(data);
    // It becomes a Content-Type header: non-empty visible ASCII, never a control character.
    assert!(media_type.contains('/'), "{media_type:?}");
    assert!(
        media_type.bytes().all(|b| b.is_ascii_graphic()),
        "{media_type:?}"
    );
    if let Ok(manifest) = Manifest::parse(data) {
        // What the strict reading reads, the lenient one types, so the server can serve it.
        assert!(berth::oci::manifest::media_type(data).is_ok());
        let json = serde_json::to_vec(&manifest_value(&manifest)).expect("serialises");
        assert_eq!(Manifest::parse(&json).as_ref().ok(), Some(&manifest));
    }
    holdings(data);
}

fn manifest_value(manifest: &Manifest) -> serde_json::Value {
    match manifest {
        Manifest::Image(image) => serde_json::to_value(image),
        Manifest::Index(index) => serde_json::to_value(index),
        Manifest::Artifact(artifact) => serde_json::to_value(artifact),
    }
    .expect("a manifest serialises")
}

/// What a manifest fetched through a repository says the repository holds (the policy mode
/// serves those digests to it), checked against the document read as plain JSON.
fn holdings(data: &[u8]) {
    use berth::access::holdings::held_digests;
    let held = held_digests(data);
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(data) else {
        assert!(held.is_empty(), "an unparsable document holds nothing");
        return;
    };
    // Only config, layers, blobs and index children without `urls` are held; a subject
    // or a foreign layer never is, unless also listed as held content.
    let mut listed = Vec::new();
    let mut excluded = Vec::new();
    let descriptors = ["layers", "blobs", "manifests"]
        .iter()
        .flat_map(|field| document[*field].as_array().cloned().unwrap_or_default())
        .chain(std::iter::once(document["config"].clone()));
    for descriptor in descriptors {
        let Some(digest) = descriptor["digest"].as_str() else {
            continue;
        };
        match descriptor["urls"].is_null() {
            true => listed.push(digest.to_string()),
            false => excluded.push(digest.to_string()),
        }
    }
    if let Some(subject) = document["subject"]["digest"].as_str() {
        excluded.push(subject.to_string());
    }
    for digest in &held {
        let digest = digest.as_str().to_string();
        assert!(listed.contains(&digest), "{digest} held but not listed");
    }
    for digest in excluded.iter().filter(|d| !listed.contains(d)) {
        assert!(
            !held.iter().any(|h| h.as_str() == digest),
            "{digest} is a subject or foreign layer"
        );
    }
}

/// An origins sidecar read from the cache directory (`cache::origins`): whatever decodes
/// encodes back to itself.
pub fn origin(data: &[u8]) {
    if let Some(origin) = berth::cache::Origin::decode(data) {
        let again = berth::cache::Origin::decode(origin.encode().as_bytes());
        assert_eq!(again.as_ref(), Some(&origin), "a sidecar round-trips");
    }
}

/// A secret file read as each of the three secret types.
pub fn secret_json(data: &[u8]) {
    for kind in [SecretKind::Docker, SecretKind::Ecr, SecretKind::Gcp] {
        if let Err(err) = berth::secrets::check_secret_file(kind, data) {
            let _ = err.to_string();
        }
    }
}

/// A policy file and a principals file of the access control (the platform's JSON forms).
pub fn policy_json(data: &[u8]) {
    for org in [None, Some("my-org")] {
        if let Err(err) = berth::access::policy::parse_file(data, "fuzz", org) {
            let _ = err.to_string();
        }
        if let Err(err) = berth::access::principals::Principals::parse(data, org) {
            let _ = err.to_string();
        }
    }
}

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("api_path", api_path),
    ("reference", reference),
    ("digest", digest),
    ("registry_host", registry_host),
    ("range", range),
    ("www_authenticate", www_authenticate),
    ("manifest", manifest),
    ("origin", origin),
    ("secret_json", secret_json),
    ("policy_json", policy_json),
    ("accept", accept),
];
