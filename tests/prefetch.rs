//! Prefetch: a client's GET of an image manifest (`trigger = "manifest"`), or its first GET of
//! one of the image's blobs (`trigger = "first_blob"`), starts the fills of the missing config
//! and layers before the client asks for them; the client's blob requests then join those
//! fills. Against a real registry behind a counting tap; the tap's pause points hold fills open
//! where a test needs them running.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::{
    fetch, push_image, push_index, request, Flavor, Image, Index, Kind, Platform, Stack,
};
use support::{push_blob, random_blob, random_layer, Fault};

const REPO: &str = "team/cold";

/// `[prefetch]` keys: which request starts an image's prefetch.
const ON_MANIFEST: &str = "trigger = \"manifest\"";
const ON_FIRST_BLOB: &str = "trigger = \"first_blob\"";

async fn get_manifest(stack: &Stack, reference: &str, method: Method) -> support::Fetched {
    let url = format!("{}/v2/{REPO}/manifests/{reference}", stack.berth.url());
    let accept = [(
        "accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
    )];
    let fetched = fetch(request(method, &url, None, &accept, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 200, "manifest {reference}");
    fetched
}

async fn get_blob(stack: &Stack, digest: &str) -> support::Fetched {
    let url = stack.blob_url(REPO, digest);
    fetch(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap()
}

/// Spawns a client's GET of `url`.
fn spawn_get(url: String) -> tokio::task::JoinHandle<support::Fetched> {
    tokio::spawn(async move {
        fetch(request(Method::GET, &url, None, &[], Bytes::new()))
            .await
            .unwrap()
    })
}

/// A stack (berth's config with the `[prefetch]` keys `prefetch`) whose registry holds
/// `REPO:v1`, an image of layers of `sizes`, with the tap's count of requests at zero.
async fn cold_stack(prefetch: &str, seed: u64, sizes: &[usize]) -> (Stack, Image) {
    cold_stack_with("", prefetch, seed, sizes).await
}

/// `cold_stack` with `cache` in berth's `[cache]` table.
async fn cold_stack_with(
    cache: &str,
    prefetch: &str,
    seed: u64,
    sizes: &[usize],
) -> (Stack, Image) {
    let stack = Stack::start(&format!("{cache}\n[prefetch]\n{prefetch}")).await;
    let image = Image::random(Flavor::Oci, seed, sizes);
    push_image(&stack.registry.url(), REPO, "v1", &image, None)
        .await
        .unwrap();
    stack.tap.reset();
    (stack, image)
}

/// `cold_stack` of a config and four layers, whose upstream blob bodies are all held after
/// their first bytes (so fills stay running until `Tap::resume`).
async fn held_stack(prefetch: &str, seed: u64) -> (Stack, Image) {
    let (stack, image) = cold_stack(prefetch, seed, &[100_000; 4]).await;
    stack.tap.inject(Kind::Blob, Fault::PauseAt(64));
    (stack, image)
}

/// GETs `REPO:v1` from a `held_stack` and waits until `held` prefetch fills are held upstream
/// and `count` blobs were skipped for `reason`; then exactly `held` blob GETs went upstream.
async fn get_v1_until(stack: &Stack, held: usize, (reason, count): (&str, u64)) {
    get_manifest(stack, "v1", Method::GET).await;
    stack.tap.wait_paused(held).await;
    wait_metric(reason, || skipped(stack, reason), count).await;
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), held);
}

/// Polls a metric until it reaches `want`; fails the test after 10 s.
async fn wait_metric(what: &str, read: impl Fn() -> u64, want: u64) {
    for _ in 0..1000 {
        if read() >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: waited for {want}, have {}", read());
}

fn skipped(stack: &Stack, reason: &str) -> u64 {
    let metrics = &stack.berth.state.metrics;
    metrics.prefetch_skipped.with_label_values(&[reason]).get()
}

#[tokio::test]
async fn a_manifest_get_starts_the_fills_that_the_blob_requests_then_join() {
    let (stack, image) = cold_stack(ON_MANIFEST, 11, &[400_000, 900_000, 200_000]).await;
    // Every upstream blob body is held after its first bytes, so the fills are still running
    // when the client asks for the blobs.
    stack.tap.inject(Kind::Blob, Fault::PauseAt(64));

    get_manifest(&stack, "v1", Method::GET).await;
    let blobs = image.blobs();
    stack.tap.wait_paused(blobs.len()).await;
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), blobs.len());

    let mut clients = Vec::new();
    for blob in &blobs {
        let url = stack.blob_url(REPO, &blob.digest);
        clients.push(tokio::spawn(async move {
            fetch(request(Method::GET, &url, None, &[], Bytes::new()))
                .await
                .unwrap()
        }));
    }
    // The clients join while the fills are held; then the upstream bodies may finish.
    let metrics = &stack.berth.state.metrics;
    wait_metric(
        "joined",
        || metrics.prefetch_joined.get(),
        blobs.len() as u64,
    )
    .await;
    stack.tap.resume();
    for (client, blob) in clients.into_iter().zip(&blobs) {
        let fetched = client.await.unwrap();
        assert_eq!(fetched.status, 200);
        assert_eq!(fetched.header("x-cache"), Some("COALESCED"));
        assert_eq!(support::image::sha256_digest(&fetched.body), blob.digest);
    }
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), blobs.len());
    assert_eq!(metrics.prefetch_started.get(), blobs.len() as u64);
    assert_eq!(metrics.prefetch_unjoined.get(), 0);
}

#[tokio::test]
async fn a_prefetch_no_client_joins_completes_and_later_requests_hit() {
    let (stack, image) = cold_stack(ON_MANIFEST, 21, &[300_000, 100_000]).await;

    get_manifest(&stack, "v1", Method::GET).await;
    let metrics = &stack.berth.state.metrics;
    let blobs = image.blobs();
    wait_metric(
        "unjoined",
        || metrics.prefetch_unjoined.get(),
        blobs.len() as u64,
    )
    .await;
    for blob in &blobs {
        let fetched = get_blob(&stack, &blob.digest).await;
        assert_eq!(fetched.header("x-cache"), Some("HIT"));
        assert_eq!(support::image::sha256_digest(&fetched.body), blob.digest);
    }
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), blobs.len());
}

#[tokio::test]
async fn heads_and_index_gets_start_nothing_and_the_platform_manifest_does() {
    let stack = Stack::start(&format!("[prefetch]\n{ON_MANIFEST}")).await;
    let amd = Image::random(Flavor::Oci, 31, &[100_000, 200_000]);
    let arm = Image::for_platform(
        Flavor::Oci,
        Platform::new("linux", "arm64", None),
        vec![random_layer(150_000, 41)],
    );
    let index = Index::new(Flavor::Oci, vec![amd.clone(), arm]);
    push_index(&stack.registry.url(), REPO, "multi", &index, None)
        .await
        .unwrap();
    // Another image for the HEAD: were a HEAD to start its fills, the count below would show
    // them (the amd64 image's fills would otherwise hide them, already under way).
    let single = Image::random(Flavor::Oci, 32, &[120_000]);
    push_image(&stack.registry.url(), REPO, "single", &single, None)
        .await
        .unwrap();
    stack.tap.reset();

    // A HEAD of an image manifest and a GET of an index decide synchronously: nothing starts.
    get_manifest(&stack, "single", Method::HEAD).await;
    get_manifest(&stack, "multi", Method::GET).await;
    let metrics = &stack.berth.state.metrics;
    assert_eq!(metrics.prefetch_started.get(), 0);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 0);

    // The platform's manifest, once asked for, does.
    get_manifest(&stack, amd.digest(), Method::GET).await;
    stack
        .tap
        .wait_for(Method::GET, Kind::Blob, amd.blobs().len())
        .await;
    wait_metric("unjoined", || metrics.prefetch_unjoined.get(), 3).await;
    assert_eq!(metrics.prefetch_started.get(), 3);
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Blob),
        3,
        "nothing of the HEAD's image"
    );
}

#[tokio::test]
async fn no_more_than_max_total_prefetches_run_at_once() {
    let (stack, _) = held_stack(&format!("{ON_MANIFEST}\nmax_total = 2"), 51).await;
    get_v1_until(&stack, 2, ("max_total", 3)).await;
    assert_eq!(stack.berth.state.metrics.prefetch_started.get(), 2);
    stack.tap.resume();
}

#[tokio::test]
async fn prefetches_leave_the_last_fill_slots_to_real_misses() {
    // max_fills = 4, all of it for the one upstream: real misses keep one slot, so three
    // prefetches run and two wait.
    let limits = "[limits]\nmax_fills = 4\nupstream_fill_share = 100";
    let (stack, image) = held_stack(&format!("{ON_MANIFEST}\n{limits}"), 61).await;
    get_v1_until(&stack, 3, ("fills_busy", 2)).await;

    // A client's request for a blob no prefetch took gets the slot left free.
    let last = image.blobs()[4].digest.clone();
    let (client, _) = tokio::join!(get_blob(&stack, &last), async {
        stack.tap.wait_paused(4).await;
        stack.tap.resume();
    });
    let fetched = client;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.header("x-cache"), Some("MISS"));
    assert_eq!(support::image::sha256_digest(&fetched.body), last);
}

/// A 1 MiB cache whose registry holds `REPO:v1` (a config and a 400 KB layer) and another
/// 700 KB blob; `REPO:v1` was pulled, so its config and layer are being prefetched, held after
/// their first bytes. Prefetches may reserve half of the cache: the other blob's miss needs
/// more than the rest.
async fn tiny_cache_prefetching(seed: u64) -> (Stack, Image, support::Blob) {
    let (stack, image) =
        cold_stack_with("max_size = \"1MiB\"", ON_MANIFEST, seed, &[400_000]).await;
    let other = random_blob(700_000, seed + 1);
    push_blob(&stack.registry.url(), REPO, &other, None)
        .await
        .unwrap();
    stack.tap.inject_times(Kind::Blob, Fault::PauseAt(64), 2);
    get_manifest(&stack, "v1", Method::GET).await;
    stack.tap.wait_paused(2).await;
    (stack, image, other)
}

/// Waits until the prefetch of the 400 KB layer holds its room.
async fn wait_layer_reserved(stack: &Stack) {
    let index = &stack.berth.state.cache.index;
    wait_metric("reserved", || index.reserved(), 400_000).await;
}

#[tokio::test]
async fn a_real_miss_in_a_tiny_cache_takes_the_room_of_an_unjoined_prefetch() {
    let (stack, _, other) = tiny_cache_prefetching(81).await;
    wait_layer_reserved(&stack).await;

    let fetched = get_blob(&stack, &other.digest).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.header("x-cache"), Some("MISS"));
    assert_eq!(fetched.body, other.bytes);
    assert!(skipped(&stack, "cancelled") >= 1, "a prefetch gave way");
    stack.tap.resume();
}

#[tokio::test]
async fn a_prefetch_a_client_joined_keeps_its_room() {
    let (stack, image, other) = tiny_cache_prefetching(83).await;
    let metrics = &stack.berth.state.metrics;
    let layer = image.blobs()[1].clone();
    let url = stack.blob_url(REPO, &layer.digest);
    let client = tokio::spawn(fetch(request(Method::GET, &url, None, &[], Bytes::new())));
    wait_metric("joined", || metrics.prefetch_joined.get(), 1).await;
    wait_layer_reserved(&stack).await;

    // Only the config's prefetch may give way, and its room is not enough.
    let refused = get_blob(&stack, &other.digest).await;
    assert_eq!(refused.status, 503);
    assert_eq!(skipped(&stack, "cancelled"), 1);
    stack.tap.resume();
    let joined = client.await.unwrap().unwrap();
    assert_eq!(joined.status, 200);
    assert_eq!(joined.body, layer.bytes);
}

#[tokio::test]
async fn an_upstream_that_answered_429_gets_no_prefetches() {
    let (stack, image) = cold_stack(ON_MANIFEST, 71, &[100_000, 100_000]).await;
    // A client's own miss is refused with 429 (a Retry-After too long to wait out).
    stack
        .tap
        .inject_times(Kind::Blob, Fault::Status(429, Some(120)), 1);
    let refused = get_blob(&stack, &image.blobs()[1].digest).await;
    assert_eq!(refused.status, 429);

    get_manifest(&stack, "v1", Method::GET).await;
    wait_metric("skipped", || skipped(&stack, "paused"), 3).await;
    assert_eq!(stack.berth.state.metrics.prefetch_started.get(), 0);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 1);
}

#[tokio::test]
async fn with_first_blob_only_a_blob_get_starts_the_prefetch_and_the_other_blob_gets_join_it() {
    let (stack, image) = held_stack(ON_FIRST_BLOB, 81).await;
    let metrics = &stack.berth.state.metrics;
    let blobs = image.blobs();

    // The manifest GET and a HEAD of a blob only resolve digests: nothing is fetched.
    get_manifest(&stack, "v1", Method::GET).await;
    let head_url = stack.blob_url(REPO, &blobs[2].digest);
    let head = fetch(request(Method::HEAD, &head_url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(metrics.prefetch_started.get(), 0);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 0);

    // The first GET of one of its blobs is served as a miss and starts the fills of the rest.
    let first = spawn_get(stack.blob_url(REPO, &blobs[1].digest));
    stack.tap.wait_paused(blobs.len()).await;
    let others: Vec<_> = blobs
        .iter()
        .filter(|b| b.digest != blobs[1].digest)
        .collect();
    let rest = others.len() as u64;
    wait_metric("started", || metrics.prefetch_started.get(), rest).await;
    let clients: Vec<_> = others
        .iter()
        .map(|blob| spawn_get(stack.blob_url(REPO, &blob.digest)))
        .collect();
    wait_metric("joined", || metrics.prefetch_joined.get(), rest).await;
    stack.tap.resume();

    let fetched = first.await.unwrap();
    assert_eq!(fetched.header("x-cache"), Some("MISS"));
    assert_eq!(
        support::image::sha256_digest(&fetched.body),
        blobs[1].digest
    );
    for (client, blob) in clients.into_iter().zip(&others) {
        let fetched = client.await.unwrap();
        assert_eq!(fetched.header("x-cache"), Some("COALESCED"));
        assert_eq!(support::image::sha256_digest(&fetched.body), blob.digest);
    }
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), blobs.len());
    assert_eq!(metrics.prefetch_started.get(), others.len() as u64);
}

#[tokio::test]
async fn thirty_concurrent_gets_of_one_manifest_prefetch_each_blob_once() {
    for trigger in [ON_MANIFEST, ON_FIRST_BLOB] {
        let (stack, image) = cold_stack(trigger, 91, &[200_000, 100_000, 300_000]).await;
        let url = format!("{}/v2/{REPO}/manifests/v1", stack.berth.url());
        let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
        let gets: Vec<_> = (0..30)
            .map(|_| {
                let get = request(Method::GET, &url, None, &accept, Bytes::new());
                tokio::spawn(fetch(get))
            })
            .collect();
        for get in gets {
            assert_eq!(get.await.unwrap().unwrap().status, 200, "{trigger}");
        }
        let blobs = image.blobs();
        // With `first_blob`, 30 nodes then ask for the same first layer at once.
        let prefetched = match trigger {
            ON_MANIFEST => blobs.len(),
            _ => {
                let first = &blobs[1].digest;
                let gets: Vec<_> = (0..30)
                    .map(|_| spawn_get(stack.blob_url(REPO, first)))
                    .collect();
                for get in gets {
                    let fetched = get.await.unwrap();
                    assert_eq!(support::image::sha256_digest(&fetched.body), *first);
                }
                blobs.len() - 1
            }
        };
        let metrics = &stack.berth.state.metrics;
        wait_metric(
            "unjoined",
            || metrics.prefetch_unjoined.get(),
            prefetched as u64,
        )
        .await;
        assert_eq!(
            metrics.prefetch_started.get(),
            prefetched as u64,
            "{trigger}"
        );
        assert_eq!(
            stack.tap.count(Method::GET, Kind::Blob),
            blobs.len(),
            "{trigger}"
        );
    }
}
