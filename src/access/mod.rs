//! Access control: who is asking, and may they pull this repository.
//!
//! `[access] mode = "anonymous"` (the default) lets everyone pull, as a public mirror does.
//! `mode = "policy"` requires every registry request to authenticate as a principal of the
//! principals file, and lets it pull a repository only when the policies allow it:
//!
//! ```text
//! request -> credentials?  none / wrong ........................ 401 + Bearer challenge
//!            Basic (<token>:KEY, EMAIL:KEY) -> principals (keys)  \
//!            Bearer (berth's own JWT)       -> token (signature) -> principal
//!         -> policies: pull on the whole repository? no ........ 403 DENIED
//!         -> token scope covers the repository?        no ...... 401 insufficient_scope
//!         -> handlers (which, for cached content, also check the repository holds it)
//! ```
//!
//! The parts: `config` (the `[access]` keys), `policy` (parse and evaluate policies; `query`,
//! their query language; `policy_error`, what is wrong in one), `principals` (accounts, keys, groups), `files` (both, reloaded on
//! change), `token` (JWTs and their clock), `guard` (slowing down repeated failures),
//! `holdings` (the rule for serving cached content: provenance and holders) and `report` (who
//! may do what to an image). This file holds the state that ties them to requests; the
//! responses are built by `error` (401/403) and `api::token` (the token endpoint).

pub(crate) mod files;
pub(crate) mod guard;
pub mod holdings;
pub mod policy;
mod policy_error;
mod presented;
pub mod principals;
pub(crate) mod query;
pub(crate) mod report;
pub(crate) mod token;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderMap;
use ring::hmac;

use crate::config::PlatformConfig;
pub use crate::config::{AccessConfig, AccessMode};
use crate::route::{self, Target};
use crate::secret::Secret;
use crate::upstream::Upstreams;
pub use files::FilesError;
use files::{Files, Snapshot};
use guard::Guard;
use holdings::Holdings;
use policy::{ImageFacts, Permission, PrincipalLink};
use presented::{presented, Presented};
pub use query::QueryError;
use token::{Claims, Clock, Grant, TokenError, TokenKey, SERVICE};

/// Why a request may not go on. `error` turns it into the 401 or 403 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// No credentials, wrong ones, an expired token, or a token for another repository.
    #[error("{reason}")]
    Unauthenticated {
        /// The `WWW-Authenticate` value telling the client where to get a token.
        challenge: String,
        reason: &'static str,
    },
    #[error("{principal} may not pull {repository}")]
    Denied {
        principal: String,
        repository: String,
    },
    #[error("the token service is off: [access] mode is \"anonymous\"")]
    Off,
    #[error("{0}")]
    Report(String),
}

/// What a request presents, as `authorize` needs it.
pub(crate) struct Asker<'a> {
    pub headers: &'a HeaderMap,
    /// The `Host` (or HTTP/2 authority) the client used; the default token realm is built on it.
    pub host: Option<&'a str>,
    /// The client's address, for slowing down repeated failures.
    pub(crate) peer: Option<IpAddr>,
}

/// An authenticated caller.
struct Caller {
    principal: PrincipalLink,
    /// The key a Basic caller presented (`KeyHash::id`); tokens minted for it carry it.
    key_id: Option<String>,
    /// Present when the caller came with one of berth's tokens, which limits what it reaches.
    token: Option<Claims>,
}

/// Credentials that verified recently are not checked (or slowed down) again for this long.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
const MAX_VERIFIED: u64 = 10_000;

/// The access state every request consults.
pub struct Access {
    mode: AccessMode,
    /// Our org's registry: its repositories are named without the registry in policies.
    own_registry: Option<String>,
    realm: Option<String>,
    /// The default realm's scheme: `https` when berth's listener serves TLS, so clients never
    /// send keys in clear to a host that only speaks TLS.
    realm_scheme: &'static str,
    token_ttl: Duration,
    files: Option<Files>,
    key: TokenKey,
    clock: Clock,
    guard: Guard,
    /// Verified Basic credentials, keyed by an HMAC of them (never the key itself), with the
    /// snapshot generation they were verified against.
    verified: moka::sync::Cache<[u8; 32], (u64, PrincipalLink, String)>,
    verified_key: hmac::Key,
    pub holdings: Arc<Holdings>,
}

impl Access {
    /// Loads the principals and policies (if configured); an error says which file is wrong.
    pub fn open(config: &AccessConfig, platform: &PlatformConfig) -> Result<Access, FilesError> {
        let org = platform.org.as_deref();
        let files = match (&config.principals, &config.policies) {
            (Some(principals), Some(policies)) => Some(Files::open(
                principals,
                policies,
                org,
                config.reload_interval,
            )?),
            _ => None,
        };
        let mut verified_secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut verified_secret);
        Ok(Access {
            mode: config.mode,
            own_registry: platform.own_registry(),
            realm: config.realm.clone(),
            realm_scheme: "http",
            token_ttl: config.token_ttl,
            files,
            key: match &config.token_key {
                Some(secret) => TokenKey::new(secret.expose().as_bytes()),
                None => TokenKey::random(),
            },
            clock: Clock::new(),
            guard: Guard::new(),
            verified: moka::sync::Cache::builder()
                .max_capacity(MAX_VERIFIED)
                .time_to_live(VERIFIED_TTL)
                .build(),
            verified_key: hmac::Key::new(hmac::HMAC_SHA256, &verified_secret),
            holdings: Arc::new(Holdings::new()),
        })
    }

    /// The listener serves TLS (`[tls]`): the default token realm is an `https://` URL.
    pub(crate) fn with_listener_tls(mut self, tls: bool) -> Access {
        self.realm_scheme = if tls { "https" } else { "http" };
        self
    }

    /// Whether access is enforced: principals, policies, and the holdings check on cached
    /// content.
    pub(crate) fn enforcing(&self) -> bool {
        self.mode == AccessMode::Policy
    }

    /// The repository as policies name it: bare in our org's registry, `<registry>/<repository>`
    /// anywhere else.
    pub(crate) fn policy_repository(&self, target: &Target) -> String {
        if self.own_registry.as_deref() == Some(target.upstream.name.as_ref()) {
            target.repository.to_string()
        } else {
            full_name(target)
        }
    }

    /// May the asker pull `target`'s repository? Anonymous mode: yes (`None`). Policy mode: the
    /// principal that may, for the request log.
    pub(crate) async fn authorize(
        &self,
        ask: &Asker<'_>,
        target: &Target,
    ) -> Result<Option<String>, AccessError> {
        let Some(snapshot) = self.snapshot() else {
            return Ok(None);
        };
        let name = full_name(target);
        let scope = format!("repository:{name}:pull");
        let caller = match self.authenticate(ask, &snapshot).await {
            Ok(Some(caller)) => caller,
            Ok(None) => return Err(self.challenge(ask, Some(&scope), "authentication required")),
            Err(reason) => return Err(self.challenge(ask, Some(&scope), reason)),
        };
        if !self.may_pull(&snapshot, &caller.principal, target) {
            tracing::info!(principal = %caller.principal, repository = %name, "pull denied by policy");
            return Err(AccessError::Denied {
                principal: caller.principal.to_string(),
                repository: name,
            });
        }
        tracing::debug!(principal = %caller.principal, repository = %name, "pull authorized");
        if let Some(claims) = &caller.token {
            if !claims.grants_pull(&name) {
                let mut error =
                    self.challenge(ask, Some(&scope), "token does not cover this repository");
                if let AccessError::Unauthenticated { challenge, .. } = &mut error {
                    challenge.push_str(",error=\"insufficient_scope\"");
                }
                return Err(error);
            }
        }
        Ok(Some(caller.principal.to_string()))
    }

    /// `GET /v2/`: in policy mode, only for an authenticated caller (clients learn the token
    /// realm from this 401).
    pub(crate) async fn authorize_ping(&self, ask: &Asker<'_>) -> Result<(), AccessError> {
        let Some(snapshot) = self.snapshot() else {
            return Ok(());
        };
        match self.authenticate(ask, &snapshot).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(self.challenge(ask, None, "authentication required")),
            Err(reason) => Err(self.challenge(ask, None, reason)),
        }
    }

    /// The token endpoint: checks Basic credentials and signs a token granting `pull` on each
    /// requested repository the policies allow (the others are left out, as the distribution
    /// token spec has it; the registry request then answers 403).
    pub(crate) async fn issue_token(
        &self,
        ask: &Asker<'_>,
        scopes: &[String],
        upstreams: &Upstreams,
    ) -> Result<IssuedToken, AccessError> {
        let snapshot = match (self.mode, self.files.as_ref()) {
            (AccessMode::Policy, Some(files)) => files.current(),
            _ => return Err(AccessError::Off),
        };
        let basic_challenge = |reason| AccessError::Unauthenticated {
            challenge: format!("Basic realm=\"{SERVICE}\""),
            reason,
        };
        if matches!(presented(ask.headers), Presented::Bearer(_)) {
            return Err(basic_challenge(
                "the token endpoint takes Basic credentials",
            ));
        }
        let caller = match self.authenticate(ask, &snapshot).await {
            Ok(Some(caller)) => caller,
            Ok(None) => return Err(basic_challenge("credentials required")),
            Err(reason) => return Err(basic_challenge(reason)),
        };
        let mut access: Vec<Grant> = Vec::new();
        for scope in scopes.iter().flat_map(|s| s.split(' ')) {
            let Some(name) = pull_scope(scope) else {
                continue;
            };
            let Ok(target) = route::resolve(upstreams, None, name) else {
                continue;
            };
            let full = full_name(&target);
            if self.may_pull(&snapshot, &caller.principal, &target)
                && !access.iter().any(|grant| grant.name == full)
            {
                access.push(Grant {
                    kind: "repository".into(),
                    name: full,
                    actions: vec!["pull".into()],
                });
            }
        }
        let now = self.clock.unix();
        let mut jti = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut jti);
        let claims = Claims {
            iss: SERVICE.into(),
            aud: SERVICE.into(),
            sub: caller.principal.to_string(),
            kid: caller.key_id.clone().unwrap_or_default(),
            iat: now,
            nbf: now,
            exp: now + self.token_ttl.as_secs(),
            jti: hex::encode(jti),
            access,
        };
        tracing::debug!(principal = %caller.principal, grants = claims.access.len(), "token issued");
        Ok(IssuedToken {
            token: token::issue(&self.key, &claims),
            expires_in: self.token_ttl.as_secs(),
            issued_at: humantime::format_rfc3339_seconds(self.clock.now()).to_string(),
        })
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        match (self.mode, &self.files) {
            (AccessMode::Policy, Some(files)) => Some(files.current()),
            _ => None,
        }
    }

    fn may_pull(&self, snapshot: &Snapshot, principal: &PrincipalLink, target: &Target) -> bool {
        if target.upstream.public {
            return true;
        }
        let repository = self.policy_repository(target);
        let groups = snapshot.principals.groups_of(principal);
        let facts = ImageFacts {
            repository: &repository,
            tag: None,
        };
        policy::permissions(&snapshot.policies, principal, &groups, &facts)
            .contains(Permission::Pull)
    }

    /// Who the credentials belong to: `Ok(None)` without credentials, `Err(reason)` for wrong
    /// ones (counted against the client).
    async fn authenticate(
        &self,
        ask: &Asker<'_>,
        snapshot: &Snapshot,
    ) -> Result<Option<Caller>, &'static str> {
        match presented(ask.headers) {
            Presented::Nothing => Ok(None),
            Presented::Malformed => {
                let _admitted = self.guard.admit(ask.peer, "").await;
                self.guard.fail(ask.peer, "");
                Err("malformed Authorization header")
            }
            Presented::Bearer(token) => self.check_token(ask, snapshot, &token).await.map(Some),
            Presented::Basic { user, key } => {
                self.check_key(ask, snapshot, &user, &key).await.map(Some)
            }
        }
    }

    async fn check_token(
        &self,
        ask: &Asker<'_>,
        snapshot: &Snapshot,
        token: &str,
    ) -> Result<Caller, &'static str> {
        let claims = match token::verify(&self.key, token, self.clock.unix()) {
            Ok(claims) => claims,
            // Tokens expire in normal use; the client fetches a new one. Not a strike.
            Err(TokenError::Expired) => return Err("token expired"),
            Err(_) => {
                // A failing token waits like a failing key, counted against the subject it
                // claims (unverified, so only a name to group failures by).
                let claimed = token::claimed_subject(token).unwrap_or_default();
                let _admitted = self.guard.admit(ask.peer, &claimed).await;
                let failures = self.guard.fail(ask.peer, &claimed);
                tracing::warn!(peer = ?ask.peer, failures, "invalid token");
                return Err("invalid token");
            }
        };
        // A principal removed from the file, or the key that minted the token, loses its tokens
        // at once.
        match PrincipalLink::parse(&claims.sub, None) {
            Ok(principal) if snapshot.principals.has_key(&principal, &claims.kid) => Ok(Caller {
                principal,
                key_id: None,
                token: Some(claims),
            }),
            Ok(principal) if snapshot.principals.contains(&principal) => {
                Err("the key this token was issued for was removed")
            }
            _ => Err("the token's principal no longer exists"),
        }
    }

    async fn check_key(
        &self,
        ask: &Asker<'_>,
        snapshot: &Snapshot,
        user: &str,
        key: &Secret,
    ) -> Result<Caller, &'static str> {
        let mut mac = hmac::Context::with_key(&self.verified_key);
        // Length-prefixed, so no other (user, key) split of the same bytes has the same entry.
        mac.update(&(user.len() as u64).to_be_bytes());
        mac.update(user.as_bytes());
        mac.update(key.expose().as_bytes());
        let cache_key: [u8; 32] = mac.sign().as_ref().try_into().expect("SHA-256 size");
        if let Some((generation, principal, key_id)) = self.verified.get(&cache_key) {
            if generation == snapshot.generation {
                return Ok(Caller {
                    principal,
                    key_id: Some(key_id),
                    token: None,
                });
            }
        }
        // The key is checked first and a correct one answered at once; only a wrong one waits
        // its turn at the guard (`guard` says why that is enough).
        match snapshot.principals.verify(user, key.expose().as_bytes()) {
            Some(verified) => {
                tracing::debug!(principal = %verified.principal, key = ?verified.key_name, "key verified");
                self.verified.insert(
                    cache_key,
                    (
                        snapshot.generation,
                        verified.principal.clone(),
                        verified.key_id.clone(),
                    ),
                );
                Ok(Caller {
                    principal: verified.principal,
                    key_id: Some(verified.key_id),
                    token: None,
                })
            }
            None => {
                let _admitted = self.guard.admit(ask.peer, user).await;
                let failures = self.guard.fail(ask.peer, user);
                let kind = if user == principals::SERVICE_ACCOUNT_USER {
                    "serviceaccount"
                } else {
                    "user"
                };
                tracing::warn!(peer = ?ask.peer, kind, failures, "wrong credentials");
                Err("wrong username or key")
            }
        }
    }

    fn challenge(&self, ask: &Asker<'_>, scope: Option<&str>, reason: &'static str) -> AccessError {
        let realm = match &self.realm {
            Some(realm) => realm.clone(),
            None => {
                let host = ask.host.filter(|h| is_plain_host(h)).unwrap_or("localhost");
                format!("{}://{host}/token", self.realm_scheme)
            }
        };
        let mut challenge = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
        if let Some(scope) = scope {
            challenge.push_str(&format!(",scope=\"{scope}\""));
        }
        AccessError::Unauthenticated { challenge, reason }
    }
}

/// The token endpoint's answer, in the distribution token spec's fields.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct IssuedToken {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

/// `<registry>/<repository>`: the one name of a repository whatever path or `ns` reached it;
/// tokens and challenges use it.
pub(crate) fn full_name(target: &Target) -> String {
    format!("{}/{}", target.upstream.name, target.repository)
}

/// The repository name of a `repository:NAME:ACTIONS` scope that asks for pull (`push` is
/// never granted; berth does not take pushes). NAME may hold a `:port`.
fn pull_scope(scope: &str) -> Option<&str> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    actions
        .split(',')
        .any(|action| action == "pull" || action == "*")
        .then_some(name)
}

/// A Host value safe to put inside a quoted challenge parameter.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use http::header::AUTHORIZATION;

    #[test]
    fn pull_scopes_keep_ports_and_ignore_other_actions() {
        assert_eq!(
            pull_scope("repository:127.0.0.1:5000/team/app:pull"),
            Some("127.0.0.1:5000/team/app")
        );
        assert_eq!(
            pull_scope("repository:library/nginx:pull,push"),
            Some("library/nginx")
        );
        assert_eq!(
            pull_scope("repository:library/nginx:*"),
            Some("library/nginx")
        );
        assert_eq!(pull_scope("repository:library/nginx:push"), None);
        assert_eq!(pull_scope("registry:catalog:*"), None);
    }

    #[test]
    fn credentials_are_read_from_the_authorization_header() {
        let headers = |value: &str| {
            let mut map = HeaderMap::new();
            map.insert(AUTHORIZATION, value.parse().unwrap());
            map
        };
        let basic = base64::engine::general_purpose::STANDARD.encode("<token>:k:with:colons");
        match presented(&headers(&format!("Basic {basic}"))) {
            Presented::Basic { user, key } => {
                assert_eq!((user.as_str(), key.expose()), ("<token>", "k:with:colons"))
            }
            _ => panic!("basic not parsed"),
        }
        assert!(matches!(presented(&headers("bearer abc")), Presented::Bearer(t) if t == "abc"));
        assert!(matches!(
            presented(&headers("Basic !!!")),
            Presented::Malformed
        ));
        assert!(matches!(
            presented(&headers("Digest x")),
            Presented::Malformed
        ));
        assert!(matches!(presented(&HeaderMap::new()), Presented::Nothing));
    }

    const MALLORY: &str = "mallory-key-0123456789abcdef";
    const ALICE: &str = "alice-key-0123456789abcdef";

    /// Policy-mode access over principals mallory and alice (no policies needed to
    /// authenticate), with `realm` unset.
    fn policy_access(dir: &std::path::Path) -> Access {
        let hash = |key| principals::KeyHash::generate(key).to_string();
        let principals = serde_json::json!({"users": [
            {"email": "mallory@example.com", "keys": [{"hash": hash(MALLORY)}]},
            {"email": "alice@example.com", "keys": [{"hash": hash(ALICE)}]},
        ]});
        std::fs::write(dir.join("principals.json"), principals.to_string()).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let config = AccessConfig {
            mode: AccessMode::Policy,
            principals: Some(dir.join("principals.json")),
            policies: Some(dir.join("policies")),
            ..AccessConfig::default()
        };
        Access::open(&config, &PlatformConfig::default()).unwrap()
    }

    fn basic(user: &str, key: &str) -> HeaderMap {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"));
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, format!("Basic {encoded}").parse().unwrap());
        headers
    }

    async fn login(access: &Access, headers: &HeaderMap, peer: IpAddr) -> bool {
        let ask = Asker {
            headers,
            host: Some("berth.local"),
            peer: Some(peer),
        };
        let snapshot = access.snapshot().unwrap();
        matches!(access.authenticate(&ask, &snapshot).await, Ok(Some(_)))
    }

    #[tokio::test(start_paused = true)]
    async fn failures_behind_one_address_hold_up_neither_other_principals_nor_correct_keys() {
        let dir = tempfile::tempdir().unwrap();
        let access = policy_access(dir.path());
        // A NAT: everyone comes from one address. Mallory's client keeps failing.
        let shared = IpAddr::from([10, 0, 0, 1]);
        let wrong = basic("mallory@example.com", "wrong-key-0123456789abcdef");
        for _ in 0..guard::FREE_FAILURES + 3 {
            assert!(!login(&access, &wrong, shared).await);
        }
        // Paused time moves only when something sleeps: no sleep, no wait.
        let before = tokio::time::Instant::now();
        assert!(login(&access, &basic("alice@example.com", ALICE), shared).await);
        assert!(login(&access, &basic("mallory@example.com", MALLORY), shared).await);
        assert_eq!(tokio::time::Instant::now(), before);
        // The failing client itself waits, and so does a failing Bearer token claiming mallory.
        assert!(!login(&access, &wrong, shared).await);
        let waited = tokio::time::Instant::now();
        assert!(waited > before);
        let forged = token::issue(
            &TokenKey::random(),
            &Claims {
                iss: SERVICE.into(),
                aud: SERVICE.into(),
                sub: "mallory@example.com".into(),
                kid: String::new(),
                iat: 0,
                nbf: 0,
                exp: u64::MAX,
                jti: "j".into(),
                access: Vec::new(),
            },
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(AUTHORIZATION, format!("Bearer {forged}").parse().unwrap());
        for _ in 0..guard::FREE_FAILURES + 1 {
            assert!(!login(&access, &bearer, shared).await);
        }
        assert!(tokio::time::Instant::now() > waited);
    }

    #[test]
    fn the_default_realm_follows_the_listener_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let headers = HeaderMap::new();
        let ask = Asker {
            headers: &headers,
            host: Some("berth.local:5443"),
            peer: None,
        };
        let challenge = |access: &Access| match access.challenge(&ask, None, "r") {
            AccessError::Unauthenticated { challenge, .. } => challenge,
            other => panic!("{other:?}"),
        };
        let plain = policy_access(dir.path());
        assert!(challenge(&plain).starts_with("Bearer realm=\"http://berth.local:5443/token\""));
        let tls = policy_access(dir.path()).with_listener_tls(true);
        assert!(challenge(&tls).starts_with("Bearer realm=\"https://berth.local:5443/token\""));
    }

    #[test]
    fn hosts_with_quotes_never_reach_a_challenge() {
        assert!(is_plain_host("berth.local:5000"));
        assert!(is_plain_host("[::1]:5000"));
        assert!(!is_plain_host("evil\",x=\"y"));
        assert!(!is_plain_host(""));
    }
}
