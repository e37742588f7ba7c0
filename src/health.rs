//! Liveness and readiness, in one place.
//!
//! Ready means: the index has been loaded from disk (true once an `AppState` exists; before
//! that `admin::serve_loading` answers "loading index"), the API
//! server is accepting (`mark_serving`, set by `server::run`), it is not shutting down
//! (`mark_shutting_down`, set when the shutdown signal arrives, so a load balancer stops
//! sending new pulls during the drain), and the cache directory is writable right now (a full
//! or read-only disk turns every miss into an error). Serving `/healthz` and `/readyz` is
//! `admin`'s job; this module only decides.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::cache::Store;

pub struct Readiness {
    serving: watch::Sender<bool>,
    shutting_down: AtomicBool,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness {
            serving: watch::Sender::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn mark_serving(&self) {
        self.serving.send_replace(true);
    }

    pub fn mark_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Resolves once the API server accepts connections (for tests and start-up ordering).
    pub async fn wait_serving(&self) {
        let mut serving = self.serving.subscribe();
        let _ = serving.wait_for(|serving| *serving).await;
    }

    /// Everything that keeps berth from being ready; empty when it is ready. Writes and removes
    /// a temp file in the store, so it runs on the blocking pool.
    pub async fn problems(&self, store: &std::sync::Arc<Store>) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.is_serving() {
            problems.push("the API listener is not accepting yet".to_string());
        }
        if self.is_shutting_down() {
            problems.push("shutting down".to_string());
        }
        let store = std::sync::Arc::clone(store);
        let writable = tokio::task::spawn_blocking(move || probe_writable(&store))
            .await
            .map_err(std::io::Error::other)
            .and_then(|probed| probed);
        if let Err(err) = writable {
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

    #[tokio::test]
    async fn an_unwritable_cache_directory_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let readiness = Readiness::new();
        readiness.mark_serving();
        std::fs::remove_dir_all(dir.path().join("tmp")).unwrap();
        let problems = readiness.problems(&store).await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("not writable"), "{problems:?}");
    }
}
