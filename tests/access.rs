//! Access control end to end: berth in the policy mode in front of our org's registry (a real
//! registry behind a counting tap), pulled by skopeo with `--src-creds` (the token flow), by
//! containerd with Basic credentials in `hosts.toml`, and by a plain HTTP client.
//!
//! Principals: service account `ci` and user alice (group `devs`, which may pull `team/app`),
//! service account `admin` (manage on every image), user mallory (pull on one tagged image only,
//! which grants no registry pull). `mirror.test` is the same registry under another name,
//! marked `public = true`.

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use support::berth::policy_mode_tables;
use support::error_code;
use support::{
    fetch, push_image, random_layer, read_oci_layout, request, skopeo_copy, skopeo_copy_ok, Auth,
    Berth, Containerd, Fetched, Flavor, HostsDir, Image, Kind, Registry, Tap,
};

const OWN: &str = "my-org.registry.cpln.io";
const CI_KEY: &str = "ci-key-1c0ffee-0123456789abcdef";
const ALICE_KEY: &str = "alice-key-0123456789abcdef";
const ADMIN_KEY: &str = "admin-key-0123456789abcdef";
const MALLORY_KEY: &str = "mallory-key-0123456789abcdef";

struct Site {
    _registry: Registry,
    tap: Tap,
    berth: Berth,
    dir: tempfile::TempDir,
    /// `team/app:v1`; shares its second layer with `secret`.
    app: Image,
    /// `secret/app:v1`.
    secret: Image,
}

fn hash(key: &str) -> String {
    berth::access::principals::KeyHash::generate(key).to_string()
}

fn write_json(path: &Path, value: &Value) {
    // Write and rename, as Kubernetes swaps mounted files.
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, value.to_string()).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

fn pull_policy(name: &str, target: Value, permission: &str, principal: &str) -> Value {
    let mut policy = json!({
        "kind": "policy",
        "name": name,
        "targetKind": "image",
        "bindings": [{"permissions": [permission], "principalLinks": [principal]}],
    });
    for (key, value) in target.as_object().unwrap() {
        policy[key] = value.clone();
    }
    policy
}

fn repository_is(repository: &str) -> Value {
    json!({"targetQuery": {"kind": "image", "spec": {"match": "all", "terms": [
        {"op": "=", "property": "repository", "value": repository}
    ]}}})
}

impl Site {
    async fn start(extra_access: &str) -> Site {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let shared = random_layer(30_000, 900);
        let app = Image::new(Flavor::Oci, vec![random_layer(20_000, 901), shared.clone()]);
        let secret = Image::new(Flavor::Oci, vec![random_layer(40_000, 902), shared]);
        push_image(&registry.url(), "team/app", "v1", &app, None)
            .await
            .unwrap();
        push_image(&registry.url(), "secret/app", "v1", &secret, None)
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let principals = dir.path().join("principals.json");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        write_json(
            &principals,
            &json!({
                "serviceAccounts": [
                    {"name": "ci", "keys": [{"name": "k1", "hash": hash(CI_KEY)}]},
                    {"name": "admin", "keys": [{"hash": hash(ADMIN_KEY)}]},
                ],
                "users": [
                    {"email": "alice@example.com", "keys": [{"hash": hash(ALICE_KEY)}]},
                    {"email": "mallory@example.com", "keys": [{"hash": hash(MALLORY_KEY)}]},
                ],
                "groups": [
                    {"name": "devs", "memberLinks": ["//user/alice@example.com", "//serviceaccount/ci"]},
                ],
            }),
        );
        write_json(
            &policies.join("devs.json"),
            &pull_policy(
                "devs-pull",
                repository_is("team/app"),
                "pull",
                "//group/devs",
            ),
        );
        write_json(
            &policies.join("admin.json"),
            &pull_policy(
                "admin",
                json!({"target": "all"}),
                "manage",
                "//serviceaccount/admin",
            ),
        );
        write_json(
            &policies.join("mallory.json"),
            &pull_policy(
                "mallory-one-tag",
                json!({"targetLinks": ["//image/secret/app:v1"]}),
                "pull",
                "//user/mallory@example.com",
            ),
        );
        let config = format!(
            r#"
listen = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"
default_upstream = "{OWN}"
[platform]
org = "my-org"
{tables}{extra_access}
[[upstream]]
host = "{OWN}"
endpoint = "{tap}"
[[upstream]]
host = "mirror.test"
endpoint = "{tap}"
public = true
"#,
            tables = policy_mode_tables(dir.path()),
            tap = tap.url(),
        );
        let berth = Berth::start(&config).await;
        Site {
            _registry: registry,
            tap,
            berth,
            dir,
            app,
            secret,
        }
    }

    async fn get(&self, path: &str, creds: Option<(&str, &str)>) -> Fetched {
        self.get_with(path, creds, &[]).await
    }

    async fn get_with(
        &self,
        path: &str,
        creds: Option<(&str, &str)>,
        headers: &[(&str, &str)],
    ) -> Fetched {
        let url = format!("{}{path}", self.berth.url());
        let mut all = vec![("accept", Flavor::Oci.manifest_type())];
        all.extend_from_slice(headers);
        fetch(request(Method::GET, &url, creds, &all, Bytes::new()))
            .await
            .unwrap()
    }

    async fn bearer(&self, path: &str, token: &str) -> Fetched {
        let value = format!("Bearer {token}");
        self.get_with(path, None, &[("authorization", &value)])
            .await
    }

    async fn token(&self, creds: (&str, &str), scopes: &[&str]) -> Fetched {
        let query: Vec<String> = scopes
            .iter()
            .map(|s| format!("scope={}", s.replace(':', "%3A").replace('/', "%2F")))
            .collect();
        self.get(
            &format!("/token?service=berth&{}", query.join("&")),
            Some(creds),
        )
        .await
    }

    /// Tokens berth's token service has handed out so far.
    fn tokens_issued(&self) -> u64 {
        self.berth
            .state
            .metrics
            .requests
            .with_label_values(&["token", "GET", "2xx", "BYPASS"])
            .get()
    }

    fn policies_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("policies")
    }
}

fn token_of(fetched: &Fetched) -> String {
    assert_eq!(fetched.status, 200, "{:?}", fetched.body);
    let json: Value = serde_json::from_slice(&fetched.body).unwrap();
    assert_eq!(json["token"], json["access_token"]);
    json["token"].as_str().unwrap().to_string()
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_with_a_service_account_key_or_a_user_key_pulls_an_allowed_image() {
    let site = Site::start("").await;
    for creds in [
        format!("<token>:{CI_KEY}"),
        format!("alice@example.com:{ALICE_KEY}"),
    ] {
        let dest = tempfile::tempdir().unwrap();
        let source = format!("docker://{}/team/app:v1", site.berth.host());
        skopeo_copy_ok(
            &source,
            dest.path(),
            &["--src-creds", &creds, "--preserve-digests"],
        )
        .await;
        let layout = read_oci_layout(dest.path()).unwrap();
        assert_eq!(layout.manifest_digest, site.app.digest());
        let expected: Vec<&str> = site.app.blobs().iter().map(|b| b.digest.as_str()).collect();
        assert_eq!(layout.blobs, expected);
    }
    // The second pull came from the cache: each blob was fetched from the registry once.
    assert_eq!(
        site.tap.count(Method::GET, Kind::Blob),
        site.app.blobs().len()
    );
    // skopeo took the token route: a 401 challenge, then berth's token service, per pull.
    let tokens = site.tokens_issued();
    assert!(tokens >= 2, "{tokens} tokens issued");
}

#[tokio::test(flavor = "multi_thread")]
async fn berth_load_pulls_as_a_service_account_and_reports_denied_images() {
    let site = Site::start("").await;
    let run = |image: &str| berth::load::LoadConfig {
        target: site.berth.url(),
        images: vec![berth::load::ImageRef::parse(image, None).unwrap()],
        concurrency: 2,
        layer_concurrency: 3,
        limit: berth::load::Limit::Count(4),
        platform: "linux/amd64".into(),
        request_timeout: Duration::from_secs(60),
        metrics: None,
        credentials: Some(berth::secrets::Credentials {
            username: "<token>".into(),
            password: berth::secret::Secret::new(CI_KEY),
            id: "ci".into(),
        }),
        ca_file: None,
    };

    let report = berth::load::run(run("team/app:v1")).await.unwrap();
    assert_eq!(report.total_errors(), 0, "{}", report.render());
    assert_eq!(report.recorder.pulls, 4);
    // One token per puller at most: each meets the challenge once, then reuses the token.
    let tokens = site.tokens_issued();
    assert!((1..=2).contains(&tokens), "{tokens} tokens issued");

    let denied = berth::load::run(run("secret/app:v1")).await.unwrap();
    assert_eq!(denied.recorder.failed_pulls, 4);
    assert!(
        denied.recorder.error_samples[0].contains("status 403 Forbidden"),
        "{:?}",
        denied.recorder.error_samples
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_pull_gets_403_and_never_reaches_the_upstream() {
    let site = Site::start("").await;
    let mallory = Some(("mallory@example.com", MALLORY_KEY));
    let alice = Some(("alice@example.com", ALICE_KEY));
    let cases = [
        ("/v2/team/app/manifests/v1", mallory),
        ("/v2/secret/app/manifests/v1", alice),
        // A policy on one tagged image grants no registry pull of the repository.
        ("/v2/secret/app/manifests/v1", mallory),
        (
            &*format!("/v2/secret/app/blobs/{}", site.secret.layers[0].blob.digest),
            mallory,
        ),
    ];
    for (path, creds) in cases {
        let fetched = site.get(path, creds).await;
        assert_eq!(fetched.status, 403, "{path}: {:?}", fetched.body);
        assert_eq!(error_code(&fetched.body), "DENIED");
        assert_eq!(fetched.header("x-cache"), Some("DENIED"));
    }
    // skopeo goes through the token service and is refused the same way.
    let dest = tempfile::tempdir().unwrap();
    let source = format!("docker://{}/secret/app:v1", site.berth.host());
    let creds = format!("alice@example.com:{ALICE_KEY}");
    let output = skopeo_copy(&source, dest.path(), &["--src-creds", &creds])
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("denied"), "{stderr}");
    assert_eq!(site.tap.requests(), vec![], "nothing reached the registry");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_wrong_credentials_get_401_with_the_challenge() {
    let site = Site::start("").await;
    let challenge = format!(
        "Bearer realm=\"{}/token\",service=\"berth\",scope=\"repository:{OWN}/team/app:pull\"",
        site.berth.url()
    );
    let wrong = [
        None,
        Some(("<token>", "not-the-key-0123456789abcdef")),
        Some(("<token>", ALICE_KEY)),
        Some(("alice@example.com", CI_KEY)),
        Some(("nobody@example.com", ALICE_KEY)),
    ];
    for creds in wrong {
        let fetched = site.get("/v2/team/app/manifests/v1", creds).await;
        assert_eq!(fetched.status, 401, "{creds:?}");
        assert_eq!(error_code(&fetched.body), "UNAUTHORIZED");
        assert_eq!(fetched.header("www-authenticate"), Some(challenge.as_str()));
    }
    let garbage = site
        .bearer("/v2/team/app/manifests/v1", "not.a.token")
        .await;
    assert_eq!(garbage.status, 401);
    // The ping tells clients where the token service is.
    let ping = site.get("/v2/", None).await;
    assert_eq!(ping.status, 401);
    assert_eq!(
        ping.header("www-authenticate").unwrap(),
        format!(
            "Bearer realm=\"{}/token\",service=\"berth\"",
            site.berth.url()
        )
    );
    assert_eq!(
        site.get("/v2/", Some(("<token>", CI_KEY))).await.status,
        200
    );
    // The token service refuses wrong keys, and so does skopeo's pull.
    let refused = site
        .token(
            ("<token>", "wrong-key-0123456789abcdef"),
            &["repository:team/app:pull"],
        )
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Basic realm=\"berth\"")
    );
    let dest = tempfile::tempdir().unwrap();
    let source = format!("docker://{}/team/app:v1", site.berth.host());
    let output = skopeo_copy(
        &source,
        dest.path(),
        &["--src-creds", "<token>:wrong-key-0123456789"],
    )
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("401") || stderr.contains("nauthorized"),
        "{stderr}"
    );
    assert_eq!(site.tap.requests(), vec![], "nothing reached the registry");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_of_another_repositorys_blob_is_refused_even_when_cached() {
    let site = Site::start("").await;
    let admin = Some(("<token>", ADMIN_KEY));
    let alice = Some(("alice@example.com", ALICE_KEY));
    // The admin pulls secret/app: its manifest and blobs are now in the cache.
    let manifest = site.get("/v2/secret/app/manifests/v1", admin).await;
    assert_eq!(manifest.status, 200);
    for blob in site.secret.blobs() {
        let path = format!("/v2/secret/app/blobs/{}", blob.digest);
        assert_eq!(site.get(&path, admin).await.body, blob.bytes);
    }
    site.tap.reset();

    // Alice may pull team/app, and asks for secret/app's private layer through it.
    let private = &site.secret.layers[0].blob;
    let through_app = format!("/v2/team/app/blobs/{}", private.digest);
    let refused = site.get(&through_app, alice).await;
    assert_eq!(refused.status, 404, "{:?}", refused.body);
    assert_eq!(error_code(&refused.body), "BLOB_UNKNOWN");
    assert_ne!(refused.body, private.bytes);
    // Its manifest by digest, the same.
    let by_digest = format!("/v2/team/app/manifests/{}", site.secret.digest());
    let refused = site.get(&by_digest, alice).await;
    assert_eq!(refused.status, 404);
    assert_eq!(error_code(&refused.body), "MANIFEST_UNKNOWN");
    // berth asked team/app's upstream (HEAD) and fetched nothing.
    assert_eq!(site.tap.count(Method::HEAD, Kind::Blob), 1);
    assert_eq!(site.tap.count(Method::HEAD, Kind::Manifest), 1);
    assert_eq!(site.tap.count(Method::GET, Kind::Blob), 0);
    assert_eq!(site.tap.count(Method::GET, Kind::Manifest), 0);

    // The layer both images share is team/app's too: confirmed once, then served from cache.
    let shared = &site.app.layers[1].blob;
    let through_app = format!("/v2/team/app/blobs/{}", shared.digest);
    let served = site.get(&through_app, alice).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, shared.bytes);
    assert_eq!(served.header("x-cache"), Some("HIT"));
    assert_eq!(site.get(&through_app, alice).await.status, 200);
    assert_eq!(site.tap.count(Method::HEAD, Kind::Blob), 2);
    assert_eq!(site.tap.count(Method::GET, Kind::Blob), 0);

    // After alice pulls team/app's manifest, its blobs are known without asking.
    site.tap.reset();
    assert_eq!(
        site.get("/v2/team/app/manifests/v1", alice).await.status,
        200
    );
    let config = format!("/v2/team/app/blobs/{}", site.app.config.digest);
    assert_eq!(site.get(&config, alice).await.status, 200);
    assert_eq!(site.tap.count(Method::HEAD, Kind::Blob), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_grant_only_what_the_policies_allow() {
    let site = Site::start("").await;
    let alice = ("alice@example.com", ALICE_KEY);
    let token = token_of(
        &site
            .token(
                alice,
                &[
                    "repository:team/app:pull,push",
                    "repository:secret/app:pull",
                    "repository:nowhere.example/x:pull",
                ],
            )
            .await,
    );
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], "//user/alice@example.com");
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": format!("{OWN}/team/app"), "actions": ["pull"]}])
    );
    let allowed = site.bearer("/v2/team/app/manifests/v1", &token).await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.body, site.app.manifest.bytes);
    // The policies deny secret/app to alice: 403, token or not.
    let denied = site.bearer("/v2/secret/app/manifests/v1", &token).await;
    assert_eq!(denied.status, 403);
    // mirror.test is public, so alice may pull it, but this token does not cover it: the
    // client is told to fetch one that does.
    let other = site
        .bearer("/v2/mirror.test/team/app/manifests/v1", &token)
        .await;
    assert_eq!(other.status, 401);
    let challenge = other.header("www-authenticate").unwrap();
    assert!(
        challenge.ends_with(
            "scope=\"repository:mirror.test/team/app:pull\",error=\"insufficient_scope\""
        ),
        "{challenge}"
    );
    // A forged token (alice's claims, another signature) is refused.
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[2] = "AAAA";
    assert_eq!(
        site.bearer("/v2/team/app/manifests/v1", &parts.join("."))
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_oauth2_password_grant_issues_the_same_tokens_as_get() {
    let site = Site::start("").await;
    let url = format!("{}/token", site.berth.url());
    let post = |pairs: Vec<(&str, &str)>| {
        let form = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        let headers = [("content-type", "application/x-www-form-urlencoded")];
        fetch(request(
            Method::POST,
            &url,
            None,
            &headers,
            Bytes::from(form),
        ))
    };
    let alice = |password| {
        vec![
            ("grant_type", "password"),
            ("username", "alice@example.com"),
            ("password", password),
            ("service", "berth"),
            ("client_id", "containerd-client"),
            // OAuth2 sends every scope in one space-separated field.
            (
                "scope",
                "repository:team/app:pull repository:secret/app:pull",
            ),
        ]
    };

    let granted = post(alice(ALICE_KEY)).await.unwrap();
    let token = token_of(&granted);
    assert_eq!(
        claims_of(&token)["access"],
        json!([{"type": "repository", "name": format!("{OWN}/team/app"), "actions": ["pull"]}])
    );
    let pulled = site.bearer("/v2/team/app/manifests/v1", &token).await;
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.body, site.app.manifest.bytes);

    let wrong = post(alice("not-the-key")).await.unwrap();
    assert_eq!(wrong.status, 401, "{:?}", wrong.body);
    assert_eq!(error_code(&wrong.body), "UNAUTHORIZED");
    // Malformed grants: 400 in the OCI envelope, saying what is wrong.
    for (form, says) in [
        (
            vec![("grant_type", "refresh_token"), ("refresh_token", "x")],
            "no refresh tokens",
        ),
        (
            vec![
                ("grant_type", "password"),
                ("username", "alice@example.com"),
            ],
            "needs username and password",
        ),
    ] {
        let refused = post(form).await.unwrap();
        assert_eq!(refused.status, 400);
        assert_eq!(error_code(&refused.body), "UNSUPPORTED");
        assert!(
            String::from_utf8_lossy(&refused.body).contains(says),
            "{:?}",
            refused.body
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn public_upstreams_serve_every_principal_but_not_anonymous_callers() {
    let site = Site::start("").await;
    let mallory = Some(("mallory@example.com", MALLORY_KEY));
    let fetched = site
        .get("/v2/mirror.test/team/app/manifests/v1", mallory)
        .await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, site.app.manifest.bytes);
    let anonymous = site
        .get("/v2/mirror.test/team/app/manifests/v1", None)
        .await;
    assert_eq!(anonymous.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_and_principal_changes_apply_without_a_restart() {
    let site = Site::start("reload_interval = \"0s\"").await;
    let mallory = Some(("mallory@example.com", MALLORY_KEY));
    let path = "/v2/team/app/manifests/v1";
    assert_eq!(site.get(path, mallory).await.status, 403);
    write_json(
        &site.policies_dir().join("mallory-team.json"),
        &pull_policy(
            "mallory-team",
            repository_is("team/app"),
            "pull",
            "//user/mallory@example.com",
        ),
    );
    assert_eq!(site.get(path, mallory).await.status, 200);
    std::fs::remove_file(site.policies_dir().join("mallory-team.json")).unwrap();
    assert_eq!(site.get(path, mallory).await.status, 403);
    // A broken policy file keeps the policies in force.
    std::fs::write(site.policies_dir().join("broken.json"), "{").unwrap();
    assert_eq!(site.get(path, Some(("<token>", CI_KEY))).await.status, 200);
    assert_eq!(site.get(path, mallory).await.status, 403);
    std::fs::remove_file(site.policies_dir().join("broken.json")).unwrap();

    // Revoking a key takes effect at once: the key, even just verified, and tokens of a
    // principal that is gone.
    let token = token_of(
        &site
            .token(("<token>", CI_KEY), &["repository:team/app:pull"])
            .await,
    );
    assert_eq!(site.bearer(path, &token).await.status, 200);
    write_json(
        &site.dir.path().join("principals.json"),
        &json!({
            "serviceAccounts": [{"name": "admin", "keys": [{"hash": hash(ADMIN_KEY)}]}],
            "users": [{"email": "mallory@example.com", "keys": [{"hash": hash(MALLORY_KEY)}]}],
        }),
    );
    assert_eq!(site.get(path, Some(("<token>", CI_KEY))).await.status, 401);
    assert_eq!(site.bearer(path, &token).await.status, 401);
    assert_eq!(
        site.get(path, Some(("<token>", ADMIN_KEY))).await.status,
        200
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_token_is_refused() {
    let site = Site::start("token_ttl = \"1m\"").await;
    let token = token_of(
        &site
            .token(("<token>", CI_KEY), &["repository:team/app:pull"])
            .await,
    );
    assert_eq!(
        site.bearer("/v2/team/app/manifests/v1", &token)
            .await
            .status,
        200
    );
    // From here on, by digest: served from the cache, so nothing waits on the registry while
    // the clock is paused (paused time would jump to the upstream timeouts meanwhile).
    let path = &format!("/v2/team/app/manifests/{}", site.app.digest());
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(site.bearer(path, &token).await.status, 200);
    tokio::time::advance(Duration::from_secs(2)).await;
    let expired = site.bearer(path, &token).await;
    assert_eq!(expired.status, 401);
    assert_eq!(error_code(&expired.body), "UNAUTHORIZED");
    assert!(expired
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer realm="));
    // A fresh token works again.
    tokio::time::resume();
    let fresh = token_of(
        &site
            .token(("<token>", CI_KEY), &["repository:team/app:pull"])
            .await,
    );
    assert_eq!(site.bearer(path, &fresh).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_with_credentials_pulls_allowed_images_and_is_refused_others() {
    let site = Site::start("").await;
    let containerd = Containerd::start().await;
    let allowed = HostsDir::new();
    allowed.mirror(OWN, &site.berth.url(), Some(("<token>", CI_KEY)));
    containerd
        .pull_ok(&format!("{OWN}/team/app:v1"), allowed.path(), &[])
        .await;
    let images = containerd.images().await;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].digest, site.app.digest());
    for blob in site.app.blobs() {
        assert_eq!(
            containerd.blob(&blob.digest).await.as_deref(),
            Some(&blob.bytes[..])
        );
    }
    assert_eq!(containerd.escapes(), Vec::<String>::new());
    // containerd sent the Basic header from hosts.toml on every request: no token round trips.
    let tokens = site.tokens_issued();
    assert_eq!(tokens, 0);

    site.tap.reset();
    let denied = HostsDir::new();
    denied.mirror(
        OWN,
        &site.berth.url(),
        Some(("mallory@example.com", MALLORY_KEY)),
    );
    let output = containerd
        .pull(&format!("{OWN}/secret/app:v1"), denied.path(), &[])
        .await;
    assert!(!output.status.success());
    let refusals = |status: &str| -> u64 {
        ["GET", "HEAD"]
            .iter()
            .map(|method| {
                site.berth
                    .state
                    .metrics
                    .requests
                    .with_label_values(&["manifest", method, status, "DENIED"])
                    .get()
            })
            .sum()
    };
    assert!(refusals("4xx") > 0, "berth refused the pull");
    let wrong = HostsDir::new();
    wrong.mirror(
        OWN,
        &site.berth.url(),
        Some(("<token>", "wrong-key-0123456789abcdef")),
    );
    let output = containerd
        .pull(&format!("{OWN}/team/app:v1"), wrong.path(), &[])
        .await;
    assert!(!output.status.success());
    assert_eq!(site.tap.requests(), vec![], "nothing reached the registry");
}

const ADMIN_TOKEN: &str = "access-test-admin-token-0123";
/// The admin path asking for the access report on `//image/team/app:v1`.
const REPORT_FOR_TEAM_APP: &str = "/admin/access-report?image=%2F%2Fimage%2Fteam%2Fapp%3Av1";

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_serves_the_access_report_behind_its_token() {
    let site = Site::start("").await;
    let url = format!("{}{REPORT_FOR_TEAM_APP}", site.berth.admin_url());
    let refused = support::get(&url, None).await.unwrap();
    assert_eq!(refused.status, 401);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let headers = [("authorization", bearer.as_str())];
    let fetched = support::fetch(support::request(
        http::Method::GET,
        &url,
        None,
        &headers,
        bytes::Bytes::new(),
    ))
    .await
    .unwrap();
    assert_eq!(fetched.status, 200);
    let report: Value = serde_json::from_slice(&fetched.body).unwrap();
    assert_eq!(report["repository"], "team/app");
    let principals = support::strings_at(&report["principals"], "principal");
    assert!(
        principals.contains(&"//user/alice@example.com"),
        "{principals:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_report_lists_who_may_do_what() {
    let site = Site::start("").await;
    let response = berth::admin::access_report(
        &site.berth.state,
        Some("image=%2F%2Fimage%2Fsecret%2Fapp%3Av1"),
    );
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["repository"], "secret/app");
    let who: Vec<(&str, bool)> = report["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["principal"].as_str().unwrap(),
                p["registryPull"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            ("//user/mallory@example.com", false),
            ("//serviceaccount/admin", true)
        ]
    );

    // The CLI prints the same from the config file.
    let config = site.dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[platform]\norg = \"my-org\"\n[access]\nprincipals = \"{}\"\npolicies = \"{}\"\n",
            site.dir.path().join("principals.json").display(),
            site.policies_dir().display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["access-report", "--config"])
        .arg(&config)
        .arg("//image/team/app:v1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("//user/alice@example.com  (registry pull: yes)"),
        "{text}"
    );
    assert!(
        text.contains("pull    policy \"devs-pull\" (target query) via //group/devs"),
        "{text}"
    );
    assert!(
        text.contains("view    policy \"admin\" (target all), implied by manage"),
        "{text}"
    );

    let bad = berth::admin::access_report(&site.berth.state, None);
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_anonymous_mode_has_no_token_service() {
    let registry = Registry::start(Auth::None).await;
    let dir = tempfile::tempdir().unwrap();
    let berth = Berth::with_upstream("r.test", &registry.url(), dir.path()).await;
    let url = format!("{}/token?service=berth", berth.url());
    let fetched = fetch(request(
        Method::GET,
        &url,
        Some(("<token>", "x")),
        &[],
        Bytes::new(),
    ))
    .await
    .unwrap();
    assert_eq!(fetched.status, 404);
    let ping = fetch(request(
        Method::GET,
        &format!("{}/v2/", berth.url()),
        None,
        &[],
        Bytes::new(),
    ))
    .await
    .unwrap();
    assert_eq!(ping.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_key_revokes_the_tokens_minted_with_it() {
    const SECOND_KEY: &str = "ci-key-2-0123456789abcdef0123";
    let site = Site::start("reload_interval = \"0s\"").await;
    let principals = |ci_keys: Value| {
        json!({
            "serviceAccounts": [{"name": "ci", "keys": ci_keys}],
            "groups": [{"name": "devs", "memberLinks": ["//serviceaccount/ci"]}],
        })
    };
    let file = site.dir.path().join("principals.json");
    // A token names its key by the stored hash, which the file keeps as it is.
    let second = hash(SECOND_KEY);
    write_json(
        &file,
        &principals(json!([
            {"name": "old", "hash": hash(CI_KEY)},
            {"name": "new", "hash": second},
        ])),
    );
    let scope = ["repository:team/app:pull"];
    let old = token_of(&site.token(("<token>", CI_KEY), &scope).await);
    let new = token_of(&site.token(("<token>", SECOND_KEY), &scope).await);
    assert_ne!(claims_of(&old)["kid"], claims_of(&new)["kid"]);
    let path = "/v2/team/app/manifests/v1";
    assert_eq!(site.bearer(path, &old).await.status, 200);
    assert_eq!(site.bearer(path, &new).await.status, 200);
    // The old key is rotated out; ci itself stays.
    write_json(&file, &principals(json!([{"name": "new", "hash": second}])));
    let revoked = site.bearer(path, &old).await;
    assert_eq!(revoked.status, 401, "{:?}", revoked.body);
    assert_eq!(site.bearer(path, &new).await.status, 200);
    assert_eq!(site.get(path, Some(("<token>", CI_KEY))).await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_caller_learns_nothing_about_which_registries_are_configured() {
    let site = Site::start("").await;
    for path in [
        "/v2/not-configured.example/team/app/manifests/v1",
        "/v2/team/app/manifests/v1?ns=not-configured.example",
        "/v2/mirror.test/team/app/manifests/v1",
    ] {
        let anonymous = site.get(path, None).await;
        assert_eq!(anonymous.status, 401, "{path}: {:?}", anonymous.body);
        assert_eq!(error_code(&anonymous.body), "UNAUTHORIZED");
        assert!(!String::from_utf8_lossy(&anonymous.body).contains("configured"));
    }
    // An authenticated caller is told.
    let known = site
        .get(
            "/v2/not-configured.example/team/app/manifests/v1",
            Some(("<token>", CI_KEY)),
        )
        .await;
    assert_eq!(known.status, 404);
    assert_eq!(error_code(&known.body), "NAME_UNKNOWN");
}
