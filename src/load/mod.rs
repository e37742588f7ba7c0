//! `berth load`: a load generator that pulls whole images the way a node does, against berth
//! or any registry.
//!
//! Each of N pullers repeatedly pulls an image from the list: the manifest (by tag or digest,
//! with the Accept header a container runtime sends), the platform manifest if that was an
//! index, then the config and every layer, `--layer-concurrency` of them at a time (3, as
//! containerd). Every body is hashed and checked against the digest
//! (and size) that named it, so a fast wrong answer counts as an error, not as throughput. It
//! runs for a duration or a count of pulls and prints throughput and p50/p90/p99 per request
//! class (`stats`). With `--metrics`, it reads the target's Prometheus text before and after and
//! reports how many upstream requests the run caused.
//!
//! With credentials it authenticates as a node does: Basic, or the registry token flow (a
//! `WWW-Authenticate: Bearer` challenge, one token per repository, reused until it expires).
//! That flow and the HTTP client are berth's own upstream ones (`upstream::Auth`,
//! `net::HttpClient`), and image references and manifests are read by `oci`; nothing
//! else of the server is used, and the verification of every body is not shared with it.

mod scrape;
pub(crate) mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::net::address::AddressRule;
use crate::net::client::error_chain;
use crate::net::HttpClient;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::manifest::{Descriptor, ImageManifest, Manifest, Platform, PlatformError};
pub use crate::oci::reference::ImageRef;
use crate::secrets::Credentials;
use crate::upstream::{Auth, UpstreamError};
use scrape::upstream_requests;
pub use scrape::{MetricsError, UPSTREAM_REQUESTS_FAMILY};
pub use stats::{Class, Recorder, Report};

/// What a container runtime accepts when it pulls (containerd sends the same four).
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Why a run could not start or finish; a failed request is counted in the report instead.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("need at least one image, one puller and one layer at a time")]
    Nothing,
    #[error("--platform: {0}")]
    Platform(#[from] PlatformError),
    #[error("{0}")]
    Client(#[source] crate::net::ClientError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("puller panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

/// Why one request failed: the message recorded for its class.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{url}: {source}")]
    Url {
        url: String,
        source: http::uri::InvalidUri,
    },
    #[error("GET {url}: getting a token: {source}")]
    Token { url: String, source: UpstreamError },
    /// The error names the method and URL itself.
    #[error(transparent)]
    Send(UpstreamError),
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: status {status}")]
    Status { url: String, status: StatusCode },
    #[error("GET {url}: body: {chain}")]
    Body { url: String, chain: String },
    #[error("GET {url}: body longer than {limit} bytes")]
    TooLong { url: String, limit: u64 },
    #[error("GET {url}: body hashes to {actual}")]
    Digest { url: String, actual: Digest },
    #[error("GET {url}: {length} bytes, descriptor says {size}")]
    Size { url: String, length: u64, size: u64 },
}

/// When the run stops.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Duration(Duration),
    /// Total pulls across all pullers.
    Count(u64),
}

pub struct LoadConfig {
    /// `http://host:port` of the registry (berth or any other).
    pub target: String,
    pub images: Vec<ImageRef>,
    pub concurrency: usize,
    /// Blobs one puller fetches at once (containerd: 3).
    pub layer_concurrency: usize,
    pub limit: Limit,
    /// `os/architecture[/variant]` chosen from an index (as `berth warm` chooses).
    pub platform: String,
    /// Per request, head to last byte.
    pub request_timeout: Duration,
    /// Prometheus text endpoint to read the upstream fetch count from.
    pub metrics: Option<String>,
    /// Pull as this user (Basic, or the token flow if the target asks for it).
    pub credentials: Option<Credentials>,
    /// Extra PEM CA bundle for an `https://` target with a private CA.
    pub ca_file: Option<PathBuf>,
}

/// Runs the load and returns what it measured.
pub async fn run(config: LoadConfig) -> Result<Report, LoadError> {
    if config.images.is_empty() || config.concurrency == 0 || config.layer_concurrency == 0 {
        return Err(LoadError::Nothing);
    }
    let platform: Platform = config.platform.parse()?;
    // The operator names the target, often berth on this host or in this cluster.
    let client = HttpClient::new(&ClientConfig {
        ca_file: config.ca_file.clone(),
        response_timeout: config.request_timeout,
        ..ClientConfig::default()
    })
    .map_err(LoadError::Client)?
    .with_rule(AddressRule::any_internal());
    let before = match &config.metrics {
        Some(url) => Some(upstream_requests(&client, url).await?),
        None => None,
    };
    let shared = Arc::new(Shared {
        client: client.clone(),
        auth: Auth::for_tool(&config.target, "load"),
        credentials: config.credentials,
        target: config.target.trim_end_matches('/').to_string(),
        images: config.images,
        platform,
        timeout: config.request_timeout,
        layer_concurrency: config.layer_concurrency,
        started: AtomicU64::new(0),
    });
    let started = Instant::now();
    let deadline = match config.limit {
        Limit::Duration(d) => Some(started + d),
        Limit::Count(_) => None,
    };
    let count = match config.limit {
        Limit::Count(n) => n,
        Limit::Duration(_) => u64::MAX,
    };
    let mut pullers = Vec::new();
    for _ in 0..config.concurrency {
        let shared = Arc::clone(&shared);
        pullers.push(tokio::spawn(
            async move { shared.puller(deadline, count).await },
        ));
    }
    let mut recorder = Recorder::default();
    for puller in pullers {
        recorder.merge(puller.await?);
    }
    let elapsed = started.elapsed();
    let upstream_requests = match (&config.metrics, before) {
        (Some(url), Some(before)) => Some(upstream_requests(&client, url).await? - before),
        _ => None,
    };
    Ok(Report {
        recorder,
        elapsed,
        concurrency: config.concurrency,
        upstream_requests,
    })
}

/// Manifests are small; the distribution registry refuses anything over 4 MiB.
const MAX_MANIFEST: u64 = 4 << 20;

struct Shared {
    client: HttpClient,
    auth: Auth,
    credentials: Option<Credentials>,
    target: String,
    images: Vec<ImageRef>,
    platform: Platform,
    timeout: Duration,
    layer_concurrency: usize,
    /// Pulls claimed so far, across pullers; the count limit and the image rotation use it.
    started: AtomicU64,
}

/// What one request returned.
struct Fetched {
    /// Manifests only; blob bodies are hashed and dropped.
    body: Bytes,
    length: u64,
    first_byte: Duration,
    total: Duration,
}

impl Shared {
    async fn puller(&self, deadline: Option<Instant>, count: u64) -> Recorder {
        let mut recorder = Recorder::default();
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let n = self.started.fetch_add(1, Ordering::Relaxed);
            if n >= count {
                break;
            }
            let image = &self.images[(n % self.images.len() as u64) as usize];
            recorder.pulls += 1;
            if self.pull(image, &mut recorder).await.is_err() {
                recorder.failed_pulls += 1;
            }
        }
        recorder
    }

    /// One whole image; stops at the first failed request (as a runtime would).
    async fn pull(&self, image: &ImageRef, recorder: &mut Recorder) -> Result<(), ()> {
        let name = image.api_name();
        let path = format!("{name}/manifests/{}", image.reference.as_str());
        let digest = image.reference.digest();
        let top = self
            .fetch(&name, Class::Manifest, &path, digest, None, recorder)
            .await?;
        let manifest = match Manifest::parse(&top.body) {
            Ok(Manifest::Index(index)) => {
                let child = match index.select(&self.platform) {
                    Ok(child) => child,
                    Err(err) => {
                        recorder.error(Class::Child, format!("{path}: {err}"));
                        return Err(());
                    }
                };
                let path = format!("{name}/manifests/{}", child.digest);
                let (digest, size) = (Some(&child.digest), Some(child.size));
                let fetched = self
                    .fetch(&name, Class::Child, &path, digest, size, recorder)
                    .await?;
                Manifest::parse(&fetched.body)
            }
            other => other,
        };
        let ImageManifest { config, layers, .. } = match manifest {
            Ok(Manifest::Image(image)) => image,
            Ok(Manifest::Index(_)) => {
                recorder.error(Class::Child, format!("{path}: an index inside an index"));
                return Err(());
            }
            Ok(Manifest::Artifact(_)) => {
                let message = format!("{path}: an artifact manifest, not an image");
                recorder.error(Class::Manifest, message);
                return Err(());
            }
            Err(err) => {
                recorder.error(Class::Manifest, format!("{path}: {err}"));
                return Err(());
            }
        };
        let blobs = std::iter::once((Class::Config, config))
            .chain(layers.into_iter().map(|layer| (Class::Layer, layer)));
        self.fetch_blobs(&name, blobs, recorder).await
    }

    /// Fetches an image's config and layers, `layer_concurrency` at a time in manifest order
    /// (containerd's default is 3); the first failure stops the rest, as a runtime's would.
    async fn fetch_blobs(
        &self,
        name: &str,
        blobs: impl Iterator<Item = (Class, Descriptor)>,
        recorder: &mut Recorder,
    ) -> Result<(), ()> {
        use futures_util::StreamExt;
        let fetches = blobs.map(|(class, blob)| async move {
            let path = format!("{name}/blobs/{}", blob.digest);
            let (digest, size) = (Some(&blob.digest), Some(blob.size));
            let mut own = Recorder::default();
            let fetched = self.fetch(name, class, &path, digest, size, &mut own).await;
            (fetched.map(drop), own)
        });
        let mut running = futures_util::stream::iter(fetches).buffered(self.layer_concurrency);
        while let Some((fetched, own)) = running.next().await {
            recorder.merge(own);
            fetched?;
        }
        Ok(())
    }

    /// GETs `/v2/<path>` of repository `name`, verifies the body, and records the outcome
    /// under `class`.
    async fn fetch(
        &self,
        name: &str,
        class: Class,
        path: &str,
        digest: Option<&Digest>,
        size: Option<u64>,
        recorder: &mut Recorder,
    ) -> Result<Fetched, ()> {
        let url = format!("{}/v2/{path}", self.target);
        let attempt = tokio::time::timeout(self.timeout, self.get(name, &url, class, digest, size));
        let result = match attempt.await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                url,
                timeout: self.timeout,
            }),
        };
        match result {
            Ok(fetched) => {
                recorder.success(class, fetched.first_byte, fetched.total, fetched.length);
                Ok(fetched)
            }
            Err(err) => {
                recorder.error(class, err.to_string());
                Err(())
            }
        }
    }

    /// Times include any token fetch, as a node's pull would.
    async fn get(
        &self,
        name: &str,
        url: &str,
        class: Class,
        digest: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<Fetched, FetchError> {
        let started = Instant::now();
        let response = self.send_authorized(name, url, class).await?;
        let first_byte = started.elapsed();
        let url = url.to_string();
        if response.status() != StatusCode::OK {
            let status = response.status();
            return Err(FetchError::Status { url, status });
        }
        // A tag is verified against the digest the registry says it resolved to, if it says.
        let announced = header(response.headers(), "docker-content-digest")
            .and_then(|d| Digest::parse(&d).ok());
        let expected = digest.cloned().or(announced);
        // Manifests are kept (they are parsed next); blobs are hashed and dropped.
        let keep = matches!(class, Class::Manifest | Class::Child);
        // The target is not trusted to stop: a body is cut off past its descriptor's size, and
        // a manifest kept for parsing past `MAX_MANIFEST`.
        let limit = size
            .unwrap_or(u64::MAX)
            .min(if keep { MAX_MANIFEST } else { u64::MAX });
        let (kept, length, actual) = receive(response.into_body(), &url, keep, limit).await?;
        if expected.is_some_and(|expected| actual != expected) {
            return Err(FetchError::Digest { url, actual });
        }
        if let Some(size) = size.filter(|&size| size != length) {
            return Err(FetchError::Size { url, length, size });
        }
        Ok(Fetched {
            body: Bytes::from(kept),
            length,
            first_byte,
            total: started.elapsed(),
        })
    }

    /// GETs `url` with the credentials the target asks for: up front once its scheme is known,
    /// else in answer to its first 401.
    async fn send_authorized(
        &self,
        name: &str,
        url: &str,
        class: Class,
    ) -> Result<hyper::Response<Incoming>, FetchError> {
        let uri: Uri = url.parse().map_err(|source| FetchError::Url {
            url: url.to_string(),
            source,
        })?;
        let scope = format!("repository:{name}:pull");
        let creds = self.credentials.as_ref();
        let token_error = |source| FetchError::Token {
            url: url.to_string(),
            source,
        };
        let authorization = self
            .auth
            .authorization(&self.client, &scope, creds)
            .await
            .map_err(token_error)?;
        let response = self.send(&uri, class, authorization.as_ref()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response.headers().get(WWW_AUTHENTICATE);
        let sent = authorization.as_ref();
        let answer = self
            .auth
            .answer(&self.client, challenge, &scope, creds, sent)
            .await
            .map_err(token_error)?;
        match answer {
            Some(retry_with) => self.send(&uri, class, Some(&retry_with)).await,
            None => Ok(response),
        }
    }

    async fn send(
        &self,
        uri: &Uri,
        class: Class,
        authorization: Option<&HeaderValue>,
    ) -> Result<hyper::Response<Incoming>, FetchError> {
        let mut request = Request::get(uri.clone());
        if matches!(class, Class::Manifest | Class::Child) {
            request = request.header(ACCEPT, MANIFEST_ACCEPT);
        }
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        self.client
            .send(request.body(Full::default()).expect("valid request"))
            .await
            .map_err(|err| FetchError::Send(err.into()))
    }
}

/// Reads a body up to `limit` bytes, hashing it, keeping it if `keep`: (kept, length, digest).
async fn receive(
    mut body: Incoming,
    url: &str,
    keep: bool,
    limit: u64,
) -> Result<(Vec<u8>, u64, Digest), FetchError> {
    let mut verifier = Verifier::new();
    let mut length = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| FetchError::Body {
            url: url.to_string(),
            chain: error_chain(&e),
        })?;
        if let Ok(data) = frame.into_data() {
            verifier.update(&data);
            length += data.len() as u64;
            if length > limit {
                let url = url.to_string();
                return Err(FetchError::TooLong { url, limit });
            }
            if keep {
                kept.extend_from_slice(&data);
            }
        }
    }
    Ok((kept, length, verifier.finish()))
}

fn header(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_goes_to_the_host_prefixed_name_and_fetches_the_pinned_digest() {
        let a = format!("sha256:{}", "a".repeat(64));
        let parsed = |s: &str| ImageRef::parse(s, None).unwrap();
        assert_eq!(parsed("library/nginx:1.25").api_name(), "library/nginx");
        assert_eq!(parsed("library/nginx:1.25").reference.as_str(), "1.25");
        assert_eq!(parsed("app").reference.as_str(), "latest");
        let pinned = parsed(&format!("host:5000/app:1.27@{a}"));
        assert_eq!(pinned.api_name(), "host:5000/app");
        assert_eq!(pinned.reference.as_str(), a);
        for bad in ["app@sha256:nothex", &format!("app:@{a}"), ":tag"] {
            assert!(ImageRef::parse(bad, None).is_err(), "{bad}");
        }
    }
}
