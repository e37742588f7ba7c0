//! Checks the token and mirror pieces of the test support, with no berth in the loop: the
//! registry under token auth with the in-process token server (challenges, grants, refusals,
//! expiry), and containerd pulling through a `hosts.toml` mirror. tests/registry_support.rs
//! checks the rest (registry, images, tap, faults).
//!
//! Does not test berth. If one of these fails, every berth test built on these pieces is suspect.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;
use support::client::{fetch, request, Fetched};
use support::stack::registry_with;
use support::token::SERVICE;
use support::*;

const TEAM_REPO: &str = "team/app";
const PUBLIC_REPO: &str = "public/app";

fn policy() -> Policy {
    Policy::new()
        .user("alice", "alice-pw", &[("team/*", "pull,push")])
        .user("bob", "bob-pw", &[("bob/*", "*")])
        .anonymous(&[("public/*", "pull")])
}

/// `GET` with an optional bearer token and the manifest media types a puller accepts.
async fn get_bearer(url: &str, token: Option<&str>) -> Fetched {
    let authorization = token.map(|t| format!("Bearer {t}"));
    // distribution 2.8 answers a schema2 manifest to a client that does not accept it with 400
    // (it would have to convert it to schema1), so accept both families.
    let accept = [Flavor::Docker, Flavor::Oci]
        .map(|f| f.manifest_type())
        .join(", ");
    let mut headers = vec![("accept", accept.as_str())];
    if let Some(value) = &authorization {
        headers.push(("authorization", value));
    }
    fetch(request(Method::GET, url, None, &headers, Bytes::new()))
        .await
        .expect("registry answers")
}

fn challenge(response: &Fetched) -> Challenge {
    let header = response
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("401 without a challenge: {response:?}"));
    Challenge::parse(header).unwrap_or_else(|| panic!("not a Bearer challenge: {header}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn token_auth_pushes_with_a_user_token_and_answers_anonymous_pulls_with_a_challenge() {
    let tokens = TokenServer::start(policy()).await;
    let registry = Registry::start(tokens.auth()).await;
    let image = Image::random(Flavor::Oci, 21, &[16 << 10, 48 << 10]);

    // Push end to end: alice asks the token server for push rights, then pushes with them.
    let scope = format!("repository:{TEAM_REPO}:pull,push");
    let push_token = tokens.token(Some(("alice", "alice-pw")), &[&scope]).await;
    push_image_bearer(&registry.url(), TEAM_REPO, "v1", &image, &push_token)
        .await
        .unwrap();

    // Anonymous pull: 401 with a challenge naming our realm, service and the pull scope.
    let manifest_url = format!("{}/v2/{TEAM_REPO}/manifests/v1", registry.url());
    let refused = get_bearer(&manifest_url, None).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let asked = challenge(&refused);
    assert_eq!(asked.realm, tokens.realm());
    assert_eq!(asked.service.as_deref(), Some(SERVICE));
    assert_eq!(
        asked.scope.as_deref(),
        Some(format!("repository:{TEAM_REPO}:pull").as_str())
    );
    assert_eq!(asked.error, None);

    // Answer the challenge as a client would and retry.
    let scope = asked.scope.unwrap();
    let response = tokens
        .fetch_token(Some(("alice", "alice-pw")), &[&scope])
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(body["expires_in"], 300);
    let issued_at = body["issued_at"].as_str().unwrap();
    assert!(
        issued_at.len() == 20 && issued_at.ends_with('Z'),
        "{issued_at}"
    );
    let token = body["token"].as_str().unwrap();

    let manifest = get_bearer(&manifest_url, Some(token)).await;
    assert_eq!(manifest.status, StatusCode::OK, "{manifest:?}");
    assert_eq!(manifest.body, image.manifest.bytes);
    let layer = &image.layers[1].blob;
    let blob_url = format!("{}/v2/{TEAM_REPO}/blobs/{}", registry.url(), layer.digest);
    let blob = get_bearer(&blob_url, Some(token)).await;
    assert_eq!(blob.status, StatusCode::OK);
    assert_eq!(blob.body, layer.bytes);

    let requests = tokens.requests();
    assert_eq!(tokens.count(Some("alice")), 2, "{requests:#?}");
    assert_eq!(tokens.count(None), 0);
    assert_eq!(
        requests[1],
        TokenRequest {
            user: Some("alice".into()),
            service: Some(SERVICE.into()),
            scopes: vec![format!("repository:{TEAM_REPO}:pull")],
            status: StatusCode::OK,
            granted: vec![format!("repository:{TEAM_REPO}:pull")],
        }
    );
}

/// A token server with `policy()` and a registry behind it, `image` seeded as `v1` in each of
/// `repos` with minted tokens (so no token request is logged).
async fn seeded_registry(image: &Image, repos: &[&str]) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(policy()).await;
    let registry = Registry::start(tokens.auth()).await;
    for repo in repos {
        tokens
            .seed_image(&registry.url(), repo, "v1", image)
            .await
            .unwrap();
    }
    (tokens, registry)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_grant_only_what_the_policy_allows_and_the_registry_enforces_it() {
    let image = Image::random(Flavor::Docker, 31, &[8 << 10]);
    let (tokens, registry) = seeded_registry(&image, &[TEAM_REPO, PUBLIC_REPO]).await;
    assert!(tokens.requests().is_empty(), "seeding must not be counted");
    let team_scope = format!("repository:{TEAM_REPO}:pull");
    let team_url = format!("{}/v2/{TEAM_REPO}/manifests/v1", registry.url());

    // bob authenticates but may not pull team/app: a 200 with an empty grant (as Docker Hub
    // does), which the registry refuses with 401 insufficient_scope, not 403.
    let bob = tokens.token(Some(("bob", "bob-pw")), &[&team_scope]).await;
    assert_eq!(tokens.requests()[0].granted, Vec::<String>::new());
    let refused = get_bearer(&team_url, Some(&bob)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge(&refused).error.as_deref(),
        Some("insufficient_scope")
    );

    // Anonymous: pull on public/*, nothing on team/*; push is never granted anonymously.
    let public_scope = format!("repository:{PUBLIC_REPO}:pull,push");
    let anonymous = tokens.token(None, &[&public_scope, &team_scope]).await;
    let granted = &tokens.requests()[1].granted;
    assert_eq!(granted, &[format!("repository:{PUBLIC_REPO}:pull")]);
    let public_url = format!("{}/v2/{PUBLIC_REPO}/manifests/v1", registry.url());
    assert_eq!(
        get_bearer(&public_url, Some(&anonymous)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get_bearer(&team_url, Some(&anonymous)).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A wrong password gets no token at all.
    let wrong = tokens
        .fetch_token(Some(("alice", "nope")), &[&team_scope])
        .await
        .unwrap();
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(tokens.count(Some("alice")), 1);
    assert_eq!(tokens.count(None), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_refuses_expired_tokens_and_lifetime_is_configurable() {
    let image = Image::random(Flavor::Oci, 41, &[4 << 10]);
    let (tokens, registry) = seeded_registry(&image, &[PUBLIC_REPO]).await;
    let url = format!("{}/v2/{PUBLIC_REPO}/manifests/v1", registry.url());
    let scope = format!("repository:{PUBLIC_REPO}:pull");

    // Issued an hour ago with a 300 s lifetime: far past distribution's 60 s leeway.
    tokens.backdate(Duration::from_secs(3600));
    let stale = tokens.token(None, &[&scope]).await;
    let refused = get_bearer(&url, Some(&stale)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&refused).error.as_deref(), Some("invalid_token"));

    tokens.backdate(Duration::ZERO);
    tokens.set_lifetime(Duration::from_secs(2));
    let response = tokens.fetch_token(None, &[&scope]).await.unwrap();
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["expires_in"], 2);
    let fresh = body["token"].as_str().unwrap();
    assert_eq!(get_bearer(&url, Some(fresh)).await.status, StatusCode::OK);

    // A token signed by a key the registry does not trust (another server's) is refused too.
    let stranger = TokenServer::start(policy()).await;
    let foreign = stranger.mint("alice", &[Access::new(PUBLIC_REPO, "pull")]);
    let refused = get_bearer(&url, Some(&foreign)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&refused).error.as_deref(), Some("invalid_token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tap_in_front_of_the_token_server_sees_and_can_fail_token_requests() {
    let tokens = TokenServer::start(policy()).await;
    let tap = Tap::start(&tokens.url()).await;
    let registry = Registry::start(tokens.auth_with_realm(&format!("{}/token", tap.url()))).await;
    let url = format!("{}/v2/{PUBLIC_REPO}/manifests/v1", registry.url());

    let asked = challenge(&get_bearer(&url, None).await);
    assert_eq!(asked.realm, format!("{}/token", tap.url()));
    let token_url = format!(
        "{}?service={}&scope={}",
        asked.realm,
        asked.service.unwrap(),
        asked.scope.unwrap()
    );
    let ok = support::client::get(&token_url, None).await.unwrap();
    assert_eq!(ok.status, StatusCode::OK);
    tap.inject_times(Kind::Token, Fault::Status(503, Some(1)), 1);
    let failed = support::client::get(&token_url, None).await.unwrap();
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(tap.count(Method::GET, Kind::Token), 2);
    assert_eq!(
        tokens.count(None),
        1,
        "the failed one never reached the server"
    );
}

#[test]
fn challenge_parser_reads_what_distribution_writes() {
    let header = r#"Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push",error="insufficient_scope""#;
    assert_eq!(
        Challenge::parse(header),
        Some(Challenge {
            realm: "http://127.0.0.1:1/token".into(),
            service: Some("svc".into()),
            scope: Some("repository:a/b:pull,push".into()),
            error: Some("insufficient_scope".into()),
        })
    );
    assert_eq!(Challenge::parse(r#"Basic realm="x""#), None);
    assert_eq!(Challenge::parse(r#"Bearer service="x""#), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_a_hosts_toml_mirror_and_sends_ns() {
    let image = Image::random(Flavor::Oci, 51, &[64 << 10, 256 << 10]);
    let (_registry, tap) = registry_with(&image, "smoke/app", "v1").await;
    let containerd = Containerd::start().await;
    let hosts = HostsDir::new();
    hosts.mirror("mirror.test", &tap.url(), None);

    containerd
        .pull_ok("mirror.test/smoke/app:v1", hosts.path(), &[])
        .await;

    let seen = tap.requests();
    assert!(
        seen.iter()
            .all(|(_, path)| path.ends_with("?ns=mirror.test")),
        "{seen:#?}"
    );
    assert_eq!(tap.count(Method::HEAD, Kind::Manifest), 1, "{seen:#?}");
    assert_eq!(tap.count(Method::GET, Kind::Blob), 3, "{seen:#?}");
    let images = containerd.images().await;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].name, "mirror.test/smoke/app:v1");
    assert_eq!(images[0].digest, image.digest());
    let mut expected: Vec<String> = image.blobs().iter().map(|b| b.digest.clone()).collect();
    expected.push(image.digest().to_owned());
    expected.sort();
    assert_eq!(containerd.content().await, expected);
    let layer = &image.layers[1].blob;
    assert_eq!(
        containerd.blob(&layer.digest).await.as_deref(),
        Some(&layer.bytes[..])
    );
    assert_eq!(containerd.escapes(), Vec::<String>::new());

    // A tag the mirror lacks: containerd falls back to the registry itself, which the
    // stand-in for the internet refuses.
    let missing = containerd
        .pull("mirror.test/smoke/app:nope", hosts.path(), &[])
        .await;
    assert!(!missing.status.success());
    assert_eq!(containerd.escapes(), ["CONNECT mirror.test:443 HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_sends_the_mirror_credentials_from_hosts_toml() {
    let registry = Registry::start(Auth::basic("puller", "pull-pw")).await;
    let tap = Tap::start(&registry.url()).await;
    let image = Image::random(Flavor::Docker, 61, &[8 << 10]);
    push_image(&registry.url(), "smoke/app", "v1", &image, registry.creds())
        .await
        .unwrap();
    let containerd = Containerd::start().await;
    let hosts = HostsDir::new();
    hosts.mirror("mirror.test", &tap.url(), registry.creds());

    // `content fetch` makes the same requests without unpacking.
    let output = containerd
        .fetch("mirror.test/smoke/app:v1", hosts.path(), &[])
        .await;
    assert!(output.status.success(), "{output:?}");

    let expected = support::client::basic_auth("puller", "pull-pw");
    for seen in tap.seen() {
        assert_eq!(
            seen.headers.get("authorization"),
            Some(&expected),
            "{} {}",
            seen.method,
            seen.path
        );
    }
    assert_eq!(tap.count(Method::GET, Kind::Blob), 2);
    assert_eq!(containerd.images().await[0].digest, image.digest());
}
