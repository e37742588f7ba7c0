//! Serving-side limits that keep berth answering under load and hostile clients: per-client
//! request slots, request-size checks, and a transport wrapper that drops clients who stop
//! taking bytes.
//!
//! Owns: the mechanics of each limit. Does not own: where they apply (the accept loop in
//! `server`, the fill cap in `fill`) or the values (`config::LimitsConfig`). Every refusal is
//! an `ApiError`, so it reaches the client in the OCI envelope like any other error.
//!
//! | limit                       | where                   | answer                          |
//! |-----------------------------|-------------------------|---------------------------------|
//! | `max_connections`           | accept loop             | 503 + Retry-After, then close   |
//! | `max_fills`                 | `fill::Fills::join`     | 503 + Retry-After               |
//! | `upstream_fill_share`       | `fill::Fills::join`, by upstream | 503 + Retry-After      |
//! | `max_client_connections`    | accept loop, by client  | connection closed at once       |
//! | `max_client_requests`       | per request, by client  | 429 + Retry-After               |
//! | `max_uri_bytes`             | per request             | 414                             |
//! | `max_header_bytes`/`max_headers` | per request; hyper's own 431 beyond its buffer | 431 |
//! | `header_read_timeout`       | hyper (HTTP/1.1); `server` (first HTTP/2 request) | connection closed |
//! | `idle_timeout`              | `server`, no request in flight | connection closed        |
//! | `h2_max_concurrent_streams` | hyper (HTTP/2 SETTINGS) | stream refused                  |
//! | `write_timeout`             | `WriteDeadline`         | connection closed               |
//!
//! A client is an IPv4 address or an IPv6 /64 (`ClientKey`): one host usually holds a whole
//! /64, so counting single IPv6 addresses would give it 2^64 shares. Clients in
//! `trusted_networks` (nodes behind SNAT or a load balancer, the location's own replicas) are
//! exempt from both per-client caps, and so are the addresses of the location's replicas as
//! listed now (`ClientSlots::with_peers`; membership changes with DNS).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, RETRY_AFTER};
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::config::LimitsConfig;
use crate::error::ApiError;

/// What a per-client cap counts by: an IPv4 address, or the /64 of an IPv6 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !(u128::MAX >> 64);
                    ClientKey(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

/// Per-client counts under a cap: requests in flight (`max_client_requests`) or open
/// connections (`max_client_connections`). A map entry lives only while its count is above
/// zero, so the map holds at most one entry per thing counted.
pub(crate) struct ClientSlots {
    max: usize,
    trusted: Vec<ipnet::IpNet>,
    /// Whether an address is one of the location's replicas (`cluster`): peer traffic is not
    /// throttled as a client.
    peers: Option<Peers>,
    in_flight: Mutex<HashMap<ClientKey, usize>>,
}

/// The replicas' addresses, as the cluster lists them at the time of asking.
pub type Peers = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// One request's or connection's slot; released when dropped. A trusted client's slot
/// counts nothing.
pub(crate) struct ClientSlot {
    slots: Arc<ClientSlots>,
    key: Option<ClientKey>,
}

impl ClientSlots {
    #[cfg(test)]
    fn new(max: usize, trusted: &[ipnet::IpNet]) -> Arc<ClientSlots> {
        ClientSlots::with_peers(max, trusted, None)
    }

    /// Slots that also exempt the location's replicas (`peers`).
    pub(crate) fn with_peers(
        max: usize,
        trusted: &[ipnet::IpNet],
        peers: Option<Peers>,
    ) -> Arc<ClientSlots> {
        Arc::new(ClientSlots {
            max,
            trusted: trusted.to_vec(),
            peers,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|network| network.contains(&ip))
            || self.peers.as_ref().is_some_and(|peers| peers(ip))
    }

    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        if self.is_trusted(ip) {
            return Some(ClientSlot {
                slots: Arc::clone(self),
                key: None,
            });
        }
        let key = ClientKey::of(ip);
        let mut in_flight = self.in_flight.lock().expect("client slots lock");
        let count = in_flight.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            slots: Arc::clone(self),
            key: Some(key),
        })
    }

    /// Clients holding at least one slot; the tests' view of what stays keyed.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.in_flight.lock().expect("client slots lock").len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let mut in_flight = self.slots.in_flight.lock().expect("client slots lock");
        if let Some(count) = in_flight.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&key);
            }
        }
    }
}

fn retry_after(limits: &LimitsConfig) -> HeaderValue {
    HeaderValue::from(limits.retry_after.as_secs().max(1))
}

/// The answer to a connection over `max_connections`.
pub(crate) fn too_many_connections(limits: &LimitsConfig) -> ApiError {
    ApiError::unavailable("too many connections; retry shortly")
        .with_header(RETRY_AFTER, retry_after(limits))
}

/// The answer to a client over `max_client_requests`.
pub(crate) fn too_many_client_requests(limits: &LimitsConfig) -> ApiError {
    ApiError::too_many_requests("too many requests in flight from this client")
        .with_header(RETRY_AFTER, retry_after(limits))
}

/// Which size limit a request breaks, if any, as the error to answer with, and the metric
/// label.
pub(crate) fn check_request<B>(
    limits: &LimitsConfig,
    request: &Request<B>,
) -> Option<(&'static str, ApiError)> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > limits.max_uri_bytes {
        let error =
            ApiError::uri_too_long(format!("{target} bytes; at most {}", limits.max_uri_bytes));
        return Some(("uri", error));
    }
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > limits.max_header_bytes || headers.len() > limits.max_headers {
        let error = ApiError::headers_too_large(format!(
            "{} fields, {bytes} bytes; at most {} fields, {} bytes",
            headers.len(),
            limits.max_headers,
            limits.max_header_bytes
        ));
        return Some(("headers", error));
    }
    None
}

/// A transport whose writes fail once they have been blocked for `timeout`: a client that
/// stops reading (slowloris on the response side) loses its connection instead of pinning a
/// task, a file and a client slot forever.
pub(crate) struct WriteDeadline<IO> {
    inner: IO,
    timeout: Duration,
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(inner: IO, timeout: Duration) -> WriteDeadline<IO> {
        WriteDeadline {
            inner,
            timeout,
            blocked: None,
        }
    }

    /// Tracks how long the write side has been pending.
    fn pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.timeout;
        let blocked = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match blocked.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "client took no response bytes within limits.write_timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A finished write or flush clears the stall clock; a pending one arms or checks it.
    fn settle<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.blocked = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.pending(cx).map(Err),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.settle(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.settle(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.settle(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn client_slots_cap_each_ip_and_free_on_drop() {
        let slots = ClientSlots::new(2, &[]);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(a).unwrap();
        assert!(slots.try_acquire(a).is_none());
        assert!(
            slots.try_acquire(b).is_some(),
            "other clients are unaffected"
        );
        drop(first);
        assert!(slots.try_acquire(a).is_some());
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let slots = ClientSlots::new(1, &[]);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff:eeee:dddd:cccc".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _held = slots.try_acquire(one).unwrap();
        assert!(
            slots.try_acquire(same_64).is_none(),
            "same /64, same client"
        );
        assert!(slots.try_acquire(other_64).is_some());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let _v4 = slots.try_acquire("10.0.0.1".parse().unwrap()).unwrap();
        assert!(
            slots.try_acquire(mapped).is_none(),
            "mapped IPv4 is the IPv4 client"
        );
    }

    #[test]
    fn the_locations_replicas_are_not_counted_while_listed() {
        let listed = Arc::new(Mutex::new(vec![IpAddr::from([10, 1, 0, 2])]));
        let peers: Peers = {
            let listed = Arc::clone(&listed);
            Arc::new(move |ip| listed.lock().unwrap().contains(&ip))
        };
        let slots = ClientSlots::with_peers(1, &[], Some(peers));
        let replica = IpAddr::from([10, 1, 0, 2]);
        let held: Vec<_> = (0..5)
            .map(|_| slots.try_acquire(replica).unwrap())
            .collect();
        assert_eq!(slots.clients(), 0);
        // An IPv4-mapped address is the same replica.
        assert!(slots
            .try_acquire("::ffff:10.1.0.2".parse().unwrap())
            .is_some());
        // Gone from the ring (e.g. from DNS): an ordinary client again.
        listed.lock().unwrap().clear();
        let first = slots.try_acquire(replica);
        assert!(first.is_some());
        assert!(slots.try_acquire(replica).is_none());
        drop(held);
    }

    #[test]
    fn trusted_networks_are_not_counted() {
        let trusted = ["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let slots = ClientSlots::new(1, &trusted);
        let held: Vec<_> = (0..10)
            .map(|_| slots.try_acquire("10.1.2.3".parse().unwrap()).unwrap())
            .chain((0..10).map(|_| slots.try_acquire("fd00::7".parse().unwrap()).unwrap()))
            .collect();
        assert_eq!(slots.clients(), 0);
        let _outsider = slots.try_acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert!(slots.try_acquire("192.0.2.1".parse().unwrap()).is_none());
        drop(held);
    }

    #[test]
    fn oversized_targets_and_heads_are_refused_with_414_and_431() {
        let limits = LimitsConfig {
            max_uri_bytes: 300,
            max_header_bytes: 1024,
            max_headers: 3,
            ..LimitsConfig::default()
        };
        let ok = Request::get("/v2/a/manifests/b").body(()).unwrap();
        assert!(check_request(&limits, &ok).is_none());
        let long = Request::get(format!("/v2/{}/manifests/b", "a".repeat(400)))
            .body(())
            .unwrap();
        let (_, error) = check_request(&limits, &long).unwrap();
        assert_eq!(error.status, StatusCode::URI_TOO_LONG);
        let big = Request::get("/v2/")
            .header("x-big", "v".repeat(2000))
            .body(())
            .unwrap();
        assert_eq!(check_request(&limits, &big).unwrap().1.status.as_u16(), 431);
        let mut many = Request::get("/v2/");
        for i in 0..4 {
            many = many.header(format!("x-{i}"), "v");
        }
        let many = many.body(()).unwrap();
        assert_eq!(
            check_request(&limits, &many).unwrap().1.status.as_u16(),
            431
        );
    }

    #[tokio::test]
    async fn a_write_blocked_past_the_deadline_fails() {
        use tokio::io::AsyncWriteExt;
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = WriteDeadline::new(server, Duration::from_millis(20));
        // Nobody reads `client`: the duplex buffer fills and the write blocks until the deadline.
        let err = guarded.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);
    }
}
