//! What one upstream can do to the clients of another, and to the resources every client shares:
//! a hostile upstream's slow fill is not joined by requests routed elsewhere, a trickling fill
//! cannot pin a fill slot, one upstream's fills cannot take every slot, an upstream that keeps
//! failing its bodies is shed by its circuit breaker, an oversized blob is refused before a byte
//! is written, and a lying `Content-Type` does not decide what type a manifest is served as.
//!
//! The honest upstream is a real registry; the hostile one is the tap in front of the same
//! registry with a fault injected (a pause, a trickle, a wrong header), as no real registry
//! misbehaves on demand.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::{
    fetch, get, push_blob, random_blob, read_body, request, send, send_get, Auth, Berth, Blob,
    Fault, Kind, Registry, Tap,
};

/// A real registry, reachable by berth as `honest.test` directly and as `hostile.test` through a
/// tap that injects faults.
struct TwoUpstreams {
    registry: Registry,
    tap: Tap,
    berth: Berth,
    _cache: tempfile::TempDir,
}

impl TwoUpstreams {
    /// `extra` is appended to the config (after the `[[upstream]]` tables, so it opens its own).
    async fn start(extra: &str) -> TwoUpstreams {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let cache = tempfile::tempdir().unwrap();
        let config = format!(
            r#"
listen = "127.0.0.1:0"
default_upstream = "honest.test"
[cache]
dir = "{dir}"
[[upstream]]
host = "honest.test"
endpoint = "{honest}"
[[upstream]]
host = "hostile.test"
endpoint = "{hostile}"
{extra}
"#,
            dir = cache.path().display(),
            honest = registry.url(),
            hostile = tap.url(),
        );
        let berth = Berth::start(&config).await;
        TwoUpstreams {
            registry,
            tap,
            berth,
            _cache: cache,
        }
    }

    async fn push(&self, size: usize, seed: u64) -> Blob {
        let blob = random_blob(size, seed);
        push_blob(&self.registry.url(), "team/app", &blob, None)
            .await
            .unwrap();
        blob
    }

    /// Pulls `blobs` through the hostile upstream at once, each failing (an error status, or
    /// a body that ends early, which fails `get`), and waits for their fills to end.
    async fn pull_failing(&self, blobs: &[Blob]) {
        let pulls = blobs.iter().map(|blob| {
            let url = self.url(blob, "hostile.test");
            async move { (get(&url, None).await, blob.bytes.len()) }
        });
        for (fetched, len) in futures_util::future::join_all(pulls).await {
            if let Ok(fetched) = fetched {
                assert!(fetched.body.len() < len, "no client got a whole blob");
            }
        }
        for _ in 0..500 {
            if self.berth.state.fills.in_flight() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The hostile upstream's open circuit answers a request for `blob` at once with 503
    /// without asking it, while the honest upstream serves the blob.
    async fn assert_shed_while_honest_serves(&self, blob: &Blob) {
        let asked = self.tap.count(Method::GET, Kind::Blob);
        let shed = tokio::time::timeout(HANG_GUARD, get(&self.url(blob, "hostile.test"), None))
            .await
            .expect("an open breaker answers at once")
            .unwrap();
        let text = String::from_utf8_lossy(&shed.body);
        assert_eq!(shed.status, 503, "{text}");
        assert!(shed.header("retry-after").is_some());
        let now = self.tap.count(Method::GET, Kind::Blob);
        assert_eq!(now, asked, "upstream not asked");
        let honest = get(&self.url(blob, "honest.test"), None).await.unwrap();
        assert_eq!(honest.status, 200);
        assert!(honest.body == blob.bytes);
    }

    fn url(&self, blob: &Blob, upstream: &str) -> String {
        format!(
            "{}/v2/team/app/blobs/{}?ns={upstream}",
            self.berth.url(),
            blob.digest
        )
    }
}

/// Bounds a step that would hang on the old code, so the test fails instead of hanging.
const HANG_GUARD: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_upstreams_stalled_fill_is_not_joined_by_clients_of_another_upstream() {
    let two = TwoUpstreams::start("").await;
    let blob = two.push(1_000_000, 41).await;

    // The hostile upstream sends 100,000 bytes and then holds the rest of its fill.
    two.tap.inject_times(Kind::Blob, Fault::PauseAt(100_000), 1);
    let held = send_get(&two.url(&blob, "hostile.test")).await.unwrap();
    two.tap.wait_paused(1).await;

    // A client of the honest upstream asks for the same digest meanwhile: its own fill.
    let honest = tokio::time::timeout(HANG_GUARD, get(&two.url(&blob, "honest.test"), None))
        .await
        .expect("the honest client must not wait on the hostile upstream's fill")
        .unwrap();
    assert_eq!(honest.status, 200);
    assert_eq!(honest.header("x-cache"), Some("MISS"), "not COALESCED");
    assert!(honest.body == blob.bytes);

    // Committed by the honest fill: from now on a hit for clients of either upstream.
    let again = get(&two.url(&blob, "honest.test"), None).await.unwrap();
    assert_eq!(again.header("x-cache"), Some("HIT"));
    let hostile_hit = get(&two.url(&blob, "hostile.test"), None).await.unwrap();
    assert_eq!(hostile_hit.header("x-cache"), Some("HIT"));
    assert!(hostile_hit.body == blob.bytes);

    // The held client still gets its whole blob once the hostile upstream goes on.
    two.tap.resume();
    let mut body = held.into_body();
    let (received, error) = read_body(&mut body, blob.bytes.len() + 1).await;
    assert!(error.is_none(), "{error:?}");
    assert!(received == blob.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickling_fill_is_abandoned_at_the_rate_floor_and_resumed() {
    // 1,000 bytes every 100 ms: never silent for the 30 s read timeout, but 10 KB/s against a
    // floor of 32 KiB/s. Without the floor this fill would take half a minute and never resume.
    let stack = support::Stack::start(
        "[client]\nmin_fill_rate = \"32KiB\"\nmin_fill_window = \"1s\"\nread_timeout = \"30s\"",
    )
    .await;
    let blob = stack.push(300_000, 42).await;
    stack.tap.reset();
    stack.tap.inject_times(
        Kind::Blob,
        Fault::Slow(1_000, Duration::from_millis(100)),
        1,
    );
    let fetched = get(&stack.url(&blob), None).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == blob.bytes, "whole blob, byte for byte");
    assert_eq!(stack.berth.state.metrics.fill_resumes.get(), 1);
    let ranged = stack.tap.count_ranged(Kind::Blob);
    assert_eq!(ranged, 1, "the trickle was dropped and the rest asked for");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_over_max_blob_size_is_refused_before_a_byte_is_written() {
    let stack = support::Stack::start("[limits]\nmax_blob_size = \"100KiB\"").await;
    let blob = stack.push(200_000, 43).await;
    let fetched = get(&stack.url(&blob), None).await.unwrap();
    assert_eq!(fetched.status, 403, "{:?}", fetched.body);
    assert!(String::from_utf8_lossy(&fetched.body).contains("DENIED"));
    let state = &stack.berth.state;
    assert!(state.cache.index.is_empty());
    assert_eq!(state.cache.index.reserved(), 0);
    let blobs = std::fs::read_dir(stack.cache.path().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "nothing was written");
    // A blob under the limit is filled as usual.
    let small = stack.push(50_000, 44).await;
    let fetched = get(&stack.blob_url("team/app", &small.digest), None)
        .await
        .unwrap();
    assert_eq!(fetched.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn fills_running_side_by_side_cannot_overshoot_max_size() {
    // Two 600 KB fills against a 1 MiB cache: the second would take the disk past max_size
    // while the first runs (eviction only happens at commit), so it is refused until then.
    let stack = support::Stack::start("max_size = \"1MiB\"").await;
    let first = random_blob(600_000, 45);
    let second = random_blob(600_000, 46);
    for blob in [&first, &second] {
        push_blob(&stack.registry.url(), "team/app", blob, None)
            .await
            .unwrap();
    }
    stack
        .tap
        .inject_times(Kind::Blob, Fault::PauseAt(100_000), 1);
    let held = send_get(&stack.blob_url("team/app", &first.digest))
        .await
        .unwrap();
    stack.tap.wait_paused(1).await;
    let refused = get(&stack.blob_url("team/app", &second.digest), None)
        .await
        .unwrap();
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());

    stack.tap.resume();
    let (received, error) = read_body(&mut held.into_body(), first.bytes.len() + 1).await;
    assert!(error.is_none(), "{error:?}");
    assert!(received == first.bytes);
    // The first fill's room is now its committed entry; the second evicts it to fit.
    let state = &stack.berth.state;
    let fetched = get(&stack.blob_url("team/app", &second.digest), None)
        .await
        .unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == second.bytes);
    assert_eq!(state.cache.index.reserved(), 0);
    assert!(state.cache.index.weighted_bytes() <= 1 << 20);
}

/// A `Stack` with one blob pushed, and the blob's URL through berth.
async fn stack_with_blob(size: usize, seed: u64) -> (support::Stack, Blob, String) {
    let stack = support::Stack::start("").await;
    let blob = stack.push(size, seed).await;
    let url = stack.url(&blob);
    (stack, blob, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_without_content_length_is_streamed_chunked_and_cached_once_verified() {
    let (stack, blob, url) = stack_with_blob(500_000, 47).await;
    stack.tap.inject_times(Kind::Blob, Fault::Chunked, 1);
    let fetched = get(&url, None).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(
        fetched.header("content-length"),
        None,
        "length unknown: chunked"
    );
    assert!(fetched.body == blob.bytes);
    let digest = blob.digest.parse().unwrap();
    assert!(stack.berth.state.cache.index.get(&digest).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_blob_without_content_length_never_reaches_a_client_whole() {
    let (stack, blob, url) = stack_with_blob(300_000, 48).await;
    // Every byte arrives (the first one wrong), then the upstream holds the body's end.
    stack.tap.inject_times(Kind::Blob, Fault::ChunkedCorrupt, 1);
    let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut received, error) = read_body(&mut body, blob.bytes.len() - 1).await;
    assert!(error.is_none(), "{error:?}");
    stack.tap.wait_paused(1).await;
    // The digest is checked when the body ends: wrong, so the held-back end never comes.
    stack.tap.resume();
    let (rest, error) = read_body(&mut body, 1).await;
    received.extend_from_slice(&rest);
    assert!(
        error.is_some(),
        "the body ends in an error, not a terminator"
    );
    assert_eq!(
        received.len(),
        blob.bytes.len() - 1,
        "the last byte was held back until verification"
    );
    assert!(stack.berth.state.cache.index.is_empty());
}

/// Sends `GET path HTTP/1.0` over a raw socket and reads to the close.
async fn http10_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.0\r\nHost: berth\r\n\r\n");
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(HANG_GUARD, socket.read_to_end(&mut response))
        .await
        .expect("berth answers and closes")
        .unwrap();
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http10_client_gets_a_blob_of_unknown_length_only_once_verified() {
    let (stack, blob, _) = stack_with_blob(200_000, 49).await;
    let path = format!("/v2/team/app/blobs/{}", blob.digest);

    // Wrong bytes: HTTP/1.0 has no way to say a body failed, so the answer is an error status.
    stack.tap.inject_times(Kind::Blob, Fault::ChunkedCorrupt, 1);
    let addr = stack.berth.addr;
    let bad = tokio::spawn(async move { http10_get(addr, &path).await });
    stack.tap.wait_paused(1).await;
    stack.tap.resume();
    let bad = bad.await.unwrap();
    let status_line = String::from_utf8_lossy(&bad[..bad.len().min(20)]).to_string();
    assert!(status_line.contains(" 502 "), "{status_line}");

    // Right bytes: a 200 with the verified length.
    stack.tap.inject_times(Kind::Blob, Fault::Chunked, 1);
    let path = format!("/v2/team/app/blobs/{}", blob.digest);
    let good = http10_get(addr, &path).await;
    let split = good.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&good[..split]).to_ascii_lowercase();
    assert!(head.contains(" 200 "), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", blob.bytes.len())),
        "{head}"
    );
    assert!(good[split..] == blob.bytes[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifests_type_comes_from_the_document_not_a_lying_content_type() {
    use support::{push_image, Flavor, Image};
    let mut stack = support::Stack::start("").await;
    let image = Image::random(Flavor::Docker, 50, &[1000]);
    let registry = stack.registry.url();
    for tag in ["v1", "v2"] {
        push_image(&registry, "team/app", tag, &image, None)
            .await
            .unwrap();
    }
    let docker = Flavor::Docker.manifest_type();
    let manifest =
        |reference: &str| format!("{}/v2/team/app/manifests/{reference}", stack.berth.url());
    let accept = [("accept", docker)];
    let fetch_type = |url: String| async move {
        let fetched = fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
            .await
            .unwrap();
        assert_eq!(fetched.status, 200, "{url}");
        fetched.header("content-type").unwrap().to_string()
    };

    // The upstream claims the image manifest is an index.
    let index = Flavor::Oci.index_type();
    stack
        .tap
        .inject_times(Kind::Manifest, Fault::ContentType(index), 1);
    assert_eq!(fetch_type(manifest("v1")).await, docker);
    // A later response for the same digest lies differently: nothing is rewritten.
    stack
        .tap
        .inject_times(Kind::Manifest, Fault::ContentType("text/html"), 1);
    assert_eq!(fetch_type(manifest("v2")).await, docker);
    assert_eq!(fetch_type(manifest(image.digest())).await, docker);

    // A damaged `.type` sidecar on disk is as good as none: the document still tells.
    let hex = image.digest().trim_start_matches("sha256:");
    let sidecar = stack
        .cache
        .path()
        .join(format!("manifests/sha256/{}/{hex}.type", &hex[..2]));
    assert!(sidecar.exists());
    std::fs::write(&sidecar, "text/html\r\nX-Injected: 1").unwrap();
    stack.restart_berth("").await;
    let manifest = format!(
        "{}/v2/team/app/manifests/{}",
        stack.berth.url(),
        image.digest()
    );
    let before = stack.tap.count(Method::GET, Kind::Manifest);
    assert_eq!(fetch_type(manifest).await, docker);
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Manifest),
        before,
        "served from the cache"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_manifest_body_fails_at_its_deadline_and_the_next_request_fetches_anew() {
    use support::{push_image, Flavor, Image};
    let stack = support::Stack::start("[client]\nread_timeout = \"500ms\"").await;
    let image = Image::random(Flavor::Oci, 51, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let url = format!("{}/v2/team/app/manifests/v1", stack.berth.url());
    let accept = [("accept", Flavor::Oci.manifest_type())];
    // The upstream sends the head and half the manifest, then nothing, connection open.
    stack.tap.inject_times(Kind::Manifest, Fault::Stall, 1);
    let stalled = tokio::time::timeout(
        HANG_GUARD,
        fetch(request(Method::GET, &url, None, &accept, Bytes::new())),
    )
    .await
    .expect("a stalled manifest body must not hold the request")
    .unwrap();
    assert_eq!(stalled.status, 502);
    // The single flight of that fetch is gone: the next request asks the upstream again.
    let fetched = fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == image.manifest.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_would_eat_into_min_free_is_refused_before_it_writes() {
    // No filesystem here has a petabyte free: every fill's reservation breaks `min_free`, and
    // evicting the (empty) cache cannot help.
    let stack = support::Stack::start("min_free = \"1PiB\"").await;
    let blob = stack.push(100_000, 52).await;
    let refused = get(&stack.url(&blob), None).await.unwrap();
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    let state = &stack.berth.state;
    assert_eq!(state.cache.index.reserved(), 0, "the refused fill let go");
    assert!(state.cache.index.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_upstreams_held_manifest_fetch_is_not_joined_by_clients_of_another_upstream() {
    use support::{push_image, Flavor, Image};
    let two = TwoUpstreams::start("").await;
    let image = Image::random(Flavor::Oci, 53, &[1000]);
    push_image(&two.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let url = |upstream: &str| {
        format!(
            "{}/v2/team/app/manifests/{}?ns={upstream}",
            two.berth.url(),
            image.digest()
        )
    };
    let accept = [("accept", Flavor::Oci.manifest_type())];

    // The hostile upstream holds its answer for the manifest, by digest.
    two.tap.inject_times(Kind::Manifest, Fault::Hold, 1);
    let hostile_url = url("hostile.test");
    let held = tokio::spawn(async move {
        let accept = [("accept", Flavor::Oci.manifest_type())];
        fetch(request(
            Method::GET,
            &hostile_url,
            None,
            &accept,
            Bytes::new(),
        ))
        .await
    });
    two.tap.wait_paused(1).await;

    // The same digest through the honest upstream: its own fetch, not the held one.
    let honest = tokio::time::timeout(
        HANG_GUARD,
        fetch(request(
            Method::GET,
            &url("honest.test"),
            None,
            &accept,
            Bytes::new(),
        )),
    )
    .await
    .expect("the honest client must not wait on the hostile upstream's manifest fetch")
    .unwrap();
    assert_eq!(honest.status, 200);
    assert_eq!(honest.header("x-cache"), Some("MISS"), "not COALESCED");
    assert!(honest.body == image.manifest.bytes);

    two.tap.resume();
    let held = held.await.unwrap().unwrap();
    assert_eq!(held.status, 200);
    assert!(held.body == image.manifest.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_keeps_cutting_bodies_is_shed_by_its_circuit_breaker() {
    let two =
        TwoUpstreams::start("[client]\nbreaker_threshold = 3\nbreaker_cooldown = \"120s\"").await;
    let mut blobs = Vec::new();
    for seed in 0..4 {
        blobs.push(two.push(50_000, 70 + seed).await);
    }
    // Every blob body from the hostile upstream is cut after 1,000 bytes, resumes included:
    // each head arrives at once, so only the bodies show that it never delivers.
    two.tap.inject(Kind::Blob, Fault::CutBlobAt(1_000));
    two.pull_failing(&blobs[..3]).await;
    assert_eq!(two.berth.state.metrics.fills_failed.get(), 3);

    // The fourth request is answered from the open breaker, without asking the upstream.
    two.assert_shed_while_honest_serves(&blobs[3]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_upstreams_held_fills_cannot_take_the_fill_slots_of_another() {
    // Four fill slots, half of them for each configured upstream.
    let two = TwoUpstreams::start("[limits]\nmax_fills = 4\nupstream_fill_share = 50").await;
    let mut blobs = Vec::new();
    for seed in 0..4 {
        blobs.push(two.push(200_000, 80 + seed).await);
    }
    // The hostile upstream holds every fill it is given after 1,000 bytes.
    two.tap.inject(Kind::Blob, Fault::PauseAt(1_000));
    let mut held = Vec::new();
    for blob in &blobs[..2] {
        held.push(send_get(&two.url(blob, "hostile.test")).await.unwrap());
    }
    two.tap.wait_paused(2).await;
    // A third of its fills would leave the honest upstream one slot, a fourth none: refused.
    let refused = tokio::time::timeout(HANG_GUARD, get(&two.url(&blobs[2], "hostile.test"), None))
        .await
        .expect("refused at once, not started and held")
        .unwrap();
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(two.berth.state.fills.in_flight(), 2);

    // Clients of the honest upstream still get fills (two at once).
    let honest = blobs[2..].iter().map(|blob| {
        let url = two.url(blob, "honest.test");
        async move { get(&url, None).await }
    });
    for (fetched, blob) in futures_util::future::join_all(honest)
        .await
        .into_iter()
        .zip(&blobs[2..])
    {
        let fetched = fetched.unwrap();
        assert_eq!(fetched.status, 200);
        assert_eq!(fetched.header("x-cache"), Some("MISS"));
        assert!(fetched.body == blob.bytes);
    }
    two.tap.clear_faults();
    two.tap.resume();
    for response in held {
        let mut body = response.into_body();
        let (_, error) = read_body(&mut body, 200_001).await;
        assert!(error.is_none(), "{error:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_trickles_is_shed_as_its_bodies_are_abandoned_not_after_every_resume() {
    // 1,000 bytes every 100 ms against a floor of 32 KiB/s over 1 s: each body is abandoned
    // after its first window, and two abandoned bodies open the breaker.
    let two = TwoUpstreams::start(
        "[client]\nmin_fill_rate = \"32KiB\"\nmin_fill_window = \"1s\"\nread_timeout = \"30s\"\n\
         breaker_threshold = 2\nbreaker_cooldown = \"120s\"",
    )
    .await;
    let mut blobs = Vec::new();
    for seed in 0..3 {
        blobs.push(two.push(300_000, 90 + seed).await);
    }
    two.tap
        .inject(Kind::Blob, Fault::Slow(1_000, Duration::from_millis(100)));
    two.pull_failing(&blobs[..2]).await;
    // Each fill had at most one resume before the breaker opened and one refused after it;
    // counted only when fills run out of resumes, the two would have made all 12.
    let resumes = two.berth.state.metrics.fill_resumes.get();
    assert!(resumes <= 4, "{resumes} resumes");

    two.assert_shed_while_honest_serves(&blobs[2]).await;
}
