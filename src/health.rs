//! Liveness and readiness, in one place.
//!
//! Ready means: the index has been loaded from disk (true once an `AppState` exists; before
//! that `admin::serve_loading` answers "loading index"), the API
//! server is accepting (`mark_serving`, set by `server::run`), it is not shutting down
//! (`mark_shutting_down`, set when the shutdown signal arrives, so a load balancer stops
//! sending new pulls during the drain), and the cache directory is writable right now (a full
//! or read-only disk turns every miss into an error). Serving `/healthz` and `/readyz` is
//! `admin`'s job; this module only decides.
//!
//! The writability probe writes, syncs and removes a file, so its answer is reused for
//! `PROBE_INTERVAL`: a client hammering `/readyz` or `/metrics` costs no disk writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::cache::Store;

/// How long one writability probe's answer stands.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Readiness {
    serving: watch::Sender<bool>,
    shutting_down: AtomicBool,
    /// The last probe: when, and its error if it failed. A mutex held across the probe, so
    /// concurrent callers wait for one probe instead of each running their own.
    probed: Mutex<Option<(Instant, Option<String>)>>,
    probes: AtomicU64,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness {
            serving: watch::Sender::new(false),
            shutting_down: AtomicBool::new(false),
            probed: Mutex::new(None),
            probes: AtomicU64::new(0),
        }
    }

    pub(crate) fn mark_serving(&self) {
        self.serving.send_replace(true);
    }

    pub fn mark_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Resolves once the API server accepts connections (for tests and start-up ordering).
    pub async fn wait_serving(&self) {
        let mut serving = self.serving.subscribe();
        let _ = serving.wait_for(|serving| *serving).await;
    }

    /// Drops the last probe's answer, so the next check probes again: for a caller that has
    /// reason to think the disk changed (and tests that change it).
    pub async fn reprobe(&self) {
        *self.probed.lock().await = None;
    }

    /// Writability probes run so far (each writes a file).
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Whether the cache directory took a write within the last `PROBE_INTERVAL`; probes
    /// (on the blocking pool) when the last answer is older.
    async fn writable(&self, store: &std::sync::Arc<Store>) -> Option<String> {
        let mut probed = self.probed.lock().await;
        if let Some((at, answer)) = &*probed {
            if at.elapsed() < PROBE_INTERVAL {
                return answer.clone();
            }
        }
        self.probes.fetch_add(1, Ordering::Relaxed);
        let store = std::sync::Arc::clone(store);
        let answer = tokio::task::spawn_blocking(move || probe_writable(&store))
            .await
            .map_err(std::io::Error::other)
            .and_then(|probed| probed)
            .err()
            .map(|err| err.to_string());
        *probed = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Everything that keeps berth from being ready; empty when it is ready.
    pub(crate) async fn problems(&self, store: &std::sync::Arc<Store>) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.is_serving() {
            problems.push("the API listener is not accepting yet".to_string());
        }
        if self.is_shutting_down() {
            problems.push("shutting down".to_string());
        }
        if let Some(err) = self.writable(store).await {
            problems.push(format!("cache directory is not writable: {err}"));
        }
        problems
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

/// Creates, writes, syncs and removes a temp file where fills write theirs.
fn probe_writable(store: &Store) -> std::io::Result<()> {
    use std::io::Write;
    let (path, mut file) = store.temp_file()?;
    let written = file.write_all(b"ready").and_then(|()| file.sync_data());
    let removed = std::fs::remove_file(&path);
    written.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn ready_only_while_serving_and_not_shutting_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let readiness = Readiness::new();
        assert_eq!(readiness.problems(&store).await.len(), 1);
        readiness.mark_serving();
        readiness.wait_serving().await;
        assert!(readiness.problems(&store).await.is_empty());
        readiness.mark_shutting_down();
        assert_eq!(readiness.problems(&store).await, ["shutting down"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unwritable_cache_directory_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let readiness = Readiness::new();
        readiness.mark_serving();
        assert!(readiness.problems(&store).await.is_empty());
        std::fs::remove_dir_all(dir.path().join("tmp")).unwrap();
        tokio::time::advance(PROBE_INTERVAL).await;
        let problems = readiness.problems(&store).await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("not writable"), "{problems:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn many_readiness_checks_write_to_disk_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let readiness = Arc::new(Readiness::new());
        readiness.mark_serving();
        let checks: Vec<_> = (0..50)
            .map(|_| {
                let (readiness, store) = (Arc::clone(&readiness), Arc::clone(&store));
                tokio::spawn(async move { readiness.problems(&store).await })
            })
            .collect();
        for check in checks {
            assert!(check.await.unwrap().is_empty());
        }
        assert_eq!(readiness.probes(), 1, "50 checks, one probe");
        tokio::time::advance(PROBE_INTERVAL).await;
        for _ in 0..50 {
            readiness.problems(&store).await;
        }
        assert_eq!(
            readiness.probes(),
            2,
            "a new probe once the answer is stale"
        );
    }
}
