//! The cross-repository check of the policy access mode: content is served through repository R
//! only when R is known to hold its digest, else after R's upstream confirms it with a HEAD.
//! The knowledge itself (and why it is sound) is in `access::holdings`; this file asks the
//! upstream and teaches the holdings what each manifest served for R references.

use std::sync::Arc;

use http::header::HeaderValue;
use http::Method;

use crate::access::holdings::referenced_digests;
use crate::cache::Manifest;
use crate::error::{ApiError, Code};
use crate::oci::digest::Digest;
use crate::oci::name::{Reference, Repository};
use crate::route::Target;
use crate::upstream::{Upstream, UpstreamError};
use crate::AppState;

const ANY_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// Before a blob is looked up or filled for `target`: Ok if its repository holds `digest`.
pub async fn confirm_blob(
    state: &AppState,
    target: &Target,
    digest: &Digest,
) -> Result<(), ApiError> {
    let ask = |upstream: Arc<Upstream>, repository: Repository, digest: Digest| async move {
        upstream
            .blob(Method::HEAD, &repository, &digest)
            .await
            .map(drop)
    };
    confirm(state, target, digest, Code::BlobUnknown, ask).await
}

/// Before a manifest is looked up or fetched by digest for `target`: Ok if its repository holds
/// it. (A tag is always resolved by the repository's own upstream, so it needs no check.)
pub async fn confirm_manifest(
    state: &AppState,
    target: &Target,
    digest: &Digest,
) -> Result<(), ApiError> {
    let ask = |upstream: Arc<Upstream>, repository: Repository, digest: Digest| async move {
        // Any manifest type will do: the question is only whether the digest is there. The
        // types are listed because distribution answers 404 to an OCI manifest when the Accept
        // header does not name OCI types, `*/*` included.
        let accept = HeaderValue::from_static(ANY_MANIFEST);
        let reference = Reference::Digest(digest);
        upstream
            .manifest(Method::HEAD, &repository, &reference, Some(&accept))
            .await
            .map(drop)
    };
    confirm(state, target, digest, Code::ManifestUnknown, ask).await
}

/// Ok at once outside the policy mode or when the holding is known; else one coalesced `ask`
/// of the upstream (given owned copies, as the probe may outlive the request), whose 404
/// becomes `unknown`.
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
    if !state.access.enforcing() {
        return Ok(());
    }
    let (upstream, repository) = (Arc::clone(&target.upstream), target.repository.clone());
    let owned = digest.clone();
    state
        .access
        .holdings
        .confirm(
            &target.upstream.name,
            &target.repository,
            digest,
            move || ask(upstream, repository, owned),
        )
        .await
        .map_err(|e| ApiError::from_upstream(e, unknown))
}

/// After a manifest was served for `target`: its repository holds it and all it references.
pub fn record_manifest(state: &AppState, target: &Target, manifest: &Manifest) {
    if !state.access.enforcing() {
        return;
    }
    let holdings = &state.access.holdings;
    let (upstream, repository) = (&target.upstream.name, &target.repository);
    holdings.record(upstream, repository, &manifest.digest);
    for digest in referenced_digests(&manifest.bytes) {
        holdings.record(upstream, repository, &digest);
    }
}
