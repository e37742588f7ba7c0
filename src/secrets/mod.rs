//! Pull secrets: registry credentials kept in files (as mounted from Kubernetes Secrets), which
//! request each one applies to, and the exchanges that turn cloud keys into registry logins.
//!
//! Each `[[secret]]` names a file in its platform's own JSON form:
//! - `docker`: a `config.json` `auths` map (`docker`); used for the registries it lists.
//! - `ecr`: AWS keys, an optional role and a list of repositories (`ecr`, `aws`); used for
//!   those repositories on `ACCOUNT.dkr.ecr.REGION.amazonaws.com`.
//! - `gcp`: a service-account key (`gcp`); used for `gcr.io`/`*.gcr.io` and
//!   `REGION-docker.pkg.dev` repositories of the key's project.
//!
//! Matching needs no per-upstream wiring: `select` tries the secrets in configuration order and
//! the first that covers the request wins, unless the upstream names one (`secret = "NAME"`).
//! Files are re-read when they change (`source`); tokens are cached and shared (`token`).
//!
//! This module decides *which* username and password to present. Presenting them (Basic to
//! the registry or to its token endpoint) and caching registry bearer tokens is `upstream::auth`'s
//! work, keyed by `Credentials::id`. No value from a secret file ever reaches a log line, an
//! error, a metric label or a `Debug` string.

mod aws;
mod docker;
mod ecr;
mod exchange;
mod fields;
mod gcp;
mod source;
mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::{SecretConfig, SecretKind};
use crate::secret::Secret;
use source::{Parsed, Source};

/// The HTTP client for STS, ECR and Google token endpoints: berth's upstream client, so the
/// same timeouts, TLS roots and extra CA bundle apply.
pub type Transport = crate::net::HttpClient;

/// How often a secret's file is checked for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// Reads a secret file's bytes as berth would for a `[[secret]]` of `kind`, without using
/// them: the entry point for checking a file before deploying it, and for fuzzing the parsers.
pub fn check_secret_file(kind: SecretKind, bytes: &[u8]) -> Result<(), SecretError> {
    let config = SecretConfig {
        name: "secret".to_string(),
        kind,
        file: PathBuf::new(),
        sts_endpoint: None,
        ecr_endpoint: None,
    };
    source::parse(&config, bytes).map(|_| ())
}

/// Why a secret cannot be used. Messages name the secret and, for a malformed file, the field;
/// never a value from the file.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret `{name}` is not configured")]
    Unknown { name: String },
    #[error("secret `{name}`: cannot read {}: {reason}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("secret `{name}`: file is not valid JSON: {reason}")]
    Syntax { name: String, reason: String },
    #[error("secret `{name}`: field `{field}` {problem}")]
    Field {
        name: String,
        field: String,
        problem: String,
    },
    #[error("secret `{name}` cannot serve registry `{registry}`: {reason}")]
    NotFor {
        name: String,
        registry: String,
        reason: String,
    },
    #[error("secret `{name}`: {service} failed: {reason}")]
    Exchange {
        name: String,
        service: &'static str,
        reason: String,
    },
}

/// What to present to a registry (as Basic, or to its token endpoint).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
    /// Stable id for cache keys: the secret's name, the file's generation and, for fetched
    /// tokens, the token's serial. It changes whenever the username or password may have;
    /// it is never derived from the secret itself.
    pub id: String,
}

/// A registry login as cached: the parts of `Credentials` that are not the id.
#[derive(Clone, Debug)]
struct Login {
    username: String,
    password: Secret,
}

/// One snapshot of a secret file: what it held when read, or why it could not be used.
type Loaded = Result<Arc<Parsed>, SecretError>;

/// Every configured secret.
pub struct Secrets {
    sources: Vec<Source>,
    /// One per source, in the same order: the shared client, plus the network of an
    /// `sts_endpoint`/`ecr_endpoint` configured as a loopback or private address.
    transports: Vec<Transport>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.sources.iter().map(|s| (&s.config.name, s.config.kind)))
            .finish()
    }
}

impl Secrets {
    /// Reads every secret file now. A bad or missing file is logged and reported again when
    /// the secret is used; it never stops the others, and it is re-read once fixed.
    pub fn new(configs: Vec<SecretConfig>, client: Transport) -> Secrets {
        Secrets::with_recheck(configs, client, RECHECK)
    }

    /// As `new`, checking the files for changes every `recheck` at most (tests use zero, to
    /// see a change at once).
    pub fn with_recheck(
        configs: Vec<SecretConfig>,
        transport: Transport,
        recheck: Duration,
    ) -> Secrets {
        let transports = configs
            .iter()
            .map(|config| transport_for(&transport, config))
            .collect();
        let sources = configs
            .into_iter()
            .map(|config| Source::open(config, recheck))
            .collect();
        Secrets {
            sources,
            transports,
        }
    }

    /// Which secret (by name) applies to this registry host and repository: the upstream's
    /// explicit `secret = "NAME"` if given (even while that file is broken, so the request
    /// fails with the reason rather than going anonymous), else the first secret in
    /// configuration order that covers them.
    pub fn select(&self, registry: &str, repository: &str, named: Option<&str>) -> Option<String> {
        self.pick(registry, repository, named)
            .map(|(source, _, _)| source.config.name.clone())
    }

    /// The secret `select` picks, with the snapshot of its file it was picked on.
    fn pick(
        &self,
        registry: &str,
        repository: &str,
        named: Option<&str>,
    ) -> Option<(&Source, u64, Loaded)> {
        if let Some(named) = named {
            let Some(source) = self.source(named) else {
                tracing::warn!(secret = %named, "upstream names a secret that is not configured");
                return None;
            };
            let (generation, loaded) = source.current();
            return Some((source, generation, loaded));
        }
        self.sources.iter().find_map(|source| {
            let (generation, loaded) = source.current();
            let covers = loaded
                .as_ref()
                .is_ok_and(|parsed| parsed.covers(registry, repository));
            covers.then_some((source, generation, loaded))
        })
    }

    /// The credentials for pulling `repository` from `registry`: picked as `select` does and
    /// fetched from the same snapshot of the secret's file, so a file changing in between
    /// cannot send one registry's login to another. A pinned secret (`named`) must cover the
    /// registry too: on a pattern upstream the client picks the host. `None`: anonymous.
    pub async fn for_request(
        &self,
        registry: &str,
        repository: &str,
        named: Option<&str>,
    ) -> Result<Option<Credentials>, SecretError> {
        let Some((source, generation, loaded)) = self.pick(registry, repository, named) else {
            return Ok(None);
        };
        let parsed = loaded?;
        if !parsed.covers(registry, repository) {
            return Err(SecretError::NotFor {
                name: source.config.name.clone(),
                registry: registry.to_string(),
                reason: "the secret does not cover this registry and repository".to_string(),
            });
        }
        self.login(source, generation, &parsed, registry)
            .await
            .map(Some)
    }

    /// Username and password to present to `registry`, fetching or refreshing ECR and GCP
    /// tokens as needed.
    pub async fn credentials(
        &self,
        name: &str,
        registry: &str,
    ) -> Result<Credentials, SecretError> {
        let source = self.source(name).ok_or_else(|| SecretError::Unknown {
            name: name.to_string(),
        })?;
        let (generation, loaded) = source.current();
        let parsed = loaded?;
        self.login(source, generation, &parsed, registry).await
    }

    async fn login(
        &self,
        source: &Source,
        generation: u64,
        parsed: &Parsed,
        registry: &str,
    ) -> Result<Credentials, SecretError> {
        let name = source.config.name.as_str();
        let transport = self.transport_of(source);
        let (login, id) = match parsed {
            Parsed::Docker(auths) => {
                let login = auths
                    .for_upstream(registry)
                    .ok_or_else(|| SecretError::NotFor {
                        name: name.to_string(),
                        registry: registry.to_string(),
                        reason: "no `auths` entry for it".to_string(),
                    })?;
                let login = Login {
                    username: login.username.clone(),
                    password: login.password.clone(),
                };
                (login, format!("{name}#{generation}"))
            }
            Parsed::Ecr(key) => {
                let (login, serial) = key
                    .login(
                        &source.config,
                        &source.sessions,
                        &source.logins,
                        generation,
                        registry,
                        transport,
                    )
                    .await?;
                (login, format!("{name}#{generation}.{serial}"))
            }
            Parsed::Gcp(key) => {
                let (login, serial) = key
                    .login(&source.config.name, &source.logins, generation, transport)
                    .await?;
                (login, format!("{name}#{generation}.{serial}"))
            }
        };
        Ok(Credentials {
            username: login.username,
            password: login.password,
            id,
        })
    }

    /// The configured secret names, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().map(|s| s.config.name.as_str())
    }

    fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.config.name == name)
    }

    fn transport_of(&self, source: &Source) -> &Transport {
        let index = self
            .sources
            .iter()
            .position(|s| std::ptr::eq(s, source))
            .expect("a source of these secrets");
        &self.transports[index]
    }
}

/// The client for one secret's exchanges: the address rule of `base`, widened by the network
/// of an endpoint the configuration gives as a loopback or private address. A GCP key's
/// `token_uri` comes from the file, not the configuration, so it widens nothing.
fn transport_for(base: &Transport, config: &SecretConfig) -> Transport {
    use crate::net::address::AddressRule;
    let endpoint_rule = |url: &Option<String>| {
        let host = url
            .as_deref()
            .map(|u| u.replace("{region}", "us-east-1"))
            .and_then(|u| u.parse::<http::Uri>().ok())
            .and_then(|u| u.host().map(str::to_string));
        AddressRule::for_endpoint(host.as_deref(), &[])
    };
    let rule = base
        .rule()
        .union(&endpoint_rule(&config.sts_endpoint))
        .union(&endpoint_rule(&config.ecr_endpoint));
    if &rule == base.rule() {
        base.clone()
    } else {
        base.with_rule(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::json;

    /// Nothing here goes on the network: a default client.
    fn transport() -> Transport {
        Transport::new(&crate::config::ClientConfig::default()).unwrap()
    }

    /// Writes `doc` as the file of a secret called `name` and returns its config.
    fn secret_file(
        dir: &tempfile::TempDir,
        name: &str,
        kind: SecretKind,
        doc: &serde_json::Value,
    ) -> SecretConfig {
        let file = dir.path().join(name);
        std::fs::write(&file, doc.to_string()).unwrap();
        SecretConfig {
            name: name.to_string(),
            kind,
            file,
            sts_endpoint: None,
            ecr_endpoint: None,
        }
    }

    const ECR_HOST: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";

    fn auth(user: &str, password: &str) -> serde_json::Value {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        json!({ "auth": encoded })
    }

    /// Why `secrets` cannot log in to `registry` with the secret `name`, as the error reads.
    async fn refusal(secrets: &Secrets, name: &str, registry: &str) -> String {
        let err = secrets.credentials(name, registry).await.unwrap_err();
        err.to_string()
    }

    /// A docker, an ECR and a GCP secret, and one whose file is broken, in that order.
    fn all_kinds(dir: &tempfile::TempDir) -> Vec<SecretConfig> {
        let pem = gcp::tests::rsa_key().private_pem.clone();
        let gcp_key = gcp::tests::key_json(&pem, "my-proj", "https://oauth2.googleapis.com/token");
        vec![
            secret_file(
                dir,
                "broken",
                SecretKind::Docker,
                &json!({"auths": {"quay.io": {"auth": "hunter2!"}}}),
            ),
            secret_file(
                dir,
                "hub",
                SecretKind::Docker,
                &json!({"auths": {
                    "https://index.docker.io/v1/": auth("hubuser", "hunter2"),
                    "ghcr.io": {"username": "gh", "password": "hunter3"},
                    "localhost:5000": auth("local", "hunter4"),
                }}),
            ),
            secret_file(
                dir,
                "aws",
                SecretKind::Ecr,
                &json!({
                    "accessKey": "AKID", "secretKey": "hunter5",
                    "repos": [format!("{ECR_HOST}/team/*"), "shared/base"]
                }),
            ),
            secret_file(dir, "gcp", SecretKind::Gcp, &gcp_key),
        ]
    }

    #[test]
    fn select_applies_each_kind_of_rule() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::new(all_kinds(&dir), transport());
        let other_ecr = "210987654321.dkr.ecr.us-east-1.amazonaws.com";
        let cases: &[(&str, &str, Option<&str>, Option<&str>)] = &[
            ("docker.io", "library/nginx", None, Some("hub")),
            ("index.docker.io", "library/nginx", None, Some("hub")),
            ("registry-1.docker.io", "library/nginx", None, Some("hub")),
            ("ghcr.io", "org/app", None, Some("hub")),
            ("GHCR.io", "org/app", None, Some("hub")),
            ("localhost:5000", "app", None, Some("hub")),
            ("localhost", "app", None, None),
            ("quay.io", "org/app", None, None),
            (ECR_HOST, "team/app", None, Some("aws")),
            (ECR_HOST, "other/app", None, None),
            (ECR_HOST, "shared/base", None, Some("aws")),
            (other_ecr, "shared/base", None, Some("aws")),
            (other_ecr, "team/app", None, None),
            ("gcr.io", "my-proj/app", None, Some("gcp")),
            ("us.gcr.io", "my-proj/app", None, Some("gcp")),
            (
                "europe-west1-docker.pkg.dev",
                "my-proj/repo/app",
                None,
                Some("gcp"),
            ),
            ("gcr.io", "other-proj/app", None, None),
            ("quay.io", "org/app", Some("hub"), Some("hub")),
            ("quay.io", "org/app", Some("broken"), Some("broken")),
            ("docker.io", "library/nginx", Some("gcp"), Some("gcp")),
            ("docker.io", "library/nginx", Some("missing"), None),
        ];
        for (registry, repository, named, expected) in cases {
            assert_eq!(
                secrets.select(registry, repository, *named).as_deref(),
                *expected,
                "{registry}/{repository} named {named:?}"
            );
        }
    }

    #[test]
    fn the_first_matching_secret_in_configuration_order_wins() {
        let dir = tempfile::tempdir().unwrap();
        let first = secret_file(
            &dir,
            "first",
            SecretKind::Docker,
            &json!({"auths": {"ghcr.io": auth("a", "b")}}),
        );
        let second = secret_file(
            &dir,
            "second",
            SecretKind::Docker,
            &json!({"auths": {"ghcr.io": auth("c", "d")}}),
        );
        let secrets = Secrets::new(vec![first, second], transport());
        assert_eq!(
            secrets.select("ghcr.io", "x", None).as_deref(),
            Some("first")
        );
        assert_eq!(secrets.names().collect::<Vec<_>>(), ["first", "second"]);
    }

    #[tokio::test]
    async fn a_broken_secret_fails_alone_with_its_name_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::new(all_kinds(&dir), transport());
        let err = secrets.credentials("broken", "quay.io").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret `broken`: field `auths[\"quay.io\"].auth` is not valid base64"
        );
        let hub = secrets
            .credentials("hub", "https://index.docker.io/v1/")
            .await
            .unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.expose()),
            ("hubuser", "hunter2")
        );
        assert_eq!(hub.id, "hub#1");
        let err = refusal(&secrets, "hub", "quay.io").await;
        assert_eq!(
            err,
            "secret `hub` cannot serve registry `quay.io`: no `auths` entry for it"
        );
        let err = refusal(&secrets, "aws", "docker.io").await;
        assert!(err.starts_with("secret `aws` cannot serve registry `docker.io`: not an ECR host"));
        let err = refusal(&secrets, "nope", "docker.io").await;
        assert_eq!(err, "secret `nope` is not configured");
    }

    /// A docker secret `hub` with the login `a:one` for ghcr.io, checked every `recheck`, and
    /// its file.
    fn hub_for_ghcr(dir: &tempfile::TempDir, recheck: Duration) -> (Secrets, PathBuf) {
        let config = secret_file(
            dir,
            "hub",
            SecretKind::Docker,
            &json!({"auths": {"ghcr.io": auth("a", "one")}}),
        );
        let path = config.file.clone();
        (
            Secrets::with_recheck(vec![config], transport(), recheck),
            path,
        )
    }

    #[tokio::test]
    async fn files_are_read_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let (secrets, path) = hub_for_ghcr(&dir, Duration::ZERO);
        let before = secrets.credentials("hub", "ghcr.io").await.unwrap();
        assert_eq!(
            (before.password.expose(), before.id.as_str()),
            ("one", "hub#1")
        );

        std::fs::write(
            &path,
            json!({"auths": {"ghcr.io": auth("b", "second")}}).to_string(),
        )
        .unwrap();
        let after = secrets.credentials("hub", "ghcr.io").await.unwrap();
        assert_eq!(
            (
                after.username.as_str(),
                after.password.expose(),
                after.id.as_str()
            ),
            ("b", "second", "hub#2")
        );

        std::fs::write(&path, "{\"auths\": ").unwrap();
        let err = refusal(&secrets, "hub", "ghcr.io").await;
        assert!(
            err.starts_with("secret `hub`: file is not valid JSON: unexpected end of file"),
            "{err}"
        );
        assert_eq!(secrets.select("ghcr.io", "x", None), None);

        std::fs::remove_file(&path).unwrap();
        let err = refusal(&secrets, "hub", "ghcr.io").await;
        assert!(
            err.starts_with(&format!("secret `hub`: cannot read {}", path.display())),
            "{err}"
        );

        std::fs::write(
            &path,
            json!({"auths": {"quay.io": auth("c", "third")}}).to_string(),
        )
        .unwrap();
        assert_eq!(secrets.select("quay.io", "x", None).as_deref(), Some("hub"));
        assert_eq!(
            secrets.credentials("hub", "quay.io").await.unwrap().id,
            "hub#5"
        );
    }

    #[tokio::test]
    async fn files_are_not_checked_more_often_than_the_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (secrets, path) = hub_for_ghcr(&dir, Duration::from_secs(3600));
        std::fs::write(
            &path,
            json!({"auths": {"ghcr.io": auth("b", "second")}}).to_string(),
        )
        .unwrap();
        let login = secrets.credentials("hub", "ghcr.io").await.unwrap();
        assert_eq!(login.password.expose(), "one");
    }

    #[tokio::test]
    async fn debug_and_display_never_show_secret_values() {
        let dir = tempfile::tempdir().unwrap();
        let configs = all_kinds(&dir);
        let secrets = Secrets::new(configs.clone(), transport());
        let hub = secrets.credentials("hub", "ghcr.io").await.unwrap();
        let mut shown = format!("{secrets:?} {configs:?} {hub:?} {}", hub.password);
        for source in &secrets.sources {
            shown.push_str(&format!("{:?}", source.current()));
            if let Err(err) = source.current().1 {
                shown.push_str(&err.to_string());
            }
        }
        assert!(shown.contains("hub") && shown.contains("<redacted>") && shown.contains("gh"));
        for value in ["hunter", "PRIVATE KEY", "MII"] {
            assert!(!shown.contains(value), "{value} shown in {shown}");
        }
    }
}
