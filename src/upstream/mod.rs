//! Upstream registries: where each one is, how to ask it for manifests and blobs, and what its
//! failures mean.
//!
//! `Upstream::fetch` is the one way berth talks to a registry: it adds credentials
//! (`auth`), follows blob redirects to storage hosts without leaking the Authorization header,
//! and maps refusals to `UpstreamError`. Which upstream serves a request is decided in `route`;
//! what to do with the bytes is decided by the caller.

pub mod auth;
pub mod challenge;
pub mod client;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::config::{Config, UpstreamConfig};
use crate::oci::digest::Digest;
use crate::oci::name::{Reference, Repository};
pub use auth::Auth;
pub use client::HttpClient;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("token fetch failed: {0}")]
    Token(String),
    #[error("upstream answered {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
    },
    #[error("invalid response: {0}")]
    Invalid(String),
}

/// Storage backends (S3, CDNs) answer blob GETs with redirects; a few hops are normal.
const MAX_REDIRECTS: usize = 5;

pub struct Upstream {
    /// The registry name as references use it (`docker.io`); metrics and logs use it too.
    pub name: Arc<str>,
    /// Scheme, authority and optional path prefix, without a trailing slash.
    base: String,
    /// Docker Hub puts one-component names under `library/`.
    pub docker_hub: bool,
    pub tag_ttl: Duration,
    client: HttpClient,
    auth: Auth,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, tag_ttl: Duration, client: HttpClient) -> Upstream {
        let credentials = match (&config.username, &config.password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            _ => None,
        };
        Upstream {
            name: config.host.as_str().into(),
            base: config.endpoint_url(),
            docker_hub: config.is_docker_hub(),
            tag_ttl: config.tag_ttl.unwrap_or(tag_ttl),
            auth: Auth::new(config.host.clone(), credentials),
            client,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// GET or HEAD of a manifest, forwarding the client's `Accept` so the upstream picks the
    /// same representation it would give the client directly.
    pub async fn manifest(
        &self,
        method: Method,
        repository: &Repository,
        reference: &Reference,
        accept: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(ACCEPT, accept.clone());
        }
        let path = format!("manifests/{}", reference.as_str());
        let response = self.fetch(method, repository, &path, None, headers).await?;
        ok_or_status(response)
    }

    pub async fn get_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("blobs/{digest}");
        let response = self
            .fetch(Method::GET, repository, &path, None, HeaderMap::new())
            .await?;
        ok_or_status(response)
    }

    pub async fn head_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("blobs/{digest}");
        let response = self
            .fetch(Method::HEAD, repository, &path, None, HeaderMap::new())
            .await?;
        ok_or_status(response)
    }

    /// Sends `method /v2/<repository>/<path>?<query>` with credentials for pulling `repository`,
    /// answering one authentication challenge and following redirects. Any status comes back.
    pub async fn fetch(
        &self,
        method: Method,
        repository: &Repository,
        path: &str,
        query: Option<&str>,
        headers: HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut url = format!("{}/v2/{}/{}", self.base, repository, path);
        if let Some(query) = query {
            url.push('?');
            url.push_str(query);
        }
        let uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::Invalid(format!("cannot build URL {url:?}: {e}")))?;
        let scope = format!("repository:{repository}:pull");
        let mut authorization = self.auth.authorization(&self.client, &scope).await?;
        let mut response = self
            .send(&method, &uri, &headers, authorization.as_ref())
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
            let sent = authorization.take();
            if let Some(retry) = self
                .auth
                .answer(&self.client, challenge.as_ref(), &scope, sent.as_ref())
                .await?
            {
                response = self.send(&method, &uri, &headers, Some(&retry)).await?;
            }
        }
        Ok(response)
    }

    /// One request, following redirects. Authorization goes only to the upstream's own host.
    async fn send(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        authorization: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin = uri.authority().cloned();
        let mut uri = uri.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = Request::builder().method(method.clone()).uri(uri.clone());
            for (name, value) in headers {
                request = request.header(name, value);
            }
            if let Some(value) = authorization.filter(|_| uri.authority() == origin.as_ref()) {
                request = request.header(AUTHORIZATION, value);
            }
            let request = request
                .body(Full::new(Bytes::new()))
                .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
            let response = self.client.send(request).await?;
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok(response);
            }
            uri = redirect_target(&uri, response.headers())?;
        }
        Err(UpstreamError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

fn redirect_target(from: &Uri, headers: &HeaderMap) -> Result<Uri, UpstreamError> {
    let location = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| UpstreamError::Invalid("redirect without Location".into()))?;
    if location.starts_with('/') {
        let scheme = from.scheme_str().unwrap_or("https");
        let authority = from.authority().map_or("", |a| a.as_str());
        format!("{scheme}://{authority}{location}").parse()
    } else {
        location.parse()
    }
    .map_err(|e| UpstreamError::Invalid(format!("bad redirect Location {location:?}: {e}")))
}

/// Passes 2xx responses on and turns every other status into an error.
fn ok_or_status(response: Response<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
    if response.status().is_success() {
        return Ok(response);
    }
    Err(UpstreamError::Status {
        status: response.status(),
        retry_after: response.headers().get(RETRY_AFTER).cloned(),
    })
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Every configured upstream, by each of its names.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(config: &Config) -> Result<Upstreams, String> {
        let client = HttpClient::new(&config.client)?;
        let mut by_name = HashMap::new();
        for upstream_config in &config.upstreams {
            let upstream = Arc::new(Upstream::new(
                upstream_config,
                config.cache.tag_ttl,
                client.clone(),
            ));
            for name in upstream_config.names() {
                by_name.insert(name.to_ascii_lowercase(), Arc::clone(&upstream));
            }
        }
        let default = config
            .default_upstream
            .as_ref()
            .and_then(|name| by_name.get(&name.to_ascii_lowercase()).cloned());
        Ok(Upstreams { by_name, default })
    }

    /// The upstream a registry host names; case-insensitive, as DNS is.
    pub fn get(&self, host: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(&host.to_ascii_lowercase())
    }

    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.as_ref()
    }
}
