//! What berth reads inside a manifest document: only its `mediaType`, for upstreams that send
//! no usable `Content-Type`. Manifests are otherwise served as the upstream's exact bytes, so
//! nothing else of the JSON is interpreted. Pure; a fuzz target feeds it hostile JSON.

/// Longest media type taken from a document; real ones are under 100 bytes.
const MAX_MEDIA_TYPE: usize = 255;

/// The media type a manifest document declares, or the OCI image manifest type when it
/// declares none, is not a JSON object, or declares something that is not a media type. The
/// result becomes a `Content-Type` header, so it is always visible ASCII with a `/`: a hostile
/// upstream's `"mediaType":"a\nb"` must not reach a header.
pub fn embedded_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .ok()
        .and_then(|p| p.media_type)
        .filter(|m| is_media_type(m))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string())
}

fn is_media_type(text: &str) -> bool {
    text.len() <= MAX_MEDIA_TYPE && text.contains('/') && text.bytes().all(|b| b.is_ascii_graphic())
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
        let junk: [&[u8]; 7] = [
            b"[]",
            b"{",
            b"",
            br#"{"mediaType":7}"#,
            br#"{"mediaType":""}"#,
            br#"{"mediaType":"application/x\nInjected: 1"}"#,
            br#"{"mediaType":"nonsense"}"#,
        ];
        for junk in junk {
            assert_eq!(
                embedded_media_type(junk),
                "application/vnd.oci.image.manifest.v1+json"
            );
        }
    }
}
