//! The policy access mode's rule for cached content, applied to requests: before a blob or a
//! manifest is served for repository R on upstream U, U must have served its bytes and R must
//! be known to hold it there; else U confirms (HEAD, only when it served the bytes) or serves
//! the bytes through R, verified. The rule itself is `access::holdings::decide`; the facts are
//! `cache::origins`. This file gathers the facts, asks the upstream, and records what each
//! fetch and each manifest served for R teaches.

use std::sync::Arc;

use http::header::HeaderValue;
use http::Method;
use http_body_util::BodyExt;

use crate::access::holdings::{decide, key, Decision, Listed};
use crate::cache::{Manifest, Origin};
use crate::error::{ApiError, Code};
use crate::oci::digest::{Digest, Verifier};
use crate::oci::name::{Reference, Repository};
use crate::route::Target;
use crate::upstream::{Upstream, UpstreamError};
use crate::AppState;

const ANY_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// Digests one manifest may teach: an image has a few dozen, an index a few hundred; a crafted
/// manifest listing more teaches only its first ones (the rest are confirmed when asked for).
const MAX_LEARNED: usize = 1024;

/// Where a blob's bytes may come from for a request, once the rule is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlobSource {
    /// The cache, or any fill of the digest.
    Any,
    /// Only a fill from the request's upstream (`Fills::join_own`); `held`: the repository is
    /// known to hold the digest there, so a fill through another repository will do.
    Own { held: bool },
    /// Nothing cached may be used for a HEAD: the upstream's own answer is passed on.
    Upstream,
}

/// Before a blob is served for `target`: where its bytes may come from.
pub(crate) async fn admit_blob(
    state: &AppState,
    target: &Target,
    digest: &Digest,
    head: bool,
) -> Result<BlobSource, ApiError> {
    if !state.access.enforcing() {
        return Ok(BlobSource::Any);
    }
    let cached = state.cache.index.contains(digest);
    let origin = origin_of(state, digest, cached).await;
    let filling = state.fills.filling(&target.upstream.name, digest);
    let upstream = &*target.upstream.name;
    let decision = decide(
        &origin,
        upstream,
        &target.repository,
        cached,
        filling.as_ref().map(|(u, _)| &**u),
    );
    // The bytes are U's when U served them before; else only a fill from U is.
    let settled = match origin.served_by(upstream) {
        true => BlobSource::Any,
        false => BlobSource::Own { held: true },
    };
    match decision {
        Decision::Serve => Ok(settled),
        Decision::Confirm => {
            confirm(state, target, digest, Code::BlobUnknown, head_blob).await?;
            Ok(settled)
        }
        Decision::Verify if head => Ok(BlobSource::Upstream),
        Decision::Verify => {
            verify_blob(state, target, digest).await?;
            Ok(BlobSource::Any)
        }
        Decision::Fill if head => Ok(BlobSource::Upstream),
        Decision::Fill => Ok(BlobSource::Own { held: false }),
    }
}

/// Before a manifest is looked up by digest for `target`: whether the cached copy may be
/// served (`false`: fetch it through the target, verified, instead).
pub(crate) async fn admit_manifest(
    state: &AppState,
    target: &Target,
    digest: &Digest,
) -> Result<bool, ApiError> {
    if !state.access.enforcing() {
        return Ok(true);
    }
    let cached = state.cache.index.contains(digest);
    let origin = origin_of(state, digest, cached).await;
    match decide(
        &origin,
        &target.upstream.name,
        &target.repository,
        cached,
        None,
    ) {
        Decision::Serve => Ok(true),
        Decision::Confirm => {
            confirm(state, target, digest, Code::ManifestUnknown, head_manifest).await?;
            Ok(true)
        }
        Decision::Verify | Decision::Fill => Ok(false),
    }
}

/// A tag revalidation answered `digest`, which is cached: whether it may be served for
/// `target` without fetching. The upstream's word counts only when it served those bytes.
pub(crate) async fn admit_revalidated(state: &AppState, target: &Target, digest: &Digest) -> bool {
    if !state.access.enforcing() {
        return true;
    }
    let origin = origin_of(state, digest, true).await;
    if !origin.served_by(&target.upstream.name) {
        tracing::info!(upstream = %target.upstream.name, %digest, "a tag points at content this upstream never served; fetching it");
        return false;
    }
    learn(state, target, vec![digest.clone()]).await;
    true
}

/// After a manifest was fetched through `target` and verified: the target's upstream served
/// it and its repository holds it. Recorded in every mode, so switching to the policy mode
/// keeps what the cache knows.
pub(crate) async fn record_fetched(state: &AppState, target: &Target, manifest: &Manifest) {
    let origins = Arc::clone(&state.cache.origins);
    let persist = state.cache.index.contains(&manifest.digest);
    let (digest, upstream, repository) = (
        manifest.digest.clone(),
        Arc::clone(&target.upstream.name),
        target.repository.clone(),
    );
    let _ = tokio::task::spawn_blocking(move || {
        origins.fetched(&digest, &upstream, &repository, persist)
    })
    .await;
}

/// After a manifest was served for `target`: its repository holds it and what it `listed`.
pub(crate) async fn record_manifest(
    state: &AppState,
    target: &Target,
    manifest: &Manifest,
    listed: &Listed<'_>,
) {
    if !state.access.enforcing() {
        return;
    }
    let listed = listed.digests();
    let mut digests = listed[..listed.len().min(MAX_LEARNED)].to_vec();
    digests.push(manifest.digest.clone());
    learn(state, target, digests).await;
}

/// Records that the target's repository holds `digests` on its upstream; on disk for those
/// that are cached.
async fn learn(state: &AppState, target: &Target, digests: Vec<Digest>) {
    let upstream = Arc::clone(&target.upstream.name);
    let repository = target.repository.clone();
    let new: Vec<(Digest, bool)> = digests
        .into_iter()
        .filter(|digest| {
            let known = state.cache.origins.get_cached(digest);
            !known.is_some_and(|origin| origin.held_by(&upstream, &repository))
        })
        .map(|digest| {
            let cached = state.cache.index.contains(&digest);
            (digest, cached)
        })
        .collect();
    if new.is_empty() {
        return;
    }
    let origins = Arc::clone(&state.cache.origins);
    let _ = tokio::task::spawn_blocking(move || {
        for (digest, cached) in new {
            origins.learned(&digest, &upstream, &repository, cached);
        }
    })
    .await;
}

/// What is known about `digest`; from its sidecar only when it is `cached` (an object that is
/// not has none), so asking for random digests costs no disk reads.
pub(super) async fn origin_of(state: &AppState, digest: &Digest, cached: bool) -> Arc<Origin> {
    if let Some(origin) = state.cache.origins.get_cached(digest) {
        return origin;
    }
    if !cached {
        return Arc::default();
    }
    let origins = Arc::clone(&state.cache.origins);
    let owned = digest.clone();
    tokio::task::spawn_blocking(move || origins.get(&owned))
        .await
        .unwrap_or_default()
}

async fn head_blob(
    upstream: Arc<Upstream>,
    repository: Repository,
    digest: Digest,
) -> Result<(), UpstreamError> {
    upstream
        .blob(Method::HEAD, &repository, &digest)
        .await
        .map(drop)
}

async fn head_manifest(
    upstream: Arc<Upstream>,
    repository: Repository,
    digest: Digest,
) -> Result<(), UpstreamError> {
    // Any manifest type will do: the question is only whether the digest is there. The types
    // are listed because distribution answers 404 to an OCI manifest when the Accept header
    // does not name OCI types, `*/*` included.
    let accept = HeaderValue::from_static(ANY_MANIFEST);
    let reference = Reference::Digest(digest);
    upstream
        .manifest(Method::HEAD, &repository, &reference, Some(&accept))
        .await
        .map(drop)
}

/// One coalesced `ask` of the target's upstream whether its repository holds `digest`; a yes
/// is recorded, a 404 becomes `unknown`.
async fn confirm<F>(
    state: &AppState,
    target: &Target,
    digest: &Digest,
    unknown: Code,
    ask: impl FnOnce(Arc<Upstream>, Repository, Digest) -> F,
) -> Result<(), ApiError>
where
    F: std::future::Future<Output = Result<(), UpstreamError>> + Send + 'static,
{
    let (upstream, repository) = (Arc::clone(&target.upstream), target.repository.clone());
    let flight_key = key(&upstream.name, &repository, digest);
    let owned = digest.clone();
    let (answer, _) = state
        .access
        .holdings
        .confirmations
        .run(flight_key, move || {
            let asked = ask(upstream, repository, owned);
            async move { asked.await.map_err(|e| ApiError::from_upstream(e, unknown)) }
        })
        .await;
    answer?;
    learn(state, target, vec![digest.clone()]).await;
    Ok(())
}

/// Fetches a cached (or elsewhere-filling) blob through the target and checks it hashes to
/// `digest`, without keeping the bytes: then the target's upstream served it and its repository
/// holds it. Coalesced per (upstream, repository, digest).
async fn verify_blob(state: &AppState, target: &Target, digest: &Digest) -> Result<(), ApiError> {
    let (upstream, repository) = (Arc::clone(&target.upstream), target.repository.clone());
    let flight_key = key(&upstream.name, &repository, digest);
    let owned = digest.clone();
    let expected = state.cache.index.get(digest).map(|entry| entry.size);
    let read_timeout = state.config.client.read_timeout;
    let metrics = Arc::clone(&state.metrics);
    let (answer, _) = state
        .access
        .holdings
        .verifications
        .run(flight_key, move || async move {
            let response = upstream
                .blob(Method::GET, &repository, &owned)
                .await
                .map_err(|e| ApiError::from_upstream(e, Code::BlobUnknown))?;
            let announced = crate::upstream::content_length(response.headers());
            // Never hash more than the blob can be: its cached size, else what was announced.
            let limit = expected.or(announced).ok_or_else(|| {
                unverified("the upstream announced no length for a blob held elsewhere")
            })?;
            let mut body = response.into_body();
            let mut verifier = Verifier::new();
            let mut received = 0u64;
            loop {
                let frame = match tokio::time::timeout(read_timeout, body.frame()).await {
                    Err(_) => return Err(unverified("blob body stalled")),
                    Ok(None) => break,
                    Ok(Some(Err(err))) => {
                        return Err(unverified("blob body failed")
                            .with_internal(format!("blob body: {err}")))
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                received += data.len() as u64;
                if received > limit {
                    return Err(unverified("the upstream sent more than the blob holds"));
                }
                verifier.update(&data);
            }
            metrics
                .upstream_bytes
                .with_label_values(&["blob"])
                .inc_by(received);
            if verifier.finish() != owned {
                metrics.digest_mismatches.inc();
                return Err(ApiError::blob_unknown(format!(
                    "{}/{repository} sent other bytes for {owned}",
                    upstream.name
                )));
            }
            Ok(())
        })
        .await;
    answer?;
    let origins = Arc::clone(&state.cache.origins);
    let persist = state.cache.index.contains(digest);
    let (digest, upstream, repository) = (
        digest.clone(),
        Arc::clone(&target.upstream.name),
        target.repository.clone(),
    );
    let _ = tokio::task::spawn_blocking(move || {
        origins.fetched(&digest, &upstream, &repository, persist)
    })
    .await;
    Ok(())
}

fn unverified(detail: &str) -> ApiError {
    ApiError::bad_gateway("the upstream could not show it holds this blob")
        .with_detail(detail.to_string())
}
