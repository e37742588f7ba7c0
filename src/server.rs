//! The accept loop: plain HTTP or HTTPS (`tls`), HTTP/1.1 and HTTP/2 (hyper-util's auto
//! connection builder; ALPN picks under TLS), each connection served by `api::handle` within
//! the serving limits (`limits`), and graceful shutdown: on the shutdown signal stop
//! accepting, give requests in flight up to `limits.shutdown_grace` to finish, then let fills
//! still running commit or discard them (temp files removed).
//!
//! Binding the socket is the caller's job (so tests bind port 0).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::Body;
use crate::limits::{self, ClientSlots, WriteDeadline};
use crate::tls::Tls;
use crate::{api, AppState};

/// The client's address, put in each request's extensions for the handlers (access control
/// slows down an address that keeps presenting wrong keys).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Connections over the cap that are being answered 503 at once; beyond this they are closed
/// without an answer, so a flood costs nothing but the accept.
const REJECTING: usize = 64;

/// Everything a connection task needs.
struct Serving {
    state: Arc<AppState>,
    builder: auto::Builder<TokioExecutor>,
    clients: Arc<ClientSlots>,
    tls: Option<Tls>,
}

pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = state.config.limits.clone();
    let tls = match &state.config.tls {
        Some(config) => Some(Tls::load(config).map_err(std::io::Error::other)?),
        None => None,
    };
    let serving = Arc::new(Serving {
        builder: builder(&state),
        clients: ClientSlots::new(limits.max_client_requests),
        state: Arc::clone(&state),
        tls,
    });
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(REJECTING));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    state.readiness.mark_serving();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => {
                state.readiness.mark_shutting_down();
                break;
            }
        };
        let _ = stream.set_nodelay(true);
        match Arc::clone(&connections).try_acquire_owned() {
            Ok(permit) => {
                let serving = Arc::clone(&serving);
                let watcher = graceful.watcher();
                tokio::spawn(serving.connection(stream, peer, permit, watcher));
            }
            Err(_) => {
                state
                    .metrics
                    .rejected
                    .with_label_values(&["connections"])
                    .inc();
                if let Ok(permit) = Arc::clone(&rejecting).try_acquire_owned() {
                    tokio::spawn(reject_connection(Arc::clone(&serving), stream, permit));
                }
            }
        }
    }
    drop(listener);
    let deadline = Instant::now() + limits.shutdown_grace;
    tracing::info!(
        connections = limits.max_connections - connections.available_permits(),
        fills = state.fills.in_flight(),
        "draining"
    );
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    state
        .fills
        .drain(deadline.saturating_duration_since(Instant::now()))
        .await;
    Ok(())
}

fn builder(state: &AppState) -> auto::Builder<TokioExecutor> {
    let limits = &state.config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers 431 itself for a head larger than its buffer; within it, `limits` answers
    // in the OCI envelope. The buffer has room for the largest head the limits allow.
    let buffer = (limits.max_uri_bytes + limits.max_header_bytes + 1024).max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(buffer)
        .max_headers(limits.max_headers + 1);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buffer).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.write_timeout);
    builder
}

impl Serving {
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
        watcher: Watcher,
    ) {
        let metrics = Arc::clone(&self.state.metrics);
        metrics.connections_open.inc();
        let limits = &self.state.config.limits;
        match &self.tls {
            None => self.serve(stream, peer, watcher).await,
            Some(tls) => {
                let handshake = tls.acceptor().accept(stream);
                match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                    Ok(Ok(stream)) => self.serve(stream, peer, watcher).await,
                    Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
        metrics.connections_open.dec();
    }

    async fn serve<IO>(self: &Arc<Self>, io: IO, peer: SocketAddr, watcher: Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = WriteDeadline::new(io, self.state.config.limits.write_timeout);
        let serving = Arc::clone(self);
        let service = service_fn(move |request| {
            let serving = Arc::clone(&serving);
            async move { Ok::<_, std::convert::Infallible>(serving.request(peer, request).await) }
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        if let Err(err) = watcher.watch(connection).await {
            tracing::debug!(%peer, %err, "connection ended with an error");
        }
    }

    /// Applies the per-request limits, then hands over to the API. The client's slot is held
    /// by the response body, so a download counts until its last byte.
    async fn request(
        &self,
        peer: SocketAddr,
        mut request: Request<Incoming>,
    ) -> http::Response<Body> {
        request.extensions_mut().insert(PeerAddr(peer));
        let state = &self.state;
        let limits = &state.config.limits;
        let head = request.method() == http::Method::HEAD;
        if let Some((limit, error)) = limits::check_request(limits, &request) {
            state.metrics.rejected.with_label_values(&[limit]).inc();
            return error.into_response(head);
        }
        let Some(slot) = self.clients.try_acquire(peer.ip()) else {
            state.metrics.rejected.with_label_values(&["client"]).inc();
            return limits::too_many_client_requests(limits).into_response(head);
        };
        let response = api::handle(Arc::clone(state), request).await;
        response.map(|body| {
            body.map_frame(move |frame| {
                let _held = &slot;
                frame
            })
            .boxed_unsync()
        })
    }
}

/// Answers a connection over the cap with 503 + Retry-After and closes it. Under TLS the
/// connection is closed without an answer: a handshake is not worth spending on it.
async fn reject_connection(
    serving: Arc<Serving>,
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
) {
    if serving.tls.is_some() {
        return;
    }
    let limits = serving.state.config.limits.clone();
    let timeout = limits.header_read_timeout;
    let service = service_fn(move |request: Request<Incoming>| {
        let head = request.method() == http::Method::HEAD;
        let error = limits::too_many_connections(&limits);
        async move { Ok::<_, std::convert::Infallible>(error.into_response(head)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(timeout * 2, connection).await;
}
