//! Peer requests, both sides. The asker (a replica that missed) sends
//! `GET <owner>/v2/<repository>/blobs/<digest>?ns=<upstream host>` with the peer token in
//! `x-berth-peer-token` (never the client's `Authorization`); the owner serves it like any
//! blob request except that it never asks the ring again (it fills itself even if it thinks
//! another replica owns the digest), skips client authorization (the asker authorized its
//! client), and answers 503 with `x-berth-draining` while it shuts down.
//!
//! Any answer but a 200 with a body, or no answer in time, is a fallback: the caller (`fill`)
//! fetches from the upstream itself. The body a 200 carries is verified by the asker's fill
//! like any upstream body, and a body cut mid-way is resumed from the upstream with a Range.

use std::time::Instant;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::token::PEER_TOKEN_HEADER;
use super::Cluster;
use crate::oci::digest::Digest;
use crate::oci::name::Repository;

/// Set by a draining owner on its 503, so askers drop it from the ring before DNS notices.
pub const DRAINING_HEADER: &str = "x-berth-draining";

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
    ) -> Option<Response<Incoming>> {
        let owner = self.members.owner(digest.as_str())?;
        if *owner == *self.self_url {
            return None;
        }
        let uri = format!(
            "{owner}/v2/{}/blobs/{digest}?ns={upstream}",
            repository.as_str()
        );
        let request = Request::get(uri)
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
        if status != StatusCode::OK {
            tracing::info!(%owner, %digest, %status, "peer refused; fetching from the upstream");
            count("refused");
            return None;
        }
        self.metrics
            .time_to_first_byte
            .observe(started.elapsed().as_secs_f64());
        if let Some(length) = crate::upstream::content_length(response.headers()) {
            self.metrics.bytes.inc_by(length);
        }
        let hit = response
            .headers()
            .get(CACHE_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"hit"));
        count(if hit { "hit" } else { "fill" });
        Some(response)
    }

    /// Whether `headers` carry a valid peer token: such a request comes from a replica of this
    /// location. Without one (or with a wrong one) a request is an ordinary client request.
    pub fn is_peer_request(&self, headers: &http::HeaderMap) -> bool {
        let Some(tokens) = &self.tokens else {
            return false;
        };
        headers
            .get(PEER_TOKEN_HEADER)
            .is_some_and(|token| tokens.accepts(token.as_bytes()))
    }

    fn peer_token_header(&self) -> HeaderValue {
        let token = self.tokens.as_ref().map_or("", |t| t.to_send().expose());
        let mut value =
            HeaderValue::from_str(token).unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}
