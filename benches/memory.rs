//! Peak memory of berth while it fills one large blob and streams it to many clients at once.
//!
//! Runs the real `berth` binary (so its RSS is its own) against a real distribution registry,
//! starts `CLIENTS` concurrent GETs of one uncached blob, reads every body to the end, and
//! prints berth's peak resident set (VmHWM). Bodies are counted, not hashed: verification is the
//! tests' job; this measures buffering. Sizes: BERTH_BENCH_BLOB_MIB (default 1024),
//! BERTH_BENCH_CLIENTS (default 16). Run: `cargo bench --bench memory`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use support::{push_blob, random_blob, request, send, Auth, Registry};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench. Test runners list or run bench targets without it
    // (`--list`, test mode); this measurement is not a test, so it does nothing then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run());
}

/// Reads a `VmXXX:   1234 kB` line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn run() {
    let mib = env_or("BERTH_BENCH_BLOB_MIB", 1024);
    let clients = env_or("BERTH_BENCH_CLIENTS", 16);
    let registry = Registry::start(Auth::None).await;
    let blob = random_blob(mib << 20, 99);
    push_blob(&registry.url(), "bench/big", &blob, None)
        .await
        .unwrap();
    let digest = blob.digest.clone();
    drop(blob);

    let work = tempfile::tempdir().unwrap();
    let config = support::single_upstream_config(
        &registry.host(),
        &registry.url(),
        &work.path().join("cache"),
        "",
    );
    let config_path = work.path().join("berth.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn,berth=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listen = loop {
        let line = lines.next().expect("berth exited before serving").unwrap();
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let idle_kib = status_kib(pid, "VmRSS:");

    let url = format!("http://{listen}/v2/bench/big/blobs/{digest}");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let response = send(request(Method::GET, &url, None, &[], Bytes::new()))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut received = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    received += data.len() as u64;
                }
            }
            received
        }));
    }
    let mut total = 0;
    for task in tasks {
        let received = task.await.unwrap();
        assert_eq!(
            received,
            (mib as u64) << 20,
            "every client got the whole blob"
        );
        total += received;
    }
    let elapsed = started.elapsed();
    let peak_kib = status_kib(pid, "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "memory: {clients} clients x {mib} MiB cold blob: berth RSS idle {:.1} MiB, peak {:.1} MiB; \
         {:.0} MiB delivered in {:.1} s ({:.0} MiB/s aggregate)",
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        total as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        total as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
}
