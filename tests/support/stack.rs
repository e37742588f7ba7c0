//! The usual test set-up: a real registry, a tap in front of it, and berth (in-process) in
//! front of the tap, with its cache in a temporary directory.
//!
//! Test files add their own helpers in `impl Stack` blocks next to their tests.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Response};
use hyper::body::Incoming;

use super::client::{request, send};
use super::{
    push_blob, push_image, random_blob, single_upstream_config, Auth, Berth, Blob, Fault, Image,
    Kind, Registry, Tap,
};

/// An anonymous registry holding `image` as `repo:tag`, and a tap in front of it that has seen
/// nothing yet.
pub async fn registry_with(image: &Image, repo: &str, tag: &str) -> (Registry, Tap) {
    let registry = Registry::start(Auth::None).await;
    let tap = Tap::start(&registry.url()).await;
    push_image(&registry.url(), repo, tag, image, None)
        .await
        .unwrap();
    (registry, tap)
}

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

    /// A random blob of `size` bytes from `seed`, pushed to the registry's `team/app`.
    pub async fn push(&self, size: usize, seed: u64) -> Blob {
        let blob = random_blob(size, seed);
        push_blob(&self.registry.url(), "team/app", &blob, None)
            .await
            .unwrap();
        blob
    }

    /// As `push`, then forgets the requests seen so far and makes the tap inject `fault` into
    /// the next blob response.
    pub async fn push_faulted(&self, size: usize, seed: u64, fault: Fault) -> Blob {
        let blob = self.push(size, seed).await;
        self.tap.reset_with_blob_fault(fault);
        blob
    }

    /// berth's URL for `blob` in `team/app`.
    pub fn url(&self, blob: &Blob) -> String {
        self.blob_url("team/app", &blob.digest)
    }

    /// A GET of `blob` whose fill the tap holds after `at` bytes: its response head is here,
    /// and the request (and its fill) stay in flight until `tap.resume()`.
    pub async fn hold(&self, blob: &Blob, at: u64) -> Response<Incoming> {
        self.tap.inject_times(Kind::Blob, Fault::PauseAt(at), 1);
        let get = request(Method::GET, &self.url(blob), None, &[], Bytes::new());
        let held = send(get).await.unwrap();
        self.tap.wait_paused(1).await;
        held
    }

    /// Where berth's cache keeps `blob` once committed.
    pub fn cached_path(&self, blob: &Blob) -> PathBuf {
        let digest: berth::oci::digest::Digest = blob.digest.parse().unwrap();
        let store = &self.berth.state.cache.store;
        store.path(berth::cache::Kind::Blob, &digest)
    }
}
