//! A real pulling client: `skopeo copy docker://... oci:DIR`, and a reader that checks what landed
//! in the OCI image layout.
//!
//! Owns: skopeo's private configuration. Every run gets its own policy, registries.conf,
//! registries.d, auth file, HOME and tmpdir, so no system or user config (mirrors, short names,
//! lookaside stores, stored credentials) can send it anywhere but the address the test names.
//! Does not own: the transport choice (plain HTTP comes from `--src-tls-verify=false`; skopeo first
//! tries TLS, which a plain-HTTP server rejects before any request is counted, then falls back).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::image::sha256_digest;

/// Accepts any image: signature checks are not what these tests are about.
const POLICY: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

/// Runs `skopeo copy` from `src` (`HOST:PORT/repo:tag` or `...@sha256:...`; a `docker://` prefix
/// is optional) into the OCI layout `dest_dir`. `extra_args` go right after `copy`, e.g.
/// `["--src-creds", "user:pw"]`, `["--all"]` or `["--preserve-digests"]`.
pub async fn skopeo_copy(
    src: &str,
    dest_dir: &Path,
    extra_args: &[&str],
) -> std::io::Result<Output> {
    let src = match src.contains("://") {
        true => src.to_owned(),
        false => format!("docker://{src}"),
    };
    let dest = format!("oci:{}", dest_dir.display());
    let extra: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let private = PrivateConfig::new()?;
        let mut command = private.command();
        command
            .args(["copy", "--src-tls-verify=false", "--src-authfile"])
            .arg(&private.authfile)
            .args(&extra)
            .args([src, dest]);
        command.output()
    })
    .await
    .expect("skopeo task panicked")
}

/// `skopeo_copy` that fails the test, with skopeo's stderr, unless the copy succeeds.
pub async fn skopeo_copy_ok(src: &str, dest_dir: &Path, extra_args: &[&str]) {
    let output = skopeo_copy(src, dest_dir, extra_args)
        .await
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo copy {src} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A throwaway config home for one skopeo run.
struct PrivateConfig {
    dir: tempfile::TempDir,
    authfile: PathBuf,
}

impl PrivateConfig {
    fn new() -> std::io::Result<PrivateConfig> {
        let dir = tempfile::tempdir()?;
        let authfile = dir.path().join("auth.json");
        std::fs::write(&authfile, r#"{"auths":{}}"#)?;
        std::fs::write(dir.path().join("policy.json"), POLICY)?;
        std::fs::write(dir.path().join("registries.conf"), "")?;
        std::fs::create_dir(dir.path().join("registries.d"))?;
        std::fs::create_dir(dir.path().join("tmp"))?;
        Ok(PrivateConfig { dir, authfile })
    }

    fn command(&self) -> Command {
        let home = self.dir.path();
        let mut command = Command::new("skopeo");
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("CONTAINERS_REGISTRIES_CONF", home.join("registries.conf"))
            .arg("--policy")
            .arg(home.join("policy.json"))
            .arg("--registries.d")
            .arg(home.join("registries.d"))
            .arg("--tmpdir")
            .arg(home.join("tmp"))
            .stdin(Stdio::null());
        command
    }
}

/// What an OCI image layout holds for its (single) tagged manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayout {
    /// Digest of the top manifest or index named in `index.json`.
    pub manifest_digest: String,
    pub media_type: String,
    /// Child manifests present on disk when the top is an index (after `--all`); else empty.
    pub manifests: Vec<String>,
    /// Config and layer digests, in manifest order (child by child for an index).
    pub blobs: Vec<String>,
}

/// Reads an OCI image layout written by `skopeo_copy`, checking that every file under
/// `blobs/sha256/` hashes to its name and that every referenced blob is present.
pub fn read_oci_layout(dir: &Path) -> Result<OciLayout, String> {
    verify_blob_files(dir)?;
    let index: Value = read_json(&dir.join("index.json"))?;
    let top = index["manifests"]
        .get(0)
        .ok_or("index.json lists no manifest")?;
    let mut layout = OciLayout {
        manifest_digest: text(top, "digest")?,
        media_type: text(top, "mediaType")?,
        manifests: Vec::new(),
        blobs: Vec::new(),
    };
    let manifest = read_json(&blob_path(dir, &layout.manifest_digest))?;
    match manifest.get("manifests").and_then(Value::as_array) {
        Some(children) => {
            for child in children {
                let digest = text(child, "digest")?;
                let path = blob_path(dir, &digest);
                if path.exists() {
                    layout.blobs.extend(image_blobs(dir, &read_json(&path)?)?);
                    layout.manifests.push(digest);
                }
            }
        }
        None => layout.blobs = image_blobs(dir, &manifest)?,
    }
    Ok(layout)
}

/// Config then layers of one image manifest, each checked to be on disk.
fn image_blobs(dir: &Path, manifest: &Value) -> Result<Vec<String>, String> {
    let layers = manifest["layers"]
        .as_array()
        .ok_or("manifest has no layers")?;
    let mut blobs = vec![text(&manifest["config"], "digest")?];
    for layer in layers {
        blobs.push(text(layer, "digest")?);
    }
    match blobs.iter().find(|d| !blob_path(dir, d).exists()) {
        Some(missing) => Err(format!("blob {missing} referenced but not in layout")),
        None => Ok(blobs),
    }
}

fn verify_blob_files(dir: &Path) -> Result<(), String> {
    let blobs = dir.join("blobs/sha256");
    let entries = std::fs::read_dir(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if sha256_digest(&bytes) != format!("sha256:{name}") {
            return Err(format!(
                "blob file {} does not hash to its name",
                path.display()
            ));
        }
    }
    Ok(())
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn text(value: &Value, key: &str) -> Result<String, String> {
    match value.get(key).and_then(Value::as_str) {
        Some(s) => Ok(s.to_owned()),
        None => Err(format!("missing string {key:?} in {value}")),
    }
}
