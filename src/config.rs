//! Configuration: serde structs with documented defaults, the embedded default, and validation
//! errors that name the offending key.
//!
//! Loading is a pure `from_toml` plus a thin `load(path)`. This module knows nothing about sockets
//! or disks: it only describes what the operator asked for. Every key is documented in
//! `deploy/config.example.toml`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::access::AccessConfig;
use crate::secret::Secret;
use crate::secrets::SecretConfig;

/// The configuration used when `berth serve` is given no file: a mirror of the public registries,
/// caching under `./berth-cache`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../deploy/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

pub mod prefetch;

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the registry API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz` and the admin API.
    /// Loopback by default: metrics and the admin API are not for the nodes.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API (`/admin/...`); unset, the admin API is disabled.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// Upstream (by `host`) for request paths that name no registry, e.g. `/v2/nginx/...`.
    #[serde(default)]
    pub default_upstream: Option<String>,
    /// `text` or `json` log lines.
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub client: ClientConfig,
    /// The platform org whose central registry `//image/NAME` means.
    #[serde(default)]
    pub platform: PlatformConfig,
    /// The registries berth may fetch from; nothing else is ever dialled. A `host` with `*`
    /// is a pattern covering a family of registries (`*.azurecr.io`).
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    /// Pull secrets, matched to requests by registry and repository.
    #[serde(default, rename = "secret")]
    pub secrets: Vec<SecretConfig>,
    /// Caps and timeouts that keep berth answering under overload and hostile clients.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Who may pull what: anonymous (a public mirror) or principals and policies.
    #[serde(default)]
    pub access: AccessConfig,
    /// Fills of a cold image's blobs started by the GET of its manifest (`prefetch`).
    #[serde(default)]
    pub prefetch: prefetch::PrefetchConfig,
}

/// Caps and timeouts on the serving side. Over a cap berth answers 503 (or 429 for one client
/// over its share) with `Retry-After`, instead of queueing without bound.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open client connections; one more is answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Blob fills from upstreams running at once; a miss beyond it is answered 503.
    #[serde(default = "default_max_fills")]
    pub max_fills: usize,
    /// Requests in flight (bodies included) from one client IP; one more is answered 429.
    #[serde(default = "default_max_client_requests")]
    pub max_client_requests: usize,
    /// Longest request target (path and query) accepted; longer ones get 414.
    #[serde(default = "default_max_uri_bytes", deserialize_with = "de_size_usize")]
    pub max_uri_bytes: usize,
    /// Largest request head (names and values of all headers); larger ones get 431.
    #[serde(
        default = "default_max_header_bytes",
        deserialize_with = "de_size_usize"
    )]
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Time a client has to send a complete request head (slowloris).
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub header_read_timeout: Duration,
    /// Time a client may refuse to take response bytes before its connection is dropped.
    #[serde(default = "default_write_timeout", deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// On SIGTERM: how long downloads and fills in flight get to finish.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// The `Retry-After` berth sends when it refuses work because of these limits.
    #[serde(default = "default_retry_after", deserialize_with = "de_duration")]
    pub retry_after: Duration,
    /// Largest blob berth fetches and caches; a longer one is refused before a byte is written.
    /// Default 16 GiB, or `cache.max_size` if that is smaller; never more than `cache.max_size`.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_blob_size: Option<u64>,
    /// A connection with no request in flight for this long is closed (HTTP/1.1 keep-alive and
    /// HTTP/2 alike), so idle connections cannot hold `max_connections` slots.
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(default = "default_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Open connections from one client address (an IPv6 client: its /64); one more is
    /// closed at once. Clients in `trusted_networks` are exempt.
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// CIDR blocks exempt from `max_client_connections`: nodes behind SNAT or a load
    /// balancer, and the location's own replicas.
    #[serde(default)]
    pub trusted_networks: Vec<ipnet::IpNet>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            max_fills: default_max_fills(),
            max_client_requests: default_max_client_requests(),
            max_uri_bytes: default_max_uri_bytes(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            header_read_timeout: default_header_read_timeout(),
            write_timeout: default_write_timeout(),
            shutdown_grace: default_shutdown_grace(),
            retry_after: default_retry_after(),
            max_blob_size: None,
            idle_timeout: default_idle_timeout(),
            h2_max_concurrent_streams: default_h2_max_concurrent_streams(),
            max_client_connections: default_max_client_connections(),
            trusted_networks: Vec::new(),
        }
    }
}

/// PEM certificate chain and private key for serving HTTPS; re-read when either file changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The platform berth serves: each org has a central registry `ORG.<registry_domain>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// Our org; `//image/NAME` and `/org/ORG/image/NAME` references resolve to its registry.
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default = "default_registry_domain")]
    pub registry_domain: String,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            org: None,
            registry_domain: default_registry_domain(),
        }
    }
}

impl PlatformConfig {
    /// The registry host of an org: `ORG.<registry_domain>`.
    pub fn org_registry(&self, org: &str) -> String {
        format!("{org}.{}", self.registry_domain)
    }

    /// Our org's registry host, if an org is configured.
    pub fn own_registry(&self) -> Option<String> {
        self.org.as_deref().map(|org| self.org_registry(org))
    }

    /// Whether `host` is another org's registry on the platform: reachable only with a docker
    /// secret for it, never anonymously on our org's behalf.
    pub fn is_foreign_org_registry(&self, host: &str) -> bool {
        let suffix = format!(".{}", self.registry_domain);
        host.ends_with(&suffix) && Some(host.to_string()) != self.own_registry()
    }
}

fn default_registry_domain() -> String {
    "registry.cpln.io".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory holding the content-addressed store; created if missing.
    #[serde(default = "default_cache_dir")]
    pub dir: PathBuf,
    /// Upper bound of the bytes kept on disk; least recently used content goes first.
    #[serde(default = "default_max_size", deserialize_with = "de_size")]
    pub max_size: u64,
    /// How long a tag -> digest mapping is served without asking the upstream again.
    #[serde(default = "default_tag_ttl", deserialize_with = "de_duration")]
    pub tag_ttl: Duration,
    /// Bytes of manifests kept in memory to answer manifest hits without disk reads.
    #[serde(default = "default_manifest_memory", deserialize_with = "de_size")]
    pub manifest_memory: u64,
    /// How long past its TTL a tag mapping (and its content) is still served while the upstream
    /// is unreachable, times out, or answers 5xx or 429.
    #[serde(default = "default_stale_if_error", deserialize_with = "de_duration")]
    pub stale_if_error: Duration,
    /// How long an upstream 404 for a tag is remembered, so a crash-looping pod does not hammer
    /// the upstream.
    #[serde(default = "default_negative_ttl", deserialize_with = "de_duration")]
    pub negative_ttl: Duration,
    /// Free space to keep on the cache's filesystem; least recently used content is evicted to
    /// keep it. Unset: only `max_size` bounds the cache.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub min_free: Option<u64>,
    /// Free inodes to keep on the cache's filesystem (many small objects can exhaust inodes
    /// before bytes); least recently used content is evicted to keep them. Unset: not watched.
    #[serde(default)]
    pub min_free_inodes: Option<u64>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: default_cache_dir(),
            max_size: default_max_size(),
            tag_ttl: default_tag_ttl(),
            manifest_memory: default_manifest_memory(),
            stale_if_error: default_stale_if_error(),
            negative_ttl: default_negative_ttl(),
            min_free: None,
            min_free_inodes: None,
        }
    }
}

/// How berth talks to every upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Time allowed between sending a request and receiving the response head.
    #[serde(default = "default_response_timeout", deserialize_with = "de_duration")]
    pub response_timeout: Duration,
    /// Longest silence tolerated inside a response body before the fetch counts as stalled.
    #[serde(default = "default_read_timeout", deserialize_with = "de_duration")]
    pub read_timeout: Duration,
    /// Extra PEM CA bundle trusted on top of the webpki roots, for self-hosted registries.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Extra attempts for a request that failed without reaching the upstream, timed out, or
    /// was answered 429/503 with a short `Retry-After`.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Longest `Retry-After` berth waits out itself; a longer one goes back to the client.
    #[serde(default = "default_max_retry_after", deserialize_with = "de_duration")]
    pub max_retry_after: Duration,
    /// Consecutive connection failures or timeouts that open an upstream's circuit breaker.
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    /// How long an open breaker fails requests at once before one probe may try again.
    #[serde(default = "default_breaker_cooldown", deserialize_with = "de_duration")]
    pub breaker_cooldown: Duration,
    /// HTTP/2 receive window of one upstream stream (one blob): at most this much is in flight
    /// per round trip, so it bounds a fill's speed to `window / RTT`.
    #[serde(default = "default_h2_stream_window", deserialize_with = "de_window")]
    pub h2_stream_window: u32,
    /// HTTP/2 receive window of one upstream connection, shared by its streams; also the most
    /// an upstream connection can buffer while fills stall on the disk.
    #[serde(
        default = "default_h2_connection_window",
        deserialize_with = "de_window"
    )]
    pub h2_connection_window: u32,
    /// Slowest a blob fill may be, in bytes per second over `min_fill_window`; a slower body is
    /// abandoned (and resumed, as one resume attempt), so an upstream sending a byte just
    /// inside `read_timeout` cannot hold a fill and its `max_fills` slot for hours. 0: no floor.
    #[serde(default = "default_min_fill_rate", deserialize_with = "de_size")]
    pub min_fill_rate: u64,
    /// The window `min_fill_rate` is measured over.
    #[serde(default = "default_min_fill_window", deserialize_with = "de_duration")]
    pub min_fill_window: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            read_timeout: default_read_timeout(),
            ca_file: None,
            retries: default_retries(),
            max_retry_after: default_max_retry_after(),
            breaker_threshold: default_breaker_threshold(),
            breaker_cooldown: default_breaker_cooldown(),
            h2_stream_window: default_h2_stream_window(),
            h2_connection_window: default_h2_connection_window(),
            min_fill_rate: default_min_fill_rate(),
            min_fill_window: default_min_fill_window(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry name as image references use it, e.g. `docker.io` or `ghcr.io`.
    pub host: String,
    /// Where to fetch from; default `https://<host>`, or Docker Hub's API endpoint
    /// (`https://registry-1.docker.io`) when this is Docker Hub. `http://` is allowed for
    /// loopback registries.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Other names of the same registry. Docker Hub's (`DOCKER_HUB_NAMES`) are built in and
    /// these add to them.
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// Overrides `cache.tag_ttl` for this upstream.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub tag_ttl: Option<Duration>,
    /// The `[[secret]]` to use for this upstream, instead of matching secrets by registry.
    #[serde(default)]
    pub secret: Option<String>,
    /// Overrides `cache.stale_if_error` for this upstream.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub stale_if_error: Option<Duration>,
    /// Overrides `cache.negative_ttl` for this upstream.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub negative_ttl: Option<Duration>,
    /// Skip TLS certificate verification for this upstream only. Logged loudly at start-up;
    /// prefer `client.ca_file`.
    #[serde(default)]
    pub insecure: bool,
    /// In the policy access mode, every authenticated principal may pull from this upstream.
    #[serde(default)]
    pub public: bool,
    /// Internal networks (CIDR) this upstream's connections may reach, for a public registry
    /// whose storage is reached privately (S3 interface endpoints, Private Service Connect).
    /// Default: none; an endpoint configured as a loopback or private address allows its own
    /// network without this.
    #[serde(default)]
    pub allow_networks: Vec<String>,
}

/// Docker Hub's names: `docker.io` in references, `index.docker.io` in old ones and docker's
/// config, `registry-1.docker.io` its API endpoint, `registry.hub.docker.com` its old web name.
/// An upstream with any of them is Docker Hub and answers to all of them.
pub const DOCKER_HUB_NAMES: [&str; 4] = [
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// `https://docker.io` serves no registry API; this does.
pub const DOCKER_HUB_ENDPOINT: &str = "https://registry-1.docker.io";

impl UpstreamConfig {
    /// The endpoint URL for a concrete registry host (the host itself, or one a pattern
    /// matched), defaulting to `https://<host>` (Docker Hub's API endpoint for Docker Hub);
    /// `{host}` in a configured endpoint is replaced.
    pub fn endpoint_for(&self, host: &str) -> String {
        match &self.endpoint {
            Some(url) => url.trim_end_matches('/').replace("{host}", host),
            None if self.is_docker_hub() => DOCKER_HUB_ENDPOINT.to_string(),
            None => format!("https://{host}"),
        }
    }

    pub fn endpoint_url(&self) -> String {
        self.endpoint_for(&self.host)
    }

    /// Whether `host` holds `*` wildcards (each stands for one or more characters of one label).
    pub fn is_pattern(&self) -> bool {
        self.host.contains('*')
    }

    /// Docker Hub needs `library/` on one-component names; every other registry takes names as-is.
    pub fn is_docker_hub(&self) -> bool {
        self.configured_names().any(|name| {
            DOCKER_HUB_NAMES
                .iter()
                .any(|hub| hub.eq_ignore_ascii_case(name))
        })
    }

    /// `host`, `aliases`, and for Docker Hub its built-in names not already configured.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let built_in: &[&'static str] = if self.is_docker_hub() {
            &DOCKER_HUB_NAMES
        } else {
            &[]
        };
        let added = built_in
            .iter()
            .copied()
            .filter(|hub| !self.configured_names().any(|n| n.eq_ignore_ascii_case(hub)));
        self.configured_names().chain(added)
    }

    fn configured_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.host.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.add_own_registry();
        config.validate()?;
        Ok(config)
    }

    /// Our org's registry is always an upstream; config may still set its endpoint explicitly.
    fn add_own_registry(&mut self) {
        let Some(host) = self.platform.own_registry() else {
            return;
        };
        if !self.upstreams.iter().any(|u| u.names().any(|n| n == host)) {
            self.upstreams.push(UpstreamConfig {
                host,
                endpoint: None,
                aliases: Vec::new(),
                username: None,
                password: None,
                tag_ttl: None,
                secret: None,
                stale_if_error: None,
                negative_ttl: None,
                insecure: false,
                public: false,
                allow_networks: Vec::new(),
            });
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text)
    }

    pub fn embedded_default() -> Config {
        Config::from_toml(EMBEDDED_DEFAULT).expect("the embedded default config is valid")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(org) = &self.platform.org {
            let valid = !org.is_empty()
                && org
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid {
                return Err(invalid(
                    "platform.org",
                    format!("{org:?} is not an org name"),
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            validate_upstream(i, upstream)?;
            for name in upstream.names() {
                if !seen.insert(name.to_ascii_lowercase()) {
                    let key = format!("upstream[{i}].host");
                    return Err(invalid(key, format!("{name:?} is configured twice")));
                }
            }
        }
        if let Some(default) = &self.default_upstream {
            if !self
                .upstreams
                .iter()
                .any(|u| u.names().any(|n| n == default))
            {
                let message = format!("no [[upstream]] has host or alias {default:?}");
                return Err(invalid("default_upstream", message));
            }
        }
        crate::secrets::check_configs(&self.secrets)
            .map_err(|(key, message)| invalid(key, message))?;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            if let Some(name) = &upstream.secret {
                if !self.secrets.iter().any(|s| &s.name == name) {
                    let key = format!("upstream[{i}].secret");
                    return Err(invalid(key, format!("no [[secret]] is named {name:?}")));
                }
            }
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|token| token.expose().trim().len() < 16)
        {
            return Err(invalid(
                "admin_token",
                "must be at least 16 characters (it guards purging the cache)",
            ));
        }
        self.validate_limits()?;
        crate::access::check_config(&self.access)
            .map_err(|(key, message)| invalid(key, message))?;
        if self.cache.max_size == 0 {
            return Err(invalid("cache.max_size", "must be greater than zero"));
        }
        Ok(())
    }
}

impl Config {
    fn validate_limits(&self) -> Result<(), ConfigError> {
        if let Some(key) = self.prefetch.zero_count() {
            return Err(invalid(key, "must be greater than zero"));
        }
        let limits = &self.limits;
        let counts = [
            ("limits.max_connections", limits.max_connections),
            ("limits.max_fills", limits.max_fills),
            ("limits.max_client_requests", limits.max_client_requests),
            ("limits.max_headers", limits.max_headers),
            (
                "limits.max_client_connections",
                limits.max_client_connections,
            ),
            (
                "limits.h2_max_concurrent_streams",
                limits.h2_max_concurrent_streams as usize,
            ),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if limits.max_uri_bytes < 256 {
            return Err(invalid("limits.max_uri_bytes", "must be at least 256"));
        }
        if limits.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "must be at least 1KiB"));
        }
        if let Some(max_blob_size) = limits.max_blob_size {
            if max_blob_size == 0 || max_blob_size > self.cache.max_size {
                return Err(invalid(
                    "limits.max_blob_size",
                    "must be greater than zero and at most cache.max_size",
                ));
            }
        }
        if self.client.min_fill_window.is_zero() {
            return Err(invalid(
                "client.min_fill_window",
                "must be greater than zero",
            ));
        }
        if self.client.breaker_threshold == 0 {
            return Err(invalid(
                "client.breaker_threshold",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

fn validate_upstream(i: usize, upstream: &UpstreamConfig) -> Result<(), ConfigError> {
    use crate::upstream::{address, host::RegistryHost, pattern};
    for name in upstream.names() {
        let key = format!("upstream[{i}].host");
        if upstream.is_pattern() {
            pattern::check(name).map_err(|message| invalid(&key, message))?;
        } else if RegistryHost::parse(name).is_err() {
            return Err(invalid(
                key,
                format!("{name:?} is not a registry host name"),
            ));
        }
    }
    for network in &upstream.allow_networks {
        let key = format!("upstream[{i}].allow_networks");
        let parsed: address::Network = network.parse().map_err(|m: String| invalid(&key, m))?;
        if !parsed.is_internal() {
            let message = format!(
                "{network:?} is not a loopback, private or unique-local network; \
                 public addresses need no listing, and others are never allowed"
            );
            return Err(invalid(key, message));
        }
    }
    if upstream.is_pattern() && !upstream.aliases.is_empty() {
        let key = format!("upstream[{i}].aliases");
        return Err(invalid(key, "a host pattern cannot have aliases"));
    }
    let url = upstream.endpoint_for("example.invalid");
    let key = format!("upstream[{i}].endpoint");
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(&key, format!("{url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(invalid(
                key,
                format!("{url:?} must start with http:// or https://"),
            ))
        }
    }
    if uri.host().is_none() {
        return Err(invalid(key, format!("{url:?} has no host")));
    }
    if upstream.password.is_some() && upstream.username.is_none() {
        let key = format!("upstream[{i}].username");
        return Err(invalid(key, "a password is set but no username"));
    }
    Ok(())
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:5000".parse().expect("valid address")
}

fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:9090".parse().expect("valid address")
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("berth-cache")
}

fn default_max_size() -> u64 {
    50 << 30
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(30)
}

fn default_manifest_memory() -> u64 {
    64 << 20
}

fn default_stale_if_error() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_negative_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_retries() -> u32 {
    2
}

fn default_max_retry_after() -> Duration {
    Duration::from_secs(5)
}

fn default_breaker_threshold() -> u32 {
    5
}

fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}

fn default_h2_stream_window() -> u32 {
    8 << 20
}

fn default_h2_connection_window() -> u32 {
    16 << 20
}

fn default_min_fill_rate() -> u64 {
    64 << 10
}

fn default_min_fill_window() -> Duration {
    Duration::from_secs(30)
}

/// `limits.max_blob_size` unless set.
const DEFAULT_MAX_BLOB_SIZE: u64 = 16 << 30;

impl Config {
    /// The largest blob berth fills: `limits.max_blob_size`, else 16 GiB, never more than
    /// `cache.max_size` (a blob that cannot be cached is not fetched to be evicted at once).
    pub fn max_blob_size(&self) -> u64 {
        self.limits
            .max_blob_size
            .unwrap_or(DEFAULT_MAX_BLOB_SIZE)
            .min(self.cache.max_size)
    }
}

fn default_max_connections() -> usize {
    4096
}

fn default_max_fills() -> usize {
    256
}

fn default_max_client_requests() -> usize {
    256
}

fn default_max_uri_bytes() -> usize {
    8 << 10
}

fn default_max_header_bytes() -> usize {
    32 << 10
}

fn default_max_headers() -> usize {
    100
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_write_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_retry_after() -> Duration {
    Duration::from_secs(1)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

fn default_h2_max_concurrent_streams() -> u32 {
    128
}

fn default_max_client_connections() -> usize {
    128
}

/// Parses sizes such as "50GiB", "512 MiB" or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("invalid size {text:?}: {e}"))
}

/// Parses durations such as "30s", "5m" or "24h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Bytes(n) => Ok(n),
        SizeValue::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

/// An HTTP/2 flow-control window: 64 KiB (below it every stream crawls) up to 2^31 - 1 bytes.
fn de_window<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let size = de_size(d)?;
    match u32::try_from(size) {
        Ok(window) if (65_535..=i32::MAX as u32).contains(&window) => Ok(window),
        _ => Err(serde::de::Error::custom(format!(
            "an HTTP/2 window is 64KiB to 2GiB - 1 bytes, not {size}"
        ))),
    }
}

fn de_size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let size = de_size(d)?;
    usize::try_from(size).map_err(serde::de::Error::custom)
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_by_its_name_alone_gets_its_endpoint_and_every_name() {
        let config = Config::from_toml("[[upstream]]\nhost = \"docker.io\"").unwrap();
        let hub = &config.upstreams[0];
        assert!(hub.is_docker_hub());
        assert_eq!(hub.endpoint_url(), "https://registry-1.docker.io");
        let names: Vec<&str> = hub.names().collect();
        assert_eq!(names, DOCKER_HUB_NAMES);

        // Configured aliases add to the built-in ones; repeating a built-in one is no clash.
        let config = Config::from_toml(
            "[[upstream]]\nhost = \"docker.io\"\naliases = [\"index.docker.io\", \"hub.mirror.internal\"]",
        )
        .unwrap();
        let names: Vec<&str> = config.upstreams[0].names().collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.contains(&"hub.mirror.internal"));
        assert!(names.contains(&"registry.hub.docker.com"));

        // Any of Docker Hub's names makes it Docker Hub; an explicit endpoint still wins.
        let config = Config::from_toml(
            "[[upstream]]\nhost = \"index.docker.io\"\nendpoint = \"http://127.0.0.1:5000\"",
        )
        .unwrap();
        assert!(config.upstreams[0].is_docker_hub());
        assert_eq!(config.upstreams[0].endpoint_url(), "http://127.0.0.1:5000");
        assert!(config.upstreams[0].names().any(|n| n == "docker.io"));

        // Other registries get nothing built in.
        let config = Config::from_toml("[[upstream]]\nhost = \"ghcr.io\"").unwrap();
        assert_eq!(config.upstreams[0].endpoint_url(), "https://ghcr.io");
        assert_eq!(config.upstreams[0].names().count(), 1);
    }

    #[test]
    fn a_second_upstream_claiming_a_docker_hub_name_is_refused() {
        let err = Config::from_toml(
            "[[upstream]]\nhost = \"docker.io\"\n[[upstream]]\nhost = \"registry-1.docker.io\"\nendpoint = \"http://127.0.0.1:1\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream[1].host"), "{err}");
    }

    #[test]
    fn embedded_default_mirrors_the_public_registries() {
        let config = Config::embedded_default();
        let hosts: Vec<&str> = config.upstreams.iter().map(|u| u.host.as_str()).collect();
        for host in [
            "docker.io",
            "ghcr.io",
            "gcr.io",
            "quay.io",
            "registry.k8s.io",
        ] {
            assert!(hosts.contains(&host), "{host} missing from {hosts:?}");
        }
        assert_eq!(config.default_upstream.as_deref(), Some("docker.io"));
        assert!(config.upstreams[0].is_docker_hub());
    }

    #[test]
    fn the_documented_example_is_a_valid_config() {
        let example = include_str!("../deploy/config.example.toml");
        let config = Config::from_toml(example).unwrap();
        assert_eq!(config.default_upstream.as_deref(), Some("docker.io"));
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.cache.tag_ttl, Duration::from_secs(30));
        assert_eq!(config.cache.max_size, 50 << 30);
        assert!(config.upstreams.is_empty());
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9090");
        assert!(config.admin_token.is_none());
        assert_eq!(config.max_blob_size(), 16 << 30);
        assert_eq!(config.client.min_fill_rate, 64 << 10);
        assert_eq!(config.client.min_fill_window, Duration::from_secs(30));
        let small = Config::from_toml("[cache]\nmax_size = \"1GiB\"").unwrap();
        assert_eq!(small.max_blob_size(), 1 << 30, "capped by cache.max_size");
    }

    #[test]
    fn sizes_and_durations_parse_in_human_form() {
        let config = Config::from_toml(
            "[cache]\nmax_size = \"512MiB\"\ntag_ttl = \"5m\"\n[client]\nread_timeout = \"2s\"\n\
             h2_stream_window = \"4MiB\"",
        )
        .unwrap();
        assert_eq!(config.cache.max_size, 512 << 20);
        assert_eq!(config.cache.stale_if_error, Duration::from_secs(86400));
        assert_eq!(config.cache.negative_ttl, Duration::from_secs(10));
        assert_eq!(config.cache.min_free, None);
        assert_eq!(config.cache.tag_ttl, Duration::from_secs(300));
        assert_eq!(config.client.read_timeout, Duration::from_secs(2));
        assert_eq!(config.client.h2_stream_window, 4 << 20);
        assert_eq!(config.client.h2_connection_window, 16 << 20);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let cases = [
            ("[cache]\nmax_size = \"lots\"", "max_size"),
            ("[cache]\ntag_ttl = \"soon\"", "tag_ttl"),
            ("default_upstream = \"nowhere.io\"", "default_upstream"),
            (
                "[[upstream]]\nhost = \"a.io\"\nendpoint = \"ftp://a.io\"",
                "upstream[0].endpoint",
            ),
            (
                "[[upstream]]\nhost = \"a.io\"\n[[upstream]]\nhost = \"a.io\"",
                "upstream[1].host",
            ),
            (
                "[[upstream]]\nhost = \"a.io\"\npassword = \"x\"",
                "upstream[0].username",
            ),
            ("listen = \"nope\"", "listen"),
            (
                "[[upstream]]\nhost = \"a.io\"\nsecret = \"ghost\"",
                "upstream[0].secret",
            ),
            ("[platform]\norg = \"My Org\"", "platform.org"),
            (
                "[[upstream]]\nhost = \"*.a.io\"\naliases = [\"b.io\"]",
                "upstream[0].aliases",
            ),
            ("[[upstream]]\nhost = \"*.com\"", "upstream[0].host"),
            ("[[upstream]]\nhost = \"*.*\"", "upstream[0].host"),
            ("[[upstream]]\nhost = \"*\"", "upstream[0].host"),
            ("[[upstream]]\nhost = \"a.io/x\"", "upstream[0].host"),
            (
                "[[upstream]]\nhost = \"a.io\"\nallow_networks = [\"10.0.0.0\"]",
                "upstream[0].allow_networks",
            ),
            (
                "[[upstream]]\nhost = \"a.io\"\nallow_networks = [\"169.254.0.0/16\"]",
                "upstream[0].allow_networks",
            ),
            ("surprise = 1", "surprise"),
            ("admin_token = \"short\"", "admin_token"),
            ("admin_listen = \"9090\"", "admin_listen"),
            ("[limits]\nmax_fills = 0", "limits.max_fills"),
            ("[limits]\nmax_uri_bytes = 10", "limits.max_uri_bytes"),
            ("[limits]\nwrite_timeout = \"never\"", "write_timeout"),
            (
                "[client]\nbreaker_threshold = 0",
                "client.breaker_threshold",
            ),
            ("[client]\nh2_stream_window = \"16KiB\"", "h2_stream_window"),
            (
                "[client]\nh2_connection_window = \"2GiB\"",
                "h2_connection_window",
            ),
            (
                "[cache]\nmax_size = \"1GiB\"\n[limits]\nmax_blob_size = \"2GiB\"",
                "limits.max_blob_size",
            ),
            ("[client]\nmin_fill_rate = \"fast\"", "min_fill_rate"),
            (
                "[client]\nmin_fill_window = \"0s\"",
                "client.min_fill_window",
            ),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "error for {text:?} should name {key}: {err}"
            );
        }
    }

    #[test]
    fn our_org_registry_is_always_an_upstream() {
        let config = Config::from_toml("[platform]\norg = \"my-org\"").unwrap();
        let hosts: Vec<&str> = config.upstreams.iter().map(|u| u.host.as_str()).collect();
        assert_eq!(hosts, ["my-org.registry.cpln.io"]);
        assert!(config
            .platform
            .is_foreign_org_registry("other.registry.cpln.io"));
        assert!(!config
            .platform
            .is_foreign_org_registry("my-org.registry.cpln.io"));
        assert!(!config.platform.is_foreign_org_registry("docker.io"));
    }

    #[test]
    fn pattern_endpoints_substitute_the_host() {
        let config = Config::from_toml(
            "[[upstream]]\nhost = \"*.azurecr.io\"\n[[upstream]]\nhost = \"*.reg.example\"\nendpoint = \"http://{host}:5000\"",
        )
        .unwrap();
        assert_eq!(
            config.upstreams[0].endpoint_for("a.azurecr.io"),
            "https://a.azurecr.io"
        );
        assert_eq!(
            config.upstreams[1].endpoint_for("r.reg.example"),
            "http://r.reg.example:5000"
        );
    }

    #[test]
    fn passwords_never_print() {
        let config =
            Config::from_toml("[[upstream]]\nhost = \"a.io\"\nusername = \"u\"\npassword = \"pw\"")
                .unwrap();
        assert!(!format!("{config:?}").contains("pw\""));
    }
}
