//! The admin listener, on its own address (`admin_listen`), apart from the registry API so
//! metrics and cache surgery are never reachable by the nodes that pull:
//!
//! - `GET /metrics`  Prometheus text format; disk and readiness gauges are refreshed per scrape.
//! - `GET /healthz`  200 while the process runs (liveness).
//! - `GET /readyz`   200 when ready, else 503 with the reasons (`health`); 503 "loading
//!   index" while the index is rebuilt from disk at start-up (`serve_loading`).
//! - `/admin/...`    behind `Authorization: Bearer <admin_token>` (disabled without a token):
//!   - `GET /admin/stats`                        cache and fill figures as JSON;
//!   - `GET /admin/access-report?image=IMAGE`    who may do what to an image (`access`);
//!   - `DELETE /admin/digests/<digest>`          removes one blob or manifest (index + disk);
//!   - `DELETE /admin/repositories/<name>[?ns=]` drops the repository's tag mappings, in memory
//!     and on disk. Blobs
//!     and manifests are content-addressed and may be shared with other repositories, so they
//!     are kept (they age out by LRU, or purge them by digest).
//!
//! Refusals and errors answer with the registry API's OCI envelope (`{"errors":[...]}`,
//! built in `error`), so one client-side reader handles both listeners.
//!
//! The registry API and its metrics are `api`'s; readiness rules are `health`'s.
//!
//! The listener speaks HTTP/1.1 only, takes at most `MAX_CONNECTIONS` connections (more are
//! closed at once), gives each `limits.header_read_timeout` to send a request head and
//! `CONNECTION_LIFETIME` in all: a scraper or operator needs no more, and nobody who reaches
//! the port can hold it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::{self, Body};
use crate::error::ApiError;
use crate::oci::digest::Digest;
use crate::oci::name::Repository;
use crate::AppState;

/// Admin requests are short; a scrape in flight at shutdown gets this long.
const DRAIN: Duration = Duration::from_secs(5);

/// Admin connections open at once; Prometheus and an operator or two need a handful.
pub const MAX_CONNECTIONS: usize = 32;

/// The longest an admin connection stays open, keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The content type Prometheus expects for the text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.limits.header_read_timeout);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    while let Some((stream, permit)) = next_connection(&listener, &connections, &mut shutdown).await
    {
        let state = Arc::clone(&state);
        let service = service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    Ok(())
}

pub async fn handle<B>(state: &Arc<AppState>, request: Request<B>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            refresh_gauges(state).await;
            respond(StatusCode::OK, METRICS_TYPE, state.metrics.render())
        }
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            let problems = state.readiness.problems(&state.cache.store).await;
            if problems.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                let text = format!("not ready: {}\n", problems.join("; "));
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", text)
            }
        }
        (_, p) if p.starts_with("/admin/") => {
            if let Err(refusal) = authorize(state, request.headers()) {
                return refusal;
            }
            let rest = &p["/admin/".len()..];
            let answer = admin(state, &method, rest, request.uri().query()).await;
            tracing::info!(method = %method, path = p, status = answer.status().as_u16(), "admin request");
            answer
        }
        _ => ApiError::admin_not_found("not found").into_response(false),
    }
}

/// Sets the gauges that are read from the cache and the filesystem rather than counted.
async fn refresh_gauges(state: &AppState) {
    let metrics = &state.metrics;
    metrics
        .cache_bytes
        .set(gauge_value(state.cache.index.bytes()));
    metrics
        .cache_entries
        .set(gauge_value(state.cache.index.len()));
    metrics
        .cache_max_bytes
        .set(gauge_value(state.config.cache.max_size));
    if let Ok((avail, size)) = filesystem_space(&state.cache.store) {
        metrics.filesystem_avail_bytes.set(gauge_value(avail));
        metrics.filesystem_size_bytes.set(gauge_value(size));
    }
    let ready = state
        .readiness
        .problems(&state.cache.store)
        .await
        .is_empty();
    metrics.ready.set(i64::from(ready));
}

fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Bytes available to an unprivileged writer, and the size, of the cache's filesystem.
fn filesystem_space(store: &crate::cache::Store) -> std::io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(store.dir()).map_err(std::io::Error::from)?;
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// Checks the bearer token in constant time. Without a configured token the admin API is off.
#[allow(clippy::result_large_err)]
fn authorize(state: &AppState, headers: &http::HeaderMap) -> Result<(), Response<Body>> {
    let Some(token) = &state.config.admin_token else {
        return Err(ApiError::admin_off().into_response(false));
    };
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if tokens_match(presented, token.expose()) {
        return Ok(());
    }
    Err(ApiError::admin_unauthorized().into_response(false))
}

/// Compares hashes of both tokens with an xor fold, so neither the position of the first
/// differing byte nor the expected length shows in the timing.
fn tokens_match(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn admin(
    state: &AppState,
    method: &Method,
    rest: &str,
    query: Option<&str>,
) -> Response<Body> {
    if let (&Method::GET, "stats") = (method, rest) {
        return json(StatusCode::OK, stats(state));
    }
    if let (&Method::GET, "access-report") = (method, rest) {
        return access_report(state, query);
    }
    if let Some(digest) = rest.strip_prefix("digests/") {
        if method != Method::DELETE {
            return method_not_allowed();
        }
        return purge_digest(state, digest).await;
    }
    if let Some(name) = rest.strip_prefix("repositories/") {
        if method != Method::DELETE {
            return method_not_allowed();
        }
        return purge_repository(state, name, crate::route::ns_param(query));
    }
    ApiError::admin_not_found("no such admin endpoint").into_response(false)
}

fn stats(state: &AppState) -> serde_json::Value {
    let index = &state.cache.index;
    let metrics = &state.metrics;
    let filesystem = filesystem_space(&state.cache.store)
        .ok()
        .map(|(avail, size)| serde_json::json!({"avail_bytes": avail, "size_bytes": size}));
    serde_json::json!({
        "entries": index.len(),
        "disk_bytes": index.bytes(),
        "max_bytes": state.config.cache.max_size,
        "tags": state.cache.tags.len(),
        "fills_in_flight": state.fills.in_flight(),
        "fills_completed": metrics.fills_completed.get(),
        "fills_failed": metrics.fills_failed.get(),
        "digest_mismatches": metrics.digest_mismatches.get(),
        "evictions": metrics.evictions.get(),
        "evicted_bytes": metrics.evicted_bytes.get(),
        "filesystem": filesystem,
        "ready": state.readiness.is_serving() && !state.readiness.is_shutting_down(),
    })
}

async fn purge_digest(state: &AppState, text: &str) -> Response<Body> {
    let digest = match Digest::parse(text) {
        Ok(digest) => digest,
        Err(err) => return ApiError::from(err).into_response(false),
    };
    match state.cache.purge(&digest).await {
        Ok(Some(entry)) => {
            let kind = match entry.kind {
                crate::cache::Kind::Blob => "blob",
                crate::cache::Kind::Manifest => "manifest",
            };
            tracing::info!(%digest, kind, bytes = entry.size, "purged");
            json(
                StatusCode::OK,
                serde_json::json!({"purged": digest.as_str(), "kind": kind, "bytes": entry.size}),
            )
        }
        Ok(None) => ApiError::not_cached(&digest).into_response(false),
        Err(err) => {
            // The OS error names a path: the log has it, the answer does not.
            tracing::warn!(%digest, %err, "purge: removing the file failed");
            ApiError::purge_failed().into_response(false)
        }
    }
}

/// Resolves `name` exactly as a `/v2/<name>/...` path would be (host prefix, `?ns=`, default
/// upstream, Docker Hub's `library/`), so the purge hits the same cache keys pulls use.
fn purge_repository(state: &AppState, name: &str, ns: Option<&str>) -> Response<Body> {
    let target = match crate::route::resolve(&state.upstreams, ns, name) {
        Ok(target) => target,
        Err(err) => return ApiError::name_invalid(err.to_string()).into_response(false),
    };
    let repository: &Repository = &target.repository;
    let dropped = state
        .cache
        .tags
        .invalidate_repository(&target.upstream.name, repository);
    // And on disk, so the purge survives a restart.
    let removed = state
        .cache
        .store
        .remove_repository_tags(&target.upstream.name, repository);
    tracing::info!(upstream = %target.upstream.name, %repository, dropped, removed, "purged repository tags");
    json(
        StatusCode::OK,
        serde_json::json!({
            "upstream": &*target.upstream.name,
            "repository": repository.as_str(),
            "tags_dropped": dropped,
            "note": "tag mappings were dropped, so the next pull of a tag asks the upstream; \
                     blobs and manifests are content-addressed and may be shared with other \
                     repositories, so they were kept: purge them by digest to remove them",
        }),
    )
}

/// Serves the admin address while `AppState::open` rebuilds the index from disk (minutes for a
/// large cache): `/healthz` 200, `/readyz` and everything else 503 "loading index", so an
/// orchestrator sees a live process that is not ready yet rather than a refused connection.
/// HTTP/1.1 without keep-alive, so no connection outlives the switch to `run`; at most
/// `MAX_CONNECTIONS` at once, each closed after `DRAIN`. Returns the listener once `loaded`
/// resolves.
pub async fn serve_loading(listener: TcpListener, loaded: impl Future<Output = ()>) -> TcpListener {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(false);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(loaded);
    while let Some((stream, permit)) = next_connection(&listener, &connections, &mut loaded).await {
        let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
            Ok::<_, std::convert::Infallible>(loading_answer(request.uri().path()))
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DRAIN, connection).await;
            drop(permit);
        });
    }
    listener
}

/// The next admin connection and its slot of `MAX_CONNECTIONS`, or `None` once `stop`
/// resolves. A failed accept (out of file descriptors) is logged and retried after a pause; a
/// connection over the cap is closed at once.
async fn next_connection<F: Future<Output = ()>>(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &mut std::pin::Pin<&mut F>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.as_mut() => return None,
        };
        if let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
            return Some((stream, permit));
        }
    }
}

fn loading_answer(path: &str) -> Response<Body> {
    match path {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: loading index\n".into(),
        ),
    }
}

fn method_not_allowed() -> Response<Body> {
    ApiError::admin_method_not_allowed().into_response(false)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let text = serde_json::to_string_pretty(&value).expect("JSON values serialise") + "\n";
    respond(status, "application/json", text)
}

fn respond(status: StatusCode, content_type: &'static str, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(body::full(text))
        .expect("valid response")
}

/// The access report (`/admin/access-report`): `GET ...?image=IMAGE` answers the
/// report as JSON, or an error in the OCI envelope (400 for a bad image or no policies).
pub fn access_report(state: &AppState, query: Option<&str>) -> Response<Body> {
    let image = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(name, _)| name == "image")
        .map(|(_, value)| value.into_owned());
    let report = match image {
        Some(image) => state.access.report(&state.upstreams, &image),
        None => Err(crate::access::AccessError::Report(
            "pass the image as ?image=IMAGE".into(),
        )),
    };
    match report {
        Ok(report) => {
            let bytes = serde_json::to_vec_pretty(&report).expect("reports serialise");
            http::Response::builder()
                .status(http::StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::CONTENT_LENGTH, bytes.len())
                .body(body::full(bytes))
                .expect("valid response")
        }
        Err(err) => crate::error::ApiError::from(err).into_response(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_loading_listener_caps_its_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (loaded, loading) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(serve_loading(listener, async {
            let _ = loading.await;
        }));
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
            held.push(stream);
        }
        // One more is closed unanswered at once, not held until `DRAIN` like the others.
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = over
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(DRAIN / 2, over.read_to_end(&mut answer)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a connection over the cap was served: {read:?} {answer:?}"
        );
        drop(held);
        let _ = loaded.send(());
        serving.await.unwrap();
    }

    #[test]
    fn tokens_match_only_exactly() {
        assert!(tokens_match("s3cret-token-value", "s3cret-token-value"));
        assert!(!tokens_match("s3cret-token-valuE", "s3cret-token-value"));
        assert!(!tokens_match("", "s3cret-token-value"));
        assert!(!tokens_match(
            "s3cret-token-value-and-more",
            "s3cret-token-value"
        ));
    }
}
