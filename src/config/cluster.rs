//! The `[cluster]` section: the replicas of one location acting as one cache, and the parent
//! tier above the location. Plain data with its defaults; checks that need to know what a URL
//! or a peer is (`cluster::Cluster::from_config`) run in `cluster` at start-up.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::de_duration;

/// Absent or without `peers`/`dns`, berth is a location of one replica: nothing changes.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Static membership: the base URLs of every replica, this one included
    /// (`http://10.0.0.5:5000`). Exclusive with `dns`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// DNS membership: the headless Service name whose A/AAAA records are the replicas; each
    /// becomes `http://<address>:<dns_port>`. Re-resolved every `refresh`.
    #[serde(default)]
    pub dns: Option<String>,
    /// The port replicas serve the registry API on, for `dns` members.
    #[serde(default = "default_dns_port")]
    pub dns_port: u16,
    /// The resolver `dns` is asked, `ip:port`; unset, the system's. Tests point it at their own.
    #[serde(default)]
    pub resolver: Option<String>,
    /// How often `dns` is resolved again: a replica gone from DNS leaves the ring this late at
    /// most (a draining one leaves at once, from its 503 "draining").
    #[serde(default = "default_refresh", deserialize_with = "de_duration")]
    pub refresh: Duration,
    /// This replica's own URL as the others reach it; it must be one of the members, or this
    /// replica owns nothing and asks for everything.
    #[serde(default, rename = "self")]
    pub self_url: Option<String>,
    /// An environment variable naming this replica's IP (the pod IP from the downward API),
    /// overriding the host of `self` (or, with `dns`, making `http://<ip>:<dns_port>`).
    #[serde(default)]
    pub self_ip_env: Option<String>,
    /// The shared secret for peer requests, one token a line; every line is accepted, so a
    /// token is rotated by adding the new one everywhere, then removing the old one.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Whether a replica keeps its own copy of a blob it got from the owner. True: hits stay
    /// local after the first pull, at the price of the location's disk holding it several times.
    #[serde(default = "default_true")]
    pub keep_local: bool,
    /// How long a peer that failed `breaker_threshold` times in a row is left out of the ring.
    #[serde(default = "default_peer_cooldown", deserialize_with = "de_duration")]
    pub peer_cooldown: Duration,
    /// Connecting to a peer gives up after this long; the asker then fetches from the upstream.
    #[serde(default = "default_peer_connect", deserialize_with = "de_duration")]
    pub peer_connect_timeout: Duration,
    /// The share of `limits.max_fills` peer requests may hold, in percent: asker misses keep
    /// the rest, so a flood of peer requests cannot lock out this replica's own clients.
    #[serde(default = "default_peer_fill_share")]
    pub peer_fill_share: u8,
    /// A regional berth the location's owners fill from before the upstream itself.
    #[serde(default)]
    pub parent: Option<String>,
    /// The file holding this location's key (`user:key`, Basic) for the parent's policy mode.
    #[serde(default)]
    pub parent_key_file: Option<PathBuf>,
}

impl ClusterConfig {
    /// True when the section makes this replica one of several.
    pub fn is_enabled(&self) -> bool {
        !self.peers.is_empty() || self.dns.is_some()
    }
}

fn default_dns_port() -> u16 {
    5000
}

fn default_refresh() -> Duration {
    Duration::from_secs(10)
}

fn default_peer_cooldown() -> Duration {
    Duration::from_secs(30)
}

fn default_peer_connect() -> Duration {
    Duration::from_secs(1)
}

fn default_peer_fill_share() -> u8 {
    50
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_section_is_a_location_of_one() {
        let config: ClusterConfig = toml::from_str("").unwrap();
        assert!(!config.is_enabled());
        assert!(config.keep_local);
        assert_eq!(config.refresh, Duration::from_secs(10));
    }

    #[test]
    fn static_peers_and_self_are_read() {
        let text = "peers = [\"http://a:5000\", \"http://b:5000\"]\nself = \"http://a:5000\"\nrefresh = \"2s\"";
        let config: ClusterConfig = toml::from_str(text).unwrap();
        assert!(config.is_enabled());
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.self_url.as_deref(), Some("http://a:5000"));
        assert_eq!(config.refresh, Duration::from_secs(2));
    }

    #[test]
    fn an_unknown_key_is_refused() {
        assert!(toml::from_str::<ClusterConfig>("peer = []").is_err());
    }
}
