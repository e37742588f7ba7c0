//! One credential exchange over HTTP: send a small POST, read a small answer, and describe a
//! failure without quoting anything that could be secret.
//!
//! Shared by the AWS calls (`aws`) and the Google token endpoint (`gcp`). What to send and how
//! to read the answer is theirs; this module only moves bytes and bounds them.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::Transport;

/// Token and credential responses are a few KiB; anything bigger is not one.
const MAX_RESPONSE: usize = 64 * 1024;

/// How long the body of an answer may take once its head has arrived (the client's response
/// timeout covers the head only). A stalled endpoint must not hold every waiting request.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest part of a refusal (an AWS error message, an OAuth `error_description`) kept for
/// the error: enough to tell the cause, short enough for one log line.
const MAX_REASON: usize = 300;

/// Why an exchange failed. The text is what a secret's error shows: a refusal's code and
/// message or berth's own words, never a body or a key; a cause underneath is kept as the source.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    #[error(transparent)]
    Send(#[from] crate::net::SendError),
    #[error("timed out reading the response")]
    BodyTimeout,
    #[error("reading the response: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The endpoint said no: `HTTP <status>: <code>: <message>` (see `refusal`).
    #[error("{0}")]
    Refused(String),
    /// A request berth could not build or sign, or an answer it could not read.
    #[error("{0}")]
    Unusable(String),
    #[error("{context}: {source}")]
    Caused {
        context: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<&str> for ExchangeError {
    fn from(text: &str) -> ExchangeError {
        ExchangeError::Unusable(text.to_string())
    }
}

/// Sends `request` and returns the status and the whole (bounded) body.
pub(super) async fn send(
    transport: &Transport,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), ExchangeError> {
    let response = transport.send(request).await?;
    let status = response.status();
    let collect = Limited::new(response.into_body(), MAX_RESPONSE).collect();
    let body = tokio::time::timeout(BODY_TIMEOUT, collect)
        .await
        .map_err(|_| ExchangeError::BodyTimeout)?
        .map_err(ExchangeError::Body)?
        .to_bytes();
    Ok((status, body))
}

/// A refusal as `HTTP <status>: <code>: <message>`, from fields the caller picked out of the
/// error body (error codes and descriptions, never the body as a whole). The fields are the
/// remote party's text: control characters are escaped, so they cannot forge log lines.
pub(super) fn refusal(status: StatusCode, parts: &[Option<&str>]) -> ExchangeError {
    ExchangeError::Refused(refusal_text(status, parts))
}

fn refusal_text(status: StatusCode, parts: &[Option<&str>]) -> String {
    let mut reason = format!("HTTP {}", status.as_u16());
    for part in parts.iter().flatten() {
        let part = part.trim();
        if !part.is_empty() {
            reason.push_str(": ");
            reason.extend(part.chars().flat_map(char::escape_default));
        }
    }
    truncate(reason)
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, as both the STS
/// Query API and `application/x-www-form-urlencoded` accept. Five lines do not warrant a crate.
pub(super) fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, key);
        out.push('=');
        encode_into(&mut out, value);
    }
    out
}

fn encode_into(out: &mut String, text: &str) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes_all_but_unreserved() {
        assert_eq!(
            form_encode(&[("RoleArn", "arn:aws:iam::123:role/pull"), ("x", "a b+c~")]),
            "RoleArn=arn%3Aaws%3Aiam%3A%3A123%3Arole%2Fpull&x=a%20b%2Bc~"
        );
    }

    #[test]
    fn refusals_keep_status_and_codes_and_stay_short() {
        let long = "m".repeat(1000);
        let reason = refusal_text(
            StatusCode::FORBIDDEN,
            &[Some("AccessDenied"), None, Some(&long)],
        );
        assert!(reason.starts_with("HTTP 403: AccessDenied: mmm"));
        assert!(reason.len() <= MAX_REASON + 3);
        let forged = refusal_text(
            StatusCode::BAD_REQUEST,
            &[Some(
                "invalid_grant\n2026-01-01T00:00:00Z INFO berth: all good",
            )],
        );
        assert!(!forged.contains('\n'), "{forged}");
        assert!(forged.contains("invalid_grant\\n2026"), "{forged}");
    }
}
