//! A soak with a hostile upstream beside an honest one (issue 14): honest clients pull images
//! from a real registry through berth, alone and while hostile clients pull through an
//! in-process upstream that trickles its blobs, announces blobs far larger than it sends and
//! lies about its manifests' Content-Type. Asserts that the honest clients see no failure and
//! that open file descriptors and heap return to their starting level once the hostile load
//! stops; prints the honest median pull time alone and beside the hostile load (no timing is
//! asserted: README records the figures), the CPU berth and the rest of the process used, and
//! the RSS.
//!
//! Phases alternate, alone first and last (alone, hostile, alone, hostile, alone for the
//! default 2 rounds), and the medians pool the phases of each kind, so a drift of the machine
//! over the run weighs on both sides alike. Between rounds the hostile fills are discarded, so
//! each hostile phase starts from none, as the first does; after the last one the hostile
//! upstream stops trickling and goes away, and its fills end on their own before the last
//! phase alone. berth runs on a tokio runtime of its
//! own, so its threads' CPU time is told apart from the clients' and the upstreams'.
//!
//! Each phase runs `BERTH_HOSTILE_SOAK_SECS` seconds (15 by default, as `./scripts/test` runs
//! it; 30 for the longer run README reports); `BERTH_HOSTILE_SOAK_ROUNDS` hostile phases (2).
//!
//! Heap in use is counted by a global allocator wrapper (the only `unsafe` in the tests: the
//! trait is unsafe by definition and each method only forwards to the system allocator), since
//! RSS does not shrink when the allocator keeps freed pages.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::Method;
use http_body_util::{BodyExt, Full, StreamBody};
use support::{push_image, request, Auth, Berth, Flavor, Image, Registry, Tap};
use tokio::time::Instant;

struct Counting;

static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes in use, in KiB.
fn heap_kib() -> i64 {
    (LIVE.load(Ordering::Relaxed) / 1024) as i64
}

/// Heap growth tolerated after the hostile load: the tag table and moka's bookkeeping keep
/// a little of what the hostile clients asked for.
const HEAP_TOLERANCE_KIB: i64 = 16 << 10;

/// Each honest client pauses this long between pulls, as nodes do between images. Without it
/// the honest clients alone saturate both cores of a small machine (measured: 1.95 of 2 cores
/// with berth, the clients and both upstreams in this one process), and the median then
/// measures the hostile side's share of the CPU rather than whether berth lets it get in the
/// honest clients' way.
const HONEST_PAUSE: Duration = Duration::from_millis(20);

const HONEST_CLIENTS: usize = 4;
const HOSTILE_CLIENTS: usize = 6;
const IMAGES: u64 = 3;

fn phase() -> Duration {
    Duration::from_secs(support::env_number("BERTH_HOSTILE_SOAK_SECS", 15))
}

fn rounds() -> u64 {
    support::env_number("BERTH_HOSTILE_SOAK_ROUNDS", 2).max(1)
}

/// The name of berth's runtime threads (`Berth::start_on_own_runtime`), workers and blocking
/// pool alike.
const BERTH_THREADS: &str = "killable-berth";

/// CPU seconds used so far: (berth's threads, the whole process). berth's runtime keeps its
/// blocking threads alive, so no berth thread's time leaves the sum by the thread exiting.
fn cpu_seconds() -> (f64, f64) {
    let ticks = |stat: &str| -> f64 {
        // Fields after the command name: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n).and_then(|v| v.parse::<f64>().ok());
        field(11).unwrap_or(0.0) + field(12).unwrap_or(0.0)
    };
    let mut berth = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == BERTH_THREADS {
            berth += ticks(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
        }
    }
    let process = ticks(&std::fs::read_to_string("/proc/self/stat").unwrap());
    // Linux reports these in clock ticks of 1/100 s (USER_HZ).
    (berth / 100.0, process / 100.0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The hostile upstream: `/v2/` answers 200; every manifest is served as `text/html`; a blob
/// whose digest starts with 0-7 trickles (1 KiB every 100 ms of a 1 MiB body), any other is
/// announced as 1 GiB and cut after 8 MiB. Once `stop` is set, bodies come without pauses.
async fn hostile_upstream(stop: Arc<AtomicBool>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let stop = Arc::clone(&stop);
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let stop = Arc::clone(&stop);
                async move { Ok::<_, Infallible>(hostile_answer(req.uri().path(), stop)) }
            });
            connections.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (host, server)
}

type HostileBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn hostile_answer(path: &str, stop: Arc<AtomicBool>) -> http::Response<HostileBody> {
    let full = |status: u16, ctype: &str, body: Vec<u8>| {
        http::Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap()
    };
    if path == "/v2/" {
        return full(200, "application/json", b"{}".to_vec());
    }
    if path.contains("/manifests/") {
        let image = Image::random(Flavor::Oci, 9000, &[100_000, 200_000]);
        return full(
            200,
            "text/html; charset=utf-8",
            image.manifest.bytes.to_vec(),
        );
    }
    let Some(digest) = path
        .rsplit('/')
        .next()
        .and_then(|d| d.strip_prefix("sha256:"))
    else {
        return full(404, "text/plain", Vec::new());
    };
    let trickle = digest.as_bytes()[0] < b'8';
    let (chunk, pause, total, announced) = if trickle {
        (1024, Duration::from_millis(100), 1 << 20, 1u64 << 20)
    } else {
        (64 << 10, Duration::ZERO, 8 << 20, 1u64 << 30)
    };
    let chunks = futures_util::stream::iter(0..total / chunk).then(move |_| {
        let stop = Arc::clone(&stop);
        async move {
            if !pause.is_zero() && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(pause).await;
            }
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(vec![7u8; chunk])))
        }
    });
    http::Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", announced)
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap()
}

/// Pulls one image (manifest, then every blob) through berth; `None` if anything failed.
async fn pull_image(base: &str, repo: &str, image: &Image) -> Option<Duration> {
    let started = Instant::now();
    let url = format!("{base}/v2/{repo}/manifests/v1");
    let accept = [("accept", image.media_type())];
    let fetched = support::fetch(request(Method::GET, &url, None, &accept, Bytes::new()))
        .await
        .ok()?;
    if fetched.status != 200 || fetched.body != image.manifest.bytes {
        return None;
    }
    for blob in image.blobs() {
        let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
        let fetched = support::get(&url, None).await.ok()?;
        if fetched.status != 200 || fetched.body != blob.bytes {
            return None;
        }
    }
    Some(started.elapsed())
}

/// Honest clients pulling for `length`: every pull time, and the number of failed pulls.
async fn honest_phase(
    base: &str,
    images: &Arc<Vec<Image>>,
    length: Duration,
) -> (Vec<Duration>, u64) {
    let deadline = Instant::now() + length;
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..HONEST_CLIENTS {
        let (images, base, failed) = (Arc::clone(images), base.to_string(), Arc::clone(&failed));
        clients.push(tokio::spawn(async move {
            let mut times = Vec::new();
            let mut n = c;
            while Instant::now() < deadline {
                let i = n % images.len();
                n += 1;
                match pull_image(&base, &format!("honest/app{i}"), &images[i]).await {
                    Some(took) => times.push(took),
                    None => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(HONEST_PAUSE).await;
            }
            times
        }));
    }
    let mut times = Vec::new();
    for client in clients {
        times.extend(client.await.unwrap());
    }
    times.sort();
    (times, failed.load(Ordering::Relaxed))
}

/// Hostile clients: pull manifests and random blobs through the hostile upstream until
/// `stop`, each request given up after 5 s.
fn hostile_clients(
    base: &str,
    hostile: &str,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..HOSTILE_CLIENTS)
        .map(|c| {
            let (base, hostile, stop) = (base.to_string(), hostile.to_string(), Arc::clone(stop));
            tokio::spawn(async move {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sent += 1;
                    let path = if sent.is_multiple_of(3) {
                        format!("evil/app{c}/manifests/v{sent}")
                    } else {
                        let digest = support::image::sha256_digest(&[c as u8, (sent % 251) as u8]);
                        format!("evil/app{c}/blobs/{digest}")
                    };
                    let url = format!("{base}/v2/{hostile}/{path}");
                    let pull = support::fetch(request(Method::GET, &url, None, &[], Bytes::new()));
                    let _ = tokio::time::timeout(Duration::from_secs(5), pull).await;
                }
                sent
            })
        })
        .collect()
}

fn median(times: &[Duration]) -> Duration {
    times.get(times.len() / 2).copied().unwrap_or_default()
}

fn ms(time: Duration) -> f64 {
    time.as_secs_f64() * 1000.0
}

/// What the phases of one kind (alone, or beside the hostile load) added up to.
#[derive(Default)]
struct Side {
    times: Vec<Duration>,
    failed: u64,
    phases: Vec<String>,
    berth_cpu: f64,
    process_cpu: f64,
    seconds: f64,
}

impl Side {
    /// Records one phase: its pull times and failures, and the CPU used since `cpu_before`.
    fn add(&mut self, (times, failed): (Vec<Duration>, u64), cpu_before: (f64, f64)) {
        let cpu = cpu_seconds();
        let (berth, process) = (cpu.0 - cpu_before.0, cpu.1 - cpu_before.1);
        self.phases.push(format!(
            "{:.1} ms ({} pulls, berth {:.2} / process {:.2} cores)",
            ms(median(&times)),
            times.len(),
            berth / phase().as_secs_f64(),
            process / phase().as_secs_f64(),
        ));
        self.times.extend(times);
        self.failed += failed;
        self.berth_cpu += berth;
        self.process_cpu += process;
        self.seconds += phase().as_secs_f64();
    }

    fn median(&mut self) -> Duration {
        self.times.sort();
        median(&self.times)
    }

    fn cores(&self) -> (f64, f64) {
        let seconds = self.seconds.max(1e-9);
        (self.berth_cpu / seconds, self.process_cpu / seconds)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn honest_pulls_beside_a_hostile_upstream_see_no_failures_and_release_resources() {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let image = Image::random(Flavor::Oci, 500 + i * 10, &[300_000, 1_000_000, 2_000_000]);
        push_image(
            &registry.url(),
            &format!("honest/app{i}"),
            "v1",
            &image,
            None,
        )
        .await
        .unwrap();
        images.push(image);
    }
    let images = Arc::new(images);
    let stop_upstream = Arc::new(AtomicBool::new(false));
    let (hostile, hostile_server) = hostile_upstream(Arc::clone(&stop_upstream)).await;
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
default_upstream = "{honest}"
[cache]
dir = "{dir}"
max_size = "256MiB"
[client]
read_timeout = "2s"
[[upstream]]
host = "{honest}"
endpoint = "{honest_url}"
[[upstream]]
host = "{hostile}"
endpoint = "http://{hostile}"
"#,
        honest = tap.host(),
        honest_url = tap.url(),
        dir = cache.path().display(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resolver = berth::net::connect::system_resolver();
    let berth = Berth::start_on_own_runtime(listener, &config, resolver).await;
    let base = berth.url();
    // Warm: every honest image cached once, so every phase measures the same kind of pull.
    for (i, image) in images.iter().enumerate() {
        assert!(pull_image(&base, &format!("honest/app{i}"), image)
            .await
            .is_some());
    }
    let (fds_before, rss_before, heap_before) = (open_fds(), rss_kib(), heap_kib());

    let (mut alone, mut beside) = (Side::default(), Side::default());
    let (mut hostile_requests, mut rss_during, mut heap_during) = (0, 0, 0);
    for round in 0..=rounds() {
        let cpu = cpu_seconds();
        alone.add(honest_phase(&base, &images, phase()).await, cpu);
        if round == rounds() {
            break;
        }
        let cpu = cpu_seconds();
        let stop = Arc::new(AtomicBool::new(false));
        let hostile_load = hostile_clients(&base, &hostile, &stop);
        beside.add(honest_phase(&base, &images, phase()).await, cpu);
        (rss_during, heap_during) = (rss_during.max(rss_kib()), heap_during.max(heap_kib()));
        stop.store(true, Ordering::Relaxed);
        for client in hostile_load {
            hostile_requests += client.await.unwrap();
        }
        if round + 1 < rounds() {
            // The next hostile phase starts from no hostile fill, as this one did.
            berth.state.fills.drain(Duration::ZERO).await;
        } else {
            // The hostile upstream stops trickling and goes away; its fills end on their own,
            // before the last phase alone.
            stop_upstream.store(true, Ordering::Relaxed);
            hostile_server.abort();
            for _ in 0..500 {
                if berth.state.fills.in_flight() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let mut fds_after = open_fds();
    for _ in 0..200 {
        if fds_after <= fds_before + 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds_after = open_fds();
    }
    let (rss_after, heap_after) = (rss_kib(), heap_kib());

    let (a, b) = (alone.median(), beside.median());
    let ((alone_berth, alone_all), (beside_berth, beside_all)) = (alone.cores(), beside.cores());
    println!(
        "hostile soak, {} s phases: alone {}; beside {}",
        phase().as_secs(),
        alone.phases.join(", "),
        beside.phases.join(", "),
    );
    println!(
        "hostile soak: honest median pull {:.1} ms alone ({} pulls, {} failed), {:.1} ms beside \
         {hostile_requests} hostile requests ({} pulls, {} failed): {:+.1}%; CPU in cores, \
         berth / whole process: {alone_berth:.2} / {alone_all:.2} alone, {beside_berth:.2} / \
         {beside_all:.2} beside; open fds {fds_before} -> {fds_after}; heap {heap_before} -> \
         {heap_during} -> {heap_after} KiB; RSS {rss_before} -> {rss_during} -> {rss_after} KiB; \
         fills failed {}, rejected: connections {}, fills {}",
        ms(a),
        alone.times.len(),
        alone.failed,
        ms(b),
        beside.times.len(),
        beside.failed,
        (b.as_secs_f64() / a.as_secs_f64().max(1e-9) - 1.0) * 100.0,
        berth.state.metrics.fills_failed.get(),
        berth
            .state
            .metrics
            .rejected
            .with_label_values(&["connections"])
            .get(),
        berth
            .state
            .metrics
            .rejected
            .with_label_values(&["fills"])
            .get(),
    );
    assert_eq!(alone.failed, 0, "honest pulls failed without hostile load");
    assert_eq!(
        beside.failed, 0,
        "honest pulls failed beside the hostile upstream"
    );
    assert!(!alone.times.is_empty() && !beside.times.is_empty());
    assert!(hostile_requests > 0);
    assert_eq!(
        berth.state.fills.in_flight(),
        0,
        "hostile fills still running"
    );
    assert!(
        fds_after <= fds_before + 8,
        "open fds {fds_before} -> {fds_after}: the hostile load leaked descriptors"
    );
    assert!(
        heap_after - heap_before < HEAP_TOLERANCE_KIB,
        "heap {heap_before} -> {heap_after} KiB: the hostile load left memory behind"
    );
}
