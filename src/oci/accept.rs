//! The Accept class of a manifest request: which manifest media types a client's `Accept`
//! admits, reduced to a small set. Registries answer one tag with different manifests
//! depending on it: distribution answers 404 MANIFEST_UNKNOWN for an OCI manifest to a client
//! that does not list the OCI types, and picks linux/amd64 out of a manifest list for one that
//! does not accept lists; Docker Hub sends an index, a single-platform manifest or schema1.
//! So the tag table, the negative cache and in-flight fetches are keyed by this class, and
//! berth sends the upstream the class's canonical `Accept`, so what is cached under a class is
//! exactly what the upstream answers to it.
//!
//! Does not own: choosing a manifest (berth never converts one) or media types of blobs.
//! Pure; parses hostile header text without allocating per item.

use std::fmt;

use http::header::{HeaderMap, HeaderValue, ACCEPT};

/// The manifest media types registries tell apart, with their bit in a class.
const TYPES: [&str; 6] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
];

/// `*/*` (containerd sends it after the manifest types) or `application/*`.
const WILDCARD: u8 = 1 << TYPES.len();

/// A set of the manifest media types above, plus "anything". Empty when the client sent no
/// Accept, or none naming a manifest type (old docker clients, plain curl).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AcceptClass(u8);

impl AcceptClass {
    /// The class of a request's `Accept` headers (several headers count as one list).
    pub(crate) fn from_headers(headers: &HeaderMap) -> AcceptClass {
        let mut bits = 0;
        for value in headers.get_all(ACCEPT) {
            if let Ok(text) = value.to_str() {
                bits |= AcceptClass::parse(text).0;
            }
        }
        AcceptClass(bits)
    }

    /// Parses one `Accept` value. Media types are case-insensitive; an item with `q=0` is
    /// "not acceptable" (RFC 9110 12.4.2) and adds nothing; other parameters are ignored, as
    /// registries ignore them.
    pub fn parse(text: &str) -> AcceptClass {
        let mut bits = 0;
        for item in text.split(',') {
            let mut parts = item.split(';');
            let media_type = parts.next().unwrap_or("").trim();
            let refused = parts.any(|param| {
                let param = param.trim();
                param
                    .get(..2)
                    .is_some_and(|name| name.eq_ignore_ascii_case("q="))
                    && param[2..].parse::<f32>().is_ok_and(|q| q == 0.0)
            });
            if refused {
                continue;
            }
            if media_type == "*/*" || media_type.eq_ignore_ascii_case("application/*") {
                bits |= WILDCARD;
            } else if let Some(i) = TYPES
                .iter()
                .position(|t| t.eq_ignore_ascii_case(media_type))
            {
                bits |= 1 << i;
            }
        }
        AcceptClass(bits)
    }

    /// The `Accept` berth sends upstream for this class: its types in a fixed order, `*/*`
    /// last; `None` for the empty class (the client sent none either).
    pub fn header_value(self) -> Option<HeaderValue> {
        let text = self.to_string();
        (!text.is_empty()).then(|| HeaderValue::from_str(&text).expect("fixed ASCII text"))
    }

    /// The class as two hex digits, for tag file names on disk.
    pub fn to_hex(self) -> String {
        format!("{:02x}", self.0)
    }

    pub fn from_hex(text: &str) -> Option<AcceptClass> {
        if text.len() != 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bits = u8::from_str_radix(text, 16).ok()?;
        (bits < WILDCARD << 1).then_some(AcceptClass(bits))
    }
}

/// The canonical Accept list (empty for the empty class).
impl fmt::Display for AcceptClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = TYPES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, t)| *t)
            .chain((self.0 & WILDCARD != 0).then_some("*/*"));
        if let Some(first) = items.next() {
            f.write_str(first)?;
        }
        for item in items {
            write!(f, ", {item}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AcceptClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AcceptClass({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERD: &str = "application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";
    const OLD_DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.docker.distribution.manifest.v1+prettyjws, application/json";

    #[test]
    fn clients_with_different_manifest_types_are_different_classes() {
        let containerd = AcceptClass::parse(CONTAINERD);
        let old_docker = AcceptClass::parse(OLD_DOCKER);
        let curl = AcceptClass::parse("*/*");
        let none = AcceptClass::from_headers(&HeaderMap::new());
        let classes = [containerd, old_docker, curl, none];
        for (i, a) in classes.iter().enumerate() {
            for b in &classes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn order_case_spacing_and_q_values_do_not_change_the_class() {
        let a = AcceptClass::parse(
            "application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json",
        );
        let b = AcceptClass::parse(
            " Application/VND.oci.image.manifest.v1+json ; q=0.5 , application/vnd.oci.image.index.v1+json;q=1",
        );
        assert_eq!(a, b);
        let mut headers = HeaderMap::new();
        headers.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        headers.append(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        assert_eq!(AcceptClass::from_headers(&headers), a);
    }

    #[test]
    fn q_zero_refuses_a_type() {
        let refused = AcceptClass::parse(
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json;q=0.0",
        );
        assert_eq!(
            refused,
            AcceptClass::parse("application/vnd.docker.distribution.manifest.v2+json")
        );
    }

    #[test]
    fn the_canonical_header_round_trips_and_the_empty_class_sends_none() {
        let containerd = AcceptClass::parse(CONTAINERD);
        let sent = containerd.header_value().unwrap();
        assert_eq!(AcceptClass::parse(sent.to_str().unwrap()), containerd);
        assert!(sent.to_str().unwrap().ends_with(", */*"));
        assert_eq!(
            AcceptClass::parse("text/html, application/json").header_value(),
            None
        );
        assert_eq!(
            AcceptClass::from_hex(&containerd.to_hex()),
            Some(containerd)
        );
        for junk in ["", "0", "zz", "ff", "+1", "001"] {
            assert_eq!(AcceptClass::from_hex(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn hostile_text_is_harmless() {
        for text in ["", ",,,", ";;;q=0", "*/*;q=", "\u{0}", &"a,".repeat(10_000)] {
            let class = AcceptClass::parse(text);
            if let Some(value) = class.header_value() {
                assert!(value.to_str().is_ok());
            }
        }
    }
}
