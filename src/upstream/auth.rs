//! Upstream authentication: the registry token flow (RFC 6750 bearer tokens from the realm a
//! `WWW-Authenticate: Bearer` challenge names) and Basic credentials.
//!
//! The challenge an upstream sent first is remembered, so later requests fetch their token up
//! front instead of collecting a 401 each time. Tokens are cached per (credentials, pull scope)
//! until shortly before they expire, so a rotated secret never reuses a token minted with the
//! old one, and concurrent requests for one key share one token fetch. Secrets stay in
//! sensitive header values and `Secret`s, never in logs. Which credentials a request presents
//! is decided by the caller (`Upstream::credentials`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::time::Instant;

use super::challenge::{parse_challenges, token_url, Challenge};
use super::{HttpClient, UpstreamError};
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::secrets::Credentials;

#[derive(Debug, Clone)]
enum Scheme {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

#[derive(Debug, Clone)]
struct Token {
    header: HeaderValue,
    expires: Instant,
}

/// Token responses are small JSON documents; anything bigger is not a token.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// How long a token body may take once its head arrived (the client's response timeout covers
/// the head only): a token endpoint trickling its answer must not hold every request waiting
/// on that token.
const TOKEN_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a token is reused, whatever `expires_in` says: a day. Also keeps `now +
/// lifetime` far from `Instant` overflow (`expires_in: 18446744073709551615` must not panic).
const MAX_TOKEN_LIFETIME: u64 = 24 * 3600;

pub struct Auth {
    upstream: String,
    /// The upstream is reached over plain http: its realm may be plain http too (a test or
    /// an in-cluster registry). An https upstream's credentials go only to an https realm.
    plain_http: bool,
    /// The upstream's metric label (see `Upstream::metric_label`).
    metric_label: Arc<str>,
    metrics: Arc<Metrics>,
    scheme: RwLock<Option<Scheme>>,
    tokens: moka::sync::Cache<String, Token>,
    /// Anonymous tokens for redirect hops, by token URL (realm, service, scope): registry.k8s.io
    /// sends every call to a pkg.dev host that challenges, and one token serves them all.
    hop_tokens: moka::sync::Cache<String, Token>,
    flights: Flights<String, Result<Token, UpstreamError>>,
}

impl Auth {
    pub fn new(
        upstream: String,
        plain_http: bool,
        metric_label: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Auth {
        Auth {
            upstream,
            plain_http,
            metric_label,
            metrics,
            scheme: RwLock::new(None),
            tokens: moka::sync::Cache::new(10_000),
            hop_tokens: moka::sync::Cache::new(1_000),
            flights: Flights::default(),
        }
    }

    /// The auth of a command-line tool (`berth warm`, `berth load`) against its one target:
    /// plain http allowed for the realm when the target is plain http; token fetches are
    /// counted in metrics no one reads.
    pub fn for_tool(target: &str, tool: &str) -> Auth {
        let plain_http = target.starts_with("http://");
        Auth::new(
            target.to_string(),
            plain_http,
            tool.into(),
            Arc::new(Metrics::new()),
        )
    }

    /// The Authorization header to send up front for `scope`, if the upstream's scheme is known.
    pub async fn authorization(
        &self,
        client: &HttpClient,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let scheme = self.scheme.read().expect("scheme lock").clone();
        match scheme {
            None => Ok(None),
            Some(Scheme::Basic) => Ok(creds.map(basic)),
            Some(Scheme::Bearer { realm, service }) => {
                let creds = creds.filter(|_| self.may_send_credentials(&realm));
                let key = token_key(scope, creds);
                let cached = self.tokens.get(&key).filter(|t| t.expires > Instant::now());
                if let Some(token) = cached {
                    return Ok(Some(token.header));
                }
                let token = self
                    .fetch_token(client, realm, service, scope, creds)
                    .await?;
                Ok(Some(token))
            }
        }
    }

    /// Answers a 401: learns the scheme from the challenge and returns the header to retry with,
    /// or `None` when retrying cannot help (no usable challenge, or Basic credentials refused).
    pub async fn answer(
        &self,
        client: &HttpClient,
        challenge: Option<&HeaderValue>,
        scope: &str,
        creds: Option<&Credentials>,
        sent: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(header) = challenge.and_then(|v| v.to_str().ok()) else {
            return Ok(None);
        };
        let challenges = parse_challenges(header);
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm.clone(), service.clone())),
            Challenge::Basic { .. } => None,
        });
        if let Some((realm, service)) = bearer {
            let creds = creds.filter(|_| self.may_send_credentials(&realm));
            *self.scheme.write().expect("scheme lock") = Some(Scheme::Bearer {
                realm: realm.clone(),
                service: service.clone(),
            });
            self.tokens.invalidate(&token_key(scope, creds));
            let token = self
                .fetch_token(client, realm, service, scope, creds)
                .await?;
            return Ok(Some(token));
        }
        let basic_challenge = challenges
            .iter()
            .any(|c| matches!(c, Challenge::Basic { .. }));
        if basic_challenge {
            *self.scheme.write().expect("scheme lock") = Some(Scheme::Basic);
            if sent.is_none() {
                return Ok(creds.map(basic));
            }
        }
        Ok(None)
    }

    /// Whether the upstream's credentials may go to `realm`: an https realm, or any http(s)
    /// realm of a plain-http upstream. Where the realm is (its address) is the client's rule.
    fn may_send_credentials(&self, realm: &str) -> bool {
        let scheme = realm.parse::<http::Uri>().ok().and_then(|u| {
            u.host()?;
            u.scheme_str().map(str::to_ascii_lowercase)
        });
        let allowed = match scheme.as_deref() {
            Some("https") => true,
            Some("http") => self.plain_http,
            _ => false,
        };
        if !allowed {
            tracing::warn!(
                upstream = %self.upstream,
                realm = %super::escape_remote(realm),
                "token realm is not https: asking it without credentials"
            );
        }
        allowed
    }

    /// Answers a challenge from a redirect hop (a storage or mirror host the upstream sent us
    /// to): an anonymous token for the hop's own scope, never the upstream's credentials.
    /// `None` when the challenge is not a usable Bearer one.
    pub async fn answer_hop(
        &self,
        client: &HttpClient,
        challenge: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(header) = challenge.and_then(|v| v.to_str().ok()) else {
            return Ok(None);
        };
        let bearer = parse_challenges(header).into_iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic { .. } => None,
        });
        let Some((realm, service, scope)) = bearer else {
            return Ok(None);
        };
        let scopes: Vec<String> = scope.into_iter().collect();
        let url = token_url(&realm, service.as_deref(), &scopes);
        let cached = self
            .hop_tokens
            .get(&url)
            .filter(|t| t.expires > Instant::now());
        if let Some(token) = cached {
            return Ok(Some(token.header));
        }
        let token = request_token(client, &url, None).await?;
        self.hop_tokens.insert(url, token.clone());
        Ok(Some(token.header))
    }

    async fn fetch_token(
        &self,
        client: &HttpClient,
        realm: String,
        service: Option<String>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<HeaderValue, UpstreamError> {
        let url = token_url(&realm, service.as_deref(), &[scope.to_string()]);
        let client = client.clone();
        let basic = creds.map(basic);
        let upstream = self.upstream.clone();
        let key = token_key(scope, creds);
        let (label, metrics) = (Arc::clone(&self.metric_label), Arc::clone(&self.metrics));
        let (token, _) = self
            .flights
            .run(key.clone(), move || async move {
                let token = request_token(&client, &url, basic).await;
                let result = if token.is_ok() { "ok" } else { "error" };
                metrics
                    .token_fetches
                    .with_label_values(&[&label, result])
                    .inc();
                token.inspect_err(|err| {
                    tracing::warn!(upstream, %err, "token fetch failed");
                })
            })
            .await;
        let token = token?;
        self.tokens.insert(key, token.clone());
        Ok(token.header)
    }
}

/// Tokens belong to the credentials that obtained them; anonymous ones share the id "-".
fn token_key(scope: &str, creds: Option<&Credentials>) -> String {
    format!("{}|{scope}", creds.map_or("-", |c| c.id.as_str()))
}

fn basic(creds: &Credentials) -> HeaderValue {
    basic_header(&creds.username, &creds.password)
}

pub fn basic_header(user: &str, password: &Secret) -> HeaderValue {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.expose()));
    let mut value =
        HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a valid header");
    value.set_sensitive(true);
    value
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

async fn request_token(
    client: &HttpClient,
    url: &str,
    basic: Option<HeaderValue>,
) -> Result<Token, UpstreamError> {
    let mut request = Request::builder().method(Method::GET).uri(url);
    if let Some(basic) = basic {
        request = request.header(http::header::AUTHORIZATION, basic);
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| UpstreamError::Token(format!("bad token URL: {e}")))?;
    let response = client.send(request).await?;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(UpstreamError::Status {
            status,
            retry_after: None,
        });
    }
    if !status.is_success() {
        return Err(UpstreamError::Token(format!(
            "token endpoint answered {status}"
        )));
    }
    let body = read_token_body(response.into_body(), TOKEN_BODY_TIMEOUT).await?;
    parse_token(&body, Instant::now())
}

/// A token response's body: at most `MAX_TOKEN_RESPONSE` bytes, all within `deadline`.
async fn read_token_body<B>(body: B, deadline: Duration) -> Result<Bytes, UpstreamError>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let read = Limited::new(body, MAX_TOKEN_RESPONSE).collect();
    Ok(tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| UpstreamError::Timeout("token body stalled".into()))?
        .map_err(|e| UpstreamError::Token(format!("reading token: {e}")))?
        .to_bytes())
}

/// Parses a token response; the token is used until shortly before `expires_in` runs out.
fn parse_token(body: &[u8], now: Instant) -> Result<Token, UpstreamError> {
    let parsed: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| UpstreamError::Token(format!("token response is not JSON: {e}")))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| UpstreamError::Token("token response holds no token".into()))?;
    // The token spec's default lifetime is 60 s.
    let lifetime = parsed.expires_in.unwrap_or(60).min(MAX_TOKEN_LIFETIME);
    let margin = (lifetime / 10).max(5);
    let usable = Duration::from_secs(lifetime.saturating_sub(margin).max(1));
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| UpstreamError::Token("token has characters not allowed in a header".into()))?;
    header.set_sensitive(true);
    Ok(Token {
        header,
        expires: now + usable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_refreshed_before_it_expires() {
        let now = Instant::now();
        let token = parse_token(br#"{"token":"abc","expires_in":300}"#, now).unwrap();
        assert_eq!(token.header, "Bearer abc");
        assert_eq!(token.expires - now, Duration::from_secs(270));
        let default = parse_token(br#"{"access_token":"xyz"}"#, now).unwrap();
        assert_eq!(default.expires - now, Duration::from_secs(54));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_body_that_trickles_forever_fails_at_its_deadline() {
        // The head arrived; then one byte a second of a body that never ends, so no
        // per-read timeout would ever fire: only the whole-body deadline ends it.
        let trickle = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let frame = http_body::Frame::data(Bytes::from_static(b" "));
            Some((Ok::<_, std::io::Error>(frame), ()))
        });
        let body = http_body_util::StreamBody::new(Box::pin(trickle));
        // Paused time: this guard would pass at once if the read had no deadline of its own.
        let read = tokio::time::timeout(
            TOKEN_BODY_TIMEOUT * 2,
            read_token_body(body, TOKEN_BODY_TIMEOUT),
        )
        .await
        .expect("the token body read ends at its own deadline");
        assert!(
            matches!(&read, Err(UpstreamError::Timeout(why)) if why.contains("stalled")),
            "{read:?}"
        );
    }

    #[test]
    fn absurd_token_lifetimes_are_clamped_without_overflow() {
        let now = Instant::now();
        for expires_in in [u64::MAX, u64::MAX / 2, i64::MAX as u64, 10u64.pow(12)] {
            let body = format!(r#"{{"token":"abc","expires_in":{expires_in}}}"#);
            let token = parse_token(body.as_bytes(), now).unwrap();
            assert!(token.expires - now <= Duration::from_secs(MAX_TOKEN_LIFETIME));
        }
        let zero = parse_token(br#"{"token":"abc","expires_in":0}"#, now).unwrap();
        assert_eq!(zero.expires - now, Duration::from_secs(1));
    }

    #[test]
    fn token_without_token_is_an_error() {
        assert!(parse_token(br#"{"expires_in":300}"#, Instant::now()).is_err());
        assert!(parse_token(b"<html>", Instant::now()).is_err());
    }

    #[test]
    fn basic_header_is_sensitive() {
        let header = basic_header("user", &Secret::new("pw"));
        assert!(header.is_sensitive());
        assert_eq!(header, "Basic dXNlcjpwdw==");
    }
}
