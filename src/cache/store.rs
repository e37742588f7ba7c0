//! The content-addressed disk store: `<dir>/blobs/sha256/ab/<hex>` for layers and configs,
//! `<dir>/manifests/sha256/ab/<hex>` (plus a `<hex>.type` media-type sidecar) for manifests,
//! and `<dir>/tags/<upstream>/<repository>/@<tag>` for the last known tag mappings
//! (`<dir>/origins/`, where objects came from, is `cache::origins`).
//!
//! Content enters only through a temp file under `<dir>/tmp` that is fsynced and renamed into
//! place after its digest was checked by the caller, so a path under `blobs/` or `manifests/`
//! always holds exactly the bytes its name promises. This module does blocking file I/O; callers
//! run it on the blocking pool. It keeps no index: `cache::index` does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::tags::{TagEntry, TagKey};
use crate::oci::digest::Digest;
use crate::oci::name::{Repository, Tag};

/// Which tree an object lives in; manifests carry a media type, blobs do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    fn dir_name(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }
}

/// One object found on disk at start-up.
#[derive(Debug, Clone)]
pub struct Found {
    pub kind: Kind,
    pub digest: Digest,
    pub size: u64,
    pub media_type: Option<String>,
    /// Last access as recorded in the file's mtime, so recency survives a restart.
    pub touched: SystemTime,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    temp_seq: AtomicU64,
}

impl Store {
    /// Creates the tree if needed and removes temp files left by a crash: they were never
    /// verified, so nothing may serve them.
    pub fn open(dir: &Path) -> io::Result<Store> {
        for sub in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        for entry in fs::read_dir(dir.join("tmp"))? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            temp_seq: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, kind: Kind, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir
            .join(kind.dir_name())
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    fn type_path(&self, digest: &Digest) -> PathBuf {
        let mut path = self.path(Kind::Manifest, digest).into_os_string();
        path.push(".type");
        PathBuf::from(path)
    }

    /// A new, empty temp file on the store's filesystem, so the final rename is atomic.
    pub fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{}-{}", std::process::id(), seq, rand::random::<u32>());
        let path = self.dir.join("tmp").join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Moves a verified, fsynced temp file into place and makes the rename durable.
    pub fn commit(&self, temp: &Path, kind: Kind, digest: &Digest) -> io::Result<()> {
        let parent = self.commit_unsynced(temp, kind, digest)?;
        File::open(parent)?.sync_all()
    }

    /// The rename alone, for bulk loads (benchmarks, imports) that sync once at the end.
    pub fn commit_unsynced(&self, temp: &Path, kind: Kind, digest: &Digest) -> io::Result<PathBuf> {
        let target = self.path(kind, digest);
        let parent = target
            .parent()
            .expect("store paths have a parent")
            .to_path_buf();
        fs::create_dir_all(&parent)?;
        fs::rename(temp, &target)?;
        Ok(parent)
    }

    /// Writes a whole manifest (already verified by the caller) with its media type.
    pub fn write_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> io::Result<()> {
        let (temp, mut file) = self.temp_file()?;
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        if let Err(err) = written {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        let type_path = self.type_path(digest);
        fs::create_dir_all(type_path.parent().expect("store paths have a parent"))?;
        fs::write(&type_path, media_type)?;
        self.commit(&temp, Kind::Manifest, digest)
    }

    pub fn read_manifest(&self, digest: &Digest) -> io::Result<(Vec<u8>, String)> {
        let bytes = fs::read(self.path(Kind::Manifest, digest))?;
        let media_type = fs::read_to_string(self.type_path(digest))?;
        Ok((bytes, media_type))
    }

    pub fn open_blob(&self, kind: Kind, digest: &Digest) -> io::Result<File> {
        File::open(self.path(kind, digest))
    }

    pub fn remove(&self, kind: Kind, digest: &Digest) -> io::Result<()> {
        if kind == Kind::Manifest {
            let _ = fs::remove_file(self.type_path(digest));
        }
        // Where it came from goes with it (`cache::origins`); for a digest cached as both kinds
        // that forgets a little more than needed, which only costs a re-confirmation.
        let _ = fs::remove_file(super::origins::Origins::path(&self.dir, digest));
        match fs::remove_file(self.path(kind, digest)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Records an access in the file's mtime; best effort, recency is a hint.
    pub fn touch(&self, kind: Kind, digest: &Digest) {
        if let Ok(file) = File::options().write(true).open(self.path(kind, digest)) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    fn tag_path(&self, key: &TagKey) -> Option<PathBuf> {
        // Upstream names come from config or a host pattern; refuse anything path-like anyway.
        let upstream = &*key.upstream;
        if upstream.is_empty() || upstream.contains('/') || upstream.starts_with('.') {
            return None;
        }
        let mut path = self.dir.join("tags").join(upstream);
        for component in key.repository.components() {
            path.push(component);
        }
        path.push(format!("@{}", key.tag.as_str()));
        Some(path)
    }

    /// Records a tag mapping (digest, media type, when it was checked) atomically.
    pub fn write_tag(&self, key: &TagKey, entry: &TagEntry) -> io::Result<()> {
        let Some(path) = self.tag_path(key) else {
            return Ok(());
        };
        let text = format!(
            "{}\n{}\n{}\n",
            entry.digest, entry.media_type, entry.checked_ms
        );
        let (temp, mut file) = self.temp_file()?;
        if let Err(err) = file.write_all(text.as_bytes()) {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        fs::create_dir_all(path.parent().expect("tag paths have a parent"))?;
        fs::rename(&temp, &path)
    }

    pub fn remove_tag(&self, key: &TagKey) {
        if let Some(path) = self.tag_path(key) {
            let _ = fs::remove_file(path);
        }
    }

    /// Every persisted tag mapping; unreadable or malformed files are removed.
    pub fn scan_tags(&self) -> io::Result<Vec<(TagKey, TagEntry)>> {
        let root = self.dir.join("tags");
        let mut found = Vec::new();
        for upstream in fs::read_dir(&root)? {
            let upstream = upstream?;
            let name = upstream.file_name().to_string_lossy().into_owned();
            let mut pending = vec![(upstream.path(), String::new())];
            while let Some((dir, repository)) = pending.pop() {
                for entry in fs::read_dir(&dir)? {
                    let entry = entry?;
                    let file_name = entry.file_name().to_string_lossy().into_owned();
                    if entry.file_type()?.is_dir() {
                        let nested = match repository.is_empty() {
                            true => file_name,
                            false => format!("{repository}/{file_name}"),
                        };
                        pending.push((entry.path(), nested));
                    } else if let Some(tag) = file_name.strip_prefix('@') {
                        match read_tag(&entry.path(), &name, &repository, tag) {
                            Some(mapping) => found.push(mapping),
                            None => {
                                let _ = fs::remove_file(entry.path());
                            }
                        }
                    }
                }
            }
        }
        Ok(found)
    }

    /// Everything committed on disk. Files whose name is not a digest are removed: only this
    /// module writes here, so they are debris.
    pub fn scan(&self) -> io::Result<Vec<Found>> {
        let mut found = Vec::new();
        for kind in [Kind::Blob, Kind::Manifest] {
            let root = self.dir.join(kind.dir_name()).join("sha256");
            for shard in fs::read_dir(&root)? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for entry in fs::read_dir(shard.path())? {
                    if let Some(object) = self.scan_entry(kind, &entry?)? {
                        found.push(object);
                    }
                }
            }
        }
        Ok(found)
    }

    fn scan_entry(&self, kind: Kind, entry: &fs::DirEntry) -> io::Result<Option<Found>> {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind == Kind::Manifest && name.ends_with(".type") {
            return Ok(None);
        }
        let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
            let _ = fs::remove_file(entry.path());
            return Ok(None);
        };
        let meta = entry.metadata()?;
        let media_type = match kind {
            Kind::Blob => None,
            Kind::Manifest => match fs::read_to_string(self.type_path(&digest)) {
                Ok(media_type) => Some(media_type),
                // A manifest without its media type cannot be served faithfully.
                Err(_) => {
                    let _ = fs::remove_file(entry.path());
                    return Ok(None);
                }
            },
        };
        Ok(Some(Found {
            kind,
            digest,
            size: meta.len(),
            media_type,
            touched: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        }))
    }
}

fn read_tag(
    path: &Path,
    upstream: &str,
    repository: &str,
    tag: &str,
) -> Option<(TagKey, TagEntry)> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let digest = Digest::parse(lines.next()?).ok()?;
    let media_type = lines.next().filter(|m| !m.is_empty())?;
    let checked_ms = lines.next()?.parse().ok()?;
    let key = TagKey {
        upstream: upstream.into(),
        repository: Repository::parse(repository).ok()?,
        tag: Tag::parse(tag).ok()?,
    };
    let entry = TagEntry {
        digest,
        media_type: media_type.into(),
        checked_ms,
    };
    Some((key, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_mappings_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = TagKey {
            upstream: "127.0.0.1:5000".into(),
            repository: Repository::parse("team/app").unwrap(),
            tag: Tag::parse("v1.2").unwrap(),
        };
        let entry = TagEntry {
            digest: Digest::of(b"m"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_ms: 1234,
        };
        store.write_tag(&key, &entry).unwrap();
        fs::write(
            dir.path().join("tags/127.0.0.1:5000/team/@broken"),
            "nonsense",
        )
        .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let found = store.scan_tags().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, key);
        assert_eq!(
            (found[0].1.digest.clone(), found[0].1.checked_ms),
            (entry.digest, 1234)
        );
        assert!(!dir.path().join("tags/127.0.0.1:5000/team/@broken").exists());
    }

    #[test]
    fn open_removes_temp_leftovers_and_scan_finds_committed_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (temp, mut file) = store.temp_file().unwrap();
        file.write_all(b"hello").unwrap();
        let digest = Digest::of(b"hello");
        store.commit(&temp, Kind::Blob, &digest).unwrap();
        let manifest = br#"{"schemaVersion":2}"#;
        let manifest_digest = Digest::of(manifest);
        store
            .write_manifest(
                &manifest_digest,
                "application/vnd.oci.image.manifest.v1+json",
                manifest,
            )
            .unwrap();
        let (_leftover, mut file) = store.temp_file().unwrap();
        file.write_all(b"half a blob").unwrap();

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let mut found = store.scan().unwrap();
        found.sort_by_key(|f| f.size);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].kind, &found[0].digest, found[0].size),
            (Kind::Blob, &digest, 5)
        );
        assert_eq!(found[1].kind, Kind::Manifest);
        assert_eq!(
            found[1].media_type.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        let (bytes, _) = store.read_manifest(&manifest_digest).unwrap();
        assert_eq!(bytes, manifest);
    }

    #[test]
    fn scan_drops_files_that_are_not_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let junk = dir.path().join("blobs/sha256/ab");
        fs::create_dir_all(&junk).unwrap();
        fs::write(junk.join("not-a-digest"), b"x").unwrap();
        assert!(store.scan().unwrap().is_empty());
        assert!(!junk.join("not-a-digest").exists());
    }
}
