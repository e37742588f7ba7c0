//! Seeding a registry: pushes blobs, manifests, images and indexes over plain HTTP using the
//! distribution push API (monolithic upload: `POST .../blobs/uploads/` then `PUT <Location>?digest=`).
//!
//! Owns: the push protocol as tests need it. Does not own: chunked uploads, cross-repo mounts or
//! bearer tokens; a push either succeeds whole or returns the registry's status and body.

use std::fmt;

use bytes::Bytes;
use http::{header, Method, StatusCode};

use super::client::{self, Creds};
use super::image::{Blob, Image, Index};

/// A push the registry refused, with what it said.
#[derive(Debug)]
pub struct PushError {
    /// `None` when no HTTP response arrived at all.
    pub status: Option<StatusCode>,
    pub message: String,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "push failed with {status}: {}", self.message),
            None => write!(f, "push failed: {}", self.message),
        }
    }
}

impl std::error::Error for PushError {}

impl From<client::BoxError> for PushError {
    fn from(e: client::BoxError) -> Self {
        PushError {
            status: None,
            message: e.to_string(),
        }
    }
}

/// Uploads one blob into `repo` on the registry at `url` (`http://HOST:PORT`).
pub async fn push_blob(
    url: &str,
    repo: &str,
    blob: &Blob,
    creds: Creds<'_>,
) -> Result<(), PushError> {
    let start = format!("{url}/v2/{repo}/blobs/uploads/");
    let started = send(Method::POST, &start, creds, &[], Bytes::new()).await?;
    expect(&started, StatusCode::ACCEPTED)?;
    let location = started.header("location").ok_or_else(|| PushError {
        status: Some(started.status),
        message: "upload started without a Location header".into(),
    })?;
    let put = upload_url(url, location, &blob.digest);
    let length = blob.len().to_string();
    let headers = [
        (header::CONTENT_TYPE.as_str(), "application/octet-stream"),
        (header::CONTENT_LENGTH.as_str(), length.as_str()),
    ];
    let done = send(Method::PUT, &put, creds, &headers, blob.bytes.clone()).await?;
    expect(&done, StatusCode::CREATED)
}

/// Puts a manifest (image or index) under `reference`, a tag or a digest; returns the digest the
/// registry reports in `Docker-Content-Digest`.
pub async fn push_manifest(
    url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &Bytes,
    creds: Creds<'_>,
) -> Result<String, PushError> {
    let target = format!("{url}/v2/{repo}/manifests/{reference}");
    let headers = [(header::CONTENT_TYPE.as_str(), media_type)];
    let done = send(Method::PUT, &target, creds, &headers, bytes.clone()).await?;
    expect(&done, StatusCode::CREATED)?;
    Ok(done
        .header("docker-content-digest")
        .unwrap_or_default()
        .to_owned())
}

/// Pushes every blob of `image`, then its manifest under `reference` (a tag or its digest).
pub async fn push_image(
    url: &str,
    repo: &str,
    reference: &str,
    image: &Image,
    creds: Creds<'_>,
) -> Result<(), PushError> {
    for blob in image.blobs() {
        push_blob(url, repo, blob, creds).await?;
    }
    let media_type = image.media_type();
    let digest = push_manifest(
        url,
        repo,
        reference,
        media_type,
        &image.manifest.bytes,
        creds,
    )
    .await?;
    check_digest(&digest, image.digest())
}

/// Pushes each child image by digest (a registry rejects an index whose children it lacks), then
/// the index itself under `reference`.
pub async fn push_index(
    url: &str,
    repo: &str,
    reference: &str,
    index: &Index,
    creds: Creds<'_>,
) -> Result<(), PushError> {
    for image in &index.images {
        push_image(url, repo, image.digest(), image, creds).await?;
    }
    let media_type = index.media_type();
    let digest = push_manifest(
        url,
        repo,
        reference,
        media_type,
        &index.manifest.bytes,
        creds,
    )
    .await?;
    check_digest(&digest, index.digest())
}

/// The upload URL with `digest=` added. Distribution answers with an absolute Location that
/// already carries `?_state=`; other registries send a path, which is relative to `url`.
pub fn upload_url(url: &str, location: &str, digest: &str) -> String {
    let absolute = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_owned()
    } else {
        format!("{url}/{}", location.trim_start_matches('/'))
    };
    let separator = if absolute.contains('?') { '&' } else { '?' };
    format!("{absolute}{separator}digest={digest}")
}

async fn send(
    method: Method,
    url: &str,
    creds: Creds<'_>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<client::Fetched, PushError> {
    Ok(client::fetch(client::request(method, url, creds, headers, body)).await?)
}

/// `Ok` when the registry answered `status`, else its status and body as a `PushError`.
pub(super) fn expect(response: &client::Fetched, status: StatusCode) -> Result<(), PushError> {
    if response.status == status {
        return Ok(());
    }
    Err(PushError {
        status: Some(response.status),
        message: String::from_utf8_lossy(&response.body).into_owned(),
    })
}

/// A registry that stores different bytes than we sent would make every later digest check lie.
fn check_digest(reported: &str, expected: &str) -> Result<(), PushError> {
    if reported.is_empty() || reported == expected {
        return Ok(());
    }
    Err(PushError {
        status: None,
        message: format!("registry stored {reported}, expected {expected}"),
    })
}
