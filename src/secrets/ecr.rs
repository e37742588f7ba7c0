//! Amazon ECR secrets (`type = "ecr"`): the key file, which registry hosts and repositories it
//! covers, and turning it into registry credentials (optional STS `AssumeRole`, then
//! `GetAuthorizationToken` in the registry's region, cached until shortly before expiry).
//!
//! The key file is `{"accessKey", "secretKey", "repos": [...], "roleArn"?, "externalId"?}`.
//! `repos` entries take three forms, so one list can be as broad or as narrow as wanted:
//! - `ACCOUNT.dkr.ecr.REGION.amazonaws.com/team/app`: that repository in that registry only;
//!   `ACCOUNT.dkr.ecr.REGION.amazonaws.com/team/*` everything under `team/` there, and a bare
//!   `ACCOUNT.dkr.ecr.REGION.amazonaws.com` (or `.../*`) every repository of that registry.
//! - `team/app`, `team/*`, `*`: the same repository names in any ECR registry (any account,
//!   any region), for keys whose IAM policy is what really scopes them.
//!
//! The signing and the wire format are in `aws`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::aws::{self, AwsCredentials};
use super::exchange::ExchangeError;
use super::fields::Fields;
use super::token::{Fetched, TokenCache};
use super::{Login, SecretConfig, SecretError, Transport};
use crate::secret::Secret;

#[derive(Debug)]
pub(super) struct EcrKey {
    credentials: AwsCredentials,
    role: Option<Role>,
    repos: Vec<RepoPattern>,
    /// Exchanges that failed lately, by region, so a burst of requests (or of region labels a
    /// client made up) does not become a burst of STS and ECR calls.
    failures: Mutex<HashMap<String, (Instant, SecretError)>>,
}

/// How long a failed exchange is answered from memory.
const FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// Regions remembered at most; the map is emptied when full.
const MAX_FAILURES: usize = 256;

/// A role to assume before asking ECR, for keys that may only assume a pull role.
#[derive(Debug, Clone)]
struct Role {
    arn: String,
    /// The "confused deputy" guard a role's trust policy may require; kept hidden because
    /// some operators treat it as a shared secret.
    external_id: Option<Secret>,
}

#[derive(Debug, PartialEq, Eq)]
struct RepoPattern {
    /// Lowercase registry host; `None` matches every ECR registry.
    registry: Option<String>,
    repository: RepoMatch,
}

#[derive(Debug, PartialEq, Eq)]
enum RepoMatch {
    All,
    /// Repositories under this prefix (stored with its trailing `/`).
    Under(String),
    Exact(String),
}

/// An ECR registry host, `ACCOUNT.dkr.ecr[-fips].REGION.amazonaws.com[.cn]`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct EcrHost<'a> {
    pub account: &'a str,
    pub region: &'a str,
    fips: bool,
    /// `amazonaws.com`, or `amazonaws.com.cn` in the China partition.
    dns_suffix: &'a str,
}

pub(super) fn parse_host(host: &str) -> Option<EcrHost<'_>> {
    let (rest, dns_suffix) = if let Some(rest) = host.strip_suffix(".amazonaws.com") {
        (rest, "amazonaws.com")
    } else {
        (host.strip_suffix(".amazonaws.com.cn")?, "amazonaws.com.cn")
    };
    let mut labels = rest.split('.');
    let account = labels.next()?;
    let dkr = labels.next()?;
    let service = labels.next()?;
    let region = labels.next()?;
    let well_formed = labels.next().is_none()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && dkr == "dkr"
        && matches!(service, "ecr" | "ecr-fips")
        && is_aws_region(region);
    well_formed.then_some(EcrHost {
        account,
        region,
        fips: service == "ecr-fips",
        dns_suffix,
    })
}

/// AWS's region grammar: `us-east-1`, `ap-southeast-2`, `us-gov-west-1`, `us-isob-east-1`,
/// `eusc-de-east-1`: a 2-4 letter area, one or two lower-case words, a number of 1-2 digits.
fn is_aws_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let letters = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    (3..=4).contains(&parts.len())
        && (2..=4).contains(&first.len())
        && letters(first)
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| letters(p) && p.len() <= 9)
        && (1..=2).contains(&last.len())
        && last.bytes().all(|b| b.is_ascii_digit())
}

impl EcrKey {
    pub fn parse(doc: &Fields<'_>) -> Result<EcrKey, SecretError> {
        let credentials = AwsCredentials {
            access_key_id: doc.string("accessKey")?.to_string(),
            secret_access_key: Secret::new(doc.string("secretKey")?),
            session_token: None,
        };
        let role = match doc.optional_string("roleArn")? {
            Some(arn) if !arn.starts_with("arn:") => {
                return Err(doc.error("roleArn", "must be an ARN (arn:aws:iam::ACCOUNT:role/NAME)"))
            }
            Some(arn) => Some(Role {
                arn: arn.to_string(),
                external_id: doc.optional_string("externalId")?.map(Secret::new),
            }),
            None if doc.optional_string("externalId")?.is_some() => {
                return Err(doc.error("externalId", "needs `roleArn`"))
            }
            None => None,
        };
        let repos = doc
            .strings("repos")?
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                RepoPattern::parse(entry)
                    .map_err(|problem| doc.item_error("repos", i, problem.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(EcrKey {
            credentials,
            role,
            repos,
            failures: Mutex::default(),
        })
    }

    /// Whether `registry` is an ECR host and `repository` is in `repos`.
    pub fn covers(&self, registry: &str, repository: &str) -> bool {
        let registry = registry.to_ascii_lowercase();
        parse_host(&registry).is_some()
            && self.repos.iter().any(|p| p.matches(&registry, repository))
    }

    /// Registry credentials for `registry`: `AWS` and the password from
    /// `GetAuthorizationToken` in its region, through the source's caches (`sessions`, `logins`).
    pub async fn login(
        &self,
        config: &SecretConfig,
        sessions: &Arc<TokenCache<AwsCredentials>>,
        logins: &TokenCache<Login>,
        generation: u64,
        registry: &str,
        transport: &Transport,
    ) -> Result<(Login, u64), SecretError> {
        let name = config.name.clone();
        let registry = registry.to_ascii_lowercase();
        let host = parse_host(&registry).ok_or_else(|| SecretError::NotFor {
            name: name.clone(),
            registry: registry.clone(),
            reason: "not an ECR host (ACCOUNT.dkr.ecr.REGION.amazonaws.com)".into(),
        })?;
        let region = host.region.to_string();
        if let Some(error) = self.remembered_failure(&region) {
            return Err(error);
        }
        let ecr_endpoint = endpoint(config.ecr_endpoint.as_deref(), &host, "api.ecr");
        let sts_endpoint = endpoint(config.sts_endpoint.as_deref(), &host, "sts");
        let now = Instant::now();
        let cache_key = format!("{generation}:{region}");
        let sessions = Arc::clone(sessions);
        let base = self.credentials.clone();
        let role = self.role.clone();
        let transport = transport.clone();
        let fetch = move || async move {
            let signing = match role {
                None => base,
                Some(role) => {
                    let fetch_session = {
                        let (transport, name, region) =
                            (transport.clone(), name.clone(), region.clone());
                        move || assume(transport, name, sts_endpoint, region, base, role)
                    };
                    sessions.get(&cache_key, now, fetch_session).await?.0
                }
            };
            let (login, lifetime) =
                aws::authorization_token(&transport, &ecr_endpoint, &region, &signing)
                    .await
                    .map_err(|reason| exchange_error(&name, "ECR GetAuthorizationToken", reason))?;
            let (username, password) = login;
            Ok(Fetched {
                value: Login { username, password },
                lifetime,
            })
        };
        let result = logins
            .get(&format!("{generation}:{}", host.region), now, fetch)
            .await;
        if let Err(error) = &result {
            let mut failures = self.failures.lock().expect("failures lock");
            if failures.len() >= MAX_FAILURES {
                failures.clear();
            }
            failures.insert(host.region.to_string(), (Instant::now(), error.clone()));
        }
        result
    }

    fn remembered_failure(&self, region: &str) -> Option<SecretError> {
        let failures = self.failures.lock().expect("failures lock");
        let (at, error) = failures.get(region)?;
        (at.elapsed() < FAILURE_MEMORY).then(|| error.clone())
    }
}

async fn assume(
    transport: Transport,
    name: String,
    endpoint: String,
    region: String,
    base: AwsCredentials,
    role: Role,
) -> Result<Fetched<AwsCredentials>, SecretError> {
    let external_id = role.external_id.as_ref().map(|id| id.expose());
    let (session, lifetime) = aws::assume_role(
        &transport,
        &endpoint,
        &region,
        &base,
        &role.arn,
        external_id,
    )
    .await
    .map_err(|reason| exchange_error(&name, "STS AssumeRole", reason))?;
    Ok(Fetched {
        value: session,
        lifetime,
    })
}

fn exchange_error(name: &str, service: &'static str, err: ExchangeError) -> SecretError {
    SecretError::Exchange {
        name: name.to_string(),
        service,
        reason: err.to_string(),
    }
}

/// The configured endpoint (with `{region}` replaced), or AWS's regional one for `service`
/// (`api.ecr` or `sts`). Regional STS rather than the global endpoint: AWS recommends it, and
/// it keeps working when us-east-1 does not.
fn endpoint(configured: Option<&str>, host: &EcrHost<'_>, service: &str) -> String {
    if let Some(url) = configured {
        return url.replace("{region}", host.region);
    }
    let service = match (service, host.fips) {
        ("api.ecr", true) => "ecr-fips",
        (other, _) => other,
    };
    format!("https://{service}.{}.{}", host.region, host.dns_suffix)
}

/// Why an entry of `repos` is not a repository pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RepoPatternError {
    #[error(
        "names registry {0:?}, which is not an ECR host (ACCOUNT.dkr.ecr.REGION.amazonaws.com)"
    )]
    NotEcr(String),
    #[error("is empty")]
    Empty,
    #[error("may use `*` only as a whole last path component")]
    Wildcard,
}

impl RepoPattern {
    fn parse(entry: &str) -> Result<RepoPattern, RepoPatternError> {
        let entry = entry.trim();
        let (registry, repository) = match entry.split_once('/') {
            Some((first, rest)) if first.contains('.') => (Some(first), rest),
            None if entry.contains('.') => (Some(entry), "*"),
            _ => (None, entry),
        };
        let registry = match registry {
            Some(host) if parse_host(&host.to_ascii_lowercase()).is_none() => {
                return Err(RepoPatternError::NotEcr(host.to_string()))
            }
            other => other.map(str::to_ascii_lowercase),
        };
        let repository = match repository {
            "" => return Err(RepoPatternError::Empty),
            "*" => RepoMatch::All,
            prefix if prefix.ends_with("/*") => {
                RepoMatch::Under(prefix.trim_end_matches('*').to_string())
            }
            name if name.contains('*') => return Err(RepoPatternError::Wildcard),
            name => RepoMatch::Exact(name.to_string()),
        };
        Ok(RepoPattern {
            registry,
            repository,
        })
    }

    fn matches(&self, registry: &str, repository: &str) -> bool {
        if self.registry.as_deref().is_some_and(|r| r != registry) {
            return false;
        }
        match &self.repository {
            RepoMatch::All => true,
            RepoMatch::Under(prefix) => repository.starts_with(prefix.as_str()),
            RepoMatch::Exact(name) => repository == name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const HOST: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";

    fn parse(doc: Value) -> Result<EcrKey, SecretError> {
        EcrKey::parse(&Fields::root("aws", &doc)?)
    }

    fn key(repos: &[&str]) -> EcrKey {
        parse(json!({"accessKey": "AKID", "secretKey": "hunter2", "repos": repos})).unwrap()
    }

    #[test]
    fn parses_registry_hosts() {
        assert_eq!(
            parse_host(HOST),
            Some(EcrHost {
                account: "123456789012",
                region: "eu-west-1",
                fips: false,
                dns_suffix: "amazonaws.com"
            })
        );
        let cn = parse_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").unwrap();
        assert_eq!(
            (cn.region, cn.dns_suffix),
            ("cn-north-1", "amazonaws.com.cn")
        );
        assert!(
            parse_host("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com")
                .unwrap()
                .fips
        );
        for not_ecr in [
            "docker.io",
            "12345.dkr.ecr.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.com",
            "123456789012.dkr.s3.eu-west-1.amazonaws.com",
            "x.123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecr.x.amazonaws.com",
            "123456789012.dkr.ecr.localhost-1.amazonaws.com",
            "123456789012.dkr.ecr.us-east-999.amazonaws.com",
            "123456789012.dkr.ecr.us--1.amazonaws.com",
            "123456789012.dkr.ecr.a-b-c-d-1.amazonaws.com",
        ] {
            assert_eq!(parse_host(not_ecr), None, "{not_ecr}");
        }
    }

    #[test]
    fn regions_follow_the_aws_grammar() {
        for region in [
            "us-east-1",
            "eu-west-1",
            "ap-southeast-2",
            "us-gov-west-1",
            "us-isob-east-1",
            "cn-north-1",
            "il-central-1",
            "eusc-de-east-1",
        ] {
            assert!(is_aws_region(region), "{region}");
        }
        for region in [
            "",
            "us",
            "us-1",
            "east-1",
            "us-east",
            "US-east-1",
            "us-east-123",
        ] {
            assert!(!is_aws_region(region), "{region}");
        }
    }

    #[test]
    fn repos_match_by_full_name_by_repository_name_and_by_prefix() {
        let other = "210987654321.dkr.ecr.us-east-1.amazonaws.com";
        let cases: &[(&[&str], &str, &str, bool)] = &[
            (
                &["123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app"],
                HOST,
                "team/app",
                true,
            ),
            (
                &["123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app"],
                other,
                "team/app",
                false,
            ),
            (
                &["123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app"],
                HOST,
                "team/api",
                false,
            ),
            (&["team/app"], HOST, "team/app", true),
            (&["team/app"], other, "team/app", true),
            (&["team/app"], HOST, "team/app2", false),
            (&["team/*"], HOST, "team/app", true),
            (&["team/*"], HOST, "teams/app", false),
            (&["*"], other, "anything/at/all", true),
            (
                &["123456789012.dkr.ecr.eu-west-1.amazonaws.com"],
                HOST,
                "x",
                true,
            ),
            (
                &["123456789012.dkr.ecr.eu-west-1.amazonaws.com/*"],
                other,
                "x",
                false,
            ),
            (&["*"], "docker.io", "library/nginx", false),
            (&[], HOST, "team/app", false),
        ];
        for (repos, registry, repository, expected) in cases {
            assert_eq!(
                key(repos).covers(registry, repository),
                *expected,
                "{repos:?} {registry} {repository}"
            );
        }
        assert!(key(&["TEAM/app"]).covers(&HOST.to_uppercase(), "TEAM/app"));
    }

    #[test]
    fn endpoints_default_to_the_registry_region_and_may_be_overridden() {
        let host = parse_host(HOST).unwrap();
        assert_eq!(
            endpoint(None, &host, "api.ecr"),
            "https://api.ecr.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            endpoint(None, &host, "sts"),
            "https://sts.eu-west-1.amazonaws.com"
        );
        let cn = parse_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").unwrap();
        assert_eq!(
            endpoint(None, &cn, "sts"),
            "https://sts.cn-north-1.amazonaws.com.cn"
        );
        let fips = parse_host("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com").unwrap();
        assert_eq!(
            endpoint(None, &fips, "api.ecr"),
            "https://ecr-fips.us-east-1.amazonaws.com"
        );
        assert_eq!(
            endpoint(Some("http://127.0.0.1:9/{region}"), &host, "sts"),
            "http://127.0.0.1:9/eu-west-1"
        );
    }

    #[test]
    fn malformed_keys_name_the_secret_and_field_never_the_value() {
        let cases = [
            (
                json!({"secretKey": "hunter2", "repos": []}),
                "field `accessKey` is missing",
            ),
            (
                json!({"accessKey": "A", "repos": []}),
                "field `secretKey` is missing",
            ),
            (
                json!({"accessKey": "A", "secretKey": "hunter2"}),
                "field `repos` is missing",
            ),
            (
                json!({"accessKey": "A", "secretKey": 12345, "repos": []}),
                "field `secretKey` must be a string, not a number",
            ),
            (
                json!({"accessKey": "A", "secretKey": "hunter2", "repos": "team/app"}),
                "field `repos` must be an array of strings, not a string",
            ),
            (
                json!({"accessKey": "A", "secretKey": "hunter2", "repos": ["ok", "quay.io/x"]}),
                "field `repos[1]` names registry \"quay.io\", which is not an ECR host",
            ),
            (
                json!({"accessKey": "A", "secretKey": "hunter2", "repos": ["te*m/app"]}),
                "field `repos[0]` may use `*` only",
            ),
            (
                json!({"accessKey": "A", "secretKey": "hunter2", "repos": [], "roleArn": "pull"}),
                "field `roleArn` must be an ARN",
            ),
            (
                json!({"accessKey": "A", "secretKey": "hunter2", "repos": [], "externalId": "x"}),
                "field `externalId` needs `roleArn`",
            ),
        ];
        for (doc, expected) in cases {
            let err = parse(doc).expect_err(expected).to_string();
            assert!(err.starts_with("secret `aws`: "), "{err}");
            assert!(err.contains(expected), "{err} should contain {expected}");
            assert!(!err.contains("hunter2") && !err.contains("12345"), "{err}");
        }
    }

    #[test]
    fn debug_output_hides_the_secret_key_and_external_id() {
        let key = parse(json!({
            "accessKey": "AKID", "secretKey": "hunter2", "repos": ["*"],
            "roleArn": "arn:aws:iam::123456789012:role/pull", "externalId": "hunter3"
        }))
        .unwrap();
        let debug = format!("{key:?}");
        assert!(
            debug.contains("AKID") && debug.contains("role/pull"),
            "{debug}"
        );
        assert!(
            !debug.contains("hunter2") && !debug.contains("hunter3"),
            "{debug}"
        );
    }
}
