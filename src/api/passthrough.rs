//! Requests passed to the upstream uncached: tag lists (pagination kept) and referrers
//! (`artifactType` filter kept; a 404 from an upstream without the API is passed on so clients
//! fall back to the referrers tag schema).
//!
//! The response streams back as-is, except the `Link` header, which is rewritten to the path the
//! client used so its next page comes through berth and the same route; and failures: an
//! upstream 5xx becomes berth's 502 and a 429 stays 429, each with the upstream's
//! `Retry-After`, through the one error mapping (`ApiError::from_upstream`).

use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LINK};
use http::{HeaderMap, Method, Response};
use http_body_util::BodyExt;

use super::Served;
use crate::body::{self, BoxError};
use crate::cache::Outcome;
use crate::error::{ApiError, Code};
use crate::route::Target;

/// Headers worth passing on; hop-by-hop and upstream-internal ones are dropped.
const KEPT: [&str; 3] = [
    "docker-distribution-api-version",
    "oci-filters-applied",
    "docker-content-digest",
];

pub async fn serve(
    target: Target,
    path: String,
    query: Option<&str>,
    client_name: &str,
    head: bool,
) -> Served {
    let (upstream_query, ns) = split_ns(query);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    if path.starts_with("referrers/") {
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
    }
    let response = target
        .upstream
        .fetch(
            Method::GET,
            &target.repository,
            &path,
            upstream_query.as_deref(),
            headers,
        )
        .await
        .map_err(|e| ApiError::from_upstream(e, Code::NameUnknown))?;
    let status = response.status();
    if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
        let retry_after = response.headers().get(http::header::RETRY_AFTER).cloned();
        let error = crate::upstream::UpstreamError::Status {
            status,
            retry_after,
        };
        return Err(ApiError::from_upstream(error, Code::NameUnknown));
    }
    let mut builder = Response::builder().status(response.status());
    for name in [CONTENT_TYPE, CONTENT_LENGTH] {
        if let Some(value) = response.headers().get(&name) {
            builder = builder.header(name, value);
        }
    }
    for name in KEPT {
        if let Some(value) = response.headers().get(name) {
            builder = builder.header(name, value);
        }
    }
    if let Some(link) = response.headers().get(LINK).and_then(|v| v.to_str().ok()) {
        let rewritten = rewrite_link(link, target.repository.as_str(), client_name, ns.as_deref());
        if let Ok(value) = HeaderValue::from_str(&rewritten) {
            builder = builder.header(LINK, value);
        }
    }
    let body = if head {
        body::empty()
    } else {
        response
            .into_body()
            .map_err(|e| Box::new(e) as BoxError)
            .boxed_unsync()
    };
    Ok((builder.body(body).expect("valid response"), Outcome::Bypass))
}

/// Removes `ns=` (berth's routing, not the upstream's business) from a query string.
fn split_ns(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut ns = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("ns=") {
            Some(value) => {
                ns = Some(value.to_string());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    ((!rest.is_empty()).then(|| rest.join("&")), ns)
}

/// `</v2/library/nginx/tags/list?last=x>; rel="next"` -> the same under the client's name.
fn rewrite_link(link: &str, repository: &str, client_name: &str, ns: Option<&str>) -> String {
    let upstream_prefix = format!("</v2/{repository}/");
    let Some(rest) = link.strip_prefix(&upstream_prefix) else {
        return link.to_string();
    };
    let Some((target, params)) = rest.split_once('>') else {
        return link.to_string();
    };
    let target = match ns {
        Some(ns) if target.contains('?') => format!("{target}&ns={ns}"),
        Some(ns) => format!("{target}?ns={ns}"),
        None => target.to_string(),
    };
    format!("</v2/{client_name}/{target}>{params}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_is_removed_and_other_parameters_kept() {
        assert_eq!(
            split_ns(Some("n=2&ns=docker.io&last=a")),
            (Some("n=2&last=a".into()), Some("docker.io".into()))
        );
        assert_eq!(
            split_ns(Some("ns=docker.io")),
            (None, Some("docker.io".into()))
        );
        assert_eq!(split_ns(None), (None, None));
    }

    #[test]
    fn pagination_links_point_back_through_the_client_path() {
        let link = r#"</v2/library/nginx/tags/list?last=b&n=2>; rel="next""#;
        assert_eq!(
            rewrite_link(link, "library/nginx", "docker.io/library/nginx", None),
            r#"</v2/docker.io/library/nginx/tags/list?last=b&n=2>; rel="next""#
        );
        assert_eq!(
            rewrite_link(link, "library/nginx", "nginx", Some("docker.io")),
            r#"</v2/nginx/tags/list?last=b&n=2&ns=docker.io>; rel="next""#
        );
    }
}
