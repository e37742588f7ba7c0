//! The core pull path end to end: a real distribution registry upstream (behind a counting tap),
//! berth in front of it, and real clients (skopeo, plain HTTP) pulling through berth.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use support::{error_code, image::sha256_digest};
use support::{
    fetch, get, push_blob, push_image, random_blob, read_body, read_oci_layout, request, send,
    send_get, skopeo_copy_ok, Fault, Flavor, Image, Kind, Stack,
};
use tokio::sync::Barrier;

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_by_tag_and_digest_and_a_second_pull_makes_no_blob_get() {
    let stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 1, &[300_000, 1_000_000, 50_000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    stack.tap.reset();

    let by_tag = tempfile::tempdir().unwrap();
    let source = format!("docker://{}/team/app:v1", stack.berth.host());
    skopeo_copy_ok(&source, by_tag.path(), &["--preserve-digests"]).await;
    let layout = read_oci_layout(by_tag.path()).unwrap();
    assert_eq!(layout.manifest_digest, image.digest());
    let expected: Vec<String> = image.blobs().iter().map(|b| b.digest.clone()).collect();
    assert_eq!(layout.blobs, expected);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), expected.len());

    let by_digest = tempfile::tempdir().unwrap();
    let source = format!(
        "docker://{}/team/app@{}",
        stack.berth.host(),
        image.digest()
    );
    skopeo_copy_ok(&source, by_digest.path(), &["--preserve-digests"]).await;
    assert_eq!(
        read_oci_layout(by_digest.path()).unwrap().manifest_digest,
        image.digest()
    );
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Blob),
        expected.len(),
        "the second pull was served from the cache: {:#?}",
        stack.tap.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_manifests_pass_through_byte_for_byte() {
    let stack = Stack::start("").await;
    let image = Image::random(Flavor::Docker, 2, &[10_000]);
    push_image(&stack.registry.url(), "team/docker", "v1", &image, None)
        .await
        .unwrap();
    let accept = [("accept", Flavor::Docker.manifest_type())];
    let url = format!("{}/v2/team/docker/manifests/v1", stack.berth.url());
    let fetched = fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, image.manifest.bytes);
    assert_eq!(
        fetched.header("content-type"),
        Some(Flavor::Docker.manifest_type())
    );
    assert_eq!(
        fetched.header("docker-content-digest"),
        Some(image.digest())
    );
    assert_eq!(fetched.header("x-cache"), Some("MISS"));
    let again = fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(again.body, image.manifest.bytes);
    assert_eq!(again.header("x-cache"), Some("HIT"));
    let head = fetch(request(Method::HEAD, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(image.manifest.len().to_string().as_str())
    );
    assert_eq!(stack.tap.count(Method::GET, Kind::Manifest), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn coalesces_concurrent_misses_into_one_upstream_fetch() {
    const CLIENTS: usize = 32;
    let stack = Stack::start("").await;
    let blob = random_blob(64 << 20, 7);
    push_blob(&stack.registry.url(), "team/big", &blob, None)
        .await
        .unwrap();
    stack.tap.reset_with_blob_fault(Fault::PauseAt(1 << 20));

    // Every client has its response head (so has joined the fill) before the fill may finish.
    let heads = Arc::new(Barrier::new(CLIENTS + 1));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let url = stack.blob_url("team/big", &blob.digest);
        let heads = Arc::clone(&heads);
        clients.push(tokio::spawn(async move {
            let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let outcome = response.headers()["x-cache"].to_str().unwrap().to_string();
            heads.wait().await;
            let body = response
                .into_body()
                .collect()
                .await
                .expect("whole body")
                .to_bytes();
            (sha256_digest(&body), body.len(), outcome)
        }));
    }
    heads.wait().await;
    stack.tap.wait_paused(1).await;

    // A client joining mid-fill gets its first bytes while the fill is still held upstream.
    let late = send_get(&stack.blob_url("team/big", &blob.digest))
        .await
        .unwrap();
    assert_eq!(late.headers()["x-cache"], "COALESCED");
    let mut late_body = late.into_body();
    let (first, error) = read_body(&mut late_body, 1).await;
    assert!(
        error.is_none() && !first.is_empty(),
        "late joiner got bytes before the fill completed"
    );
    assert_eq!(
        stack.berth.state.fills.in_flight(),
        1,
        "the fill is still running"
    );

    // Keep reading: a client that takes no bytes for `limits.write_timeout` is dropped.
    let late_rest = tokio::spawn(async move { late_body.collect().await.map(|b| b.to_bytes()) });
    stack.tap.resume();
    let mut outcomes = Vec::new();
    for client in clients {
        let (digest, len, outcome) = client.await.unwrap();
        assert_eq!((digest.as_str(), len), (blob.digest.as_str(), blob.len()));
        outcomes.push(outcome);
    }
    let rest = late_rest.await.unwrap().unwrap();
    assert_eq!(first.len() + rest.len(), blob.len());
    stack.tap.assert_count(Method::GET, Kind::Blob, 1);
    assert_eq!(outcomes.iter().filter(|o| *o == "MISS").count(), 1);
    assert_eq!(
        outcomes.iter().filter(|o| *o == "COALESCED").count(),
        CLIENTS - 1
    );
    assert_eq!(
        stack.berth.state.metrics.fill_followers.get(),
        CLIENTS as u64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_fail_the_transfer_and_are_never_cached() {
    let stack = Stack::start("").await;
    let blob = stack.push_faulted(3 << 20, 11, Fault::CorruptBlob).await;

    let url = stack.url(&blob);
    let corrupted = get(&url, None).await;
    assert!(
        corrupted.is_err(),
        "a corrupted blob must not arrive as a complete body"
    );
    assert_eq!(stack.berth.state.metrics.digest_mismatches.get(), 1);
    let digest = berth::oci::digest::Digest::parse(&blob.digest).unwrap();
    assert!(stack.berth.state.cache.index.get(&digest).is_none());
    let store = &stack.berth.state.cache.store;
    assert!(!store.path(berth::cache::Kind::Blob, &digest).exists());
    assert_eq!(
        std::fs::read_dir(stack.cache.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );

    let clean = get(&url, None).await.unwrap();
    assert_eq!(clean.status, 200);
    assert_eq!(sha256_digest(&clean.body), blob.digest);
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Blob),
        2,
        "the bad fill was not cached"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_cannot_finish_aborts_its_clients_and_caches_nothing() {
    let mut stack = Stack::start("").await;
    // Larger than the loopback socket buffers, so killing the registry really cuts the body.
    let blob = stack.push(32 << 20, 12).await;
    let response = stack.hold(&blob, 1 << 20).await;
    // The upstream dies mid-body; the fill's resume attempts find nothing to resume from.
    stack.registry.stop();
    stack.tap.resume();
    let body = response.into_body().collect().await;
    assert!(
        body.is_err(),
        "a fill that cannot finish must not end cleanly"
    );
    let digest = berth::oci::digest::Digest::parse(&blob.digest).unwrap();
    assert!(stack.berth.state.cache.index.get(&digest).is_none());
    assert!(!stack.cached_path(&blob).exists());
    for _ in 0..1_000_000 {
        if stack.berth.state.fills.in_flight() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        std::fs::read_dir(stack.cache.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_serves_cached_content_with_zero_upstream_traffic() {
    let mut stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 3, &[200_000, 400_000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let first = tempfile::tempdir().unwrap();
    let by_digest = format!("team/app@{}", image.digest());
    let source = format!("docker://{}/{by_digest}", stack.berth.host());
    skopeo_copy_ok(&source, first.path(), &["--preserve-digests"]).await;

    stack.restart_berth("").await;
    assert!(
        stack.berth.state.cache.index.len() >= 3,
        "the index was rebuilt from disk"
    );
    stack.registry.stop();
    stack.tap.reset();
    let second = tempfile::tempdir().unwrap();
    let source = format!("docker://{}/{by_digest}", stack.berth.host());
    skopeo_copy_ok(&source, second.path(), &["--preserve-digests"]).await;
    assert_eq!(
        read_oci_layout(second.path()).unwrap().manifest_digest,
        image.digest()
    );
    assert!(
        stack.tap.requests().is_empty(),
        "{:#?}",
        stack.tap.requests()
    );
}

/// A GET of `url` asking for `range`.
async fn get_range(url: &str, range: &str) -> support::Fetched {
    fetch(request(
        Method::GET,
        url,
        None,
        &[("range", range)],
        Bytes::new(),
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_work_on_hits_and_while_filling() {
    let stack = Stack::start("").await;
    let blob = stack.push(2 << 20, 13).await;
    let url = stack.url(&blob);

    stack.tap.inject_times(Kind::Blob, Fault::PauseAt(4096), 1);
    let filling = tokio::spawn({
        let url = url.clone();
        async move { get_range(&url, "bytes=100-1099").await }
    });
    stack.tap.wait_paused(1).await;
    stack.tap.resume();
    let partial = filling.await.unwrap();
    assert_eq!(partial.status, 206);
    assert_eq!(partial.body, blob.bytes.slice(100..1100));
    let total = blob.len();
    assert_eq!(
        partial.header("content-range").unwrap(),
        format!("bytes 100-1099/{total}")
    );

    let suffix = get_range(&url, "bytes=-10").await;
    assert_eq!(suffix.status, 206);
    assert_eq!(suffix.header("x-cache"), Some("HIT"));
    assert_eq!(suffix.body, blob.bytes.slice(total - 10..));

    let beyond = format!("bytes={total}-");
    let unsatisfiable = get_range(&url, &beyond).await;
    assert_eq!(unsatisfiable.status, 416);
    assert_eq!(
        unsatisfiable.header("content-range").unwrap(),
        format!("bytes */{total}")
    );
    assert_eq!(error_code(&unsatisfiable.body), "RANGE_INVALID");
}

#[tokio::test(flavor = "multi_thread")]
async fn head_requests_describe_without_bodies() {
    let stack = Stack::start("").await;
    let blob = stack.push(100_000, 14).await;
    let url = stack.url(&blob);
    let cold = fetch(request(Method::HEAD, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(cold.status, 200);
    assert_eq!(cold.header("content-length"), Some("100000"));
    assert_eq!(
        cold.header("docker-content-digest"),
        Some(blob.digest.as_str())
    );
    assert!(cold.body.is_empty());
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Blob),
        0,
        "a HEAD starts no fill"
    );
    get(&url, None).await.unwrap();
    let warm = fetch(request(Method::HEAD, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(
        (warm.status.as_u16(), warm.header("x-cache")),
        (200, Some("HIT"))
    );
    assert_eq!(warm.header("content-length"), Some("100000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_use_the_oci_envelope_with_the_right_status() {
    let stack = Stack::start("").await;
    let base = stack.berth.url();
    let unknown_blob = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(Method, String, u16, &str)> = vec![
        (
            Method::GET,
            format!("/v2/team/app/blobs/{unknown_blob}"),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/team/app/manifests/missing".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/team/app/blobs/sha256:abc".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            format!("/v2/team/app/blobs/sha512:{}", "a".repeat(128)),
            400,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            "/v2/Team/App/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/team/../app/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/team/app/manifests/-bad-tag".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/elsewhere.example.com/app/manifests/v1".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/team/app/nonsense".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            Method::POST,
            "/v2/team/app/blobs/uploads/".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::PUT,
            "/v2/team/app/manifests/v1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::PATCH,
            "/v2/team/app/blobs/uploads/x".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            format!("/v2/team/app/blobs/{unknown_blob}"),
            405,
            "UNSUPPORTED",
        ),
    ];
    for (method, path, status, code) in cases {
        let url = format!("{base}{path}");
        let fetched = fetch(request(method.clone(), &url, None, &[], Bytes::new()))
            .await
            .unwrap();
        assert_eq!(fetched.status.as_u16(), status, "{method} {path}");
        assert_eq!(error_code(&fetched.body), code, "{method} {path}");
        assert_eq!(fetched.header("content-type"), Some("application/json"));
    }
    let dialled = stack.tap.paths();
    assert!(
        dialled.iter().all(|path| !path.contains("elsewhere")),
        "an unconfigured registry is never dialled"
    );
    let ping = get(&format!("{base}/v2/"), None).await.unwrap();
    assert_eq!(ping.status, 200);
    assert_eq!(
        ping.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_a_gateway_error_not_a_500() {
    let mut stack = Stack::start("").await;
    stack.registry.stop();
    let url = format!("{}/v2/team/app/manifests/v1", stack.berth.url());
    let fetched = get(&url, None).await.unwrap();
    assert!(
        matches!(fetched.status.as_u16(), 502..=504),
        "{}",
        fetched.status
    );
    assert_eq!(error_code(&fetched.body), "UNAVAILABLE");
    let blob = stack.blob_url("team/app", &format!("sha256:{}", "1".repeat(64)));
    let fetched = get(&blob, None).await.unwrap();
    assert!(
        matches!(fetched.status.as_u16(), 502..=504),
        "{}",
        fetched.status
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_lists_keep_their_query_and_referrers_pass_through() {
    let stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 4, &[1000]);
    for tag in ["a", "b", "c"] {
        push_image(&stack.registry.url(), "team/app", tag, &image, None)
            .await
            .unwrap();
    }
    // distribution 2.8 does not paginate, so check that the query reaches it untouched and its
    // answer comes back unchanged; rewriting a Link header is unit-tested in api::passthrough.
    let query = "n=2&last=a";
    let through = get(
        &format!("{}/v2/team/app/tags/list?{query}", stack.berth.url()),
        None,
    )
    .await
    .unwrap();
    let direct = get(
        &format!("{}/v2/team/app/tags/list?{query}", stack.registry.url()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(through.status, 200);
    assert_eq!(through.body, direct.body);
    assert_eq!(through.header("x-cache"), Some("BYPASS"));
    assert!(
        stack
            .tap
            .paths()
            .iter()
            .any(|path| path.ends_with(&format!("/tags/list?{query}"))),
        "{:#?}",
        stack.tap.requests()
    );

    // distribution 2.8 predates the referrers API: its 404 reaches the client unchanged.
    let referrers = format!(
        "{}/v2/team/app/referrers/{}",
        stack.berth.url(),
        image.digest()
    );
    let fetched = get(&referrers, None).await.unwrap();
    assert_eq!(fetched.status, 404);
    assert!(stack
        .tap
        .requests()
        .iter()
        .any(|(_, path)| path.contains("/referrers/")));
}
