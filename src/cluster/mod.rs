//! The replicas of one location acting as one cache: who owns which blob (`ring`), who is in
//! the location (`members`), the shared peer token (`token`), peer requests (`peer`) and their
//! metrics (`metrics`).
//!
//! Deliberately not here: fetching, verifying and storing (that is `fill`, which takes the
//! owner as the first source of a fill and falls back to the upstream), and building responses
//! beyond the one "draining" refusal (`api`).
//!
//! Start-up checks that need to know what a member is (URLs, `self` among the members, a
//! token file) run in `Cluster::from_config` and name the key they are about.

pub mod dns;
pub mod members;
pub mod metrics;
pub mod parent;
pub mod peer;
pub mod ring;
pub mod token;

use std::sync::Arc;

use crate::config::cluster::ClusterConfig;
use crate::config::ClientConfig;
use crate::net::address::AddressRule;
use crate::net::connect::Resolver;
use crate::net::HttpClient;

use self::members::Members;
use self::metrics::ClusterMetrics;
use self::parent::Parent;
use self::ring::Ring;
use self::token::TokenFile;

/// A start-up refusal, naming the `[cluster]` key.
#[derive(Debug, thiserror::Error)]
#[error("config key `cluster.{key}`: {message}")]
pub struct ClusterError {
    key: &'static str,
    message: String,
}

fn refuse(key: &'static str, message: impl Into<String>) -> ClusterError {
    ClusterError {
        key,
        message: message.into(),
    }
}

/// This replica's view of its location.
pub struct Cluster {
    /// This replica's URL as the members list it: the owner of a key it may fill itself.
    pub self_url: Arc<str>,
    pub members: Members,
    /// `None` for a location of one replica that only has a parent.
    tokens: Option<TokenFile>,
    /// The regional berth the owners fill from before the upstream (`parent`).
    parent: Option<Parent>,
    /// Peers are operator-named internal addresses: any internal address is allowed, and
    /// connecting gives up after `peer_connect_timeout` so a dead owner costs about a second.
    client: HttpClient,
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// The cluster `config` describes, `None` for a location of one replica without a parent.
    pub fn from_config(
        config: &ClusterConfig,
        client_config: &ClientConfig,
        resolver: Resolver,
        registry: &prometheus::Registry,
    ) -> Result<Option<Arc<Cluster>>, ClusterError> {
        if !config.is_enabled() && config.parent.is_none() {
            return Ok(None);
        }
        check_config(config)?;
        let (self_url, tokens, listed) = match config.is_enabled() {
            true => location(config)?,
            false => (Arc::from(""), None, Ring::default()),
        };
        let parent = match &config.parent {
            Some(url) => Some(Parent::from_config(url, config.parent_key_file.as_deref())?),
            None => None,
        };
        let peer_client = ClientConfig {
            connect_timeout: config.peer_connect_timeout,
            ..client_config.clone()
        };
        let lookup = match &config.dns {
            Some(name) => Some(dns::Lookup::new(config, name, Arc::clone(&resolver))?),
            None => None,
        };
        let client = HttpClient::with_resolver(&peer_client, resolver)
            .map_err(|error| refuse("peers", error.to_string()))?
            .with_rule(AddressRule::any_internal());
        let metrics = ClusterMetrics::new(registry);
        metrics.ring_size.set(listed.len() as i64);
        let cluster = Arc::new(Cluster {
            self_url,
            members: Members::new(
                listed,
                client_config.breaker_threshold,
                config.peer_cooldown,
            ),
            tokens,
            parent,
            client,
            metrics,
        });
        if let Some(lookup) = lookup {
            tokio::spawn(dns::refresh(
                Arc::downgrade(&cluster),
                lookup,
                config.refresh,
            ));
        }
        Ok(Some(cluster))
    }
}

/// The `[cluster]` checks that read the config alone: the keys' values, the member and parent
/// URLs, `self` among static peers, a token file named, a parent key never sent in clear.
/// `berth check-config` runs them (`crate::check_config`), so a config start-up refuses for
/// what it says is refused there too; start-up then also reads the token and key files and
/// `self_ip_env`, which the host checking a config may not have.
pub fn check_config(config: &ClusterConfig) -> Result<(), ClusterError> {
    if config.peer_fill_share > 100 {
        return Err(refuse("peer_fill_share", "a percentage: 0 to 100"));
    }
    if let Some(url) = &config.parent {
        parent::check(url, config.parent_key_file.is_some())?;
    }
    if !config.is_enabled() {
        return Ok(());
    }
    if config.dns.is_some() && !config.peers.is_empty() {
        return Err(refuse("dns", "set either `peers` or `dns`, not both"));
    }
    for peer in &config.peers {
        check_url(peer).map_err(|error| refuse("peers", error.to_string()))?;
    }
    if let Some(address) = &config.resolver {
        dns::resolver_address(address)?;
    }
    match &config.self_ip_env {
        // The URL is all in the config: it must be well-formed and, with static peers, listed.
        None => check_member(config, &own_url(config, |_| None)?)?,
        // The host comes from the environment where berth runs; the rest must be well-formed.
        Some(_) => {
            if let Some(url) = &config.self_url {
                check_url(url).map_err(|error| refuse("self", error.to_string()))?;
            }
        }
    }
    if config.token_file.is_none() {
        return Err(refuse("token_file", "required when peers are configured"));
    }
    Ok(())
}

/// `self_url` is one of the static `peers` (any address, with `dns`: DNS lists it).
fn check_member(config: &ClusterConfig, self_url: &str) -> Result<(), ClusterError> {
    if config.dns.is_none() && !config.peers.iter().any(|p| base(p) == self_url) {
        return Err(refuse("self", format!("{self_url} is not one of `peers`")));
    }
    Ok(())
}

impl From<ClusterError> for crate::config::ConfigError {
    fn from(error: ClusterError) -> Self {
        crate::config::invalid(format!("cluster.{}", error.key), error.message)
    }
}

/// The location's half of the section, after `check_config`: this replica's URL (with
/// `self_ip_env` read), the peer tokens, the listed ring.
fn location(config: &ClusterConfig) -> Result<(Arc<str>, Option<TokenFile>, Ring), ClusterError> {
    let self_url = own_url(config, |name| std::env::var(name).ok())?;
    check_member(config, &self_url)?;
    let token_file = config
        .token_file
        .as_ref()
        .ok_or_else(|| refuse("token_file", "required when peers are configured"))?;
    let tokens = TokenFile::open(token_file).map_err(|e| refuse("token_file", e.to_string()))?;
    let listed = Ring::new(config.peers.iter().map(|p| base(p)));
    Ok((self_url, Some(tokens), listed))
}

impl Cluster {
    /// Whether `ip` is a listed replica's address (`Members::has_address`).
    pub fn is_member_address(&self, ip: std::net::IpAddr) -> bool {
        self.members.has_address(ip)
    }

    /// The ring as `/admin/stats` shows it: this replica and every member with its state.
    pub fn stats(&self) -> serde_json::Value {
        let members: Vec<serde_json::Value> = self
            .members
            .states()
            .into_iter()
            .map(|(url, state)| serde_json::json!({"url": &*url, "state": state}))
            .collect();
        serde_json::json!({"self": &*self.self_url, "members": members})
    }
}

/// Whether a request to this replica comes from another replica of its location (a valid
/// peer token). The one question `api` asks the cluster.
pub fn is_peer_request(cluster: Option<&Cluster>, headers: &http::HeaderMap) -> bool {
    cluster.is_some_and(|cluster| cluster.is_peer_request(headers))
}

/// Why a member URL is refused.
#[derive(Debug, thiserror::Error)]
enum UrlError {
    #[error("{0:?} is not a URL")]
    Unparsable(String, #[source] http::uri::InvalidUri),
    #[error("{0:?} is not an http(s) URL")]
    Scheme(String),
    #[error("{0:?} has a path; name the replica's base URL")]
    Path(String),
}

/// A member URL: `http` or `https`, a host, nothing after the authority but an optional `/`.
fn check_url(url: &str) -> Result<(), UrlError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|err| UrlError::Unparsable(url.to_string(), err))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(UrlError::Scheme(url.to_string()));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(UrlError::Path(url.to_string()));
    }
    Ok(())
}

/// A member URL without its trailing `/`, the form the ring and peer requests use.
fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// `self`, its host replaced by the IP in `self_ip_env` when that variable is set (the pod IP
/// of a StatefulSet replica); with `dns` and no `self`, `http://<ip>:<dns_port>`.
fn own_url(
    config: &ClusterConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Arc<str>, ClusterError> {
    let ip = match &config.self_ip_env {
        Some(name) => match env(name) {
            Some(ip) => Some(
                ip.trim()
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| refuse("self_ip_env", format!("${name} is not an IP address")))?,
            ),
            None => None,
        },
        None => None,
    };
    let host = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let url = match (&config.self_url, ip) {
        (Some(url), None) => base(url).to_owned(),
        (Some(url), Some(ip)) => {
            check_url(url).map_err(|error| refuse("self", error.to_string()))?;
            let uri: http::Uri = url.parse().expect("checked");
            let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}",
                uri.scheme_str().expect("checked"),
                host(ip)
            )
        }
        (None, Some(ip)) if config.dns.is_some() => {
            format!("http://{}:{}", host(ip), config.dns_port)
        }
        (None, _) => {
            return Err(refuse(
                "self",
                "required: this replica's URL as peers reach it",
            ))
        }
    };
    check_url(&url).map_err(|error| refuse("self", error.to_string()))?;
    Ok(Arc::from(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ClusterConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_pod_ip_replaces_the_host_of_self() {
        let config = config("self = \"http://berth-0:5000/\"\nself_ip_env = \"POD_IP\"");
        let url = own_url(&config, |_| Some("10.0.0.7".into())).unwrap();
        assert_eq!(&*url, "http://10.0.0.7:5000");
        let url = own_url(&config, |_| None).unwrap();
        assert_eq!(&*url, "http://berth-0:5000");
    }

    #[test]
    fn dns_members_without_self_use_the_pod_ip_and_dns_port() {
        let config = config("dns = \"berth\"\ndns_port = 5443\nself_ip_env = \"POD_IP\"");
        let url = own_url(&config, |_| Some("fd00::7".into())).unwrap();
        assert_eq!(&*url, "http://[fd00::7]:5443");
    }

    #[test]
    fn a_member_url_with_a_path_or_another_scheme_is_refused() {
        assert!(check_url("http://a:5000").is_ok());
        assert!(check_url("https://a/").is_ok());
        assert!(check_url("http://a:5000/v2/").is_err());
        assert!(check_url("ftp://a").is_err());
        assert!(check_url("a:5000").is_err());
    }

    #[test]
    fn the_checks_of_what_the_config_says_refuse_what_start_up_refuses() {
        let refused = |text: &str| check_config(&config(text)).err().map(|e| e.key);
        let cases = [
            (
                "peers = [\"http://a:1\"]\nself = \"http://b:1\"\ntoken_file = \"/t\"",
                "self",
            ),
            (
                "peers = [\"http://a:1\"]\nself = \"http://a:1\"",
                "token_file",
            ),
            (
                "peers = [\"ftp://a:1\"]\nself = \"ftp://a:1\"\ntoken_file = \"/t\"",
                "peers",
            ),
            (
                "dns = \"b\"\npeers = [\"http://a:1\"]\nself = \"http://a:1\"",
                "dns",
            ),
            ("dns = \"b\"\ntoken_file = \"/t\"", "self"),
            (
                "dns = \"b\"\nself_ip_env = \"P\"\nresolver = \"b:53\"",
                "resolver",
            ),
            ("peer_fill_share = 101", "peer_fill_share"),
            ("parent = \"p.example\"", "parent"),
        ];
        for (text, key) in cases {
            assert_eq!(refused(text), Some(key), "{text}");
        }
        // The token file's lines and the pod IP are the running host's: start-up reads them.
        let deployed = "dns = \"b\"\nself_ip_env = \"BERTH_TEST_UNSET\"\ntoken_file = \"/absent\"";
        assert_eq!(refused(deployed), None);
        let converted =
            crate::config::ConfigError::from(check_config(&config(cases[0].0)).unwrap_err());
        assert_eq!(converted.key(), Some("cluster.self"));
    }

    #[test]
    fn self_must_be_a_member_and_a_token_file_is_required() {
        let registry = prometheus::Registry::new();
        let client = crate::config::Config::from_toml("").unwrap().client;
        let resolver = crate::net::connect::system_resolver();
        let open = |text: &str| {
            Cluster::from_config(
                &config(text),
                &client,
                std::sync::Arc::clone(&resolver),
                &registry,
            )
        };
        let err = open("peers = [\"http://a:1\"]\nself = \"http://b:1\"")
            .err()
            .unwrap();
        assert!(err.to_string().contains("cluster.self"), "{err}");
        let err = open("peers = [\"http://a:1\"]\nself = \"http://a:1\"")
            .err()
            .unwrap();
        assert!(err.to_string().contains("cluster.token_file"), "{err}");
        assert!(open("").unwrap().is_none());
    }
}
