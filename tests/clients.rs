//! What real clients and registries do that the other tests did not: pinned references
//! (`NAME:TAG@DIGEST`), one tag answering differently per `Accept`, registries that drop
//! `Docker-Content-Digest` on HEAD, every serve-stale trigger, the edge answers registries give
//! (404 for an invalid manifest reference, `Allow` on 405, 502 for an upstream 5xx), manifest
//! recency on disk, a fill whose first client left, `berth warm --user`, and the command line.
//!
//! Against the real registry behind the counting tap; the tap only drops a header or injects
//! statuses a real registry does not produce on demand. Current-thread runtime (as in
//! `freshness`) where tokio's clock is moved past a TTL.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::json;
use support::berth::policy_mode_tables;
use support::error_code;
use support::process::output_text;
use support::stack::registry_with;
use support::{
    fetch, get, push_image, read_body, request, send, Berth, Fault, Fetched, Flavor, Image, Kind,
    Registry, Stack, Tap,
};

/// What containerd 1.7 sends for a manifest (`remotes/docker/resolver.go`).
const CONTAINERD_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

/// What an old docker client sends: no OCI types.
const OLD_DOCKER_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.v1+prettyjws, application/json";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

const TTL: Duration = Duration::from_secs(31);

/// Moves tokio's clock (and so berth's view of time) forward.
async fn age(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

async fn pull(stack: &Stack, repo: &str, reference: &str, accept: Option<&str>) -> Fetched {
    let url = format!("{}/v2/{repo}/manifests/{reference}", stack.berth.url());
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    fetch(request(Method::GET, &url, None, &headers, Bytes::new()))
        .await
        .unwrap()
}

fn manifest_requests(tap: &Tap) -> (usize, usize) {
    (
        tap.count(Method::GET, Kind::Manifest),
        tap.count(Method::HEAD, Kind::Manifest),
    )
}

/// The `Accept` of every manifest request of this method the tap saw.
fn upstream_accepts(tap: &Tap, method: Method) -> Vec<String> {
    tap.seen()
        .iter()
        .filter(|s| s.kind == Kind::Manifest && s.method == method)
        .map(|s| {
            s.headers
                .get("accept")
                .map_or("", |v| v.to_str().unwrap())
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_404_for_a_client_without_the_oci_types_is_never_served_to_containerd() {
    let stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 1501, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();

    // distribution refuses an OCI manifest to a client that does not list the OCI types.
    let old = pull(&stack, "team/app", "v1", Some(OLD_DOCKER_ACCEPT)).await;
    assert_eq!(
        (old.status.as_u16(), error_code(&old.body)),
        (404, "MANIFEST_UNKNOWN".into())
    );
    let again = pull(&stack, "team/app", "v1", Some(OLD_DOCKER_ACCEPT)).await;
    assert_eq!(again.status, 404);
    assert_eq!(
        manifest_requests(&stack.tap),
        (1, 0),
        "the second 404 was remembered"
    );

    // containerd accepts OCI: the remembered 404 is not its answer.
    let containerd = pull(&stack, "team/app", "v1", Some(CONTAINERD_ACCEPT)).await;
    assert_eq!(
        (containerd.status.as_u16(), containerd.header("x-cache")),
        (200, Some("MISS"))
    );
    assert_eq!(containerd.body, image.manifest.bytes);
    assert_eq!(containerd.header("content-type"), Some(OCI_MANIFEST));
    let accepts = upstream_accepts(&stack.tap, Method::GET);
    assert!(!accepts[0].contains(OCI_MANIFEST), "{accepts:?}");
    assert!(accepts[1].contains(OCI_MANIFEST), "{accepts:?}");

    // Each class keeps its own answer.
    let hit = pull(&stack, "team/app", "v1", Some(CONTAINERD_ACCEPT)).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    let old = pull(&stack, "team/app", "v1", Some(OLD_DOCKER_ACCEPT)).await;
    assert_eq!(old.status, 404);
    assert_eq!(manifest_requests(&stack.tap), (2, 0));

    // Revalidation asks with the class's Accept, so the upstream confirms what it gave.
    age(TTL).await;
    stack.tap.reset();
    let revalidated = pull(&stack, "team/app", "v1", Some(CONTAINERD_ACCEPT)).await;
    assert_eq!(revalidated.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(manifest_requests(&stack.tap), (0, 1));
    let head_accept = &upstream_accepts(&stack.tap, Method::HEAD)[0];
    assert!(head_accept.contains(OCI_MANIFEST), "{head_accept}");
    assert!(head_accept.contains("*/*"), "{head_accept}");
}

#[tokio::test]
async fn a_revalidating_head_without_a_digest_falls_back_to_one_get() {
    let stack = Stack::start("").await;
    let first = Image::random(Flavor::Oci, 1502, &[1000]);
    let second = Image::random(Flavor::Oci, 1503, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &first, None)
        .await
        .unwrap();
    assert_eq!(
        pull(&stack, "team/app", "v1", Some(OCI_MANIFEST))
            .await
            .body,
        first.manifest.bytes
    );
    push_image(&stack.registry.url(), "team/app", "v1", &second, None)
        .await
        .unwrap();
    age(TTL).await;
    stack.tap.reset();
    stack
        .tap
        .inject_times(Kind::Manifest, Fault::DropDigestHeader, 1);
    let moved = pull(&stack, "team/app", "v1", Some(OCI_MANIFEST)).await;
    assert_eq!(moved.status, 200);
    assert_eq!(moved.body, second.manifest.bytes);
    assert_eq!(
        manifest_requests(&stack.tap),
        (1, 1),
        "one HEAD without a digest, then one GET"
    );
    // The GET's answer is the tag's mapping now: fresh again.
    let hit = pull(&stack, "team/app", "v1", Some(OCI_MANIFEST)).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
}

#[tokio::test]
async fn a_stale_tag_is_served_when_the_upstream_times_out_fails_or_rate_limits() {
    // A short response timeout and no retries, so the held HEAD times out at once.
    let stack = Stack::start("[client]\nresponse_timeout = \"1s\"\nretries = 0").await;
    let image = Image::random(Flavor::Oci, 1504, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    pull(&stack, "team/app", "v1", Some(OCI_MANIFEST)).await;
    age(TTL).await;
    for (trigger, fault) in [
        ("timeout", Fault::Hold),
        ("5xx", Fault::Status(500, None)),
        ("503", Fault::Status(503, Some(120))),
        ("429", Fault::Status(429, Some(120))),
    ] {
        stack.tap.inject(Kind::Manifest, fault);
        let stale = pull(&stack, "team/app", "v1", Some(OCI_MANIFEST)).await;
        stack.tap.clear_faults();
        stack.tap.resume();
        assert_eq!(
            (stale.status.as_u16(), stale.header("x-cache")),
            (200, Some("STALE")),
            "{trigger}"
        );
        assert_eq!(stale.body, image.manifest.bytes, "{trigger}");
    }
    assert_eq!(stack.berth.state.metrics.stale_served.get(), 4);
}

#[tokio::test]
async fn an_invalid_manifest_reference_is_unknown_and_dials_nothing() {
    let stack = Stack::start("").await;
    let invalid = pull(&stack, "team/app", ".INVALID_MANIFEST_NAME", None).await;
    assert_eq!(
        (invalid.status.as_u16(), error_code(&invalid.body)),
        (404, "MANIFEST_UNKNOWN".into())
    );
    let bad_digest = pull(&stack, "team/app", "sha256:xyz", None).await;
    assert_eq!(
        (bad_digest.status.as_u16(), error_code(&bad_digest.body)),
        (400, "DIGEST_INVALID".into())
    );
    assert!(
        stack.tap.requests().is_empty(),
        "{:?}",
        stack.tap.requests()
    );

    // A method berth does not take: 405 naming the ones it does.
    for (method, path) in [
        (Method::PUT, "/v2/team/app/manifests/v1"),
        (Method::DELETE, "/v2/team/app/blobs/sha256:00"),
        (Method::OPTIONS, "/v2/team/app/tags/list"),
        (Method::POST, "/v2/"),
    ] {
        let url = format!("{}{path}", stack.berth.url());
        let answer = fetch(request(method.clone(), &url, None, &[], Bytes::new()))
            .await
            .unwrap();
        assert_eq!(answer.status, 405, "{method} {path}");
        assert_eq!(answer.header("allow"), Some("GET, HEAD"), "{method} {path}");
    }
}

#[tokio::test]
async fn tag_lists_and_referrers_answer_502_for_an_upstream_5xx_and_keep_429() {
    let stack = Stack::start("").await;
    let tags = format!("{}/v2/team/app/tags/list", stack.berth.url());
    let referrers = format!(
        "{}/v2/team/app/referrers/sha256:{}",
        stack.berth.url(),
        "a".repeat(64)
    );
    for (url, kind) in [(&tags, Kind::Tags), (&referrers, Kind::Other)] {
        for (upstream, expected) in [(500, 502), (503, 502), (504, 502), (429, 429)] {
            stack.tap.inject(kind, Fault::Status(upstream, Some(120)));
            let answer = get(url, None).await.unwrap();
            assert_eq!(answer.status, expected, "{upstream} for {url}");
            assert_eq!(
                answer.header("retry-after"),
                Some("120"),
                "{upstream} for {url}"
            );
            let code = if upstream == 429 {
                "TOOMANYREQUESTS"
            } else {
                "UNAVAILABLE"
            };
            assert_eq!(error_code(&answer.body), code);
        }
        stack.tap.clear_faults();
    }
}

#[tokio::test]
async fn a_manifest_hit_records_recency_on_disk() {
    let stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 1505, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let by_digest = || pull(&stack, "team/app", image.digest(), Some(OCI_MANIFEST));
    assert_eq!(by_digest().await.header("x-cache"), Some("MISS"));
    let hex = image.digest().strip_prefix("sha256:").unwrap();
    let file = stack
        .cache
        .path()
        .join("manifests/sha256")
        .join(&hex[..2])
        .join(hex);
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();

    assert_eq!(by_digest().await.header("x-cache"), Some("HIT"));
    let touched = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert!(
        touched > long_ago + Duration::from_secs(24 * 3600),
        "the hit was not recorded: mtime still {touched:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fill_of_a_blob_whose_first_client_left_completes_and_is_cached() {
    let stack = Stack::start("").await;
    let blob = stack.push(2 << 20, 1506).await;
    stack.tap.inject(Kind::Blob, Fault::PauseAt(256 * 1024));
    let url = stack.url(&blob);
    let mut first = send(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    stack.tap.wait_paused(1).await;
    let (received, _) = read_body(first.body_mut(), 1).await;
    assert!(!received.is_empty() && received.len() < blob.len());
    // The first client goes away mid-blob; the fill goes on without it.
    drop(first);
    stack.tap.resume();
    stack.berth.state.fills.drain(Duration::from_secs(30)).await;
    let digest = berth::oci::digest::Digest::parse(&blob.digest).unwrap();
    assert!(
        stack.berth.state.cache.index.get(&digest).is_some(),
        "the abandoned fill was not cached"
    );
    let next = get(&url, None).await.unwrap();
    assert_eq!(next.header("x-cache"), Some("HIT"));
    assert_eq!(next.body, blob.bytes);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 1);
}

async fn berth_cli(args: Vec<String>, env: Vec<(&'static str, String)>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(&args)
            .envs(env)
            .output()
            .expect("run berth")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_reference_warms_and_resolves_by_its_digest() {
    let registry = Registry::start(support::Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let cache = tempfile::tempdir().unwrap();
    let berth = Berth::with_upstream(&tap.host(), &tap.url(), cache.path()).await;
    // v1 points elsewhere: only the digest may decide what is pulled.
    let tagged = Image::random(Flavor::Oci, 1507, &[1000]);
    let pinned = Image::random(Flavor::Oci, 1508, &[2000, 3000]);
    push_image(&registry.url(), "team/app", "v1", &tagged, None)
        .await
        .unwrap();
    push_image(&registry.url(), "team/app", pinned.digest(), &pinned, None)
        .await
        .unwrap();
    tap.reset();

    let reference = format!("{}/team/app:v1@{}", tap.host(), pinned.digest());
    let args = vec![
        "warm".into(),
        "--target".into(),
        berth.url(),
        reference.clone(),
    ];
    let output = berth_cli(args, vec![]).await;
    assert!(output.status.success(), "{}", output_text(&output));
    let manifests: Vec<String> = tap
        .seen()
        .iter()
        .filter(|s| s.kind == Kind::Manifest)
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        manifests,
        [format!("/v2/team/app/manifests/{}", pinned.digest())]
    );
    assert_eq!(tap.count(Method::GET, Kind::Blob), pinned.blobs().len());

    let output = berth_cli(
        vec!["resolve".into(), format!("nginx:1.27@{}", pinned.digest())],
        vec![],
    )
    .await;
    assert!(output.status.success(), "{}", output_text(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("repository: library/nginx"), "{printed}");
    assert!(
        printed.contains(&format!("digest:     {}", pinned.digest())),
        "{printed}"
    );
    assert!(printed.contains("pinned tag: 1.27"), "{printed}");
}

const OWN: &str = "my-org.registry.cpln.io";
const CI_KEY: &str = "ci-key-1c0ffee-0123456789abcdef";

#[tokio::test(flavor = "multi_thread")]
async fn warm_pulls_as_a_principal_with_the_key_from_the_environment() {
    let image = Image::random(Flavor::Oci, 1509, &[1000]);
    let (_registry, tap) = registry_with(&image, "team/app", "v1").await;
    let dir = tempfile::tempdir().unwrap();
    let principals = dir.path().join("principals.json");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let hash = berth::access::principals::KeyHash::generate(CI_KEY).to_string();
    let accounts = json!({"serviceAccounts": [{"name": "ci", "keys": [{"hash": hash}]}]});
    std::fs::write(&principals, accounts.to_string()).unwrap();
    let policy = json!({
        "kind": "policy", "name": "ci-pull", "targetKind": "image", "target": "all",
        "bindings": [{"permissions": ["pull"], "principalLinks": ["//serviceaccount/ci"]}],
    });
    std::fs::write(policies.join("ci.json"), policy.to_string()).unwrap();
    let config = format!(
        r#"
listen = "127.0.0.1:0"
default_upstream = "{OWN}"
[platform]
org = "my-org"
{tables}[[upstream]]
host = "{OWN}"
endpoint = "{tap}"
"#,
        tables = policy_mode_tables(dir.path()),
        tap = tap.url(),
    );
    let berth = Berth::start(&config).await;
    let warm = |user: Option<&str>, env: Vec<(&'static str, String)>| {
        let mut args = vec!["warm".to_string(), "--target".into(), berth.url()];
        if let Some(user) = user {
            args.extend(["--user".to_string(), user.to_string()]);
        }
        args.push("team/app:v1".into());
        berth_cli(args, env)
    };

    let anonymous = warm(None, vec![]).await;
    assert!(!anonymous.status.success(), "{}", output_text(&anonymous));
    assert!(
        output_text(&anonymous).contains("401"),
        "{}",
        output_text(&anonymous)
    );

    let no_key = warm(Some("<token>"), vec![]).await;
    assert!(!no_key.status.success());
    assert!(
        output_text(&no_key).contains("BERTH_WARM_PASSWORD"),
        "{}",
        output_text(&no_key)
    );

    let warmed = warm(
        Some("<token>"),
        vec![("BERTH_WARM_PASSWORD", CI_KEY.to_string())],
    )
    .await;
    assert!(warmed.status.success(), "{}", output_text(&warmed));
    assert!(
        String::from_utf8_lossy(&warmed.stdout).contains("warmed 1 image(s)"),
        "{}",
        output_text(&warmed)
    );
    assert_eq!(tap.count(Method::GET, Kind::Blob), image.blobs().len());

    // The access report reads a pinned reference too: judged by the digest, shown with its tag.
    let config_path = dir.path().join("berth.toml");
    std::fs::write(&config_path, &config).unwrap();
    let pinned = format!("//image/team/app:v1@{}", image.digest());
    let args = vec![
        "access-report".to_string(),
        "--config".into(),
        config_path.display().to_string(),
        pinned,
    ];
    let report = berth_cli(args, vec![]).await;
    assert!(report.status.success(), "{}", output_text(&report));
    let printed = String::from_utf8_lossy(&report.stdout);
    assert!(
        printed.contains(&format!("{OWN}/team/app:v1@{}", image.digest())),
        "{printed}"
    );
    assert!(printed.contains("//serviceaccount/ci"), "{printed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_flags_override_the_config_and_a_bad_config_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let serve = |config: String| vec!["serve".to_string(), "--config".into(), config];
    for (bad, key) in [
        ("[cache]\ntag_ttl = \"soon\"\n", "tag_ttl"),
        ("default_upstream = \"nowhere.io\"\n", "default_upstream"),
        ("[cache]\nmax_sise = \"1GiB\"\n", "max_sise"),
        (
            "[[upstream]]\nhost = \"a.io\"\nendpoint = \"ftp://a.io\"\n",
            "upstream[0].endpoint",
        ),
    ] {
        let output = berth_cli(serve(write("bad.toml", bad)), vec![]).await;
        assert_eq!(
            output.status.code(),
            Some(1),
            "{bad}: {}",
            output_text(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{bad}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = berth_cli(
        serve(dir.path().join("nope.toml").display().to_string()),
        vec![],
    )
    .await;
    assert_eq!(missing.status.code(), Some(1), "{}", output_text(&missing));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.toml"));

    // The config's listen address is taken (held here), so only --listen lets berth start;
    // the cache goes where --cache-dir says, not where the config does.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config_cache = dir.path().join("config-cache");
    let flag_cache = dir.path().join("flag-cache");
    let config = write(
        "good.toml",
        &format!(
            "listen = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\n[cache]\ndir = \"{}\"\n",
            held.local_addr().unwrap(),
            config_cache.display()
        ),
    );
    let mut process = support::BerthProcess::spawn_args(&[
        "serve",
        "--config",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        &flag_cache.display().to_string(),
    ]);
    let line = process.wait_line("berth is serving");
    let listen = line
        .split(" listen=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert_ne!(listen, held.local_addr().unwrap().to_string());
    let ping = get(&format!("http://{listen}/v2/"), None).await.unwrap();
    assert_eq!(ping.status, 200);
    assert!(flag_cache.join("blobs").is_dir());
    assert!(!config_cache.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_says_loading_index_until_the_index_is_rebuilt() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    // A FIFO berth reads before it rebuilds the index (`BERTH_TEST_LOADING_GATE`): it holds
    // berth in "loading" for exactly as long as the test needs. (A FIFO inside the cache would
    // be skipped: start-up reads only plain files there.)
    let fifo = work.path().join("gate");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[cache]\ndir = \"{}\"\n[[upstream]]\nhost = \"r.test\"\nendpoint = \"http://127.0.0.1:9\"\n",
        cache.display()
    );
    let gate = fifo.display().to_string();
    let mut process = support::BerthProcess::spawn_env(
        &config,
        work.path(),
        &[("BERTH_TEST_LOADING_GATE", gate.as_str())],
    );
    let line = process.wait_line("loading the cache index");
    let admin = line
        .split("admin=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let readyz = get(&format!("http://{admin}/readyz"), None).await.unwrap();
    assert_eq!(readyz.status, 503);
    assert!(String::from_utf8_lossy(&readyz.body).contains("loading index"));
    let healthz = get(&format!("http://{admin}/healthz"), None).await.unwrap();
    assert_eq!(healthz.status, 200);

    // Open the gate.
    let writer = fifo.clone();
    tokio::task::spawn_blocking(move || std::fs::write(writer, "go\n"))
        .await
        .unwrap()
        .unwrap();
    process.wait_line("berth is serving");
    // The API listener is marked serving just after that line; wait for it (bounded).
    let mut answers = Vec::new();
    for _ in 0..200 {
        let readyz = get(&format!("http://{admin}/readyz"), None).await.unwrap();
        let body = String::from_utf8_lossy(&readyz.body).into_owned();
        assert!(!body.contains("loading index"), "{body}");
        if readyz.status == 200 {
            return;
        }
        answers.push(body);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never ready: {answers:?}");
}

/// A private podman: its own storage root and runroot (vfs, no kernel overlay needed), its own
/// registries.conf (CONTAINERS_REGISTRIES_CONF), containers.conf and signature policy, and a
/// dead proxy so nothing it might try beyond the mirror leaves the machine.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new(registries_conf: &str) -> Podman {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        std::fs::write(path.join("registries.conf"), registries_conf).unwrap();
        std::fs::write(
            path.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .unwrap();
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
            path.join("runroot").display(),
            path.join("root").display()
        );
        std::fs::write(path.join("storage.conf"), storage).unwrap();
        std::fs::write(
            path.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        for sub in ["root", "runroot", "tmp", "home"] {
            std::fs::create_dir(path.join(sub)).unwrap();
        }
        Podman { dir }
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        let path = self.dir.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("podman")
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", path.join("home"))
                .env("TMPDIR", path.join("tmp"))
                .env("CONTAINERS_REGISTRIES_CONF", path.join("registries.conf"))
                .env("CONTAINERS_CONF", path.join("containers.conf"))
                .env("CONTAINERS_STORAGE_CONF", path.join("storage.conf"))
                .env("HTTP_PROXY", "http://127.0.0.1:9")
                .env("HTTPS_PROXY", "http://127.0.0.1:9")
                .env("NO_PROXY", "127.0.0.1")
                .arg("--root")
                .arg(path.join("root"))
                .arg("--runroot")
                .arg(path.join("runroot"))
                .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
                .args(["--events-backend", "none", "--runtime", "runc"])
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run podman")
        })
        .await
        .unwrap()
    }

    async fn pull(&self, reference: &str) -> std::process::Output {
        let policy = self.dir.path().join("policy.json").display().to_string();
        self.run(&["pull", "--signature-policy", &policy, reference])
            .await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_pulls_ghcr_and_docker_hub_names_through_a_path_prefix_mirror() {
    // Two registries on loopback ports stand in for ghcr.io and Docker Hub.
    let ghcr = Registry::start(support::Auth::None).await;
    let ghcr_tap = Tap::start(&ghcr.url()).await;
    let hub = Registry::start(support::Auth::None).await;
    let hub_tap = Tap::start(&hub.url()).await;
    let app = Image::random(Flavor::Oci, 1510, &[20_000]);
    let base = Image::random(Flavor::Docker, 1511, &[30_000]);
    push_image(&ghcr.url(), "org/app", "v1", &app, None)
        .await
        .unwrap();
    push_image(&hub.url(), "library/base", "1.0", &base, None)
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let berth = Berth::start(&format!(
        r#"
listen = "127.0.0.1:0"
[cache]
dir = "{}"
[[upstream]]
host = "ghcr.io"
endpoint = "{}"
[[upstream]]
host = "docker.io"
endpoint = "{}"
"#,
        cache.path().display(),
        ghcr_tap.url(),
        hub_tap.url()
    ))
    .await;

    // CRI-O and podman send no ns=: the mirror location's path prefix names the registry. The
    // registries themselves point at a dead port, so a pull can only succeed through berth.
    let registries_conf = format!(
        r#"
unqualified-search-registries = []
[[registry]]
prefix = "ghcr.io"
location = "127.0.0.1:9/ghcr.io"
[[registry.mirror]]
location = "{berth}/ghcr.io"
insecure = true
[[registry]]
prefix = "docker.io"
location = "127.0.0.1:9/docker.io"
[[registry.mirror]]
location = "{berth}/docker.io"
insecure = true
"#,
        berth = berth.host()
    );
    let podman = Podman::new(&registries_conf);
    for (reference, image, tap) in [
        ("ghcr.io/org/app:v1", &app, &ghcr_tap),
        ("docker.io/library/base:1.0", &base, &hub_tap),
        ("docker.io/base:1.0", &base, &hub_tap),
    ] {
        let pulled = podman.pull(reference).await;
        assert!(
            pulled.status.success(),
            "podman pull {reference}: {}",
            output_text(&pulled)
        );
        let inspect = podman
            .run(&["image", "inspect", "--format", "{{.Digest}}", reference])
            .await;
        assert_eq!(
            String::from_utf8_lossy(&inspect.stdout).trim(),
            image.digest(),
            "{}",
            output_text(&inspect)
        );
        assert!(tap.count(Method::GET, Kind::Manifest) >= 1, "{reference}");
    }
    // Each blob came from its registry once; the second docker.io name was the same image.
    assert_eq!(ghcr_tap.count(Method::GET, Kind::Blob), app.blobs().len());
    assert_eq!(hub_tap.count(Method::GET, Kind::Blob), base.blobs().len());
}
