//! Peer requests, both sides. The asker (a replica that missed) sends
//! `GET <owner>/v2/<repository>/blobs/<digest>?ns=<upstream host>` with the peer token in
//! `x-berth-peer-token` (never the client's `Authorization`); the owner serves it like any
//! blob request except that it never asks the ring again (it fills itself even if it thinks
//! another replica owns the digest), skips client authorization (the asker authorized its
//! client), and answers 503 with `x-berth-draining` while it shuts down. In the policy mode the
//! asker applied the holdings rule for its client before asking, and the owner applies it for
//! the asked (upstream, repository) as for any request: it serves only bytes that upstream
//! served, else confirms, verifies or fills them through that repository first.
//!
//! The owner's 200 carries the object's provenance (`x-berth-provenance`: the upstreams that
//! served bytes verified as the digest, the asked one first), so the asker records where the
//! bytes came from rather than assuming it, and in the policy mode later accepts HEAD
//! confirmations only from those upstreams.
//!
//! A HEAD of a blob the asker does not hold goes to the owner the same way (`head_owner`), so
//! the owner's cache answers it, or the owner's own upstream HEAD.
//!
//! Any answer but a 200 with a body and a provenance naming the asked upstream, or no answer in
//! time, is a fallback: the caller (`fill`) fetches from the upstream itself. The body a 200 carries is verified by the asker's fill
//! like any upstream body, and a body cut mid-way is resumed from the upstream with a Range.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::token::PEER_TOKEN_HEADER;
use super::Cluster;
use crate::oci::digest::Digest;
use crate::oci::name::Repository;

/// Set by a draining owner on its 503, so askers drop it from the ring before DNS notices.
pub const DRAINING_HEADER: &str = "x-berth-draining";

/// The upstreams an owner's answer was served through (comma-separated, the asked one first).
pub const PROVENANCE_HEADER: &str = "x-berth-provenance";

/// Upstreams a provenance names at most (`cache::origins` remembers as many per object).
const MAX_PROVENANCE: usize = crate::cache::origins::MAX_FROM;

/// An owner's 200: the body to fill from, and the upstreams that served those bytes.
pub struct PeerAnswer {
    pub response: Response<Incoming>,
    pub provenance: Vec<Arc<str>>,
}

/// The owner's `X-Cache` outcome, read by the asker for the `hit` / `fill` result label.
const CACHE_HEADER: &str = "x-cache";

impl Cluster {
    /// Asks the owner of `digest` for it, unless this replica owns it. `Some` only for a 200
    /// whose body the caller then reads as the first source of its fill.
    pub async fn ask_owner(
        &self,
        upstream: &str,
        repository: &Repository,
        digest: &Digest,
    ) -> Option<PeerAnswer> {
        let (response, provenance) = self.ask(Method::GET, upstream, repository, digest).await?;
        // `berth_peer_bytes_total` counts the bytes as the fill receives them (`fill::receive`),
        // not the promised length: a transfer cut mid-way counts what came.
        Some(PeerAnswer {
            response,
            provenance,
        })
    }

    /// Asks the owner of `digest` for its head, unless this replica owns it: the owner answers
    /// from its cache, or with its own upstream HEAD, so a location HEADs its upstream once per
    /// blob like it GETs it once. `Some` only for a 200 through the asked upstream.
    pub async fn head_owner(
        &self,
        upstream: &str,
        repository: &Repository,
        digest: &Digest,
    ) -> Option<Response<Incoming>> {
        let asked = self.ask(Method::HEAD, upstream, repository, digest).await;
        asked.map(|(response, _)| response)
    }

    /// Sends the peer request; the owner's answer when it is a 200 whose provenance names the
    /// asked upstream, with that provenance. Counts the result; a failed or draining owner is
    /// noted in `members`.
    async fn ask(
        &self,
        method: Method,
        upstream: &str,
        repository: &Repository,
        digest: &Digest,
    ) -> Option<(Response<Incoming>, Vec<Arc<str>>)> {
        let owner = self.members.owner(digest.as_str())?;
        if *owner == *self.self_url {
            return None;
        }
        let uri = format!(
            "{owner}/v2/{}/blobs/{digest}?ns={upstream}",
            repository.as_str()
        );
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(PEER_TOKEN_HEADER, self.peer_token_header())
            .body(Full::new(Bytes::new()))
            .ok()?;
        let started = Instant::now();
        let answer = self.client.send(request).await;
        let count = |result: &str| self.metrics.requests.with_label_values(&[result]).inc();
        let response = match answer {
            Ok(response) => response,
            Err(err) => {
                if self.members.failed(&owner) {
                    tracing::warn!(%owner, "peer failing repeatedly; left out of the ring for a while");
                }
                tracing::info!(%owner, %digest, error = %err, "peer request failed; fetching from the upstream");
                count("fallback");
                return None;
            }
        };
        self.members.succeeded(&owner);
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE
            && response.headers().contains_key(DRAINING_HEADER)
        {
            self.members.drained(&owner);
            tracing::info!(%owner, "peer is draining; left out of the ring");
            count("fallback");
            return None;
        }
        let provenance = read_provenance(response.headers(), upstream);
        let Some(provenance) = provenance.filter(|_| status == StatusCode::OK) else {
            tracing::info!(%owner, %digest, %status, "peer refused, or named no provenance through this upstream; fetching from the upstream");
            count("refused");
            return None;
        };
        self.metrics
            .time_to_first_byte
            .observe(started.elapsed().as_secs_f64());
        let hit = response
            .headers()
            .get(CACHE_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"hit"));
        count(if hit { "hit" } else { "fill" });
        Some((response, provenance))
    }

    /// Whether `headers` carry a valid peer token: such a request comes from a replica of this
    /// location. Without one (or with a wrong one) a request is an ordinary client request.
    pub fn is_peer_request(&self, headers: &http::HeaderMap) -> bool {
        let Some(tokens) = &self.tokens else {
            return false;
        };
        let tokens = tokens.current();
        headers
            .get(PEER_TOKEN_HEADER)
            .is_some_and(|token| tokens.accepts(token.as_bytes()))
    }

    fn peer_token_header(&self) -> HeaderValue {
        let tokens = self.tokens.as_ref().map(|t| t.current());
        let token = tokens.as_ref().map_or("", |t| t.to_send().expose());
        let mut value =
            HeaderValue::from_str(token).unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

/// The provenance header of an owner's answer: `upstream` (the one it was asked through: it
/// served the bytes, or is filling them) first, then the others in `from`, at most
/// `MAX_PROVENANCE`.
pub fn provenance_header<'a>(
    upstream: &'a str,
    from: impl Iterator<Item = &'a str>,
) -> HeaderValue {
    let mut names = vec![upstream];
    names.extend(from.filter(|u| *u != upstream));
    names.truncate(MAX_PROVENANCE);
    HeaderValue::from_str(&names.join(","))
        .unwrap_or_else(|_| HeaderValue::from_str(upstream).unwrap_or(HeaderValue::from_static("")))
}

/// The upstreams an owner reports, when they include `upstream` (the asked one): else `None`,
/// and the asker fetches for itself. Names must be plain (visible ASCII, no comma, at most 255
/// bytes, as `cache::origins` stores them) and registry hosts (`host[:port]`); at most
/// `MAX_PROVENANCE` are read.
pub fn read_provenance(headers: &http::HeaderMap, upstream: &str) -> Option<Vec<Arc<str>>> {
    let value = headers.get(PROVENANCE_HEADER)?.to_str().ok()?;
    let names: Vec<Arc<str>> = value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty() && name.len() <= 255)
        .filter(|name| name.bytes().all(|b| b.is_ascii_graphic()))
        .filter(|name| crate::upstream::host::RegistryHost::parse(name).is_ok())
        .take(MAX_PROVENANCE)
        .map(Arc::from)
        .collect();
    names
        .iter()
        .any(|name| &**name == upstream)
        .then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(PROVENANCE_HEADER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn a_provenance_counts_only_when_it_names_the_asked_upstream() {
        let read = read_provenance(&headers("a.io, b.io"), "b.io").unwrap();
        assert_eq!(read, vec![Arc::from("a.io"), Arc::from("b.io")]);
        assert_eq!(read_provenance(&headers("a.io"), "b.io"), None);
        assert_eq!(read_provenance(&http::HeaderMap::new(), "b.io"), None);
    }

    #[test]
    fn a_provenance_is_bounded_and_plain() {
        let many: Vec<String> = (0..40).map(|i| format!("u{i}.io")).collect();
        let read = read_provenance(&headers(&many.join(",")), "u0.io").unwrap();
        assert_eq!(read.len(), MAX_PROVENANCE);
        // Beyond the bound the asked upstream is not read: the asker fetches for itself.
        assert_eq!(read_provenance(&headers(&many.join(",")), "u39.io"), None);
        let long = "x".repeat(300);
        assert_eq!(
            read_provenance(&headers(&format!("{long},b.io")), "b.io")
                .unwrap()
                .len(),
            1
        );
        let hostile = "b.io,user@evil.io,a.io/path,EVIL..io,169.254.169.254:80";
        let read = read_provenance(&headers(hostile), "b.io").unwrap();
        assert_eq!(
            read,
            vec![Arc::from("b.io"), Arc::from("169.254.169.254:80")]
        );
    }

    #[test]
    fn the_owner_names_the_asked_upstream_first_once() {
        let value = provenance_header("b.io", ["a.io", "b.io"].into_iter());
        assert_eq!(value.to_str().unwrap(), "b.io,a.io");
    }
}
