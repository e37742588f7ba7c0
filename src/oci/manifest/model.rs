//! The typed manifest documents: descriptors, platforms, image manifests, indexes (and Docker
//! manifest lists) and the withdrawn OCI artifact manifest, as serde structs over the fields
//! berth reads (image-spec `descriptor.md`, `manifest.md`, `image-index.md`; Docker's
//! schema 2 uses the same field names). Fields berth does not read are ignored, not kept:
//! manifests are served as the upstream's exact bytes, never re-serialised.
//!
//! Once deserialised, a descriptor's digest is a valid `Digest` and its size a number: a
//! document with a malformed one is refused whole (`Manifest::parse`, in `mod.rs`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;

/// A reference to content: what it is, its digest and its exact size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Optional in Docker's older manifests; a fetch never trusts it anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub digest: Digest,
    /// Bounds every read of the content: a body longer than this is cut off.
    pub size: u64,
    /// Foreign layers (Windows base images): fetched from these URLs, not the repository, so
    /// a repository listing one does not hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// On index children: the platform the child image is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

/// An image platform: in an index child, or wanted on the command line as
/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Windows images name the build they need.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(text: &str) -> Result<Platform, PlatformError> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
        let platform = |os: &str, architecture: &str, variant: Option<&str>| Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
            os_features: None,
        };
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(platform(os, arch, None)),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => {
                Ok(platform(os, arch, Some(variant)))
            }
            _ => Err(PlatformError(text.to_string())),
        }
    }
}

/// `os/architecture[/variant]`.
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a platform like linux/amd64 or linux/arm64/v8")]
pub struct PlatformError(String);

/// An index has no image for the requested platform.
#[derive(Debug, thiserror::Error)]
#[error("no {wanted} image in the index (it has: {available})")]
pub struct NoPlatform {
    /// `os/architecture[/variant]`.
    pub wanted: String,
    pub available: String,
}

/// One image: its config and its layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// What this manifest is about (a signature's image). Registries accept it dangling, so
    /// it says nothing about what the repository holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
}

/// An OCI image index or a Docker manifest list: one child manifest per platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
}

impl ImageIndex {
    /// The child for `wanted`. An entry without a variant matches a request with one (as
    /// containerd does for `linux/arm64/v8` against plain `linux/arm64`), and a request
    /// without a variant takes the first entry of the os and architecture; an exact variant
    /// match wins over both.
    pub fn select(&self, wanted: &Platform) -> Result<&Descriptor, NoPlatform> {
        let matches = |d: &&Descriptor| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == wanted.os
                    && p.architecture == wanted.architecture
                    && match (&wanted.variant, &p.variant) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    }
            })
        };
        let exact = |d: &&Descriptor| {
            matches(d) && d.platform.as_ref().map(|p| &p.variant) == Some(&wanted.variant)
        };
        let children = &self.manifests;
        let available = || {
            let platforms = children.iter().filter_map(|d| d.platform.as_ref());
            platforms
                .map(Platform::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        children
            .iter()
            .find(exact)
            .or_else(|| children.iter().find(matches))
            .ok_or_else(|| NoPlatform {
                wanted: wanted.to_string(),
                available: available(),
            })
    }
}

/// The OCI artifact manifest of image-spec 1.1's release candidates, withdrawn before 1.1
/// but still stored by registries that took it: `blobs` instead of a config and layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactManifest {
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub blobs: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(n: char, platform: &str) -> Descriptor {
        let mut parts = platform.split('/');
        let (os, architecture) = (parts.next().unwrap(), parts.next().unwrap());
        Descriptor {
            media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
            digest: Digest::parse(&format!("sha256:{}", n.to_string().repeat(64))).unwrap(),
            size: 10,
            urls: None,
            platform: Some(Platform {
                os: os.into(),
                architecture: architecture.into(),
                variant: parts.next().map(str::to_string),
                os_version: None,
                os_features: None,
            }),
            artifact_type: None,
        }
    }

    fn pick(wanted: &str) -> Result<char, String> {
        let index = ImageIndex {
            media_type: None,
            artifact_type: None,
            manifests: vec![
                child('1', "linux/amd64"),
                child('2', "linux/arm/v7"),
                child('3', "linux/arm64/v8"),
                child('4', "unknown/unknown"),
            ],
            subject: None,
        };
        index
            .select(&wanted.parse().unwrap())
            .map(|d| d.digest.as_str().chars().last().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn selects_the_requested_platform_of_an_index() {
        assert_eq!(pick("linux/amd64"), Ok('1'));
        assert_eq!(pick("linux/arm/v7"), Ok('2'));
        assert_eq!(pick("linux/arm64"), Ok('3'));
        assert_eq!(pick("linux/arm64/v8"), Ok('3'));
        let missing = pick("windows/amd64").unwrap_err();
        assert!(missing.contains("linux/arm/v7"), "{missing}");
        assert!(pick("linux/arm/v6").is_err());
    }

    #[test]
    fn an_entry_without_a_variant_serves_a_request_with_one_unless_one_matches_exactly() {
        let index = ImageIndex {
            media_type: None,
            artifact_type: None,
            manifests: vec![child('1', "linux/arm64"), child('2', "linux/arm64/v8")],
            subject: None,
        };
        let wanted = |text: &str| text.parse::<Platform>().unwrap();
        let chosen = |text: &str| index.select(&wanted(text)).unwrap().digest.clone();
        assert_eq!(chosen("linux/arm64/v8"), index.manifests[1].digest);
        assert_eq!(chosen("linux/arm64"), index.manifests[0].digest);
        assert_eq!(chosen("linux/arm64/v9"), index.manifests[0].digest);
    }

    #[test]
    fn platforms_parse_with_an_optional_variant() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }
}
