//! Connections and requests under hostile clients (issue 14): metric labels a client cannot
//! grow, HTTP/2 caps and timeouts checked with a raw HTTP/2 client and hand-written frames, the
//! per-client connection cap and its trusted networks, and the admin listener's own caps.
//!
//! No registry is needed: every request here is answered by berth itself (`/v2/`, 404s), and
//! the configured upstream is never dialled.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::Berth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound on "the server closes it": far above every configured timeout here.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);

async fn start(limits: &str) -> (Berth, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    let extra = format!("\n[limits]\n{limits}\n");
    let config =
        support::single_upstream_config("127.0.0.1:9", "http://127.0.0.1:9", cache.path(), &extra);
    (Berth::start(&config).await, cache)
}

/// Sends one HTTP/1.1 request on `stream` and reads its whole response (the server closes).
async fn ask(stream: &mut TcpStream, head: &str) -> String {
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(CLOSED_WITHIN, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads until the server closes the connection; false if it is still open after the bound.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut sink = vec![0u8; 64 << 10];
    let read_all = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(CLOSED_WITHIN, read_all).await.is_ok()
}

async fn metrics(berth: &Berth) -> String {
    let url = format!("{}/metrics", berth.admin_url());
    let fetched = support::get(&url, None).await.unwrap();
    String::from_utf8_lossy(&fetched.body).into_owned()
}

#[tokio::test]
async fn invented_methods_share_one_metric_label() {
    let (berth, _cache) = start("").await;
    for n in 0..20 {
        let mut stream = TcpStream::connect(berth.addr).await.unwrap();
        let head = format!("XINVENTED{n} /v2/ HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
        let answer = ask(&mut stream, &head).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    }
    let text = metrics(&berth).await;
    assert!(
        !text.contains("XINVENTED"),
        "a client-chosen method became a label"
    );
    let other = text
        .lines()
        .find(|l| l.starts_with("berth_requests_total") && l.contains("method=\"other\""));
    assert!(other.is_some_and(|l| l.ends_with(" 20")), "{text}");
}

/// Opens a connection and has one request answered on it, so it is surely accepted and held.
async fn held_connection(berth: &Berth) -> TcpStream {
    let mut stream = TcpStream::connect(berth.addr).await.unwrap();
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &answer[..n]
    );
    stream
}

#[tokio::test]
async fn one_client_cannot_open_more_than_its_connections() {
    let (berth, _cache) = start("max_client_connections = 4").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(held_connection(&berth).await);
    }
    let mut fifth = TcpStream::connect(berth.addr).await.unwrap();
    let answer = ask(&mut fifth, "GET /v2/ HTTP/1.1\r\nHost: b\r\n\r\n").await;
    assert_eq!(answer, "", "the fifth connection is closed unanswered");
    let text = metrics(&berth).await;
    assert!(
        text.contains("berth_rejected_total{limit=\"client_connections\"} 1"),
        "{text}"
    );
    // The held connections still work.
    let first = &mut held[0];
    first
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn trusted_networks_are_exempt_from_the_connection_cap() {
    let (berth, _cache) =
        start("max_client_connections = 2\ntrusted_networks = [\"127.0.0.0/8\", \"::1/128\"]")
            .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(held_connection(&berth).await);
    }
    assert_eq!(held.len(), 10);
}

/// An HTTP/2 (prior knowledge) client connection, its driver spawned; the handle resolves
/// when the server ends the connection.
async fn h2_client(
    berth: &Berth,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let stream = TcpStream::connect(berth.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    (send, tokio::spawn(connection))
}

async fn h2_get(send: &mut h2::client::SendRequest<Bytes>, berth: &Berth) -> http::StatusCode {
    let request = http::Request::get(format!("http://{}/v2/", berth.addr))
        .body(())
        .unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    response.await.unwrap().status()
}

#[tokio::test]
async fn http2_concurrent_streams_are_capped_by_config() {
    let (berth, _cache) = start("h2_max_concurrent_streams = 7").await;
    let stream = TcpStream::connect(berth.addr).await.unwrap();
    let (send, mut connection) = h2::client::handshake(stream).await.unwrap();
    let mut send = send.ready().await.unwrap();
    let request = http::Request::get(format!("http://{}/v2/", berth.addr))
        .body(())
        .unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    // Drive the connection until the response arrives: the server's SETTINGS came first.
    let response = tokio::select! {
        response = response => response.unwrap(),
        _ = &mut connection => panic!("connection ended"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(connection.max_concurrent_send_streams(), 7);
}

#[tokio::test]
async fn idle_http2_connections_are_closed() {
    let (berth, _cache) = start("idle_timeout = \"1s\"\nheader_read_timeout = \"1s\"").await;
    // One that made a request, then went quiet (its client still answers pings).
    let (mut send, connection) = h2_client(&berth).await;
    assert_eq!(h2_get(&mut send, &berth).await, 200);
    let ended = tokio::time::timeout(CLOSED_WITHIN, connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    // One that never sent a request.
    let (_send, connection) = h2_client(&berth).await;
    let ended = tokio::time::timeout(CLOSED_WITHIN, connection).await;
    assert!(
        ended.is_ok(),
        "an HTTP/2 connection without requests stayed open"
    );
}

/// One HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// HPACK, static table only: `:method GET`, `:scheme http`, `:path /`.
const GET_ROOT: &[u8] = &[0x82, 0x86, 0x84];

async fn raw_h2(berth: &Berth) -> TcpStream {
    let mut stream = TcpStream::connect(berth.addr).await.unwrap();
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&start).await.unwrap();
    stream
}

/// Reads frames until the connection ends; the error code of a GOAWAY if one came.
async fn goaway_code(stream: &mut TcpStream) -> Option<u32> {
    let read = async {
        let mut code = None;
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return code;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return code;
            }
            if head[3] == GOAWAY && payload.len() >= 8 {
                code = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
    };
    tokio::time::timeout(CLOSED_WITHIN, read)
        .await
        .expect("the server ends the connection")
}

#[tokio::test]
async fn a_half_sent_http2_header_block_is_closed() {
    let (berth, _cache) = start("header_read_timeout = \"1s\"").await;
    let mut stream = raw_h2(&berth).await;
    // HEADERS without END_HEADERS: the block never completes.
    let headers = frame(HEADERS, 0, 1, GET_ROOT);
    stream.write_all(&headers).await.unwrap();
    assert!(
        closed_by_server(&mut stream).await,
        "the stalled head kept the connection"
    );
}

#[tokio::test]
async fn http2_rapid_reset_ends_the_connection_with_enhance_your_calm() {
    let (berth, _cache) = start("").await;
    let mut stream = raw_h2(&berth).await;
    let mut flood = Vec::new();
    for n in 0..500u32 {
        let id = 2 * n + 1;
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, GET_ROOT));
        flood.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = stream.write_all(&flood).await;
    assert_eq!(
        goaway_code(&mut stream).await,
        Some(0xb),
        "ENHANCE_YOUR_CALM"
    );
}

#[tokio::test]
async fn http2_continuation_flood_is_cut_off() {
    let (berth, _cache) = start("").await;
    let stream = raw_h2(&berth).await;
    let (mut reader, mut writer) = stream.into_split();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        let mut block = frame(HEADERS, 0, 1, GET_ROOT);
        // Literal header fields with new names, never ending (no END_HEADERS).
        let junk: Vec<u8> = std::iter::repeat_n([0x40, 0x01, b'x', 0x7f, 0x00], 3000)
            .flatten()
            .collect();
        while sent < (64 << 20) {
            block.extend(frame(CONTINUATION, 0, 1, &junk[..junk.len().min(16_000)]));
            if writer.write_all(&block).await.is_err() {
                return sent;
            }
            sent += block.len();
            block.clear();
        }
        sent
    });
    let mut sink = vec![0u8; 4096];
    let ended = tokio::time::timeout(CLOSED_WITHIN, async {
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server kept reading the flood");
    let sent = flood.await.unwrap();
    assert!(sent < (64 << 20), "the whole flood was accepted");
}

#[tokio::test]
async fn the_admin_listener_times_out_heads_and_caps_connections() {
    let (berth, _cache) = start("header_read_timeout = \"1s\"").await;
    let mut slow = TcpStream::connect(berth.admin_addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    assert!(
        closed_by_server(&mut slow).await,
        "a half head held the admin port"
    );

    let (berth, _cache) = start("").await;
    let mut held = Vec::new();
    for _ in 0..berth::admin::MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(berth.admin_addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    let mut over = TcpStream::connect(berth.admin_addr).await.unwrap();
    let answer = ask(
        &mut over,
        "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer, "", "a connection over the cap is closed unanswered");
    drop(held);
}

/// A target that lies: `/evil` announces a 10-byte config and then streams without end (up to
/// 256 MiB, counting what it managed to send); `/loud` answers 404 with terminal escapes.
struct LyingTarget {
    addr: std::net::SocketAddr,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

const CONFIG_BYTES: &[u8] = b"0123456789";

async fn lying_target() -> LyingTarget {
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = std::sync::Arc::clone(&counter);
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let path = request.uri().path().to_string();
                let counter = std::sync::Arc::clone(&counter);
                async move {
                    let config = berth::oci::digest::Digest::of(CONFIG_BYTES);
                    let manifest = serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": config.as_str(), "size": 10},
                        "layers": [],
                    })
                    .to_string();
                    let full = |status: u16, text: String| {
                        let body = http_body_util::Full::new(Bytes::from(text))
                            .map_err(|never| match never {})
                            .boxed();
                        http::Response::builder()
                            .status(status)
                            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                            .body(body)
                            .unwrap()
                    };
                    let response = if path.contains("loud") {
                        full(404, "\x1b]0;owned\x07\x1b[2Jgone\r\nfake: line".into())
                    } else if path.ends_with("/manifests/latest") {
                        full(200, manifest)
                    } else if path.contains("/blobs/") {
                        let chunks = futures_util::stream::iter(0..4096).map(move |_| {
                            counter.fetch_add(64 << 10, Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                Bytes::from(vec![b'0'; 64 << 10]),
                            ))
                        });
                        http::Response::new(BodyExt::boxed(StreamBody::new(chunks)))
                    } else {
                        full(404, String::new())
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    LyingTarget { addr, sent }
}

use futures_util::StreamExt as _;

#[tokio::test]
async fn warm_bounds_what_a_target_sends_and_escapes_what_it_prints() {
    let target = lying_target().await;
    let options = berth::warm::Options {
        target: format!("http://{}", target.addr),
        platform: "linux/amd64".parse().unwrap(),
        references: vec!["evil:latest".into(), "loud:latest".into()],
        platform_config: Default::default(),
        client: Default::default(),
        concurrency: 2,
        credentials: None,
    };
    let summary = berth::warm::warm(options).await.unwrap();
    assert_eq!(summary.failed.len(), 2, "{summary}");
    let (_, evil) = &summary.failed[0];
    assert!(evil.contains("expected 10 bytes"), "{evil}");
    let sent = target.sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 64 << 20, "warm read {sent} bytes of a 10-byte blob");
    let printed = summary.to_string();
    assert!(printed.contains("owned"), "{printed}");
    for control in ['\x1b', '\x07', '\r'] {
        assert!(
            !printed.contains(control),
            "{control:?} printed: {printed:?}"
        );
    }
}

#[tokio::test]
async fn load_bounds_what_a_target_sends() {
    let target = lying_target().await;
    let config = berth::load::LoadConfig {
        target: format!("http://{}", target.addr),
        images: vec![berth::load::ImageRef::parse("evil:latest", None).unwrap()],
        concurrency: 1,
        layer_concurrency: 3,
        limit: berth::load::Limit::Count(1),
        platform: "linux/amd64".into(),
        request_timeout: Duration::from_secs(60),
        metrics: None,
        credentials: None,
        ca_file: None,
    };
    let report = berth::load::run(config).await.unwrap();
    let errors = report.recorder.error_samples.join("\n");
    assert!(errors.contains("longer than 10 bytes"), "{errors}");
    let sent = target.sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 64 << 20, "load read {sent} bytes of a 10-byte blob");
}

#[test]
fn printable_escapes_terminal_controls() {
    let text = berth::warm::printable("ok \x1b[2J\r\nbell\x07 é");
    assert_eq!(text, "ok \\u{1b}[2J\\u{d}\\u{a}bell\\u{7} é");
    assert!(berth::warm::printable(&"x".repeat(5000)).len() < 1100);
}

#[tokio::test]
async fn idle_http1_keep_alive_connections_are_closed() {
    let (berth, _cache) = start("idle_timeout = \"1s\"").await;
    let mut stream = held_connection(&berth).await;
    assert!(
        closed_by_server(&mut stream).await,
        "an idle keep-alive connection stayed open"
    );
}

const ADMIN_TOKEN: &str = "admin-token-for-hostile-tests-0123";

/// `DELETE` on the admin API with the token.
async fn admin_delete(berth: &Berth, path: &str) -> support::Fetched {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let url = format!("{}{path}", berth.admin_url());
    let headers = [("authorization", auth.as_str())];
    send_without_body(http::Method::DELETE, &url, &headers).await
}

/// Sends `method` to `url` with `headers`, no credentials and no body.
async fn send_without_body(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> support::Fetched {
    support::fetch(support::request(method, url, None, headers, Bytes::new()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn purges_are_durable_and_reach_memory() {
    use support::{push_image, Flavor, Image, Stack};
    let stack = Stack::with_config(&format!("admin_token = \"{ADMIN_TOKEN}\""), "").await;
    let image = Image::random(Flavor::Oci, 77, &[1000]);
    push_image(&stack.registry.url(), "team/app", "v1", &image, None)
        .await
        .unwrap();
    let url = format!("{}/v2/team/app/manifests/v1", stack.berth.url());
    let accept = [("accept", image.media_type())];
    let pulled = send_without_body(http::Method::GET, &url, &accept).await;
    assert_eq!(pulled.status, 200);
    let tags_dir = stack
        .cache
        .path()
        .join("tags")
        .join(stack.tap.host())
        .join("team/app");
    // Tag files are `@<tag>@<accept class>`.
    let v1_files = || -> usize {
        std::fs::read_dir(&tags_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("@v1@"))
                    .count()
            })
            .unwrap_or(0)
    };
    // The tag mapping is persisted on its own task; wait for it (bounded).
    for _ in 0..200 {
        if v1_files() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(v1_files(), 1);

    let purged = admin_delete(&stack.berth, "/admin/repositories/team/app").await;
    assert_eq!(purged.status, 200, "{:?}", purged.body);
    assert_eq!(v1_files(), 0, "the tag file outlived the purge");

    let digest = berth::oci::digest::Digest::parse(image.digest()).unwrap();
    assert!(stack.berth.state.cache.manifest(&digest).await.is_some());
    let purged = admin_delete(&stack.berth, &format!("/admin/digests/{digest}")).await;
    assert_eq!(purged.status, 200, "{:?}", purged.body);
    assert!(
        stack.berth.state.cache.manifest(&digest).await.is_none(),
        "still in memory"
    );
    let file = stack
        .berth
        .state
        .cache
        .store
        .path(berth::cache::Kind::Manifest, &digest);
    assert!(!file.exists());
}
