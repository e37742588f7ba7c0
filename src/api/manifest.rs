//! Manifest requests. By digest: immutable, served from the cache for good once fetched. By tag:
//! the tag table maps to a digest for `tag_ttl`; after that a HEAD to the upstream revalidates
//! it (Docker Hub does not count HEADs against its pull limit) and the body is fetched only
//! when the digest changed and is not cached.
//!
//! Bytes are passed through exactly as the upstream sent them, never re-serialised, after
//! checking they hash to the digest asked for or announced. Their media type is the document's
//! (`oci::manifest`), never the response's `Content-Type`, and their body has a deadline. Concurrent misses of one manifest,
//! and concurrent revalidations of one tag, share one upstream request.
//!
//! One tag answers different manifests, or a 404, to clients accepting different manifest
//! types, so everything about a tag (its mapping, a remembered 404, an in-flight fetch or
//! revalidation) is keyed by the request's Accept class (`oci::accept`), and the upstream gets
//! that class's canonical `Accept`, on the GET and on the revalidating HEAD alike. A HEAD
//! answered without `Docker-Content-Digest` (some registries and CDNs drop it) falls back to
//! one GET.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::Served;
use crate::access::holdings::Listed;
use crate::body;
use crate::cache::{Manifest, Outcome, TagEntry, TagKey};
use crate::error::{ApiError, ManifestError};
use crate::flight::{Flights, Role};
use crate::oci::accept::AcceptClass;
use crate::oci::digest::Digest;
use crate::oci::name::{NameError, Reference, Repository, Tag};
use crate::route::Target;
use crate::AppState;

/// The distribution registry refuses manifests over 4 MiB; so does berth.
const MAX_MANIFEST: usize = 4 << 20;

/// What a manifest fetch is keyed by: the upstream, a digest and the Accept class, or a tag
/// (whose key holds the upstream and the Accept class). A digest fetch is joined only by
/// requests routed to the same upstream (as blob fills are): a slow or hostile upstream's fetch
/// must not hold, or fail, the clients of another one. It carries the class too: distribution
/// refuses an OCI manifest even by digest to a client without the OCI types, and that refusal
/// must not reach a coalesced client with them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum FetchKey {
    /// By repository too: a fetch through one repository must not answer another (the policy
    /// access mode serves content only to repositories that hold it).
    Digest(Arc<str>, Repository, Digest, AcceptClass),
    Tag(TagKey),
}

pub(crate) type ManifestFlights = Flights<FetchKey, Result<Manifest, ManifestError>>;
/// The digest a tag points at now, or `None` when the upstream's HEAD did not say.
pub(crate) type RevalidationFlights = Flights<TagKey, Result<Option<Digest>, ManifestError>>;

pub async fn serve(
    state: &Arc<AppState>,
    target: Target,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Served {
    let reference = Reference::parse(reference).map_err(reference_error)?;
    let accept = AcceptClass::from_headers(headers);
    let holder = target.clone();
    let (manifest, outcome) = match reference {
        Reference::Digest(digest) => by_digest(state, target, digest, accept).await?,
        Reference::Tag(tag) => by_tag(state, target, tag, accept).await?,
    };
    // What the manifest lists, read once for the holdings rule and prefetch alike.
    let listed = Listed::new(&manifest.bytes);
    super::holds::record_manifest(state, &holder, &manifest, &listed).await;
    if !head {
        prefetch(state, &holder, &manifest, &listed);
    }
    Ok((response(&manifest, head), outcome))
}

/// A GET (never a HEAD) of an image manifest, answered after the authorize phase: the fills
/// of its missing blobs start now, or at its first blob GET (`prefetch.trigger`), through the
/// request's own upstream and repository.
fn prefetch(state: &Arc<AppState>, target: &Target, manifest: &Manifest, listed: &Listed<'_>) {
    let image = (&target.repository, manifest);
    let at = super::prefetch_fillers(state);
    state
        .prefetch
        .manifest_served(at, &target.upstream, image, listed);
}

/// A reference that is not a valid tag names a manifest no registry can hold: 404
/// MANIFEST_UNKNOWN, as distribution answers (the OCI conformance suite asks for
/// `.INVALID_MANIFEST_NAME`). Something that looks like a digest (it has a `:`) but is
/// malformed stays 400 DIGEST_INVALID.
fn reference_error(err: NameError) -> ApiError {
    match err {
        NameError::Digest(err) => err.into(),
        other => ApiError::manifest_unknown(other.to_string()),
    }
}

async fn by_digest(
    state: &Arc<AppState>,
    target: Target,
    digest: Digest,
    accept: AcceptClass,
) -> Result<(Manifest, Outcome), ApiError> {
    // Policy mode: the cached copy only when the target may have it, else fetch through it.
    if super::holds::admit_manifest(state, &target, &digest).await? {
        if let Some(manifest) = state.cache.manifest(&digest).await {
            return Ok((manifest, Outcome::Hit));
        }
    }
    let key = FetchKey::Digest(
        Arc::clone(&target.upstream.name),
        target.repository.clone(),
        digest.clone(),
        accept,
    );
    let work_state = Arc::clone(state);
    let (fetched, role) = state
        .manifest_flights
        .run(key, move || {
            fetch(work_state, target, Reference::Digest(digest), accept)
        })
        .await;
    Ok((fetched?, miss_outcome(role)))
}

async fn by_tag(
    state: &Arc<AppState>,
    target: Target,
    tag: Tag,
    accept: AcceptClass,
) -> Result<(Manifest, Outcome), ApiError> {
    let key = TagKey {
        upstream: Arc::clone(&target.upstream.name),
        repository: target.repository.clone(),
        tag,
        accept,
    };
    let upstream = Arc::clone(&target.upstream);
    let clock = state.cache.tags.clock;
    let (ttl, stale) = (upstream.tag_ttl, upstream.stale_if_error);
    let known = last_known(state, &key).await;
    if let Some((entry, manifest)) = &known {
        if decide(entry, clock.now_ms(), ttl, stale) == TagAge::Fresh {
            return Ok((manifest.clone(), Outcome::Hit));
        }
    }
    if known.is_none() && state.cache.tags.is_missing(&key, upstream.negative_ttl) {
        state.metrics.negative_hits.inc();
        return Err(ApiError::tag_unknown(&key.repository, &key.tag));
    }
    let answered = match &known {
        Some(_) => match revalidate(state, &target, &key).await {
            Ok(Some(current)) => return Ok((current, Outcome::Revalidated)),
            Ok(None) => fetch_tag(state, target, key.clone()).await,
            Err(error) => Err(error),
        },
        None => fetch_tag(state, target, key.clone()).await,
    };
    let error = match answered {
        Ok(answer) => return Ok(answer),
        Err(error) => error,
    };
    if error.is_not_found() {
        state.cache.forget_tag(key);
        return Err(error.into());
    }
    match known {
        // Judged again now: the failed request took time, and the stale window may have ended.
        Some((entry, manifest))
            if error.is_upstream_failure()
                && decide(&entry, clock.now_ms(), ttl, stale) != TagAge::Expired =>
        {
            state.metrics.stale_served.inc();
            tracing::warn!(upstream = %upstream.name, tag = %key.tag, error = %error, "serving a stale tag");
            Ok((manifest, Outcome::Stale))
        }
        _ => Err(error.into()),
    }
}

/// How old a tag's mapping is, against its upstream's `tag_ttl` and `stale_if_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagAge {
    /// Inside `tag_ttl`: served without asking the upstream.
    Fresh,
    /// Past `tag_ttl`: revalidated; if the upstream fails (unreachable, 5xx, 429), served stale.
    Stale,
    /// Past `tag_ttl + stale_if_error` too: revalidated, and an upstream failure is the answer.
    Expired,
}

/// The freshness of `entry` at `now_ms` (the tag table's clock; a check in the future, after
/// a clock step backwards, counts as just made).
fn decide(entry: &TagEntry, now_ms: u64, ttl: Duration, stale: Duration) -> TagAge {
    let age = Duration::from_millis(now_ms.saturating_sub(entry.checked_ms));
    if age < ttl {
        TagAge::Fresh
    } else if age < ttl + stale {
        TagAge::Stale
    } else {
        TagAge::Expired
    }
}

/// The tag's last known mapping for this Accept class, if the manifest is still cached.
async fn last_known(state: &AppState, key: &TagKey) -> Option<(TagEntry, Manifest)> {
    let entry = state.cache.tags.get(key)?;
    let manifest = state.cache.manifest(&entry.digest).await?;
    Some((entry, manifest))
}

/// GETs the tag's manifest (one request however many clients ask) and records the mapping.
async fn fetch_tag(
    state: &Arc<AppState>,
    target: Target,
    key: TagKey,
) -> Result<(Manifest, Outcome), ManifestError> {
    let work_state = Arc::clone(state);
    let work_key = key.clone();
    let tag = key.tag.clone();
    let accept = key.accept;
    let (fetched, role) = state
        .manifest_flights
        .run(FetchKey::Tag(key), move || async move {
            let reference = Reference::Tag(tag);
            let manifest = fetch(Arc::clone(&work_state), target, reference, accept).await?;
            remember_tag(&work_state, work_key, &manifest);
            Ok(manifest)
        })
        .await;
    Ok((fetched?, miss_outcome(role)))
}

/// Asks the upstream (HEAD, with the class's Accept) where the tag points now. Returns the
/// manifest if it is cached, and records the answer; `None` means the body must be fetched:
/// the digest is new, or the HEAD answer named none (then one GET settles it).
async fn revalidate(
    state: &Arc<AppState>,
    target: &Target,
    key: &TagKey,
) -> Result<Option<Manifest>, ManifestError> {
    let upstream = Arc::clone(&target.upstream);
    let repository = target.repository.clone();
    let reference = Reference::Tag(key.tag.clone());
    let accept = key.accept.header_value();
    let (digest, _) = state
        .revalidations
        .run(key.clone(), move || async move {
            let response = upstream
                .manifest(Method::HEAD, &repository, &reference, accept.as_ref())
                .await?;
            let digest = announced_digest(response.headers());
            if digest.is_none() {
                tracing::debug!(upstream = %upstream.name, "HEAD without Docker-Content-Digest; falling back to GET");
            }
            Ok(digest)
        })
        .await;
    let Some(digest) = digest? else {
        return Ok(None);
    };
    let Some(manifest) = state.cache.manifest(&digest).await else {
        return Ok(None);
    };
    if !super::holds::admit_revalidated(state, target, &digest).await {
        return Ok(None);
    }
    remember_tag(state, key.clone(), &manifest);
    Ok(Some(manifest))
}

fn remember_tag(state: &AppState, key: TagKey, manifest: &Manifest) {
    let entry = TagEntry {
        digest: manifest.digest.clone(),
        media_type: Arc::clone(&manifest.media_type),
        checked_ms: state.cache.tags.clock.now_ms(),
    };
    state.cache.remember_tag(key, entry);
}

/// GETs a manifest, checks its bytes against the digest asked for and the one announced, and
/// stores it.
async fn fetch(
    state: Arc<AppState>,
    target: Target,
    reference: Reference,
    accept: AcceptClass,
) -> Result<Manifest, ManifestError> {
    let started = Instant::now();
    let accept_value = accept.header_value();
    let response = target
        .upstream
        .manifest(
            Method::GET,
            &target.repository,
            &reference,
            accept_value.as_ref(),
        )
        .await?;
    let announced = announced_digest(response.headers());
    // The response's Content-Type is not used: the document says what it is (`oci::manifest`).
    let read = Limited::new(response.into_body(), MAX_MANIFEST).collect();
    let bytes = tokio::time::timeout(state.config.client.read_timeout, read)
        .await
        .map_err(|_| bad_manifest("reading manifest: body stalled".into()))?
        .map_err(|e| bad_manifest(format!("reading manifest: {e}")))?
        .to_bytes();
    state
        .metrics
        .upstream_bytes
        .with_label_values(&["manifest"])
        .inc_by(bytes.len() as u64);
    let digest = Digest::of(&bytes);
    if let Some(wanted) = reference.digest().filter(|wanted| **wanted != digest) {
        state.metrics.digest_mismatches.inc();
        return Err(bad_manifest(format!(
            "asked for {wanted}, upstream sent {digest}"
        )));
    }
    if let Some(claimed) = announced.filter(|claimed| *claimed != digest) {
        state.metrics.digest_mismatches.inc();
        return Err(bad_manifest(format!(
            "upstream announced {claimed}, sent {digest}"
        )));
    }
    let media_type = crate::oci::manifest::media_type(&bytes)
        .map_err(|why| bad_manifest(format!("cannot type the manifest: {why}")))?;
    let manifest = Manifest {
        digest,
        media_type: media_type.into(),
        bytes,
    };
    if let Err(err) = state.cache.put_manifest(manifest.clone()).await {
        tracing::warn!(digest = %manifest.digest, %err, "cannot store manifest; serving it uncached");
    }
    super::holds::record_fetched(&state, &target, &manifest).await;
    state
        .metrics
        .manifest_fetch_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(manifest)
}

fn bad_manifest(detail: String) -> ManifestError {
    ManifestError::Invalid(detail)
}

/// `Docker-Content-Digest`, when the upstream sent a sha256 one we can check against.
fn announced_digest(headers: &HeaderMap) -> Option<Digest> {
    let value = headers.get("docker-content-digest")?.to_str().ok()?;
    Digest::parse(value.trim()).ok()
}

fn miss_outcome(role: Role) -> Outcome {
    match role {
        Role::Leader => Outcome::Miss,
        Role::Follower => Outcome::Coalesced,
    }
}

fn response(manifest: &Manifest, head: bool) -> Response<body::Body> {
    let body = if head {
        body::empty()
    } else {
        body::full(manifest.bytes.clone())
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, manifest.media_type.as_ref())
        .header(CONTENT_LENGTH, manifest.bytes.len())
        .header("docker-content-digest", manifest.digest.as_str())
        .header(ETAG, format!("\"{}\"", manifest.digest))
        .body(body)
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn checked_at(ms: u64) -> TagEntry {
        TagEntry {
            digest: Digest::of(b"{}"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_ms: ms,
        }
    }

    const TTL: Duration = Duration::from_secs(60);
    const STALE: Duration = Duration::from_secs(600);

    #[test]
    fn a_tag_inside_its_ttl_is_fresh() {
        let entry = checked_at(1_000_000);
        assert_eq!(decide(&entry, 1_000_000, TTL, STALE), TagAge::Fresh);
        assert_eq!(decide(&entry, 1_059_999, TTL, STALE), TagAge::Fresh);
    }

    #[test]
    fn a_tag_past_its_ttl_is_revalidated_and_may_be_served_stale_if_the_upstream_is_down() {
        let entry = checked_at(1_000_000);
        assert_eq!(decide(&entry, 1_060_000, TTL, STALE), TagAge::Stale);
        assert_eq!(decide(&entry, 1_659_999, TTL, STALE), TagAge::Stale);
    }

    #[test]
    fn a_tag_past_the_stale_window_is_revalidated_with_no_stale_fallback() {
        let entry = checked_at(1_000_000);
        assert_eq!(decide(&entry, 1_660_000, TTL, STALE), TagAge::Expired);
        assert_eq!(
            decide(&entry, 9_000_000, TTL, Duration::ZERO),
            TagAge::Expired
        );
        assert_eq!(
            decide(&entry, 1_060_000, TTL, Duration::ZERO),
            TagAge::Expired
        );
    }

    #[test]
    fn a_check_in_the_future_counts_as_just_made() {
        let entry = checked_at(2_000_000);
        assert_eq!(decide(&entry, 1_000_000, TTL, STALE), TagAge::Fresh);
    }

    #[test]
    fn invalid_tags_are_unknown_manifests_and_bad_digests_stay_invalid() {
        let invalid_tag = Reference::parse(".INVALID_MANIFEST_NAME").unwrap_err();
        let error = reference_error(invalid_tag);
        assert_eq!(
            (error.status, error.code),
            (StatusCode::NOT_FOUND, Code::ManifestUnknown)
        );
        let bad_digest = Reference::parse("sha256:xyz").unwrap_err();
        let error = reference_error(bad_digest);
        assert_eq!(
            (error.status, error.code),
            (StatusCode::BAD_REQUEST, Code::DigestInvalid)
        );
    }
}
