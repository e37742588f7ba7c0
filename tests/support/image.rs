//! Synthetic images: deterministic blobs, valid gzip tar layers, configs, manifests and indexes in
//! both Docker schema2 and OCI flavours, byte-exact and with their digests.
//!
//! Owns: content and its JSON. Everything is deterministic from a seed within one build, but the
//! RNG stream is not promised across `rand` upgrades, so tests compare digests computed here,
//! never digests hard-coded in a test.
//! Does not own: moving bytes anywhere (see `push`) or checking what a client pulled (`skopeo`).

use std::io::Write;

use bytes::Bytes;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Content and its digest, the unit every registry endpoint deals in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub bytes: Bytes,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

impl Blob {
    pub fn new(bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        Blob { bytes, digest }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The hex part of the digest, as used in on-disk blob paths.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `size` pseudo-random bytes from `seed`; see `random_bytes` for how random they are.
pub fn random_blob(size: usize, seed: u64) -> Blob {
    Blob::new(random_bytes(size, seed))
}

/// Seeded bytes, fast even in an unoptimized test build.
///
/// Tests compile at opt-level 0, where rand's generic fill runs at ~25 ns a byte (6 s for
/// 256 MiB). So only a 1 MiB pool comes from the seeded RNG; anything longer is assembled from
/// 64 KiB windows of the pool at seeded offsets, at memcpy speed. Not for statistics, but unique
/// per seed and incompressible to gzip (deflate looks back only 32 KiB).
fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    const POOL: usize = 1 << 20;
    const WINDOW: usize = 64 << 10;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pool = vec![0u8; size.min(POOL)];
    rng.fill_bytes(&mut pool);
    if size <= POOL {
        return pool;
    }
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        let len = WINDOW.min(size - bytes.len());
        let start = rng.random_range(0..=POOL - len);
        bytes.extend_from_slice(&pool[start..start + len]);
    }
    bytes
}

/// A filesystem layer: the compressed blob a registry stores, and the digest of the uncompressed
/// tar that the image config lists in `rootfs.diff_ids`.
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// A valid gzip tar layer holding `layer-<seed>/data.bin` with `size` random bytes, so layers with
/// different seeds never collide when unpacked on top of each other.
///
/// The cost is two SHA-256 passes (tar and gzip), about 2.5 s per 256 MiB each on the 2-core
/// machine, so the two run on separate threads.
pub fn random_layer(size: usize, seed: u64) -> Layer {
    let mut tar = tar::Builder::new(Vec::with_capacity(size + 4096));
    let dir = format!("layer-{seed}");
    append(
        &mut tar,
        tar::EntryType::Directory,
        &format!("{dir}/"),
        0o755,
        &[],
    );
    let data = random_bytes(size, seed);
    append(
        &mut tar,
        tar::EntryType::Regular,
        &format!("{dir}/data.bin"),
        0o644,
        &data,
    );
    drop(data);
    let tar = tar.into_inner().expect("finish tar");
    std::thread::scope(|scope| {
        let diff_id = scope.spawn(|| sha256_digest(&tar));
        let blob = Blob::new(gzip_stored(&tar));
        Layer {
            blob,
            diff_id: diff_id.join().expect("hash thread"),
        }
    })
}

/// Gzip (RFC 1952) whose deflate stream is all stored blocks (RFC 1951 section 3.2.4).
///
/// Why not flate2's encoder: tests run unoptimized, where pushing 256 MiB through miniz_oxide
/// takes 4-8 s even at level 0 or 1. Stored blocks are what a deflater emits for random content
/// anyway and every gzip reader accepts them; the CRC-32 is flate2's optimized one.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 0xffff;
    let blocks = data.len().div_ceil(BLOCK).max(1);
    let mut out = Vec::with_capacity(data.len() + blocks * 5 + 18);
    // Magic, CM=deflate, no flags, MTIME=0 (reproducible), XFL=0, OS=unknown.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    for i in 0..blocks {
        let chunk = &data[i * BLOCK..data.len().min((i + 1) * BLOCK)];
        let len = chunk.len() as u16;
        out.push(u8::from(i + 1 == blocks)); // BFINAL on the last block, BTYPE=00 (stored)
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    let mut crc = flate2::Crc::new();
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes()); // ISIZE is the length mod 2^32
    out
}

/// Appends one entry with fixed owner and mtime, so the same seed gives the same bytes.
pub fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    kind: tar::EntryType,
    path: &str,
    mode: u32,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    tar.append_data(&mut header, path, data)
        .expect("append tar entry");
}

/// Which manifest family an image or index belongs to; it fixes every media type inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Docker image manifest v2 schema 2 and manifest list.
    Docker,
    /// OCI image manifest and image index.
    Oci,
}

impl Flavor {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Flavor::Docker => "application/vnd.docker.distribution.manifest.v2+json",
            Flavor::Oci => "application/vnd.oci.image.manifest.v1+json",
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            Flavor::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
            Flavor::Oci => "application/vnd.oci.image.index.v1+json",
        }
    }

    pub fn config_type(self) -> &'static str {
        match self {
            Flavor::Docker => "application/vnd.docker.container.image.v1+json",
            Flavor::Oci => "application/vnd.oci.image.config.v1+json",
        }
    }

    pub fn layer_type(self) -> &'static str {
        match self {
            Flavor::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Flavor::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }
}

/// The platform an image runs on, as written in its config and in an index entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    pub fn linux_amd64() -> Platform {
        Platform::new("linux", "amd64", None)
    }

    fn to_json(&self) -> Value {
        let mut value = json!({ "architecture": self.architecture, "os": self.os });
        if let Some(variant) = &self.variant {
            value["variant"] = json!(variant);
        }
        value
    }
}

/// A single-platform image: config, layers and the manifest that ties them together.
#[derive(Clone, Debug)]
pub struct Image {
    pub flavor: Flavor,
    pub platform: Platform,
    pub config: Blob,
    pub layers: Vec<Layer>,
    /// The exact manifest bytes pushed, and their digest.
    pub manifest: Blob,
}

impl Image {
    /// A linux/amd64 image over `layers`.
    pub fn new(flavor: Flavor, layers: Vec<Layer>) -> Image {
        Image::for_platform(flavor, Platform::linux_amd64(), layers)
    }

    /// An image of `layer_sizes.len()` random layers, seeded from `seed`, `seed + 1`, ...
    pub fn random(flavor: Flavor, seed: u64, layer_sizes: &[usize]) -> Image {
        let layers = (seed..)
            .zip(layer_sizes)
            .map(|(s, &size)| random_layer(size, s))
            .collect();
        Image::new(flavor, layers)
    }

    pub fn for_platform(flavor: Flavor, platform: Platform, layers: Vec<Layer>) -> Image {
        let config = Blob::new(config_json(&platform, &layers));
        let manifest = Blob::new(manifest_json(flavor, &config, &layers));
        Image {
            flavor,
            platform,
            config,
            layers,
            manifest,
        }
    }

    pub fn media_type(&self) -> &'static str {
        self.flavor.manifest_type()
    }

    /// The manifest digest, which is the image's identity.
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    /// Config first, then layers in order: every blob the manifest references.
    pub fn blobs(&self) -> Vec<&Blob> {
        let layers = self.layers.iter().map(|l| &l.blob);
        std::iter::once(&self.config).chain(layers).collect()
    }
}

fn config_json(platform: &Platform, layers: &[Layer]) -> Vec<u8> {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let mut config = platform.to_json();
    config["created"] = json!("1970-01-01T00:00:00Z");
    config["config"] = json!({});
    config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
    serde_json::to_vec(&config).expect("config serializes")
}

fn manifest_json(flavor: Flavor, config: &Blob, layers: &[Layer]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| descriptor(flavor.layer_type(), &l.blob))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": flavor.manifest_type(),
        "config": descriptor(flavor.config_type(), config),
        "layers": layers,
    });
    serde_json::to_vec(&manifest).expect("manifest serializes")
}

fn descriptor(media_type: &str, blob: &Blob) -> Value {
    json!({ "mediaType": media_type, "size": blob.len(), "digest": blob.digest })
}

/// A multi-platform image: an OCI image index or a Docker manifest list over child images.
#[derive(Clone, Debug)]
pub struct Index {
    pub flavor: Flavor,
    pub images: Vec<Image>,
    /// The exact index bytes pushed, and their digest.
    pub manifest: Blob,
}

impl Index {
    /// An index listing each image under its own platform, in order.
    pub fn new(flavor: Flavor, images: Vec<Image>) -> Index {
        let entries: Vec<Value> = images
            .iter()
            .map(|image| {
                let mut entry = descriptor(image.media_type(), &image.manifest);
                entry["platform"] = image.platform.to_json();
                entry
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": flavor.index_type(),
            "manifests": entries,
        });
        let manifest = Blob::new(serde_json::to_vec(&index).expect("index serializes"));
        Index {
            flavor,
            images,
            manifest,
        }
    }

    pub fn media_type(&self) -> &'static str {
        self.flavor.index_type()
    }

    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }
}
