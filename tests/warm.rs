//! `berth warm`, run as the real binary: it pre-pulls an image through a running berth so the
//! next pull makes no upstream blob GET, picks the requested platform of an index, and fails
//! loudly on content that does not match its digest.

mod support;

use std::process::Output;

use http::Method;
use support::process::output_text;
use support::stack::registry_with;
use support::{
    push_index, random_layer, skopeo_copy_ok, Auth, Berth, Fault, Flavor, Image, Index, Kind,
    Platform, Registry, Tap,
};

async fn berth_warm(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("warm")
            .args(&args)
            .output()
            .expect("run berth warm")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warmed_image_is_pulled_with_zero_upstream_blob_gets() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let cache = tempfile::tempdir().unwrap();
    let berth = Berth::with_upstream(&tap.host(), &tap.url(), cache.path()).await;
    let amd64 = Image::for_platform(
        Flavor::Oci,
        Platform::linux_amd64(),
        vec![random_layer(300_000, 50), random_layer(200_000, 51)],
    );
    let arm64 = Image::for_platform(
        Flavor::Oci,
        Platform::new("linux", "arm64", Some("v8")),
        vec![random_layer(250_000, 52)],
    );
    let index = Index::new(Flavor::Oci, vec![amd64.clone(), arm64.clone()]);
    push_index(&registry.url(), "team/app", "v1", &index, None)
        .await
        .unwrap();
    tap.reset();

    // Host-prefixed reference: /v2/<tap host>/team/app/... on berth.
    let reference = format!("{}/team/app:v1", tap.host());
    let output = berth_warm(&["--target", &berth.url(), &reference]).await;
    assert!(output.status.success(), "{}", output_text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("warmed 1 image(s), 3 blob(s)"),
        "{}",
        output_text(&output)
    );
    // The manifest GETs miss; the first blob GET misses and starts the fills of the others
    // (prefetch), which the other blob GETs join, or start if they come first.
    let fetched: u32 = ["MISS=", "COALESCED="]
        .iter()
        .filter_map(|outcome| {
            let count = stdout.split(outcome).nth(1)?;
            count
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        })
        .sum();
    assert_eq!(fetched, 5, "2 manifests and 3 blobs: {stdout}");
    assert!(!stdout.contains("HIT="), "{stdout}");
    let warmed: Vec<String> = tap
        .seen()
        .iter()
        .filter(|s| s.method == Method::GET && s.kind == Kind::Blob)
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(warmed.len(), 3, "{warmed:#?}");
    for blob in amd64.blobs() {
        assert!(
            warmed.iter().any(|p| p.ends_with(&blob.digest)),
            "{} not warmed",
            blob.digest
        );
    }

    // The pull: skopeo picks linux/amd64 from the index through berth's default upstream.
    tap.reset();
    let pulled = tempfile::tempdir().unwrap();
    let source = format!("docker://{}/team/app:v1", berth.host());
    skopeo_copy_ok(&source, pulled.path(), &["--override-arch", "amd64"]).await;
    tap.assert_count(Method::GET, Kind::Blob, 0);

    // A second warm of the same image is all hits.
    let again = berth_warm(&["--target", &berth.url(), &reference]).await;
    assert!(again.status.success(), "{}", output_text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("HIT=5"),
        "{}",
        output_text(&again)
    );

    let other = berth_warm(&[
        "--target",
        &berth.url(),
        "--platform",
        "windows/amd64",
        &reference,
    ])
    .await;
    assert!(!other.status.success());
    assert!(
        output_text(&other).contains("no windows/amd64 image in the index"),
        "{}",
        output_text(&other)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_blob_bytes_fail_the_warm() {
    // Warm straight from a registry (same API) through a tap that corrupts one blob: berth
    // would never deliver such a body whole, so the registry stands in for a broken target.
    let image = Image::random(Flavor::Docker, 53, &[100_000]);
    let (_registry, tap) = registry_with(&image, "team/app", "v1").await;
    tap.inject_times(Kind::Blob, Fault::CorruptBlob, 1);
    let output = berth_warm(&["--target", &tap.url(), "team/app:v1"]).await;
    assert!(!output.status.success(), "{}", output_text(&output));
    let report = output_text(&output);
    assert!(report.contains("failed team/app:v1"), "{report}");
    assert!(report.contains("received content with digest"), "{report}");
}
