//! The two AWS calls an ECR secret needs, SigV4-signed with `aws-sigv4`: STS `AssumeRole`
//! (Query API, XML answer) and ECR `GetAuthorizationToken` (JSON 1.1 protocol).
//!
//! This is the wire protocol only. Which region, which endpoint and how long to keep what comes
//! back is decided in `ecr`; the full AWS SDK is not used because two signed POSTs do not need
//! its runtime, and berth already has an HTTP client.

use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use base64::Engine;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request};
use http_body_util::Full;
use serde::Deserialize;

use super::exchange::{form_encode, refusal, send, ExchangeError};
use super::Transport;
use crate::secret::Secret;

/// A key pair to sign with: the secret file's long-lived keys, or STS session credentials.
#[derive(Clone, Debug)]
pub(super) struct AwsCredentials {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: Secret,
    /// Present for STS session credentials; sent as `X-Amz-Security-Token` and signed.
    pub session_token: Option<Secret>,
}

/// What the sessions berth opens are called in CloudTrail, so operators can find them.
const SESSION_NAME: &str = "berth";

/// Asked of STS; it may grant less (the role's `MaxSessionDuration` caps it, and role chaining
/// caps it at one hour).
const SESSION_SECONDS: &str = "3600";

/// `AssumeRole` at `endpoint`, signed with `base` for `region`. Returns the session
/// credentials and how long they stay valid.
pub(super) async fn assume_role(
    transport: &Transport,
    endpoint: &str,
    region: &str,
    base: &AwsCredentials,
    role_arn: &str,
    external_id: Option<&str>,
) -> Result<(AwsCredentials, Duration), ExchangeError> {
    let mut form = vec![
        ("Action", "AssumeRole"),
        ("Version", "2011-06-15"),
        ("RoleArn", role_arn),
        ("RoleSessionName", SESSION_NAME),
        ("DurationSeconds", SESSION_SECONDS),
    ];
    if let Some(external_id) = external_id {
        form.push(("ExternalId", external_id));
    }
    let body = form_encode(&form).into_bytes();
    let content_type = "application/x-www-form-urlencoded; charset=utf-8";
    let signer = Signer {
        credentials: base,
        region,
        service: "sts",
    };
    let request = signed_post(
        endpoint,
        &[(CONTENT_TYPE.as_str(), content_type)],
        body,
        signer,
    )?;
    let (status, body) = send(transport, request).await?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ExchangeError::from("STS answered non-UTF-8"))?;
    if !status.is_success() {
        let error = quick_xml::de::from_str::<StsErrorResponse>(text).ok();
        let error = error.as_ref().map(|e| &e.error);
        return Err(refusal(
            status,
            &[
                error.and_then(|e| e.code.as_deref()),
                error.and_then(|e| e.message.as_deref()),
            ],
        ));
    }
    let parsed: AssumeRoleResponse = quick_xml::de::from_str(text)
        .map_err(|_| ExchangeError::from("STS answer is not an AssumeRoleResponse"))?;
    let c = parsed.result.credentials;
    let expires = humantime::parse_rfc3339_weak(c.expiration.trim())
        .map_err(|_| ExchangeError::from("STS answer has an unreadable Expiration"))?;
    let lifetime = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let session = AwsCredentials {
        access_key_id: c.access_key_id,
        secret_access_key: Secret::new(c.secret_access_key),
        session_token: Some(Secret::new(c.session_token)),
    };
    Ok((session, lifetime))
}

/// `GetAuthorizationToken` at `endpoint` for `region`: the registry's Basic credentials
/// (`AWS` and a password, decoded from the token) and how long they stay valid.
pub(super) async fn authorization_token(
    transport: &Transport,
    endpoint: &str,
    region: &str,
    credentials: &AwsCredentials,
) -> Result<((String, Secret), Duration), ExchangeError> {
    let headers = [
        (CONTENT_TYPE.as_str(), "application/x-amz-json-1.1"),
        (
            "x-amz-target",
            "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken",
        ),
    ];
    let signer = Signer {
        credentials,
        region,
        service: "ecr",
    };
    let request = signed_post(endpoint, &headers, b"{}".to_vec(), signer)?;
    let (status, body) = send(transport, request).await?;
    if !status.is_success() {
        let error = serde_json::from_slice::<JsonError>(&body).ok();
        return Err(refusal(
            status,
            &[
                error.as_ref().and_then(|e| e.kind.as_deref()),
                error.as_ref().and_then(|e| e.message.as_deref()),
            ],
        ));
    }
    let parsed: AuthorizationResponse = serde_json::from_slice(&body)
        .map_err(|_| ExchangeError::from("ECR answer is not a GetAuthorizationToken response"))?;
    let data = parsed
        .authorization_data
        .into_iter()
        .next()
        .ok_or_else(|| ExchangeError::from("ECR answer holds no authorizationData"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(data.authorization_token.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ExchangeError::from("ECR authorizationToken is not base64 text"))?;
    let (user, password) = decoded
        .split_once(':')
        .ok_or_else(|| ExchangeError::from("ECR authorizationToken is not `user:password`"))?;
    let lifetime = Duration::try_from_secs_f64(data.expires_at)
        .ok()
        .and_then(|since_epoch| SystemTime::UNIX_EPOCH.checked_add(since_epoch))
        .and_then(|expires| expires.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    Ok(((user.to_string(), Secret::new(password)), lifetime))
}

fn caused(
    context: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> ExchangeError {
    let source = source.into();
    ExchangeError::Caused { context, source }
}

/// What a request is signed as: with which keys, for which service, in which region.
struct Signer<'a> {
    credentials: &'a AwsCredentials,
    region: &'a str,
    service: &'a str,
}

/// A POST of `body` to `endpoint` with `headers`, SigV4-signed by `signer`.
fn signed_post(
    endpoint: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    signer: Signer<'_>,
) -> Result<Request<Full<Bytes>>, ExchangeError> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| ExchangeError::Unusable(format!("endpoint {endpoint:?} is not a URL")))?;
    let host = uri
        .authority()
        .ok_or_else(|| ExchangeError::Unusable(format!("endpoint {endpoint:?} has no host")))?
        .to_string();
    // Set here rather than by the HTTP client so that the signed Host is the one sent.
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(HOST, host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request
        .body(())
        .map_err(|e| caused("building the request", e))?;
    sign_request(&mut request, &body, signer)?;
    Ok(request.map(|()| Full::new(Bytes::from(body))))
}

/// Adds `X-Amz-Date`, `Authorization` (and `X-Amz-Security-Token` for a session), signing
/// the headers already on the request and `body`.
fn sign_request(
    request: &mut Request<()>,
    body: &[u8],
    signer: Signer<'_>,
) -> Result<(), ExchangeError> {
    let credentials = signer.credentials;
    let identity = aws_credential_types::Credentials::new(
        credentials.access_key_id.clone(),
        credentials.secret_access_key.expose().to_string(),
        credentials
            .session_token
            .as_ref()
            .map(|t| t.expose().to_string()),
        None,
        "berth-secret",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(signer.region)
        .name(signer.service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| caused("signing", e))?
        .into();
    let uri = request.uri().to_string();
    let headers: Vec<(&str, &str)> = request
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let signable = SignableRequest::new(
        request.method().as_str(),
        uri,
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| caused("signing", e))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| caused("signing", e))?
        .into_parts();
    instructions.apply_to_request_http1x(request);
    Ok(())
}

#[derive(Deserialize)]
struct AssumeRoleResponse {
    #[serde(rename = "AssumeRoleResult")]
    result: AssumeRoleResult,
}

#[derive(Deserialize)]
struct AssumeRoleResult {
    #[serde(rename = "Credentials")]
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

#[derive(Deserialize)]
struct StsErrorResponse {
    #[serde(rename = "Error")]
    error: StsError,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationResponse {
    authorization_data: Vec<AuthorizationData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationData {
    authorization_token: String,
    /// Epoch seconds, as the JSON 1.1 protocol sends timestamps.
    expires_at: f64,
}

/// The JSON 1.1 protocol's error body.
#[derive(Deserialize)]
struct JsonError {
    #[serde(rename = "__type")]
    kind: Option<String>,
    message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_assume_role_response() {
        let xml = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
          <AssumeRoleResult>
            <SourceIdentity>Alice</SourceIdentity>
            <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/demo/berth</Arn>
              <AssumedRoleId>ARO123EXAMPLE123:berth</AssumedRoleId></AssumedRoleUser>
            <Credentials>
              <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>
              <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
              <SessionToken>AQoDYXdzEPT//////////wEXAMPLEtc764&amp;x</SessionToken>
              <Expiration>2019-07-15T23:28:33.359Z</Expiration>
            </Credentials>
            <PackedPolicySize>8</PackedPolicySize>
          </AssumeRoleResult>
          <ResponseMetadata><RequestId>c6104cbe</RequestId></ResponseMetadata>
        </AssumeRoleResponse>"#;
        let parsed: AssumeRoleResponse = quick_xml::de::from_str(xml).unwrap();
        let c = parsed.result.credentials;
        assert_eq!(c.access_key_id, "ASIAIOSFODNN7EXAMPLE");
        assert_eq!(c.session_token, "AQoDYXdzEPT//////////wEXAMPLEtc764&x");
        assert!(humantime::parse_rfc3339_weak(&c.expiration).is_ok());
    }

    #[test]
    fn parses_an_sts_error_response() {
        let xml = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
          <Error><Type>Sender</Type><Code>AccessDenied</Code>
            <Message>not authorized to perform sts:AssumeRole</Message></Error>
          <RequestId>1</RequestId></ErrorResponse>"#;
        let parsed: StsErrorResponse = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(parsed.error.code.as_deref(), Some("AccessDenied"));
    }

    #[test]
    fn signing_adds_the_sigv4_headers_and_the_session_token() {
        let credentials = AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("hunter2"),
            session_token: Some(Secret::new("session-token")),
        };
        let request = signed_post(
            "https://api.ecr.eu-west-1.amazonaws.com",
            &[("x-amz-target", "T")],
            b"{}".to_vec(),
            Signer {
                credentials: &credentials,
                region: "eu-west-1",
                service: "ecr",
            },
        )
        .unwrap();
        let auth = request.headers()["authorization"].to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"));
        assert!(auth.contains("/eu-west-1/ecr/aws4_request"));
        assert!(auth.contains("SignedHeaders=host;x-amz-date;x-amz-security-token;x-amz-target"));
        assert_eq!(request.headers()["x-amz-security-token"], "session-token");
        assert!(request.headers()["x-amz-security-token"].is_sensitive());
        assert!(!format!("{request:?}").contains("hunter2"));
        assert!(!format!("{credentials:?}").contains("hunter2"));
    }
}
