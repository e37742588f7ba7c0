//! How talking to an upstream fails: `UpstreamError` (with its `Cause`, the error underneath
//! kept), and `SetupError`, why the upstreams could not be built. Which status a failure becomes
//! is `crate::error`'s choice, not this file's.

use std::sync::Arc;

use http::header::HeaderValue;
use http::StatusCode;

use crate::net::{error_chain, SendError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(#[source] Cause),
    /// The address rule refused the address a name resolved to or a URL named; nothing was
    /// dialled. Not retried and not counted against the circuit breaker.
    #[error("refused by the address rule: {0}")]
    Refused(#[source] Cause),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("protocol error: {0}")]
    Protocol(#[source] Cause),
    #[error("token fetch failed: {0}")]
    Token(#[source] Cause),
    #[error("upstream answered {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
    },
    #[error("invalid response: {0}")]
    Invalid(#[source] Cause),
    /// The upstream's circuit breaker is open: it failed repeatedly and is not asked again
    /// until its cool-down ends. Callers treat it like a connection failure.
    #[error("circuit open: {0}")]
    CircuitOpen(String),
}

/// What an `UpstreamError` is about (the request, the token URL, the redirect) and, where there
/// is one, the error underneath, kept rather than formatted away. It sits in an `Arc` because the
/// flights hand one failure to every waiter. The text is made once, readable for the log line
/// (context and cause); `source()` gives the cause itself.
type BoxedError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Cause {
    text: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    /// `context: source`, for a cause whose own text says what it needs to.
    pub fn new(context: impl std::fmt::Display, source: impl Into<BoxedError>) -> Cause {
        let source: BoxedError = source.into();
        Cause {
            text: format!("{context}: {source}"),
            source: Some(Arc::from(source)),
        }
    }

    /// `context: source: its source: ...`, for hyper's errors, whose useful part (refused, TLS,
    /// DNS) sits several sources deep.
    fn chained<E>(context: impl std::fmt::Display, source: E) -> Cause
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Cause {
            text: format!("{context}: {}", error_chain(&source)),
            source: Some(Arc::new(source)),
        }
    }
}

impl From<String> for Cause {
    fn from(text: String) -> Cause {
        Cause { text, source: None }
    }
}

impl From<&str> for Cause {
    fn from(text: &str) -> Cause {
        Cause::from(text.to_string())
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|source| source as _)
    }
}

impl From<SendError> for UpstreamError {
    fn from(err: SendError) -> UpstreamError {
        match err {
            SendError::Timeout { target } => {
                UpstreamError::Timeout(format!("no response to {target}"))
            }
            SendError::Refused { target, source } => {
                UpstreamError::Refused(Cause::chained(target, source))
            }
            SendError::Connect { target, source } => {
                UpstreamError::Connect(Cause::chained(target, source))
            }
            SendError::Protocol { target, source } => {
                UpstreamError::Protocol(Cause::chained(target, source))
            }
        }
    }
}

/// Why the upstreams could not be set up: a bad `[[upstream]]` entry or an HTTP client that
/// could not be built (its CA file, say).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Client(#[from] crate::net::ClientError),
}
