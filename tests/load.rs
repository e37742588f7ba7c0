//! `berth load` against real registries: it pulls whole images (index, platform manifest,
//! config, layers) through berth and verifies them, and it reports wrong bytes as errors.
//! The counting tap also shows what a cold pull through berth costs upstream.

mod support;

use std::time::Duration;

use berth::load::{Class, ImageRef, Limit, LoadConfig, Report};
use berth::secret::Secret;
use berth::secrets::Credentials;
use http::Method;
use support::{
    push_index, random_layer, Auth, Berth, Fault, Flavor, Image, Index, Kind, Platform, Policy,
    Registry, Tap, TokenServer,
};

fn config(target: String, image: &str, concurrency: usize, pulls: u64) -> LoadConfig {
    LoadConfig {
        target,
        images: vec![ImageRef::parse(image, None).unwrap()],
        concurrency,
        layer_concurrency: 3,
        limit: Limit::Count(pulls),
        platform: "linux/amd64".into(),
        request_timeout: Duration::from_secs(60),
        metrics: None,
        credentials: None,
        ca_file: None,
    }
}

fn as_user(mut config: LoadConfig, user: &str, password: &str) -> LoadConfig {
    config.credentials = Some(Credentials {
        username: user.into(),
        password: Secret::new(password),
        id: "test".into(),
    });
    config
}

/// Runs `config` and checks that nothing failed.
async fn run_clean(config: LoadConfig) -> Report {
    let report = berth::load::run(config).await.unwrap();
    assert_eq!(report.total_errors(), 0, "{}", report.render());
    report
}

/// Every pull failed, and the first error says why.
fn assert_all_failed(report: &Report, pulls: u64, why: &str) {
    assert_eq!(report.recorder.pulls, pulls);
    assert_eq!(report.recorder.failed_pulls, pulls, "{}", report.render());
    assert!(
        report.recorder.error_samples[0].contains(why),
        "{:?}",
        report.recorder.error_samples
    );
}

/// A two-platform index (linux/amd64, linux/arm64).
fn two_platforms() -> Index {
    let amd64 = Image::random(Flavor::Oci, 40, &[200_000, 30_000]);
    let arm = Platform::new("linux", "arm64", Some("v8"));
    let arm64 = Image::for_platform(Flavor::Oci, arm, vec![random_layer(10_000, 41)]);
    Index::new(Flavor::Oci, vec![amd64, arm64])
}

/// A registry holding `load/app:v1`, `two_platforms()`.
async fn registry_with_index() -> (Registry, Index) {
    let registry = Registry::start(Auth::None).await;
    let index = two_platforms();
    push_index(&registry.url(), "load/app", "v1", &index, None)
        .await
        .unwrap();
    (registry, index)
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_whole_index_images_through_berth_and_each_object_is_fetched_upstream_once() {
    let (registry, index) = registry_with_index().await;
    let tap = Tap::start(&registry.url()).await;
    let cache = tempfile::tempdir().unwrap();
    let berth = Berth::with_upstream(&tap.host(), &tap.url(), cache.path()).await;

    let report = run_clean(config(berth.url(), "load/app:v1", 3, 6)).await;
    assert_eq!(
        (report.recorder.pulls, report.recorder.failed_pulls),
        (6, 0)
    );
    let amd64 = &index.images[0];
    let requests = |class| report.recorder.classes[&class].durations.len();
    assert_eq!(requests(Class::Manifest), 6);
    assert_eq!(requests(Class::Child), 6);
    assert_eq!(requests(Class::Config), 6);
    assert_eq!(requests(Class::Layer), 6 * amd64.layers.len());
    let layer_bytes: usize = amd64.layers.iter().map(|l| l.blob.len()).sum();
    assert_eq!(
        report.recorder.classes[&Class::Layer].bytes,
        6 * layer_bytes as u64
    );
    // Six pulls of one image cost one upstream GET per object: config and layers once each,
    // the index and the platform manifest once each, and no version check before each call.
    tap.assert_count(Method::GET, Kind::Blob, 1 + amd64.layers.len());
    tap.assert_count(Method::GET, Kind::Manifest, 2);
    assert!(
        tap.count(Method::GET, Kind::Other) <= 1,
        "{:#?}",
        tap.requests()
    );
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_a_blob_whose_bytes_do_not_match_its_digest_as_an_error() {
    let (registry, _) = registry_with_index().await;
    // Straight at a misbehaving registry: the load tool is a client of any registry.
    let tap = Tap::start(&registry.url()).await;
    tap.inject(Kind::Blob, Fault::CorruptBlob);

    let report = berth::load::run(config(tap.url(), "load/app:v1", 1, 2))
        .await
        .unwrap();

    assert_eq!(report.recorder.failed_pulls, 2);
    assert_eq!(report.recorder.classes[&Class::Config].errors, 2);
    assert!(
        report.recorder.error_samples[0].contains("hashes to"),
        "{:?}",
        report.recorder.error_samples
    );
    assert!(report.render().contains("error: "));
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_through_the_token_flow_with_one_token_for_the_run() {
    let tokens =
        TokenServer::start(Policy::new().user("alice", "alice-pw", &[("load/*", "pull")])).await;
    let registry = Registry::start(tokens.auth()).await;
    tokens
        .seed_index(&registry.url(), "load/app", "v1", &two_platforms())
        .await
        .unwrap();

    let run = config(registry.url(), "load/app:v1", 1, 4);
    let report = run_clean(as_user(run, "alice", "alice-pw")).await;
    assert_eq!(report.recorder.pulls, 4);
    // The first request meets the challenge; its token serves the other 19 requests.
    let requests = tokens.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0].user.as_deref(), Some("alice"));
    assert_eq!(requests[0].scopes, ["repository:load/app:pull"]);
    assert_eq!(requests[0].granted, ["repository:load/app:pull"]);

    tokens.reset();
    let concurrent = config(registry.url(), "load/app:v1", 4, 8);
    run_clean(as_user(concurrent, "alice", "alice-pw")).await;
    assert!(tokens.count(Some("alice")) <= 4, "{:#?}", tokens.requests());

    let wrong = config(registry.url(), "load/app:v1", 1, 2);
    let report = berth::load::run(as_user(wrong, "alice", "not-her-pw"))
        .await
        .unwrap();
    assert_all_failed(&report, 2, "getting a token: upstream answered 401");

    let anonymous = config(registry.url(), "load/app:v1", 1, 2);
    let report = berth::load::run(anonymous).await.unwrap();
    // An anonymous token grants nothing here: the registry refuses it.
    assert_all_failed(&report, 2, "status 401 Unauthorized");
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_from_a_basic_auth_registry_with_credentials_and_is_refused_without() {
    let registry = Registry::start(Auth::basic("puller", "pull-pw")).await;
    push_index(
        &registry.url(),
        "load/app",
        "v1",
        &two_platforms(),
        registry.creds(),
    )
    .await
    .unwrap();

    let run = config(registry.url(), "load/app:v1", 2, 4);
    run_clean(as_user(run, "puller", "pull-pw")).await;

    let wrong = config(registry.url(), "load/app:v1", 1, 2);
    let report = berth::load::run(as_user(wrong, "puller", "nope"))
        .await
        .unwrap();
    assert_all_failed(&report, 2, "status 401 Unauthorized");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_target_fails_every_pull_and_names_the_request() {
    // Bound and dropped: nothing listens there any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("http://127.0.0.1:{port}");
    let report = berth::load::run(config(target.clone(), "load/app:v1", 1, 2))
        .await
        .unwrap();
    assert_all_failed(
        &report,
        2,
        &format!("cannot connect: GET {target}/v2/load/app/manifests/v1"),
    );
}
