//! The checks of `[[upstream]]` entries that need registry knowledge: every name a valid
//! registry host or host pattern, every `allow_networks` entry an internal network. Run at
//! start-up (`crate::check_config`, `Upstreams::with_resolver`); errors name the key like
//! `config`'s own checks do.

use crate::config::{invalid, ConfigError, UpstreamConfig};
use crate::net::address::Network;

use super::host::RegistryHost;
use super::pattern;

/// Checks the names and networks of every `[[upstream]]`.
pub fn check_config(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
    for (i, upstream) in upstreams.iter().enumerate() {
        check_upstream(i, upstream)?;
    }
    Ok(())
}

fn check_upstream(i: usize, upstream: &UpstreamConfig) -> Result<(), ConfigError> {
    for name in upstream.names() {
        let key = format!("upstream[{i}].host");
        if upstream.is_pattern() {
            pattern::check(name).map_err(|err| invalid(&key, err.to_string()))?;
        } else if RegistryHost::parse(name).is_err() {
            return Err(invalid(
                key,
                format!("{name:?} is not a registry host name"),
            ));
        }
    }
    for network in &upstream.allow_networks {
        let key = format!("upstream[{i}].allow_networks");
        let parsed: Network = network
            .parse()
            .map_err(|err: crate::net::address::NetworkError| invalid(&key, err.to_string()))?;
        if !parsed.is_internal() {
            let message = format!(
                "{network:?} is not a loopback, private or unique-local network; \
                 public addresses need no listing, and others are never allowed"
            );
            return Err(invalid(key, message));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn bad_hosts_and_networks_name_the_offending_key() {
        let cases = [
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
        ];
        for (text, key) in cases {
            let config = Config::from_toml(text).unwrap();
            let err = check_config(&config.upstreams).unwrap_err();
            assert_eq!(err.key(), Some(key), "{text:?}: {err}");
        }
        let fine = Config::from_toml(
            "[[upstream]]\nhost = \"*.azurecr.io\"\n[[upstream]]\nhost = \"a.io\"\n\
             allow_networks = [\"10.0.0.0/8\"]",
        )
        .unwrap();
        assert!(check_config(&fine.upstreams).is_ok());
    }
}
