//! The request log: one JSON line per request, written when its body ends, with the request
//! id, upstream, outcome, bytes and duration, and never a secret. Its own test binary, because
//! it installs the process-wide tracing subscriber.

mod support;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::{
    fetch, push_image, request, single_upstream_config, Auth, Berth, Flavor, Image, Registry, Tap,
};
use tokio::sync::mpsc;

/// A `MakeWriter` that sends every formatted event to the test.
#[derive(Clone)]
struct Capture(mpsc::UnboundedSender<String>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.send(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the process-wide subscriber writing JSON lines to the returned channel.
fn capture_logs() -> mpsc::UnboundedReceiver<String> {
    let (tx, lines) = mpsc::unbounded_channel();
    let capture = Capture(tx);
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("info")
        .with_writer(move || capture.clone())
        .init();
    lines
}

/// Reads captured lines until one is the `request` line of `id` (bounded in time).
async fn request_line(
    lines: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    id: &str,
) -> serde_json::Value {
    let wait = async {
        while let Some(chunk) = lines.recv().await {
            for line in chunk.lines() {
                seen.push(line.to_string());
                let json: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
                if json["fields"]["message"] == "request" && json["fields"]["request_id"] == id {
                    return json;
                }
            }
        }
        panic!("log channel closed");
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("no request line for {id}; saw {seen:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_json_line_per_request_with_id_upstream_outcome_bytes_and_no_secrets() {
    const PASSWORD: &str = "hunter2-very-secret";
    let mut lines = capture_logs();

    let registry = Registry::start(Auth::basic("puller", PASSWORD)).await;
    let tap = Tap::start(&registry.url()).await;
    let cache = tempfile::tempdir().unwrap();
    // Without prefetch, so the blob request below is the one that fetches (a MISS).
    let no_prefetch = "[prefetch]\nenabled = false";
    let config = single_upstream_config(&tap.host(), &tap.url(), cache.path(), no_prefetch);
    let config = format!("{config}username = \"puller\"\npassword = \"{PASSWORD}\"\n");
    let berth = Berth::start(&config).await;
    let image = Image::random(Flavor::Oci, 40, &[20_000]);
    push_image(&registry.url(), "team/app", "v1", &image, registry.creds())
        .await
        .unwrap();

    let url = format!("{}/v2/team/app/manifests/v1", berth.url());
    // distribution answers 404 to a client that does not accept OCI manifests.
    let headers = [
        ("x-request-id", "log-test-1"),
        ("accept", Flavor::Oci.manifest_type()),
    ];
    let fetched = fetch(request(Method::GET, &url, None, &headers, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 200, "{:?}", fetched.body);
    let mut seen = Vec::new();
    let line = request_line(&mut lines, &mut seen, "log-test-1").await;
    let fields = &line["fields"];
    assert_eq!(fields["upstream"], tap.host().as_str());
    assert_eq!(fields["cache"], "MISS");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["route"], "manifest");
    assert_eq!(fields["bytes"], image.manifest.len() as u64);
    assert_eq!(fields["body"], "complete");
    assert_eq!(fields["path"], "/v2/team/app/manifests/v1");
    // The anonymous access mode has no principal to name.
    assert_eq!(fields["principal"], "-");
    assert!(fields["ms"].as_f64().is_some() && fields["ttfb_ms"].as_f64().is_some());

    // A streamed blob body: hyper stops at its Content-Length, which still counts as complete.
    let layer = &image.layers[0].blob;
    let blob_url = format!("{}/v2/team/app/blobs/{}", berth.url(), layer.digest);
    let headers = [("x-request-id", "log-test-blob")];
    let fetched = fetch(request(
        Method::GET,
        &blob_url,
        None,
        &headers,
        Bytes::new(),
    ))
    .await
    .unwrap();
    assert_eq!(fetched.body.len(), layer.len());
    let line = request_line(&mut lines, &mut seen, "log-test-blob").await;
    assert_eq!(line["fields"]["bytes"], layer.len() as u64);
    assert_eq!(line["fields"]["body"], "complete");
    assert_eq!(line["fields"]["cache"], "MISS");

    let missing = format!("{}/v2/team/app/manifests/nope", berth.url());
    let headers = [("x-request-id", "log-test-2")];
    let fetched = fetch(request(Method::GET, &missing, None, &headers, Bytes::new()))
        .await
        .unwrap();
    assert_eq!(fetched.status, 404);
    let line = request_line(&mut lines, &mut seen, "log-test-2").await;
    assert_eq!(line["fields"]["cache"], "ERROR");
    assert!(line["fields"]["error"]
        .as_str()
        .unwrap()
        .contains("MANIFEST_UNKNOWN"));

    let basic = support::client::basic_auth("puller", PASSWORD);
    let encoded = basic.to_str().unwrap().trim_start_matches("Basic ");
    for line in &seen {
        assert!(!line.contains(PASSWORD), "secret in log: {line}");
        assert!(!line.contains(encoded), "encoded secret in log: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_policy_mode_the_line_names_the_principal_allowed_or_denied() {
    const ALICE_KEY: &str = "alice-key-0123456789abcdef";
    const MALLORY_KEY: &str = "mallory-key-0123456789abcdef";
    let mut lines = capture_logs();

    let registry = Registry::start(Auth::None).await;
    let image = Image::random(Flavor::Oci, 41, &[1_000]);
    push_image(&registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hash = |key| berth::access::principals::KeyHash::generate(key).to_string();
    let principals = serde_json::json!({"users": [
        {"email": "alice@example.com", "keys": [{"hash": hash(ALICE_KEY)}]},
        {"email": "mallory@example.com", "keys": [{"hash": hash(MALLORY_KEY)}]},
    ]});
    std::fs::write(dir.path().join("principals.json"), principals.to_string()).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let policy = serde_json::json!({
        "kind": "policy", "name": "alice", "targetKind": "image", "target": "all",
        "bindings": [{"permissions": ["pull"], "principalLinks": ["//user/alice@example.com"]}],
    });
    std::fs::write(dir.path().join("policies/alice.json"), policy.to_string()).unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndefault_upstream = \"registry.test\"\n\
         [cache]\ndir = \"{cache}\"\n\
         [access]\nmode = \"policy\"\nprincipals = \"{dir}/principals.json\"\npolicies = \"{dir}/policies\"\n\
         [[upstream]]\nhost = \"registry.test\"\nendpoint = \"{upstream}\"\n",
        cache = dir.path().join("cache").display(),
        dir = dir.path().display(),
        upstream = registry.url(),
    );
    let berth = Berth::start(&config).await;

    let url = format!("{}/v2/team/app/manifests/v1", berth.url());
    let mut seen = Vec::new();
    for (id, user, key, status) in [
        ("log-alice", "alice@example.com", ALICE_KEY, 200),
        ("log-mallory", "mallory@example.com", MALLORY_KEY, 403),
    ] {
        let headers = [
            ("x-request-id", id),
            ("accept", Flavor::Oci.manifest_type()),
        ];
        let fetched = fetch(request(
            Method::GET,
            &url,
            Some((user, key)),
            &headers,
            Bytes::new(),
        ))
        .await
        .unwrap();
        assert_eq!(fetched.status, status, "{:?}", fetched.body);
        let line = request_line(&mut lines, &mut seen, id).await;
        assert_eq!(line["fields"]["principal"], format!("//user/{user}"));
        assert_eq!(line["fields"]["status"], status);
    }
    for line in &seen {
        assert!(
            !line.contains(ALICE_KEY) && !line.contains(MALLORY_KEY),
            "secret in log: {line}"
        );
    }
}
