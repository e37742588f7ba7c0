//! Repository names, tags and references as the OCI distribution spec
//! defines them, plus the splitter that finds them in a `/v2/` API path.
//!
//! Owns: the `Repository`, `Tag` and `Reference` newtypes (hand-written
//! matchers for the spec's regular expressions, so there is no regex engine
//! on the request path) and `split_api_path`, which only cuts a path into
//! its raw parts.
//!
//! Does not own: registry hosts or ports in a name (`docker.io/...`,
//! `127.0.0.1:5000/...`) or Docker Hub's implicit `library/` prefix; routing
//! strips or adds those before calling `Repository::parse` /
//! `Repository::with_prefix`. Nor query strings or percent-decoding: the
//! caller passes the bare path, and a legitimate name never needs escaping.

use std::fmt;

use super::digest::{Digest, DigestError};

/// The spec caps the whole name (not each component) at 255 characters,
/// matching what Docker Hub and distribution enforce.
const MAX_REPOSITORY_LEN: usize = 255;

/// One leading character plus up to 127 more.
const MAX_TAG_LEN: usize = 128;

/// A validated repository name such as `library/nginx`: `/`-separated
/// components, each `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

/// A validated tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid repository name {0:?}")]
    Repository(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl Repository {
    pub fn parse(s: &str) -> Result<Repository, NameError> {
        if s.len() <= MAX_REPOSITORY_LEN && s.split('/').all(is_path_component) {
            Ok(Repository(s.to_owned()))
        } else {
            Err(NameError::Repository(s.to_owned()))
        }
    }

    /// `prefix/rest`, e.g. `library` + `nginx` for Docker Hub's official
    /// images. The prefix may itself hold several components; the result is
    /// re-checked as a whole because the joined name can exceed the length
    /// limit even when both halves are valid.
    pub(crate) fn with_prefix(prefix: &str, rest: &Repository) -> Result<Repository, NameError> {
        Repository::parse(&format!("{prefix}/{}", rest.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

/// One path component: alphanumeric runs joined by exactly one of `.`, `_`,
/// `__` or a run of `-`. Rejects empty input, so splitting on `/` also
/// rejects leading, trailing and doubled slashes.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        let run_start = i;
        while i < b.len() && matches!(b[i], b'a'..=b'z' | b'0'..=b'9') {
            i += 1;
        }
        if i == run_start {
            // Empty component, or a separator at the start, at the end, or
            // straight after another separator.
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, NameError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if first_ok && rest_ok && b.len() <= MAX_TAG_LEN {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::Tag(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Reference {
    /// A tag can never contain `:`, and a digest always does, so the colon
    /// alone decides which grammar applies; a malformed digest is reported
    /// as a digest error rather than as a bad tag.
    pub fn parse(s: &str) -> Result<Reference, NameError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }

    /// The tag text or the full digest string.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) => t.as_str(),
            Reference::Digest(d) => d.as_str(),
        }
    }

    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }

    pub fn tag(&self) -> Option<&Tag> {
        match self {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

impl From<Tag> for Reference {
    fn from(t: Tag) -> Self {
        Reference::Tag(t)
    }
}

impl From<Digest> for Reference {
    fn from(d: Digest) -> Self {
        Reference::Digest(d)
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        /// Bare text, like `Digest`, so tracing fields read naturally.
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(Repository, Tag, Reference);

/// A `/v2/` endpoint, with the name and reference still raw text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiPath<'a> {
    /// `<name>/manifests/<reference>`
    Manifest { name: &'a str, reference: &'a str },
    /// `<name>/blobs/<digest>`
    Blob { name: &'a str, digest: &'a str },
    /// `<name>/tags/list`
    Tags { name: &'a str },
    /// `<name>/referrers/<digest>`
    Referrers { name: &'a str, digest: &'a str },
    /// `<name>/blobs/uploads`, `<name>/blobs/uploads/` or
    /// `<name>/blobs/uploads/<id>`: push endpoints, recognised only so they
    /// can be refused clearly.
    BlobUpload { name: &'a str },
    /// `_catalog`
    Catalog,
}

/// Splits a registry API path, given without the leading `/v2/` and without
/// any query string.
///
/// Works from the right: a reference, digest or upload id never contains
/// `/`, so the last one or two segments name the endpoint and everything
/// before them is the repository. That is the same as splitting on the last
/// `/manifests/`, `/blobs/`, ... marker, and it keeps names whose components
/// are themselves `blobs`, `manifests`, `tags` etc. working
/// (`a/blobs/b/blobs/sha256:..` is a blob of repository `a/blobs/b`).
///
/// Returns `None` for `""` (the `/v2/` version check, which the caller
/// handles), an empty name or reference, or anything else unrecognised.
pub fn split_api_path(rest: &str) -> Option<ApiPath<'_>> {
    if rest == "_catalog" {
        return Some(ApiPath::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return non_empty(name).map(|name| ApiPath::Tags { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    let name = non_empty(name)?;
    match kind {
        // `uploads` is never a digest, so a slash-less `blobs/uploads` (which
        // distribution also accepts for POST) is an upload, not a blob.
        "blobs" if last == "uploads" => Some(ApiPath::BlobUpload { name }),
        "blobs" => non_empty(last).map(|digest| ApiPath::Blob { name, digest }),
        "manifests" => non_empty(last).map(|reference| ApiPath::Manifest { name, reference }),
        "referrers" => non_empty(last).map(|digest| ApiPath::Referrers { name, digest }),
        "uploads" => {
            // `<name>/blobs/uploads/` or `<name>/blobs/uploads/<id>`: the
            // upload id (possibly empty) is `last`; `blobs` is one further up.
            let (name, blobs) = name.rsplit_once('/')?;
            (blobs == "blobs")
                .then_some(name)
                .and_then(non_empty)
                .map(|name| ApiPath::BlobUpload { name })
        }
        _ => None,
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn accepts_spec_repository_names() {
        let max = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        for ok in [
            "a",
            "nginx",
            "library/nginx",
            "a/b/c/d/e",
            "my-app",
            "my--app",
            "my---app",
            "my_app",
            "my__app",
            "my.app",
            "a.b-c_d__e",
            "0",
            "123/456",
            "blobs/manifests/tags/list",
            &max,
        ] {
            let r = Repository::parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
            assert_eq!(r.as_str(), ok);
            assert_eq!(r.to_string(), ok);
        }
    }

    /// Each of `bad` is refused with the error `refusal` makes of that very input.
    fn assert_refused<T: std::fmt::Debug + PartialEq>(
        parse: fn(&str) -> Result<T, NameError>,
        refusal: fn(String) -> NameError,
        bad: &[&str],
    ) {
        for bad in bad {
            assert_eq!(parse(bad), Err(refusal(bad.to_string())), "{bad:?}");
        }
    }

    #[test]
    fn rejects_malformed_repository_names() {
        let too_long = format!("{}/{}", "a".repeat(128), "b".repeat(127));
        let bad = [
            "",
            "/",
            "/a",
            "a/",
            "a//b",
            "A",
            "library/Nginx",
            "a..b",
            "a.",
            ".a",
            "a___b",
            "a.-b",
            "a-.b",
            "a_-b",
            "-a",
            "a-",
            "_a",
            "a b",
            "a\0b",
            "café",
            "a:b",
            "docker.io:443/a",
            "..",
            "a/../b",
            "a/./b",
            &too_long,
        ];
        assert_refused(Repository::parse, NameError::Repository, &bad);
    }

    #[test]
    fn components_and_prefix() {
        let r = Repository::parse("a/b.c/d").unwrap();
        assert_eq!(r.components().collect::<Vec<_>>(), ["a", "b.c", "d"]);
        let nginx = Repository::parse("nginx").unwrap();
        assert_eq!(
            Repository::with_prefix("library", &nginx).unwrap().as_str(),
            "library/nginx"
        );
        assert_eq!(
            Repository::with_prefix("mirror/library", &nginx)
                .unwrap()
                .as_str(),
            "mirror/library/nginx"
        );
        for bad_prefix in ["", "Library", "a/", "/"] {
            assert!(
                Repository::with_prefix(bad_prefix, &nginx).is_err(),
                "{bad_prefix:?}"
            );
        }
        let long = Repository::parse(&"a".repeat(250)).unwrap();
        assert!(Repository::with_prefix("library", &long).is_err());
    }

    #[test]
    fn tags() {
        let max = format!("a{}", "b".repeat(127));
        for ok in ["latest", "v1.2.3", "_x", "1", "A-b_c.D", "__", &max] {
            assert_eq!(Tag::parse(ok).unwrap().as_str(), ok);
        }
        let over = format!("{max}c");
        let bad = [
            "", ".x", "-x", "a:b", "a/b", "a b", "é", "a\0", "a+b", &over,
        ];
        assert_refused(Tag::parse, NameError::Tag, &bad);
    }

    #[test]
    fn references_choose_grammar_by_colon() {
        let t = Reference::parse("latest").unwrap();
        assert_eq!(t.as_str(), "latest");
        assert_eq!(t.digest(), None);
        assert_eq!(t.tag().map(Tag::as_str), Some("latest"));

        let d = Reference::parse(D).unwrap();
        assert_eq!(d.as_str(), D);
        assert_eq!(d.digest().map(Digest::as_str), Some(D));
        assert_eq!(d.to_string(), D);

        assert!(matches!(
            Reference::parse("sha256:abc"),
            Err(NameError::Digest(DigestError::Invalid(_)))
        ));
        let sha512 = format!("sha512:{}", "0".repeat(128));
        assert!(matches!(
            Reference::parse(&sha512),
            Err(NameError::Digest(DigestError::Unsupported(_)))
        ));
        assert_eq!(Reference::parse(".bad"), Err(NameError::Tag(".bad".into())));
        // A transparent digest error keeps the digest's own message.
        assert_eq!(
            Reference::parse(":").unwrap_err().to_string(),
            r#"invalid digest ":""#
        );
    }

    #[test]
    fn splits_api_paths() {
        use ApiPath::*;
        let blob_d = format!("a/blobs/{D}");
        let hub_blob = format!("docker.io/library/nginx/blobs/{D}");
        let nested = format!("a/blobs/b/blobs/{D}");
        let referrers = format!("a/referrers/{D}");
        let cases: Vec<(&str, Option<ApiPath>)> = vec![
            (
                "library/nginx/manifests/latest",
                Some(Manifest {
                    name: "library/nginx",
                    reference: "latest",
                }),
            ),
            (
                "127.0.0.1:5000/x/manifests/v1",
                Some(Manifest {
                    name: "127.0.0.1:5000/x",
                    reference: "v1",
                }),
            ),
            (
                &blob_d,
                Some(Blob {
                    name: "a",
                    digest: D,
                }),
            ),
            (
                &hub_blob,
                Some(Blob {
                    name: "docker.io/library/nginx",
                    digest: D,
                }),
            ),
            (
                &nested,
                Some(Blob {
                    name: "a/blobs/b",
                    digest: D,
                }),
            ),
            (
                "a/manifests/b/blobs/x",
                Some(Blob {
                    name: "a/manifests/b",
                    digest: "x",
                }),
            ),
            (
                "a/blobs/b/manifests/x",
                Some(Manifest {
                    name: "a/blobs/b",
                    reference: "x",
                }),
            ),
            ("a/b/tags/list", Some(Tags { name: "a/b" })),
            (
                "a/tags/list/tags/list",
                Some(Tags {
                    name: "a/tags/list",
                }),
            ),
            (
                "a/manifests/tags/list",
                Some(Tags {
                    name: "a/manifests",
                }),
            ),
            (
                &referrers,
                Some(Referrers {
                    name: "a",
                    digest: D,
                }),
            ),
            ("a/blobs/uploads/", Some(BlobUpload { name: "a" })),
            ("a/blobs/uploads", Some(BlobUpload { name: "a" })),
            ("a/blobs/uploads/3f1c-uuid", Some(BlobUpload { name: "a" })),
            (
                "a/blobs/blobs/uploads/",
                Some(BlobUpload { name: "a/blobs" }),
            ),
            (
                "a/blobs/uploads/blobs/x",
                Some(Blob {
                    name: "a/blobs/uploads",
                    digest: "x",
                }),
            ),
            ("_catalog", Some(Catalog)),
            ("", None),
            ("/", None),
            ("_catalog/", None),
            ("a", None),
            ("a/b", None),
            ("manifests/latest", None),
            ("/manifests/latest", None),
            ("/tags/list", None),
            ("tags/list", None),
            ("a/manifests/", None),
            ("a/blobs/", None),
            ("a/referrers/", None),
            ("a/manifests/latest/", None),
            ("a/manifests/latest/extra", None),
            ("a/tags/list/", None),
            ("a/tags/listx", None),
            ("a/tags/", None),
            ("a/uploads/x", None),
            ("/blobs/uploads/", None),
            ("blobs/uploads/", None),
            ("a/blobs/uploads/x/y", None),
            ("a/other/x", None),
        ];
        for (input, want) in cases {
            assert_eq!(split_api_path(input), want, "{input:?}");
        }
    }

    /// Repository names that lean on the endpoint keywords as components.
    fn repository() -> impl Strategy<Value = String> {
        let component = prop_oneof![
            "[a-z0-9]{1,4}((\\.|_|__|-{1,2})[a-z0-9]{1,3}){0,2}",
            Just("blobs".to_owned()),
            Just("manifests".to_owned()),
            Just("tags".to_owned()),
            Just("list".to_owned()),
            Just("uploads".to_owned()),
            Just("referrers".to_owned()),
        ];
        proptest::collection::vec(component, 1..5).prop_map(|c| c.join("/"))
    }

    fn digest() -> impl Strategy<Value = String> {
        any::<[u8; 32]>().prop_map(|h| Digest::from_sha256(h).to_string())
    }

    fn reference() -> impl Strategy<Value = String> {
        prop_oneof!["[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", digest()]
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = Repository::parse(&s);
            let _ = Tag::parse(&s);
            let _ = Reference::parse(&s);
            let _ = split_api_path(&s);
        }

        #[test]
        fn split_never_panics_on_path_like_input(
            s in "(/|a|blobs|manifests|uploads|tags|list|referrers|_catalog){0,8}"
        ) {
            let _ = split_api_path(&s);
        }

        #[test]
        fn generated_names_parse_and_display_back(name in repository()) {
            let r = Repository::parse(&name).unwrap();
            prop_assert_eq!(r.to_string(), name);
        }

        #[test]
        fn split_recovers_the_parts_it_was_built_from(
            name in repository(),
            reference in reference(),
            digest in digest(),
            upload_id in "[a-z0-9-]{0,36}",
        ) {
            let n = name.as_str();
            let manifest = format!("{n}/manifests/{reference}");
            prop_assert_eq!(
                split_api_path(&manifest),
                Some(ApiPath::Manifest { name: n, reference: &reference })
            );
            let blob = format!("{n}/blobs/{digest}");
            prop_assert_eq!(split_api_path(&blob), Some(ApiPath::Blob { name: n, digest: &digest }));
            let referrers = format!("{n}/referrers/{digest}");
            prop_assert_eq!(
                split_api_path(&referrers),
                Some(ApiPath::Referrers { name: n, digest: &digest })
            );
            let tags = format!("{n}/tags/list");
            prop_assert_eq!(split_api_path(&tags), Some(ApiPath::Tags { name: n }));
            let upload = format!("{n}/blobs/uploads/{upload_id}");
            prop_assert_eq!(split_api_path(&upload), Some(ApiPath::BlobUpload { name: n }));
        }
    }
}
