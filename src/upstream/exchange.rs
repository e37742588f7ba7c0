//! One exchange with a registry, as `Upstream::fetch` makes it: credentials and the token
//! they buy (`auth`), one answered challenge, the circuit breaker, safe retries (`retry`) and
//! at most `MAX_REDIRECTS` redirects, never from https to http, with `Authorization` only for
//! the scheme and host it was made for. What the answer means is the caller's
//! (`Upstream::manifest`, `Upstream::blob`, ...).

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{breaker, escape_remote, retry, Cause, Upstream, UpstreamError};
use crate::oci::name::Repository;

/// Storage backends (S3, CDNs) answer blob GETs with redirects; a few hops are normal.
const MAX_REDIRECTS: usize = 5;

/// One request as it goes out: the same for each retry; each redirect hop gets its own `uri`
/// and `authorization`.
#[derive(Clone, Copy)]
struct Call<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    authorization: Option<&'a HeaderValue>,
}

impl Upstream {
    /// Sends `method /v2/<repository>/<path>?<query>` with credentials for pulling `repository`,
    /// answering one authentication challenge and following redirects. Any status comes back.
    pub async fn fetch(
        &self,
        method: Method,
        repository: &Repository,
        path: &str,
        query: Option<&str>,
        headers: HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut url = format!("{}/v2/{}/{}", self.base, repository, path);
        if let Some(query) = query {
            url.push('?');
            url.push_str(query);
        }
        let uri: Uri = url.parse().map_err(|e| {
            UpstreamError::Invalid(Cause::new(format_args!("cannot build URL {url:?}"), e))
        })?;
        let scope = format!("repository:{repository}:pull");
        let credentials = self.credentials(repository).await?;
        let creds = credentials.as_ref();
        let authorization = self.auth.authorization(&self.client, &scope, creds).await?;
        let call = Call {
            method: &method,
            uri: &uri,
            headers: &headers,
            authorization: authorization.as_ref(),
        };
        let (mut response, from_origin) = self.send(call).await?;
        // A 401 from a redirect hop was answered (anonymously) in `send_once`; the upstream's
        // credentials answer only the upstream's own challenges.
        if response.status() == StatusCode::UNAUTHORIZED && from_origin {
            let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
            let retry = self
                .auth
                .answer(
                    &self.client,
                    challenge.as_ref(),
                    &scope,
                    creds,
                    call.authorization,
                )
                .await?;
            if let Some(retry) = retry {
                let call = Call {
                    authorization: Some(&retry),
                    ..call
                };
                response = self.send(call).await?.0;
            }
        }
        Ok(response)
    }

    /// One request through the circuit breaker, retried only where that is safe (`retry`).
    /// Also says whether the response came from the upstream itself (not a redirect hop).
    async fn send(&self, call: Call<'_>) -> Result<(Response<Incoming>, bool), UpstreamError> {
        let method = call.method;
        let mut attempt = 0;
        loop {
            if let breaker::Admission::Reject { retry_in } = self.breaker.admit() {
                return Err(UpstreamError::CircuitOpen(format!(
                    "{} failed repeatedly; next try in {}s",
                    self.name,
                    retry_in.as_secs().max(1)
                )));
            }
            let sent = self.send_once(call).await;
            let verdict = match &sent {
                Ok((response, _)) => {
                    self.breaker.success();
                    if response.status() == StatusCode::TOO_MANY_REQUESTS {
                        *self.last_429.lock().expect("429 lock") = Some(std::time::Instant::now());
                    }
                    retry::after_status(
                        method,
                        response.status(),
                        response.headers().get(RETRY_AFTER),
                        attempt,
                        self.retries,
                        self.max_retry_after,
                    )
                }
                Err(error) => {
                    let unreachable =
                        matches!(error, UpstreamError::Connect(_) | UpstreamError::Timeout(_));
                    if unreachable && self.breaker.failure() {
                        tracing::warn!(upstream = %self.name, %error, "circuit breaker opened");
                    }
                    retry::after_error(method, error, attempt, self.retries)
                }
            };
            let retry::Verdict::After(wait) = verdict else {
                return sent;
            };
            tracing::debug!(upstream = %self.name, attempt, ?wait, "retrying upstream request");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// One request, following at most `MAX_REDIRECTS` redirects, never from https to http.
    /// `authorization` goes only to the scheme and authority it was made for; a hop that
    /// challenges gets an anonymous token for its own scope, once.
    async fn send_once(&self, call: Call<'_>) -> Result<(Response<Incoming>, bool), UpstreamError> {
        let origin = (call.uri.scheme().cloned(), call.uri.authority().cloned());
        let mut uri = call.uri.clone();
        let mut hop_authorization: Option<HeaderValue> = None;
        let mut hops = 0;
        loop {
            let at_origin = (uri.scheme().cloned(), uri.authority().cloned()) == origin;
            let hop = Call {
                uri: &uri,
                authorization: match at_origin {
                    true => call.authorization,
                    false => hop_authorization.as_ref(),
                },
                ..call
            };
            let response = self.send_one(hop).await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !at_origin && hop_authorization.is_none() {
                let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
                if let Some(token) = self
                    .auth
                    .answer_hop(&self.client, challenge.as_ref())
                    .await?
                {
                    hop_authorization = Some(token);
                    continue;
                }
            }
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok((response, at_origin));
            }
            if hops == MAX_REDIRECTS {
                return Err(UpstreamError::Invalid(
                    format!("more than {MAX_REDIRECTS} redirects").into(),
                ));
            }
            hops += 1;
            let next = redirect_target(&uri, response.headers())?;
            if next.authority() != uri.authority() || next.scheme() != uri.scheme() {
                hop_authorization = None;
            }
            uri = next;
        }
    }

    /// One HTTP exchange, measured.
    async fn send_one(&self, call: Call<'_>) -> Result<Response<Incoming>, UpstreamError> {
        let request = Request::builder().method(call.method.clone());
        let mut request = request.uri(call.uri.clone());
        for (name, value) in call.headers {
            request = request.header(name, value);
        }
        if let Some(value) = call.authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| UpstreamError::Invalid(Cause::new("cannot build the request", e)))?;
        let started = tokio::time::Instant::now();
        let sent = self.client.send(request).await;
        let status = sent.as_ref().ok().map(Response::status);
        let secs = started.elapsed().as_secs_f64();
        self.metrics
            .observe_upstream(&self.metric_label, status, secs);
        Ok(sent?)
    }
}

/// Where a redirect points: an absolute http(s) URL, or a path on the same origin. Never from
/// https down to http, where anyone on the path could read or change what follows.
fn redirect_target(from: &Uri, headers: &HeaderMap) -> Result<Uri, UpstreamError> {
    let location = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| UpstreamError::Invalid("redirect without Location".into()))?;
    let shown = || escape_remote(location);
    let scheme = from.scheme_str().unwrap_or("https");
    let target: Uri = if let Some(network_path) = location.strip_prefix("//") {
        // A network-path reference (RFC 3986 section 4.2) keeps the scheme.
        format!("{scheme}://{network_path}").parse()
    } else if location.starts_with('/') {
        let authority = from.authority().map_or("", |a| a.as_str());
        format!("{scheme}://{authority}{location}").parse()
    } else {
        location.parse()
    }
    .map_err(|e| {
        UpstreamError::Invalid(Cause::new(
            format_args!("bad redirect Location {:?}", shown()),
            e,
        ))
    })?;
    let scheme_ok = matches!(target.scheme_str(), Some("http" | "https"));
    if !scheme_ok || target.host().is_none() {
        return Err(UpstreamError::Invalid(
            format!("redirect to {:?} is not an http(s) URL", shown()).into(),
        ));
    }
    if from.scheme_str() == Some("https") && target.scheme_str() == Some("http") {
        return Err(UpstreamError::Invalid(
            format!("redirect from https to http ({:?}) refused", shown()).into(),
        ));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(from: &str, location: &str) -> Result<String, UpstreamError> {
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, HeaderValue::from_str(location).unwrap());
        redirect_target(&from.parse().unwrap(), &headers).map(|uri| uri.to_string())
    }

    #[test]
    fn redirects_resolve_against_the_request_and_never_drop_to_http() {
        let from = "https://registry.example/v2/a/blobs/sha256:1";
        let cases = [
            ("/v2/b", Some("https://registry.example/v2/b")),
            ("//cdn.example/x?sig=1", Some("https://cdn.example/x?sig=1")),
            ("https://s3.example/x", Some("https://s3.example/x")),
            ("http://s3.example/x", None),
            ("//169.254.169.254/x", Some("https://169.254.169.254/x")),
            ("ftp://files.example/x", None),
            ("file:///etc/passwd", None),
            ("relative/path", None),
        ];
        for (location, expected) in cases {
            let got = follow(from, location).ok();
            assert_eq!(got.as_deref(), expected, "{location}");
        }
        assert_eq!(
            follow("http://127.0.0.1:5000/v2/", "http://127.0.0.1:5001/x").unwrap(),
            "http://127.0.0.1:5001/x"
        );
    }
}
