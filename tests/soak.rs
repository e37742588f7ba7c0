//! A bounded soak: many clients pulling several images through berth for a while (15 s by
//! default, as `./scripts/test` runs it; `BERTH_SOAK_SECS=120` for the long run) while the tap
//! injects random upstream faults (cut, corrupt and stalled bodies, 429, 503, 500) and the
//! cache is small enough to evict. Asserts
//! that no client ever received a complete body with a wrong byte, that no 5xx came from berth
//! itself (an upstream-caused 502/503/504 is fine: the upstream really failed), and that the
//! cache is clean afterwards.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest as _, Sha256};
use support::{
    push_image, request, send, single_upstream_config, Auth, Berth, Fault, Flavor, Image, Kind,
    Registry, Tap,
};
use tokio::time::Instant;

const CLIENTS: usize = 8;
const IMAGES: u64 = 6;

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    complete: AtomicU64,
    aborted: AtomicU64,
    wrong_bytes: AtomicU64,
    upstream_errors: AtomicU64,
    berth_errors: AtomicU64,
    unexpected: AtomicU64,
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn soak_duration() -> Duration {
    Duration::from_secs(support::env_number("BERTH_SOAK_SECS", 15))
}

/// One GET through berth; `expected` is the whole object, `range` an optional byte range.
/// `accept` is the manifest media type for manifest GETs.
async fn pull(
    tally: &Tally,
    url: &str,
    expected: &Bytes,
    range: Option<(usize, usize)>,
    accept: Option<&str>,
) {
    add(&tally.requests);
    let header = range.map(|(a, b)| format!("bytes={a}-{b}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(value) = &header {
        headers.push(("range", value.as_str()));
    }
    if let Some(accept) = accept {
        headers.push(("accept", accept));
    }
    let response = match send(request(Method::GET, url, None, &headers, Bytes::new())).await {
        Ok(response) => response,
        Err(_) => return add(&tally.aborted),
    };
    let status = response.status();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    match status.as_u16() {
        200 | 206 => {
            let Ok(body) = body else {
                return add(&tally.aborted);
            };
            let want = match (status.as_u16(), range) {
                (206, Some((a, b))) => expected.slice(a..=b),
                _ => expected.clone(),
            };
            if body != want {
                eprintln!(
                    "WRONG BYTES from {url} ({status}, {range:?}, {:?})",
                    parts.headers
                );
                add(&tally.wrong_bytes);
            } else {
                add(&tally.complete);
            }
        }
        429 | 500..=599 => {
            let text = body
                .map(|b| String::from_utf8_lossy(&b).to_string())
                .unwrap_or_default();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let message = json["errors"][0]["message"].as_str().unwrap_or("");
            if status.as_u16() == 429 || message.starts_with("upstream") {
                add(&tally.upstream_errors);
            } else {
                eprintln!("BERTH ERROR {status} for {url}: {text}");
                add(&tally.berth_errors);
            }
        }
        _ => {
            eprintln!("UNEXPECTED {status} for {url}");
            add(&tally.unexpected);
        }
    }
}

fn random_fault(rng: &mut StdRng) -> (Kind, Fault) {
    let kind = if rng.random_bool(0.8) {
        Kind::Blob
    } else {
        Kind::Manifest
    };
    let fault = match rng.random_range(0..7) {
        0 => Fault::CutBlobAt(rng.random_range(0..2_000_000)),
        1 => Fault::CorruptBlob,
        2 => Fault::Stall,
        3 => Fault::Status(429, Some(0)),
        4 => Fault::Status(503, None),
        5 => Fault::Status(500, None),
        _ => Fault::Slow(64 * 1024, Duration::from_millis(2)),
    };
    (kind, fault)
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_pulls_under_random_upstream_faults_never_deliver_a_wrong_byte() {
    let registry = Registry::start(Auth::None).await;
    let tap = Arc::new(Tap::start(&registry.url()).await);
    let sizes = [1_000, 50_000, 400_000, 1_500_000, 3_000_000];
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let layers: Vec<usize> = (0..3).map(|j| sizes[((i + j) % 5) as usize]).collect();
        let image = Image::random(Flavor::Oci, 100 + i * 10, &layers);
        push_image(&registry.url(), &format!("soak/app{i}"), "v1", &image, None)
            .await
            .unwrap();
        images.push(image);
    }
    let cache = tempfile::tempdir().unwrap();
    // The cache holds a few blobs only, to keep eviction busy. Prefetch stays off: its
    // speculative fills reserve up to half of that room, and a real miss finding the rest held
    // is a 503 "cache full" that this soak counts as berth's own error; prefetch against real
    // misses is tested in tests/prefetch.rs and `Index::reserve_within`.
    let extra = "max_size = \"12MiB\"\n[client]\nread_timeout = \"500ms\"\n\
                 max_retry_after = \"1s\"\n[prefetch]\nenabled = false";
    let berth = Berth::start(&single_upstream_config(
        &tap.host(),
        &tap.url(),
        cache.path(),
        extra,
    ))
    .await;
    let images = Arc::new(images);
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + soak_duration();

    let injector = {
        let tap = Arc::clone(&tap);
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(7);
            let mut injected = 0u64;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
                let (kind, fault) = random_fault(&mut rng);
                tap.inject_times(kind, fault, 1);
                injected += 1;
            }
            tap.clear_faults();
            injected
        })
    };
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (images, tally, base) = (Arc::clone(&images), Arc::clone(&tally), berth.url());
        clients.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(c as u64);
            while Instant::now() < deadline {
                let i = rng.random_range(0..images.len());
                let image = &images[i];
                let repo = format!("soak/app{i}");
                let reference = if rng.random_bool(0.5) {
                    "v1"
                } else {
                    image.digest()
                };
                let url = format!("{base}/v2/{repo}/manifests/{reference}");
                let accept = Some(image.media_type());
                pull(&tally, &url, &image.manifest.bytes, None, accept).await;
                for blob in image.blobs() {
                    let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
                    let range = if rng.random_bool(0.2) && blob.len() > 2 {
                        let a = rng.random_range(0..blob.len() - 1);
                        Some((a, rng.random_range(a..blob.len())))
                    } else {
                        None
                    };
                    pull(&tally, &url, &blob.bytes, range, None).await;
                }
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let injected = injector.await.unwrap();

    // Faults over: every image pulls whole and correct.
    for (i, image) in images.iter().enumerate() {
        let base = berth.url();
        let url = format!("{base}/v2/soak/app{i}/manifests/v1");
        let accept = [("accept", image.media_type())];
        let fetched = support::fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
            .await
            .unwrap();
        assert_eq!(fetched.status, 200);
        assert!(fetched.body == image.manifest.bytes);
        for blob in image.blobs() {
            let url = format!("{base}/v2/soak/app{i}/blobs/{}", blob.digest);
            let fetched = support::get(&url, None).await.unwrap();
            assert_eq!(fetched.status, 200);
            assert!(fetched.body == blob.bytes);
        }
    }
    let t = &tally;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "soak: {injected} faults injected; {} requests: {} complete and verified, {} aborted \
         mid-body, {} upstream-caused errors, {} berth-caused errors, {} wrong bodies; \
         {} resumes, {} digest mismatches caught",
        load(&t.requests),
        load(&t.complete),
        load(&t.aborted),
        load(&t.upstream_errors),
        load(&t.berth_errors),
        load(&t.wrong_bytes),
        berth.state.metrics.fill_resumes.get(),
        berth.state.metrics.digest_mismatches.get(),
    );
    assert_eq!(load(&t.wrong_bytes), 0, "a client received wrong bytes");
    assert_eq!(load(&t.berth_errors), 0, "berth itself answered 5xx");
    assert_eq!(load(&t.unexpected), 0);
    assert!(
        load(&t.complete) > load(&t.requests) / 2,
        "most pulls succeed"
    );
    assert!(injected > 0);

    // Clean afterwards: no fill running, no temp file, every cached blob is what its name says.
    for _ in 0..500 {
        if berth.state.fills.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(berth.state.fills.in_flight(), 0);
    let temp: Vec<_> = std::fs::read_dir(cache.path().join("tmp"))
        .unwrap()
        .collect();
    assert!(temp.is_empty(), "{temp:?}");
    let root = cache.path().join("blobs/sha256");
    for shard in std::fs::read_dir(root).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert_eq!(hex::encode(Sha256::digest(&bytes)), name);
        }
    }
}
