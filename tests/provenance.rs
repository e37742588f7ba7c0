//! The policy access mode against a hostile upstream: content reaches a repository only when
//! the repository really holds it, on an upstream that really served it.
//!
//! Two upstreams: `victim.example`, a real registry (behind a counting tap) holding the victim's
//! private `team/app:v1`; and `attacker.example`, a registry the attacker runs (`Hostile`). Two
//! principals: service account `victim` may pull `victim.example/team/app`; user mallory may
//! pull only `attacker.example/evil/app`. The victim pulls first, so the victim's manifest and
//! blobs are in berth's cache; then mallory tries every way of getting them through
//! `evil/app`, and must get 404 (or the attacker registry's own bytes), never a byte of the
//! victim's. Finally berth restarts with both registries down and still serves the victim.

mod support;

use std::path::Path;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use support::berth::policy_mode_tables;
use support::{
    fetch, push_image, random_blob, random_layer, request, Auth, Berth, Fetched, Flavor, Hostile,
    Image, Registry, Tap,
};

const VICTIM: &str = "victim.example";
const ATTACKER: &str = "attacker.example";
const VICTIM_KEY: &str = "victim-key-0123456789abcdef";
const MALLORY_KEY: &str = "mallory-key-0123456789abcdef";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn victim() -> Option<(&'static str, &'static str)> {
    Some(("<token>", VICTIM_KEY))
}

fn mallory() -> Option<(&'static str, &'static str)> {
    Some(("mallory@example.com", MALLORY_KEY))
}

struct Site {
    registry: Registry,
    tap: Tap,
    hostile: Hostile,
    berth: Berth,
    dir: tempfile::TempDir,
    image: Image,
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, value.to_string()).unwrap();
}

fn pull_policy(name: &str, repository: &str, principal: &str) -> Value {
    json!({
        "kind": "policy",
        "name": name,
        "targetKind": "image",
        "targetQuery": {"kind": "image", "spec": {"match": "all", "terms": [
            {"op": "=", "property": "repository", "value": repository}
        ]}},
        "bindings": [{"permissions": ["pull"], "principalLinks": [principal]}],
    })
}

impl Site {
    /// The site with prefetch started by the manifest GET.
    async fn start() -> Site {
        Site::start_with("trigger = \"manifest\"").await
    }

    /// The site with the `[prefetch]` keys `prefetch`.
    async fn start_with(prefetch: &str) -> Site {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let image = Image::new(
            Flavor::Oci,
            vec![random_layer(20_000, 1301), random_layer(30_000, 1302)],
        );
        push_image(&registry.url(), "team/app", "v1", &image, None)
            .await
            .unwrap();
        let hostile = Hostile::start().await;
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        let hash = |key| berth::access::principals::KeyHash::generate(key).to_string();
        write_json(
            &dir.path().join("principals.json"),
            &json!({
                "serviceAccounts": [{"name": "victim", "keys": [{"hash": hash(VICTIM_KEY)}]}],
                "users": [{"email": "mallory@example.com", "keys": [{"hash": hash(MALLORY_KEY)}]}],
            }),
        );
        write_json(
            &policies.join("victim.json"),
            &pull_policy(
                "victim",
                &format!("{VICTIM}/team/app"),
                "//serviceaccount/victim",
            ),
        );
        write_json(
            &policies.join("mallory.json"),
            &pull_policy(
                "mallory",
                &format!("{ATTACKER}/evil/app"),
                "//user/mallory@example.com",
            ),
        );
        let text = config(dir.path(), &tap.url(), &hostile.url());
        let berth = Berth::start(&format!("{text}[prefetch]\n{prefetch}\n")).await;
        Site {
            registry,
            tap,
            hostile,
            berth,
            dir,
            image,
        }
    }

    async fn get(&self, path: &str, creds: Option<(&str, &str)>) -> Fetched {
        let url = format!("{}{path}", self.berth.url());
        let accept = [("accept", OCI_MANIFEST)];
        fetch(request(Method::GET, &url, creds, &accept, Bytes::new()))
            .await
            .unwrap()
    }

    /// The victim pulls its image by tag: manifest, config and layers, checked.
    async fn victim_pulls(&self) {
        let manifest = self
            .get(&format!("/v2/{VICTIM}/team/app/manifests/v1"), victim())
            .await;
        assert_eq!(manifest.status, 200, "{:?}", manifest.body);
        assert_eq!(manifest.body, self.image.manifest.bytes);
        for blob in self.image.blobs() {
            let path = format!("/v2/{VICTIM}/team/app/blobs/{}", blob.digest);
            let fetched = self.get(&path, victim()).await;
            assert_eq!(fetched.status, 200);
            assert_eq!(fetched.body, blob.bytes);
        }
    }

    /// Mallory asks for every piece of the victim's image through `evil/app`: nothing of it
    /// may come back.
    async fn mallory_gets_nothing_of_the_victim(&self, attack: &str) {
        let by_digest = format!("/v2/{ATTACKER}/evil/app/manifests/{}", self.image.digest());
        let fetched = self.get(&by_digest, mallory()).await;
        assert_eq!(
            fetched.status, 404,
            "{attack}: manifest: {:?}",
            fetched.body
        );
        assert_ne!(fetched.body, self.image.manifest.bytes, "{attack}");
        for blob in self.image.blobs() {
            let path = format!("/v2/{ATTACKER}/evil/app/blobs/{}", blob.digest);
            let fetched = self.get(&path, mallory()).await;
            assert_eq!(fetched.status, 404, "{attack}: blob {}", blob.digest);
            assert!(
                !contains(&fetched.body, &blob.bytes),
                "{attack}: victim bytes"
            );
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn config(dir: &Path, victim_url: &str, attacker_url: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
{tables}[[upstream]]
host = "{VICTIM}"
endpoint = "{victim_url}"
tag_ttl = "1h"
[[upstream]]
host = "{ATTACKER}"
endpoint = "{attacker_url}"
tag_ttl = "0s"
"#,
        tables = policy_mode_tables(dir),
    )
}

/// A manifest of the attacker's own, with `extra` fields merged in; its config blob is served
/// by the attacker registry.
fn attacker_manifest(hostile: &Hostile, seed: u64, extra: Value) -> Vec<u8> {
    let config = random_blob(100, seed);
    hostile.put_blob(&config);
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "size": config.len(), "digest": config.digest},
        "layers": [],
    });
    for (key, value) in extra.as_object().unwrap() {
        manifest[key] = value.clone();
    }
    serde_json::to_vec(&manifest).unwrap()
}

fn descriptor(media_type: &str, blob: &support::Blob) -> Value {
    json!({"mediaType": media_type, "size": blob.len(), "digest": blob.digest})
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_answering_head_200_for_every_digest_learns_nothing() {
    let site = Site::start().await;
    site.victim_pulls().await;
    site.hostile.lie_on_head(true);
    site.mallory_gets_nothing_of_the_victim("HEAD 200").await;
    // A HEAD through evil/app is the attacker's own answer, not the cached object's.
    let layer = &site.image.layers[0].blob;
    let url = format!(
        "{}/v2/{ATTACKER}/evil/app/blobs/{}",
        site.berth.url(),
        layer.digest
    );
    let head = fetch(request(Method::HEAD, &url, mallory(), &[], Bytes::new()))
        .await
        .unwrap();
    assert_ne!(head.header("x-cache"), Some("HIT"));
    assert_ne!(
        head.header("content-length"),
        Some(layer.len().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_naming_the_victim_as_its_subject_holds_nothing_of_it() {
    let site = Site::start().await;
    site.victim_pulls().await;
    let subject = descriptor(OCI_MANIFEST, &site.image.manifest);
    let own = attacker_manifest(&site.hostile, 1, json!({"subject": subject}));
    site.hostile
        .put_manifest("subject", OCI_MANIFEST, own.clone());
    // Mallory pulls the attacker's own manifest: its bytes, as served.
    let fetched = site
        .get(
            &format!("/v2/{ATTACKER}/evil/app/manifests/subject"),
            mallory(),
        )
        .await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, own);
    site.mallory_gets_nothing_of_the_victim("subject").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_listing_the_victims_layers_holds_nothing_of_them() {
    let site = Site::start().await;
    site.victim_pulls().await;
    let layer_type = Flavor::Oci.layer_type();
    let plain: Vec<Value> = site
        .image
        .layers
        .iter()
        .map(|l| descriptor(layer_type, &l.blob))
        .collect();
    let foreign: Vec<Value> = site
        .image
        .layers
        .iter()
        .map(|l| {
            let mut d = descriptor(layer_type, &l.blob);
            d["urls"] = json!([format!("{}/layer", site.hostile.url())]);
            d
        })
        .collect();
    for (tag, layers, seed) in [("plain", plain, 2), ("foreign", foreign, 3)] {
        let own = attacker_manifest(&site.hostile, seed, json!({"layers": layers}));
        site.hostile.put_manifest(tag, OCI_MANIFEST, own.clone());
        let fetched = site
            .get(
                &format!("/v2/{ATTACKER}/evil/app/manifests/{tag}"),
                mallory(),
            )
            .await;
        assert_eq!(fetched.body, own);
        site.mallory_gets_nothing_of_the_victim(tag).await;
    }
    // With the victim's config listed as the attacker's own config, the same.
    let config = descriptor(Flavor::Oci.config_type(), &site.image.config);
    let own = attacker_manifest(&site.hostile, 4, json!({"config": config}));
    site.hostile.put_manifest("config", OCI_MANIFEST, own);
    site.get(
        &format!("/v2/{ATTACKER}/evil/app/manifests/config"),
        mallory(),
    )
    .await;
    site.mallory_gets_nothing_of_the_victim("config").await;
    // Bytes the attacker registry really serves are its own to serve, even when the victim
    // has the same ones: a copy of the victim's config, fetched and verified from it.
    site.hostile.put_blob(&site.image.config);
    let path = format!("/v2/{ATTACKER}/evil/app/blobs/{}", site.image.config.digest);
    let served = site.get(&path, mallory()).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, site.image.config.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_whose_head_moves_to_the_victims_digest_gets_the_attackers_own_manifest() {
    let site = Site::start().await;
    site.victim_pulls().await;
    let own = attacker_manifest(&site.hostile, 5, json!({}));
    site.hostile
        .put_manifest("moving", OCI_MANIFEST, own.clone());
    let path = format!("/v2/{ATTACKER}/evil/app/manifests/moving");
    assert_eq!(site.get(&path, mallory()).await.body, own);
    // The tag is stale at once (tag_ttl 0s): the next pull revalidates with a HEAD, which now
    // announces the victim's manifest, cached in berth.
    site.hostile.point_head("moving", site.image.digest());
    let fetched = site.get(&path, mallory()).await;
    assert_eq!(fetched.status, 200, "{:?}", fetched.body);
    assert_eq!(fetched.body, own, "served the victim's manifest");
    assert_ne!(
        fetched.header("docker-content-digest"),
        Some(site.image.digest())
    );
    site.mallory_gets_nothing_of_the_victim("moving tag").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_victim_still_pulls_and_after_a_restart_with_both_registries_down_asks_no_one() {
    let mut site = Site::start().await;
    site.victim_pulls().await;
    // A second pull is served from the cache.
    site.tap.reset();
    site.victim_pulls().await;
    assert_eq!(site.tap.requests(), vec![]);

    let config = config(site.dir.path(), &site.tap.url(), &site.hostile.url());
    let old = std::mem::replace(&mut site.berth, Berth::start(&config).await);
    old.stop().await;
    site.registry.stop();
    let attacker_requests = site.hostile.requests();
    site.tap.reset();
    // By digest first, as a client that resolved the tag before the restart pulls: nothing
    // re-teaches berth what the repository holds, the disk has to know.
    for blob in site.image.blobs() {
        let path = format!("/v2/{VICTIM}/team/app/blobs/{}", blob.digest);
        let fetched = site.get(&path, victim()).await;
        assert_eq!((fetched.status.as_u16(), &fetched.body), (200, &blob.bytes));
        assert_eq!(fetched.header("x-cache"), Some("HIT"));
    }
    let by_digest = format!("/v2/{VICTIM}/team/app/manifests/{}", site.image.digest());
    assert_eq!(site.get(&by_digest, victim()).await.status, 200);
    site.victim_pulls().await;
    assert_eq!(
        site.tap.requests(),
        vec![],
        "the victim's upstream was asked"
    );
    assert_eq!(site.hostile.requests(), attacker_requests);
    // And mallory still gets nothing, from memory or from disk.
    site.hostile.lie_on_head(true);
    site.mallory_gets_nothing_of_the_victim("after restart")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_of_the_victims_layer_under_way_is_not_joined_through_another_upstream() {
    let site = Site::start().await;
    // The victim's fills of its layers, which its manifest GET starts (prefetch), are held
    // part-way at the tap.
    site.tap
        .inject(support::Kind::Blob, support::Fault::PauseAt(5_000));
    let manifest = site
        .get(&format!("/v2/{VICTIM}/team/app/manifests/v1"), victim())
        .await;
    assert_eq!(manifest.status, 200);
    site.tap.wait_paused(2).await;
    // The attacker lists the layer as its own and answers HEAD 200 for it.
    let layer = site.image.layers[1].blob.clone();
    let listed = descriptor(Flavor::Oci.layer_type(), &layer);
    let own = attacker_manifest(&site.hostile, 6, json!({"layers": [listed]}));
    site.hostile.put_manifest("racing", OCI_MANIFEST, own);
    site.hostile.lie_on_head(true);
    site.get(
        &format!("/v2/{ATTACKER}/evil/app/manifests/racing"),
        mallory(),
    )
    .await;
    let url = format!(
        "{}/v2/{VICTIM}/team/app/blobs/{}",
        site.berth.url(),
        layer.digest
    );
    let victim_pull = tokio::spawn(fetch(request(
        Method::GET,
        &url,
        victim(),
        &[],
        Bytes::new(),
    )));
    let path = format!("/v2/{ATTACKER}/evil/app/blobs/{}", layer.digest);
    let fetched = site.get(&path, mallory()).await;
    assert_eq!(fetched.status, 404, "{:?}", fetched.header("x-cache"));
    assert!(!contains(&fetched.body, &layer.bytes[..4_000]));
    site.tap.resume();
    let pulled = victim_pull.await.unwrap().unwrap();
    assert_eq!(pulled.body, layer.bytes);
    site.mallory_gets_nothing_of_the_victim("racing fill").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_may_not_pull_the_repository_prefetches_nothing() {
    let site = Site::start().await;
    site.tap.reset();
    // Mallory asks for the victim's manifest itself: refused before anything is looked up.
    let refused = site
        .get(&format!("/v2/{VICTIM}/team/app/manifests/v1"), mallory())
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(site.berth.state.metrics.prefetch_started.get(), 0);
    assert!(site.tap.requests().is_empty(), "{:?}", site.tap.requests());
    // The victim's own GET does start the fills of its image's blobs.
    let allowed = site
        .get(&format!("/v2/{VICTIM}/team/app/manifests/v1"), victim())
        .await;
    assert_eq!(allowed.status, 200);
    let blobs = site.image.blobs().len();
    site.tap
        .wait_for(Method::GET, support::Kind::Blob, blobs)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_first_blob_a_client_that_may_not_pull_the_repository_starts_no_prefetch() {
    let site = Site::start_with("trigger = \"first_blob\"").await;
    site.tap.reset();
    // The victim's manifest GET leaves a plan and fetches no blob.
    let manifest = format!("/v2/{VICTIM}/team/app/manifests/v1");
    assert_eq!(site.get(&manifest, victim()).await.status, 200);
    let metrics = &site.berth.state.metrics;
    assert_eq!(metrics.prefetch_started.get(), 0);
    assert_eq!(site.tap.count(Method::GET, support::Kind::Blob), 0);
    // Mallory's GET of one of its layers is refused before anything is looked up.
    let layer = &site.image.layers[0].blob.digest;
    let path = format!("/v2/{VICTIM}/team/app/blobs/{layer}");
    assert_eq!(site.get(&path, mallory()).await.status, 403);
    assert_eq!(metrics.prefetch_started.get(), 0);
    assert_eq!(site.tap.count(Method::GET, support::Kind::Blob), 0);
    // The victim's own GET of it starts the fills of the image's other blobs.
    let fetched = site.get(&path, victim()).await;
    assert_eq!(
        (fetched.status.as_u16(), fetched.header("x-cache")),
        (200, Some("MISS"))
    );
    let blobs = site.image.blobs().len();
    site.tap
        .wait_for(Method::GET, support::Kind::Blob, blobs)
        .await;
    assert_eq!(metrics.prefetch_started.get(), blobs as u64 - 1);
}
