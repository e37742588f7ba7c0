//! Checks the integration-test support itself, with no berth in the loop: the real registry
//! starts (anonymous and Basic), synthetic images push and pull back byte-exact through skopeo,
//! the tap counts exactly what a client asked for, and every `Fault` observably happens.
//!
//! Does not test berth. If one of these fails, every berth integration test is suspect.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::client::{fetch, get, read_body, request, send};
use support::image::sha256_digest;
use support::skopeo::skopeo_copy_ok;
use support::*;

const REPO: &str = "smoke/app";

fn accept(media_types: &[&str]) -> String {
    media_types.join(", ")
}

/// Pulls `HOST/REPO:tag` with skopeo into a fresh OCI layout and reads it back.
async fn pull(host: &str, tag: &str, extra: &[&str]) -> OciLayout {
    let dir = tempfile::tempdir().expect("layout dir");
    skopeo_copy_ok(&format!("{host}/{REPO}:{tag}"), dir.path(), extra).await;
    read_oci_layout(dir.path()).expect("valid OCI layout")
}

/// Compares bytes by length and digest, so a failure prints two lines, not a megabyte.
fn assert_same(actual: &[u8], expected: &[u8]) {
    let summary = |b: &[u8]| (b.len(), sha256_digest(b));
    assert_eq!(summary(actual), summary(expected));
}

fn digests(blobs: &[&Blob]) -> Vec<String> {
    blobs.iter().map(|b| b.digest.clone()).collect()
}

fn layer_digests(image: &Image) -> Vec<String> {
    image.layers.iter().map(|l| l.blob.digest.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_pushed_images_and_the_tap_counts_every_blob_get() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let oci = Image::random(Flavor::Oci, 1, &[64 << 10, 1 << 20]);
    let docker = Image::random(Flavor::Docker, 3, &[32 << 10, 512 << 10]);
    push_image(&registry.url(), REPO, "oci", &oci, None)
        .await
        .unwrap();
    push_image(&registry.url(), REPO, "docker", &docker, None)
        .await
        .unwrap();

    let pulled = pull(&tap.host(), "oci", &["--preserve-digests"]).await;
    assert_eq!(pulled.manifest_digest, oci.digest());
    assert_eq!(pulled.blobs, digests(&oci.blobs()));
    // skopeo 1.9 asks for exactly: the /v2/ check, the manifest, then each blob once.
    tap.assert_count(Method::GET, Kind::Blob, oci.blobs().len());
    tap.assert_count(Method::GET, Kind::Manifest, 1);
    assert_eq!(
        tap.requests().len(),
        2 + oci.blobs().len(),
        "{:#?}",
        tap.requests()
    );

    // An oci: layout holds OCI manifests only, so skopeo converts a Docker image's manifest and
    // config on the way in; the layers pass through untouched.
    tap.reset();
    let pulled = pull(&tap.host(), "docker", &[]).await;
    assert_eq!(pulled.media_type, Flavor::Oci.manifest_type());
    assert_eq!(pulled.blobs[1..], layer_digests(&docker));
    tap.assert_count(Method::GET, Kind::Blob, docker.blobs().len());
}

#[tokio::test(flavor = "multi_thread")]
async fn indexes_push_and_pull_every_platform() {
    let registry = Registry::start(Auth::None).await;
    let arm = Platform::new("linux", "arm64", Some("v8"));
    let images = |flavor, seed| {
        let amd64 = Image::random(flavor, seed, &[16 << 10]);
        let arm64 = Image::for_platform(flavor, arm.clone(), vec![random_layer(8 << 10, seed + 1)]);
        vec![amd64, arm64]
    };
    let oci = Index::new(Flavor::Oci, images(Flavor::Oci, 10));
    let docker = Index::new(Flavor::Docker, images(Flavor::Docker, 20));
    push_index(&registry.url(), REPO, "multi-oci", &oci, None)
        .await
        .unwrap();
    push_index(&registry.url(), REPO, "multi-docker", &docker, None)
        .await
        .unwrap();

    let pulled = pull(
        &registry.host(),
        "multi-oci",
        &["--all", "--preserve-digests"],
    )
    .await;
    assert_eq!(pulled.manifest_digest, oci.digest());
    let children: Vec<String> = oci.images.iter().map(|i| i.digest().to_owned()).collect();
    assert_eq!(pulled.manifests, children);
    let blobs: Vec<&Blob> = oci.images.iter().flat_map(Image::blobs).collect();
    assert_eq!(pulled.blobs, digests(&blobs));

    // The registry serves the manifest list byte-exact to a client that accepts it.
    let url = format!("{}/v2/{REPO}/manifests/multi-docker", registry.url());
    let accepts = accept(&[Flavor::Docker.index_type(), Flavor::Docker.manifest_type()]);
    let req = request(
        Method::GET,
        &url,
        None,
        &[("accept", &accepts)],
        Bytes::new(),
    );
    let list = fetch(req).await.unwrap();
    assert_same(&list.body, &docker.manifest.bytes);
    assert_eq!(list.header("docker-content-digest"), Some(docker.digest()));
    assert_eq!(
        list.header("content-type"),
        Some(Flavor::Docker.index_type())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_registry_demands_credentials_and_the_tap_forwards_them() {
    let registry = Registry::start(Auth::basic("berth", "s3cret")).await;
    let image = Image::random(Flavor::Oci, 30, &[4 << 10]);
    let denied = push_image(&registry.url(), REPO, "v1", &image, None).await;
    assert_eq!(denied.unwrap_err().status, Some(StatusCode::UNAUTHORIZED));
    let wrong = Some(("berth", "wrong"));
    let denied = push_image(&registry.url(), REPO, "v1", &image, wrong).await;
    assert_eq!(denied.unwrap_err().status, Some(StatusCode::UNAUTHORIZED));
    push_image(&registry.url(), REPO, "v1", &image, registry.creds())
        .await
        .unwrap();

    let tap = Tap::start(&registry.url()).await;
    let challenge = get(&format!("{}/v2/", tap.url()), None).await.unwrap();
    assert_eq!(challenge.status, StatusCode::UNAUTHORIZED);
    let www_authenticate = challenge.header("www-authenticate").unwrap_or_default();
    assert!(
        www_authenticate.starts_with("Basic realm="),
        "{www_authenticate}"
    );

    let pulled = pull(
        &tap.host(),
        "v1",
        &["--src-creds", "berth:s3cret", "--preserve-digests"],
    )
    .await;
    assert_eq!(pulled.manifest_digest, image.digest());
    let blob_gets: Vec<Seen> = tap
        .seen()
        .into_iter()
        .filter(|s| s.kind == Kind::Blob)
        .collect();
    assert_eq!(blob_gets.len(), image.blobs().len());
    assert!(blob_gets
        .iter()
        .all(|s| s.headers.contains_key("authorization")));
}

/// A registry with one 1 MiB blob, and a tap in front of it.
async fn blob_behind_tap() -> (Registry, Tap, Blob, String) {
    let registry = Registry::start(Auth::None).await;
    let blob = random_blob(1 << 20, 40);
    push_blob(&registry.url(), REPO, &blob, None).await.unwrap();
    let tap = Tap::start(&registry.url()).await;
    let url = format!("{}/v2/{REPO}/blobs/{}", tap.url(), blob.digest);
    (registry, tap, blob, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_forwards_untouched_and_corrupts_only_the_next_get() {
    let (_registry, tap, blob, url) = blob_behind_tap().await;
    let clean = get(&url, None).await.unwrap();
    assert_same(&clean.body, &blob.bytes);
    assert_eq!(
        clean.header("docker-content-digest"),
        Some(blob.digest.as_str())
    );

    tap.inject_times(Kind::Blob, Fault::CorruptBlob, 1);
    // A HEAD has no body to corrupt, so it passes and does not use up the fault.
    let head = fetch(request(Method::HEAD, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(head.header("content-length"), Some("1048576"));
    let corrupt = get(&url, None).await.unwrap();
    assert_eq!(corrupt.body.len(), blob.len());
    assert_ne!(sha256_digest(&corrupt.body), blob.digest);
    assert_same(&get(&url, None).await.unwrap().body, &blob.bytes);
    assert_eq!(tap.count(Method::GET, Kind::Blob), 3);
    assert_eq!(tap.count(Method::HEAD, Kind::Blob), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_cuts_a_body_short_of_its_content_length() {
    let (_registry, tap, blob, url) = blob_behind_tap().await;
    // Past a few hundred KiB hyper has flushed part of its buffer when the cut comes.
    for at in [1000, 700_000] {
        tap.inject(Kind::Blob, Fault::CutBlobAt(at));
        let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
            .await
            .unwrap();
        assert_eq!(response.headers()["content-length"], "1048576");
        let (received, error) = read_body(&mut response.into_body(), usize::MAX).await;
        assert_same(&received, &blob.bytes[..at as usize]);
        assert!(error.is_some(), "a cut body must fail, not end short");
    }
    assert!(get(&url, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_stalls_a_body_until_the_tap_is_dropped() {
    let (_registry, tap, blob, url) = blob_behind_tap().await;
    tap.inject(Kind::Blob, Fault::Stall);
    let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    let mut body = response.into_body();
    let (received, error) = read_body(&mut body, 64 << 10).await;
    assert!(error.is_none());
    assert_same(&received, &blob.bytes[..64 << 10]);
    drop(tap);
    let (rest, error) = read_body(&mut body, usize::MAX).await;
    assert!(
        rest.is_empty() && error.is_some(),
        "stalled body continued after {} bytes",
        rest.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_answers_with_an_injected_status_for_every_method() {
    let (registry, tap, _blob, _url) = blob_behind_tap().await;
    let image = Image::random(Flavor::Oci, 50, &[1 << 10]);
    push_image(&registry.url(), REPO, "v1", &image, None)
        .await
        .unwrap();
    let url = format!("{}/v2/{REPO}/manifests/v1", tap.url());
    tap.inject_times(Kind::Manifest, Fault::Status(429, Some(7)), 2);

    let limited = get(&url, None).await.unwrap();
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.header("retry-after"), Some("7"));
    let envelope: serde_json::Value = serde_json::from_slice(&limited.body).unwrap();
    assert_eq!(envelope["errors"][0]["code"], "TOOMANYREQUESTS");
    let head = fetch(request(Method::HEAD, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::TOO_MANY_REQUESTS);
    let accepts = [("accept", image.media_type())];
    let served = fetch(request(Method::GET, &url, None, &accepts, Bytes::new()))
        .await
        .unwrap();
    assert_same(&served.body, &image.manifest.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_paces_a_slow_body_without_changing_it() {
    let (_registry, tap, blob, url) = blob_behind_tap().await;
    let delay = Duration::from_millis(5);
    tap.inject(Kind::Blob, Fault::Slow(128 << 10, delay));
    let started = Instant::now();
    let slow = get(&url, None).await.unwrap();
    assert_same(&slow.body, &blob.bytes);
    // A lower bound only: the tap sleeps after each of the 8 pieces, so this cannot flake.
    assert!(started.elapsed() >= delay * 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_holds_a_body_at_the_pause_point_until_resumed() {
    let (_registry, tap, blob, url) = blob_behind_tap().await;
    tap.inject_times(Kind::Blob, Fault::PauseAt(100_000), 1);
    let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    tap.wait_for(Method::GET, Kind::Blob, 1).await;
    let mut body = response.into_body();
    let (head, _) = read_body(&mut body, 100_000).await;
    tap.wait_paused(1).await;
    assert_same(&head, &blob.bytes[..100_000]);
    // A second client joining mid-fill is served normally: the rule was for one request only.
    assert_same(&get(&url, None).await.unwrap().body, &blob.bytes);
    tap.resume();
    let (tail, error) = read_body(&mut body, usize::MAX).await;
    assert!(error.is_none());
    assert_same(&[head, tail].concat(), &blob.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_stops_and_restarts_on_the_same_port_with_its_content() {
    let (mut registry, tap, blob, url) = blob_behind_tap().await;
    registry.stop();
    assert!(
        get(&url, None).await.is_err(),
        "a dead upstream must not answer"
    );
    registry.restart().await;
    assert_same(&get(&url, None).await.unwrap().body, &blob.bytes);
    // The tap saw both attempts, the refused one included.
    assert_eq!(tap.count(Method::GET, Kind::Blob), 2);
}

#[test]
fn tap_classifies_registry_paths() {
    assert_eq!(Kind::of_path("/v2/"), Kind::Other);
    assert_eq!(
        Kind::of_path("/v2/library/alpine/manifests/3.20"),
        Kind::Manifest
    );
    assert_eq!(Kind::of_path("/v2/a/b/c/blobs/sha256:00"), Kind::Blob);
    assert_eq!(Kind::of_path("/v2/a/blobs/uploads/"), Kind::Other);
    assert_eq!(Kind::of_path("/v2/a/blobs/uploads/uuid"), Kind::Other);
    assert_eq!(Kind::of_path("/v2/a/tags/list"), Kind::Tags);
    assert_eq!(Kind::of_path("/token"), Kind::Token);
    assert_eq!(Kind::of_path("/auth/token"), Kind::Token);
}

#[test]
fn uploads_resolve_absolute_and_relative_locations() {
    let d = "sha256:ab";
    let absolute = "http://a:1/v2/r/blobs/uploads/u?_state=x";
    assert_eq!(
        push::upload_url("http://a:1", absolute, d),
        format!("{absolute}&digest={d}")
    );
    let relative = push::upload_url("http://a:1", "/v2/r/blobs/uploads/u", d);
    assert_eq!(
        relative,
        format!("http://a:1/v2/r/blobs/uploads/u?digest={d}")
    );
}

#[test]
fn layers_are_valid_gzip_tars_with_matching_diff_ids() {
    let layer = random_layer(300_000, 60);
    let mut tar = Vec::new();
    let decoder = flate2::read::GzDecoder::new(&layer.blob.bytes[..]);
    std::io::Read::read_to_end(&mut { decoder }, &mut tar).unwrap();
    assert_eq!(sha256_digest(&tar), layer.diff_id);
    let mut archive = tar::Archive::new(&tar[..]);
    let sizes: Vec<u64> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().size())
        .collect();
    assert_eq!(sizes, [0, 300_000]);
    assert_eq!(
        random_layer(300_000, 60).blob,
        layer.blob,
        "same seed, same bytes"
    );
    assert_ne!(random_blob(2 << 20, 1), random_blob(2 << 20, 2));
}
