//! One configured secret and its file: read at start, re-read when the file changes, and the
//! credential caches that belong to the file's current contents.
//!
//! Changes are noticed by comparing the file's modification time, length and inode when the
//! secret is used, at most once per `recheck` (a second by default). That follows Kubernetes'
//! atomic symlink swap of mounted Secrets without a watcher thread per file, and costs one
//! `stat` of a tmpfs file per second per secret in use. Each change bumps the generation and
//! empties the caches, so nothing minted from the old contents is served for the new ones.
//! What the contents mean is in `docker`, `ecr` and `gcp`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::stamp::Stamp;

use super::aws::AwsCredentials;
use super::docker::DockerAuths;
use super::ecr::EcrKey;
use super::fields::{syntax_reason, Fields};
use super::gcp::GcpKey;
use super::token::TokenCache;
use super::{Login, SecretConfig, SecretError, SecretKind};

/// Secret files are a few KiB; a bigger file is a mistake (a wrong path), not a secret.
const MAX_FILE: u64 = 1024 * 1024;

pub(super) struct Source {
    pub config: SecretConfig,
    recheck: Duration,
    state: Mutex<State>,
    /// Registry logins minted from this secret: ECR passwords, GCP access tokens.
    pub logins: TokenCache<Login>,
    /// STS sessions for ECR keys with a `roleArn`; shared with the login fetch, which runs
    /// detached from any one caller.
    pub(crate) sessions: Arc<TokenCache<AwsCredentials>>,
}

struct State {
    checked: Option<std::time::Instant>,
    /// `None` while the file cannot be found (or before the first look).
    stamp: Option<Stamp>,
    /// Counts loads, so ids and cache keys change whenever the contents may have.
    generation: u64,
    loaded: Result<Arc<Parsed>, SecretError>,
}

/// A secret file's contents, by type.
#[derive(Debug)]
pub(super) enum Parsed {
    Docker(DockerAuths),
    Ecr(EcrKey),
    Gcp(GcpKey),
}

impl Parsed {
    /// Whether this secret applies to `registry/repository` by its own rules.
    pub fn covers(&self, registry: &str, repository: &str) -> bool {
        match self {
            Parsed::Docker(auths) => auths.covers(registry),
            Parsed::Ecr(key) => key.covers(registry, repository),
            Parsed::Gcp(key) => key.covers(registry, repository),
        }
    }
}

impl Source {
    /// Reads the file now; a failure is logged and kept, and does not stop the others.
    pub fn open(config: SecretConfig, recheck: Duration) -> Source {
        let source = Source {
            state: Mutex::new(State {
                checked: None,
                stamp: None,
                generation: 0,
                loaded: Err(SecretError::Read {
                    name: config.name.clone(),
                    path: config.file.clone(),
                    reason: "not read yet".to_string(),
                }),
            }),
            config,
            recheck,
            logins: TokenCache::default(),
            sessions: Arc::default(),
        };
        // Loads the file (logging a failure); the result is kept in the state.
        let _ = source.current();
        source
    }

    /// The generation and contents in force, re-reading the file if it changed.
    pub fn current(&self) -> (u64, Result<Arc<Parsed>, SecretError>) {
        let mut state = self.state.lock().expect("secret state lock");
        let due = match state.checked {
            None => true,
            Some(at) => at.elapsed() >= self.recheck,
        };
        if due {
            state.checked = Some(std::time::Instant::now());
            let stamp = Stamp::of(&self.config.file);
            let changed = match (&stamp, state.stamp) {
                (Ok(new), Some(old)) => *new != old,
                (Ok(_), None) => true,
                (Err(_), Some(_)) => true,
                (Err(_), None) => state.generation == 0,
            };
            if changed {
                self.reload(&mut state, stamp);
            }
        }
        (state.generation, state.loaded.clone())
    }

    fn reload(&self, state: &mut State, stamp: std::io::Result<Stamp>) {
        let name = &self.config.name;
        state.generation += 1;
        state.stamp = stamp.as_ref().ok().copied();
        state.loaded = match stamp {
            Err(err) => Err(self.read_error(err.to_string())),
            Ok(stamp) if stamp.file_len() > MAX_FILE => {
                Err(self.read_error(format!("larger than {MAX_FILE} bytes")))
            }
            Ok(_) => std::fs::read(&self.config.file)
                .map_err(|err| self.read_error(err.to_string()))
                .and_then(|bytes| parse(&self.config, &bytes))
                .map(Arc::new),
        };
        self.logins.clear();
        self.sessions.clear();
        match &state.loaded {
            Ok(_) => tracing::info!(
                secret = %name,
                kind = ?self.config.kind,
                generation = state.generation,
                "secret loaded"
            ),
            Err(err) => tracing::warn!(secret = %name, error = %err, "secret unusable"),
        }
    }

    fn read_error(&self, reason: String) -> SecretError {
        SecretError::Read {
            name: self.config.name.clone(),
            path: self.config.file.clone(),
            reason,
        }
    }
}

/// Parses a secret file's bytes as the configured type.
pub(super) fn parse(config: &SecretConfig, bytes: &[u8]) -> Result<Parsed, SecretError> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|err| SecretError::Syntax {
            name: config.name.clone(),
            reason: syntax_reason(&err),
        })?;
    let fields = Fields::root(&config.name, &doc)?;
    Ok(match config.kind {
        SecretKind::Docker => Parsed::Docker(DockerAuths::parse(&fields)?),
        SecretKind::Ecr => Parsed::Ecr(EcrKey::parse(&fields)?),
        SecretKind::Gcp => Parsed::Gcp(GcpKey::parse(&fields)?),
    })
}
