//! Image references as people write them: `nginx`, `nginx:1.27`, `ghcr.io/org/app@sha256:..`,
//! pinned `nginx:1.27@sha256:..` (the digest wins), and the platform's `//image/NAME[:TAG]` and
//! `/org/ORG/image/NAME[:TAG]` forms. One type for `berth resolve`, `berth warm`, `berth load`
//! and the access report.
//!
//! Owns the syntax only: which part is the registry (Docker's rule: a first component with a
//! '.' or ':' or `localhost`), the repository name, the tag or digest. It does not decide which
//! upstream a registry is, nor Docker Hub's `library/` prefix: both depend on the configured
//! upstreams (`route`). Pure; a fuzz target feeds it hostile text.

use crate::oci::digest::Digest;
use crate::oci::name::{NameError, Reference, Repository, Tag};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("//image/ references need platform.org in the config")]
    NoOrg,
    #[error("{0:?} is a platform reference; only a config with [platform] resolves it")]
    NoPlatform(String),
    #[error("{0:?} is not an image reference")]
    Malformed(String),
}

/// The platform's registries, which `//image/NAME` (our org's) and `/org/ORG/image/NAME`
/// (ORG's) stand for: `ORG.<domain>`.
#[derive(Debug, Clone, Copy)]
pub struct Orgs<'a> {
    pub own: Option<&'a str>,
    pub domain: &'a str,
}

impl Orgs<'_> {
    fn registry(&self, org: &str) -> String {
        format!("{org}.{}", self.domain)
    }
}

/// A full image reference split into registry (if named), repository name and tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// As written; `None` means the target's default upstream.
    pub registry: Option<String>,
    pub name: Repository,
    /// What is fetched: the digest when one is given (it wins over a tag), else the tag.
    pub reference: Reference,
    /// The tag as written in a pinned `NAME:TAG@DIGEST` (the form Kubernetes manifests pin),
    /// kept for display only: the digest decides what is pulled.
    pub pinned_tag: Option<Tag>,
}

impl ImageRef {
    /// Parses `[registry/]name[:tag][@digest]` (tag `latest` when neither is given; the digest
    /// wins when both are) and, given `orgs`, the platform's `//image/NAME[:TAG][@DIGEST]` and
    /// `/org/ORG/image/NAME[:TAG][@DIGEST]` forms.
    pub fn parse(text: &str, orgs: Option<Orgs<'_>>) -> Result<ImageRef, ReferenceError> {
        let (registry, rest) = split_registry(text, orgs)?;
        let (rest, digest) = match rest.split_once('@') {
            Some((rest, digest)) => (rest, Some(Digest::parse(digest).map_err(NameError::from)?)),
            None => (rest, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(Tag::parse(tag)?)),
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::Malformed(text.to_string()));
        }
        let (reference, pinned_tag) = match (digest, tag) {
            (Some(digest), tag) => (Reference::Digest(digest), tag),
            (None, Some(tag)) => (Reference::Tag(tag), None),
            (None, None) => (Reference::Tag(Tag::parse("latest")?), None),
        };
        Ok(ImageRef {
            registry,
            name: Repository::parse(name)?,
            reference,
            pinned_tag,
        })
    }

    /// `reference` as written: `1.27`, `sha256:..` or, pinned, `1.27@sha256:..`.
    pub fn shown_reference(&self) -> String {
        match (&self.pinned_tag, &self.reference) {
            (Some(tag), Reference::Digest(digest)) => format!("{tag}@{digest}"),
            _ => self.reference.as_str().to_string(),
        }
    }

    /// The `<name>` of `/v2/<name>/...` on a berth: the registry host as a path prefix (its
    /// host-prefix routing), or the bare name for its default upstream.
    pub fn api_name(&self) -> String {
        match &self.registry {
            Some(registry) => format!("{registry}/{}", self.name),
            None => self.name.to_string(),
        }
    }
}

/// The registry a reference names, if any, and the rest of it.
fn split_registry<'t>(
    text: &'t str,
    orgs: Option<Orgs<'_>>,
) -> Result<(Option<String>, &'t str), ReferenceError> {
    let malformed = || ReferenceError::Malformed(text.to_string());
    let no_platform = || ReferenceError::NoPlatform(text.to_string());
    if let Some(rest) = text.strip_prefix("//image/") {
        let orgs = orgs.ok_or_else(no_platform)?;
        let own = orgs.own.ok_or(ReferenceError::NoOrg)?;
        return Ok((Some(orgs.registry(own)), rest));
    }
    if let Some(rest) = text.strip_prefix("/org/") {
        let (org, rest) = rest.split_once("/image/").ok_or_else(malformed)?;
        if org.is_empty() || org.contains('/') {
            return Err(malformed());
        }
        return Ok((Some(orgs.ok_or_else(no_platform)?.registry(org)), rest));
    }
    Ok(match text.split_once('/') {
        Some((first, rest)) if is_registry_host(first) => (Some(first.to_string()), rest),
        _ => (None, text),
    })
}

/// Whether the first component of a name is a registry host (Docker's reference grammar).
pub fn is_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORGS: Orgs<'static> = Orgs {
        own: Some("my-org"),
        domain: "registry.cpln.io",
    };

    fn image(text: &str) -> Result<(Option<String>, String, String), ReferenceError> {
        ImageRef::parse(text, Some(ORGS)).map(|i| {
            let reference = i.reference.as_str().to_string();
            (i.registry, i.name.to_string(), reference)
        })
    }

    #[test]
    fn image_references_in_every_form() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let some = |s: &str| Some(s.to_string());
        let own = "my-org.registry.cpln.io";
        let cases = [
            ("nginx", (None, "nginx", "latest".to_string())),
            ("nginx:1.27", (None, "nginx", "1.27".into())),
            (
                "library/nginx:latest",
                (None, "library/nginx", "latest".into()),
            ),
            (
                "docker.io/library/nginx:1",
                (some("docker.io"), "library/nginx", "1".into()),
            ),
            (
                "localhost:5000/app",
                (some("localhost:5000"), "app", "latest".into()),
            ),
            ("localhost/app:v2", (some("localhost"), "app", "v2".into())),
            (
                "ghcr.io/org/app:v1",
                (some("ghcr.io"), "org/app", "v1".into()),
            ),
            (
                &format!("ghcr.io/org/app@{digest}"),
                (some("ghcr.io"), "org/app", digest.clone()),
            ),
            (&format!("app:v1@{digest}"), (None, "app", digest.clone())),
            (
                &format!("nginx:1.27@{digest}"),
                (None, "nginx", digest.clone()),
            ),
            (
                &format!("localhost:5000/team/app:v2@{digest}"),
                (some("localhost:5000"), "team/app", digest.clone()),
            ),
            (
                &format!("//image/app:v1@{digest}"),
                (some(own), "app", digest.clone()),
            ),
            ("//image/app:v1", (some(own), "app", "v1".into())),
            ("//image/team/app", (some(own), "team/app", "latest".into())),
            (
                "/org/other/image/app:v3",
                (some("other.registry.cpln.io"), "app", "v3".into()),
            ),
            (
                "my-org.registry.cpln.io/app:v1",
                (some(own), "app", "v1".into()),
            ),
        ];
        for (text, (registry, name, reference)) in cases {
            assert_eq!(
                image(text),
                Ok((registry, name.to_string(), reference)),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_image_references_are_errors() {
        for text in [
            "",
            "/org//image/app",
            "/org/a/b/app",
            "nginx:",
            "nginx:-x",
            "app@sha256:12",
            "ghcr.io/:v1",
            "app@v1",
            "app:v1@",
            "app:@sha256:12",
            "Upper/case:v1",
            "app:-x@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(image(text).is_err(), "{text:?}");
        }
        let no_org = Orgs { own: None, ..ORGS };
        let refused = ImageRef::parse("//image/app", Some(no_org));
        assert_eq!(refused, Err(ReferenceError::NoOrg));
        for platform_form in ["//image/app", "/org/acme/image/app"] {
            let refused = ImageRef::parse(platform_form, None);
            assert!(
                matches!(refused, Err(ReferenceError::NoPlatform(_))),
                "{platform_form}"
            );
        }
    }

    #[test]
    fn a_pinned_reference_fetches_the_digest_and_keeps_the_tag_for_display() {
        let digest = format!("sha256:{}", "b".repeat(64));
        let image = ImageRef::parse(&format!("nginx:1.27@{digest}"), None).unwrap();
        assert_eq!(image.reference.as_str(), digest);
        assert_eq!(image.pinned_tag.as_ref().map(Tag::as_str), Some("1.27"));
        assert_eq!(image.shown_reference(), format!("1.27@{digest}"));
        let plain = ImageRef::parse("nginx:1.27", None).unwrap();
        assert_eq!(plain.pinned_tag, None);
        assert_eq!(plain.shown_reference(), "1.27");
    }

    #[test]
    fn references_become_host_prefixed_api_names() {
        let name = |text: &str| ImageRef::parse(text, Some(ORGS)).unwrap().api_name();
        assert_eq!(name("nginx:1.27"), "nginx");
        assert_eq!(name("ghcr.io/org/app:v1"), "ghcr.io/org/app");
        assert_eq!(name("127.0.0.1:5000/team/app"), "127.0.0.1:5000/team/app");
        assert_eq!(name("//image/app:v1"), "my-org.registry.cpln.io/app");
        // A port-like colon in an earlier component is not a tag.
        let pinned = format!("host:5000/app:1.27@sha256:{}", "a".repeat(64));
        assert_eq!(
            ImageRef::parse(&pinned, None).unwrap().api_name(),
            "host:5000/app"
        );
    }
}
