//! The pure half of `berth warm`: image platforms, manifest documents, and the choice of what to
//! fetch (which child of an index, which path on the target). No I/O; `warm` does the fetching.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::route::ImageRef;

pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// An index has no image for the requested platform.
#[derive(Debug, thiserror::Error)]
#[error("no {wanted} image in the index (it has: {available})")]
pub struct NoPlatform {
    pub wanted: Platform,
    pub available: String,
}

/// An image platform, `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(text: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(format!(
                "{text:?} is not a platform like linux/amd64 or linux/arm64/v8"
            )),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// A content descriptor as manifests list them.
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

#[derive(Deserialize)]
struct ManifestJson {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// What a manifest document is: an index of per-platform images, or one image.
#[derive(Debug)]
pub enum Parsed {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Classifies a manifest by its media type (the response's, else the document's), falling
/// back to its shape for registries that send neither.
pub fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, String> {
    let json: ManifestJson =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    let media_type = content_type
        .filter(|t| !t.is_empty() && *t != "application/json")
        .map(str::to_string)
        .or(json.media_type);
    let is_index = match media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) if other.contains("manifest.v1") => {
            return Err(format!("{other} (Docker schema 1) is not supported"))
        }
        _ => json.manifests.is_some(),
    };
    if is_index {
        let manifests = json.manifests.ok_or("an index without `manifests`")?;
        return Ok(Parsed::Index(manifests));
    }
    match (json.config, json.layers) {
        (Some(config), Some(layers)) => Ok(Parsed::Image { config, layers }),
        _ => Err("an image manifest needs `config` and `layers`".into()),
    }
}

/// The index entry for `wanted`. An entry without a variant matches a request with one (as
/// containerd does for `linux/arm64/v8` against plain `linux/arm64`), and a request without a
/// variant takes the first entry of the os and architecture.
pub fn select_platform<'a>(
    manifests: &'a [Descriptor],
    wanted: &Platform,
) -> Result<&'a Descriptor, NoPlatform> {
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
    let exact = manifests
        .iter()
        .find(|d| matches(d) && d.platform.as_ref().map(|p| &p.variant) == Some(&wanted.variant));
    exact
        .or_else(|| manifests.iter().find(matches))
        .ok_or_else(|| NoPlatform {
            wanted: wanted.clone(),
            available: manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The `<name>` of `/v2/<name>/...` on the target for an image reference: the registry host
/// as a path prefix (berth's host-prefix routing), or the bare name for the default upstream.
pub fn api_name(image: &ImageRef) -> String {
    match &image.registry {
        Some(registry) => format!("{registry}/{}", image.name),
        None => image.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlatformConfig;
    use crate::route::parse_image_reference;

    fn index() -> Vec<Descriptor> {
        let json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "1".repeat(64)), "size": 10,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "2".repeat(64)), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "3".repeat(64)), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "4".repeat(64)), "size": 10,
                 "platform": {"os": "unknown", "architecture": "unknown"}},
            ]
        });
        match parse_manifest(json.to_string().as_bytes(), Some(OCI_INDEX)).unwrap() {
            Parsed::Index(manifests) => manifests,
            other => panic!("not an index: {other:?}"),
        }
    }

    fn pick(platform: &str) -> Result<char, String> {
        let manifests = index();
        select_platform(&manifests, &platform.parse().unwrap())
            .map(|d| d.digest.chars().last().unwrap())
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
    fn platforms_parse_with_an_optional_variant() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_are_told_apart_by_media_type_or_shape() {
        let image = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "c", "digest": format!("sha256:{}", "a".repeat(64)), "size": 3},
            "layers": [{"mediaType": "l", "digest": format!("sha256:{}", "b".repeat(64)), "size": 5}],
        })
        .to_string();
        match parse_manifest(image.as_bytes(), Some(DOCKER_MANIFEST)).unwrap() {
            Parsed::Image { config, layers } => {
                assert_eq!(config.size, 3);
                assert_eq!(layers.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_manifest(image.as_bytes(), None).unwrap(),
            Parsed::Image { .. }
        ));
        let list = serde_json::json!({"schemaVersion": 2, "manifests": []}).to_string();
        assert!(matches!(
            parse_manifest(list.as_bytes(), Some("application/json")).unwrap(),
            Parsed::Index(_)
        ));
        let schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws";
        assert!(parse_manifest(b"{}", Some(schema1)).is_err());
        assert!(parse_manifest(b"<html>", None).is_err());
    }

    #[test]
    fn references_become_host_prefixed_names() {
        let platform = PlatformConfig {
            org: Some("my-org".into()),
            ..PlatformConfig::default()
        };
        let name = |text: &str| api_name(&parse_image_reference(text, &platform).unwrap());
        assert_eq!(name("nginx:1.27"), "nginx");
        assert_eq!(name("ghcr.io/org/app:v1"), "ghcr.io/org/app");
        assert_eq!(name("127.0.0.1:5000/team/app"), "127.0.0.1:5000/team/app");
        assert_eq!(name("//image/app:v1"), "my-org.registry.cpln.io/app");
    }
}
