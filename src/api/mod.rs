//! The `/v2/` registry API as named phases: parse -> route -> authorize -> lookup -> serve | fill.
//!
//! `handle` is the whole life of a request: it parses the path, refuses writes, resolves the
//! upstream and repository, and hands over to the manifest, blob or pass-through handler, then
//! stamps `X-Cache` and `X-Request-Id`, counts the request, and wraps the body so the bytes, the
//! duration and one log line are recorded when it ends (`record`). Errors from any phase become
//! a response in exactly one place (`ApiError::into_response`). The authorize phase is
//! `access`; `/token`, the token service of the policy access mode, is here too (`token`).

mod blob;
mod holds;
mod manifest;
mod passthrough;
pub(crate) mod record;
mod request_line;
mod token;

use std::sync::Arc;

use http::header::{HeaderValue, HOST};
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

use crate::access::{AccessError, Asker};
use crate::body::{self, Body};
use crate::cache::reader::Copier;
use crate::cache::Outcome;
use crate::error::{ApiError, Code};
use crate::metrics::status_class;
use crate::oci::name::{split_api_path, ApiPath};
use crate::oci::reference::ReferenceError;
use crate::route::{self, RouteError};
use crate::upstream::CredentialSource;
use crate::AppState;

/// The client's address, put in each request's extensions for the handlers (access control
/// slows down an address that keeps presenting wrong keys).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub std::net::SocketAddr);

pub(crate) use manifest::{ManifestFlights, RevalidationFlights};

/// Which API route a request hit; a metric label, so a small closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteKind {
    Ping,
    Manifest,
    Blob,
    Tags,
    Referrers,
    Token,
    Other,
}

impl RouteKind {
    fn as_str(self) -> &'static str {
        match self {
            RouteKind::Ping => "ping",
            RouteKind::Manifest => "manifest",
            RouteKind::Blob => "blob",
            RouteKind::Tags => "tags",
            RouteKind::Referrers => "referrers",
            RouteKind::Token => "token",
            RouteKind::Other => "other",
        }
    }
}

type Served = Result<(Response<Body>, Outcome), ApiError>;

pub async fn handle<B>(state: Arc<AppState>, request: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let method = request.method().clone();
    let head = method == Method::HEAD;
    let id = record::request_id(request.headers());
    let read_timeout = state.config.limits.header_read_timeout;
    let (request, (kind, seen, served)) = match token::password_grant(request, read_timeout).await {
        Ok(request) => {
            let dispatched = dispatch(&state, &request).await;
            (request, dispatched)
        }
        Err((request, error)) => (request, (RouteKind::Token, Seen::default(), Err(error))),
    };
    let (mut response, outcome, error) = match served {
        Ok((response, outcome)) => (response, outcome, None),
        Err(error) => {
            let error = error.with_request_id(&id);
            let outcome = if matches!(error.code, Code::Denied | Code::Unauthorized) {
                Outcome::Denied
            } else {
                Outcome::Error
            };
            let message = error.to_string();
            (error.into_response(head), outcome, Some(message))
        }
    };
    let headers = response.headers_mut();
    headers.insert("x-cache", HeaderValue::from_static(outcome.as_str()));
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert("x-request-id", value);
    }
    let status = response.status();
    let route = kind.as_str();
    let metrics = &state.metrics;
    metrics
        .requests
        .with_label_values(&[
            route,
            crate::metrics::method_label(&method),
            status_class(status),
            outcome.as_str(),
        ])
        .inc();
    let time_to_first_byte = started.elapsed();
    metrics
        .time_to_first_byte
        .with_label_values(&[route])
        .observe(time_to_first_byte.as_secs_f64());
    let served = record::source(route, outcome)
        .map(|source| metrics.bytes_served.with_label_values(&[route, source]));
    let record = record::Record {
        id,
        method,
        path: request.uri().path().to_string(),
        route,
        upstream: seen.upstream,
        principal: seen.principal,
        status,
        outcome,
        error,
        started,
        time_to_first_byte,
        served,
        duration: metrics.request_seconds.with_label_values(&[route]),
    };
    let content_length = if head {
        Some(0)
    } else {
        crate::upstream::content_length(response.headers())
    };
    response.map(|body| record::observe(body, record, content_length))
}

/// The route a request hit, what the phases learned on the way, and the answer.
type Dispatched = (RouteKind, Seen, Served);

/// Filled in by the phases as they pass, so the log line names them even when a later phase
/// fails.
#[derive(Default)]
struct Seen {
    /// The upstream routing picked.
    upstream: Option<Arc<str>>,
    /// Who the authorize phase found asking (policy mode), allowed or denied.
    principal: Option<String>,
}

async fn dispatch<B>(state: &Arc<AppState>, request: &Request<B>) -> Dispatched {
    let path = request.uri().path();
    let method = request.method();
    if path == "/v2/" || path == "/v2" {
        return (RouteKind::Ping, Seen::default(), ping(state, request).await);
    }
    if path == "/token" {
        let served = token::serve(state, request).await;
        return (RouteKind::Token, Seen::default(), served);
    }
    let parsed = path.strip_prefix("/v2/").and_then(split_api_path);
    let kind = match &parsed {
        Some(ApiPath::Manifest { .. }) => RouteKind::Manifest,
        Some(ApiPath::Blob { .. }) => RouteKind::Blob,
        Some(ApiPath::Tags { .. }) => RouteKind::Tags,
        Some(ApiPath::Referrers { .. }) => RouteKind::Referrers,
        _ => RouteKind::Other,
    };
    // Writes are refused whatever the path: berth is a pull-only cache.
    if matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        let error = ApiError::unsupported(
            "berth is a pull-through cache; pushes and deletes go to the registry",
        );
        return (kind, Seen::default(), Err(error));
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        let error = ApiError::unsupported(format!("method {method} is not supported"));
        return (kind, Seen::default(), Err(error));
    }
    let Some(parsed) = parsed else {
        let error = ApiError::not_api_path(path.to_string());
        return (kind, Seen::default(), Err(error));
    };
    let mut seen = Seen::default();
    let served = serve(state, request, parsed, &mut seen).await;
    (kind, seen, served)
}

async fn ping<B>(state: &AppState, request: &Request<B>) -> Served {
    let method = request.method();
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Err(ApiError::unsupported(format!(
            "method {method} is not supported"
        )));
    }
    state.access.authorize_ping(&asker(request)).await?;
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("docker-distribution-api-version", "registry/2.0")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, 2)
        .body(if *method == Method::HEAD {
            body::empty()
        } else {
            body::full("{}")
        })
        .expect("valid response");
    Ok((response, Outcome::Bypass))
}

/// Serves a parsed API path, noting in `seen` what each phase found.
async fn serve<B>(
    state: &Arc<AppState>,
    request: &Request<B>,
    parsed: ApiPath<'_>,
    seen: &mut Seen,
) -> Served {
    let head = request.method() == Method::HEAD;
    let query = request.uri().query();
    let ns = route::ns_param(query);
    let name = match &parsed {
        ApiPath::Manifest { name, .. }
        | ApiPath::Blob { name, .. }
        | ApiPath::Tags { name }
        | ApiPath::Referrers { name, .. }
        | ApiPath::BlobUpload { name } => *name,
        ApiPath::Catalog => return Err(ApiError::no_catalog()),
    };
    // Route: which upstream, which repository. Nothing is dialled for an unknown registry. In
    // the policy mode the caller authenticates first, so an anonymous one learns nothing about
    // which registries are configured.
    let target = match route::resolve(&state.upstreams, ns, name) {
        Ok(target) => target,
        Err(err) => {
            state.access.authorize_ping(&asker(request)).await?;
            return Err(route_error(err));
        }
    };
    seen.upstream = Some(Arc::clone(&target.upstream.name));
    let from_peer = authorize(state, request, &target, seen).await?;
    // Another org's platform registry is reached only with a docker secret for it.
    if target.upstream.requires_secret
        && target.upstream.credential_source(&target.repository) == CredentialSource::Anonymous
    {
        let error = ApiError::denied(format!(
            "{} is another org's registry and no docker secret covers it",
            target.upstream.name
        ));
        return Err(error);
    }
    let headers = request.headers();
    match parsed {
        ApiPath::Manifest { reference, .. } => {
            manifest::serve(state, target, reference, headers, head).await
        }
        ApiPath::Blob { digest, .. } => {
            let client = blob::Client {
                version: request.version(),
                // Set by the server for each connection; anything else must not be mapped.
                copier: (request.extensions().get().copied()).unwrap_or(Copier::Berth),
                from_peer,
            };
            blob::serve(state, target, digest, headers, head, client).await
        }
        ApiPath::Tags { .. } => {
            passthrough::serve(target, "tags/list".into(), query, name, head).await
        }
        ApiPath::Referrers { digest, .. } => {
            let digest = crate::oci::digest::Digest::parse(digest)?;
            passthrough::serve(target, format!("referrers/{digest}"), query, name, head).await
        }
        // Upload endpoints allow no method at all here: an empty `Allow` says so (RFC 9110).
        ApiPath::BlobUpload { .. } | ApiPath::Catalog => Err(ApiError::read_only()),
    }
}

/// Authorize: anyone in the anonymous access mode; in the policy mode, a principal whose
/// policies let it pull this repository. Before any cache lookup or upstream request.
/// A peer request (another replica of the location, with the cluster token) was authorized by
/// the replica its client asked; without a valid token it is an ordinary request. Returns
/// whether it is a peer request.
async fn authorize<B>(
    state: &Arc<AppState>,
    request: &Request<B>,
    target: &route::Target,
    seen: &mut Seen,
) -> Result<bool, ApiError> {
    let from_peer = crate::cluster::is_peer_request(state.cluster.as_deref(), request.headers());
    if from_peer && state.readiness.is_shutting_down() {
        return Err(ApiError::peer_draining());
    }
    let authorized = match from_peer {
        true => Ok(Some("peer".to_owned())),
        false => state.access.authorize(&asker(request), target).await,
    };
    seen.principal = match &authorized {
        Ok(principal) => principal.clone(),
        Err(AccessError::Denied { principal, .. }) => Some(principal.clone()),
        Err(_) => None,
    };
    authorized?;
    Ok(from_peer)
}

/// What access control needs from a request: credentials, the host it was sent to, the peer.
fn asker<B>(request: &Request<B>) -> Asker<'_> {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(HOST).and_then(|v| v.to_str().ok()));
    Asker {
        headers: request.headers(),
        host,
        peer: request
            .extensions()
            .get::<PeerAddr>()
            .map(|peer| peer.0.ip()),
    }
}

/// What a prefetch (`crate::prefetch`) needs to start fills.
fn prefetch_fillers(state: &AppState) -> crate::prefetch::Fillers<'_> {
    crate::prefetch::Fillers {
        fills: &state.fills,
        cache: &state.cache,
        metrics: &state.metrics,
    }
}

fn route_error(err: RouteError) -> ApiError {
    match err {
        RouteError::Name(err) | RouteError::Reference(ReferenceError::Name(err)) => err.into(),
        RouteError::UnknownRegistry(_)
        | RouteError::NoDefault
        | RouteError::Reference(ReferenceError::NoOrg) => ApiError::name_unknown(err.to_string()),
        RouteError::Reference(ReferenceError::Malformed(_) | ReferenceError::NoPlatform(_))
        | RouteError::Host(_) => ApiError::name_invalid(err.to_string()),
    }
}
