//! Units in the configuration: sizes ("50GiB", "512 MiB", a byte count) and durations
//! ("30s", "5m", "24h"), and the serde helpers that read them.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A size or duration that does not read as one.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("invalid size {text:?}: {reason}")]
    Size { text: String, reason: String },
    #[error("invalid duration {text:?}: {source}")]
    Duration {
        text: String,
        #[source]
        source: humantime::DurationError,
    },
}

/// Parses sizes such as "50GiB", "512 MiB" or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    // bytesize's parse error is a bare String, so the reason is kept as text.
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|reason| UnitError::Size {
            text: text.to_string(),
            reason,
        })
}

/// Parses durations such as "30s", "5m" or "24h".
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(text.trim()).map_err(|source| UnitError::Duration {
        text: text.to_string(),
        source,
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Bytes(n) => Ok(n),
        SizeValue::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

pub(super) fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

/// An HTTP/2 flow-control window: 64 KiB (below it every stream crawls) up to 2^31 - 1 bytes.
pub(super) fn de_window<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let size = de_size(d)?;
    match u32::try_from(size) {
        Ok(window) if (65_535..=i32::MAX as u32).contains(&window) => Ok(window),
        _ => Err(serde::de::Error::custom(format!(
            "an HTTP/2 window is 64KiB to 2GiB - 1 bytes, not {size}"
        ))),
    }
}

pub(super) fn de_size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let size = de_size(d)?;
    usize::try_from(size).map_err(serde::de::Error::custom)
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}
