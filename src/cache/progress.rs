//! A blob on its way to readers: `Progress`, where a fill is (or a cached file, already
//! verified), and opening a cached blob as one. Readers (`reader`) follow a `Progress`; `fill`
//! publishes them while it receives. Neither fetching nor serving lives here.

use std::fs::File;
use std::sync::Arc;

use tokio::sync::watch;

use super::spill::Spill;
use super::{Cache, FillError, Kind};
use crate::metrics::Metrics;
use crate::oci::digest::Digest;

/// Where a fill is; readers decide what they may send from it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The upstream request is under way; no response head yet.
    Connecting,
    /// Bytes `[0, written)` are received but not yet verified: in the file, or in the fill's
    /// window (`spill`): bytes the file does not hold yet, or after a disk failure the rest.
    Streaming {
        file: Arc<File>,
        total: Option<u64>,
        written: u64,
        spill: Option<Arc<Spill>>,
    },
    /// The whole blob matches its digest. With a spill it was passed through, not cached.
    Verified {
        file: Arc<File>,
        total: u64,
        spill: Option<Arc<Spill>>,
    },
    /// The fill failed; nothing was cached. Shared: every reader of the fill sees the one cause.
    Failed(Arc<FillError>),
}

impl Progress {
    /// The state of a blob that is already in the cache.
    pub fn verified(file: File, total: u64) -> watch::Receiver<Progress> {
        let (_, rx) = watch::channel(Progress::Verified {
            file: Arc::new(file),
            total,
            spill: None,
        });
        rx
    }
}

/// A cached blob opened for reading, or `None` (the index entry dropped and the file deleted,
/// so the caller refetches) if its file is gone, unreadable or not the indexed size.
pub(crate) fn open_cached(
    cache: &Cache,
    metrics: &Metrics,
    digest: &Digest,
) -> Option<watch::Receiver<Progress>> {
    let entry = cache.index.get(digest).filter(|e| e.kind == Kind::Blob)?;
    let opened = cache.store.open_blob(Kind::Blob, digest).and_then(|file| {
        let len = file.metadata()?.len();
        if len != entry.size {
            let message = format!("file holds {len} bytes, the index {}", entry.size);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                message,
            ));
        }
        Ok(file)
    });
    match opened {
        Ok(file) => {
            record_access(&file);
            Some(Progress::verified(file, entry.size))
        }
        Err(err) => {
            tracing::warn!(%digest, %err, "indexed blob unreadable; dropping it");
            drop_cached(cache, metrics, digest);
            None
        }
    }
}

/// Coarse enough that a hot blob costs one metadata write a minute, fine enough for LRU order.
const ACCESS_GRANULARITY: std::time::Duration = std::time::Duration::from_secs(60);

/// Records a hit in the file's mtime, which orders eviction after a restart and for `min_free`.
fn record_access(file: &File) {
    let now = std::time::SystemTime::now();
    let stale = file
        .metadata()
        .and_then(|m| m.modified())
        .map_or(true, |modified| {
            now.duration_since(modified)
                .is_ok_and(|age| age > ACCESS_GRANULARITY)
        });
    if stale {
        let _ = file.set_modified(now);
    }
}

/// Forgets a cached blob that turned out unreadable and deletes its file, so the next request
/// fetches it again.
pub(crate) fn drop_cached(cache: &Cache, metrics: &Metrics, digest: &Digest) {
    metrics.disk_errors.inc();
    let _ = cache.index.take(Kind::Blob, digest);
    if let Err(err) = cache.store.remove(Kind::Blob, digest) {
        tracing::warn!(%digest, %err, "cannot delete an unreadable blob");
    }
}
