//! When a failed upstream request may be sent again, and how long to wait first.
//!
//! Only safe retries: berth sends upstreams nothing but GET and HEAD, which are idempotent, so
//! a request may be repeated when it never reached the upstream (connection refused, TLS
//! failure), when no answer came (timeout, connection dropped before the head), or when the
//! upstream asked for it (429 or 503 with a `Retry-After` no longer than `max_retry_after`).
//! Any other status, and every 4xx but 429, is the upstream's answer and goes to the caller.
//! The waits are exponential with full jitter, so many clients retrying the same dead upstream
//! do not synchronise. Pure: the caller sleeps.

use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};

use super::UpstreamError;

/// First backoff step; attempt n waits a random time in [0, BASE * 2^n], capped at `MAX`.
const BASE: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(2);

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send again after this wait.
    After(Duration),
    /// Pass the failure to the caller.
    GiveUp,
}

/// Decides about attempt number `attempt` (0 for the first) that ended in `error`.
pub(crate) fn after_error(
    method: &Method,
    error: &UpstreamError,
    attempt: u32,
    retries: u32,
) -> Verdict {
    if attempt >= retries || !is_idempotent(method) {
        return Verdict::GiveUp;
    }
    match error {
        UpstreamError::Connect(_) | UpstreamError::Timeout(_) | UpstreamError::Protocol(_) => {
            Verdict::After(jittered(attempt, rand::random::<f64>()))
        }
        _ => Verdict::GiveUp,
    }
}

/// Decides about an answer with `status`: 429 and 503 are retried when the upstream's
/// `Retry-After` (seconds, or absent: a short backoff) is at most `max_wait`.
pub(crate) fn after_status(
    method: &Method,
    status: StatusCode,
    retry_after: Option<&HeaderValue>,
    attempt: u32,
    retries: u32,
    max_wait: Duration,
) -> Verdict {
    if attempt >= retries || !is_idempotent(method) {
        return Verdict::GiveUp;
    }
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return Verdict::GiveUp;
    }
    let wait = match retry_after {
        None => jittered(attempt, rand::random::<f64>()),
        // An HTTP-date is possible too; registries send seconds, and a date is not waited out.
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(seconds) => Duration::from_secs(seconds),
            None => return Verdict::GiveUp,
        },
    };
    if wait > max_wait {
        return Verdict::GiveUp;
    }
    Verdict::After(wait)
}

fn is_idempotent(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

/// Full jitter: a uniform share `unit` (in [0, 1)) of the exponential step.
pub(crate) fn jittered(attempt: u32, unit: f64) -> Duration {
    let step = BASE.saturating_mul(1 << attempt.min(16)).min(MAX);
    step.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: Option<&'static str>) -> Verdict {
        let value = retry_after.map(HeaderValue::from_static);
        let code = StatusCode::from_u16(code).unwrap();
        after_status(
            &Method::GET,
            code,
            value.as_ref(),
            0,
            2,
            Duration::from_secs(5),
        )
    }

    #[test]
    fn connection_failures_and_timeouts_are_retried_a_bounded_number_of_times() {
        let refused = UpstreamError::Connect("refused".into());
        assert!(matches!(
            after_error(&Method::GET, &refused, 0, 2),
            Verdict::After(_)
        ));
        assert!(matches!(
            after_error(&Method::HEAD, &refused, 1, 2),
            Verdict::After(_)
        ));
        assert_eq!(after_error(&Method::GET, &refused, 2, 2), Verdict::GiveUp);
        let stalled = UpstreamError::Timeout("head".into());
        assert!(matches!(
            after_error(&Method::GET, &stalled, 0, 2),
            Verdict::After(_)
        ));
        let bad = UpstreamError::Invalid("junk".into());
        assert_eq!(after_error(&Method::GET, &bad, 0, 2), Verdict::GiveUp);
    }

    #[test]
    fn writes_are_never_retried() {
        let refused = UpstreamError::Connect("refused".into());
        assert_eq!(after_error(&Method::POST, &refused, 0, 2), Verdict::GiveUp);
        let verdict = after_status(
            &Method::PUT,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            0,
            2,
            Duration::from_secs(5),
        );
        assert_eq!(verdict, Verdict::GiveUp);
    }

    #[test]
    fn only_429_and_503_with_a_short_retry_after_are_retried() {
        assert_eq!(
            status(429, Some("1")),
            Verdict::After(Duration::from_secs(1))
        );
        assert_eq!(status(503, Some("0")), Verdict::After(Duration::ZERO));
        assert!(matches!(status(503, None), Verdict::After(_)));
        assert_eq!(
            status(429, Some("60")),
            Verdict::GiveUp,
            "too long: the client decides"
        );
        assert_eq!(
            status(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Verdict::GiveUp
        );
        for code in [400, 401, 403, 404, 416, 500, 502] {
            assert_eq!(status(code, Some("1")), Verdict::GiveUp, "{code}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped_and_jittered() {
        assert_eq!(jittered(0, 1.0), BASE);
        assert_eq!(jittered(3, 1.0), BASE * 8);
        assert_eq!(jittered(30, 1.0), MAX);
        assert_eq!(jittered(3, 0.0), Duration::ZERO);
        assert_eq!(jittered(1, 0.5), BASE);
    }
}
