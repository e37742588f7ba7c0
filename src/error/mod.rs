//! The API error: an OCI error code, a status, a message; and the one place any error becomes an
//! HTTP response with the `{"errors":[...]}` envelope.
//!
//! Each layer has its own error type (`UpstreamError`, `NameError`, `StoreError`, ...); they are
//! turned into `ApiError` by the `From` impls here, so the mapping from failure to status lives in
//! one file. Nothing here logs: the request log line does that.

use http::header::{
    HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Response, StatusCode};

use crate::access::AccessError;
use crate::body::{self, Body};
use crate::oci::digest::DigestError;
use crate::oci::name::NameError;
use crate::upstream::UpstreamError;

/// Error codes of the OCI distribution spec, plus `UNAVAILABLE` and `RANGE_INVALID` from the
/// distribution registry's own set (the spec has no code for a dead upstream or a bad Range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    Unavailable,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::RangeInvalid => "RANGE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::Unavailable => "UNAVAILABLE",
        }
    }
}

/// A failed request as the client will see it. Cloneable so one coalesced failure can answer
/// every client that waited on it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub detail: Option<String>,
    /// Headers the client needs to act on the error: `Retry-After`, `WWW-Authenticate`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What went wrong in full (a connect error with its address and OS error, a secret's
    /// name, a cloud error text): for the log line only, never for the response, which says
    /// only where to look (`with_request_id`).
    pub internal: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
            internal: None,
        }
    }

    /// Keeps `text` for the log and out of the response.
    pub fn with_internal(mut self, text: impl Into<String>) -> ApiError {
        self.internal = Some(text.into());
        self
    }

    /// For an error whose cause is kept for the log only: the response's detail becomes the
    /// request id, so an operator can find the log line.
    pub fn with_request_id(mut self, id: &str) -> ApiError {
        if self.internal.is_some() {
            self.detail = Some(format!("request id {id}; the cause is in berth's log"));
        }
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> ApiError {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn name_unknown(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NameUnknown,
            "repository name not known to registry",
        )
        .with_detail(detail)
    }

    /// 401 with the challenge that tells a registry client where to authenticate.
    pub fn unauthorized(challenge: &str, detail: impl Into<String>) -> ApiError {
        let error = ApiError::new(
            StatusCode::UNAUTHORIZED,
            Code::Unauthorized,
            "authentication required",
        )
        .with_detail(detail);
        match HeaderValue::from_str(challenge) {
            Ok(value) => error.with_header(WWW_AUTHENTICATE, value),
            Err(_) => error,
        }
    }

    /// 405 for a method the API does not take; RFC 9110 15.5.6 requires `Allow`, and berth
    /// only ever reads.
    pub fn unsupported(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, Code::Unsupported, message)
            .with_header(ALLOW, HeaderValue::from_static("GET, HEAD"))
    }

    /// The one mapping from an error to an HTTP response. A HEAD response carries the status
    /// and headers but no body, as HTTP requires.
    pub fn into_response(self, head: bool) -> Response<Body> {
        let envelope = serde_json::json!({
            "errors": [{
                "code": self.code.as_str(),
                "message": self.message,
                "detail": self.detail,
            }]
        });
        let bytes = serde_json::to_vec(&envelope).expect("JSON of strings serialises");
        let mut builder = Response::builder()
            .status(self.status)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, bytes.len());
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        let body = if head {
            body::empty()
        } else {
            body::full(bytes)
        };
        builder.body(body).expect("valid response parts")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)?;
        match (&self.internal, &self.detail) {
            (Some(internal), _) => write!(f, " ({internal})"),
            (None, Some(detail)) => write!(f, " ({detail})"),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for ApiError {}

impl From<NameError> for ApiError {
    fn from(err: NameError) -> ApiError {
        match err {
            NameError::Digest(err) => err.into(),
            other => ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::NameInvalid,
                other.to_string(),
            ),
        }
    }
}

impl From<DigestError> for ApiError {
    fn from(err: DigestError) -> ApiError {
        match err {
            DigestError::Unsupported(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, Code::Unsupported, err.to_string())
            }
            DigestError::Invalid(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::DigestInvalid,
                err.to_string(),
            ),
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(err: UpstreamError) -> ApiError {
        ApiError::from_upstream(err, Code::NameUnknown)
    }
}

impl ApiError {
    /// Maps an upstream failure; `not_found` is the code an upstream 404 becomes, which depends
    /// on what was asked for (MANIFEST_UNKNOWN, BLOB_UNKNOWN, NAME_UNKNOWN).
    pub fn from_upstream(err: UpstreamError, not_found: Code) -> ApiError {
        let message = err.to_string();
        match err {
            UpstreamError::Status {
                status,
                retry_after,
            } => match status.as_u16() {
                401 | 403 => ApiError::new(
                    StatusCode::FORBIDDEN,
                    Code::Denied,
                    "upstream denied access",
                )
                .with_detail(message),
                404 => ApiError::new(StatusCode::NOT_FOUND, not_found, "not found upstream")
                    .with_detail(message),
                429 => {
                    let error = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        Code::TooManyRequests,
                        "upstream rate limit reached",
                    )
                    .with_detail(message);
                    match retry_after {
                        Some(value) => error.with_header(RETRY_AFTER, value),
                        None => error,
                    }
                }
                // A client should not read an upstream's 500 as berth's own fault; the
                // upstream's Retry-After (a 503's) still tells it when to come back.
                _ => {
                    let error = ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        Code::Unavailable,
                        "upstream failed",
                    )
                    .with_detail(message);
                    match retry_after {
                        Some(value) => error.with_header(RETRY_AFTER, value),
                        None => error,
                    }
                }
            },
            // Below: the cause names addresses, ports, OS errors, secrets or cloud error
            // texts. The client learns the status and the request id; the log, the rest.
            UpstreamError::Timeout(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                Code::Unavailable,
                "upstream timed out",
            )
            .with_internal(message),
            UpstreamError::Connect(_)
            | UpstreamError::Protocol(_)
            | UpstreamError::Token(_)
            | UpstreamError::Refused(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                "upstream unreachable",
            )
            .with_internal(message),
            // berth's own words (the upstream's name and the cool-down), nothing remote.
            UpstreamError::CircuitOpen(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "upstream unavailable",
            )
            .with_detail(message)
            .with_header(RETRY_AFTER, HeaderValue::from_static("5")),
            UpstreamError::Invalid(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                "upstream sent bad content",
            )
            .with_internal(message),
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(err: AccessError) -> ApiError {
        match err {
            AccessError::Unauthenticated { challenge, reason } => {
                ApiError::unauthorized(&challenge, reason)
            }
            AccessError::Denied { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, Code::Denied, "access denied")
                    .with_detail(err.to_string())
            }
            AccessError::Off => {
                ApiError::new(StatusCode::NOT_FOUND, Code::Unsupported, err.to_string())
            }
            AccessError::Report(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, Code::NameInvalid, err.to_string())
            }
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(err: std::io::Error) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "cache storage failed",
        )
        .with_detail(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_carries_code_message_and_detail() {
        let error = ApiError::name_unknown("no upstream for x.io");
        let response = error.into_response(false);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["errors"][0]["code"], "NAME_UNKNOWN");
        assert_eq!(json["errors"][0]["detail"], "no upstream for x.io");
    }

    #[test]
    fn upstream_failures_never_map_to_500() {
        let cases = [
            UpstreamError::Connect("refused".into()),
            UpstreamError::Timeout("head".into()),
            UpstreamError::Status {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                retry_after: None,
            },
            UpstreamError::Status {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after: Some(HeaderValue::from_static("7")),
            },
        ];
        for err in cases {
            let api = ApiError::from(err);
            assert!(api.status.as_u16() != 500, "{api:?}");
        }
        let refused = ApiError::from(UpstreamError::Connect(
            "GET https://127.0.0.1:5999/v2/: tcp connect error: Connection refused (os error 111)"
                .into(),
        ))
        .with_request_id("abc123");
        let shown = format!("{} {:?}", refused.message, refused.detail);
        assert!(shown.contains("abc123"), "{shown}");
        for leak in ["127.0.0.1", "5999", "refused", "os error"] {
            assert!(!shown.contains(leak), "{leak} in {shown}");
        }
        assert!(
            refused.to_string().contains("os error 111"),
            "the log has it"
        );
        let limited = ApiError::from(UpstreamError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(HeaderValue::from_static("7")),
        });
        assert_eq!(limited.code, Code::TooManyRequests);
        assert_eq!(limited.headers[0].1, "7");
        let unavailable = ApiError::from(UpstreamError::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: Some(HeaderValue::from_static("30")),
        });
        assert_eq!(unavailable.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            unavailable.headers,
            [(RETRY_AFTER, HeaderValue::from_static("30"))]
        );
    }

    #[test]
    fn method_not_allowed_names_the_allowed_methods() {
        let response = ApiError::unsupported("no").into_response(false);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
    }
}
