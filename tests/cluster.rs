//! Replicas of one location acting as one cache (`[cluster]`): three berths on loopback with
//! static peers, in front of one real registry behind a counting tap.

mod support;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Method;
use support::{
    fetch, push_blob, push_image, random_blob, request, Auth, Berth, Blob, Fault, Flavor, Image,
    Kind, Registry, Seen, Tap,
};
use tokio::net::TcpListener;

const TOKEN: &str = "peer-token-for-tests-0123456789";

/// A location of `n` replicas sharing one upstream, each with its own cache directory.
struct Location {
    registry: Registry,
    tap: Tap,
    replicas: Vec<Berth>,
    /// With `start_fronted`: the tap every peer request to replica 1 passes through.
    front: Option<Tap>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Location {
    async fn start(n: usize) -> Location {
        Location::start_with(n, false, "").await
    }

    /// `start`, with the peers reaching replica 1 through a tap of its own (replica 1's `self`
    /// is that tap), so a test can cut what an owner sends its peers.
    async fn start_fronted(n: usize) -> Location {
        Location::start_with(n, true, "").await
    }

    /// A location whose replicas all end their config with `extra`: more `[cluster]` keys, then
    /// e.g. an `[access]` table.
    async fn start_with(n: usize, fronted: bool, extra: &str) -> Location {
        Location::start_inner(n, fronted, extra, None).await
    }

    /// `start`, with replica `killable` on a tokio runtime of its own, so the test can kill it.
    async fn start_killable(n: usize, killable: usize) -> Location {
        Location::start_inner(n, false, "", Some(killable)).await
    }

    async fn start_inner(
        n: usize,
        fronted: bool,
        extra: &str,
        killable: Option<usize>,
    ) -> Location {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let mut urls: Vec<String> = listeners
            .iter()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .collect();
        let front = match fronted {
            true => Some(Tap::start(&urls[1]).await),
            false => None,
        };
        if let Some(front) = &front {
            urls[1] = front.url();
        }
        let peers = urls
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut dirs = Vec::new();
        let mut replicas = Vec::new();
        for (i, (listener, url)) in listeners.into_iter().zip(&urls).enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let token_file = dir.path().join("peer-token");
            std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
            let cache = dir.path().join("cache");
            let config = support::single_upstream_config(&tap.host(), &tap.url(), &cache, "");
            let config = format!(
                "{config}\n[cluster]\npeers = [{peers}]\nself = {url:?}\ntoken_file = {:?}\n{extra}\n",
                token_file.display().to_string()
            );
            let resolver = berth::net::connect::system_resolver();
            let replica = match killable == Some(i) {
                true => Berth::start_on_own_runtime(listener, &config, resolver).await,
                false => Berth::start_on(listener, &config, resolver).await,
            };
            replicas.push(replica);
            dirs.push(dir);
        }
        Location {
            registry,
            tap,
            replicas,
            front,
            _dirs: dirs,
        }
    }

    /// Upstream GETs of `digest` as the tap saw them: those without a `Range`, then those with.
    fn upstream_gets(&self, digest: &str) -> (Vec<Seen>, Vec<Seen>) {
        self.tap
            .seen()
            .into_iter()
            .filter(|s| s.method == Method::GET && s.path.ends_with(digest))
            .partition(|s| !s.headers.contains_key("range"))
    }

    /// Upstream blob GETs by digest, as the tap saw them.
    fn blob_gets(&self) -> HashMap<String, usize> {
        let mut gets = HashMap::new();
        for (method, path) in self.tap.requests() {
            if method == Method::GET && Kind::of_path(&path) == Kind::Blob {
                let digest = path.rsplit('/').next().unwrap().to_owned();
                *gets.entry(digest).or_default() += 1;
            }
        }
        gets
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_cold_pulls_over_three_replicas_make_one_upstream_get_per_blob() {
    let location = Location::start(3).await;
    let image = Image::random(Flavor::Oci, 17, &[3 << 20, 1 << 20, 700_000, 50_000]);
    push_image(&location.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    location.tap.reset();

    let mut pulls = Vec::new();
    for i in 0..30 {
        let replica = location.replicas[i % 3].url();
        let blobs: Vec<(String, Bytes)> = image
            .blobs()
            .iter()
            .map(|b| (b.digest.clone(), b.bytes.clone()))
            .collect();
        pulls.push(tokio::spawn(async move {
            for (digest, bytes) in blobs {
                let url = format!("{replica}/v2/team/app/blobs/{digest}");
                let got = fetch(request(Method::GET, &url, None, &[], Bytes::new()))
                    .await
                    .unwrap();
                assert_eq!(got.status, 200, "{url}");
                assert_eq!(support::image::sha256_digest(&got.body), digest);
                assert_eq!(got.body, bytes);
            }
        }));
    }
    for pull in pulls {
        pull.await.unwrap();
    }
    let gets = location.blob_gets();
    for blob in image.blobs() {
        assert_eq!(gets.get(&blob.digest), Some(&1), "{gets:?}");
    }
    assert_eq!(gets.len(), image.blobs().len(), "{gets:?}");
}

/// Sum of `berth_peer_requests_total` over its results, from the replica's registry.
fn peer_requests(replica: &Berth) -> u64 {
    counter_sum(replica, "berth_peer_requests_total")
}

/// The counter `family` on `replica`, summed over its labels.
fn counter_sum(replica: &Berth, family: &str) -> u64 {
    let families = replica.state.metrics.registry.gather();
    families
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_request_without_the_token_or_with_a_wrong_one_is_an_ordinary_request() {
    let location = Location::start(3).await;
    let asked = &location.replicas[0];
    let ns = location.tap.host();
    let tokens: [&[(&str, &str)]; 3] = [
        &[],
        &[("x-berth-peer-token", "wrong-token-0123456789-abcdef")],
        &[("x-berth-peer-token", TOKEN)],
    ];
    // An ordinary request to a replica that does not own the blob asks the owner; a peer
    // request never does (it is never forwarded again).
    // The ring depends on the replicas' ports: pick blobs another replica owns.
    let mut blobs = (0..200)
        .map(|seed| random_blob(50_000, 1800 + seed))
        .filter(|b| owner_of(&location, &b.digest) != asked.url());
    for (i, headers) in tokens.iter().enumerate() {
        let before = peer_requests(asked);
        let blob = blobs.next().expect("a blob another replica owns");
        push_blob(&location.registry.url(), "team/app", &blob, None)
            .await
            .unwrap();
        let url = format!("{}/v2/team/app/blobs/{}?ns={ns}", asked.url(), blob.digest);
        let got = fetch(request(Method::GET, &url, None, headers, Bytes::new()))
            .await
            .unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, blob.bytes);
        let forwarded = peer_requests(asked) - before;
        let expected = if i == 2 { 0 } else { 1 };
        assert_eq!(forwarded, expected, "request {i}");
    }
}

/// `berth_peer_requests_total{result}` of one replica.
fn peer_results(replica: &Berth, result: &str) -> u64 {
    counter_by_result(replica, "berth_peer_requests_total", result)
}

fn owner_of(location: &Location, digest: &str) -> String {
    let cluster = location.replicas[0].state.cluster.as_ref().unwrap();
    cluster.members.owner(digest).unwrap().to_string()
}

/// A location whose replica 1 owns a 2 MiB blob in the registry; the owner stays up, but its
/// answers to its peers are cut after 1 MiB (a network cut; `killing_the_owner_mid_fill...`
/// kills the owner itself).
async fn location_with_an_owner_cut_off_at_1_mib() -> (Location, Blob) {
    let location = Location::start_fronted(3).await;
    let front = location.front.as_ref().unwrap();
    let blob = blob_owned_by(&location, &front.url(), 2 << 20);
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    location.tap.reset();
    front.inject(Kind::Blob, Fault::CutBlobAt(1 << 20));
    (location, blob)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_cut_off_mid_stream_costs_each_asker_at_most_one_range_get_and_no_pull() {
    let (location, blob) = location_with_an_owner_cut_off_at_1_mib().await;
    let front = location.front.as_ref().unwrap();
    let mut pulls = Vec::new();
    for i in 0..10 {
        let replica = [&location.replicas[0], &location.replicas[2]][i % 2].url();
        let url = format!("{replica}/v2/team/app/blobs/{}", blob.digest);
        pulls.push(tokio::spawn(async move {
            fetch(request(Method::GET, &url, None, &[], Bytes::new()))
                .await
                .unwrap()
        }));
    }
    for pull in pulls {
        let got = pull.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, blob.bytes, "every pull verifies");
    }
    assert!(
        front.count(Method::GET, Kind::Blob) >= 1,
        "the owner was asked"
    );
    let (whole, ranged) = location.upstream_gets(&blob.digest);
    // The owner's own fill, plus one Range GET from each of the two replicas with clients.
    assert_eq!(whole.len(), 1, "whole GETs: {whole:?}");
    assert_eq!(ranged.len(), 2, "Range GETs: {ranged:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_bytes_count_what_arrived_from_an_owner_cut_off_mid_stream() {
    let (location, blob) = location_with_an_owner_cut_off_at_1_mib().await;
    let asker = &location.replicas[0];
    pull_verified(asker, &blob).await;
    assert_eq!(peer_results(asker, "fill"), 1, "the owner answered");
    let from_peer = peer_bytes(asker);
    // The owner promised 2 MiB and sent 1 MiB; the rest came from the upstream.
    assert!(
        from_peer > 0 && from_peer <= 1 << 20,
        "counted {from_peer} bytes from the peer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_from_an_owner_do_not_open_the_upstreams_circuit_breaker() {
    let location = Location::start_fronted(3).await;
    let front = location.front.as_ref().unwrap();
    let asker = &location.replicas[0];
    let owned = |owner: &str, seeds: std::ops::Range<u64>| -> Vec<Blob> {
        seeds
            .map(|seed| random_blob(64 << 10, seed))
            .filter(|b| owner_of(&location, &b.digest) == owner)
            .collect()
    };
    // More fills than `client.breaker_threshold` (5) fail on the owner's wrong bytes.
    let spoiled: Vec<Blob> = owned(&front.url(), 0..200).into_iter().take(7).collect();
    let honest = owned(&asker.url(), 200..400).remove(0);
    for blob in spoiled.iter().chain([&honest]) {
        push_blob(&location.registry.url(), "team/app", blob, None)
            .await
            .unwrap();
    }
    front.inject(Kind::Blob, Fault::CorruptBlob);
    for blob in &spoiled {
        let url = format!("{}/v2/team/app/blobs/{}", asker.url(), blob.digest);
        // The body ends in an error (or a refusal); it never completes wrong.
        if let Ok(got) = fetch(request(Method::GET, &url, None, &[], Bytes::new())).await {
            if got.status == 200 {
                assert_eq!(got.body, blob.bytes, "no wrong blob completes");
            }
        }
    }
    assert!(
        front.count(Method::GET, Kind::Blob) >= 6,
        "the owner was asked"
    );
    // The upstream itself never failed a fill: its breaker is closed.
    pull_verified(asker, &honest).await;
}

/// `berth_peer_bytes_total` of one replica.
fn peer_bytes(replica: &Berth) -> u64 {
    counter_sum(replica, "berth_peer_bytes_total")
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_owner_mid_fill_fails_no_pull_and_costs_each_asker_at_most_one_range_get() {
    let mut location = Location::start_killable(3, 1).await;
    let owner_url = location.replicas[1].url();
    let blob = blob_owned_by(&location, &owner_url, 8 << 20);
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    // The owner's fill (the first upstream GET) stops at 3 MiB until the test says so: the
    // kill lands while it runs.
    location.tap.reset_with_blob_fault(Fault::PauseAt(3 << 20));

    // Four clients on each of the two other replicas; each reports its first bytes.
    let (first_bytes, mut started) = tokio::sync::mpsc::channel(8);
    let mut pulls = Vec::new();
    for i in 0..8 {
        let replica = [&location.replicas[0], &location.replicas[2]][i % 2].url();
        let url = format!("{replica}/v2/team/app/blobs/{}", blob.digest);
        let first_bytes = first_bytes.clone();
        pulls.push(tokio::spawn(async move {
            let response = support::send(request(Method::GET, &url, None, &[], Bytes::new()))
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{url}");
            let mut body = response.into_body();
            let (mut got, error) = support::read_body(&mut body, 1).await;
            assert!(error.is_none() && !got.is_empty(), "{url}: {error:?}");
            first_bytes.send(()).await.unwrap();
            let (rest, error) = support::read_body(&mut body, usize::MAX).await;
            assert!(error.is_none(), "{url}: {error:?}");
            got.extend_from_slice(&rest);
            got
        }));
    }
    location.tap.wait_paused(1).await;
    for _ in 0..8 {
        let wait = tokio::time::timeout(std::time::Duration::from_secs(30), started.recv());
        wait.await.expect("every client has bytes from the owner");
    }

    location.replicas[1].kill();
    location.tap.resume();
    for pull in pulls {
        assert!(pull.await.unwrap() == blob.bytes, "every pull verifies");
    }
    let dead = tokio::net::TcpStream::connect(location.replicas[1].addr).await;
    assert!(dead.is_err(), "the owner's listener died with it");
    let (whole, ranged) = location.upstream_gets(&blob.digest);
    // The dead owner's fill, plus at most one Range GET from each replica with clients, each
    // from where its owner's answer stopped (never from the start).
    assert_eq!(whole.len(), 1, "whole GETs: {whole:?}");
    assert!(ranged.len() <= 2, "Range GETs: {ranged:?}");
    for get in &ranged {
        let range = get.headers["range"].to_str().unwrap();
        let from: u64 = range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("an open Range: {range}"));
        assert!(from > 0 && from < blob.bytes.len() as u64, "{range}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_owner_fails_no_pull() {
    let location = Location::start_fronted(3).await;
    let owner_url = location.front.as_ref().unwrap().url();
    let blob = blob_owned_by(&location, &owner_url, 100_000);
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    let mut location = location;
    // The owner's front door closes: connecting to it fails from now on.
    drop(location.front.take());
    pull_verified(&location.replicas[0], &blob).await;
    assert!(
        peer_results(&location.replicas[0], "fallback") >= 1,
        "the asker tried the owner first"
    );
}

/// Pulls `blob` through `replica`: a 200 with exactly its bytes.
async fn pull_verified(replica: &Berth, blob: &Blob) {
    let url = format!("{}/v2/team/app/blobs/{}", replica.url(), blob.digest);
    let got = fetch(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, blob.bytes);
}

/// A blob of `size` bytes whose owner is `owner` (each try has a one in three chance).
fn blob_owned_by(location: &Location, owner: &str, size: usize) -> Blob {
    (0..200)
        .map(|seed| random_blob(size, seed))
        .find(|b| owner_of(location, &b.digest) == owner)
        .expect("a blob owned by the replica")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_on_a_replica_without_the_blob_is_answered_by_the_owner_not_the_upstream() {
    let location = Location::start(3).await;
    let owner = &location.replicas[1];
    let blob = blob_owned_by(&location, &owner.url(), 100_000);
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    pull_verified(owner, &blob).await;
    location.tap.reset();

    let asker = &location.replicas[0];
    let url = format!("{}/v2/team/app/blobs/{}", asker.url(), blob.digest);
    let got = fetch(request(Method::HEAD, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    let length = blob.bytes.len().to_string();
    assert_eq!(got.header("content-length"), Some(length.as_str()));
    assert_eq!(
        got.header("docker-content-digest"),
        Some(blob.digest.as_str())
    );
    assert_eq!(location.tap.requests(), vec![], "the upstream was asked");
    assert_eq!(peer_results(asker, "hit"), 1, "the owner's cache answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_owner_leaves_the_ring_at_once_and_fails_no_pull() {
    let location = Location::start(3).await;
    let owner_url = location.replicas[1].url();
    let blob = blob_owned_by(&location, &owner_url, 100_000);
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    location.replicas[1].state.readiness.mark_shutting_down();

    pull_verified(&location.replicas[0], &blob).await;
    let asker = location.replicas[0].state.cluster.as_ref().unwrap();
    let drained = (std::sync::Arc::from(owner_url.as_str()), "draining");
    assert!(asker.members.states().contains(&drained));
    assert_ne!(owner_of(&location, &blob.digest), owner_url);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_children_of_one_parent_make_one_upstream_get() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |dir: &tempfile::TempDir| {
        support::single_upstream_config(&tap.host(), &tap.url(), dir.path(), "")
    };
    let parent = Berth::start(&config(&dirs[0])).await;
    let child_config = |dir| format!("{}\n[cluster]\nparent = {:?}\n", config(dir), parent.url());
    let children = [
        Berth::start(&child_config(&dirs[1])).await,
        Berth::start(&child_config(&dirs[2])).await,
    ];
    let blob = random_blob(500_000, 21);
    push_blob(&registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    tap.reset();
    for child in &children {
        pull_verified(child, &blob).await;
    }
    assert_eq!(tap.count(Method::GET, Kind::Blob), 1);
}

const LOCATION_KEY: &str = "location-a-key-0123456789abcdef";

/// An `[access]` table of the policy mode, its files in `dir`, whose one principal `name`
/// (a service account with `key`) may pull everything.
fn policy_access(dir: &std::path::Path, name: &str, key: &str) -> String {
    let hash = berth::access::principals::KeyHash::generate(key).to_string();
    let principals = dir.join("principals.json");
    let principal = serde_json::json!({"serviceAccounts": [
        {"name": name, "keys": [{"hash": hash}]}
    ]});
    std::fs::write(&principals, principal.to_string()).unwrap();
    let policies = dir.join("policies");
    std::fs::create_dir(&policies).unwrap();
    let policy = serde_json::json!({
        "kind": "policy", "name": "pullers", "targetKind": "image", "target": "all",
        "bindings": [{"permissions": ["pull"], "principalLinks": [format!("//serviceaccount/{name}")]}],
    });
    std::fs::write(policies.join("pullers.json"), policy.to_string()).unwrap();
    format!(
        "[access]\nmode = \"policy\"\nprincipals = {:?}\npolicies = {:?}\n",
        principals.display().to_string(),
        policies.display().to_string()
    )
}

/// A parent in the policy mode whose one principal, `location-a`, may pull everything.
async fn policy_parent(tap: &Tap, dir: &std::path::Path) -> Berth {
    let access = policy_access(dir, "location-a", LOCATION_KEY);
    let cache = dir.join("cache");
    let config = support::single_upstream_config(&tap.host(), &tap.url(), &cache, "");
    Berth::start(&format!("{config}\n{access}")).await
}

/// Sum of `berth_parent_requests_total{result}` on `replica`.
fn parent_requests(replica: &Berth, result: &str) -> u64 {
    counter_by_result(replica, "berth_parent_requests_total", result)
}

/// The counter `family{result}` on `replica`.
fn counter_by_result(replica: &Berth, family: &str, result: &str) -> u64 {
    let families = replica.state.metrics.registry.gather();
    families
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == result))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_with_its_key_pulls_through_the_parent_and_a_revoked_key_is_refused() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let parent = policy_parent(&tap, dir.path()).await;
    let child = |name: &str, key: &str| {
        let key_file = dir.path().join(format!("{name}.key"));
        // A service account signs in as `<token>:KEY`, like any Basic client.
        std::fs::write(&key_file, format!("<token>:{key}\n")).unwrap();
        let cache = dir.path().join(name);
        let config = support::single_upstream_config(&tap.host(), &tap.url(), &cache, "");
        format!(
            "{config}\n[cluster]\nparent = {:?}\nparent_key_file = {:?}\n",
            parent.url(),
            key_file.display().to_string()
        )
    };
    let allowed = Berth::start(&child("allowed", LOCATION_KEY)).await;
    let revoked = Berth::start(&child("revoked", "revoked-key-0123456789abcdef")).await;
    let blob = random_blob(300_000, 22);
    push_blob(&registry.url(), "team/app", &blob, None)
        .await
        .unwrap();

    pull_verified(&allowed, &blob).await;
    assert_eq!(parent_requests(&allowed, "served"), 1);
    // The parent refuses the revoked key; the child still serves its client from the upstream.
    pull_verified(&revoked, &blob).await;
    assert_eq!(parent_requests(&revoked, "refused"), 1);
    assert_eq!(parent_requests(&revoked, "served"), 0);
}

const PULLER_KEY: &str = "puller-key-0123456789abcdef";

/// A verified GET of `blob` from `replica` with `creds`; the status when it is not a 200.
async fn pull_as(replica: &Berth, blob: &Blob, creds: Option<(&str, &str)>) -> u16 {
    let url = format!("{}/v2/team/app/blobs/{}", replica.url(), blob.digest);
    let got = fetch(request(Method::GET, &url, creds, &[], Bytes::new()))
        .await
        .unwrap();
    if got.status == 200 {
        assert_eq!(got.body, blob.bytes);
    }
    got.status.as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_policy_mode_replicas_share_fills_and_refuse_who_may_not_pull_before_asking() {
    let dir = tempfile::tempdir().unwrap();
    let access = policy_access(dir.path(), "puller", PULLER_KEY);
    let location = Location::start_with(3, false, &access).await;
    let image = Image::random(Flavor::Oci, 23, &[1 << 20, 300_000, 40_000]);
    push_image(&location.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let creds = Some(("<token>", PULLER_KEY));
    // What a client may not pull, nobody asks for: not the owner, not the upstream.
    location.tap.reset();
    for replica in &location.replicas {
        for blob in image.blobs() {
            assert_eq!(pull_as(replica, blob, None).await, 401);
            let wrong = Some(("<token>", "not-a-key-0123456789abcdef"));
            assert_eq!(pull_as(replica, blob, wrong).await, 401);
        }
    }
    assert_eq!(location.tap.requests().len(), 0);
    assert_eq!(location.replicas.iter().map(peer_requests).sum::<u64>(), 0);

    // The owner fills each blob once; every other replica records the provenance its owner
    // reported: one upstream GET for the whole location.
    for blob in image.blobs() {
        for replica in &location.replicas {
            assert_eq!(pull_as(replica, blob, creds).await, 200);
            let origin = replica
                .state
                .cache
                .origins
                .get_cached(&berth::oci::digest::Digest::parse(&blob.digest).unwrap());
            assert!(origin.is_some_and(|o| o.served_by(&location.tap.host())));
        }
    }
    let gets = location.blob_gets();
    for blob in image.blobs() {
        assert_eq!(gets.get(&blob.digest), Some(&1), "{gets:?}");
    }
    assert!(location.replicas.iter().map(peer_requests).sum::<u64>() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_policy_mode_a_peer_request_without_a_valid_token_is_refused_as_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let access = policy_access(dir.path(), "puller", PULLER_KEY);
    let location = Location::start_with(3, false, &access).await;
    let blob = random_blob(100_000, 24);
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    location.tap.reset();
    let owner = owner_of(&location, &blob.digest);
    let url = format!("{owner}/v2/team/app/blobs/{}", blob.digest);
    for token in ["", "wrong-token-0123456789-abcdef"] {
        let headers = [("x-berth-peer-token", token)];
        let got = fetch(request(Method::GET, &url, None, &headers, Bytes::new()))
            .await
            .unwrap();
        assert_eq!(got.status, 401, "token {token:?}");
    }
    assert_eq!(location.tap.requests().len(), 0);
    let headers = [("x-berth-peer-token", TOKEN)];
    let got = fetch(request(Method::GET, &url, None, &headers, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, blob.bytes);
    let provenance = got.headers.get("x-berth-provenance").unwrap();
    assert_eq!(provenance.to_str().unwrap(), location.tap.host());
}

/// A DNS server the test controls: every A query is answered with `addresses` (TTL 0).
async fn dns_server(addresses: Arc<Mutex<Vec<Ipv4Addr>>>) -> std::net::SocketAddr {
    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata.authoritative = true;
            answer.metadata.recursion_desired = query.metadata.recursion_desired;
            answer.metadata.recursion_available = true;
            answer.add_queries(query.queries.clone());
            for asked in query
                .queries
                .iter()
                .filter(|q| q.query_type() == RecordType::A)
            {
                for ip in addresses.lock().unwrap().iter() {
                    let record = Record::from_rdata(asked.name().clone(), 0, RData::A(A(*ip)));
                    answer.add_answer(record);
                }
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
        }
    });
    address
}

/// Waits (bounded) until `replica` lists `n` members.
async fn wait_for_ring(replica: &Berth, n: usize) {
    let cluster = replica.state.cluster.as_ref().unwrap();
    for _ in 0..400 {
        if cluster.members.listed().len() == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{} lists {:?}", replica.url(), cluster.stats());
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_membership_follows_the_resolver_including_a_replica_that_disappears() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let ips: Vec<Ipv4Addr> = (2..5).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let listed = Arc::new(Mutex::new(ips.clone()));
    let dns = dns_server(Arc::clone(&listed)).await;
    // One port on three loopback addresses: DNS members share `dns_port`.
    let (listeners, port) = 'bind: loop {
        let first = TcpListener::bind((ips[0], 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for ip in &ips[1..] {
            match TcpListener::bind((*ip, port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'bind,
            }
        }
        break (listeners, port);
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("peer-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut replicas = Vec::new();
    for (listener, ip) in listeners.into_iter().zip(&ips) {
        let cache = dir.path().join(format!("cache-{ip}"));
        let config = support::single_upstream_config(&tap.host(), &tap.url(), &cache, "");
        let config = format!(
            "{config}\n[cluster]\ndns = \"replicas.location.test\"\ndns_port = {port}\n\
             resolver = \"{dns}\"\nrefresh = \"50ms\"\nself = \"http://{ip}:{port}\"\n\
             token_file = {:?}\n",
            token_file.display().to_string()
        );
        let resolver = berth::net::connect::system_resolver();
        replicas.push(Berth::start_on(listener, &config, resolver).await);
    }
    for replica in &replicas {
        wait_for_ring(replica, 3).await;
    }
    let blob = random_blob(200_000, 31);
    push_blob(&registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    for replica in &replicas {
        pull_verified(replica, &blob).await;
    }
    assert_eq!(tap.count(Method::GET, Kind::Blob), 1);

    // The third replica disappears from DNS: the others drop it, and only its keys move.
    let cluster = replicas[0].state.cluster.as_ref().unwrap();
    let keys: Vec<String> = (0..300).map(|i| format!("sha256:{i:064}")).collect();
    let before: Vec<_> = keys
        .iter()
        .map(|k| cluster.members.owner(k).unwrap())
        .collect();
    listed.lock().unwrap().pop();
    wait_for_ring(&replicas[0], 2).await;
    wait_for_ring(&replicas[1], 2).await;
    let gone = format!("http://{}:{port}", ips[2]);
    for (key, owner) in keys.iter().zip(&before) {
        let now = cluster.members.owner(key).unwrap();
        if **owner != *gone {
            assert_eq!(now, *owner, "{key} moved though its owner stayed");
        } else {
            assert_ne!(*now, *gone);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_does_not_keep_local_copies_asks_the_owner_each_time() {
    let location = Location::start_with(3, false, "keep_local = false\n").await;
    let asker = &location.replicas[0];
    let blob = (0..200)
        .map(|seed| random_blob(150_000, 3300 + seed))
        .find(|b| owner_of(&location, &b.digest) != asker.url())
        .expect("a blob another replica owns");
    push_blob(&location.registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    location.tap.reset();
    let digest = berth::oci::digest::Digest::parse(&blob.digest).unwrap();
    for pull in 1..=2 {
        pull_verified(asker, &blob).await;
        assert!(!asker.state.cache.index.contains(&digest), "pull {pull}");
        assert_eq!(peer_requests(asker), pull);
    }
    assert_eq!(location.tap.count(Method::GET, Kind::Blob), 1);
}

/// Replicas serving https with certificates from the test CA, each trusting that CA through
/// `client.ca_file`, so peer requests go over https to the owner.
async fn start_https_location(n: usize) -> (Registry, Tap, Vec<Berth>, Vec<tempfile::TempDir>) {
    let ca = support::ca::test_ca();
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("https://127.0.0.1:{}", l.local_addr().unwrap().port()))
        .collect();
    let peers = urls.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>();
    let (mut replicas, mut dirs) = (Vec::new(), Vec::new());
    for (listener, url) in listeners.into_iter().zip(&urls) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf();
        let pem = support::ca::pem;
        std::fs::write(dir.path().join("cert.pem"), pem("CERTIFICATE", &cert)).unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            pem("PRIVATE KEY", key.secret_der()),
        )
        .unwrap();
        std::fs::write(dir.path().join("peer-token"), format!("{TOKEN}\n")).unwrap();
        let sections = format!(
            "[tls]\ncert_file = \"{0}/cert.pem\"\nkey_file = \"{0}/key.pem\"\n{1}",
            dir.path().display(),
            ca.client_section()
        );
        let cache = dir.path().join("cache");
        let config = support::single_upstream_config(&tap.host(), &tap.url(), &cache, &sections);
        let config = format!(
            "{config}\n[cluster]\npeers = [{}]\nself = {url:?}\ntoken_file = \"{}/peer-token\"\n",
            peers.join(", "),
            dir.path().display()
        );
        let resolver = berth::net::connect::system_resolver();
        replicas.push(Berth::start_on(listener, &config, resolver).await);
        dirs.push(dir);
    }
    (registry, tap, replicas, dirs)
}

/// An https client trusting only the test CA.
fn https_client() -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::CertificateDer::from_pem_file(support::ca::test_ca().file());
    roots.add(ca.unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_reach_each_other_over_https_with_the_client_ca() {
    use http_body_util::BodyExt;
    let (registry, tap, replicas, _dirs) = start_https_location(3).await;
    let image = Image::random(Flavor::Oci, 1717, &[1 << 20, 300_000, 40_000, 5_000]);
    push_image(&registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    tap.reset();
    let client = https_client();
    let mut peer_asks = 0;
    for replica in &replicas {
        let base = format!("https://127.0.0.1:{}", replica.addr.port());
        for blob in image.blobs() {
            let url = format!("{base}/v2/team/app/blobs/{}", blob.digest);
            let got = client
                .request(request(Method::GET, &url, None, &[], Bytes::new()))
                .await
                .unwrap();
            assert_eq!(got.status(), 200, "{url}");
            let body = got.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(support::image::sha256_digest(&body), blob.digest, "{url}");
            assert_eq!(body, blob.bytes);
        }
        peer_asks += peer_requests(replica);
        for failed in ["fallback", "refused"] {
            assert_eq!(peer_results(replica, failed), 0, "{failed} peer asks");
        }
    }
    let gets: Vec<(Method, String)> = tap.requests();
    for blob in image.blobs() {
        let count = gets
            .iter()
            .filter(|(m, p)| *m == Method::GET && p.ends_with(&blob.digest))
            .count();
        assert_eq!(count, 1, "{} {gets:?}", blob.digest);
    }
    // Every replica owns some blobs and not others, so some pulls were answered by a peer.
    assert!(peer_asks > 0, "no replica asked its peer");
}
