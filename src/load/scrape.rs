//! `berth load --metrics`: reads the target's Prometheus text endpoint before and after a run,
//! so the report says how many upstream requests the run caused. Bounded in size and time;
//! the parsing of the exposition is `stats::sum_family`. Knows nothing of pulls.

use std::time::Duration;

use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};

use super::stats;
use crate::net::HttpClient;

/// The metric family (by suffix) that counts berth's requests to upstream registries; see
/// `crate::metrics` (`berth_upstream_requests_total`).
pub const UPSTREAM_REQUESTS_FAMILY: &str = "upstream_requests_total";

/// Bounds on the `--metrics` scrape: a berth's exposition is a few hundred KiB at most.
const MAX_METRICS_BODY: usize = 16 << 20;
const METRICS_DEADLINE: Duration = Duration::from_secs(30);

/// The scrape failed: the URL given and why.
#[derive(Debug, thiserror::Error)]
#[error("--metrics {url}: {why}")]
pub struct MetricsError {
    url: String,
    why: String,
}

/// The target's upstream request count now: the sum of `UPSTREAM_REQUESTS_FAMILY`'s samples.
pub(super) async fn upstream_requests(client: &HttpClient, url: &str) -> Result<f64, MetricsError> {
    let failed = |why: String| MetricsError {
        url: url.to_string(),
        why,
    };
    let uri: Uri = url.parse().map_err(|e| failed(format!("{e}")))?;
    let response = client
        .send(
            Request::get(uri)
                .body(Full::default())
                .expect("valid request"),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
    if response.status() != StatusCode::OK {
        return Err(failed(format!("status {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_METRICS_BODY).collect();
    let body = tokio::time::timeout(METRICS_DEADLINE, body)
        .await
        .map_err(|_| failed(format!("no whole answer within {METRICS_DEADLINE:?}")))?
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    // A berth that has not fetched anything yet has no samples in the family: that is zero.
    Ok(stats::sum_family(&text, UPSTREAM_REQUESTS_FAMILY).unwrap_or(0.0))
}
