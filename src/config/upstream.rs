//! `[[upstream]]` and `[platform]`: the registries berth may fetch from, Docker Hub's names,
//! and the org whose registry `//image/NAME` means. The checks here are the ones plain data
//! allows (URLs, names configured twice); whether a host is a valid registry name or pattern,
//! and whether a network may be allowed, is `upstream::check_config`'s, run at start-up.

use std::time::Duration;

use serde::Deserialize;

use super::units::de_opt_duration;
use super::{invalid, ConfigError};
use crate::secret::Secret;

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

/// The plain checks of `upstream[i]`.
pub(super) fn validate(i: usize, upstream: &UpstreamConfig) -> Result<(), ConfigError> {
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
