//! The usual test set-up: a real registry, a tap in front of it, and berth (in-process) in
//! front of the tap, with its cache in a temporary directory.
//!
//! Test files add their own helpers in `impl Stack` blocks next to their tests.

use super::{single_upstream_config, Auth, Berth, Registry, Tap};

pub struct Stack {
    pub registry: Registry,
    pub tap: Tap,
    pub berth: Berth,
    pub cache: tempfile::TempDir,
}

impl Stack {
    /// `extra` goes into berth's `[cache]` table (and may open later tables).
    pub async fn start(extra: &str) -> Stack {
        Stack::with_config("", extra).await
    }

    /// `top` goes before berth's `[cache]` table, `cache_extra` into it.
    pub async fn with_config(top: &str, cache_extra: &str) -> Stack {
        let registry = Registry::start(Auth::None).await;
        let tap = Tap::start(&registry.url()).await;
        let cache = tempfile::tempdir().unwrap();
        let config = single_upstream_config(&tap.host(), &tap.url(), cache.path(), cache_extra);
        let berth = Berth::start(&format!("{top}\n{config}")).await;
        Stack {
            registry,
            tap,
            berth,
            cache,
        }
    }

    /// Stops berth and starts a new one on the same cache directory.
    pub async fn restart_berth(&mut self, extra: &str) {
        let config =
            single_upstream_config(&self.tap.host(), &self.tap.url(), self.cache.path(), extra);
        let old = std::mem::replace(&mut self.berth, Berth::start(&config).await);
        old.stop().await;
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.berth.url())
    }
}
