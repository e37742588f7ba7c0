//! `berth health`: asks a berth's admin listener whether it is alive, so a container
//! `HEALTHCHECK` or an exec probe works in an image that has no shell and no curl.
//!
//! Owns: one `GET` with a deadline and its verdict. Does not own: what `/healthz` means
//! (`health`, `admin`). Plain HTTP only: the admin listener never serves TLS.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The admin listener's liveness endpoint as the container image configures it
/// (`--admin-listen 0.0.0.0:9090`), reached over loopback from inside the container.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090/healthz";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0:?} is not an http:// URL")]
    BadUrl(String),
    #[error("no answer from {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("no answer from {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered {status}, not 200")]
    Status { url: String, status: u16 },
}

/// `Ok` when `url` answers `200` within `timeout` (connecting included).
pub async fn check(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ProbeError::BadUrl(url.to_string()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(ProbeError::BadUrl(url.to_string()));
    }
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let answer = tokio::time::timeout(timeout, client.get(uri)).await;
    let response = match answer {
        Err(_) => {
            return Err(ProbeError::Timeout {
                url: url.to_string(),
                timeout,
            })
        }
        Ok(Err(err)) => {
            return Err(ProbeError::Unreachable {
                url: url.to_string(),
                reason: crate::net::client::error_chain(&err),
            })
        }
        Ok(Ok(response)) => response,
    };
    match response.status().as_u16() {
        200 => Ok(()),
        status => Err(ProbeError::Status {
            url: url.to_string(),
            status,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_plain_http_urls_are_probed() {
        for url in [
            "https://127.0.0.1:9090/healthz",
            "127.0.0.1:9090",
            "http://",
        ] {
            let err = check(url, Duration::from_secs(1)).await.unwrap_err();
            assert!(matches!(err, ProbeError::BadUrl(_)), "{url}: {err}");
        }
    }
}
