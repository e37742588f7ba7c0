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
//! `upstream::HttpClient`); the verification of every body is not shared with the server.

pub mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::metrics::Metrics;
use crate::oci::digest::{Digest, Verifier};
use crate::secrets::Credentials;
use crate::upstream::address::AddressRule;
use crate::upstream::client::error_chain;
use crate::upstream::{Auth, HttpClient};
pub use stats::{Class, Recorder, Report};

/// What a container runtime accepts when it pulls (containerd sends the same four).
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// The metric family (by suffix) that counts berth's requests to upstream registries; see
/// `crate::metrics` (`berth_upstream_requests_total`).
pub const UPSTREAM_REQUESTS_FAMILY: &str = "upstream_requests_total";

/// An image to pull: `repository:tag`, `repository@sha256:...` or, pinned, both (the digest
/// is pulled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub repository: String,
    pub reference: String,
}

impl ImageRef {
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        // `NAME[:TAG][@DIGEST]`: the digest wins over a tag pinned next to it.
        let (named, digest) = match text.split_once('@') {
            Some((named, digest)) => {
                Digest::parse(digest).map_err(|e| format!("{text}: {e}"))?;
                (named, Some(digest))
            }
            None => (text, None),
        };
        let slash = named.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match named[slash..].rfind(':') {
            Some(colon) => (&named[..slash + colon], &named[slash + colon + 1..]),
            None => (named, "latest"),
        };
        let reference = digest.unwrap_or(tag);
        if repository.is_empty() || tag.is_empty() {
            return Err(format!(
                "{text}: expected repository:tag or repository@digest"
            ));
        }
        Ok(ImageRef {
            repository: repository.to_string(),
            reference: reference.to_string(),
        })
    }
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
    /// `os/architecture[/variant]` chosen from an index.
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
pub async fn run(config: LoadConfig) -> Result<Report, String> {
    if config.images.is_empty() || config.concurrency == 0 || config.layer_concurrency == 0 {
        return Err("need at least one image, one puller and one layer at a time".into());
    }
    // The operator names the target, often berth on this host or in this cluster.
    let client = HttpClient::new(&ClientConfig {
        ca_file: config.ca_file.clone(),
        response_timeout: config.request_timeout,
        ..ClientConfig::default()
    })?
    .with_rule(AddressRule::any_internal());
    let before = match &config.metrics {
        Some(url) => Some(upstream_requests(&client, url).await?),
        None => None,
    };
    let shared = Arc::new(Shared {
        client: client.clone(),
        auth: Auth::new(
            config.target.clone(),
            config.target.starts_with("http://"),
            "load".into(),
            Arc::new(Metrics::new()),
        ),
        credentials: config.credentials,
        target: config.target.trim_end_matches('/').to_string(),
        images: config.images,
        platform: config.platform,
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
        recorder.merge(puller.await.map_err(|e| format!("puller panicked: {e}"))?);
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

async fn upstream_requests(client: &HttpClient, url: &str) -> Result<f64, String> {
    let uri: Uri = url.parse().map_err(|e| format!("--metrics {url}: {e}"))?;
    let response = client
        .send(
            Request::get(uri)
                .body(Full::default())
                .expect("valid request"),
        )
        .await
        .map_err(|e| format!("--metrics {url}: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("--metrics {url}: status {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_METRICS_BODY).collect();
    let body = tokio::time::timeout(METRICS_DEADLINE, body)
        .await
        .map_err(|_| format!("--metrics {url}: no whole answer within {METRICS_DEADLINE:?}"))?
        .map_err(|e| format!("--metrics {url}: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    // A berth that has not fetched anything yet has no samples in the family: that is zero.
    Ok(stats::sum_family(&text, UPSTREAM_REQUESTS_FAMILY).unwrap_or(0.0))
}

/// Manifests are small; the distribution registry refuses anything over 4 MiB.
const MAX_MANIFEST: u64 = 4 << 20;

/// Bounds on the `--metrics` scrape: a berth's exposition is a few hundred KiB at most.
const MAX_METRICS_BODY: usize = 16 << 20;
const METRICS_DEADLINE: Duration = Duration::from_secs(30);

struct Shared {
    client: HttpClient,
    auth: Auth,
    credentials: Option<Credentials>,
    target: String,
    images: Vec<ImageRef>,
    platform: String,
    timeout: Duration,
    layer_concurrency: usize,
    /// Pulls claimed so far, across pullers; the count limit and the image rotation use it.
    started: AtomicU64,
}

/// A descriptor in a manifest: what to fetch and what it must hash to.
struct Descriptor {
    digest: Digest,
    size: Option<u64>,
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
        let expected = Digest::parse(&image.reference).ok();
        let path = format!("{}/manifests/{}", image.repository, image.reference);
        let top = self
            .fetch(
                image,
                Class::Manifest,
                &path,
                expected.as_ref(),
                None,
                recorder,
            )
            .await?;
        let manifest = match parse_manifest(&top.body) {
            Ok(Parsed::Index(children)) => {
                let Some(child) = choose_platform(&children, &self.platform) else {
                    let message = format!("{path}: no manifest for {}", self.platform);
                    recorder.error(Class::Child, message);
                    return Err(());
                };
                let path = format!("{}/manifests/{}", image.repository, child.digest);
                let fetched = self
                    .fetch(
                        image,
                        Class::Child,
                        &path,
                        Some(&child.digest),
                        child.size,
                        recorder,
                    )
                    .await?;
                parse_manifest(&fetched.body)
            }
            other => other,
        };
        let (config, layers) = match manifest {
            Ok(Parsed::Image { config, layers }) => (config, layers),
            Ok(Parsed::Index(_)) => {
                recorder.error(Class::Child, format!("{path}: an index inside an index"));
                return Err(());
            }
            Err(err) => {
                recorder.error(Class::Manifest, format!("{path}: {err}"));
                return Err(());
            }
        };
        let blobs = std::iter::once((Class::Config, config))
            .chain(layers.into_iter().map(|layer| (Class::Layer, layer)));
        self.fetch_blobs(image, blobs, recorder).await
    }

    /// Fetches an image's config and layers, `layer_concurrency` at a time in manifest order
    /// (containerd's default is 3); the first failure stops the rest, as a runtime's would.
    async fn fetch_blobs(
        &self,
        image: &ImageRef,
        blobs: impl Iterator<Item = (Class, Descriptor)>,
        recorder: &mut Recorder,
    ) -> Result<(), ()> {
        use futures_util::StreamExt;
        let fetches = blobs.map(|(class, blob)| async move {
            let path = format!("{}/blobs/{}", image.repository, blob.digest);
            let mut own = Recorder::default();
            let fetched = self
                .fetch(image, class, &path, Some(&blob.digest), blob.size, &mut own)
                .await;
            (fetched.map(drop), own)
        });
        let mut running = futures_util::stream::iter(fetches).buffered(self.layer_concurrency);
        while let Some((fetched, own)) = running.next().await {
            recorder.merge(own);
            fetched?;
        }
        Ok(())
    }

    /// GETs `/v2/<path>`, verifies the body, and records the outcome under `class`.
    async fn fetch(
        &self,
        image: &ImageRef,
        class: Class,
        path: &str,
        digest: Option<&Digest>,
        size: Option<u64>,
        recorder: &mut Recorder,
    ) -> Result<Fetched, ()> {
        let url = format!("{}/v2/{path}", self.target);
        let attempt =
            tokio::time::timeout(self.timeout, self.get(image, &url, class, digest, size));
        let result = match attempt.await {
            Ok(result) => result,
            Err(_) => Err(format!("GET {url}: no answer within {:?}", self.timeout)),
        };
        match result {
            Ok(fetched) => {
                recorder.success(class, fetched.first_byte, fetched.total, fetched.length);
                Ok(fetched)
            }
            Err(message) => {
                recorder.error(class, message);
                Err(())
            }
        }
    }

    /// Times include any token fetch, as a node's pull would.
    async fn get(
        &self,
        image: &ImageRef,
        url: &str,
        class: Class,
        digest: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<Fetched, String> {
        let started = Instant::now();
        let response = self.send_authorized(image, url, class).await?;
        let first_byte = started.elapsed();
        if response.status() != StatusCode::OK {
            return Err(format!("GET {url}: status {}", response.status()));
        }
        // A tag is verified against the digest the registry says it resolved to, if it says.
        let announced = header(response.headers(), "docker-content-digest")
            .and_then(|d| Digest::parse(&d).ok());
        let expected = digest.cloned().or(announced);
        let mut body = response.into_body();
        let mut verifier = Verifier::new();
        let mut length = 0u64;
        // Manifests are kept (they are parsed next); blobs are hashed and dropped.
        let mut kept = Vec::new();
        let keep = matches!(class, Class::Manifest | Class::Child);
        // The target is not trusted to stop: a body is cut off past its descriptor's size, and
        // a manifest kept for parsing past `MAX_MANIFEST`.
        let limit = size
            .unwrap_or(u64::MAX)
            .min(if keep { MAX_MANIFEST } else { u64::MAX });
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("GET {url}: body: {}", error_chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                verifier.update(&data);
                length += data.len() as u64;
                if length > limit {
                    return Err(format!("GET {url}: body longer than {limit} bytes"));
                }
                if keep {
                    kept.extend_from_slice(&data);
                }
            }
        }
        let actual = verifier.finish();
        if let Some(expected) = expected {
            if actual != expected {
                return Err(format!("GET {url}: body hashes to {actual}"));
            }
        }
        if let Some(size) = size.filter(|&size| size != length) {
            return Err(format!("GET {url}: {length} bytes, descriptor says {size}"));
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
        image: &ImageRef,
        url: &str,
        class: Class,
    ) -> Result<hyper::Response<Incoming>, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let scope = format!("repository:{}:pull", image.repository);
        let creds = self.credentials.as_ref();
        let auth_error = |e| format!("GET {url}: getting a token: {e}");
        let authorization = self
            .auth
            .authorization(&self.client, &scope, creds)
            .await
            .map_err(auth_error)?;
        let response = self.send(&uri, class, authorization.as_ref()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response.headers().get(WWW_AUTHENTICATE);
        let answer = self
            .auth
            .answer(
                &self.client,
                challenge,
                &scope,
                creds,
                authorization.as_ref(),
            )
            .await
            .map_err(auth_error)?;
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
    ) -> Result<hyper::Response<Incoming>, String> {
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
            // The error names the method and URL itself.
            .map_err(|e| e.to_string())
    }
}

fn header(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A manifest as a puller needs it.
enum Parsed {
    /// An index or manifest list: `(platform, descriptor)` of each child.
    Index(Vec<(String, Descriptor)>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

fn descriptor(value: &serde_json::Value) -> Result<Descriptor, String> {
    let digest = value
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or("descriptor without a digest")?;
    Ok(Descriptor {
        digest: Digest::parse(digest).map_err(|e| e.to_string())?,
        size: value.get("size").and_then(|s| s.as_u64()),
    })
}

/// Tells an index from an image manifest by its shape (`manifests` vs `config`), which works
/// for both the OCI and the Docker media types without trusting `Content-Type`.
fn parse_manifest(body: &[u8]) -> Result<Parsed, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not JSON: {e}"))?;
    if let Some(children) = value.get("manifests").and_then(|m| m.as_array()) {
        let children = children
            .iter()
            .map(|child| {
                let platform = child.get("platform");
                let field = |name: &str| {
                    platform
                        .and_then(|p| p.get(name))
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string()
                };
                let mut text = format!("{}/{}", field("os"), field("architecture"));
                let variant = field("variant");
                if !variant.is_empty() {
                    text = format!("{text}/{variant}");
                }
                Ok((text, descriptor(child)?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        return Ok(Parsed::Index(children));
    }
    let config = descriptor(value.get("config").ok_or("manifest without a config")?)?;
    let layers = value
        .get("layers")
        .and_then(|l| l.as_array())
        .map(|layers| layers.iter().map(descriptor).collect())
        .transpose()?
        .unwrap_or_default();
    Ok(Parsed::Image { config, layers })
}

/// The child for `platform` (`os/arch` matches any variant), else none.
fn choose_platform<'a>(
    children: &'a [(String, Descriptor)],
    platform: &str,
) -> Option<&'a Descriptor> {
    children
        .iter()
        .find(|(p, _)| p == platform)
        .or_else(|| {
            children
                .iter()
                .find(|(p, _)| p.starts_with(&format!("{platform}/")))
        })
        .map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn image_references_split_into_repository_and_tag_or_digest() {
        let parsed = |s: &str| ImageRef::parse(s).unwrap();
        assert_eq!(parsed("library/nginx:1.25").repository, "library/nginx");
        assert_eq!(parsed("library/nginx:1.25").reference, "1.25");
        assert_eq!(parsed("app").reference, "latest");
        assert_eq!(parsed(&format!("a/b@{A}")).reference, A);
        // A port-like colon in an earlier component is not a tag.
        assert_eq!(parsed("host:5000/app").repository, "host:5000/app");
        assert_eq!(
            parsed(&format!("host:5000/app:1.27@{A}")).repository,
            "host:5000/app"
        );
        assert_eq!(parsed(&format!("host:5000/app:1.27@{A}")).reference, A);
        assert!(ImageRef::parse("app@sha256:nothex").is_err());
        assert!(ImageRef::parse(&format!("app:@{A}")).is_err());
        assert!(ImageRef::parse(":tag").is_err());
    }

    #[test]
    fn parses_an_image_manifest_into_config_and_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{A}","size":7}},
               "layers":[{{"digest":"{B}","size":9}},{{"digest":"{A}"}}]}}"#
        );
        let Ok(Parsed::Image { config, layers }) = parse_manifest(body.as_bytes()) else {
            panic!("an image manifest");
        };
        assert_eq!((config.digest.as_str(), config.size), (A, Some(7)));
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[1].size, None);
    }

    #[test]
    fn picks_the_platform_child_of_an_index() {
        let body = format!(
            r#"{{"manifests":[
                {{"digest":"{A}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"digest":"{B}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Ok(Parsed::Index(children)) = parse_manifest(body.as_bytes()) else {
            panic!("an index");
        };
        assert_eq!(
            choose_platform(&children, "linux/amd64")
                .unwrap()
                .digest
                .as_str(),
            B
        );
        assert_eq!(
            choose_platform(&children, "linux/arm64")
                .unwrap()
                .digest
                .as_str(),
            A
        );
        assert_eq!(
            choose_platform(&children, "linux/arm64/v8")
                .unwrap()
                .digest
                .as_str(),
            A
        );
        assert!(choose_platform(&children, "windows/amd64").is_none());
    }

    #[test]
    fn rejects_manifests_without_usable_descriptors() {
        assert!(parse_manifest(b"not json").is_err());
        assert!(parse_manifest(br#"{"layers":[]}"#).is_err());
        assert!(parse_manifest(br#"{"config":{"digest":"md5:x"}}"#).is_err());
    }
}
