//! Index memory per cached blob: inserts 1M blob entries into `cache::Index` and reports the
//! heap it holds per entry, counted by a global allocator wrapper (live bytes = allocated minus
//! freed), plus the process RSS growth for comparison. Target: <= 200 bytes per blob.
//! Sizes: BERTH_BENCH_ENTRIES (default 1_000_000). Run: `cargo bench --bench index_memory`.
//!
//! The only `unsafe` in the project's benches is the `GlobalAlloc` impl below: the trait is
//! unsafe by definition, and each method only forwards to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use berth::cache::store::Kind;
use berth::cache::Entry;
use berth::oci::digest::Digest;

#[path = "shared/index.rs"]
mod shared;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let entries: u64 = std::env::var("BERTH_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (_dir, index) = shared::unbounded_index();
    let heap_before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss_kib();
    for n in 0..entries {
        // Each digest is built and dropped here, as a fill's would be after commit.
        let digest = Digest::of(&n.to_le_bytes());
        index.insert(digest, Entry::new(Kind::Blob, 1 << 20, None));
    }
    let heap = LIVE.load(Ordering::Relaxed) - heap_before;
    let rss = rss_kib().saturating_sub(rss_before);
    assert_eq!(index.len(), entries);
    println!(
        "index_memory: {entries} blobs: heap {:.1} MiB ({:.0} bytes/blob), RSS +{:.1} MiB ({:.0} bytes/blob)",
        heap as f64 / 1048576.0,
        heap as f64 / entries as f64,
        rss as f64 / 1024.0,
        rss as f64 * 1024.0 / entries as f64
    );
}
