//! A hostile registry, in process on 127.0.0.1:0: what an attacker who runs a registry berth
//! mirrors can answer, which no honest registry (and so no `docker-registry`) ever does.
//!
//! Owns: its own manifests (by tag and digest) and blobs, served as a registry serves them;
//! and its lies, switched by the test: a HEAD of any digest answers 200 (`lie_on_head`), and a
//! tag's HEAD can announce a digest the tag's GET never serves (`point_head`). Manifests it
//! serves may list digests it does not hold (a dangling `subject`, another registry's layers):
//! registries accept those.
//! Does not own: auth (it answers everyone) or TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::image::{sha256_digest, Blob};

#[derive(Default)]
struct State {
    /// By tag and by digest: (media type, bytes).
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    /// Tag -> the digest its HEAD announces instead of its own.
    head_points: Mutex<HashMap<String, String>>,
    lie_on_head: AtomicBool,
    requests: AtomicUsize,
}

pub struct Hostile {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Hostile {
    pub async fn start() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hostile");
        let addr = listener.local_addr().expect("hostile address");
        let state = Arc::new(State::default());
        let served = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&served);
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(Arc::clone(&state), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Hostile {
            addr,
            state,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `bytes` as the manifest of `tag` (and of its digest); returns the digest.
    pub fn put_manifest(&self, tag: &str, media_type: &str, bytes: Vec<u8>) -> String {
        let digest = sha256_digest(&bytes);
        let entry = (media_type.to_string(), Bytes::from(bytes));
        let mut manifests = self.state.manifests.lock().unwrap();
        manifests.insert(tag.to_string(), entry.clone());
        manifests.insert(digest.clone(), entry);
        digest
    }

    pub fn put_blob(&self, blob: &Blob) {
        let mut blobs = self.state.blobs.lock().unwrap();
        blobs.insert(blob.digest.clone(), blob.bytes.clone());
    }

    /// From now on a HEAD of any blob or manifest digest answers 200 (or not).
    pub fn lie_on_head(&self, lie: bool) {
        self.state.lie_on_head.store(lie, Ordering::SeqCst);
    }

    /// From now on the HEAD of `tag` announces `digest`; its GET still serves its own manifest.
    pub fn point_head(&self, tag: &str, digest: &str) {
        let mut points = self.state.head_points.lock().unwrap();
        points.insert(tag.to_string(), digest.to_string());
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let head = req.method() == Method::HEAD;
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let n = segments.len();
    let response = if n < 4 || segments[0] != "v2" {
        empty(StatusCode::OK)
    } else {
        let reference = segments[n - 1];
        match segments[n - 2] {
            "manifests" => manifest(&state, reference, head),
            "blobs" => blob(&state, reference, head),
            _ => empty(StatusCode::NOT_FOUND),
        }
    };
    Ok(response)
}

fn manifest(state: &State, reference: &str, head: bool) -> Response<Full<Bytes>> {
    let pointed = state.head_points.lock().unwrap().get(reference).cloned();
    let found = state.manifests.lock().unwrap().get(reference).cloned();
    if head {
        if let Some(digest) = pointed {
            let (media_type, _) = found.unwrap_or_default();
            return lie(&digest, &media_type);
        }
        if found.is_none() && reference.starts_with("sha256:") && lying(state) {
            return lie(reference, "application/vnd.oci.image.manifest.v1+json");
        }
    }
    match found {
        Some((media_type, bytes)) => {
            let digest = sha256_digest(&bytes);
            stored(&media_type, &digest, bytes, head)
        }
        None => empty(StatusCode::NOT_FOUND),
    }
}

/// The 200 answer for stored content: its headers, and its bytes unless `head`.
fn stored(media_type: &str, digest: &str, bytes: Bytes, head: bool) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header("docker-content-digest", digest)
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(if head {
            Full::default()
        } else {
            Full::new(bytes)
        })
        .unwrap()
}

fn blob(state: &State, digest: &str, head: bool) -> Response<Full<Bytes>> {
    let found = state.blobs.lock().unwrap().get(digest).cloned();
    match found {
        Some(bytes) => stored("application/octet-stream", digest, bytes, head),
        None if head && lying(state) => lie(digest, "application/octet-stream"),
        None => empty(StatusCode::NOT_FOUND),
    }
}

fn lying(state: &State) -> bool {
    state.lie_on_head.load(Ordering::SeqCst)
}

/// A 200 to a HEAD for something this registry does not serve.
fn lie(digest: &str, media_type: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header("docker-content-digest", digest)
        .header(header::CONTENT_LENGTH, 1234)
        .body(Full::default())
        .unwrap()
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::default())
        .unwrap()
}
