//! What berth reads inside a manifest document, the one model of it.
//!
//! Its media type (`media_type`), which the server serves it as: the document decides it, never
//! the `Content-Type` of whichever response brought it: a digest names fixed bytes, so the type
//! served for them must be fixed too, whatever a later (or hostile) response claims. This reading
//! is lenient (any document whose type can be told is served, as the upstream's exact bytes).
//!
//! Its content (`Manifest`, typed in `model`): the config, layers, index children and artifact
//! blobs that `berth warm` and `berth load` pull and the policy mode's holdings rule counts, with
//! platforms, `subject` and `urls`. This reading is strict: a descriptor without a valid digest
//! and a size refuses the whole document. Pure; one fuzz target feeds both readings hostile JSON.

use serde::de::IgnoredAny;

mod model;
pub use model::{
    ArtifactManifest, Descriptor, ImageIndex, ImageManifest, NoPlatform, Platform, PlatformError,
};

/// Longest media type taken from a document; real ones are under 100 bytes.
const MAX_MEDIA_TYPE: usize = 255;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1, signed (the form registries serve) and unsigned.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Why a document is not a manifest berth can type or read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a JSON manifest: {0}")]
    Json(#[from] serde_json::Error),
    #[error("its mediaType is not a media type")]
    NotAMediaType,
    #[error("it declares {0} but is not shaped like one")]
    Misshapen(String),
    #[error("neither its mediaType nor its structure says what manifest it is")]
    Untyped,
    #[error("{0} (Docker schema 1) is not supported")]
    Schema1(String),
    #[error("a {0} without `config` and `layers`, `manifests` or `blobs` cannot be read")]
    Unreadable(String),
}

/// The `Shape` of a `Probe` or a `Document`, which name their fields alike.
macro_rules! shape_of {
    ($document:expr) => {
        Shape {
            declared: $document.media_type.as_deref(),
            schema_version: $document.schema_version,
            index: $document.manifests.is_some(),
            config: $document.config.is_some(),
            layers: $document.layers.is_some(),
            fs_layers: $document.fs_layers.is_some(),
            signatures: $document.signatures.is_some(),
        }
    };
}

/// One manifest document, typed: what `berth warm` and `berth load` pull, and what the
/// policy mode's holdings rule reads.
///
/// Variants differ in size (an image holds two descriptors inline), but one manifest lives
/// briefly per fetch: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
    Artifact(ArtifactManifest),
}

impl Manifest {
    /// Reads a manifest, its kind decided as for `media_type` (never a response's
    /// `Content-Type`). Every descriptor must carry a valid digest and a size, and the kind's
    /// fields must be there: an image manifest needs `config` and `layers`. Docker schema 1 is
    /// refused. The caller bounds the document's size.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let document: Document = serde_json::from_slice(bytes)?;
        let media_type = classify(&shape_of!(document))?;
        document.into_manifest(media_type)
    }

    /// The content the manifest is made of: config and layers, index children, or artifact
    /// blobs. Never its `subject`, which it only points at.
    pub fn contents(&self) -> Box<dyn Iterator<Item = &Descriptor> + '_> {
        match self {
            Manifest::Image(image) => Box::new(std::iter::once(&image.config).chain(&image.layers)),
            Manifest::Index(index) => Box::new(index.manifests.iter()),
            Manifest::Artifact(artifact) => Box::new(artifact.blobs.iter()),
        }
    }

    pub fn subject(&self) -> Option<&Descriptor> {
        match self {
            Manifest::Image(image) => image.subject.as_ref(),
            Manifest::Index(index) => index.subject.as_ref(),
            Manifest::Artifact(artifact) => artifact.subject.as_ref(),
        }
    }
}

/// The fields that say what a document is, whatever their content.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    media_type: Option<String>,
    schema_version: Option<u64>,
    manifests: Option<Vec<IgnoredAny>>,
    config: Option<IgnoredAny>,
    layers: Option<Vec<IgnoredAny>>,
    fs_layers: Option<IgnoredAny>,
    signatures: Option<IgnoredAny>,
}

/// Every field of every kind, typed; `into_manifest` keeps those of its kind.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    media_type: Option<String>,
    schema_version: Option<u64>,
    artifact_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    blobs: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    fs_layers: Option<IgnoredAny>,
    signatures: Option<IgnoredAny>,
}

/// What `classify` looks at.
struct Shape<'a> {
    declared: Option<&'a str>,
    schema_version: Option<u64>,
    index: bool,
    config: bool,
    layers: bool,
    fs_layers: bool,
    signatures: bool,
}

impl Document {
    fn into_manifest(self, media_type: String) -> Result<Manifest, ManifestError> {
        if matches!(media_type.as_str(), DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED) {
            return Err(ManifestError::Schema1(media_type));
        }
        let Document {
            media_type: declared,
            artifact_type,
            subject,
            manifests,
            config,
            layers,
            blobs,
            ..
        } = self;
        match (manifests, config, layers, blobs) {
            (Some(manifests), None, None, _) => Ok(Manifest::Index(ImageIndex {
                media_type: declared,
                artifact_type,
                manifests,
                subject,
            })),
            (None, Some(config), Some(layers), _) => Ok(Manifest::Image(ImageManifest {
                media_type: declared,
                artifact_type,
                config,
                layers,
                subject,
            })),
            (None, None, None, Some(blobs)) if declared.is_some() => {
                Ok(Manifest::Artifact(ArtifactManifest {
                    media_type,
                    artifact_type,
                    blobs,
                    subject,
                }))
            }
            _ => Err(ManifestError::Unreadable(media_type)),
        }
    }
}

/// The media type of a manifest document: its `mediaType` field, checked against its structure;
/// else its structure (`manifests`: an OCI index; `config`/`layers`: an OCI image manifest; a
/// Docker schema 1 document names itself by `schemaVersion: 1`). An `Err` says why the document
/// is not a manifest berth can type. The result becomes a `Content-Type` header, so it is always
/// visible ASCII with a `/`: a hostile upstream's `"mediaType":"a\nb"` never reaches a header.
pub fn media_type(bytes: &[u8]) -> Result<String, ManifestError> {
    let probe: Probe = serde_json::from_slice(bytes)?;
    classify(&shape_of!(probe))
}

fn classify(shape: &Shape<'_>) -> Result<String, ManifestError> {
    let is_image = shape.config || shape.layers;
    if let Some(declared) = shape.declared {
        if !is_media_type(declared) {
            return Err(ManifestError::NotAMediaType);
        }
        let fits = match declared {
            OCI_INDEX | DOCKER_LIST => shape.index && !is_image,
            OCI_MANIFEST | DOCKER_MANIFEST => shape.config && !shape.index,
            _ => true,
        };
        if !fits {
            return Err(ManifestError::Misshapen(declared.to_string()));
        }
        return Ok(declared.to_string());
    }
    match (shape.index, is_image, shape.schema_version) {
        (true, false, _) => Ok(OCI_INDEX.into()),
        (false, true, Some(2) | None) => Ok(OCI_MANIFEST.into()),
        (false, false, Some(1)) if shape.fs_layers => match shape.signatures {
            true => Ok(DOCKER_SCHEMA1_SIGNED.into()),
            false => Ok(DOCKER_SCHEMA1.into()),
        },
        _ => Err(ManifestError::Untyped),
    }
}

/// The document's media type, or the OCI image manifest type when it cannot be told (for
/// callers that must produce some header, such as the fuzz target's invariants).
pub fn embedded_media_type(bytes: &[u8]) -> String {
    media_type(bytes).unwrap_or_else(|_| OCI_MANIFEST.to_string())
}

/// Whether `text` may be served as a media type (and so as a header value).
pub fn is_media_type(text: &str) -> bool {
    text.len() <= MAX_MEDIA_TYPE && text.contains('/') && text.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Digest;

    #[test]
    fn the_declared_type_wins_when_the_structure_fits() {
        let list = br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(media_type(list).unwrap(), DOCKER_LIST);
        let image = br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(media_type(image).unwrap(), OCI_MANIFEST);
        let artifact = br#"{"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#;
        assert_eq!(
            media_type(artifact).unwrap(),
            "application/vnd.oci.artifact.manifest.v1+json"
        );
    }

    #[test]
    fn without_a_declared_type_the_structure_tells() {
        assert_eq!(media_type(br#"{"manifests":[{}]}"#).unwrap(), OCI_INDEX);
        assert_eq!(
            media_type(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).unwrap(),
            OCI_MANIFEST
        );
        let schema1 = br#"{"schemaVersion":1,"fsLayers":[],"signatures":[]}"#;
        assert_eq!(media_type(schema1).unwrap(), DOCKER_SCHEMA1_SIGNED);
        let unsigned = br#"{"schemaVersion":1,"fsLayers":[]}"#;
        assert_eq!(media_type(unsigned).unwrap(), DOCKER_SCHEMA1);
    }

    #[test]
    fn a_type_that_contradicts_the_structure_or_no_type_at_all_is_refused() {
        let refused: [&[u8]; 10] = [
            b"[]",
            b"{",
            b"",
            b"{}",
            br#"{"mediaType":7}"#,
            br#"{"mediaType":""}"#,
            br#"{"mediaType":"application/x\nInjected: 1","config":{}}"#,
            br#"{"mediaType":"nonsense","config":{}}"#,
            br#"{"mediaType":"application/vnd.oci.image.index.v1+json","config":{},"layers":[]}"#,
            br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","manifests":[]}"#,
        ];
        for document in refused {
            assert!(
                media_type(document).is_err(),
                "{:?}",
                String::from_utf8_lossy(document)
            );
            assert_eq!(embedded_media_type(document), OCI_MANIFEST);
        }
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn digest(c: char) -> Digest {
        Digest::parse(&d(c)).unwrap()
    }

    /// A Docker schema 2 image as `docker push` writes it.
    fn docker_image() -> serde_json::Value {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": 1469, "digest": d('c')},
            "layers": [
                {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                 "size": 3623807, "digest": d('1')},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                 "size": 1024, "digest": d('2'), "urls": ["https://mcr.microsoft.com/l"]},
            ],
        })
    }

    #[test]
    fn a_docker_image_manifest_reads_its_config_layers_and_foreign_urls() {
        let bytes = docker_image().to_string();
        let Manifest::Image(image) = Manifest::parse(bytes.as_bytes()).unwrap() else {
            panic!("an image");
        };
        assert_eq!(image.media_type.as_deref(), Some(DOCKER_MANIFEST));
        assert_eq!(
            (image.config.digest.clone(), image.config.size),
            (digest('c'), 1469)
        );
        assert_eq!(image.layers.len(), 2);
        assert_eq!(image.layers[0].urls, None);
        assert_eq!(image.layers[1].urls.as_ref().unwrap().len(), 1);
        assert_eq!(image.subject, None);
    }

    #[test]
    fn an_oci_index_reads_its_children_platforms_and_subject() {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": "application/vnd.example.bundle",
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d('a'), "size": 500,
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d('b'), "size": 600,
                 "platform": {"architecture": "amd64", "os": "windows",
                              "os.version": "10.0.17763.5576", "os.features": ["win32k"]}},
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d('5'), "size": 7},
        });
        let parsed = Manifest::parse(index.to_string().as_bytes()).unwrap();
        let Manifest::Index(read) = &parsed else {
            panic!("an index");
        };
        assert_eq!(
            read.artifact_type.as_deref(),
            Some("application/vnd.example.bundle")
        );
        let windows = read.manifests[1].platform.as_ref().unwrap();
        assert_eq!(windows.os_version.as_deref(), Some("10.0.17763.5576"));
        assert_eq!(
            windows.os_features.as_deref(),
            Some(&["win32k".to_string()][..])
        );
        assert_eq!(
            read.manifests[0].platform.as_ref().unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert_eq!(
            parsed.subject().map(|s| s.digest.clone()),
            Some(digest('5'))
        );
        let contents: Vec<_> = parsed.contents().map(|c| c.digest.clone()).collect();
        assert_eq!(contents, [digest('a'), digest('b')]);
    }

    #[test]
    fn the_model_round_trips_through_json() {
        let image = Manifest::parse(docker_image().to_string().as_bytes()).unwrap();
        let Manifest::Image(typed) = &image else {
            panic!("an image");
        };
        let again = serde_json::to_vec(typed).unwrap();
        assert_eq!(Manifest::parse(&again).unwrap(), image);
        let list = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_LIST,
            "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": d('a'), "size": 1,
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        });
        let parsed = Manifest::parse(list.to_string().as_bytes()).unwrap();
        let Manifest::Index(typed) = &parsed else {
            panic!("a list");
        };
        // Everything read is written back as it was; `schemaVersion` is not kept.
        let mut expected = list.clone();
        expected.as_object_mut().unwrap().remove("schemaVersion");
        assert_eq!(serde_json::to_value(typed).unwrap(), expected);
    }

    #[test]
    fn an_artifact_manifest_reads_its_blobs_not_its_subject() {
        let artifact = serde_json::json!({
            "mediaType": "application/vnd.oci.artifact.manifest.v1+json",
            "artifactType": "application/vnd.example.signature",
            "blobs": [{"mediaType": "application/octet-stream", "digest": d('b'), "size": 3}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d('5'), "size": 7},
        });
        let parsed = Manifest::parse(artifact.to_string().as_bytes()).unwrap();
        assert!(matches!(parsed, Manifest::Artifact(_)));
        let contents: Vec<_> = parsed.contents().map(|c| c.digest.clone()).collect();
        assert_eq!(contents, [digest('b')]);
    }

    #[test]
    fn wrong_digests_sizes_types_and_shapes_refuse_the_whole_document() {
        let with = |path: &str, value: serde_json::Value| {
            let mut document = docker_image();
            *document.pointer_mut(path).unwrap() = value;
            document.to_string()
        };
        let refused = [
            with("/config/digest", "md5:abc".into()),
            with("/layers/0/digest", format!("sha512:{}", "a".repeat(128)).into()),
            with("/layers/0/digest", format!("sha256:{}", "A".repeat(64)).into()),
            with("/layers/0/size", (-1).into()),
            with("/layers/0/size", "12".into()),
            with("/layers/1/urls", "https://example.com".into()),
            with("/layers", serde_json::json!({})),
            with("/mediaType", DOCKER_LIST.into()),
            with("/mediaType", DOCKER_SCHEMA1_SIGNED.into()),
            serde_json::json!({"schemaVersion": 2, "config": {"digest": d('c')}, "layers": []})
                .to_string(),
            serde_json::json!({"schemaVersion": 2, "config": {"digest": d('c'), "size": 1}})
                .to_string(),
            serde_json::json!({"manifests": [{"digest": d('a'), "size": 1, "platform": {"os": "linux"}}]})
                .to_string(),
            serde_json::json!({"schemaVersion": 1, "fsLayers": [], "signatures": []}).to_string(),
            serde_json::json!({"blobs": [{"digest": d('b'), "size": 1}]}).to_string(),
            "<html>".to_string(),
        ];
        for document in refused {
            assert!(Manifest::parse(document.as_bytes()).is_err(), "{document}");
        }
        let schema1 = serde_json::json!({"schemaVersion": 1, "fsLayers": []}).to_string();
        let refusal = Manifest::parse(schema1.as_bytes()).unwrap_err().to_string();
        assert!(refusal.contains("schema 1"), "{refusal}");
    }
}
