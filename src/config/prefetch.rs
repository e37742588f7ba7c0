//! `[prefetch]`: whether berth starts the fills of an image's missing blobs when a client GETs
//! its manifest (or its first blob, `trigger`), and how many at once. Plain serde data with its defaults; the prefetcher
//! (`crate::prefetch`) reads it. Imports nothing from the crate.

use serde::Deserialize;

/// Prefetch of a cold image's config and layers, started by the GET of its manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    /// A node asks for an image's blobs a few at a time (containerd: 3), each paced by one
    /// stream; starting them all at once (`trigger`) lets the later layers arrive meanwhile.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Prefetch fills one manifest may have running at once; the rest of its blobs wait in
    /// that manifest's queue (or for the client's own requests).
    #[serde(default = "default_max_per_image")]
    pub max_per_image: usize,
    /// Prefetch fills running at once over all images, so prefetches of many cold images
    /// cannot crowd the upstream links; a blob over the bound is left to the client.
    #[serde(default = "default_max_total")]
    pub max_total: usize,
    /// Which request starts an image's prefetch: its manifest GET, or the first GET of one of
    /// its blobs (which proves a real pull: tools that only resolve digests never start it).
    #[serde(default)]
    pub trigger: Trigger,
}

/// The request that starts a cold image's prefetch (`prefetch.trigger`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The GET of its image manifest.
    Manifest,
    /// The first GET (never a HEAD) of its config or a layer, within a minute of the
    /// manifest's GET; the manifest GET only remembers what to fetch. The default: it pulls
    /// a cold image as fast as `Manifest` (benches/prefetch) and starts nothing for a client
    /// that only resolves digests.
    #[default]
    FirstBlob,
}

impl Default for PrefetchConfig {
    fn default() -> PrefetchConfig {
        PrefetchConfig {
            enabled: default_enabled(),
            max_per_image: default_max_per_image(),
            max_total: default_max_total(),
            trigger: Trigger::default(),
        }
    }
}

impl PrefetchConfig {
    /// The key of the first count that must be positive and is not.
    pub fn zero_count(&self) -> Option<&'static str> {
        if self.max_per_image == 0 {
            return Some("prefetch.max_per_image");
        }
        if self.max_total == 0 {
            return Some("prefetch.max_total");
        }
        None
    }
}

fn default_enabled() -> bool {
    true
}

fn default_max_per_image() -> usize {
    16
}

fn default_max_total() -> usize {
    64
}
