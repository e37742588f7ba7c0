//! `/token`: the token service registry clients are sent to by berth's 401 challenge, in the
//! distribution token spec's form (`GET ?service=berth&scope=repository:NAME:pull` with Basic
//! credentials, a JSON answer with `token`, `access_token`, `expires_in`, `issued_at`), and its
//! OAuth2 form (`POST` of `grant_type=password&username=&password=&scope=&service=`, which
//! containerd tries first when it has credentials). `password_grant` turns the POST into the GET
//! before dispatch, so both take one path. berth issues no refresh tokens.
//!
//! Which credentials are good and what a token grants is `access`'s decision.

use std::sync::Arc;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::{asker, Served};
use crate::body;
use crate::cache::Outcome;
use crate::error::ApiError;
use crate::AppState;

/// The largest OAuth2 form berth reads; a real one is a few hundred bytes.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The request without its body, as dispatch takes it. A `POST /token` has its form read
/// (within `MAX_FORM_BYTES` and `read_timeout`) and becomes the equivalent GET: the scopes and
/// service move to the query and the username and password become Basic credentials.
pub async fn password_grant<B>(
    request: Request<B>,
    read_timeout: Duration,
) -> Result<Request<()>, (Request<()>, ApiError)>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (mut parts, body) = request.into_parts();
    if parts.method != Method::POST || parts.uri.path() != "/token" {
        return Ok(Request::from_parts(parts, ()));
    }
    let read = tokio::time::timeout(read_timeout, Limited::new(body, MAX_FORM_BYTES).collect());
    let form = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) => return Err((Request::from_parts(parts, ()), bad_form(err.to_string()))),
        Err(_) => {
            let err = bad_form("the form was not received in time".into());
            return Err((Request::from_parts(parts, ()), err));
        }
    };
    match rewrite(&mut parts, &form) {
        Ok(()) => Ok(Request::from_parts(parts, ())),
        Err(err) => Err((Request::from_parts(parts, ()), err)),
    }
}

fn rewrite(parts: &mut http::request::Parts, form: &[u8]) -> Result<(), ApiError> {
    let (mut grant, mut username, mut password) = (None, None, None);
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(form) {
        match name.as_ref() {
            "grant_type" => grant = Some(value.into_owned()),
            "username" => username = Some(value.into_owned()),
            "password" => password = Some(value.into_owned()),
            // OAuth2 puts every scope in one space-separated field; the GET form repeats them.
            "scope" => {
                for scope in value.split(' ').filter(|s| !s.is_empty()) {
                    query.append_pair("scope", scope);
                }
            }
            "service" => {
                query.append_pair("service", &value);
            }
            _ => {}
        }
    }
    match grant.as_deref() {
        Some("password") => {}
        Some("refresh_token") => {
            return Err(bad_form(
                "berth issues no refresh tokens; use grant_type=password".into(),
            ))
        }
        other => return Err(bad_form(format!("unsupported grant_type {other:?}"))),
    }
    let (Some(username), Some(password)) = (username, password) else {
        return Err(bad_form(
            "grant_type=password needs username and password".into(),
        ));
    };
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let value = HeaderValue::from_str(&format!("Basic {basic}"))
        .expect("base64 is always a valid header value");
    parts.headers.insert(AUTHORIZATION, value);
    let path = format!("/token?{}", query.finish());
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query =
        Some(PathAndQuery::try_from(path).map_err(|err| bad_form(err.to_string()))?);
    parts.uri = http::Uri::from_parts(uri).map_err(|err| bad_form(err.to_string()))?;
    parts.method = Method::GET;
    Ok(())
}

fn bad_form(detail: String) -> ApiError {
    ApiError::unsupported_request("bad token request").with_detail(detail)
}

pub async fn serve<B>(state: &Arc<AppState>, request: &Request<B>) -> Served {
    if request.method() != Method::GET {
        return Err(ApiError::unsupported(
            "the token endpoint takes GET with Basic credentials, or an OAuth2 POST form",
        ));
    }
    let mut scopes = Vec::new();
    let mut service = None;
    for (name, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "scope" => scopes.push(value.into_owned()),
            "service" => service = Some(value.into_owned()),
            _ => {}
        }
    }
    if let Some(service) = service.filter(|s| s != crate::access::token::SERVICE) {
        return Err(ApiError::unsupported_request("unknown service")
            .with_detail(format!("this token service is \"berth\", not {service:?}")));
    }
    let issued = state
        .access
        .issue_token(&asker(request), &scopes, &state.upstreams)
        .await?;
    let json = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": issued.issued_at,
    });
    let bytes = serde_json::to_vec(&json).expect("JSON of strings serialises");
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, bytes.len())
        // A token is a credential: no cache between berth and the client may keep it.
        .header(CACHE_CONTROL, "no-store")
        .body(body::full(bytes))
        .expect("valid response");
    Ok((response, Outcome::Bypass))
}
