//! The API error: an OCI error code, a status, a message; and the one place any error becomes an
//! HTTP response with the `{"errors":[...]}` envelope.
//!
//! Each layer has its own error type (`UpstreamError`, `FillError`, `NameError`, ...); they are
//! turned into `ApiError` by the `From` impls in `from`, so the mapping from failure to status
//! lives in this module: there, or in a named constructor here. Nothing here logs: the request
//! log line does that.

mod from;

use http::header::{
    HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use http::{Response, StatusCode};

use crate::body::{self, Body};
use crate::upstream::UpstreamError;

/// Error codes of the OCI distribution spec, plus `UNAVAILABLE` and `RANGE_INVALID` from the
/// distribution registry's own set (the spec has no code for a dead upstream or a bad Range).
/// Why a manifest fetch or a tag revalidation failed. Cloneable: one flight's result answers
/// every request that joined it (`flight`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The bytes are not the manifest asked for or announced, too long, too slow, or not a
    /// manifest. The text quotes the upstream's bytes or a library's error: for the log only.
    #[error("upstream sent a bad manifest: {0}")]
    Invalid(String),
}

impl ManifestError {
    /// The upstream says the manifest (or the tag) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ManifestError::Upstream(UpstreamError::Status { status, .. }) if *status == StatusCode::NOT_FOUND)
    }

    /// A failure that serving a stale tag covers: the upstream is unreachable, timed out,
    /// failed, rate-limited us or sent garbage. Refusals (401/403) and 404s are answers.
    pub fn is_upstream_failure(&self) -> bool {
        !matches!(self, ManifestError::Upstream(UpstreamError::Status { status, .. }) if matches!(status.as_u16(), 401 | 403 | 404))
    }
}

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

    /// 503: berth cannot answer now but will (busy, or the cache disk failed); the caller
    /// adds `Retry-After` where it knows when.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, message)
    }

    /// 502: the upstream's answer cannot be used; the detail says why.
    pub fn bad_gateway(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, Code::Unavailable, message)
    }

    /// 429: this client has too much in flight.
    pub fn too_many_requests(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyRequests,
            message,
        )
    }

    /// 403 DENIED: no key, policy or secret lets this request through.
    pub fn denied(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, Code::Denied, "access denied").with_detail(detail)
    }

    /// 400 NAME_INVALID: the repository name does not parse.
    pub fn name_invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Code::NameInvalid, message)
    }

    /// 400 UNSUPPORTED: a request berth understands but does not serve (a token request
    /// for another service, or a malformed one).
    pub fn unsupported_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Code::Unsupported, message)
    }

    /// 404 NAME_UNKNOWN for a path outside the registry API.
    pub fn not_api_path(path: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NameUnknown,
            "not a registry API path",
        )
        .with_detail(path)
    }

    /// 404 UNSUPPORTED for `/v2/_catalog`: a pull-through cache cannot list what upstreams hold.
    pub fn no_catalog() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::Unsupported,
            "a pull-through cache has no catalog",
        )
    }

    /// 405 for an upload: berth only reads, so `Allow` is empty for these paths.
    pub fn read_only() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "berth is a pull-through cache; pushes go to the registry",
        )
        .with_header(ALLOW, HeaderValue::from_static(""))
    }

    pub fn blob_unknown(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::BlobUnknown,
            "blob unknown to registry",
        )
        .with_detail(detail)
    }

    /// 416 with the `Content-Range: bytes */<size>` RFC 9110 14.4 asks for.
    pub fn range_not_satisfiable(content_range: HeaderValue) -> ApiError {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            Code::RangeInvalid,
            "range not satisfiable",
        )
        .with_header(CONTENT_RANGE, content_range)
    }

    /// 414: the request target is over `limits.max_uri_bytes`.
    pub fn uri_too_long(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            Code::NameInvalid,
            "request target too long",
        )
        .with_detail(detail)
    }

    /// 431: the request's headers are over `limits.max_headers` or `limits.max_header_bytes`.
    pub fn headers_too_large(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::Unsupported,
            "request headers too large",
        )
        .with_detail(detail)
    }

    // The admin listener's refusals: the same envelope as the API's.

    /// 403 when no `admin_token` is configured: the admin API is off.
    pub fn admin_off() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            Code::Denied,
            "the admin API is disabled: set admin_token in the config",
        )
    }

    /// 401 with `WWW-Authenticate: Bearer` for a missing or wrong admin token.
    pub fn admin_unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            Code::Unauthorized,
            "a valid admin bearer token is required",
        )
        .with_header(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    pub fn admin_not_found(message: &'static str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, Code::Unsupported, message)
    }

    /// 405 for a purge asked with anything but DELETE.
    pub fn admin_method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "use DELETE",
        )
        .with_header(ALLOW, HeaderValue::from_static("DELETE"))
    }

    /// 404 for a purge of a digest the cache does not hold.
    pub fn not_cached(digest: &impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::BlobUnknown,
            "digest not cached",
        )
        .with_detail(digest.to_string())
    }

    /// 500 for a purge whose file could not be removed; the cause is logged by the caller.
    pub fn purge_failed() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable,
            "removing the file failed; the cause is in berth's log",
        )
    }

    pub fn manifest_unknown(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::ManifestUnknown,
            "manifest unknown",
        )
        .with_detail(detail)
    }

    /// A tag whose 404 berth remembers (`upstream.negative_ttl`).
    pub fn tag_unknown(
        repository: &impl std::fmt::Display,
        tag: &impl std::fmt::Display,
    ) -> ApiError {
        ApiError::manifest_unknown(format!(
            "{repository}:{tag} is not known upstream (remembered)"
        ))
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

    /// The cache disk failed where the request cannot go on without it.
    fn storage_failed() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "cache storage failed",
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fill::FillError;
    use http::header::RETRY_AFTER;
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
    fn a_fills_disk_error_reaches_the_log_not_the_response() {
        let err = std::io::Error::other("No space left on /var/cache/berth/tmp/0123");
        let api = ApiError::from(FillError::Disk(err)).with_request_id("r1");
        assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
        let shown = format!("{} {:?}", api.message, api.detail);
        assert!(!shown.contains("/var/cache"), "{shown}");
        assert!(shown.contains("r1"), "{shown}");
        assert!(
            api.to_string().contains("/var/cache/berth"),
            "the log has it"
        );
    }

    #[test]
    fn a_fill_answers_an_upstream_404_as_an_unknown_blob() {
        let api = ApiError::from(FillError::Upstream(UpstreamError::Status {
            status: StatusCode::NOT_FOUND,
            retry_after: None,
        }));
        assert_eq!(
            (api.status, api.code),
            (StatusCode::NOT_FOUND, Code::BlobUnknown)
        );
        assert_eq!(api.message, "blob unknown to registry");
        let busy = ApiError::from(FillError::Busy {
            retry_after: HeaderValue::from_static("3"),
        });
        assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers, [(RETRY_AFTER, HeaderValue::from_static("3"))]);
    }

    #[test]
    fn method_not_allowed_names_the_allowed_methods() {
        let response = ApiError::unsupported("no").into_response(false);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
    }
}
