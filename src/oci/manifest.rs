//! What berth reads inside a manifest document: only its `mediaType`, for upstreams that send
//! no usable `Content-Type`. Manifests are otherwise served as the upstream's exact bytes, so
//! nothing else of the JSON is interpreted. Pure; a fuzz target feeds it hostile JSON.

/// The media type a manifest document declares, or the OCI image manifest type when it
/// declares none or is not a JSON object.
pub fn embedded_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .ok()
        .and_then(|p| p.media_type)
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_declared_type_and_defaults_to_oci() {
        let list = br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#;
        assert_eq!(
            embedded_media_type(list),
            "application/vnd.docker.distribution.manifest.list.v2+json"
        );
        for junk in [&b"[]"[..], b"{", b"", b"{\"mediaType\":7}"] {
            assert_eq!(
                embedded_media_type(junk),
                "application/vnd.oci.image.manifest.v1+json"
            );
        }
    }
}
