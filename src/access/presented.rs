//! The credentials a request presents in its `Authorization` header: nothing, Basic (a
//! principal and its key), Bearer (one of berth's tokens), or something malformed. Pure
//! parsing; checking them is `Access`'s.

use base64::Engine as _;
use http::header::{HeaderMap, AUTHORIZATION};

use crate::secret::Secret;

pub(super) enum Presented {
    Nothing,
    Basic { user: String, key: Secret },
    Bearer(String),
    Malformed,
}

/// What `headers` present.
pub(super) fn presented(headers: &HeaderMap) -> Presented {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Presented::Nothing;
    };
    let Ok(value) = value.to_str() else {
        return Presented::Malformed;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Presented::Bearer(rest.to_string());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Presented::Malformed;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    match decoded.as_deref().and_then(|text| text.split_once(':')) {
        Some((user, key)) if !user.is_empty() => Presented::Basic {
            user: user.to_string(),
            key: Secret::new(key),
        },
        _ => Presented::Malformed,
    }
}
