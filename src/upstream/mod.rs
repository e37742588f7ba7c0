//! Upstream registries: where each one is, how to ask it for manifests and blobs, and what its
//! failures mean.
//!
//! `Upstream::fetch` (`exchange`) is the one way berth talks to a registry: it adds credentials
//! (`auth`), follows at most five redirects (never from https to http) with `Authorization`
//! only for the scheme and host it was made for, answers a redirect hop's challenge
//! anonymously, and maps refusals to `UpstreamError`. Every connection goes through the
//! upstream's `net::HttpClient`, whose connector applies the address rule (`net::address`).
//! Registry names from requests are `host::RegistryHost`s; `pattern` matches them. Which
//! upstream serves a request is decided in `route`; what to do with the bytes, by the caller.

pub(crate) mod auth;
pub(crate) mod breaker;
pub mod challenge;
mod check;
mod error;
mod exchange;
pub mod host;
pub mod pattern;
pub(crate) mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, RANGE, RETRY_AFTER};
use http::{HeaderMap, Method, Response, Uri};
use hyper::body::Incoming;

use crate::config::{CacheConfig, Config, PlatformConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::net::address::{AddressRule, Network};
use crate::net::connect;
pub use crate::net::HttpClient;
use crate::oci::digest::Digest;
use crate::oci::name::{Reference, Repository};
use crate::secret::Secret;
use crate::secrets::{Credentials, Secrets};
pub use auth::Auth;
pub use check::check_config;
pub use error::{Cause, SetupError, UpstreamError};
use host::RegistryHost;

pub struct Upstream {
    /// The registry name as references use it (`docker.io`, or the host a pattern matched);
    /// secrets are matched against it, and metrics and logs use it.
    pub name: Arc<str>,
    /// The `upstream` label of metrics: the configured `host`, which for a pattern is the
    /// pattern itself, so clients naming hosts cannot add series.
    pub(crate) metric_label: Arc<str>,
    /// Scheme, authority and optional path prefix, without a trailing slash.
    base: String,
    /// Docker Hub puts one-component names under `library/`.
    pub(crate) docker_hub: bool,
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` a tag may be served stale while this upstream fails.
    pub stale_if_error: Duration,
    /// How long a 404 for a tag is remembered.
    pub(crate) negative_ttl: Duration,
    /// Another org's platform registry: only with a docker secret for it.
    pub(crate) requires_secret: bool,
    /// `public = true`: in the policy access mode, every authenticated principal may pull.
    pub public: bool,
    /// `username`/`password` from the upstream's config, used for every repository.
    configured: Option<Credentials>,
    /// The `[[secret]]` the config pins this upstream to, if any.
    secret: Option<String>,
    secrets: Arc<Secrets>,
    client: HttpClient,
    auth: Auth,
    metrics: Arc<Metrics>,
    /// Fails requests fast while the upstream is down, so clients of it do not each wait out
    /// a timeout; cached content never reaches this point.
    breaker: breaker::Breaker,
    /// When this upstream last answered 429: prefetching (optional traffic) pauses after it.
    last_429: std::sync::Mutex<Option<std::time::Instant>>,
    /// Extra attempts for safe retries (`retry`), and the longest `Retry-After` waited out.
    retries: u32,
    max_retry_after: Duration,
}

/// Where a request's credentials come from; printed by `berth resolve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    Anonymous,
    Configured { username: String },
    Secret(String),
}

impl Upstream {
    fn new(config: &UpstreamConfig, host: &str, shared: &Shared) -> Upstream {
        let configured = match (&config.username, &config.password) {
            (Some(user), Some(password)) => Some(Credentials {
                username: user.clone(),
                password: password.clone(),
                id: format!("upstream:{host}"),
            }),
            (Some(user), None) => Some(Credentials {
                username: user.clone(),
                password: Secret::new(""),
                id: format!("upstream:{host}"),
            }),
            _ => None,
        };
        let metric_label: Arc<str> = config.host.to_ascii_lowercase().into();
        let base = config.endpoint_for(host);
        Upstream {
            name: host.into(),
            docker_hub: config.is_docker_hub(),
            tag_ttl: config.tag_ttl.unwrap_or(shared.cache.tag_ttl),
            stale_if_error: config.stale_if_error.unwrap_or(shared.cache.stale_if_error),
            negative_ttl: config.negative_ttl.unwrap_or(shared.cache.negative_ttl),
            requires_secret: shared.platform.is_foreign_org_registry(host),
            public: config.public,
            configured,
            secret: config.secret.clone(),
            secrets: Arc::clone(&shared.secrets),
            auth: Auth::new(
                host.to_string(),
                base.starts_with("http://"),
                Arc::clone(&metric_label),
                Arc::clone(&shared.metrics),
            ),
            metric_label,
            base,
            client: shared.client_for(config, host),
            metrics: Arc::clone(&shared.metrics),
            breaker: breaker::Breaker::new(shared.breaker_threshold, shared.breaker_cooldown),
            last_429: std::sync::Mutex::new(None),
            retries: shared.retries,
            max_retry_after: shared.max_retry_after,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// Which credentials a pull of `repository` would present.
    pub fn credential_source(&self, repository: &Repository) -> CredentialSource {
        if let Some(configured) = &self.configured {
            return CredentialSource::Configured {
                username: configured.username.clone(),
            };
        }
        match self
            .secrets
            .select(&self.name, repository.as_str(), self.secret.as_deref())
        {
            Some(name) => CredentialSource::Secret(name),
            None => CredentialSource::Anonymous,
        }
    }

    async fn credentials(
        &self,
        repository: &Repository,
    ) -> Result<Option<Credentials>, UpstreamError> {
        if self.configured.is_some() {
            return Ok(self.configured.clone());
        }
        self.secrets
            .for_request(&self.name, repository.as_str(), self.secret.as_deref())
            .await
            .map_err(|err| UpstreamError::Token(Cause::new("credentials", err)))
    }

    /// GET or HEAD of a manifest, forwarding the client's `Accept` so the upstream picks the
    /// same representation it would give the client directly.
    pub async fn manifest(
        &self,
        method: Method,
        repository: &Repository,
        reference: &Reference,
        accept: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(ACCEPT, accept.clone());
        }
        let path = format!("manifests/{}", reference.as_str());
        let response = self.fetch(method, repository, &path, None, headers).await?;
        ok_or_status(response)
    }

    /// GET or HEAD of a whole blob.
    pub async fn blob(
        &self,
        method: Method,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("blobs/{digest}");
        let response = self
            .fetch(method, repository, &path, None, HeaderMap::new())
            .await?;
        ok_or_status(response)
    }

    /// GET of a blob from byte `start` on, to resume a fill cut mid-way. The upstream may
    /// answer 206 with the rest or 200 with the whole blob; the caller checks which.
    pub(crate) async fn get_blob_range(
        &self,
        repository: &Repository,
        digest: &Digest,
        start: u64,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = format!("blobs/{digest}");
        let mut headers = HeaderMap::new();
        let range = HeaderValue::from_str(&format!("bytes={start}-")).expect("ascii digits");
        headers.insert(RANGE, range);
        let response = self
            .fetch(Method::GET, repository, &path, None, headers)
            .await?;
        ok_or_status(response)
    }

    /// Whether the circuit breaker is failing this upstream's requests fast right now.
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// A blob body from this upstream was abandoned at the rate floor: a bad body for the
    /// circuit breaker at once, though the fill goes on with a resume.
    pub(crate) fn body_too_slow(&self) {
        self.fill_ended(false);
    }

    /// How a blob fill from this upstream ended, for the circuit breaker: `true` when the blob
    /// arrived and verified, `false` when the upstream failed it (`breaker`'s bad bodies).
    pub(crate) fn fill_ended(&self, delivered: bool) {
        if delivered {
            self.breaker.good_body();
        } else if self.breaker.bad_body() {
            tracing::warn!(upstream = %self.name, "circuit breaker opened: blob fills failed repeatedly");
        }
    }

    /// Whether this upstream answered 429 (to any request) less than `within` ago.
    pub fn rate_limited_within(&self, within: Duration) -> bool {
        let last = *self.last_429.lock().expect("429 lock");
        last.is_some_and(|at| at.elapsed() < within)
    }
}

/// Text from a remote party (a Location, an error description) made safe for one log line:
/// control characters and quotes escaped, length bounded.
pub(crate) fn escape_remote(text: &str) -> String {
    const MAX: usize = 300;
    let mut escaped: String = text
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().count() > MAX {
        escaped.push_str("...");
    }
    escaped
}

/// Passes 2xx responses on and turns every other status into an error.
fn ok_or_status(response: Response<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
    if response.status().is_success() {
        return Ok(response);
    }
    Err(UpstreamError::Status {
        status: response.status(),
        retry_after: response.headers().get(RETRY_AFTER).cloned(),
    })
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// What every upstream shares: the HTTP client, the secrets, defaults.
struct Shared {
    client: HttpClient,
    /// Built only when some upstream sets `insecure = true`.
    insecure_client: Option<HttpClient>,
    secrets: Arc<Secrets>,
    platform: PlatformConfig,
    cache: CacheConfig,
    metrics: Arc<Metrics>,
    retries: u32,
    max_retry_after: Duration,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    /// One client per (insecure, address rule), so upstreams with the same rule share a pool.
    clients: std::sync::Mutex<HashMap<(bool, AddressRule), HttpClient>>,
}

impl Shared {
    /// The client for an upstream: the rule its endpoint and `allow_networks` imply.
    fn client_for(&self, config: &UpstreamConfig, host: &str) -> HttpClient {
        let endpoint = config.endpoint_for(host);
        let endpoint_host = endpoint
            .parse::<Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_string));
        let networks: Vec<Network> = config
            .allow_networks
            .iter()
            .filter_map(|network| network.parse().ok())
            .collect();
        let rule = AddressRule::for_endpoint(endpoint_host.as_deref(), &networks);
        let base = match (&self.insecure_client, config.insecure) {
            (Some(insecure), true) => insecure,
            _ => &self.client,
        };
        let mut clients = self.clients.lock().expect("clients lock");
        clients
            .entry((config.insecure, rule.clone()))
            .or_insert_with(|| base.with_rule(rule))
            .clone()
    }
}

/// Pattern-matched hosts are remembered so each keeps its token cache; bounded because a
/// client chooses the host names.
const MAX_MATCHED_HOSTS: u64 = 10_000;

/// Every configured upstream, by each of its names, and the host patterns.
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
    patterns: Vec<UpstreamConfig>,
    matched: moka::sync::Cache<String, Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
    shared: Shared,
}

impl Upstreams {
    /// Upstreams whose traffic is counted in metrics nobody reads (`berth resolve`, tests).
    pub fn new(config: &Config) -> Result<Upstreams, SetupError> {
        Upstreams::with_metrics(config, Arc::new(Metrics::new()))
    }

    pub(crate) fn with_metrics(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Upstreams, SetupError> {
        Upstreams::with_resolver(config, metrics, connect::system_resolver())
    }

    /// Upstreams whose connections resolve names with `resolver` (tests inject one).
    pub fn with_resolver(
        config: &Config,
        metrics: Arc<Metrics>,
        resolver: connect::Resolver,
    ) -> Result<Upstreams, SetupError> {
        check_config(&config.upstreams)?;
        let client = HttpClient::with_resolver(&config.client, Arc::clone(&resolver))?;
        let secrets = Arc::new(Secrets::new(config.secrets.clone(), client.clone()));
        let mut insecure_client = None;
        for upstream in config.upstreams.iter().filter(|u| u.insecure) {
            tracing::warn!(
                upstream = %upstream.host,
                endpoint = %upstream.endpoint_url(),
                "TLS CERTIFICATE VERIFICATION IS DISABLED for this upstream (insecure = true): \
                 anyone on the network path can impersonate it and serve any content; \
                 configure client.ca_file instead"
            );
            if insecure_client.is_none() {
                let resolver = Arc::clone(&resolver);
                insecure_client = Some(HttpClient::new_insecure(&config.client, resolver)?);
            }
        }
        let shared = Shared {
            client,
            insecure_client,
            secrets,
            platform: config.platform.clone(),
            cache: config.cache.clone(),
            metrics,
            retries: config.client.retries,
            max_retry_after: config.client.max_retry_after,
            breaker_threshold: config.client.breaker_threshold,
            breaker_cooldown: config.client.breaker_cooldown,
            clients: Default::default(),
        };
        let mut by_name = HashMap::new();
        let mut patterns = Vec::new();
        for upstream_config in &config.upstreams {
            if upstream_config.is_pattern() {
                patterns.push(upstream_config.clone());
                continue;
            }
            let upstream = Arc::new(Upstream::new(
                upstream_config,
                &upstream_config.host,
                &shared,
            ));
            shared.metrics.initialise_upstream(&upstream.metric_label);
            for name in upstream_config.names() {
                by_name.insert(name.to_ascii_lowercase(), Arc::clone(&upstream));
            }
        }
        let default = config
            .default_upstream
            .as_ref()
            .and_then(|name| by_name.get(&name.to_ascii_lowercase()).cloned());
        Ok(Upstreams {
            by_name,
            patterns,
            matched: moka::sync::Cache::new(MAX_MATCHED_HOSTS),
            default,
            shared,
        })
    }

    /// The upstream a registry host names: a configured host or alias, else the first pattern
    /// that matches. The host is validated (and lower-cased) by the caller's parse.
    pub fn get(&self, host: &RegistryHost) -> Option<Arc<Upstream>> {
        if let Some(upstream) = self.by_name.get(host.as_str()) {
            return Some(Arc::clone(upstream));
        }
        let config = self
            .patterns
            .iter()
            .find(|p| pattern::matches(&p.host, host))?;
        Some(self.matched.get_with(host.to_string(), || {
            Arc::new(Upstream::new(config, host.as_str(), &self.shared))
        }))
    }

    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.as_ref()
    }

    pub fn platform(&self) -> &PlatformConfig {
        &self.shared.platform
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_text_is_escaped_for_one_log_line() {
        let forged = escape_remote("x\n2026-01-01 INFO forged\r\u{1b}[31m");
        assert!(!forged.contains(['\n', '\r', '\u{1b}']), "{forged}");
        assert!(escape_remote(&"a".repeat(1000)).len() < 310);
    }
}
