//! A cache index over a throwaway store, for the benches that fill one with synthetic entries.
//! Included with `#[path]` (a file under `benches/shared/` is not a bench target of its own).

use std::sync::Arc;

use berth::cache::store::Store;
use berth::cache::Index;

/// An index over an empty store in a temp dir (kept alive by the returned guard), with a limit no
/// bench reaches, so eviction never runs inside a measurement.
pub fn unbounded_index() -> (tempfile::TempDir, Index) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let index = Index::new(
        store,
        u64::MAX / 2,
        Arc::new(berth::metrics::Metrics::new()),
    );
    (dir, index)
}
