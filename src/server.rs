//! The accept loop: plain HTTP or HTTPS (`tls`), HTTP/1.1 and HTTP/2 (hyper-util's auto
//! connection builder; ALPN picks under TLS), each connection served by `api::handle` within
//! the serving limits (`limits`), and graceful shutdown: on the shutdown signal stop
//! accepting, give requests in flight up to `limits.shutdown_grace` to finish, then let fills
//! still running commit or discard them (temp files removed).
//!
//! Each connection is watched (`watch_connection`): with no request in flight it is closed
//! after `header_read_timeout` if it never sent a request, else after `idle_timeout`. hyper
//! times HTTP/1.1 heads itself but not HTTP/2 ones, nor idle HTTP/2 connections, which answer
//! pings and would otherwise hold a connection slot forever. HTTP/2 floods are hyper's and
//! h2's: `SETTINGS_MAX_CONCURRENT_STREAMS`, a cap on streams reset before they were accepted
//! (rapid reset, CVE-2023-44487) and on streams berth reset, and a header list cap that ends
//! a CONTINUATION flood.
//!
//! Each request carries its connection's `Copier`: only a plain-TCP HTTP/1.x connection may
//! send a cached blob from a memory map (`cache::reader` says why). A plain-TCP connection's
//! stream is a `sendfile::Sendfile`, which sends such map slices from the file with
//! `sendfile(2)` and writes everything else as it is.
//!
//! Binding the socket is the caller's job (so tests bind port 0).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::api::{self, PeerAddr};
use crate::body::Body;
use crate::cache::reader::Copier;
use crate::config::LimitsConfig;
use crate::limits::{self, ClientSlot, ClientSlots, WriteDeadline};
use crate::tls::Tls;
use crate::AppState;
use sendfile::Sendfile;

mod sendfile;

/// Connections over the cap that are being answered 503 at once; beyond this they are closed
/// without an answer, so a flood costs nothing but the accept.
const REJECTING: usize = 64;

/// Streams a client may reset before berth accepted them, and streams berth may reset on
/// one connection, before the connection is closed with GOAWAY (ENHANCE_YOUR_CALM).
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_LOCAL_RESETS: usize = 256;

/// Everything a connection task needs.
struct Serving {
    state: Arc<AppState>,
    builder: auto::Builder<TokioExecutor>,
    /// Requests in flight per client (`max_client_requests`).
    clients: Arc<ClientSlots>,
    /// Open connections per client (`max_client_connections`).
    client_connections: Arc<ClientSlots>,
    tls: Option<Tls>,
}

/// Serves `listener` until `shutdown` resolves, then drains: open -> accept (admit each
/// connection) -> drain.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = state.config.limits.clone();
    let serving = Serving::open(&state)?;
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(REJECTING));
    // Every connection task holds a receiver; `closed()` resolves when the last one ended.
    let (stop, _) = watch::channel(false);
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
        admit(&serving, stream, peer, (&connections, &rejecting), &stop);
    }
    drop(listener);
    drain(&state, &connections, stop).await;
    Ok(())
}

impl Serving {
    /// The shared state of every connection: the HTTP builder, client slots, TLS.
    fn open(state: &Arc<AppState>) -> std::io::Result<Arc<Serving>> {
        let limits = &state.config.limits;
        // The location's replicas are not throttled as clients (`cluster`).
        let peers = state
            .cluster
            .clone()
            .map(|cluster| -> limits::Peers { Arc::new(move |ip| cluster.is_member_address(ip)) });
        let tls = match &state.config.tls {
            Some(config) => Some(Tls::load(config).map_err(std::io::Error::other)?),
            None => None,
        };
        Ok(Arc::new(Serving {
            builder: builder(state),
            clients: ClientSlots::with_peers(
                limits.max_client_requests,
                &limits.trusted_networks,
                peers.clone(),
            ),
            client_connections: ClientSlots::with_peers(
                limits.max_client_connections,
                &limits.trusted_networks,
                peers,
            ),
            state: Arc::clone(state),
            tls,
        }))
    }
}

/// One accepted connection: served if its client and the server have room, else closed (its
/// client over its share) or answered 503 (the server full, while few are being answered so).
fn admit(
    serving: &Arc<Serving>,
    stream: TcpStream,
    peer: SocketAddr,
    (connections, rejecting): (&Arc<Semaphore>, &Arc<Semaphore>),
    stop: &watch::Sender<bool>,
) {
    let metrics = &serving.state.metrics;
    let _ = stream.set_nodelay(true);
    let Some(client) = serving.client_connections.try_acquire(peer.ip()) else {
        // One client over its share: closed at once, no answer, so its flood costs others
        // nothing but the accept.
        metrics
            .rejected
            .with_label_values(&["client_connections"])
            .inc();
        return;
    };
    match Arc::clone(connections).try_acquire_owned() {
        Ok(permit) => {
            let serving = Arc::clone(serving);
            let stopping = stop.subscribe();
            tokio::spawn(serving.connection(stream, peer, (permit, client), stopping));
        }
        Err(_) => {
            metrics.rejected.with_label_values(&["connections"]).inc();
            if let Ok(permit) = Arc::clone(rejecting).try_acquire_owned() {
                tokio::spawn(reject_connection(Arc::clone(serving), stream, permit));
            }
        }
    }
}

/// After the last accept: connections get `shutdown_grace` to finish, then fills what is left.
async fn drain(state: &AppState, connections: &Semaphore, stop: watch::Sender<bool>) {
    let limits = &state.config.limits;
    let deadline = Instant::now() + limits.shutdown_grace;
    tracing::info!(
        connections = limits.max_connections - connections.available_permits(),
        fills = state.fills.in_flight(),
        "draining"
    );
    stop.send_replace(true);
    if tokio::time::timeout_at(deadline, stop.closed())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    state
        .fills
        .drain(deadline.saturating_duration_since(Instant::now()))
        .await;
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
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.write_timeout);
    builder
}

/// Counts one connection's requests in flight; each request holds a `Busy` until its
/// response body ends or is dropped.
#[derive(Clone)]
struct Activity(Arc<watch::Sender<usize>>);

struct Busy(Arc<watch::Sender<usize>>);

impl Activity {
    fn new() -> Activity {
        Activity(Arc::new(watch::Sender::new(0)))
    }

    fn begin(&self) -> Busy {
        self.0.send_modify(|n| *n += 1);
        Busy(Arc::clone(&self.0))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Drives a connection to its end, closing it gracefully (`close`) on server shutdown, and
/// when no request has been in flight for `header_read_timeout` (before its first request) or
/// `idle_timeout` (after). A connection that has not ended `header_read_timeout` after an idle
/// close (a half-sent HTTP/2 header block) is dropped. Returns the connection's error, if any.
async fn watch_connection<F, E>(
    mut connection: Pin<&mut F>,
    close: impl Fn(Pin<&mut F>),
    activity: &Activity,
    mut stopping: watch::Receiver<bool>,
    limits: &LimitsConfig,
) -> Option<E>
where
    F: Future<Output = Result<(), E>>,
{
    let mut busy = activity.0.subscribe();
    let (mut was_idle, mut idle_since) = (true, Instant::now());
    let mut idle_limit = limits.header_read_timeout;
    let mut drop_at: Option<Instant> = None;
    let mut shutdown_seen = false;
    loop {
        let idle = *busy.borrow_and_update() == 0;
        if idle && !was_idle {
            (idle_since, idle_limit) = (Instant::now(), limits.idle_timeout);
        }
        was_idle = idle;
        let deadline = drop_at.or(idle.then_some(idle_since + idle_limit));
        let far = Instant::now() + Duration::from_secs(86_400);
        tokio::select! {
            result = connection.as_mut() => return result.err(),
            changed = stopping.changed(), if !shutdown_seen => {
                shutdown_seen = true;
                if changed.is_ok() {
                    close(connection.as_mut());
                }
            }
            _ = busy.changed() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                if drop_at.is_some() {
                    return None;
                }
                close(connection.as_mut());
                drop_at = Some(Instant::now() + limits.header_read_timeout);
            }
        }
    }
}

impl Serving {
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _held: (OwnedSemaphorePermit, ClientSlot),
        stopping: watch::Receiver<bool>,
    ) {
        let metrics = Arc::clone(&self.state.metrics);
        metrics.connections_open.inc();
        let limits = &self.state.config.limits;
        match &self.tls {
            None => {
                let stream = Sendfile::new(stream, metrics.sendfile_bytes.clone());
                self.serve(stream, peer, stopping).await
            }
            Some(tls) => {
                let handshake = tls.acceptor().accept(stream);
                match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                    Ok(Ok(stream)) => self.serve(stream, peer, stopping).await,
                    Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
        metrics.connections_open.dec();
    }

    async fn serve<IO>(self: &Arc<Self>, io: IO, peer: SocketAddr, stopping: watch::Receiver<bool>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.state.config.limits;
        let io = WriteDeadline::new(io, limits.write_timeout);
        let serving = Arc::clone(self);
        let activity = Activity::new();
        let requests = activity.clone();
        let service = service_fn(move |request| {
            let serving = Arc::clone(&serving);
            let busy = requests.begin();
            async move { Ok::<_, std::convert::Infallible>(serving.request(peer, request, busy).await) }
        });
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let ended = watch_connection(
            connection.as_mut(),
            |c| c.graceful_shutdown(),
            &activity,
            stopping,
            limits,
        )
        .await;
        if let Some(err) = ended {
            tracing::debug!(%peer, %err, "connection ended with an error");
        }
    }

    /// Applies the per-request limits, then hands over to the API. The client's slot is held
    /// by the response body, so a download counts until its last byte.
    async fn request(
        &self,
        peer: SocketAddr,
        mut request: Request<Incoming>,
        busy: Busy,
    ) -> http::Response<Body> {
        request.extensions_mut().insert(PeerAddr(peer));
        let copier = Copier::of_connection(self.tls.is_some(), request.version());
        request.extensions_mut().insert(copier);
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
                let _held = (&slot, &busy);
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
