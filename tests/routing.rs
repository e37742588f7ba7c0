//! One berth in front of every kind of upstream: an anonymous registry, one with htpasswd Basic
//! auth (credentials from a docker pull secret), and one with token auth (as Docker Hub and GHCR
//! do it), routed by containerd's `?ns=`, by a host prefix and by `default_upstream`; and
//! containerd pulling through berth as its `hosts.toml` mirror.

mod support;

use std::path::Path;

use bytes::Bytes;
use http::Method;
use support::stack::registry_with;
use support::token::{Policy, TokenServer};
use support::{
    fetch, push_image, read_oci_layout, request, skopeo_copy_ok, Auth, Berth, Containerd, Fetched,
    Flavor, HostsDir, Image, Kind, Registry, Tap,
};

/// Three registries with the same repository name and different images, and one berth.
struct Fleet {
    _anon: Registry,
    _basic: Registry,
    tokens: TokenServer,
    _token: Registry,
    token_tap: Tap,
    images: [Image; 3],
    berth: Berth,
    _dir: tempfile::TempDir,
}

fn config(
    fleet_dir: &Path,
    anon: &Registry,
    basic: &Registry,
    token_url: &str,
    extra: &str,
) -> String {
    let docker_secret = fleet_dir.join("pull-secret.json");
    let auth = base64_basic("puller", "pull-pw");
    let auths = serde_json::json!({ "auths": { "basic.test": { "auth": auth } } });
    std::fs::write(&docker_secret, auths.to_string()).unwrap();
    format!(
        r#"
listen = "127.0.0.1:0"
default_upstream = "anon.test"
[cache]
dir = "{cache}"
[[upstream]]
host = "anon.test"
endpoint = "{anon}"
[[upstream]]
host = "basic.test"
endpoint = "{basic}"
[[upstream]]
host = "token.test"
endpoint = "{token_url}"
username = "alice"
password = "alice-pw"
[[secret]]
name = "basic-pull"
type = "docker"
file = "{secret}"
{extra}
"#,
        cache = fleet_dir.join("cache").display(),
        anon = anon.url(),
        basic = basic.url(),
        secret = docker_secret.display(),
    )
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

impl Fleet {
    async fn start(extra: &str) -> Fleet {
        let anon = Registry::start(Auth::None).await;
        let basic = Registry::start(Auth::basic("puller", "pull-pw")).await;
        let policy = Policy::new()
            .user("alice", "alice-pw", &[("team/*", "pull")])
            .user("mallory", "mallory-pw", &[("other/*", "pull")]);
        let tokens = TokenServer::start(policy).await;
        let token = Registry::start(tokens.auth()).await;
        let token_tap = Tap::start(&token.url()).await;
        let images = [1, 2, 3].map(|seed| Image::random(Flavor::Oci, seed, &[20_000, 70_000]));
        push_image(&anon.url(), "team/app", "v1", &images[0], None)
            .await
            .unwrap();
        push_image(&basic.url(), "team/app", "v1", &images[1], basic.creds())
            .await
            .unwrap();
        tokens
            .seed_image(&token.url(), "team/app", "v1", &images[2])
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = config(dir.path(), &anon, &basic, &token_tap.url(), extra);
        let berth = Berth::start(&text).await;
        Fleet {
            _anon: anon,
            _basic: basic,
            tokens,
            _token: token,
            token_tap,
            images,
            berth,
            _dir: dir,
        }
    }

    async fn manifest(&self, path: &str) -> Fetched {
        let url = format!("{}/v2/{path}", self.berth.url());
        let accept = [("accept", Flavor::Oci.manifest_type())];
        fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_berth_routes_by_ns_by_host_prefix_and_by_default() {
    let fleet = Fleet::start("").await;
    let cases = [
        ("team/app/manifests/v1", 0),
        ("anon.test/team/app/manifests/v1", 0),
        ("team/app/manifests/v1?ns=anon.test", 0),
        ("basic.test/team/app/manifests/v1", 1),
        ("team/app/manifests/v1?ns=basic.test", 1),
        ("token.test/team/app/manifests/v1", 2),
        ("team/app/manifests/v1?ns=token.test", 2),
    ];
    for (path, which) in cases {
        let fetched = fleet.manifest(path).await;
        assert_eq!(fetched.status, 200, "{path}: {:?}", fetched.body);
        assert_eq!(fetched.body, fleet.images[which].manifest.bytes, "{path}");
    }
    // Blobs route the same way, through each upstream's auth.
    for (prefix, which) in [("", 0), ("basic.test/", 1), ("token.test/", 2)] {
        let layer = &fleet.images[which].layers[0].blob;
        let fetched = fleet
            .manifest(&format!("{prefix}team/app/blobs/{}", layer.digest))
            .await;
        assert_eq!(
            (fetched.status.as_u16(), fetched.body.len()),
            (200, layer.len()),
            "{prefix}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_from_the_token_registry_with_one_token_per_scope() {
    let fleet = Fleet::start("").await;
    let dest = tempfile::tempdir().unwrap();
    let source = format!("docker://{}/token.test/team/app:v1", fleet.berth.host());
    skopeo_copy_ok(&source, dest.path(), &["--preserve-digests"]).await;
    let layout = read_oci_layout(dest.path()).unwrap();
    assert_eq!(layout.manifest_digest, fleet.images[2].digest());
    // The first request learns the challenge; after that the token is fetched up front and
    // reused, so one token serves the whole pull.
    assert_eq!(
        fleet.tokens.count(Some("alice")),
        1,
        "{:#?}",
        fleet.tokens.requests()
    );
    let seen = fleet.token_tap.seen();
    let bare = seen
        .iter()
        .filter(|s| !s.headers.contains_key("authorization"))
        .count();
    assert_eq!(
        bare, 1,
        "only the very first request went without a token: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_or_missing_credentials_give_403_never_500() {
    let anon = Registry::start(Auth::None).await;
    let basic = Registry::start(Auth::basic("puller", "pull-pw")).await;
    let tokens =
        TokenServer::start(Policy::new().user("mallory", "mallory-pw", &[("other/*", "pull")]))
            .await;
    let token = Registry::start(tokens.auth()).await;
    let image = Image::random(Flavor::Oci, 9, &[1000]);
    push_image(&basic.url(), "team/app", "v1", &image, basic.creds())
        .await
        .unwrap();
    tokens
        .seed_image(&token.url(), "team/app", "v1", &image)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The docker secret has the wrong password; the token user has no rights on team/app;
    // "nosecret.test" is the basic registry with no credentials at all.
    let text = config(dir.path(), &anon, &basic, &token.url(), "")
        .replace("alice", "mallory")
        .replace(
            "[[secret]]",
            &format!(
                "[[upstream]]\nhost = \"nosecret.test\"\nendpoint = \"{}\"\n[[secret]]",
                basic.url()
            ),
        );
    let wrong =
        serde_json::json!({"auths": {"basic.test": {"auth": base64_basic("puller", "wrong")}}});
    std::fs::write(dir.path().join("pull-secret.json"), wrong.to_string()).unwrap();
    let berth = Berth::start(&text).await;
    for path in [
        "basic.test/team/app/manifests/v1",
        "nosecret.test/team/app/manifests/v1",
        "token.test/team/app/manifests/v1",
        &format!("token.test/team/app/blobs/{}", image.layers[0].blob.digest),
    ] {
        let url = format!("{}/v2/{path}", berth.url());
        let fetched = fetch(request(Method::GET, &url, None, &[], Bytes::new()))
            .await
            .unwrap();
        assert_eq!(fetched.status.as_u16(), 403, "{path}: {:?}", fetched.body);
        let json: serde_json::Value = serde_json::from_slice(&fetched.body).unwrap();
        assert_eq!(json["errors"][0]["code"], "DENIED", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_registry_needs_a_docker_secret() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
listen = "127.0.0.1:0"
[platform]
org = "my-org"
[cache]
dir = "{}"
[[upstream]]
host = "my-org.registry.cpln.io"
endpoint = "{url}"
[[upstream]]
host = "*.registry.cpln.io"
endpoint = "{url}"
"#,
        dir.path().display(),
        url = tap.url()
    );
    let berth = Berth::start(&text).await;
    let image = Image::random(Flavor::Oci, 5, &[1000]);
    push_image(&registry.url(), "app", "v1", &image, None)
        .await
        .unwrap();
    let ours = format!(
        "{}/v2/my-org.registry.cpln.io/app/manifests/v1",
        berth.url()
    );
    let accept = [("accept", Flavor::Oci.manifest_type())];
    let fetched = fetch(request(Method::GET, &ours, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 200);
    // That GET fetched no blob (prefetch starts at the first blob GET, `trigger`).
    tap.assert_count(Method::GET, Kind::Blob, 0);
    tap.reset();
    let theirs = format!(
        "{}/v2/other-org.registry.cpln.io/app/manifests/v1",
        berth.url()
    );
    let fetched = fetch(request(Method::GET, &theirs, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 403);
    assert!(
        tap.requests().is_empty(),
        "nothing was dialled: {:#?}",
        tap.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_berth_as_its_hosts_toml_mirror() {
    let image = Image::random(Flavor::Oci, 31, &[64 << 10, 256 << 10]);
    let (_registry, tap) = registry_with(&image, "team/app", "v1").await;
    let dir = tempfile::tempdir().unwrap();
    // The mirrored registry is not the default: only `?ns=` can route containerd's requests.
    let text = format!(
        r#"
listen = "127.0.0.1:0"
[cache]
dir = "{}"
[[upstream]]
host = "mirrored.test"
endpoint = "{}"
"#,
        dir.path().display(),
        tap.url()
    );
    let berth = Berth::start(&text).await;
    let containerd = Containerd::start().await;
    let hosts = HostsDir::new();
    hosts.mirror("mirrored.test", &berth.url(), None);

    containerd
        .pull_ok("mirrored.test/team/app:v1", hosts.path(), &[])
        .await;
    let images = containerd.images().await;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].digest, image.digest());
    for blob in image.blobs() {
        assert_eq!(
            containerd.blob(&blob.digest).await.as_deref(),
            Some(&blob.bytes[..])
        );
    }
    assert_eq!(tap.count(Method::GET, Kind::Blob), image.blobs().len());
    assert_eq!(
        containerd.escapes(),
        Vec::<String>::new(),
        "nothing bypassed berth"
    );

    // A second node (a fresh containerd) pulls the same image: every blob is a cache hit.
    let second = Containerd::start().await;
    second
        .pull_ok("mirrored.test/team/app:v1", hosts.path(), &[])
        .await;
    assert_eq!(tap.count(Method::GET, Kind::Blob), image.blobs().len());
}
