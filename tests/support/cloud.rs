//! Stand-ins for the cloud services behind pull secrets: STS `AssumeRole`, ECR
//! `GetAuthorizationToken` and a Google OAuth token endpoint, strict enough to catch real
//! mistakes. They recompute SigV4 signatures from the known secret key (by hand, with `ring`,
//! independently of `aws-sigv4`) and verify RS256 assertions against the public half of a test
//! RSA key (with the `rsa` crate, independently of berth's `ring` signer).
//!
//! The RSA test keys are generated once per test binary (about a second at the dev-dependency
//! opt-level), so no private key is ever committed. Does not own: the tests of
//! `Secrets::credentials` against these (tests/secrets.rs).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::Generate;

use super::scripted::{header, respond, Scripted};

/// An RSA key pair: the private half as a PKCS#8 PEM (what a service-account key file holds)
/// and the public half to check signatures with.
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
pub fn untrusted_key() -> &'static TestKey {
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

/// Who may sign requests to a stand-in AWS service.
#[derive(Clone)]
pub struct AwsKey {
    pub access_key: &'static str,
    pub secret_key: &'static str,
    pub session_token: Option<&'static str>,
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

pub const REGION: &str = "eu-west-1";
pub const ECR_HOST: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
pub const ROLE: &str = "arn:aws:iam::123456789012:role/puller";
pub const BASE_KEY: AwsKey = AwsKey {
    access_key: "AKIDBASEKEY",
    secret_key: "base-secret-key-value",
    session_token: None,
};
pub const SESSION_KEY: AwsKey = AwsKey {
    access_key: "ASIASESSIONKEY",
    secret_key: "session-secret-key-value",
    session_token: Some("session-token-value+/="),
};

fn sts_error(code: &str) -> Response<Full<Bytes>> {
    let xml = format!("<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>denied by stand-in</Message></Error></ErrorResponse>");
    respond(StatusCode::FORBIDDEN, "text/xml", xml)
}

/// STS `AssumeRole` (Query API) for `ROLE` with `external_id`, granting `SESSION_KEY`.
pub async fn sts(external_id: &'static str) -> Scripted {
    Scripted::start(Arc::new(move |req, _| {
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
pub async fn ecr(key: AwsKey, lifetime: Duration) -> Scripted {
    Scripted::start(Arc::new(move |req, n| {
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
pub async fn google(client_email: &'static str, expires_in: u64) -> Scripted {
    let audience: Arc<OnceLock<String>> = Arc::default();
    let expected_audience = Arc::clone(&audience);
    let stand_in = Scripted::start_tls(Arc::new(move |req, n| {
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
    audience.set(format!("{}/token", stand_in.url())).unwrap();
    stand_in
}

/// A Google service-account key file for `private_key_pem`, with the fields berth reads.
pub fn gcp_key_json(private_key_pem: &str, project: &str, token_uri: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": "0123abcd",
        "private_key": private_key_pem,
        "client_email": format!("puller@{project}.iam.gserviceaccount.com"),
        "token_uri": token_uri,
    })
}
