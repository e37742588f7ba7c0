//! Blob requests: a hit streams from disk, a miss joins (or starts) the single fill of that
//! digest and streams from the growing file, a HEAD of an uncached blob asks the digest's owner
//! replica in a location, else the upstream.
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
use crate::cache::reader::{Copier, Evict};
use crate::cache::Outcome;
use crate::cache::Progress;
use crate::error::{ApiError, Code};
use crate::fill::Job;
use crate::oci::digest::Digest;
use crate::oci::range::{parse_range, unsatisfied_content_range, RangeRequest};
use crate::route::Target;
use crate::upstream::content_length;
use crate::AppState;

/// What of the client's connection a blob response depends on.
#[derive(Clone, Copy)]
pub struct Client {
    /// HTTP/1.0 cannot tell a cut body from a whole one (see `whole_first`).
    pub version: Version,
    /// Whether a hit may be sent from a map of the file (`Copier`).
    pub copier: Copier,
    /// Another replica's fill asking this one, the blob's owner (`cluster::peer`).
    pub from_peer: bool,
}

pub async fn serve(
    state: &Arc<AppState>,
    target: Target,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
    client: Client,
) -> Served {
    let digest = Digest::parse(digest)?;
    // A client's GET (never a HEAD, never another replica's) of an image's first blob starts
    // the prefetch of its others (`prefetch.trigger = "first_blob"`); this one is served below.
    if !head && !client.from_peer {
        let at = super::prefetch_fillers(state);
        let repository = &target.repository;
        (state.prefetch).blob_requested(at, &target.upstream, repository, &digest);
    }
    let range = headers.get(RANGE).and_then(|v| v.to_str().ok());
    let upstream = Arc::clone(&target.upstream.name);
    // Policy mode: cached bytes, or a fill another request started, only for a repository
    // holding them on an upstream that served them (`holds`). A peer request (another
    // replica's fill) is held to the rule like a client: the owner serves only bytes the asked
    // upstream served, through the asked repository, else fills or verifies them first.
    let served = match super::holds::admit_blob(state, &target, &digest, head).await? {
        BlobSource::Any => serve_any(state, target, digest.clone(), range, head, client).await,
        BlobSource::Upstream => return head_upstream(&target, &digest).await,
        BlobSource::Own { .. } if head => return head_upstream(&target, &digest).await,
        BlobSource::Own { held } => {
            let wanted = (digest.clone(), held);
            serve_own(state, target, wanted, range, client).await
        }
    };
    match client.from_peer {
        true => with_provenance(state, &upstream, &digest, served?).await,
        false => served,
    }
}

/// An owner's answer to a peer request names the upstreams that served the bytes
/// (`cluster::peer`), the asked one first. A cached copy the asked upstream never served gets
/// none: the asker then fetches for itself rather than credit that upstream with it.
async fn with_provenance(
    state: &AppState,
    upstream: &str,
    digest: &Digest,
    (mut response, outcome): (Response<Body>, Outcome),
) -> Served {
    let origin = super::holds::origin_of(state, digest, true).await;
    if outcome != Outcome::Hit || origin.served_by(upstream) {
        let from = origin.from.iter().map(|u| &**u);
        let value = crate::cluster::peer::provenance_header(upstream, from);
        let name = http::header::HeaderName::from_static(crate::cluster::peer::PROVENANCE_HEADER);
        response.headers_mut().insert(name, value);
    }
    Ok((response, outcome))
}

/// Serves a blob from the cache or from any fill of it, starting one if none runs.
async fn serve_any(
    state: &Arc<AppState>,
    target: Target,
    digest: Digest,
    range: Option<&str>,
    head: bool,
    client: Client,
) -> Served {
    if let Some(progress) = crate::cache::open_cached(&state.cache, &state.metrics, &digest) {
        let evict = Evict {
            cache: Arc::clone(&state.cache),
            metrics: Arc::clone(&state.metrics),
            digest: digest.clone(),
        };
        let evict = Some(evict);
        let response = respond(progress, &digest, range, head, evict, false, client.copier).await?;
        return Ok((response, Outcome::Hit));
    }
    if head {
        return head_uncached(state, &target, &digest, client.from_peer).await;
    }
    let target_upstream = Arc::clone(&target.upstream.name);
    let job = Job {
        upstream: target.upstream,
        repository: target.repository,
        digest: digest.clone(),
        from_peer: client.from_peer,
        prefetch: false,
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
    let whole_first = client.version <= Version::HTTP_10;
    let progress = joined.progress;
    let copier = client.copier;
    let response = respond(progress, &digest, range, head, None, whole_first, copier).await?;
    Ok((response, outcome))
}

/// Serves a blob only from a fill from the target's upstream (`Fills::join_own`). Should the
/// digest meanwhile be cached or filled from elsewhere, the rule is applied again, a bounded
/// number of times.
async fn serve_own(
    state: &Arc<AppState>,
    target: Target,
    (digest, mut held): (Digest, bool),
    range: Option<&str>,
    client: Client,
) -> Served {
    for _ in 0..4 {
        let job = Job {
            upstream: Arc::clone(&target.upstream),
            repository: target.repository.clone(),
            digest: digest.clone(),
            from_peer: client.from_peer,
            prefetch: false,
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
            let whole_first = client.version <= Version::HTTP_10;
            let (progress, copier) = (joined.progress, client.copier);
            let response =
                respond(progress, &digest, range, false, None, whole_first, copier).await?;
            return Ok((response, outcome));
        }
        match super::holds::admit_blob(state, &target, &digest, false).await? {
            BlobSource::Own { held: now } => held = now,
            _ => return serve_any(state, target, digest, range, false, client).await,
        }
    }
    Err(ApiError::unavailable(
        "the blob is being fetched through another repository; retry shortly",
    ))
}

/// Builds the response once the fill (or the cached file) knows its size or has failed; with
/// `whole_first`, a blob of unknown length only once it is verified. `copier` says who copies
/// the body's bytes.
async fn respond(
    mut progress: watch::Receiver<Progress>,
    digest: &Digest,
    range: Option<&str>,
    head: bool,
    evict: Option<Evict>,
    whole_first: bool,
    copier: Copier,
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
        crate::cache::reader::blob_body(progress, start, end, evict, copier)
    };
    Ok(builder.body(body).expect("valid response"))
}

/// A HEAD of a blob not cached here: in a location, the digest's owner replica answers it
/// (from its cache, or its own upstream HEAD) as it would a GET, so the location asks its
/// upstream once; a peer request, or no answer from the owner, asks the upstream.
async fn head_uncached(
    state: &AppState,
    target: &Target,
    digest: &Digest,
    from_peer: bool,
) -> Served {
    if let Some(cluster) = state.cluster.as_ref().filter(|_| !from_peer) {
        let upstream = &target.upstream.name;
        let asked = cluster.head_owner(upstream, &target.repository, digest);
        if let Some(answer) = asked.await {
            let size = content_length(answer.headers());
            return Ok((head_response(digest, size), Outcome::Bypass));
        }
    }
    head_upstream(target, digest).await
}

async fn head_upstream(target: &Target, digest: &Digest) -> Served {
    let response = target
        .upstream
        .blob(Method::HEAD, &target.repository, digest)
        .await
        .map_err(|e| ApiError::from_upstream(e, Code::BlobUnknown))?;
    let size = content_length(response.headers());
    Ok((head_response(digest, size), Outcome::Bypass))
}

/// The answer to a HEAD of a blob that is not cached here, of `size` bytes if known.
fn head_response(digest: &Digest, size: Option<u64>) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.as_str())
        .header(ACCEPT_RANGES, "bytes");
    if let Some(size) = size {
        builder = builder.header(CONTENT_LENGTH, size);
    }
    builder.body(body::empty()).expect("valid response")
}
