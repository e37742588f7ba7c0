//! Pull secrets that are exchanged for registry logins, end to end against the stand-in cloud
//! services (tests/support/cloud.rs): an ECR key signed with SigV4 (with and without an assumed
//! role), a GCP service-account key traded for an access token, and what a refusal, a changed
//! key file or an expiring token does.

mod support;

use std::sync::Arc;
use std::time::Duration;

use berth::config::ClientConfig;
use berth::net::address::AddressRule;
use berth::net::HttpClient;
use berth::secrets::{SecretConfig, SecretError, Secrets, Transport};
use serde_json::{json, Value};
use support::ca::test_ca;
use support::cloud::{
    ecr, gcp_key_json, google, rsa_key, sts, untrusted_key, TestKey, BASE_KEY, ECR_HOST, ROLE,
    SESSION_KEY,
};
use support::scripted::Scripted;

/// The stand-ins listen on loopback, which the address rule refuses unless allowed; the
/// client trusts the test CA of the TLS stand-in.
fn transport() -> Transport {
    let config = ClientConfig {
        ca_file: Some(test_ca().file().to_path_buf()),
        ..ClientConfig::default()
    };
    HttpClient::new(&config)
        .unwrap()
        .with_rule(AddressRule::any_internal())
}

/// Writes `doc` as the file of a secret called `name` of type `kind` (`ecr`, `gcp`) and returns
/// its `[[secret]]` entry, read as the configuration reads it.
fn secret_file(dir: &tempfile::TempDir, name: &str, kind: &str, doc: &Value) -> SecretConfig {
    let file = dir.path().join(name);
    std::fs::write(&file, doc.to_string()).unwrap();
    serde_json::from_value(json!({"name": name, "type": kind, "file": file})).unwrap()
}

/// Why `secrets` cannot log in to `registry` with the secret `name`, as the error reads.
async fn refusal(secrets: &Secrets, name: &str, registry: &str) -> String {
    let err = secrets.credentials(name, registry).await.unwrap_err();
    err.to_string()
}

fn ecr_config(
    dir: &tempfile::TempDir,
    secret_key: &str,
    role: Option<(&str, &str)>,
    sts: Option<&Scripted>,
    ecr: &Scripted,
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
    let mut config = secret_file(dir, "aws", "ecr", &doc);
    config.sts_endpoint = sts.map(Scripted::url);
    config.ecr_endpoint = Some(ecr.url());
    config
}

/// Secrets holding one ECR key (no role) with `secret_key`, for the `ecr` stand-in.
fn ecr_secrets(dir: &tempfile::TempDir, secret_key: &str, ecr: &Scripted) -> Secrets {
    Secrets::new(
        vec![ecr_config(dir, secret_key, None, None, ecr)],
        transport(),
    )
}

/// Secrets holding one ECR key that assumes `ROLE` through `sts` with `external_id`.
fn role_secrets(
    dir: &tempfile::TempDir,
    external_id: &str,
    sts: &Scripted,
    ecr: &Scripted,
) -> Secrets {
    let role = Some((ROLE, external_id));
    let config = ecr_config(dir, BASE_KEY.secret_key, role, Some(sts), ecr);
    Secrets::new(vec![config], transport())
}

#[tokio::test]
async fn ecr_key_gets_a_registry_login_signed_with_sigv4() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(12 * 3600)).await;
    let secrets = ecr_secrets(&dir, BASE_KEY.secret_key, &ecr);
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
    assert_eq!(ecr.count(), 1, "a 12-hour token is reused");
}

#[tokio::test]
async fn a_wrong_secret_key_fails_the_signature_check() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(3600)).await;
    let secrets = ecr_secrets(&dir, "wrong-secret-key-value", &ecr);
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
    let secrets = Arc::new(role_secrets(&dir, "ext-id-value", &sts, &ecr));
    let calls = (0..8).map(|_| {
        let secrets = Arc::clone(&secrets);
        tokio::spawn(async move { secrets.credentials("aws", ECR_HOST).await })
    });
    for call in futures_util::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap().password.expose(), "ecr-password-1");
    }
    assert_eq!(
        (sts.count(), ecr.count()),
        (1, 1),
        "concurrent requests share one fetch"
    );
}

#[tokio::test]
async fn a_wrong_external_id_is_refused_by_sts() {
    let dir = tempfile::tempdir().unwrap();
    let sts = sts("ext-id-value").await;
    let ecr = ecr(SESSION_KEY, Duration::from_secs(3600)).await;
    let secrets = role_secrets(&dir, "other-id", &sts, &ecr);
    let err = refusal(&secrets, "aws", ECR_HOST).await;
    assert!(
        err.contains("STS AssumeRole failed: HTTP 403: AccessDenied"),
        "{err}"
    );
    assert_eq!(ecr.count(), 0);
}

#[tokio::test]
async fn a_failed_exchange_is_remembered_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let ecr = ecr(BASE_KEY, Duration::from_secs(3600)).await;
    let secrets = ecr_secrets(&dir, "wrong-secret-key-value", &ecr);
    for _ in 0..5 {
        assert!(secrets.credentials("aws", ECR_HOST).await.is_err());
    }
    assert_eq!(ecr.count(), 1, "one refusal, remembered");
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

fn gcp_config(dir: &tempfile::TempDir, key: &TestKey, google: &Scripted) -> SecretConfig {
    let token_uri = format!("{}/token", google.url());
    let doc = gcp_key_json(&key.private_pem, "my-proj", &token_uri);
    secret_file(dir, "gcp", "gcp", &doc)
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
    assert_eq!(google.count(), 1);
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
    let err = refusal(&secrets, "gcp", "gcr.io").await;
    assert!(
        err.contains("GCP token endpoint failed: HTTP 400: invalid_grant"),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"));
}
