//! The parent tier: a regional berth that the location's owners fill from before the upstream.
//! The parent is an ordinary berth (in the policy mode): this location authenticates to it as a
//! principal of its own with Basic credentials from `parent_key_file`, so the parent's policies
//! bound what the location may pull and revoking that key cuts the location off.
//!
//! A parent request is an ordinary blob GET naming the original registry with `?ns=`; any
//! answer but a 200, or no answer in time, falls back to the upstream, and a body cut mid-way
//! is resumed from the upstream with a Range, as for a peer.

use std::path::Path;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{check_url, refuse, Cluster, ClusterError};
use crate::oci::digest::Digest;
use crate::oci::name::Repository;

/// Where the parent is and how this location proves who it is.
pub struct Parent {
    base: String,
    /// `Basic <base64(user:key)>`, marked sensitive; `None` for an anonymous-mode parent.
    authorization: Option<HeaderValue>,
}

/// `cluster.parent`: a member-like URL, and with a key (`parent_key_file`) `https`, unless it
/// names a loopback, private or unique-local address (or `localhost`). The key is a principal's
/// Basic credential; over plain http it goes in clear, so it may only go where the peer token
/// goes in clear: to internal addresses (`dns` members are only those). A host name could
/// resolve anywhere, so over http it is refused.
pub(super) fn check(url: &str, has_key: bool) -> Result<(), ClusterError> {
    check_url(url).map_err(|error| refuse("parent", error.to_string()))?;
    let uri: http::Uri = url.parse().map_err(|_| refuse("parent", "not a URL"))?;
    if has_key && uri.scheme_str() == Some("http") && !is_internal_host(uri.host()) {
        return Err(refuse(
            "parent",
            format!(
                "{url:?} would get the `parent_key_file` key in clear: use https://, or name \
                 the parent by a loopback, private or unique-local address"
            ),
        ));
    }
    Ok(())
}

/// Whether `host` is `localhost` or an internal IP literal (IPv6 in brackets).
fn is_internal_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    literal
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| crate::net::address::classify(ip).is_internal())
}

impl Parent {
    pub fn from_config(url: &str, key_file: Option<&Path>) -> Result<Parent, ClusterError> {
        check(url, key_file.is_some())?;
        let authorization = match key_file {
            Some(path) => Some(basic(path)?),
            None => None,
        };
        Ok(Parent {
            base: url.trim_end_matches('/').to_owned(),
            authorization,
        })
    }
}

/// The key file holds `user:key` on its first line, as any Basic client of the parent presents
/// it (`<token>:KEY` for a service account, `EMAIL:KEY` for a user).
fn basic(path: &Path) -> Result<HeaderValue, ClusterError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        refuse(
            "parent_key_file",
            format!("cannot read {}: {err}", path.display()),
        )
    })?;
    let key = text.lines().next().unwrap_or("").trim();
    if !key.contains(':') {
        return Err(refuse(
            "parent_key_file",
            "the first line must be `user:key`",
        ));
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(key);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|_| refuse("parent_key_file", "not a header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

impl Cluster {
    /// Asks the parent for the blob, `Some` only for a 200. The caller falls back to the
    /// upstream otherwise.
    pub async fn ask_parent(
        &self,
        upstream: &str,
        repository: &Repository,
        digest: &Digest,
    ) -> Option<Response<Incoming>> {
        let parent = self.parent.as_ref()?;
        let uri = format!(
            "{}/v2/{}/blobs/{digest}?ns={upstream}",
            parent.base,
            repository.as_str()
        );
        let mut request = Request::get(uri);
        if let Some(authorization) = &parent.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let request = request.body(Full::new(Bytes::new())).ok()?;
        let count = |result: &str| {
            self.metrics
                .parent_requests
                .with_label_values(&[result])
                .inc()
        };
        match self.client.send(request).await {
            Ok(response) if response.status() == StatusCode::OK => {
                count("served");
                Some(response)
            }
            Ok(response) => {
                let status = response.status();
                tracing::info!(%digest, %status, "parent refused; fetching from the upstream");
                count("refused");
                None
            }
            Err(err) => {
                tracing::info!(%digest, error = %err, "parent request failed; fetching from the upstream");
                count("fallback");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_key_goes_in_clear_only_to_an_internal_address() {
        for refused in ["http://berth.example.com", "http://8.8.8.8:5000"] {
            let err = check(refused, true).unwrap_err();
            assert!(err.to_string().contains("cluster.parent"), "{err}");
        }
        let allowed = [
            "https://berth.example.com",
            "http://127.0.0.1:5000",
            "http://10.1.2.3:5000",
            "http://[fd00::1]:5000",
            "http://localhost:5000",
        ];
        for url in allowed {
            assert!(check(url, true).is_ok(), "{url}");
        }
        // Without a key nothing secret travels: any parent URL.
        assert!(check("http://berth.example.com", false).is_ok());
    }
}
