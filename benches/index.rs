//! The cache index under load: lookups and inserts per second with 1M entries, start-up time
//! (scan the store, rebuild the index) with 100k cached blobs, and the real binary's time from
//! process start to its first cache hit on that store (`first_hit`). The page cache is warm:
//! dropping it needs a writable /proc/sys, which the machine these figures come from lacks.
//!
//! `cargo bench --bench index`. Test runners also execute bench targets (without `--bench`);
//! then the sizes shrink so the suite stays fast, and the figures mean nothing.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::cache::{Cache, Entry, Index, Kind, Store};
use berth::config::CacheConfig;
use berth::oci::digest::Digest;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn measuring() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

fn digest(n: u64) -> Digest {
    Digest::of(&n.to_le_bytes())
}

fn index_operations(c: &mut Criterion) {
    let entries: u64 = if measuring() { 1_000_000 } else { 1_000 };
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let metrics = Arc::new(berth::metrics::Metrics::new());
    let index = Index::new(store, u64::MAX / 2, metrics);
    let keys: Vec<Digest> = (0..entries).map(digest).collect();
    for key in &keys {
        index.insert(key.clone(), Entry::new(Kind::Blob, 4 << 20, None));
    }
    let mut group = c.benchmark_group(format!("index_{entries}"));
    group.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    group.bench_function("get_hit", |b| {
        b.iter(|| {
            next = (next + 7919) % keys.len();
            index.get(&keys[next]).expect("present")
        })
    });
    let absent = digest(u64::MAX);
    group.bench_function("get_miss", |b| b.iter(|| index.get(&absent)));
    let mut fresh = entries;
    group.bench_function("insert", |b| {
        b.iter_batched(
            || {
                fresh += 1;
                digest(fresh)
            },
            |key| index.insert(key, Entry::new(Kind::Blob, 4 << 20, None)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Writes `count` committed one-KiB blobs the way fills do (temp file, rename).
fn populate(dir: &std::path::Path, count: u64) {
    let store = Store::open(dir).unwrap();
    for n in 0..count {
        let content = [n.to_le_bytes().as_slice(), &[0u8; 1016]].concat();
        let (temp, mut file) = store.temp_file().unwrap();
        file.write_all(&content).unwrap();
        store
            .commit_unsynced(&temp, Kind::Blob, &Digest::of(&content))
            .unwrap();
    }
}

fn start_up(c: &mut Criterion) {
    let blobs: u64 = if measuring() { 100_000 } else { 500 };
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path(), blobs);
    let config = CacheConfig {
        dir: dir.path().to_path_buf(),
        ..CacheConfig::default()
    };
    start_up_bench(c, format!("open_{blobs}_blobs"), 20, || {
        let started = Instant::now();
        let metrics = Arc::new(berth::metrics::Metrics::new());
        let cache = Cache::open(&config, metrics).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(cache.index.len(), blobs);
        elapsed
    });
}

/// One `start_up` benchmark: ten samples over `seconds`, each iteration timed by `once` itself
/// (it returns the part worth measuring, leaving out its checks and clean-up).
fn start_up_bench(
    c: &mut Criterion,
    name: String,
    seconds: u64,
    mut once: impl FnMut() -> Duration,
) {
    let mut group = c.benchmark_group("start_up");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(seconds));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| (0..iterations).map(|_| once()).sum())
    });
    group.finish();
}

/// Spawns `berth serve` on the populated store and times it until one cached blob is answered
/// with `X-Cache: HIT`: the scan, the index, the listeners and the first request together.
fn first_hit(c: &mut Criterion) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let blobs: u64 = if measuring() { 100_000 } else { 500 };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    populate(&cache, blobs);
    let wanted = Digest::of(&[7u64.to_le_bytes().as_slice(), &[0u8; 1016]].concat());
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndefault_upstream = \"bench.test\"\n\
             [cache]\ndir = \"{}\"\n[[upstream]]\nhost = \"bench.test\"\nendpoint = \"http://127.0.0.1:9\"\n",
            cache.display()
        ),
    )
    .unwrap();
    start_up_bench(c, format!("process_to_first_hit_{blobs}_blobs"), 30, || {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let listen = loop {
            let line = lines.next().expect("berth exited before serving").unwrap();
            if let Some(rest) = line.split(" listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let mut stream = std::net::TcpStream::connect(&listen).unwrap();
        let get = format!(
            "GET /v2/bench/app/blobs/{wanted} HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n"
        );
        std::io::Write::write_all(&mut stream, get.as_bytes()).unwrap();
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        let elapsed = started.elapsed();
        let answer = String::from_utf8_lossy(&bytes);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
        assert!(answer.to_ascii_lowercase().contains("x-cache: hit"));
        let _ = child.kill();
        let _ = child.wait();
        elapsed
    });
}

criterion_group!(benches, index_operations, start_up, first_hit);
criterion_main!(benches);
