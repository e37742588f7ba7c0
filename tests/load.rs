//! `berth load` against real registries: it pulls whole images (index, platform manifest,
//! config, layers) through berth and verifies them, and it reports wrong bytes as errors.
//! The counting tap also shows what a cold pull through berth costs upstream.

mod support;

use std::time::Duration;

use berth::load::{Class, ImageRef, Limit, LoadConfig};
use http::Method;
use support::{
    push_index, random_layer, Auth, Berth, Fault, Flavor, Image, Index, Kind, Platform, Registry,
    Tap,
};

fn config(target: String, image: &str, concurrency: usize, pulls: u64) -> LoadConfig {
    LoadConfig {
        target,
        images: vec![ImageRef::parse(image).unwrap()],
        concurrency,
        limit: Limit::Count(pulls),
        platform: "linux/amd64".into(),
        request_timeout: Duration::from_secs(60),
        metrics: None,
    }
}

/// A registry holding `load/app:v1`, a two-platform index (linux/amd64, linux/arm64).
async fn registry_with_index() -> (Registry, Index) {
    let registry = Registry::start(Auth::None).await;
    let amd64 = Image::random(Flavor::Oci, 40, &[200_000, 30_000]);
    let arm = Platform::new("linux", "arm64", Some("v8"));
    let arm64 = Image::for_platform(Flavor::Oci, arm, vec![random_layer(10_000, 41)]);
    let index = Index::new(Flavor::Oci, vec![amd64, arm64]);
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

    let report = berth::load::run(config(berth.url(), "load/app:v1", 3, 6))
        .await
        .unwrap();

    assert_eq!(report.total_errors(), 0, "{}", report.render());
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
    assert_eq!(
        tap.count(Method::GET, Kind::Blob),
        1 + amd64.layers.len(),
        "{:#?}",
        tap.requests()
    );
    assert_eq!(
        tap.count(Method::GET, Kind::Manifest),
        2,
        "{:#?}",
        tap.requests()
    );
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
