//! Configuration: serde structs with documented defaults, the embedded default, and validation
//! errors that name the offending key.
//!
//! Loading is a pure `from_toml` plus a thin `load(path)`. This module knows nothing about sockets
//! or disks: it only describes what the operator asked for. Every key is documented in
//! `deploy/config.example.toml`.
//!
//! A leaf: plain data that every layer reads and none is read by. It imports nothing of the
//! crate but `secret::Secret`. The checks here are those plain data allows; the ones that need
//! domain knowledge (registry host names and patterns, networks) run where that knowledge
//! lives, at start-up (`crate::check_config`), and name the key the same way.
//!
//! One file per group of sections: `cache`, `client`, `limits`, `upstream` (with `[platform]`),
//! `access`, `secret`, `prefetch`; `units` reads sizes and durations.

mod access;
mod cache;
mod client;
mod limits;
mod prefetch;
mod secret;
mod units;
mod upstream;

pub use access::{AccessConfig, AccessMode};
pub use cache::CacheConfig;
pub use client::ClientConfig;
pub use limits::LimitsConfig;
pub use prefetch::{PrefetchConfig, Trigger as PrefetchTrigger};
pub use secret::{SecretConfig, SecretKind};
pub use units::parse_duration;
pub use units::UnitError;
pub use upstream::{PlatformConfig, UpstreamConfig};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::Secret;

pub mod cluster;

/// The configuration used when `berth serve` is given no file: a mirror of the public registries,
/// caching under `./berth-cache`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../deploy/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(#[source] toml::de::Error),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// The key an `Invalid` error names.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A `ConfigError::Invalid` naming `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
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
    /// Replicas of one location acting as one cache, and the parent tier (`cluster`).
    #[serde(default)]
    pub cluster: cluster::ClusterConfig,
    /// Fills of a cold image's blobs started by the GET of its manifest (`prefetch`).
    #[serde(default)]
    pub prefetch: PrefetchConfig,
}

/// PEM certificate chain and private key for serving HTTPS; re-read when either file changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(ConfigError::Parse)?;
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

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// The file at `path`, or the embedded default without one; with where it came from, for
    /// messages. Every subcommand that reads a config loads it through here.
    pub fn load_or_default(path: Option<&Path>) -> Result<(String, Config), ConfigError> {
        Ok(match path {
            Some(path) => (path.display().to_string(), Config::load(path)?),
            None => ("the embedded default".into(), Config::embedded_default()),
        })
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
            upstream::validate(i, upstream)?;
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
        secret::check_configs(&self.secrets)?;
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
        access::check_config(&self.access)?;
        if self.cache.max_size == 0 {
            return Err(invalid("cache.max_size", "must be greater than zero"));
        }
        Ok(())
    }
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:5000".parse().expect("valid address")
}

fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:9090".parse().expect("valid address")
}

/// `limits.max_blob_size` unless set.
const DEFAULT_MAX_BLOB_SIZE: u64 = 16 << 30;

impl Config {
    /// The largest blob berth fills: `limits.max_blob_size`, else 16 GiB, never more than
    /// `cache.max_size` (a blob that cannot be cached is not fetched to be evicted at once).
    pub(crate) fn max_blob_size(&self) -> u64 {
        self.limits
            .max_blob_size
            .unwrap_or(DEFAULT_MAX_BLOB_SIZE)
            .min(self.cache.max_size)
    }
}

#[cfg(test)]
mod tests {
    use super::upstream::DOCKER_HUB_NAMES;
    use super::*;
    use std::time::Duration;

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
        let example = include_str!("../../deploy/config.example.toml");
        let config = Config::from_toml(example).unwrap();
        assert_eq!(config.default_upstream.as_deref(), Some("docker.io"));
    }

    #[test]
    fn a_prefetch_trigger_is_manifest_or_first_blob_and_nothing_else() {
        let config = Config::from_toml("[prefetch]\ntrigger = \"first_blob\"").unwrap();
        assert_eq!(config.prefetch.trigger, PrefetchTrigger::FirstBlob);
        let config = Config::from_toml("[prefetch]\ntrigger = \"manifest\"").unwrap();
        assert_eq!(config.prefetch.trigger, PrefetchTrigger::Manifest);
        let refused = Config::from_toml("[prefetch]\ntrigger = \"layer\"").unwrap_err();
        let text = refused.to_string();
        assert!(
            text.contains("trigger") && text.contains("first_blob"),
            "{text}"
        );
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
