//! Operating berth: the metrics a scrape shows after a hit, a miss, a coalesced follower, a
//! digest mismatch and an eviction; promtool's verdict on a real scrape and on the alert rules;
//! the dashboard's queries; health, readiness and the token-guarded admin API; the request log.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use std::io::Write as _;
use support::{
    fetch, get, push_blob, push_image, random_blob, request, send, Fault, Flavor, Image, Kind,
    Stack,
};

impl Stack {
    async fn scrape(&self) -> Scrape {
        let scraped = get(&format!("{}/metrics", self.berth.admin_url()), None)
            .await
            .unwrap();
        assert_eq!(scraped.status, 200);
        assert!(scraped
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        Scrape(String::from_utf8(scraped.body.to_vec()).unwrap())
    }
}

/// GET of a manifest accepting OCI manifests (distribution answers 404 to a client that does not).
async fn get_manifest(url: &str) -> support::Fetched {
    let accept = [("accept", Flavor::Oci.manifest_type())];
    fetch(request(Method::GET, url, None, &accept, Bytes::new()))
        .await
        .unwrap()
}

/// A scrape in the Prometheus text format.
struct Scrape(String);

impl Scrape {
    /// The sum of every sample of `name` whose labels include `labels` (0 when none match).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples()
            .filter(|(series, sample_labels, _)| {
                series == name
                    && labels
                        .iter()
                        .all(|(k, v)| sample_labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    /// Asserts each unlabelled family's value, naming the family that differs.
    #[track_caller]
    fn assert_values(&self, expected: &[(&str, f64)]) {
        for (name, value) in expected {
            assert_eq!(self.value(name, &[]), *value, "{name}");
        }
    }

    fn samples(&self) -> impl Iterator<Item = (String, HashMap<String, String>, f64)> + '_ {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("sample has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').expect("label pair");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels, value.parse().expect("number"))
            })
    }

    /// Family names from the `# TYPE` lines, with their types.
    fn families(&self) -> HashMap<String, String> {
        self.0
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .map(|rest| {
                let (name, kind) = rest.split_once(' ').unwrap();
                (name.to_string(), kind.to_string())
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_then_a_hit_move_the_request_byte_and_upstream_counters() {
    let stack = Stack::start("").await;
    let blob = stack.push(300_000, 21).await;
    let upstream = stack.tap.host();
    let url = stack.url(&blob);
    let before = stack.scrape().await;
    assert_eq!(before.value("berth_requests_total", &[]), 0.0);

    let miss = fetch(request(
        Method::GET,
        &url,
        None,
        &[("x-request-id", "pull-42")],
        Bytes::new(),
    ))
    .await
    .unwrap();
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(miss.header("x-request-id"), Some("pull-42"));
    let after_miss = stack.scrape().await;
    let blob_get = [("route", "blob"), ("method", "GET"), ("status", "2xx")];
    let with = |cache: &'static str| {
        let mut labels = blob_get.to_vec();
        labels.push(("cache", cache));
        labels
    };
    assert_eq!(after_miss.value("berth_requests_total", &with("MISS")), 1.0);
    let served_upstream = [("route", "blob"), ("source", "upstream")];
    let len = blob.len() as f64;
    assert_eq!(
        after_miss.value("berth_served_bytes_total", &served_upstream),
        len
    );
    assert_eq!(
        after_miss.value("berth_upstream_received_bytes_total", &[("kind", "blob")]),
        len
    );
    assert!(
        after_miss.value(
            "berth_upstream_requests_total",
            &[("upstream", &upstream), ("status", "2xx")]
        ) >= 1.0
    );
    assert!(
        after_miss.value(
            "berth_upstream_request_duration_seconds_count",
            &[("upstream", &upstream)]
        ) >= 1.0
    );
    assert_eq!(after_miss.value("berth_fills_completed_total", &[]), 1.0);
    assert_eq!(
        after_miss.value(
            "berth_time_to_first_byte_seconds_count",
            &[("route", "blob")]
        ),
        1.0
    );

    let hit = get(&url, None).await.unwrap();
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.header("x-request-id").map(str::len), Some(16));
    let after_hit = stack.scrape().await;
    assert_eq!(after_hit.value("berth_requests_total", &with("HIT")), 1.0);
    assert_eq!(after_hit.value("berth_requests_total", &with("MISS")), 1.0);
    let served_cache = [("route", "blob"), ("source", "cache")];
    assert_eq!(
        after_hit.value("berth_served_bytes_total", &served_cache),
        len
    );
    assert_eq!(
        after_hit.value("berth_served_bytes_total", &served_upstream),
        len
    );
    assert_eq!(
        after_hit.value("berth_upstream_received_bytes_total", &[("kind", "blob")]),
        len,
        "a hit fetches nothing"
    );
    assert_eq!(
        after_hit.value("berth_upstream_requests_total", &[]),
        after_miss.value("berth_upstream_requests_total", &[])
    );
    assert_eq!(after_hit.value("berth_cache_disk_bytes", &[]), len);
    assert_eq!(after_hit.value("berth_cache_entries", &[]), 1.0);
}

/// The body of a GET of `url` over a fresh HTTP/2 connection without TLS (prior knowledge).
async fn get_over_h2c(addr: std::net::SocketAddr, url: &str) -> Bytes {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(url)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hit_over_plain_http1_is_sent_with_sendfile_and_over_h2c_is_not() {
    let stack = Stack::start("").await;
    let blob = stack.push(3 << 20, 24).await;
    let url = stack.url(&blob);
    let miss = get(&url, None).await.unwrap();
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    let before = stack
        .scrape()
        .await
        .value("berth_sendfile_bytes_total", &[]);

    let hit = get(&url, None).await.unwrap();
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(support::Blob::new(hit.body.clone()).digest, blob.digest);
    let after_hit = stack
        .scrape()
        .await
        .value("berth_sendfile_bytes_total", &[]);
    let sent = after_hit - before;
    assert!(
        sent > 0.0 && sent <= blob.len() as f64,
        "sendfile sent {sent} bytes of the hit"
    );

    let body = get_over_h2c(stack.berth.addr, &url).await;
    assert_eq!(support::Blob::new(body).digest, blob.digest);
    let after_h2 = stack
        .scrape()
        .await
        .value("berth_sendfile_bytes_total", &[]);
    assert_eq!(
        after_h2, after_hit,
        "HTTP/2 bodies are read, never sent from a map"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coalesced_follower_is_counted_as_one_fill_with_a_follower() {
    let stack = Stack::start("").await;
    let blob = stack.push(2 << 20, 22).await;
    let url = stack.url(&blob);

    let leader = stack.hold(&blob, 1 << 20).await;
    assert_eq!(leader.headers()["x-cache"], "MISS");
    let follower = send(request(Method::GET, &url, None, &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(follower.headers()["x-cache"], "COALESCED");

    let during = stack.scrape().await;
    assert_eq!(during.value("berth_fills_in_flight", &[]), 1.0);
    assert_eq!(during.value("berth_fill_followers_total", &[]), 1.0);
    assert_eq!(
        during.value("berth_requests_total", &[("cache", "COALESCED")]),
        1.0
    );
    assert_eq!(
        during.value("berth_requests_total", &[("cache", "MISS")]),
        1.0
    );

    stack.tap.resume();
    let bodies = [leader, follower].map(|r| r.into_body().collect());
    for body in bodies {
        assert_eq!(body.await.unwrap().to_bytes().len(), blob.len());
    }
    let after = stack.scrape().await;
    assert_eq!(after.value("berth_fills_completed_total", &[]), 1.0);
    assert_eq!(
        after.value(
            "berth_served_bytes_total",
            &[("route", "blob"), ("source", "upstream")]
        ),
        2.0 * blob.len() as f64
    );
    assert_eq!(
        after.value("berth_upstream_received_bytes_total", &[("kind", "blob")]),
        blob.len() as f64,
        "one upstream body for two clients"
    );
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_mismatch_is_counted_and_nothing_is_cached() {
    let stack = Stack::start("").await;
    let blob = stack.push_faulted(1 << 20, 23, Fault::CorruptBlob).await;
    let url = stack.url(&blob);
    assert!(get(&url, None).await.is_err(), "the body must fail");

    let scrape = stack.scrape().await;
    scrape.assert_values(&[
        ("berth_digest_mismatches_total", 1.0),
        ("berth_fills_failed_total", 1.0),
        ("berth_fills_completed_total", 0.0),
        ("berth_cache_entries", 0.0),
        ("berth_cache_disk_bytes", 0.0),
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_eviction_is_counted_with_its_bytes_and_disk_use_follows() {
    let stack = Stack::with_config("", "max_size = \"1MiB\"").await;
    let blobs: Vec<_> = (0..3).map(|i| random_blob(400_000, 30 + i)).collect();
    for blob in &blobs {
        push_blob(&stack.registry.url(), "team/app", blob, None)
            .await
            .unwrap();
    }
    for blob in &blobs {
        let fetched = get(&stack.url(blob), None).await.unwrap();
        assert_eq!(fetched.header("x-cache"), Some("MISS"));
    }
    let scrape = stack.scrape().await;
    scrape.assert_values(&[
        ("berth_evictions_total", 1.0),
        ("berth_evicted_bytes_total", 400_000.0),
        ("berth_cache_disk_bytes", 800_000.0),
        ("berth_cache_entries", 2.0),
        ("berth_cache_max_bytes", 1048576.0),
    ]);
    assert!(scrape.value("berth_cache_filesystem_size_bytes", &[]) > 0.0);
    let oldest = get(&stack.blob_url("team/app", &blobs[0].digest), None)
        .await
        .unwrap();
    assert_eq!(
        oldest.header("x-cache"),
        Some("MISS"),
        "the evicted blob is fetched again"
    );
}

/// `promtool` from the Debian `prometheus` package; scripts/test installs it. A missing promtool
/// fails the test: skipping would hide an unchecked exposition.
fn promtool() -> std::process::Command {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "promtool is not installed: install the Debian package `prometheus` (scripts/test does)"
    );
    std::process::Command::new("promtool")
}

/// Traffic that touches every family: a manifest and blob miss, hits, a 404, a ping.
async fn varied_traffic(stack: &Stack) {
    let image = Image::random(Flavor::Oci, 24, &[50_000, 70_000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let base = stack.berth.url();
    for _ in 0..2 {
        let manifest = get_manifest(&format!("{base}/v2/team/app/manifests/v1")).await;
        assert_eq!(manifest.status, 200);
        for blob in image.blobs() {
            get(&stack.url(blob), None).await.unwrap();
        }
    }
    let missing = get(&format!("{base}/v2/team/app/manifests/nope"), None)
        .await
        .unwrap();
    assert_eq!(missing.status, 404);
    get(&format!("{base}/v2/"), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_a_real_scrape() {
    let stack = Stack::start("").await;
    varied_traffic(&stack).await;
    let scrape = stack.scrape().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scrape.prom");
    std::fs::write(&path, &scrape.0).unwrap();

    let exposition = scrape.0.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = promtool()
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(exposition.as_bytes()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed on {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(scrape.value("berth_requests_total", &[]) >= 8.0);
}

#[test]
fn promtool_accepts_the_alert_rules_and_their_unit_tests() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = promtool().args(args).current_dir(deploy).output().unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every `berth_*` name in `text`, with histogram sample suffixes mapped to their family.
fn referenced_families(text: &str, families: &HashMap<String, String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("berth_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (families.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        names.insert(family.to_string());
        rest = &tail[end..];
    }
    names
}

fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alerts_query_only_families_a_real_scrape_has() {
    let stack = Stack::start("").await;
    varied_traffic(&stack).await;
    let families = stack.scrape().await.families();

    let text = include_str!("../deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:#?}");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = referenced_families(expr, &families);
        assert!(!names.is_empty(), "query names no berth_ metric: {expr}");
        used.extend(names);
    }
    let alerts = referenced_families(include_str!("../deploy/alerts.yml"), &families);
    for name in used.iter().chain(&alerts) {
        assert!(
            families.contains_key(name),
            "{name} is not in a scrape; families: {:?}",
            families.keys().collect::<BTreeSet<_>>()
        );
    }
    for needed in [
        "berth_requests_total",
        "berth_served_bytes_total",
        "berth_upstream_request_duration_seconds",
        "berth_fills_in_flight",
        "berth_cache_disk_bytes",
        "berth_digest_mismatches_total",
    ] {
        assert!(used.contains(needed), "the dashboard has no {needed} panel");
    }
    let titles = support::strings_at(&dashboard["panels"], "title");
    assert!(titles.iter().any(|t| t.contains("Stale")), "{titles:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness_report_why_berth_is_not_ready() {
    let stack = Stack::start("").await;
    let admin = stack.berth.admin_url();
    let healthz = get(&format!("{admin}/healthz"), None).await.unwrap();
    assert_eq!(healthz.status, 200);
    let ready = get(&format!("{admin}/readyz"), None).await.unwrap();
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(stack.scrape().await.value("berth_ready", &[]), 1.0);

    // A cache directory berth cannot write turns every miss into an error: not ready.
    let tmp = stack.berth.cache_dir().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    // The probe's answer stands for a few seconds (health::PROBE_INTERVAL); ask afresh.
    stack.berth.state.readiness.reprobe().await;
    let unwritable = get(&format!("{admin}/readyz"), None).await.unwrap();
    assert_eq!(unwritable.status, 503);
    let reason = String::from_utf8_lossy(&unwritable.body);
    assert!(reason.contains("not writable"), "{reason}");
    assert_eq!(stack.scrape().await.value("berth_ready", &[]), 0.0);
    std::fs::create_dir(&tmp).unwrap();

    stack.berth.state.readiness.mark_shutting_down();
    let draining = get(&format!("{admin}/readyz"), None).await.unwrap();
    assert_eq!(draining.status, 503);
    assert!(String::from_utf8_lossy(&draining.body).contains("shutting down"));
    assert_eq!(
        get(&format!("{admin}/healthz"), None).await.unwrap().status,
        200,
        "alive while draining"
    );
}

const TOKEN: &str = "admin-token-for-tests-0123456789";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn admin_call(
    stack: &Stack,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> support::Fetched {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let url = format!("{}{path}", stack.berth.admin_url());
    fetch(request(method, &url, None, &headers, Bytes::new()))
        .await
        .unwrap()
}

fn json(fetched: &support::Fetched) -> serde_json::Value {
    serde_json::from_slice(&fetched.body).expect("admin answers JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_is_off_without_a_token() {
    let stack = Stack::start("").await;
    let refused = admin_call(&stack, Method::GET, "/admin/stats", Some(TOKEN)).await;
    assert_eq!(refused.status, 403);
    assert!(json(&refused)["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("admin_token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_needs_the_token_and_purges_digests_and_repositories() {
    // Without prefetch, so the cache holds exactly what the test asked for.
    let no_prefetch = "[prefetch]\nenabled = false";
    let stack = Stack::with_config(&format!("admin_token = \"{TOKEN}\""), no_prefetch).await;
    for token in [None, Some("wrong-token-wrong-token-wrong")] {
        let refused = admin_call(&stack, Method::GET, "/admin/stats", token).await;
        assert_eq!(refused.status, 401, "{token:?}");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    }

    let image = Image::random(Flavor::Oci, 25, &[60_000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let base = stack.berth.url();
    let manifest_url = format!("{base}/v2/team/app/manifests/v1");
    assert_eq!(get_manifest(&manifest_url).await.status, 200);
    let layer = &image.layers[0].blob;
    let layer_url = stack.blob_url("team/app", &layer.digest);
    get(&layer_url, None).await.unwrap();

    let stats = admin_call(&stack, Method::GET, "/admin/stats", Some(TOKEN)).await;
    assert_eq!(stats.status, 200);
    let stats = json(&stats);
    assert_eq!(stats["entries"], 2);
    assert_eq!(
        stats["disk_bytes"],
        (image.manifest.len() + layer.len()) as u64
    );
    assert_eq!(stats["tags"], 1);
    assert_eq!(stats["ready"], true);

    // Purging a digest removes it from the index and the disk: the next GET is a miss.
    let path = format!("/admin/digests/{}", layer.digest);
    let purged = admin_call(&stack, Method::DELETE, &path, Some(TOKEN)).await;
    assert_eq!(purged.status, 200, "{:?}", purged.body);
    assert_eq!(json(&purged)["kind"], "blob");
    assert_eq!(json(&purged)["bytes"], layer.len() as u64);
    let blob_file = stack.berth.cache_dir().join(format!(
        "blobs/sha256/{}/{}",
        &layer.hex()[..2],
        layer.hex()
    ));
    assert!(!blob_file.exists());
    let again = admin_call(&stack, Method::DELETE, &path, Some(TOKEN)).await;
    assert_eq!(again.status, 404);
    assert_eq!(
        get(&layer_url, None).await.unwrap().header("x-cache"),
        Some("MISS")
    );
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 2);

    // Purging a repository drops its tags: the next pull by tag asks the upstream again.
    assert_eq!(
        get_manifest(&manifest_url).await.header("x-cache"),
        Some("HIT")
    );
    let manifests_before = stack.tap.count(Method::GET, Kind::Manifest);
    let purged = admin_call(
        &stack,
        Method::DELETE,
        "/admin/repositories/team/app",
        Some(TOKEN),
    )
    .await;
    assert_eq!(purged.status, 200, "{:?}", purged.body);
    let purged = json(&purged);
    assert_eq!(purged["tags_dropped"], 1);
    assert_eq!(purged["repository"], "team/app");
    assert!(purged["note"]
        .as_str()
        .unwrap()
        .contains("content-addressed"));
    let refetched = get_manifest(&manifest_url).await;
    assert_eq!(refetched.header("x-cache"), Some("MISS"));
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Manifest),
        manifests_before + 1
    );

    // A malformed digest, and a repository of no configured upstream.
    for path in [
        "/admin/digests/sha256:12",
        "/admin/repositories/elsewhere.example.com/x",
    ] {
        let refused = admin_call(&stack, Method::DELETE, path, Some(TOKEN)).await;
        assert_eq!(refused.status, 400, "{path}");
    }
}
