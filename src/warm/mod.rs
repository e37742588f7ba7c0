//! `berth warm`: pre-pulls images through a running berth so a location has them before its
//! pods start.
//!
//! For each reference: GET the manifest (every manifest type accepted), pick the requested
//! platform's child of an index or manifest list, then GET the config and every layer,
//! verifying each digest and size while it streams (a wrong digest is an error). Progress bars
//! (bytes, blobs) go to stderr when it is a terminal; a summary (images, blobs, bytes, seconds,
//! the `X-Cache` outcomes seen) comes back to the caller. References are written as for
//! `berth resolve` and become `/v2/<registry-host>/<repository>/...` paths on the target
//! (host-prefix routing), or `/v2/<repository>/...` for names without a registry, which the
//! target routes to its `default_upstream`. With credentials (`berth warm --user`, the key in
//! `BERTH_WARM_PASSWORD`) it authenticates as a node does, Basic or berth's token flow, with
//! the same `upstream::Auth` that `berth load` uses. References are read by `oci::reference`,
//! manifests and the platform choice by `oci::manifest`; the I/O is here, the summary in
//! `summary`.
//!
//! The target is not trusted either: every body read is bounded in size (a blob by its
//! descriptor, a manifest by `MAX_MANIFEST`, an error body by `MAX_ERROR_BODY`) and in time
//! (`STALL` between frames, `BODY_DEADLINE` for small bodies), only known `X-Cache` values are
//! tallied, and whatever it sent is passed through `printable` before it reaches a terminal.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::time::Instant;

use crate::config::{ClientConfig, PlatformConfig};
use crate::net::address::AddressRule;
use crate::net::HttpClient;
use crate::oci::digest::{Digest, Verifier};
use crate::oci::manifest::{
    Descriptor, ImageManifest, Manifest, ManifestError, NoPlatform, Platform, DOCKER_LIST,
    DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use crate::oci::name::Reference;
use crate::oci::reference::{ImageRef, Orgs, ReferenceError};
use crate::secrets::Credentials;
use crate::upstream::Auth;

mod summary;
use summary::OUTCOMES;
pub use summary::{printable, Summary};

/// Longest silence tolerated inside a body. Generous: berth holds a blob's last byte until the
/// whole blob is verified and fsynced, which takes a while for a multi-GiB layer.
const STALL: Duration = Duration::from_secs(120);

/// Manifests are small; the distribution registry refuses anything over 4 MiB.
const MAX_MANIFEST: usize = 4 << 20;

/// What is kept of an error response's body for the message.
const MAX_ERROR_BODY: usize = 4096;

/// Time allowed to read a whole manifest or error body.
const BODY_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The run cannot start: a bad `--target`, or no HTTP client.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{what}: {message}")]
    Http { what: String, message: String },
    #[error("{what}: the target answered {status}: {body}")]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    #[error("{what}: expected {expected}, received content with digest {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what}: expected {expected} bytes, received {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: {source}")]
    Manifest {
        what: String,
        #[source]
        source: ManifestError,
    },
    #[error("{what}: {kind}, not an image manifest")]
    NotAnImage { what: String, kind: &'static str },
    #[error(transparent)]
    NoPlatform(#[from] NoPlatform),
}

pub struct Options {
    /// Base URL of the berth to warm, e.g. `http://127.0.0.1:5000`.
    pub target: String,
    pub platform: Platform,
    pub references: Vec<String>,
    /// For `//image/...` and `/org/ORG/image/...` references.
    pub platform_config: PlatformConfig,
    pub client: ClientConfig,
    /// Blobs of one image downloaded at once.
    pub concurrency: usize,
    /// Who to pull as, for a target in the policy access mode; `None` pulls anonymously.
    pub credentials: Option<Credentials>,
}

/// Shared by the images of one run: the client, progress, and what was already fetched.
struct Run {
    client: HttpClient,
    /// The target's challenge, remembered after the first 401, and its tokens per scope.
    auth: Auth,
    credentials: Option<Credentials>,
    target: String,
    progress: MultiProgress,
    seen: Mutex<HashSet<Digest>>,
    outcomes: Mutex<BTreeMap<String, usize>>,
}

impl Run {
    fn tally(&self, response: &http::Response<hyper::body::Incoming>) {
        let outcome = response
            .headers()
            .get("x-cache")
            .map(|v| {
                let known = OUTCOMES
                    .iter()
                    .find(|known| v.as_bytes() == known.as_bytes());
                known.map_or("other", |known| *known)
            })
            .unwrap_or("-")
            .to_string();
        *self
            .outcomes
            .lock()
            .expect("outcomes lock")
            .entry(outcome)
            .or_default() += 1;
    }
}

/// Warms every reference (one after another, each image's blobs concurrently); a failed image
/// is recorded in the summary and the run goes on with the next.
pub async fn warm(options: Options) -> Result<Summary, WarmError> {
    let started = Instant::now();
    let target = options.target.trim_end_matches('/').to_string();
    let uri: http::Uri = target
        .parse()
        .map_err(|e| WarmError::Setup(format!("--target {target:?}: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(WarmError::Setup(format!(
            "--target {target:?} must be an http:// or https:// URL"
        )));
    }
    // The operator names the berth to warm, often on this host or in this cluster.
    let client = HttpClient::new(&options.client).map_err(|e| WarmError::Setup(e.to_string()))?;
    let run = Arc::new(Run {
        client: client.with_rule(AddressRule::any_internal()),
        auth: Auth::for_tool(&target, "warm"),
        credentials: options.credentials.clone(),
        target,
        progress: MultiProgress::new(),
        seen: Mutex::default(),
        outcomes: Mutex::default(),
    });
    let mut summary = Summary::default();
    for text in &options.references {
        let warmed = warm_one(&run, text, &options).await;
        match warmed {
            Ok((blobs, bytes)) => {
                summary.images += 1;
                summary.blobs += blobs;
                summary.bytes += bytes;
            }
            Err(err) => summary.failed.push((text.clone(), err.to_string())),
        }
    }
    summary.outcomes = std::mem::take(&mut *run.outcomes.lock().expect("outcomes lock"));
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn warm_one(
    run: &Arc<Run>,
    text: &str,
    options: &Options,
) -> Result<(usize, u64), WarmError> {
    let platform = &options.platform_config;
    let orgs = Orgs {
        own: platform.org.as_deref(),
        domain: &platform.registry_domain,
    };
    let image = ImageRef::parse(text, Some(orgs))?;
    let name = image.api_name();
    let what = format!("manifest {text}");
    let ImageManifest { config, layers, .. } =
        match get_manifest(run, &name, &image.reference, &what).await? {
            Manifest::Image(image) => image,
            Manifest::Index(index) => {
                let child = index.select(&options.platform)?;
                let reference = Reference::Digest(child.digest.clone());
                let what = format!("{} manifest of {text}", options.platform);
                match get_manifest(run, &name, &reference, &what).await? {
                    Manifest::Image(image) => image,
                    Manifest::Index(_) => {
                        let kind = "an index inside an index";
                        return Err(WarmError::NotAnImage { what, kind });
                    }
                    Manifest::Artifact(_) => {
                        let kind = "an artifact manifest";
                        return Err(WarmError::NotAnImage { what, kind });
                    }
                }
            }
            Manifest::Artifact(_) => {
                let kind = "an artifact manifest";
                return Err(WarmError::NotAnImage { what, kind });
            }
        };
    let mut blobs = Vec::new();
    {
        let mut seen = run.seen.lock().expect("seen lock");
        for descriptor in std::iter::once(config).chain(layers) {
            if seen.insert(descriptor.digest.clone()) {
                blobs.push(descriptor);
            }
        }
    }
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let (bytes_bar, blobs_bar) = bars(run, text, total, blobs.len() as u64);
    let count = blobs.len();
    let fetched: Vec<u64> = futures_util::stream::iter(blobs)
        .map(|descriptor| {
            let (run, name, bytes_bar, blobs_bar) = (run, &name, &bytes_bar, &blobs_bar);
            async move {
                let size = get_blob(run, name, &descriptor, bytes_bar).await?;
                blobs_bar.inc(1);
                Ok::<u64, WarmError>(size)
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await
        .inspect_err(|_| {
            bytes_bar.abandon();
            blobs_bar.abandon();
        })?;
    bytes_bar.finish();
    blobs_bar.finish();
    Ok((count, fetched.iter().sum()))
}

fn bars(run: &Run, text: &str, total: u64, blobs: u64) -> (ProgressBar, ProgressBar) {
    let bytes_style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let blobs_style =
        ProgressStyle::with_template("{prefix} {pos}/{len} blobs").expect("valid template");
    let bytes_bar = run
        .progress
        .add(ProgressBar::new(total).with_style(bytes_style));
    bytes_bar.set_prefix(text.to_string());
    let blobs_bar = run
        .progress
        .add(ProgressBar::new(blobs).with_style(blobs_style));
    blobs_bar.set_prefix(text.to_string());
    (bytes_bar, blobs_bar)
}

/// GETs `path` (of repository `name`) with the credentials the target asks for: up front once
/// its scheme is known, else in answer to its first 401.
async fn send(
    run: &Run,
    name: &str,
    path: &str,
    what: &str,
    accept: Option<&str>,
) -> Result<http::Response<hyper::body::Incoming>, WarmError> {
    let scope = format!("repository:{name}:pull");
    let creds = run.credentials.as_ref();
    let auth_error = |e: crate::upstream::UpstreamError| WarmError::Http {
        what: what.to_string(),
        message: format!("authenticating: {e}"),
    };
    let authorization = run
        .auth
        .authorization(&run.client, &scope, creds)
        .await
        .map_err(auth_error)?;
    let mut response = send_once(run, path, what, accept, authorization.as_ref()).await?;
    if response.status() == StatusCode::UNAUTHORIZED {
        let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
        let answer = run
            .auth
            .answer(
                &run.client,
                challenge.as_ref(),
                &scope,
                creds,
                authorization.as_ref(),
            )
            .await
            .map_err(auth_error)?;
        if let Some(retry_with) = answer {
            response = send_once(run, path, what, accept, Some(&retry_with)).await?;
        }
    }
    run.tally(&response);
    if response.status() != StatusCode::OK {
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ERROR_BODY).collect();
        let body = tokio::time::timeout(BODY_DEADLINE, body)
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| printable(&String::from_utf8_lossy(&b.to_bytes())))
            .unwrap_or_default();
        return Err(WarmError::Status {
            what: what.to_string(),
            status,
            body: body.trim().to_string(),
        });
    }
    Ok(response)
}

async fn send_once(
    run: &Run,
    path: &str,
    what: &str,
    accept: Option<&str>,
    authorization: Option<&HeaderValue>,
) -> Result<http::Response<hyper::body::Incoming>, WarmError> {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(format!("{}{path}", run.target));
    if let Some(accept) = accept {
        request = request.header(ACCEPT, accept);
    }
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value.clone());
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| WarmError::Http {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    run.client.send(request).await.map_err(|e| WarmError::Http {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// GETs a manifest, checks it against the digest asked for and the one announced, and reads
/// it (its errors named by `shown`). The document says what it is, not the `Content-Type`.
async fn get_manifest(
    run: &Run,
    name: &str,
    reference: &Reference,
    shown: &str,
) -> Result<Manifest, WarmError> {
    let what = format!("manifest {name}:{}", reference.as_str());
    let accept = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", ");
    let path = format!("/v2/{name}/manifests/{}", reference.as_str());
    let response = send(run, name, &path, &what, Some(&accept)).await?;
    let announced = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v.trim()).ok());
    let body = Limited::new(response.into_body(), MAX_MANIFEST).collect();
    let bytes = match tokio::time::timeout(BODY_DEADLINE, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) => {
            let message = err.to_string();
            return Err(WarmError::Http { what, message });
        }
        Err(_) => {
            let message = format!("manifest body not complete within {BODY_DEADLINE:?}");
            return Err(WarmError::Http { what, message });
        }
    };
    let actual = Digest::of(&bytes);
    if let Some(expected) = reference.digest().cloned().or(announced) {
        if expected != actual {
            return Err(WarmError::DigestMismatch {
                what,
                expected,
                actual,
            });
        }
    }
    Manifest::parse(&bytes).map_err(|source| WarmError::Manifest {
        what: shown.to_string(),
        source,
    })
}

/// GETs a blob, hashing it as it streams; the digest and size must match the descriptor.
async fn get_blob(
    run: &Run,
    name: &str,
    descriptor: &Descriptor,
    bar: &ProgressBar,
) -> Result<u64, WarmError> {
    let what = format!("blob {}", descriptor.digest);
    let expected = descriptor.digest.clone();
    let path = format!("/v2/{name}/blobs/{expected}");
    let response = send(run, name, &path, &what, None).await?;
    let mut body = response.into_body();
    let mut verifier = Verifier::new();
    let mut received = 0u64;
    loop {
        let frame = match tokio::time::timeout(STALL, body.frame()).await {
            Err(_) => {
                let message = format!("no data for {}s", STALL.as_secs());
                return Err(WarmError::Http { what, message });
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                let message = format!("body failed after {received} bytes: {err}");
                return Err(WarmError::Http { what, message });
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            verifier.update(&data);
            received += data.len() as u64;
            bar.inc(data.len() as u64);
            if received > descriptor.size {
                return Err(WarmError::SizeMismatch {
                    what,
                    expected: descriptor.size,
                    actual: received,
                });
            }
        }
    }
    let actual = verifier.finish();
    if actual != expected {
        return Err(WarmError::DigestMismatch {
            what,
            expected,
            actual,
        });
    }
    if received != descriptor.size {
        return Err(WarmError::SizeMismatch {
            what,
            expected: descriptor.size,
            actual: received,
        });
    }
    Ok(received)
}
