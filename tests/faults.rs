//! Faults, overload and hostile input: berth keeps answering and never serves a wrong byte.
//!
//! Upstream faults come from the tap in front of a real registry (cut, stalled, 429) or from
//! the real registry stopped mid-test (connection refused); disk faults from a tiny tmpfs
//! (ENOSPC) and from a cached file truncated under a reader (read error); crashes and
//! shutdowns from signals to the real binary.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};
use support::error_code;
use support::{
    fetch, get, push_blob, random_blob, read_body, request, send, send_get, single_upstream_config,
    Auth, Berth, BerthProcess, Blob, Fault, Kind, Registry, Stack, Tap,
};

fn blob_url(base: &str, repo: &str, digest: &str) -> String {
    format!("{base}/v2/{repo}/blobs/{digest}")
}

/// Every file in `tmp/` of a cache.
fn temp_files(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|dir| dir.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Every committed blob file, checked to hash to its name.
fn assert_blobs_hash_to_their_names(cache: &Path) -> usize {
    let mut count = 0;
    let root = cache.join("blobs/sha256");
    for shard in std::fs::read_dir(root).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                name,
                "{}",
                path.display()
            );
            count += 1;
        }
    }
    count
}

/// A random blob of `size` bytes pushed to `team/app`.
async fn push_random(registry: &Registry, size: usize, seed: u64) -> Blob {
    let blob = random_blob(size, seed);
    push_blob(&registry.url(), "team/app", &blob, None)
        .await
        .unwrap();
    blob
}

// ---- upstream faults -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_fill_resumes_from_the_byte_it_reached_and_every_client_gets_the_whole_blob() {
    let stack = Stack::start("").await;
    let blob = stack
        .push_faulted(3_000_000, 1, Fault::CutBlobAt(1_234_567))
        .await;

    let url = stack.url(&blob);
    let (first, second) = tokio::join!(send_get(&url), send_get(&url));
    for response in [first.unwrap(), second.unwrap()] {
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body == blob.bytes, "whole blob, byte for byte");
    }
    let gets: Vec<_> = stack
        .tap
        .seen()
        .into_iter()
        .filter(|s| s.kind == Kind::Blob && s.method == Method::GET)
        .collect();
    assert_eq!(gets.len(), 2, "one fill, one resume: {gets:#?}");
    assert_eq!(gets[1].headers["range"], "bytes=1234567-");
    assert_eq!(stack.berth.state.metrics.fill_resumes.get(), 1);
    assert!(
        stack
            .berth
            .state
            .cache
            .index
            .get(&blob.digest.parse().unwrap())
            .is_some(),
        "the resumed fill was verified and cached"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_fill_resumes_after_the_read_timeout() {
    let stack = Stack::start("[client]\nread_timeout = \"300ms\"").await;
    let blob = stack.push(1_000_000, 2).await;
    stack.tap.inject_times(Kind::Blob, Fault::Stall, 1);
    let fetched = get(&stack.url(&blob), None).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == blob.bytes);
    let ranged = stack.tap.count_ranged(Kind::Blob);
    assert_eq!(ranged, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_429_is_retried_but_a_long_one_and_a_404_go_to_the_client() {
    let stack = Stack::start("").await;
    let blob = stack
        .push_faulted(10_000, 3, Fault::Status(429, Some(0)))
        .await;
    let fetched = get(&stack.url(&blob), None).await.unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body == blob.bytes);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 2, "retried once");

    let other = stack
        .push_faulted(10_000, 4, Fault::Status(429, Some(120)))
        .await;
    let fetched = get(&stack.url(&other), None).await.unwrap();
    assert_eq!(fetched.status, 429);
    assert_eq!(fetched.header("retry-after"), Some("120"));
    assert_eq!(error_code(&fetched.body), "TOOMANYREQUESTS");
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Blob),
        1,
        "not waited out"
    );

    stack.tap.reset();
    let missing = random_blob(100, 5);
    let fetched = get(&stack.url(&missing), None).await.unwrap();
    assert_eq!(fetched.status, 404);
    assert_eq!(
        stack.tap.count(Method::GET, Kind::Blob),
        1,
        "a 404 is an answer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_upstream_opens_the_breaker_while_cached_content_is_still_served() {
    // berth talks to the real registry directly, so stopping it means connection refused.
    let mut registry = Registry::start(Auth::None).await;
    let cached = push_random(&registry, 200_000, 6).await;
    let uncached = push_random(&registry, 1_000, 7).await;
    let cache = tempfile::tempdir().unwrap();
    let extra = "[client]\nretries = 1\nbreaker_threshold = 2\nbreaker_cooldown = \"1h\"";
    let config = single_upstream_config(&registry.host(), &registry.url(), cache.path(), extra);
    let berth = Berth::start(&config).await;
    let url = |blob: &Blob| blob_url(&berth.url(), "team/app", &blob.digest);
    assert_eq!(get(&url(&cached), None).await.unwrap().status, 200);

    registry.stop();
    let refused = get(&url(&uncached), None).await.unwrap();
    assert_eq!(refused.status, 502, "{:?}", refused.body);
    // The client learns that the upstream is unreachable and the request id, not the address.
    let body = String::from_utf8_lossy(&refused.body);
    assert!(
        body.contains("upstream unreachable") && body.contains("request id"),
        "{body}"
    );
    assert!(!body.contains(&registry.host()), "{body}");
    // The first request's two attempts reached the threshold: the circuit is open now.
    let fast = get(&url(&uncached), None).await.unwrap();
    assert_eq!(fast.status, 503);
    assert_eq!(error_code(&fast.body), "UNAVAILABLE");
    assert!(String::from_utf8_lossy(&fast.body).contains("circuit open"));
    assert!(fast.header("retry-after").is_some());

    let hit = get(&url(&cached), None).await.unwrap();
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert!(hit.body == cached.bytes);
}

// ---- disk faults ---------------------------------------------------------------------------

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop. Needs root (the test VM
/// and CI run as root); fails loudly otherwise rather than skipping.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a {size} tmpfs failed: this test needs root to make a disk fill up"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_during_a_fill_passes_the_blob_through_and_caches_nothing() {
    let disk = SmallDisk::mount("2m");
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let big = push_random(&registry, 6_000_000, 8).await;
    let small = push_random(&registry, 100_000, 9).await;
    let cache = disk.path().join("cache");
    let berth = Berth::with_upstream(&tap.host(), &tap.url(), &cache).await;
    let url = |blob: &Blob| blob_url(&berth.url(), "team/app", &blob.digest);
    let indexed = |blob: &Blob| {
        let digest = blob.digest.parse().unwrap();
        berth.state.cache.index.get(&digest).is_some()
    };

    // Two clients, so one of them reads the part past the disk failure from the memory window.
    let big_url = url(&big);
    let (a, b) = tokio::join!(get(&big_url, None), get(&big_url, None));
    for fetched in [a.unwrap(), b.unwrap()] {
        assert_eq!(fetched.status, 200);
        assert!(fetched.body == big.bytes, "passed through byte for byte");
    }
    let metrics = &berth.state.metrics;
    assert_eq!(metrics.disk_errors.get(), 1);
    assert_eq!(
        temp_files(&cache),
        Vec::<PathBuf>::new(),
        "nothing half-written remains"
    );
    assert!(!indexed(&big));
    assert!(metrics.render().contains("berth_disk_errors_total 1"));

    // The space came back: a blob that fits is cached as usual.
    assert_eq!(get(&url(&small), None).await.unwrap().status, 200);
    assert!(indexed(&small));
    assert_eq!(assert_blobs_hash_to_their_names(&cache), 1);
    berth.stop().await;
}

/// The next pull of `blob` misses the cache and fetches it whole with one upstream GET.
async fn assert_refetched(stack: &Stack, blob: &Blob) {
    stack.tap.reset();
    let again = get(&stack.url(blob), None).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-cache"), Some("MISS"));
    assert!(again.body == blob.bytes);
    assert_eq!(stack.tap.count(Method::GET, Kind::Blob), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_error_on_a_cached_blob_drops_it_and_the_next_pull_refetches() {
    let stack = Stack::start("").await;
    let blob = stack.push(48 << 20, 10).await;
    assert_eq!(get(&stack.url(&blob), None).await.unwrap().status, 200);
    let path = stack.cached_path(&blob);

    let response = send_get(&stack.url(&blob)).await.unwrap();
    assert_eq!(response.headers()["x-cache"], "HIT");
    let mut body = response.into_body();
    let (head, _) = read_body(&mut body, 1).await;
    assert!(!head.is_empty());
    // The file shrinks under the reader: its next read fails.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let (rest, error) = read_body(&mut body, usize::MAX).await;
    assert!(error.is_some(), "the body ends in an error, not short");
    assert!(head.len() + rest.len() < blob.len());
    let digest: berth::oci::digest::Digest = blob.digest.parse().unwrap();
    // Served from a memory map, the failure may be the socket write's (the kernel finds the
    // page gone), noticed when berth drops the body: that can follow the client's error.
    for _ in 0..500 {
        if stack.berth.state.cache.index.get(&digest).is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(stack.berth.state.cache.index.get(&digest).is_none());
    assert!(!path.exists(), "the unreadable file is deleted");
    assert!(stack.berth.state.metrics.disk_errors.get() >= 1);

    assert_refetched(&stack, &blob).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_blob_truncated_on_disk_is_refetched_not_served() {
    let stack = Stack::start("").await;
    let blob = stack.push(300_000, 11).await;
    assert_eq!(get(&stack.url(&blob), None).await.unwrap().status, 200);
    let path = stack.cached_path(&blob);
    std::fs::write(&path, &blob.bytes[..1000]).unwrap();
    assert_refetched(&stack, &blob).await;
}

// ---- crash safety and shutdown -------------------------------------------------------------

/// What a test of the real binary needs: a registry, a tap in front of it, and berth's config
/// and working directory (its cache is `work/cache`).
struct Process {
    registry: Registry,
    tap: Tap,
    work: tempfile::TempDir,
    cache: PathBuf,
    config: String,
}

impl Process {
    /// `extra` goes into berth's `[cache]` table (and may open later tables).
    async fn set_up(extra: &str) -> Process {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let work = tempfile::tempdir().unwrap();
        let cache = work.path().join("cache");
        let config = single_upstream_config(&tap.host(), &tap.url(), &cache, extra);
        Process {
            registry,
            tap,
            work,
            cache,
            config,
        }
    }

    async fn push(&self, size: usize, seed: u64) -> Blob {
        push_random(&self.registry, size, seed).await
    }

    fn start_berth(&self) -> BerthProcess {
        BerthProcess::start(&self.config, self.work.path())
    }

    /// berth started over a fresh set-up (`extra` as in `set_up`) with one pushed blob of `size`,
    /// and a GET of it whose fill the tap holds after `at` bytes: where the SIGTERM tests begin.
    async fn holding(
        extra: &str,
        size: usize,
        seed: u64,
        at: u64,
    ) -> (
        Process,
        Blob,
        BerthProcess,
        http::Response<hyper::body::Incoming>,
    ) {
        let setup = Process::set_up(extra).await;
        let blob = setup.push(size, seed).await;
        let berth = setup.start_berth();
        let response = setup.hold(&berth, &blob, at, 1).await;
        (setup, blob, berth, response)
    }

    /// A GET of `blob` through `berth` whose fill the tap holds after `at` bytes; returns once
    /// the tap holds `held` fills in all.
    async fn hold(
        &self,
        berth: &BerthProcess,
        blob: &Blob,
        at: u64,
        held: usize,
    ) -> http::Response<hyper::body::Incoming> {
        self.tap.inject_times(Kind::Blob, Fault::PauseAt(at), 1);
        let url = blob_url(&berth.url(), "team/app", &blob.digest);
        let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
            .await
            .unwrap();
        self.tap.wait_paused(held).await;
        response
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_fill_never_leaves_a_partial_blob_to_serve() {
    let setup = Process::set_up("").await;
    let done = setup.push(500_000, 20).await;

    let mut berth = setup.start_berth();
    let fetched = get(&blob_url(&berth.url(), "team/app", &done.digest), None)
        .await
        .unwrap();
    assert!(fetched.body == done.bytes);

    for round in 0..3u64 {
        let blob = setup.push(2_000_000, 30 + round).await;
        let response = setup.hold(&berth, &blob, 700_000, round as usize + 1).await;
        assert_eq!(
            temp_files(&setup.cache).len(),
            1,
            "round {round}: the fill is under way"
        );
        berth.kill9();
        drop(response);

        berth = setup.start_berth();
        assert_eq!(
            temp_files(&setup.cache),
            Vec::<PathBuf>::new(),
            "round {round}"
        );
        assert_eq!(
            assert_blobs_hash_to_their_names(&setup.cache),
            1 + round as usize
        );
        setup.tap.reset();
        let expected = [
            (&done, "HIT", "the index matches the disk"),
            (&blob, "MISS", "the half fill was not kept"),
        ];
        for (wanted, x_cache, why) in expected {
            let url = blob_url(&berth.url(), "team/app", &wanted.digest);
            let pulled = get(&url, None).await.unwrap();
            assert_eq!(pulled.header("x-cache"), Some(x_cache), "{why}");
            assert!(pulled.body == wanted.bytes);
        }
        assert_eq!(setup.tap.count(Method::GET, Kind::Blob), 1);
    }
    setup.tap.resume();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_and_lets_the_download_in_flight_finish() {
    let (setup, blob, mut berth, response) = Process::holding("", 3_000_000, 40, 1_000_000).await;
    assert_eq!(response.status(), 200);

    berth.signal("TERM");
    berth.wait_line("draining");
    let refused = std::net::TcpStream::connect(&berth.addr);
    assert!(refused.is_err(), "no new connections once draining");
    setup.tap.resume();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body == blob.bytes, "the download in flight finished");
    let status = berth.wait_exit();
    assert!(status.success(), "{status:?}");
    assert_eq!(temp_files(&setup.cache), Vec::<PathBuf>::new());
    assert_eq!(
        assert_blobs_hash_to_their_names(&setup.cache),
        1,
        "the fill committed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_discards_a_fill_that_outlives_the_grace_period() {
    let grace = "[limits]\nshutdown_grace = \"500ms\"";
    let (setup, _blob, mut berth, response) = Process::holding(grace, 2_000_000, 41, 500_000).await;
    berth.signal("TERM");
    let status = berth.wait_exit();
    assert!(status.success(), "{status:?}");
    let body = response.into_body().collect().await;
    assert!(
        body.is_err(),
        "the unfinished download ends in an error, never short"
    );
    assert_eq!(
        temp_files(&setup.cache),
        Vec::<PathBuf>::new(),
        "temp file removed"
    );
    assert_eq!(assert_blobs_hash_to_their_names(&setup.cache), 0);
    setup.tap.resume();
}

// ---- limits --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn over_the_fill_cap_a_miss_gets_503_with_retry_after() {
    let stack = Stack::start("[limits]\nmax_fills = 1\nretry_after = \"3s\"").await;
    let first = stack.push(1_000_000, 50).await;
    let second = stack.push(1_000, 51).await;
    let held = stack.hold(&first, 100_000).await;
    let refused = get(&stack.url(&second), None).await.unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("3"));
    assert_eq!(error_code(&refused.body), "UNAVAILABLE");
    stack.tap.resume();
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert!(body == first.bytes);
    assert_eq!(get(&stack.url(&second), None).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_share_gets_429_and_others_are_unaffected() {
    let stack = Stack::start("[limits]\nmax_client_requests = 1").await;
    let blob = stack.push(1_000_000, 52).await;
    let held = stack.hold(&blob, 100_000).await;
    let refused = get(&format!("{}/v2/", stack.berth.url()), None)
        .await
        .unwrap();
    assert_eq!(refused.status, 429);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(error_code(&refused.body), "TOOMANYREQUESTS");
    stack.tap.resume();
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert!(body == blob.bytes);
    // The slot was held by the body and is free again.
    assert_eq!(
        get(&format!("{}/v2/", stack.berth.url()), None)
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_connection_cap_a_new_connection_gets_503_and_is_closed() {
    let stack = Stack::start("[limits]\nmax_connections = 1").await;
    let _holder = tokio::net::TcpStream::connect(stack.berth.addr)
        .await
        .unwrap();
    let mut extra = std::net::TcpStream::connect(stack.berth.addr).unwrap();
    extra
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: berth\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("UNAVAILABLE"));
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_on_both_sides() {
    let extra = "[limits]\nheader_read_timeout = \"300ms\"\nwrite_timeout = \"300ms\"";
    let stack = Stack::start(extra).await;
    // Slowloris: half a request head, then silence. The connection is closed.
    let mut slow = std::net::TcpStream::connect(stack.berth.addr).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: be").unwrap();
    let mut rest = Vec::new();
    let read = slow.read_to_end(&mut rest);
    assert!(
        read.is_ok(),
        "closed by berth, not by our read timeout: {read:?}"
    );

    // A client that asks for a large blob and never reads loses its connection.
    let blob = stack.push(32 << 20, 53).await;
    assert_eq!(get(&stack.url(&blob), None).await.unwrap().status, 200);
    let mut stuck = tokio::net::TcpStream::connect(stack.berth.addr)
        .await
        .unwrap();
    let head = format!(
        "GET /v2/team/app/blobs/{} HTTP/1.1\r\nHost: berth\r\n\r\n",
        blob.digest
    );
    tokio::io::AsyncWriteExt::write_all(&mut stuck, head.as_bytes())
        .await
        .unwrap();
    let metrics = &stack.berth.state.metrics;
    let mut closed = false;
    for _ in 0..500 {
        if metrics.connections_open.get() == 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(closed, "the stalled reader's connection was dropped");
    drop(stuck);
}

// ---- hostile input -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn hostile_paths_and_oversized_requests_get_a_4xx_in_the_oci_envelope() {
    let stack = Stack::start("[limits]\nmax_uri_bytes = 2048\nmax_header_bytes = \"4KiB\"").await;
    let base = stack.berth.url();
    let long_name = "a/".repeat(150) + "b";
    let cases = [
        "/v2/../../etc/passwd/manifests/latest".to_string(),
        "/v2/team/%2e%2e/%2e%2e/manifests/latest".to_string(),
        "/v2/team/app%00/manifests/latest".to_string(),
        "/v2/team/app/manifests/latest%00".to_string(),
        "/v2/team/%ff%fe/blobs/sha256:00".to_string(),
        "/v2/team/app/blobs/sha256:..%2f..%2fetc".to_string(),
        "/v2/team/app/blobs/sha256:zz".to_string(),
        format!("/v2/{}/manifests/latest", "x".repeat(300)),
        format!("/v2/{long_name}/manifests/latest"),
        "/v2/team/app/manifests/".to_string() + &"t".repeat(200),
        "/etc/passwd".to_string(),
    ];
    for path in &cases {
        let fetched = get(&format!("{base}{path}"), None).await.unwrap();
        assert!(
            fetched.status.is_client_error(),
            "{path}: {}",
            fetched.status
        );
        error_code(&fetched.body);
    }
    stack.tap.reset();

    let long = get(&format!("{base}/v2/{}/manifests/x", "a".repeat(3000)), None)
        .await
        .unwrap();
    assert_eq!(long.status, 414);
    error_code(&long.body);
    let big = fetch(request(
        Method::GET,
        &format!("{base}/v2/"),
        None,
        &[("x-filler", &"f".repeat(5000))],
        Bytes::new(),
    ))
    .await
    .unwrap();
    assert_eq!(big.status, 431);
    error_code(&big.body);
    assert_eq!(
        stack.tap.requests(),
        vec![],
        "nothing hostile reached the upstream"
    );

    // Raw bytes no URI may hold (NUL, invalid UTF-8) never reach berth's code: hyper answers
    // 400 itself, before any handler runs.
    for raw in [
        &b"GET /v2/a\x00b/manifests/x HTTP/1.1\r\nHost: b\r\n\r\n"[..],
        b"GET /v2/\xff\xfe/manifests/x HTTP/1.1\r\nHost: b\r\n\r\n",
    ] {
        let mut stream = std::net::TcpStream::connect(stack.berth.addr).unwrap();
        stream.write_all(raw).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
}
