//! The tap: a transparent in-process HTTP/1.1 reverse proxy on 127.0.0.1:0 between berth and the
//! real registry. It records every request on arrival, so tests count upstream traffic exactly,
//! and it injects per-kind `Fault`s at runtime.
//!
//! Owns: forwarding (all end-to-end headers both ways, bodies streamed, nothing rewritten; the
//! client's `Host` goes upstream unchanged, so registry-made URLs point back at the tap), the
//! request log, the fault rules and the pause gate.
//! Does not own: what a fault does to a body (`fault`), TLS, or HTTP/2.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::client::BoxError;
use super::fault::{self, CuttableIo, Fault, Gate, TapBody};

/// How long `wait_for` and `wait_paused` wait before failing the test with what was seen.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request asks the registry for, from its path (distribution spec endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/v2/<name>/manifests/<reference>`
    Manifest,
    /// `/v2/<name>/blobs/<digest>` (uploads under `blobs/uploads/` are `Other`)
    Blob,
    /// `/v2/<name>/tags/list`
    Tags,
    /// A token endpoint: any path outside `/v2/` whose last segment is `token`.
    Token,
    /// Everything else, including the `/v2/` version check.
    Other,
}

impl Kind {
    pub fn of_path(path: &str) -> Kind {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if segments.first() != Some(&"v2") {
            return match segments.last() {
                Some(&"token") => Kind::Token,
                _ => Kind::Other,
            };
        }
        // `v2/<name>/<endpoint>/<last>`, where `<name>` may hold slashes: read from the end.
        let n = segments.len();
        if n < 4 {
            return Kind::Other;
        }
        match (segments[n - 2], segments[n - 1]) {
            ("manifests", _) => Kind::Manifest,
            ("blobs", "uploads") => Kind::Other,
            ("blobs", _) => Kind::Blob,
            ("tags", "list") => Kind::Tags,
            _ => Kind::Other,
        }
    }
}

/// One request as it arrived at the tap.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    pub kind: Kind,
    pub headers: HeaderMap,
}

/// A fault for one kind of request, for all of them or for the next `remaining`.
struct Rule {
    fault: Fault,
    remaining: Option<usize>,
}

struct State {
    /// `http://HOST:PORT` of the registry behind the tap.
    upstream: String,
    client: Client<HttpConnector, Incoming>,
    seen: Mutex<Vec<Seen>>,
    /// Bumped after each arrival so `wait_for` wakes without polling.
    arrivals: watch::Sender<usize>,
    rules: Mutex<HashMap<Kind, Rule>>,
    gate: Gate,
}

/// A running tap; dropping it closes every connection, which also ends a `Stall`.
pub struct Tap {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Tap {
    /// Starts a tap in front of `upstream_url` (`http://HOST:PORT`).
    pub async fn start(upstream_url: &str) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = listener.local_addr().expect("tap address");
        let state = Arc::new(State {
            upstream: upstream_url.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            seen: Mutex::default(),
            arrivals: watch::Sender::new(0),
            rules: Mutex::default(),
            gate: Gate::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Tap {
            addr,
            state,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, to configure as berth's upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the host part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Requests of this method and kind that have arrived since the last `reset`.
    pub fn count(&self, method: Method, kind: Kind) -> usize {
        let seen = self.state.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.method == method && s.kind == kind)
            .count()
    }

    /// Asserts that `expected` requests of this method and kind arrived, listing every request
    /// when not.
    #[track_caller]
    pub fn assert_count(&self, method: Method, kind: Kind, expected: usize) {
        assert_eq!(self.count(method, kind), expected, "{:#?}", self.requests());
    }

    /// How many requests of `kind` since the last `reset` asked for a `Range` (resumes).
    pub fn count_ranged(&self, kind: Kind) -> usize {
        let seen = self.state.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.kind == kind && s.headers.contains_key("range"))
            .count()
    }

    /// Every request since the last `reset`, in arrival order.
    pub fn requests(&self) -> Vec<(Method, String)> {
        let seen = self.state.seen.lock().unwrap();
        seen.iter()
            .map(|s| (s.method.clone(), s.path.clone()))
            .collect()
    }

    /// The paths (with query) of every request since the last `reset`, in arrival order.
    pub fn paths(&self) -> Vec<String> {
        let seen = self.state.seen.lock().unwrap();
        seen.iter().map(|s| s.path.clone()).collect()
    }

    /// Like `requests`, with kinds and headers (e.g. to check `Authorization` or `Range`).
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Forgets the requests seen so far; fault rules stay.
    pub fn reset(&self) {
        self.state.seen.lock().unwrap().clear();
    }

    /// Applies `fault` to every matching request from now on; `Fault::None` clears the rule.
    /// Body faults match successful GETs only; `Status` matches every method.
    pub fn inject(&self, kind: Kind, fault: Fault) {
        self.set_rule(kind, fault, None);
    }

    /// Forgets the requests seen so far, then applies `fault` to the next blob request only:
    /// the set-up of a test about one faulted transfer.
    pub fn reset_with_blob_fault(&self, fault: Fault) {
        self.reset();
        self.inject_times(Kind::Blob, fault, 1);
    }

    /// Applies `fault` to the next `times` matching requests only.
    pub fn inject_times(&self, kind: Kind, fault: Fault, times: usize) {
        self.set_rule(kind, fault, Some(times));
    }

    pub fn clear_faults(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    fn set_rule(&self, kind: Kind, fault: Fault, remaining: Option<usize>) {
        if matches!(fault, Fault::PauseAt(_) | Fault::Hold) {
            self.state.gate.released.send_replace(false);
        }
        let mut rules = self.state.rules.lock().unwrap();
        if fault == Fault::None || remaining == Some(0) {
            rules.remove(&kind);
        } else {
            rules.insert(kind, Rule { fault, remaining });
        }
    }

    /// Waits until at least `n` requests of this method and kind have arrived; fails the test
    /// with the request log after 10 s.
    pub async fn wait_for(&self, method: Method, kind: Kind, n: usize) {
        let mut arrivals = self.state.arrivals.subscribe();
        let reached = arrivals.wait_for(|_| self.count(method.clone(), kind) >= n);
        if tokio::time::timeout(WAIT_TIMEOUT, reached).await.is_err() {
            panic!(
                "tap: waited for {n} x {method} {kind:?}; saw {:#?}",
                self.requests()
            );
        }
    }

    /// Waits until at least `n` bodies (in total) are held at a `PauseAt` point.
    pub async fn wait_paused(&self, n: usize) {
        let mut paused = self.state.gate.paused.subscribe();
        let reached = paused.wait_for(|held| *held >= n);
        if tokio::time::timeout(WAIT_TIMEOUT, reached).await.is_err() {
            panic!(
                "tap: waited for {n} paused bodies; saw {:#?}",
                self.requests()
            );
        }
    }

    /// Lets every paused body (and any that reach their pause point later) run to the end.
    pub fn resume(&self) {
        self.state.gate.released.send_replace(true);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    accept_each(listener, |stream| serve_connection(stream, state.clone())).await
}

/// Accepts connections until aborted and serves each on its own task; aborting the future drops
/// its `JoinSet`, which aborts every connection task with it.
pub(super) async fn accept_each<Serve, Served>(listener: TcpListener, serve: Serve)
where
    Serve: Fn(tokio::net::TcpStream) -> Served,
    Served: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.spawn(serve(stream));
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    let cut = Arc::new(AtomicBool::new(false));
    let io = CuttableIo::new(stream, cut.clone());
    let service = service_fn(move |req| forward(state.clone(), req, cut.clone()));
    // Errors here are the faults themselves (a cut body) or a client hanging up: not news.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

/// Records, applies a `Status` fault or forwards, then applies a body fault to the response.
/// An unreachable upstream closes the client's connection without a response, which is what a
/// client of a dead registry would see, rather than a 502 no registry sends.
async fn forward(
    state: Arc<State>,
    req: Request<Incoming>,
    cut: Arc<AtomicBool>,
) -> Result<Response<TapBody>, BoxError> {
    let kind = Kind::of_path(req.uri().path());
    state.record(&req, kind);
    if let Some(Fault::Status(status, retry_after)) =
        state.take(kind, |f| matches!(f, Fault::Status(..)))
    {
        return Ok(fault::status_response(status, retry_after, kind));
    }
    if state.take(kind, |f| *f == Fault::Hold).is_some() {
        state.gate.paused.send_modify(|n| *n += 1);
        let mut released = state.gate.released.subscribe();
        let _ = released.wait_for(|open| *open).await;
    }
    let is_get = req.method() == Method::GET;
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("{}{}", state.upstream, path_and_query(&parts.uri)).parse()?;
    strip_hop_by_hop(&mut parts.headers);
    let response = state
        .client
        .request(Request::from_parts(parts, body))
        .await?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if state
        .take(kind, |f| *f == Fault::DropDigestHeader)
        .is_some()
    {
        parts.headers.remove("docker-content-digest");
    }
    let body_fault = match is_get && parts.status.is_success() {
        true => state.take(kind, Fault::is_body_fault),
        false => None,
    };
    let body = match body_fault {
        Some(fault) => {
            let length = content_length(&parts.headers);
            match &fault {
                Fault::Chunked | Fault::ChunkedCorrupt => {
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                Fault::ContentType(media_type) => {
                    let value = header::HeaderValue::from_static(media_type);
                    parts.headers.insert(header::CONTENT_TYPE, value);
                }
                _ => {}
            }
            fault::faulted_body(fault, body, length, state.gate.clone(), cut)
        }
        None => body.map_err(BoxError::from).boxed(),
    };
    Ok(Response::from_parts(parts, body))
}

impl State {
    fn record(&self, req: &Request<Incoming>, kind: Kind) {
        let seen = Seen {
            method: req.method().clone(),
            path: path_and_query(req.uri()).to_owned(),
            kind,
            headers: req.headers().clone(),
        };
        // The log lock is released before waking waiters, who take it to count.
        self.seen.lock().unwrap().push(seen);
        self.arrivals.send_modify(|n| *n += 1);
    }

    /// Takes the rule's fault for `kind` if `applies` to it, using up one of its `remaining`.
    fn take(&self, kind: Kind, applies: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let rule = rules.get_mut(&kind).filter(|r| applies(&r.fault))?;
        let fault = rule.fault.clone();
        if let Some(remaining) = rule.remaining.as_mut() {
            *remaining -= 1;
            if *remaining == 0 {
                rules.remove(&kind);
            }
        }
        Some(fault)
    }
}

/// Connection-scoped headers (RFC 9110 section 7.6.1) belong to each hop, not to the message; hyper
/// frames each hop's body itself.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

fn path_and_query(uri: &http::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
