//! Google Cloud secrets (`type = "gcp"`): a service-account key JSON, which Container Registry
//! and Artifact Registry repositories it covers, and the RFC 7523 JWT-bearer exchange that
//! turns it into an OAuth2 access token, presented as Basic `oauth2accesstoken:<token>`.
//!
//! Google also accepts the key itself as Basic `_json_key:<key JSON>`. berth does not send
//! that: it would put the private key on the wire to every token request of every registry,
//! where an access token is scoped, lives an hour, and leaks nothing that outlives it. The
//! exchange costs one request an hour, shared by all pulls. The token endpoint is the key's
//! own `token_uri`, which is also how tests point it at a stand-in.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request};
use http_body_util::Full;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Deserialize;
use tokio::time::Instant;

use super::exchange::{form_encode, refusal, send};
use super::fields::Fields;
use super::token::{Fetched, TokenCache};
use super::{Login, SecretError, Transport};
use crate::secret::Secret;

/// Registry pulls need read access to Cloud Storage and Artifact Registry; `cloud-platform`
/// is the scope Google documents for registry access tokens.
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Where keys without `token_uri` exchange their assertions.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// RFC 7523 assertions may live at most an hour at Google; they are used once, at once.
const ASSERTION_LIFETIME: u64 = 3600;

/// What Google's registries take as the Basic username alongside an access token.
const TOKEN_USERNAME: &str = "oauth2accesstoken";

#[derive(Debug)]
pub(super) struct GcpKey {
    project_id: String,
    issuer: Arc<Issuer>,
}

/// Everything needed to mint an assertion, shared with the (detached) token fetch.
#[derive(Debug)]
struct Issuer {
    client_email: String,
    /// Sent as the JWT `kid` so Google checks the right one of the account's keys first.
    private_key_id: Option<String>,
    token_uri: String,
    key: SigningKey,
}

struct SigningKey(RsaKeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl GcpKey {
    pub fn parse(doc: &Fields<'_>) -> Result<GcpKey, SecretError> {
        match doc.string("type")? {
            "service_account" => {}
            _ => return Err(doc.error("type", "must be \"service_account\"")),
        }
        let pem = doc.string("private_key")?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
            doc.error(
                "private_key",
                "is not a PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----)",
            )
        })?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|rejected| {
            doc.error(
                "private_key",
                format!("is not a usable RSA key ({rejected})"),
            )
        })?;
        let token_uri = doc
            .optional_string("token_uri")?
            .unwrap_or(DEFAULT_TOKEN_URI);
        let uri = token_uri
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.host().is_some());
        let Some(uri) = uri else {
            return Err(doc.error("token_uri", "is not an absolute URL"));
        };
        // The assertion is a bearer credential for an hour: it travels over TLS only.
        if uri.scheme_str() != Some("https") {
            return Err(doc.error("token_uri", "must be an https URL"));
        }
        Ok(GcpKey {
            project_id: doc.string("project_id")?.to_string(),
            issuer: Arc::new(Issuer {
                client_email: doc.string("client_email")?.to_string(),
                private_key_id: doc.optional_string("private_key_id")?.map(str::to_string),
                token_uri: token_uri.to_string(),
                key: SigningKey(key),
            }),
        })
    }

    /// Whether `registry/repository` is in the key's project on Container Registry
    /// (`gcr.io/PROJECT/...`, `us.gcr.io/...`) or Artifact Registry
    /// (`REGION-docker.pkg.dev/PROJECT/...`).
    pub fn covers(&self, registry: &str, repository: &str) -> bool {
        is_google_registry(&registry.to_ascii_lowercase())
            && in_project(repository, &self.project_id)
    }

    /// `oauth2accesstoken` and a current access token, through the source's cache.
    pub async fn login(
        &self,
        name: &str,
        logins: &TokenCache<Login>,
        generation: u64,
        transport: &Transport,
    ) -> Result<(Login, u64), SecretError> {
        let issuer = Arc::clone(&self.issuer);
        let name = name.to_string();
        let transport = transport.clone();
        let fetch = move || async move {
            issuer
                .access_token(&transport)
                .await
                .map_err(|reason| SecretError::Exchange {
                    name,
                    service: "GCP token endpoint",
                    reason,
                })
        };
        let key = format!("{generation}:access-token");
        logins.get(&key, Instant::now(), fetch).await
    }
}

fn is_google_registry(host: &str) -> bool {
    let artifact_registry = host
        .strip_suffix("-docker.pkg.dev")
        .is_some_and(|region| !region.is_empty() && !region.contains('.'));
    host == "gcr.io" || host.ends_with(".gcr.io") || artifact_registry
}

/// Domain-scoped projects (`example.com:proj`) appear in image paths as `example.com/proj`.
fn in_project(repository: &str, project_id: &str) -> bool {
    let path = project_id.replacen(':', "/", 1);
    repository
        .strip_prefix(path.as_str())
        .is_some_and(|rest| rest.starts_with('/'))
}

impl Issuer {
    /// The RS256-signed JWT assertion of RFC 7523 section 2.1, issued at `now`.
    fn assertion(&self, now: SystemTime) -> Result<String, String> {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| "system clock before 1970".to_string())?
            .as_secs();
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = kid.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME,
        });
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.0.public().modulus_len()];
        self.key
            .0
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the assertion failed".to_string())?;
        Ok(format!("{signing_input}.{}", b64.encode(signature)))
    }

    /// Exchanges a fresh assertion at `token_uri` for an access token.
    async fn access_token(&self, transport: &Transport) -> Result<Fetched<Login>, String> {
        let assertion = self.assertion(SystemTime::now())?;
        let body = form_encode(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", &assertion),
        ]);
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.token_uri)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "token_uri is not a usable URL".to_string())?;
        let (status, body) = send(transport, request).await?;
        if !status.is_success() {
            let error = serde_json::from_slice::<OAuthError>(&body).ok();
            return Err(refusal(
                status,
                &[
                    error.as_ref().and_then(|e| e.error.as_deref()),
                    error.as_ref().and_then(|e| e.error_description.as_deref()),
                ],
            ));
        }
        let token: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| "token endpoint answer has no access_token".to_string())?;
        Ok(Fetched {
            value: Login {
                username: TOKEN_USERNAME.to_string(),
                password: Secret::new(token.access_token),
            },
            lifetime: Duration::from_secs(token.expires_in),
        })
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    /// Seconds; Google sends 3599. RFC 6749 makes it optional, so assume a conservative minute.
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}

fn default_expires_in() -> u64 {
    60
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A service-account key JSON for `private_key_pem`.
    pub fn key_json(private_key_pem: &str, project: &str, token_uri: &str) -> Value {
        json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": "0123abcd",
            "private_key": private_key_pem,
            "client_email": format!("puller@{project}.iam.gserviceaccount.com"),
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        })
    }

    /// A test RSA key: the private half as PKCS#8 PEM, the public half to verify with (by the
    /// `rsa` crate, independently of the `ring` signer). Made once per test run, so no private
    /// key is committed.
    pub struct TestKey {
        pub private_pem: String,
        verifying: rsa::pkcs1v15::VerifyingKey<rsa::sha2::Sha256>,
    }

    pub fn rsa_key() -> &'static TestKey {
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        use rsa::Generate;
        static KEY: std::sync::OnceLock<TestKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| {
            let key = rsa::PrivateKey::generate();
            TestKey {
                private_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
                verifying: rsa::pkcs1v15::VerifyingKey::new(key.to_public_key()),
            }
        })
    }

    /// Checks an RS256 signature against `rsa_key()`.
    fn verify_rs256(message: &[u8], signature: &[u8]) -> Result<(), String> {
        let signature =
            rsa::pkcs1v15::Signature::try_from(signature).map_err(|e| format!("signature: {e}"))?;
        rsa::signature::Verifier::verify(&rsa_key().verifying, message, &signature)
            .map_err(|_| "signature does not verify".to_string())
    }

    fn parse(doc: Value) -> Result<GcpKey, SecretError> {
        GcpKey::parse(&Fields::root("gcp", &doc)?)
    }

    fn test_key(project: &str) -> GcpKey {
        let pem = rsa_key().private_pem.clone();
        parse(key_json(
            &pem,
            project,
            "https://oauth2.googleapis.com/token",
        ))
        .unwrap()
    }

    #[test]
    fn covers_gcr_and_artifact_registry_repositories_of_its_project() {
        let key = test_key("my-proj");
        let cases = [
            ("gcr.io", "my-proj/app", true),
            ("us.gcr.io", "my-proj/team/app", true),
            ("eu.gcr.io", "my-proj/app", true),
            ("europe-west1-docker.pkg.dev", "my-proj/repo/app", true),
            ("us-docker.pkg.dev", "my-proj/repo/app", true),
            ("gcr.io", "my-proj", false),
            ("gcr.io", "my-proj2/app", false),
            ("gcr.io", "other/app", false),
            ("docker.io", "my-proj/app", false),
            ("evil.com", "my-proj/app", false),
            ("gcr.io.evil.com", "my-proj/app", false),
            ("a.b-docker.pkg.dev", "my-proj/repo/app", false),
            ("docker.pkg.dev", "my-proj/repo/app", false),
        ];
        for (registry, repository, expected) in cases {
            assert_eq!(
                key.covers(registry, repository),
                expected,
                "{registry}/{repository}"
            );
        }
        let domain = test_key("example.com:proj");
        assert!(domain.covers("gcr.io", "example.com/proj/app"));
        assert!(!domain.covers("gcr.io", "proj/app"));
    }

    #[test]
    fn the_assertion_is_an_rs256_jwt_with_the_rfc7523_claims() {
        let key = test_key("p");
        let jwt = key
            .issuer
            .assertion(SystemTime::UNIX_EPOCH + Duration::from_secs(1000))
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            header,
            json!({"alg": "RS256", "typ": "JWT", "kid": "0123abcd"})
        );
        assert_eq!(claims["iss"], "puller@p.iam.gserviceaccount.com");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(
            (claims["iat"].as_u64(), claims["exp"].as_u64()),
            (Some(1000), Some(4600))
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        verify_rs256(signed.as_bytes(), &b64.decode(parts[2]).unwrap())
            .expect("signature verifies with the public key");
    }

    #[test]
    fn malformed_keys_name_the_secret_and_field_never_the_value() {
        let pem = rsa_key().private_pem.clone();
        let uri = "https://oauth2.googleapis.com/token";
        let with = |field: &str, value: Value| {
            let mut doc = key_json(&pem, "p", uri);
            doc[field] = value;
            doc
        };
        let without = |field: &str| {
            let mut doc = key_json(&pem, "p", uri);
            doc.as_object_mut().unwrap().remove(field);
            doc
        };
        let garbled = pem.replace("MII", "hunter2");
        let pkcs1 =
            "-----BEGIN RSA PRIVATE KEY-----\naHVudGVyMg==\n-----END RSA PRIVATE KEY-----\n";
        let not_rsa = "-----BEGIN PRIVATE KEY-----\naHVudGVyMg==\n-----END PRIVATE KEY-----\n";
        let cases = [
            (without("private_key"), "field `private_key` is missing"),
            (without("client_email"), "field `client_email` is missing"),
            (without("project_id"), "field `project_id` is missing"),
            (without("type"), "field `type` is missing"),
            (
                with("type", json!("authorized_user")),
                "field `type` must be \"service_account\"",
            ),
            (
                with("private_key", json!(42)),
                "field `private_key` must be a string, not a number",
            ),
            (
                with("private_key", json!("hunter2")),
                "field `private_key` is not a PEM PKCS#8",
            ),
            (
                with("private_key", json!(garbled)),
                "field `private_key` is not",
            ),
            (
                with("private_key", json!(pkcs1)),
                "field `private_key` is not a PEM PKCS#8",
            ),
            (
                with("private_key", json!(not_rsa)),
                "field `private_key` is not a usable RSA key",
            ),
            (
                with("token_uri", json!("/token")),
                "field `token_uri` is not an absolute URL",
            ),
            (
                with("token_uri", json!("http://oauth2.example/token")),
                "field `token_uri` must be an https URL",
            ),
            (
                with("token_uri", json!("http://127.0.0.1:8080/token")),
                "field `token_uri` must be an https URL",
            ),
        ];
        for (doc, expected) in cases {
            let err = parse(doc).expect_err(expected).to_string();
            assert!(err.starts_with("secret `gcp`: "), "{err}");
            assert!(err.contains(expected), "{err} should contain {expected}");
            assert!(
                !err.contains("hunter2") && !err.contains("PRIVATE KEY-----\nMII"),
                "{err}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let key = test_key("p");
        let debug = format!("{key:?}");
        assert!(
            debug.contains("puller@p.iam") && debug.contains("<redacted>"),
            "{debug}"
        );
        assert!(
            !debug.contains("PRIVATE") && !debug.contains("MII"),
            "{debug}"
        );
    }
}
