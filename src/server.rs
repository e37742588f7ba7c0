//! The accept loop: HTTP/1.1 and HTTP/2 (hyper-util's auto connection builder) on a bound
//! listener, each connection served by `api::handle`, and graceful shutdown: on the shutdown
//! signal stop accepting and give connections in flight a bounded time to finish.
//!
//! Binding the socket is the caller's job (so tests bind port 0); TLS termination and
//! connection limits are not here yet.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::{api, AppState};

/// The client's address, put in each request's extensions for the handlers (access control
/// slows down an address that keeps presenting wrong keys).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// How long connections in flight may run after shutdown begins.
const DRAIN: Duration = Duration::from_secs(30);

pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
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
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let service = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let state = Arc::clone(&state);
            request.extensions_mut().insert(PeerAddr(peer));
            async move { Ok::<_, std::convert::Infallible>(api::handle(state, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
    Ok(())
}
