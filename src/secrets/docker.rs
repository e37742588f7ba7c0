//! Docker `config.json` secrets (`type = "docker"`): the `auths` map that `docker login` writes
//! and Kubernetes mounts from a `kubernetes.io/dockerconfigjson` Secret, and the registry-host
//! normalisation that decides which entry applies to a request.
//!
//! Only static username/password pairs live here: nothing is fetched. Credential helpers
//! (`credsStore`, `credHelpers`) and `identitytoken` are not supported, since they need a
//! program or an interactive login that a proxy cannot run.

use base64::Engine;

use super::fields::Fields;
use super::SecretError;
use crate::secret::Secret;

/// Every registry login in one docker secret.
#[derive(Debug)]
pub(super) struct DockerAuths {
    entries: Vec<DockerLogin>,
}

#[derive(Debug)]
pub(super) struct DockerLogin {
    /// The `auths` key, normalised by `normalise_registry`.
    pub registry: String,
    pub username: String,
    pub password: Secret,
}

impl DockerAuths {
    /// Parses `{"auths": {"<host>": {"username", "password"} | {"auth": base64(user:pass)}}}`.
    pub fn parse(doc: &Fields<'_>) -> Result<DockerAuths, SecretError> {
        let auths = doc.object("auths")?;
        let mut entries = Vec::new();
        for key in auths.keys() {
            let entry = auths.object(key)?;
            let (username, password) = login(&entry)?;
            entries.push(DockerLogin {
                registry: normalise_registry(key),
                username,
                password,
            });
        }
        if entries.is_empty() {
            return Err(doc.error("auths", "holds no registry"));
        }
        Ok(DockerAuths { entries })
    }

    /// Whether this secret has a login for `registry` (a host as image references spell it).
    pub fn covers(&self, registry: &str) -> bool {
        self.login_for(registry).is_some()
    }

    /// The login for `registry`, and only for it: a login goes to no registry its `auths` key
    /// does not name, even from an upstream that names this secret (on a pattern upstream, a
    /// client chooses the host).
    pub(crate) fn for_upstream(&self, registry: &str) -> Option<&DockerLogin> {
        self.login_for(registry)
    }

    fn login_for(&self, registry: &str) -> Option<&DockerLogin> {
        let registry = normalise_registry(registry);
        self.entries.iter().find(|e| e.registry == registry)
    }
}

/// One `auths` entry: `auth` wins over `username`/`password`, as in the docker CLI.
fn login(entry: &Fields<'_>) -> Result<(String, Secret), SecretError> {
    if let Some(auth) = entry.optional_string("auth")? {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| entry.error("auth", "is not valid base64"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| entry.error("auth", "does not decode to UTF-8 text"))?;
        return match decoded.split_once(':') {
            Some((user, password)) if !user.is_empty() => {
                Ok((user.to_string(), Secret::new(password)))
            }
            _ => Err(entry.error("auth", "does not decode to `username:password`")),
        };
    }
    let username = entry.optional_string("username")?;
    let password = entry.optional_string("password")?;
    match (username, password) {
        (Some(user), Some(password)) => Ok((user.to_string(), Secret::new(password))),
        (None, _) => Err(entry.error("username", "is missing (and there is no `auth`)")),
        (Some(_), None) => Err(entry.error("password", "is missing (and there is no `auth`)")),
    }
}

/// The registry host a docker `auths` key or a request means, in one spelling: lowercase, no
/// scheme, no path, and Docker Hub's several names folded into `docker.io`.
///
/// `docker login` with no argument still writes the legacy key `https://index.docker.io/v1/`;
/// the Hub serves the API at `registry-1.docker.io`; image references say `docker.io`.
pub(super) fn normalise_registry(key: &str) -> String {
    let key = key.trim().to_ascii_lowercase();
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(&key);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or(without_scheme)
        .trim_end_matches('.');
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(doc: Value) -> Result<DockerAuths, SecretError> {
        DockerAuths::parse(&Fields::root("pull", &doc)?)
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn reads_username_password_and_auth_entries() {
        let auths = parse(json!({"auths": {
            "https://index.docker.io/v1/": {"auth": b64("hubuser:hub:pass")},
            "ghcr.io": {"username": "gh", "password": "ghp_secret"},
            "registry.example.com:5000": {"auth": b64("u:p"), "email": "x@example.com"}
        }}))
        .unwrap();
        let hub = auths.for_upstream("docker.io").unwrap();
        assert_eq!(hub.username, "hubuser");
        assert_eq!(
            hub.password.expose(),
            "hub:pass",
            "split at the first colon only"
        );
        assert_eq!(auths.for_upstream("ghcr.io").unwrap().username, "gh");
        assert!(auths.covers("registry.example.com:5000"));
        assert!(!auths.covers("registry.example.com"));
        assert!(auths.for_upstream("quay.io").is_none());
    }

    #[test]
    fn a_single_login_serves_only_the_registry_it_names() {
        let auths = parse(json!({"auths": {"a.azurecr.io": {"auth": b64("a:b")}}})).unwrap();
        assert!(!auths.covers("b.azurecr.io"));
        assert!(auths.for_upstream("b.azurecr.io").is_none());
        assert_eq!(auths.for_upstream("a.azurecr.io").unwrap().username, "a");
    }

    #[test]
    fn docker_hub_is_one_registry_under_all_its_names() {
        for key in [
            "docker.io",
            "https://index.docker.io/v1/",
            "index.docker.io",
            "registry-1.docker.io",
            "https://registry-1.docker.io/v2/",
            "HTTPS://Index.Docker.IO/v1/",
        ] {
            assert_eq!(normalise_registry(key), "docker.io", "{key}");
        }
        assert_eq!(
            normalise_registry("http://localhost:5000/"),
            "localhost:5000"
        );
        assert_eq!(normalise_registry("Quay.io"), "quay.io");
    }

    #[test]
    fn malformed_entries_name_the_secret_and_field_never_the_value() {
        let cases = [
            (json!({}), "field `auths` is missing"),
            (json!({"auths": {}}), "field `auths` holds no registry"),
            (
                json!({"auths": []}),
                "field `auths` must be an object, not an array",
            ),
            (
                json!({"auths": {"ghcr.io": {"auth": "hunter2!!"}}}),
                "field `auths[\"ghcr.io\"].auth` is not valid base64",
            ),
            (
                json!({"auths": {"ghcr.io": {"auth": b64("hunter2")}}}),
                "field `auths[\"ghcr.io\"].auth` does not decode to `username:password`",
            ),
            (
                json!({"auths": {"ghcr.io": {"password": "hunter2"}}}),
                "field `auths[\"ghcr.io\"].username` is missing",
            ),
            (
                json!({"auths": {"ghcr.io": {"username": "u"}}}),
                "field `auths[\"ghcr.io\"].password` is missing",
            ),
            (
                json!({"auths": {"ghcr.io": {"username": "u", "password": 7}}}),
                "field `auths[\"ghcr.io\"].password` must be a string, not a number",
            ),
        ];
        for (doc, expected) in cases {
            let err = parse(doc).expect_err(expected).to_string();
            assert!(err.starts_with("secret `pull`: "), "{err}");
            assert!(err.contains(expected), "{err} should contain {expected}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn debug_output_hides_passwords() {
        let auths = parse(json!({"auths": {
            "ghcr.io": {"username": "gh", "password": "hunter2"},
            "quay.io": {"auth": b64("q:hunter3")}
        }}))
        .unwrap();
        let debug = format!("{auths:?}");
        assert!(debug.contains("ghcr.io") && debug.contains("<redacted>"));
        assert!(!debug.contains("hunter2") && !debug.contains("hunter3"));
    }
}
