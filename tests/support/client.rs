//! A plain-HTTP test client: one place that knows how tests speak HTTP to a registry, the tap or
//! berth (Basic credentials, whole-body reads that surface a cut body as an error).
//!
//! Does not own: TLS, bearer tokens or retries. Tests must see exactly what the server did, so this
//! client never follows redirects, never retries and never hides a short body.

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// Any error a support helper passes up; tests only print it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Optional Basic credentials as `(user, password)`; `None` means anonymous.
pub type Creds<'a> = Option<(&'a str, &'a str)>;

/// The client type every helper shares, over plain HTTP only.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A response read to the end, for assertions.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Fetched {
    /// A header as text, or `None` when absent or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The `code` of the first error in an OCI `{"errors":[...]}` body; panics when the body is
/// not that envelope, so calling it also asserts the shape.
pub fn error_code(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|_| {
        panic!(
            "error body is the OCI envelope: {:?}",
            String::from_utf8_lossy(body)
        )
    });
    json["errors"][0]["code"]
        .as_str()
        .expect("envelope has a code")
        .to_string()
}

/// The string `field` of each object in the JSON array `array`; panics when `array` is not an
/// array or an item lacks the field, so calling it also asserts the shape.
pub fn strings_at<'a>(array: &'a serde_json::Value, field: &str) -> Vec<&'a str> {
    array
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|item| item[field].as_str().expect("a string field"))
        .collect()
}

/// A fresh client with its own connection pool, so one test's idle connections never leak into
/// another's request counts.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The `Authorization` value for Basic credentials (RFC 7617).
pub fn basic_auth(user: &str, password: &str) -> HeaderValue {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {token}")).expect("base64 is a valid header value")
}

/// Builds a request with optional Basic credentials and extra headers.
pub fn request(
    method: Method,
    url: &str,
    creds: Creds<'_>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some((user, password)) = creds {
        builder = builder.header(header::AUTHORIZATION, basic_auth(user, password));
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(body))
        .expect("test request is well formed")
}

/// Sends a request and returns the response with its body still streaming, for tests that read
/// a body frame by frame (a stalled or cut body).
pub async fn send(req: Request<Full<Bytes>>) -> Result<Response<Incoming>, BoxError> {
    Ok(http_client().request(req).await?)
}

/// A plain GET of `url` with its body still streaming (see `send`).
pub async fn send_get(url: &str) -> Result<Response<Incoming>, BoxError> {
    send(request(Method::GET, url, None, &[], Bytes::new())).await
}

/// Sends a request and reads the whole body. A body that ends before its Content-Length (or whose
/// connection drops) is an error, never a short `Fetched`.
pub async fn fetch(req: Request<Full<Bytes>>) -> Result<Fetched, BoxError> {
    let response = send(req).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Fetched {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `GET url`, with optional Basic credentials, read to the end.
pub async fn get(url: &str, creds: Creds<'_>) -> Result<Fetched, BoxError> {
    fetch(request(Method::GET, url, creds, &[], Bytes::new())).await
}

/// Reads a streaming body until it ends, fails, or at least `at_least` bytes have arrived.
/// Returns what arrived and the error that ended it, if any: how a test observes a cut, a stall
/// point or a pause point byte-exactly.
pub async fn read_body(body: &mut Incoming, at_least: usize) -> (Vec<u8>, Option<BoxError>) {
    let mut received = Vec::new();
    while received.len() < at_least {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return (received, Some(e.into())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    received.extend_from_slice(&data);
                }
            }
        }
    }
    (received, None)
}
