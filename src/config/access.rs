//! `[access]`: its keys, defaults, and the checks that name the offending key. Reading the
//! files it points at is `access::files`' job.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Everyone may pull: a public mirror.
    #[default]
    Anonymous,
    /// Principals, policies and tokens decide.
    Policy,
}

/// The `[access]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    #[serde(default)]
    pub mode: AccessMode,
    /// The principals file (service accounts, users, groups, key hashes).
    #[serde(default)]
    pub principals: Option<PathBuf>,
    /// The directory of policy files (`*.json`).
    #[serde(default)]
    pub policies: Option<PathBuf>,
    /// How long a token from the token endpoint is valid.
    #[serde(
        default = "default_token_ttl",
        deserialize_with = "super::units::de_duration"
    )]
    pub token_ttl: Duration,
    /// The token signing secret, shared by instances that accept each other's tokens; random
    /// per process when unset.
    #[serde(default)]
    pub token_key: Option<Secret>,
    /// The token endpoint URL clients are sent to; `http://<Host>/token` when unset.
    #[serde(default)]
    pub realm: Option<String>,
    /// How often the principals file and the policies directory are checked for changes.
    #[serde(
        default = "default_reload_interval",
        deserialize_with = "super::units::de_duration"
    )]
    pub reload_interval: Duration,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            mode: AccessMode::default(),
            principals: None,
            policies: None,
            token_ttl: default_token_ttl(),
            token_key: None,
            realm: None,
            reload_interval: default_reload_interval(),
        }
    }
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(1)
}

/// A signing key shorter than this is guessable offline from any token.
const MIN_TOKEN_KEY: usize = 32;

/// Checks `[access]`.
pub(super) fn check_config(config: &AccessConfig) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: &str| Err(invalid(format!("access.{key}"), message));
    if config.mode == AccessMode::Policy {
        if config.principals.is_none() {
            return invalid("principals", "mode = \"policy\" needs a principals file");
        }
        if config.policies.is_none() {
            return invalid("policies", "mode = \"policy\" needs a policies directory");
        }
    }
    if config.principals.is_some() != config.policies.is_some() {
        let key = if config.principals.is_none() {
            "principals"
        } else {
            "policies"
        };
        return invalid(key, "principals and policies are set together");
    }
    if let Some(key) = &config.token_key {
        if key.expose().len() < MIN_TOKEN_KEY {
            return invalid("token_key", "must be at least 32 characters of random text");
        }
    }
    if config.token_ttl < Duration::from_secs(10) || config.token_ttl > Duration::from_secs(86_400)
    {
        return invalid("token_ttl", "must be between 10s and 24h");
    }
    if let Some(realm) = &config.realm {
        let ok = (realm.starts_with("http://") || realm.starts_with("https://"))
            && !realm.contains(['"', '\\', ' ']);
        if !ok {
            return invalid("realm", "must be an http:// or https:// URL");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_mistakes_name_the_key() {
        let cases = [
            (
                AccessConfig {
                    mode: AccessMode::Policy,
                    ..AccessConfig::default()
                },
                "access.principals",
            ),
            (
                AccessConfig {
                    principals: Some("p.json".into()),
                    ..AccessConfig::default()
                },
                "access.policies",
            ),
            (
                AccessConfig {
                    token_key: Some(Secret::new("short")),
                    ..AccessConfig::default()
                },
                "access.token_key",
            ),
            (
                AccessConfig {
                    token_ttl: Duration::from_secs(1),
                    ..AccessConfig::default()
                },
                "access.token_ttl",
            ),
            (
                AccessConfig {
                    realm: Some("berth/token".into()),
                    ..AccessConfig::default()
                },
                "access.realm",
            ),
        ];
        for (config, key) in cases {
            assert_eq!(check_config(&config).unwrap_err().key(), Some(key));
        }
        assert!(check_config(&AccessConfig::default()).is_ok());
    }
}
