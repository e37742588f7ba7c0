//! `GET /token`: the token service registry clients are sent to by berth's 401 challenge, in the
//! distribution token spec's form (`?service=berth&scope=repository:NAME:pull`, Basic
//! credentials, a JSON answer with `token`, `access_token`, `expires_in`, `issued_at`).
//!
//! Which credentials are good and what a token grants is `access`'s decision. The OAuth2 POST
//! form is not offered: clients that try it first (containerd) fall back to GET on 405.

use std::sync::Arc;

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use super::{asker, Served};
use crate::body;
use crate::cache::Outcome;
use crate::error::ApiError;
use crate::AppState;

pub async fn serve<B>(state: &Arc<AppState>, request: &Request<B>) -> Served {
    if request.method() != Method::GET {
        return Err(ApiError::unsupported(
            "the token endpoint takes GET with Basic credentials",
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
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            crate::error::Code::Unsupported,
            "unknown service",
        )
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
