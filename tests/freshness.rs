//! Fresh tags, dead upstreams, full disks: revalidation, serve-stale, the negative cache and
//! size-bounded eviction, against the real registry behind a counting tap.
//!
//! These tests run on the current-thread runtime so they can move tokio's clock: real I/O runs
//! with the clock running, and `age()` pauses it only to advance it past a TTL.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::image::sha256_digest;
use support::{
    fetch, get, push_blob, push_image, random_blob, read_body, request, send_get, Berth, Fault,
    Fetched, Flavor, Image, Kind, Stack,
};

/// Moves tokio's clock (and so berth's view of time) forward.
async fn age(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

impl Stack {
    async fn pull_tag(&self, repo: &str, tag: &str) -> Fetched {
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.berth.url());
        let accept = [("accept", Flavor::Oci.manifest_type())];
        fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
            .await
            .unwrap()
    }

    fn manifest_requests(&self) -> (usize, usize) {
        (
            self.tap.count(Method::GET, Kind::Manifest),
            self.tap.count(Method::HEAD, Kind::Manifest),
        )
    }
}

const TTL: Duration = Duration::from_secs(31);

#[tokio::test]
async fn a_new_push_is_visible_after_the_ttl_and_revalidation_is_head_only() {
    let stack = Stack::start("").await;
    let first = Image::random(Flavor::Oci, 1, &[1000]);
    let second = Image::random(Flavor::Oci, 2, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &first, None)
        .await
        .unwrap();

    let miss = stack.pull_tag("team/app", "v1").await;
    assert_eq!(
        (miss.header("x-cache"), &miss.body),
        (Some("MISS"), &first.manifest.bytes)
    );
    let hit = stack.pull_tag("team/app", "v1").await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(
        stack.manifest_requests(),
        (1, 0),
        "a fresh tag never asks upstream"
    );

    age(TTL).await;
    let revalidated = stack.pull_tag("team/app", "v1").await;
    assert_eq!(revalidated.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(revalidated.body, first.manifest.bytes);
    assert_eq!(
        stack.manifest_requests(),
        (1, 1),
        "unchanged: one HEAD, no GET"
    );

    push_image(&stack.registry.url(), "team/app", "v1", &second, None)
        .await
        .unwrap();
    assert_eq!(
        stack.pull_tag("team/app", "v1").await.body,
        first.manifest.bytes,
        "within the TTL"
    );
    age(TTL).await;
    let moved = stack.pull_tag("team/app", "v1").await;
    assert_eq!(
        moved.body, second.manifest.bytes,
        "visible once the TTL has passed"
    );
    assert_eq!(
        stack.manifest_requests(),
        (2, 2),
        "changed: one HEAD, then one GET of the body"
    );

    let by_digest = format!(
        "{}/v2/team/app/manifests/{}",
        stack.berth.url(),
        first.digest()
    );
    age(Duration::from_secs(3600)).await;
    stack.tap.reset();
    assert_eq!(
        get(&by_digest, None).await.unwrap().header("x-cache"),
        Some("HIT")
    );
    assert!(
        stack.tap.requests().is_empty(),
        "a cached digest never contacts the upstream"
    );
}

#[tokio::test]
async fn concurrent_revalidations_of_one_tag_collapse_into_one_head() {
    const CLIENTS: usize = 8;
    let stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 3, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    stack.pull_tag("team/app", "v1").await;
    age(TTL).await;
    stack.tap.reset();
    stack.tap.inject_times(Kind::Manifest, Fault::Hold, 1);

    let url = format!("{}/v2/team/app/manifests/v1", stack.berth.url());
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let url = url.clone();
        let accept = [("accept", Flavor::Oci.manifest_type())];
        clients.push(tokio::spawn(async move {
            fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
                .await
                .unwrap()
        }));
    }
    stack.tap.wait_paused(1).await;
    // Bounded: every other client must reach the revalidation already under way.
    for _ in 0..1_000_000 {
        if stack.berth.state.coalesced_waiting() == CLIENTS - 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(stack.berth.state.coalesced_waiting(), CLIENTS - 1);
    stack.tap.resume();
    for client in clients {
        let fetched = client.await.unwrap();
        assert_eq!(fetched.header("x-cache"), Some("REVALIDATED"));
        assert_eq!(fetched.body, image.manifest.bytes);
    }
    assert_eq!(stack.manifest_requests(), (0, 1));
}

#[tokio::test]
async fn cached_tags_and_blobs_are_served_stale_while_the_upstream_is_down() {
    let mut stack = Stack::start("").await;
    let image = Image::random(Flavor::Oci, 4, &[50_000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    stack.pull_tag("team/app", "v1").await;
    let layer = &image.layers[0].blob;
    let blob_url = format!("{}/v2/team/app/blobs/{}", stack.berth.url(), layer.digest);
    get(&blob_url, None).await.unwrap();

    stack.registry.stop();
    age(TTL).await;
    let stale = stack.pull_tag("team/app", "v1").await;
    assert_eq!(
        (stale.status.as_u16(), stale.header("x-cache")),
        (200, Some("STALE"))
    );
    assert_eq!(stale.body, image.manifest.bytes);
    let blob = get(&blob_url, None).await.unwrap();
    assert_eq!(
        (blob.header("x-cache"), blob.body.len()),
        (Some("HIT"), layer.len())
    );
    assert_eq!(stack.berth.state.metrics.stale_served.get(), 1);

    // A restart during the outage still knows the tag: mappings are persisted.
    stack.restart_berth("").await;
    age(TTL).await;
    let after_restart = stack.pull_tag("team/app", "v1").await;
    assert_eq!(after_restart.header("x-cache"), Some("STALE"));
    assert_eq!(after_restart.body, image.manifest.bytes);

    age(Duration::from_secs(25 * 3600)).await;
    let expired = stack.pull_tag("team/app", "v1").await;
    assert!(
        matches!(expired.status.as_u16(), 502..=504),
        "past stale_if_error: {}",
        expired.status
    );
}

#[tokio::test]
async fn a_rate_limited_upstream_with_nothing_cached_gives_429_with_retry_after() {
    let stack = Stack::start("").await;
    stack
        .tap
        .inject(Kind::Manifest, Fault::Status(429, Some(7)));
    let limited = stack.pull_tag("team/app", "v1").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("7"));
    let json: serde_json::Value = serde_json::from_slice(&limited.body).unwrap();
    assert_eq!(json["errors"][0]["code"], "TOOMANYREQUESTS");
}

#[tokio::test]
async fn a_missing_tag_is_remembered_briefly() {
    let stack = Stack::start("").await;
    assert_eq!(stack.pull_tag("team/app", "nope").await.status, 404);
    let again = stack.pull_tag("team/app", "nope").await;
    assert_eq!(again.status, 404);
    let json: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(json["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert_eq!(
        stack.manifest_requests(),
        (1, 0),
        "the second 404 came from the negative cache"
    );

    let image = Image::random(Flavor::Oci, 5, &[1000]);
    push_image(&stack.registry.url(), "team/app", "nope", &image, None)
        .await
        .unwrap();
    age(Duration::from_secs(11)).await;
    let found = stack.pull_tag("team/app", "nope").await;
    assert_eq!(
        (found.status.as_u16(), found.body),
        (200, image.manifest.bytes.clone())
    );
}

/// Bytes of committed objects on disk.
fn disk_usage(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for tree in ["blobs/sha256", "manifests/sha256"] {
        for shard in std::fs::read_dir(dir.join(tree)).unwrap() {
            for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                total += file.unwrap().metadata().unwrap().len();
            }
        }
    }
    total
}

#[tokio::test]
async fn the_cache_stays_within_max_size_and_evicts_the_least_recently_used() {
    const BLOB: usize = 700_000;
    let stack = Stack::start("max_size = \"3MiB\"").await;
    let blobs: Vec<_> = (0..6).map(|seed| random_blob(BLOB, 100 + seed)).collect();
    for blob in &blobs {
        push_blob(&stack.registry.url(), "team/app", blob, None)
            .await
            .unwrap();
    }
    let url =
        |blob: &support::Blob| format!("{}/v2/team/app/blobs/{}", stack.berth.url(), blob.digest);

    // A client that starts reading blob 0 before it is evicted reads it to the end.
    get(&url(&blobs[0]), None).await.unwrap();
    let reader = send_get(&url(&blobs[0])).await.unwrap();
    let mut body = reader.into_body();
    let (head, _) = read_body(&mut body, 1).await;

    for blob in &blobs[1..] {
        let fetched = get(&url(blob), None).await.unwrap();
        assert_eq!(sha256_digest(&fetched.body), blob.digest);
        assert!(
            disk_usage(stack.cache.path()) <= 3 << 20,
            "within max_size after every fill"
        );
    }
    let (rest, error) = read_body(&mut body, BLOB).await;
    assert!(error.is_none());
    assert_eq!(
        sha256_digest(&[head, rest].concat()),
        blobs[0].digest,
        "the evicted blob was read whole"
    );

    let index = &stack.berth.state.cache.index;
    let digest = |b: &support::Blob| berth::oci::digest::Digest::parse(&b.digest).unwrap();
    assert!(
        index.get(&digest(&blobs[0])).is_none(),
        "the least recently used went first"
    );
    assert!(index.get(&digest(&blobs[5])).is_some());
    for (entry_digest, entry) in index.snapshot() {
        let path = stack
            .berth
            .state
            .cache
            .store
            .path(entry.kind, &entry_digest);
        assert!(path.exists(), "no index entry points at a missing file");
    }
    stack.tap.reset();
    for blob in &blobs {
        let fetched = get(&url(blob), None).await.unwrap();
        assert_eq!(
            sha256_digest(&fetched.body),
            blob.digest,
            "every blob served still verifies"
        );
    }
}

#[tokio::test]
async fn recency_survives_a_restart() {
    let mut stack = Stack::start("max_size = \"3MiB\"").await;
    let blobs: Vec<_> = (0..4)
        .map(|seed| random_blob(900_000, 200 + seed))
        .collect();
    for blob in &blobs {
        push_blob(&stack.registry.url(), "team/app", blob, None)
            .await
            .unwrap();
    }
    let url = |blob: &support::Blob, berth: &Berth| {
        format!("{}/v2/team/app/blobs/{}", berth.url(), blob.digest)
    };
    for blob in &blobs[..3] {
        get(&url(blob, &stack.berth), None).await.unwrap();
    }
    // Blob 0 was fetched first but is the hottest: recorded as used an hour from now.
    let store = &stack.berth.state.cache.store;
    let digest = |b: &support::Blob| berth::oci::digest::Digest::parse(&b.digest).unwrap();
    let hot = std::fs::File::options()
        .write(true)
        .open(store.path(berth::cache::Kind::Blob, &digest(&blobs[0])))
        .unwrap();
    hot.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();

    stack.restart_berth("max_size = \"3MiB\"").await;
    get(&url(&blobs[3], &stack.berth), None).await.unwrap();
    let index = &stack.berth.state.cache.index;
    assert!(
        index.get(&digest(&blobs[0])).is_some(),
        "the hottest blob survived the restart"
    );
    assert!(index.get(&digest(&blobs[1])).is_none(), "the coldest went");
}

#[tokio::test]
async fn min_free_evicts_the_least_recently_used_until_enough_is_free() {
    let stack = Stack::start("").await;
    let blobs: Vec<_> = (0..3)
        .map(|seed| random_blob(500_000, 300 + seed))
        .collect();
    let cache = &stack.berth.state.cache;
    let digest = |b: &support::Blob| berth::oci::digest::Digest::parse(&b.digest).unwrap();
    for (age_hours, blob) in [3u64, 1, 2].into_iter().zip(&blobs) {
        push_blob(&stack.registry.url(), "team/app", blob, None)
            .await
            .unwrap();
        get(
            &format!("{}/v2/team/app/blobs/{}", stack.berth.url(), blob.digest),
            None,
        )
        .await
        .unwrap();
        let path = cache.store.path(berth::cache::Kind::Blob, &digest(blob));
        let file = std::fs::File::options().write(true).open(path).unwrap();
        let when = std::time::SystemTime::now() - Duration::from_secs(age_hours * 3600);
        file.set_modified(when).unwrap();
    }
    let free = berth::cache::evict::free_space(stack.cache.path()).unwrap();
    let freed = cache.enforce_min_free(free + 1).unwrap();
    assert!(freed >= 500_000);
    assert!(
        cache.index.get(&digest(&blobs[0])).is_none(),
        "the oldest (3 h) went first"
    );
    assert!(
        cache.index.get(&digest(&blobs[1])).is_some(),
        "the newest (1 h) stayed"
    );
}
