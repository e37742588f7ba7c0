//! Replicas of one location acting as one cache (`[cluster]`): three berths on loopback with
//! static peers, in front of one real registry behind a counting tap.

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use http::Method;
use support::{fetch, push_image, request, Auth, Berth, Flavor, Image, Kind, Registry, Tap};
use tokio::net::TcpListener;

const TOKEN: &str = "peer-token-for-tests-0123456789";

/// A location of `n` replicas sharing one upstream, each with its own cache directory.
struct Location {
    registry: Registry,
    tap: Tap,
    replicas: Vec<Berth>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Location {
    async fn start(n: usize) -> Location {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let urls: Vec<String> = listeners
            .iter()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .collect();
        let peers = urls
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut dirs = Vec::new();
        let mut replicas = Vec::new();
        for (listener, url) in listeners.into_iter().zip(&urls) {
            let dir = tempfile::tempdir().unwrap();
            let token_file = dir.path().join("peer-token");
            std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
            let cache = dir.path().join("cache");
            let config = support::single_upstream_config(&tap.host(), &tap.url(), &cache, "");
            let config = format!(
                "{config}\n[cluster]\npeers = [{peers}]\nself = {url:?}\ntoken_file = {:?}\n",
                token_file.display().to_string()
            );
            let resolver = berth::upstream::connect::system_resolver();
            replicas.push(Berth::start_on(listener, &config, resolver).await);
            dirs.push(dir);
        }
        Location {
            registry,
            tap,
            replicas,
            _dirs: dirs,
        }
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
    let families = replica.state.metrics.registry.gather();
    families
        .iter()
        .filter(|f| f.name() == "berth_peer_requests_total")
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().value() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_request_without_the_token_or_with_a_wrong_one_is_an_ordinary_request() {
    let location = Location::start(3).await;
    let image = Image::random(Flavor::Oci, 18, &[200_000, 100_000, 30_000, 20_000, 10_000]);
    push_image(&location.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let asked = &location.replicas[0];
    let ns = location.tap.host();
    let tokens: [&[(&str, &str)]; 3] = [
        &[],
        &[("x-berth-peer-token", "wrong-token-0123456789-abcdef")],
        &[("x-berth-peer-token", TOKEN)],
    ];
    // An ordinary request to a replica that does not own the blob asks the owner; a peer
    // request never does (it is never forwarded again).
    let mut blobs = image.blobs().into_iter();
    for (i, headers) in tokens.iter().enumerate() {
        let before = peer_requests(asked);
        let blob = blobs
            .by_ref()
            .find(|b| owner_of(&location, &b.digest) != asked.url())
            .expect("a blob another replica owns");
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

fn owner_of(location: &Location, digest: &str) -> String {
    let cluster = location.replicas[0].state.cluster.as_ref().unwrap();
    cluster.members.owner(digest).unwrap().to_string()
}
