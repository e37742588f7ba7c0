//! The `From` impls that turn each layer's error into an `ApiError`: which status, which OCI
//! code, and what stays in the log (`internal`) rather than the response.

use http::header::{HeaderValue, RETRY_AFTER};
use http::StatusCode;

use super::{ApiError, Code, ManifestError};
use crate::access::AccessError;
use crate::fill::FillError;
use crate::oci::digest::DigestError;
use crate::oci::name::NameError;
use crate::upstream::UpstreamError;

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

impl From<ManifestError> for ApiError {
    fn from(err: ManifestError) -> ApiError {
        match err {
            ManifestError::Upstream(err) => ApiError::from_upstream(err, Code::ManifestUnknown),
            ManifestError::Invalid(detail) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                "upstream sent a bad manifest",
            )
            .with_internal(detail),
        }
    }
}

impl From<FillError> for ApiError {
    fn from(err: FillError) -> ApiError {
        ApiError::from(&err)
    }
}

/// A fill's failure, as each of its readers answers it. A fill fetches a blob, so an upstream
/// 404 means the blob is unknown, not the repository.
impl From<&FillError> for ApiError {
    fn from(err: &FillError) -> ApiError {
        match err {
            FillError::Upstream(err) => {
                match ApiError::from_upstream(err.clone(), Code::BlobUnknown) {
                    error if error.status == StatusCode::NOT_FOUND => ApiError {
                        message: "blob unknown to registry".into(),
                        ..error
                    },
                    error => error,
                }
            }
            // Permanent, so a 4xx clients do not retry.
            FillError::TooLarge { length } => ApiError::new(
                StatusCode::FORBIDDEN,
                Code::Denied,
                "blob is larger than this mirror caches (limits.max_blob_size)",
            )
            .with_detail(format!("upstream Content-Length {length}")),
            FillError::Mismatch { want, got } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                "upstream content does not match its digest",
            )
            .with_detail(format!("upstream sent {got} for {want}")),
            FillError::Busy { retry_after } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "too many blob fills in flight; retry shortly",
            )
            .with_header(RETRY_AFTER, retry_after.clone()),
            FillError::Full { retry_after } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "the cache is full of blobs being fetched; retry shortly",
            )
            .with_header(RETRY_AFTER, retry_after.clone()),
            // The OS error may name a path: the log has it, the client the request id.
            FillError::Disk(err) => ApiError::storage_failed().with_internal(err.to_string()),
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
        ApiError::storage_failed().with_detail(err.to_string())
    }
}
