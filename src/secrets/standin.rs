//! In-process stand-ins for STS, the ECR API and a Google token endpoint, strict enough to catch
//! real mistakes: they recompute SigV4 signatures from the known secret key (by hand, with
//! `ring`, independently of `aws-sigv4`) and verify RS256 assertions against the public half of
//! a test RSA key (with the `rsa` crate, independently of the `ring` signer). Then the
//! end-to-end tests of `Secrets::credentials` against them.
//!
//! Test-only. The RSA test keys are generated once per test run (about a second at the
//! dev-dependency opt-level), so no private key is ever committed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::Generate;

use super::{SecretConfig, SecretError, SecretKind, Secrets};

pub struct TestKey {
    pub private_pem: String,
    verifying: rsa::pkcs1v15::VerifyingKey<rsa::sha2::Sha256>,
}

fn generate() -> TestKey {
    let key = rsa::PrivateKey::generate();
    TestKey {
        private_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        verifying: rsa::pkcs1v15::VerifyingKey::new(key.to_public_key()),
    }
}

/// The RSA key the GCP stand-in trusts.
pub fn rsa_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(generate)
}

/// Another key, which the stand-in does not trust.
fn untrusted_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(generate)
}

/// Checks an RS256 (RSASSA-PKCS1-v1_5 with SHA-256) signature against `rsa_key()`.
pub fn verify_rs256(message: &[u8], signature: &[u8]) -> Result<(), String> {
    let signature =
        rsa::pkcs1v15::Signature::try_from(signature).map_err(|e| format!("signature: {e}"))?;
    rsa::signature::Verifier::verify(&rsa_key().verifying, message, &signature)
        .map_err(|_| "signature does not verify".to_string())
}

type Handler = Arc<dyn Fn(&Request<Bytes>, usize) -> Response<Full<Bytes>> + Send + Sync>;

/// An HTTP/1.1 server on 127.0.0.1:0 answering every request with `handler(request, n)`,
/// `n` counting requests from 1. Stops when dropped.
struct StandIn {
    url: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    async fn start(handler: Handler) -> StandIn {
        StandIn::serve(handler, None).await
    }

    /// Over TLS with a certificate for 127.0.0.1 from `test_tls()`'s CA, which `transport()`
    /// trusts: Google's token endpoint must be https.
    async fn start_tls(handler: Handler) -> StandIn {
        let tls = &test_tls().server;
        StandIn::serve(
            handler,
            Some(tokio_rustls::TlsAcceptor::from(Arc::clone(tls))),
        )
        .await
    }

    async fn serve(handler: Handler, tls: Option<tokio_rustls::TlsAcceptor>) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let scheme_tls = tls.is_some();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (handler, counter) = (Arc::clone(&handler), Arc::clone(&counter));
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (handler, counter) = (Arc::clone(&handler), Arc::clone(&counter));
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                            Ok::<_, Infallible>(handler(&Request::from_parts(parts, body), n))
                        }
                    });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        let scheme = if scheme_tls { "https" } else { "http" };
        StandIn {
            url: format!("{scheme}://{addr}"),
            hits,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn header<'a>(req: &'a Request<Bytes>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Who may sign requests to a stand-in AWS service.
#[derive(Clone)]
struct AwsKey {
    access_key: &'static str,
    secret_key: &'static str,
    session_token: Option<&'static str>,
}

/// Recomputes the SigV4 signature of `req` as AWS does (canonical request, string to sign,
/// derived key) and compares it with the one sent. Returns the AWS error code on mismatch.
fn verify_sigv4(
    req: &Request<Bytes>,
    key: &AwsKey,
    region: &str,
    service: &str,
) -> Result<(), &'static str> {
    use ring::{digest, hmac};
    let hex_sha256 = |data: &[u8]| hex::encode(digest::digest(&digest::SHA256, data));
    let auth = header(req, "authorization").ok_or("MissingAuthenticationToken")?;
    let fields = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("IncompleteSignature")?;
    let field = |name: &str| {
        fields
            .split(", ")
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .ok_or("IncompleteSignature")
    };
    let (credential, signed_headers, signature) = (
        field("Credential")?,
        field("SignedHeaders")?,
        field("Signature")?,
    );
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[0] != key.access_key {
        return Err("InvalidClientTokenId");
    }
    if scope[2] != region || scope[3] != service || scope[4] != "aws4_request" {
        return Err("SignatureDoesNotMatch");
    }
    let amz_date = header(req, "x-amz-date").ok_or("IncompleteSignature")?;
    let iso = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &amz_date[0..4],
        &amz_date[4..6],
        &amz_date[6..8],
        &amz_date[9..11],
        &amz_date[11..13],
        &amz_date[13..15]
    );
    let sent = humantime::parse_rfc3339(&iso).map_err(|_| "IncompleteSignature")?;
    let skew = SystemTime::now()
        .duration_since(sent)
        .unwrap_or_else(|e| e.duration());
    if !amz_date.starts_with(scope[1]) || skew > Duration::from_secs(300) {
        return Err("SignatureDoesNotMatch");
    }
    let signed: Vec<&str> = signed_headers.split(';').collect();
    let token = header(req, "x-amz-security-token");
    if token != key.session_token || !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
        return Err("InvalidClientTokenId");
    }
    if token.is_some() && !signed.contains(&"x-amz-security-token") {
        return Err("SignatureDoesNotMatch");
    }
    let mut canonical_headers = String::new();
    for name in &signed {
        let value = header(req, name).ok_or("SignatureDoesNotMatch")?;
        canonical_headers.push_str(&format!("{name}:{}\n", value.trim()));
    }
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method(),
        req.uri().path(),
        req.uri().query().unwrap_or(""),
        hex_sha256(req.body())
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{}/{region}/{service}/aws4_request\n{}",
        scope[1],
        hex_sha256(canonical_request.as_bytes())
    );
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k_date = mac(format!("AWS4{}", key.secret_key).as_bytes(), scope[1]);
    let k_region = mac(k_date.as_ref(), region);
    let k_service = mac(k_region.as_ref(), service);
    let k_signing = mac(k_service.as_ref(), "aws4_request");
    let expected = hex::encode(mac(k_signing.as_ref(), &string_to_sign));
    if expected != signature {
        return Err("SignatureDoesNotMatch");
    }
    Ok(())
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn form_value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

const REGION: &str = "eu-west-1";
const ECR_HOST: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
const ROLE: &str = "arn:aws:iam::123456789012:role/puller";
const BASE_KEY: AwsKey = AwsKey {
    access_key: "AKIDBASEKEY",
    secret_key: "base-secret-key-value",
    session_token: None,
};
const SESSION_KEY: AwsKey = AwsKey {
    access_key: "ASIASESSIONKEY",
    secret_key: "session-secret-key-value",
    session_token: Some("session-token-value+/="),
};

fn sts_error(code: &str) -> Response<Full<Bytes>> {
    let xml = format!("<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>denied by stand-in</Message></Error></ErrorResponse>");
    respond(StatusCode::FORBIDDEN, "text/xml", xml)
}

/// STS `AssumeRole` (Query API) for `ROLE` with `external_id`, granting `SESSION_KEY`.
async fn sts(external_id: &'static str) -> StandIn {
    StandIn::start(Arc::new(move |req, _| {
        if let Err(code) = verify_sigv4(req, &BASE_KEY, REGION, "sts") {
            return sts_error(code);
        }
        let form = form(req.body());
        let ok = form_value(&form, "Action") == Some("AssumeRole")
            && form_value(&form, "Version") == Some("2011-06-15")
            && form_value(&form, "RoleArn") == Some(ROLE)
            && form_value(&form, "RoleSessionName").is_some();
        if !ok || form_value(&form, "ExternalId") != Some(external_id) {
            return sts_error("AccessDenied");
        }
        let expiration = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
        let xml = format!(
            r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>
            <Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>
            <SessionToken>{}</SessionToken><Expiration>{expiration}</Expiration></Credentials>
            </AssumeRoleResult></AssumeRoleResponse>"#,
            SESSION_KEY.access_key,
            SESSION_KEY.secret_key,
            SESSION_KEY.session_token.unwrap()
        );
        respond(StatusCode::OK, "text/xml", xml)
    }))
    .await
}

/// ECR `GetAuthorizationToken` (JSON 1.1) for requests signed by `key`; the n-th token is
/// `AWS:ecr-password-n`, valid for `lifetime`.
async fn ecr(key: AwsKey, lifetime: Duration) -> StandIn {
    StandIn::start(Arc::new(move |req, n| {
        let json_error = |kind: &str| {
            let body = serde_json::json!({"__type": kind, "message": "refused by stand-in"});
            respond(
                StatusCode::BAD_REQUEST,
                "application/x-amz-json-1.1",
                body.to_string(),
            )
        };
        let target = header(req, "x-amz-target");
        if target != Some("AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken")
            || header(req, "content-type") != Some("application/x-amz-json-1.1")
        {
            return json_error("UnknownOperationException");
        }
        if let Err(code) = verify_sigv4(req, &key, REGION, "ecr") {
            let kind = if code == "SignatureDoesNotMatch" {
                "InvalidSignatureException"
            } else {
                "UnrecognizedClientException"
            };
            return json_error(kind);
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("AWS:ecr-password-{n}"));
        let expires = (SystemTime::now() + lifetime)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let body = serde_json::json!({"authorizationData": [{
            "authorizationToken": token,
            "expiresAt": expires.as_secs_f64(),
            "proxyEndpoint": format!("https://{ECR_HOST}"),
        }]});
        respond(
            StatusCode::OK,
            "application/x-amz-json-1.1",
            body.to_string(),
        )
    }))
    .await
}

/// A Google token endpoint accepting assertions signed by `rsa_key()` for `client_email`;
/// the n-th access token is `ya29.token-n`, valid for `expires_in` seconds.
async fn google(client_email: &'static str, expires_in: u64) -> StandIn {
    let audience: Arc<OnceLock<String>> = Arc::default();
    let expected_audience = Arc::clone(&audience);
    let stand_in = StandIn::start_tls(Arc::new(move |req, n| {
        let refuse = |error: &str| {
            let body = serde_json::json!({"error": error, "error_description": "refused by stand-in"});
            respond(StatusCode::BAD_REQUEST, "application/json", body.to_string())
        };
        let form = form(req.body());
        if form_value(&form, "grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
            return refuse("unsupported_grant_type");
        }
        let Some(assertion) = form_value(&form, "assertion") else {
            return refuse("invalid_request");
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = assertion.split('.').collect();
        let [header_b64, claims_b64, signature_b64] = parts[..] else {
            return refuse("invalid_grant");
        };
        let decode = |part: &str| serde_json::from_slice::<serde_json::Value>(&b64.decode(part).ok()?).ok();
        let (Some(jwt_header), Some(claims), Ok(signature)) =
            (decode(header_b64), decode(claims_b64), b64.decode(signature_b64))
        else {
            return refuse("invalid_grant");
        };
        let signed = format!("{header_b64}.{claims_b64}");
        if jwt_header["alg"] != "RS256" || verify_rs256(signed.as_bytes(), &signature).is_err() {
            return refuse("invalid_grant");
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
        let claims_ok = claims["iss"] == client_email
            && claims["aud"].as_str() == expected_audience.get().map(String::as_str)
            && claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
            && exp > now
            && exp <= iat + 3600
            && iat <= now + 60;
        if !claims_ok {
            return refuse("invalid_grant");
        }
        let body = serde_json::json!({"access_token": format!("ya29.token-{n}"), "expires_in": expires_in, "token_type": "Bearer"});
        respond(StatusCode::OK, "application/json", body.to_string())
    }))
    .await;
    audience.set(format!("{}/token", stand_in.url)).unwrap();
    stand_in
}

/// The stand-ins listen on loopback, which the address rule refuses unless allowed; the
/// client trusts the test CA of the TLS stand-in.
pub(super) fn transport() -> super::Transport {
    let config = crate::config::ClientConfig {
        ca_file: Some(test_tls().ca_file.path().to_path_buf()),
        ..crate::config::ClientConfig::default()
    };
    crate::net::HttpClient::new(&config)
        .unwrap()
        .with_rule(crate::net::address::AddressRule::any_internal())
}

/// A test CA (its PEM in a file for `client.ca_file`) and a server config with a certificate
/// for 127.0.0.1 signed by it. Made once per test run.
struct TestTls {
    ca_file: tempfile::NamedTempFile,
    server: Arc<rustls::ServerConfig>,
}

fn test_tls() -> &'static TestTls {
    static TLS: OnceLock<TestTls> = OnceLock::new();
    TLS.get_or_init(|| {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(ca_cert.der());
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        );
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), pem).unwrap();
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key.into())
            .unwrap();
        TestTls {
            ca_file,
            server: Arc::new(server),
        }
    })
}

/// Writes `doc` as the file of a secret called `name` and returns its config.
pub(super) fn secret_file(
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

fn ecr_config(
    dir: &tempfile::TempDir,
    secret_key: &str,
    role: Option<(&str, &str)>,
    sts: Option<&StandIn>,
    ecr: &StandIn,
) -> SecretConfig {
    let mut doc = serde_json::json!({
        "accessKey": BASE_KEY.access_key,
        "secretKey": secret_key,
        "repos": [format!("{ECR_HOST}/team/*")],
    });
    if let Some((arn, external_id)) = role {
        doc["roleArn"] = arn.into();
        doc["externalId"] = external_id.into();
    }
    let mut config = secret_file(dir, "aws", SecretKind::Ecr, &doc);
    config.sts_endpoint = sts.map(|s| s.url.clone());
    config.ecr_endpoint = Some(ecr.url.clone());
    config
}

#[tokio::test]
async fn ecr_key_gets_a_registry_login_signed_with_sigv4() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(12 * 3600)).await;
    let secrets = Secrets::new(
        vec![ecr_config(&dir, BASE_KEY.secret_key, None, None, &ecr)],
        transport(),
    );
    assert_eq!(
        secrets.select(ECR_HOST, "team/app", None).as_deref(),
        Some("aws")
    );
    let login = secrets.credentials("aws", ECR_HOST).await.unwrap();
    assert_eq!(
        (login.username.as_str(), login.password.expose()),
        ("AWS", "ecr-password-1")
    );
    assert!(login.id.starts_with("aws#1."), "{}", login.id);
    let again = secrets.credentials("aws", ECR_HOST).await.unwrap();
    assert_eq!(
        (again.password.expose(), again.id.as_str()),
        ("ecr-password-1", login.id.as_str())
    );
    assert_eq!(ecr.hits(), 1, "a 12-hour token is reused");
}

#[tokio::test]
async fn a_wrong_secret_key_fails_the_signature_check() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(3600)).await;
    let config = ecr_config(&dir, "wrong-secret-key-value", None, None, &ecr);
    let secrets = Secrets::new(vec![config], transport());
    let err = secrets.credentials("aws", ECR_HOST).await.unwrap_err();
    assert!(
        matches!(
            &err,
            SecretError::Exchange {
                service: "ECR GetAuthorizationToken",
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("secret `aws`: ") && text.contains("HTTP 400: InvalidSignatureException"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-secret-key-value") && !format!("{err:?}").contains("wrong-secret")
    );
}

#[tokio::test]
async fn ecr_with_a_role_assumes_it_and_signs_with_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let sts = sts("ext-id-value").await;
    let ecr = ecr(SESSION_KEY, Duration::from_secs(12 * 3600)).await;
    let config = ecr_config(
        &dir,
        BASE_KEY.secret_key,
        Some((ROLE, "ext-id-value")),
        Some(&sts),
        &ecr,
    );
    let secrets = Arc::new(Secrets::new(vec![config], transport()));
    let calls = (0..8).map(|_| {
        let secrets = Arc::clone(&secrets);
        tokio::spawn(async move { secrets.credentials("aws", ECR_HOST).await })
    });
    for call in futures_util::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap().password.expose(), "ecr-password-1");
    }
    assert_eq!(
        (sts.hits(), ecr.hits()),
        (1, 1),
        "concurrent requests share one fetch"
    );
}

#[tokio::test]
async fn a_wrong_external_id_is_refused_by_sts() {
    let dir = tempfile::tempdir().unwrap();
    let sts = sts("ext-id-value").await;
    let ecr = ecr(SESSION_KEY, Duration::from_secs(3600)).await;
    let config = ecr_config(
        &dir,
        BASE_KEY.secret_key,
        Some((ROLE, "other-id")),
        Some(&sts),
        &ecr,
    );
    let secrets = Secrets::new(vec![config], transport());
    let err = secrets
        .credentials("aws", ECR_HOST)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("STS AssumeRole failed: HTTP 403: AccessDenied"),
        "{err}"
    );
    assert_eq!(ecr.hits(), 0);
}

#[tokio::test]
async fn a_failed_exchange_is_remembered_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(3600)).await;
    let config = ecr_config(&dir, "wrong-secret-key-value", None, None, &ecr);
    let secrets = Secrets::new(vec![config], transport());
    for _ in 0..5 {
        assert!(secrets.credentials("aws", ECR_HOST).await.is_err());
    }
    assert_eq!(ecr.hits(), 1, "one refusal, remembered");
}

#[tokio::test]
async fn a_changed_key_file_mints_new_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(12 * 3600)).await;
    let config = ecr_config(&dir, "wrong-secret-key-value", None, None, &ecr);
    let secrets = Secrets::with_recheck(vec![config], transport(), Duration::ZERO);
    assert!(secrets.credentials("aws", ECR_HOST).await.is_err());
    ecr_config(&dir, BASE_KEY.secret_key, None, None, &ecr);
    let login = secrets.credentials("aws", ECR_HOST).await.unwrap();
    assert_eq!(login.password.expose(), "ecr-password-2");
    assert!(login.id.starts_with("aws#2."), "{}", login.id);
}

fn gcp_config(dir: &tempfile::TempDir, key: &TestKey, google: &StandIn) -> SecretConfig {
    let token_uri = format!("{}/token", google.url);
    let doc = super::gcp::tests::key_json(&key.private_pem, "my-proj", &token_uri);
    secret_file(dir, "gcp", SecretKind::Gcp, &doc)
}

const CLIENT_EMAIL: &str = "puller@my-proj.iam.gserviceaccount.com";

#[tokio::test]
async fn gcp_key_exchanges_a_verified_assertion_for_an_access_token() {
    let dir = tempfile::tempdir().unwrap();
    let google = google(CLIENT_EMAIL, 3599).await;
    let secrets = Secrets::new(vec![gcp_config(&dir, rsa_key(), &google)], transport());
    assert_eq!(
        secrets
            .select("europe-west1-docker.pkg.dev", "my-proj/repo/app", None)
            .as_deref(),
        Some("gcp")
    );
    let login = secrets.credentials("gcp", "gcr.io").await.unwrap();
    assert_eq!(
        (login.username.as_str(), login.password.expose()),
        ("oauth2accesstoken", "ya29.token-1")
    );
    let again = secrets.credentials("gcp", "us.gcr.io").await.unwrap();
    assert_eq!(again.password.expose(), "ya29.token-1");
    assert_eq!(google.hits(), 1);
}

#[tokio::test]
async fn an_access_token_due_for_refresh_is_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let google = google(CLIENT_EMAIL, 0).await;
    let secrets = Secrets::new(vec![gcp_config(&dir, rsa_key(), &google)], transport());
    let first = secrets.credentials("gcp", "gcr.io").await.unwrap();
    let second = secrets.credentials("gcp", "gcr.io").await.unwrap();
    assert_eq!(
        (first.password.expose(), second.password.expose()),
        ("ya29.token-1", "ya29.token-2")
    );
    assert_ne!(first.id, second.id, "a new token gets a new id");
}

#[tokio::test]
async fn an_assertion_signed_by_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let google = google(CLIENT_EMAIL, 3599).await;
    let secrets = Secrets::new(
        vec![gcp_config(&dir, untrusted_key(), &google)],
        transport(),
    );
    let err = secrets
        .credentials("gcp", "gcr.io")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GCP token endpoint failed: HTTP 400: invalid_grant"),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"));
}
