//! What berth reads inside a manifest document: its media type. The document decides it, never
//! the `Content-Type` of whichever response brought it: a digest names fixed bytes, so the type
//! served for them must be fixed too, whatever a later (or hostile) response claims. Manifests
//! are otherwise served as the upstream's exact bytes, so nothing else of the JSON is
//! interpreted. Pure; a fuzz target feeds it hostile JSON.

/// Longest media type taken from a document; real ones are under 100 bytes.
const MAX_MEDIA_TYPE: usize = 255;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1, signed (the form registries serve) and unsigned.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";

#[derive(serde::Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    manifests: Option<Vec<serde::de::IgnoredAny>>,
    config: Option<serde::de::IgnoredAny>,
    layers: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<serde::de::IgnoredAny>,
    signatures: Option<serde::de::IgnoredAny>,
}

/// The media type of a manifest document: its `mediaType` field, checked against its structure;
/// else its structure (`manifests`: an OCI index; `config`/`layers`: an OCI image manifest; a
/// Docker schema 1 document names itself by `schemaVersion: 1`). An `Err` says why the document
/// is not a manifest berth can type. The result becomes a `Content-Type` header, so it is always
/// visible ASCII with a `/`: a hostile upstream's `"mediaType":"a\nb"` never reaches a header.
pub fn media_type(bytes: &[u8]) -> Result<String, String> {
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    let is_index = probe.manifests.is_some();
    let is_image = probe.config.is_some() || probe.layers.is_some();
    if let Some(declared) = probe.media_type {
        if !is_media_type(&declared) {
            return Err("its mediaType is not a media type".into());
        }
        let fits = match declared.as_str() {
            OCI_INDEX | DOCKER_LIST => is_index && !is_image,
            OCI_MANIFEST | DOCKER_MANIFEST => probe.config.is_some() && !is_index,
            _ => true,
        };
        if !fits {
            return Err(format!("it declares {declared} but is not shaped like one"));
        }
        return Ok(declared);
    }
    match (is_index, is_image, probe.schema_version) {
        (true, false, _) => Ok(OCI_INDEX.into()),
        (false, true, Some(2) | None) => Ok(OCI_MANIFEST.into()),
        (false, false, Some(1)) if probe.fs_layers.is_some() => match probe.signatures {
            Some(_) => Ok(DOCKER_SCHEMA1_SIGNED.into()),
            None => Ok(DOCKER_SCHEMA1.into()),
        },
        _ => Err("neither its mediaType nor its structure says what manifest it is".into()),
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
}
