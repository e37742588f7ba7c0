//! Criterion benchmarks of the hot paths: sha256 over streamed chunks, the fill fan-out (one
//! writer publishing progress, 1/8/64 readers streaming the growing file), index lookups, and
//! API path parsing plus routing. Run: `cargo bench --bench hot_paths`.
//!
//! These measure the pieces in-process; whole-system numbers (berth vs nginx vs distribution)
//! are `benches/compare`, and memory is `benches/memory.rs` and `benches/index_memory.rs`.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;

use berth::cache::store::Kind;
use berth::cache::Entry;
use berth::cache::Progress;
use berth::config::Config;
use berth::oci::digest::{Digest, Verifier};
use berth::oci::name::split_api_path;
use berth::upstream::Upstreams;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::BodyExt;
use tokio::sync::watch;

#[path = "shared/index.rs"]
mod shared;

/// The chunk size hyper hands the fill for an upstream body on loopback, roughly.
const STREAM_CHUNK: usize = 64 * 1024;

fn sha256_streamed(c: &mut Criterion) {
    let data = vec![0x5au8; 16 << 20];
    let mut group = c.benchmark_group("sha256");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(data.len() as u64));
    // The `sha2` crate's portable code, which the verifier used before: kept beside it so the
    // choice is measured in one run, on one machine state.
    group.bench_function("sha2_crate_16MiB_in_64KiB_chunks", |b| {
        b.iter(|| {
            use sha2::Digest as _;
            let mut hasher = sha2::Sha256::new();
            for chunk in data.chunks(STREAM_CHUNK) {
                hasher.update(chunk);
            }
            black_box(hasher.finalize())
        })
    });
    group.bench_function("16MiB_in_64KiB_chunks", |b| {
        b.iter(|| {
            let mut verifier = Verifier::new();
            for chunk in data.chunks(STREAM_CHUNK) {
                verifier.update(chunk);
            }
            black_box(verifier.finish())
        })
    });
    group.finish();
}

/// One writer appends a 16 MiB blob in 64 KiB steps, publishing each length; `readers` bodies
/// follow it from the file, as coalesced clients of one fill do.
fn fill_fan_out(c: &mut Criterion) {
    const BLOB: usize = 16 << 20;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = vec![7u8; BLOB];
    let mut group = c.benchmark_group("fill_fan_out");
    group.sample_size(10);
    for readers in [1usize, 8, 64] {
        group.throughput(Throughput::Bytes((BLOB * readers) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(readers), &readers, |b, &n| {
            b.iter(|| runtime.block_on(fan_out(dir.path(), &data, n)))
        });
    }
    group.finish();
}

async fn fan_out(dir: &std::path::Path, data: &[u8], readers: usize) {
    let path = dir.join("blob");
    let file = Arc::new(std::fs::File::create(&path).unwrap());
    let read_file = Arc::new(std::fs::File::open(&path).unwrap());
    let (tx, rx) = watch::channel(Progress::Streaming {
        file: Arc::clone(&read_file),
        total: Some(data.len() as u64),
        written: 0,
        spill: None,
    });
    let mut bodies = Vec::new();
    for _ in 0..readers {
        let body = berth::cache::reader::blob_body(
            rx.clone(),
            0,
            Some(data.len() as u64),
            None,
            berth::cache::reader::Copier::Kernel,
        );
        bodies.push(tokio::spawn(async move {
            let mut body = body;
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                received += frame.unwrap().into_data().map_or(0, |d| d.len());
            }
            received
        }));
    }
    let data = data.to_vec();
    let total = data.len() as u64;
    tokio::task::spawn_blocking(move || {
        let mut out = &*file;
        let mut written = 0u64;
        for chunk in data.chunks(STREAM_CHUNK) {
            out.write_all(chunk).unwrap();
            written += chunk.len() as u64;
            tx.send_modify(|p| {
                if let Progress::Streaming { written: w, .. } = p {
                    *w = written;
                }
            });
        }
        tx.send_replace(Progress::Verified {
            file: read_file,
            total,
            spill: None,
        });
    })
    .await
    .unwrap();
    for body in bodies {
        assert_eq!(body.await.unwrap(), total as usize);
    }
}

fn index_lookups(c: &mut Criterion) {
    const ENTRIES: usize = 100_000;
    let (_dir, index) = shared::unbounded_index();
    let digests: Vec<Digest> = (0..ENTRIES as u64)
        .map(|n| Digest::of(&n.to_le_bytes()))
        .collect();
    for digest in &digests {
        index.insert(digest.clone(), Entry::new(Kind::Blob, 4096, None));
    }
    let missing = Digest::of(b"not cached");
    let mut group = c.benchmark_group("index");
    let mut n = 0usize;
    group.bench_function("get_hit_100k", |b| {
        b.iter(|| {
            n = (n + 7919) % ENTRIES;
            black_box(index.get(&digests[n]))
        })
    });
    group.bench_function("get_miss_100k", |b| {
        b.iter(|| black_box(index.get(&missing)))
    });
    group.finish();
}

fn path_and_route(c: &mut Criterion) {
    let config = Config::from_toml(
        r#"
listen = "127.0.0.1:0"
default_upstream = "registry.example"
[cache]
dir = "/tmp/berth-bench-unused"
[[upstream]]
host = "registry.example"
endpoint = "http://127.0.0.1:1"
[[upstream]]
host = "ghcr.io"
endpoint = "http://127.0.0.1:2"
"#,
    )
    .unwrap();
    let upstreams = Upstreams::new(&config).unwrap();
    let digest = Digest::of(b"layer");
    let blob_path = format!("library/nginx/blobs/{digest}");
    let manifest_path = "ghcr.io/org/team/app/manifests/v1.2.3".to_string();
    let mut group = c.benchmark_group("path");
    group.bench_function("split_blob_path", |b| {
        b.iter(|| black_box(split_api_path(black_box(&blob_path))))
    });
    group.bench_function("split_and_route_manifest", |b| {
        b.iter(|| {
            let parsed = split_api_path(black_box(&manifest_path)).unwrap();
            let name = match parsed {
                berth::oci::name::ApiPath::Manifest { name, .. } => name,
                _ => unreachable!("a manifest path"),
            };
            black_box(berth::route::resolve(&upstreams, None, name).unwrap())
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    sha256_streamed,
    fill_fan_out,
    index_lookups,
    path_and_route
);
criterion_main!(benches);
