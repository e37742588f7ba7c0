//! Blob requests: a hit streams from disk, a miss joins (or starts) the single fill of that
//! digest and streams from the growing file, a HEAD of an uncached blob asks the upstream.
//!
//! Range handling is here; fetching and verifying is in `fill`, reading in `cache::reader`.

use std::sync::Arc;

use http::header::{
    HeaderMap, HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE,
};
use http::{Method, Response, StatusCode, Version};
use tokio::sync::watch;

use super::holds::BlobSource;
use super::Served;
use crate::body::{self, Body};
use crate::cache::reader::Evict;
use crate::cache::Outcome;
use crate::cache::Progress;
use crate::error::{ApiError, Code};
use crate::fill::Job;
use crate::oci::digest::Digest;
use crate::oci::range::{parse_range, unsatisfied_content_range, RangeRequest};
use crate::route::Target;
use crate::upstream::content_length;
use crate::AppState;

pub async fn serve(
    state: &Arc<AppState>,
    target: Target,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
    version: Version,
) -> Served {
    let digest = Digest::parse(digest)?;
    let range = headers.get(RANGE).and_then(|v| v.to_str().ok());
    // Policy mode: cached bytes, or a fill another request started, only for a repository
    // holding them on an upstream that served them (`holds`).
    match super::holds::admit_blob(state, &target, &digest, head).await? {
        BlobSource::Any => {}
        BlobSource::Upstream => return head_upstream(&target, &digest).await,
        BlobSource::Own { .. } if head => return head_upstream(&target, &digest).await,
        BlobSource::Own { held } => {
            return serve_own(state, target, digest, range, held, version).await
        }
    }
    serve_any(state, target, digest, range, head, version).await
}

/// Serves a blob from the cache or from any fill of it, starting one if none runs.
async fn serve_any(
    state: &Arc<AppState>,
    target: Target,
    digest: Digest,
    range: Option<&str>,
    head: bool,
    version: Version,
) -> Served {
    if let Some(progress) = crate::cache::open_cached(&state.cache, &state.metrics, &digest) {
        let evict = Evict {
            cache: Arc::clone(&state.cache),
            metrics: Arc::clone(&state.metrics),
            digest: digest.clone(),
        };
        let response = respond(progress, &digest, range, head, Some(evict), false).await?;
        return Ok((response, Outcome::Hit));
    }
    if head {
        return head_upstream(&target, &digest).await;
    }
    let target_upstream = Arc::clone(&target.upstream.name);
    let job = Job {
        upstream: target.upstream,
        repository: target.repository,
        digest: digest.clone(),
    };
    let joined = state.fills.join(&state.cache, &state.metrics, job)?;
    let outcome = if joined.coalesced {
        state
            .prefetch
            .joined(&target_upstream, &digest, &state.metrics);
        Outcome::Coalesced
    } else {
        Outcome::Miss
    };
    // An HTTP/1.0 client gets a body of unknown length delimited by the connection's close,
    // so a failed fill would look complete to it: it waits for the verified blob instead.
    let whole_first = version <= Version::HTTP_10;
    let progress = joined.progress;
    let response = respond(progress, &digest, range, head, None, whole_first).await?;
    Ok((response, outcome))
}

/// Serves a blob only from a fill from the target's upstream (`Fills::join_own`). Should the
/// digest meanwhile be cached or filled from elsewhere, the rule is applied again, a bounded
/// number of times.
async fn serve_own(
    state: &Arc<AppState>,
    target: Target,
    digest: Digest,
    range: Option<&str>,
    mut held: bool,
    version: Version,
) -> Served {
    for _ in 0..4 {
        let job = Job {
            upstream: Arc::clone(&target.upstream),
            repository: target.repository.clone(),
            digest: digest.clone(),
        };
        if let Some(joined) = state
            .fills
            .join_own(&state.cache, &state.metrics, job, held)?
        {
            let outcome = match joined.coalesced {
                true => {
                    let upstream = &target.upstream.name;
                    state.prefetch.joined(upstream, &digest, &state.metrics);
                    Outcome::Coalesced
                }
                false => Outcome::Miss,
            };
            let whole_first = version <= Version::HTTP_10;
            let response =
                respond(joined.progress, &digest, range, false, None, whole_first).await?;
            return Ok((response, outcome));
        }
        match super::holds::admit_blob(state, &target, &digest, false).await? {
            BlobSource::Own { held: now } => held = now,
            _ => return serve_any(state, target, digest, range, false, version).await,
        }
    }
    Err(ApiError::unavailable(
        "the blob is being fetched through another repository; retry shortly",
    ))
}

/// Builds the response once the fill (or the cached file) knows its size or has failed; with
/// `whole_first`, a blob of unknown length only once it is verified.
async fn respond(
    mut progress: watch::Receiver<Progress>,
    digest: &Digest,
    range: Option<&str>,
    head: bool,
    evict: Option<Evict>,
    whole_first: bool,
) -> Result<Response<Body>, ApiError> {
    let state = progress
        .wait_for(|p| match p {
            Progress::Connecting => false,
            Progress::Streaming { total: None, .. } => !whole_first,
            _ => true,
        })
        .await
        .map_err(|_| ApiError::bad_gateway("blob fill ended without an answer"))?
        .clone();
    let total = match state {
        Progress::Verified { total, .. } => Some(total),
        Progress::Streaming { total, .. } => total,
        Progress::Failed(error) => return Err(ApiError::from(&*error)),
        Progress::Connecting => unreachable!("waited for a state past Connecting"),
    };
    let request = match total {
        Some(size) => parse_range(range, size),
        None => RangeRequest::Full,
    };
    let builder = Response::builder()
        .header(CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.as_str())
        .header(ETAG, format!("\"{digest}\""))
        .header(ACCEPT_RANGES, "bytes");
    let (builder, start, end) = match request {
        RangeRequest::Unsatisfiable => {
            let size = total.unwrap_or(0);
            let content_range =
                HeaderValue::from_str(&unsatisfied_content_range(size)).expect("ascii");
            return Err(ApiError::range_not_satisfiable(content_range));
        }
        RangeRequest::Full => {
            let builder = match total {
                Some(size) => builder.header(CONTENT_LENGTH, size),
                None => builder,
            };
            (builder.status(StatusCode::OK), 0, total)
        }
        RangeRequest::Partial(range) => {
            let size = total.expect("partial ranges need a size");
            let builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_RANGE, range.content_range(size))
                .header(CONTENT_LENGTH, range.len());
            (builder, range.start, Some(range.end + 1))
        }
    };
    let body = if head {
        body::empty()
    } else {
        crate::cache::reader::blob_body(progress, start, end, evict)
    };
    Ok(builder.body(body).expect("valid response"))
}

async fn head_upstream(target: &Target, digest: &Digest) -> Served {
    let response = target
        .upstream
        .blob(Method::HEAD, &target.repository, digest)
        .await
        .map_err(|e| ApiError::from_upstream(e, Code::BlobUnknown))?;
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.as_str())
        .header(ACCEPT_RANGES, "bytes");
    if let Some(size) = content_length(response.headers()) {
        builder = builder.header(CONTENT_LENGTH, size);
    }
    Ok((
        builder.body(body::empty()).expect("valid response"),
        Outcome::Bypass,
    ))
}
