//! The content-addressed disk store: `<dir>/blobs/sha256/ab/<hex>` for layers and configs,
//! `<dir>/manifests/sha256/ab/<hex>` (plus a `<hex>.type` media-type sidecar) for manifests,
//! and `<dir>/tags/<upstream>/<repository>/@<tag>@<accept class>` for the last known tag
//! mappings (`<dir>/origins/`, where objects came from, is `cache::origins`).
//!
//! Content enters only through a temp file under `<dir>/tmp` that is fsynced and renamed into
//! place after its digest was checked by the caller, so a path under `blobs/` or `manifests/`
//! always holds exactly the bytes its name promises. This module does blocking file I/O; callers
//! run it on the blocking pool. It keeps no index: `cache::index` does.
//!
//! A commit and a removal of the same digest are serialised (`stripes`), and a removal names
//! the file it means by its inode (`remove_if`): an eviction or purge decided before a fill
//! committed the digest again never deletes the new file. Nothing here follows a symlink
//! found inside the cache directory: the scans skip anything that is not a plain file or
//! directory, and blobs are opened with `O_NOFOLLOW`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::oci::digest::Digest;

mod tag_files;

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

/// Locks that serialise commits and removals per digest (by its first hash byte).
const STRIPES: usize = 64;

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    temp_seq: AtomicU64,
    stripes: [std::sync::Mutex<()>; STRIPES],
}

/// What a committed object costs the filesystem: its file and (a manifest) its media-type
/// sidecar, in allocated bytes (whole blocks), and the file's inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub allocated: u64,
    pub inode: u64,
}

/// Allocated bytes of a file: its blocks, but never less than its length rounded up to the
/// filesystem's block size (a file written but not yet allocated, under delayed allocation).
fn allocated(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let block = meta.blksize().max(512);
    let rounded = meta.len().div_ceil(block).max(1) * block;
    meta.blocks().saturating_mul(512).max(rounded)
}

/// What an object's provenance file (`cache::origins`, at most 64 KiB, usually under 1 KiB)
/// is accounted at against `max_size`: one filesystem block.
const ORIGINS_FILE_WEIGHT: u64 = 4096;

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
            stripes: std::array::from_fn(|_| std::sync::Mutex::new(())),
        })
    }

    fn stripe(&self, digest: &Digest) -> std::sync::MutexGuard<'_, ()> {
        let first = u8::from_str_radix(&digest.hex()[..2], 16).unwrap_or(0);
        self.stripes[usize::from(first) % STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The allocated bytes and inode of a committed object (the sidecar's bytes included),
    /// without following a symlink.
    pub fn footprint(&self, kind: Kind, digest: &Digest) -> io::Result<Footprint> {
        let meta = fs::symlink_metadata(self.path(kind, digest))?;
        // Every committed object also gets its provenance file (`cache::origins`), written just
        // after it is indexed, so it is counted here as the one block it takes.
        let mut allocated = allocated(&meta) + ORIGINS_FILE_WEIGHT;
        if kind == Kind::Manifest {
            if let Ok(sidecar) = fs::symlink_metadata(self.type_path(digest)) {
                allocated += self::allocated(&sidecar);
            }
        }
        use std::os::unix::fs::MetadataExt;
        Ok(Footprint {
            allocated,
            inode: meta.ino(),
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
        let _serialised = self.stripe(digest);
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
        // The sidecar too goes through a temp file: a crash never leaves half a type behind.
        let type_path = self.type_path(digest);
        let (type_temp, mut type_file) = self.temp_file()?;
        if let Err(err) = type_file.write_all(media_type.as_bytes()) {
            let _ = fs::remove_file(&type_temp);
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        fs::create_dir_all(type_path.parent().expect("store paths have a parent"))?;
        fs::rename(&type_temp, &type_path)?;
        self.commit(&temp, Kind::Manifest, digest)
    }

    /// A manifest's bytes. Its media type is read from the document by the caller; the
    /// `.type` sidecar is informational only, so a missing or bad one changes nothing.
    pub fn read_manifest(&self, digest: &Digest) -> io::Result<Vec<u8>> {
        fs::read(self.path(Kind::Manifest, digest))
    }

    /// The `.type` sidecar, if it holds a media type; anything else counts as no sidecar.
    fn read_type(&self, digest: &Digest) -> Option<String> {
        // `read_plain`: a sidecar that is a symlink or oversized is treated as missing.
        let text = read_plain(&self.type_path(digest)).ok()?;
        crate::oci::manifest::is_media_type(&text).then_some(text)
    }

    pub fn open_blob(&self, kind: Kind, digest: &Digest) -> io::Result<File> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(self.path(kind, digest), flags, Mode::empty())?;
        Ok(File::from(fd))
    }

    pub fn remove(&self, kind: Kind, digest: &Digest) -> io::Result<()> {
        let _serialised = self.stripe(digest);
        self.remove_locked(kind, digest)
    }

    fn remove_locked(&self, kind: Kind, digest: &Digest) -> io::Result<()> {
        if kind == Kind::Manifest {
            let _ = fs::remove_file(self.type_path(digest));
        }
        // Where it came from goes with it (`cache::origins`); for a digest cached as both kinds
        // that forgets a little more than needed, which only costs a re-confirmation.
        let _ = fs::remove_file(origins_path(&self.dir, digest));
        match fs::remove_file(self.path(kind, digest)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Removes the object only if its file is still `inode`, the one the caller decided to
    /// remove; a file committed since (a new fill of the digest) stays. Returns whether it
    /// removed anything.
    pub fn remove_if(&self, kind: Kind, digest: &Digest, inode: u64) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let _serialised = self.stripe(digest);
        match fs::symlink_metadata(self.path(kind, digest)) {
            Ok(meta) if meta.ino() == inode => self.remove_locked(kind, digest).map(|()| true),
            Ok(_) => Ok(false),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Records an access in the file's mtime; best effort, recency is a hint.
    pub fn touch(&self, kind: Kind, digest: &Digest) {
        if let Ok(file) = File::options().write(true).open(self.path(kind, digest)) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Everything committed on disk. Files whose name is not a digest are removed: only this
    /// module writes here, so they are debris. Entries that cannot be read, and anything that
    /// is not a plain file (a symlink above all), are logged and skipped.
    pub fn scan(&self) -> io::Result<Vec<Found>> {
        let mut found = Vec::new();
        for kind in [Kind::Blob, Kind::Manifest] {
            let root = self.dir.join(kind.dir_name()).join("sha256");
            for shard in fs::read_dir(&root)? {
                let Some((shard, file_type)) = listed(&root, shard) else {
                    continue;
                };
                if !file_type.is_dir() {
                    skip_stray(&shard.path(), "not a directory");
                    continue;
                }
                let entries = match fs::read_dir(shard.path()) {
                    Ok(entries) => entries,
                    Err(err) => {
                        let path = shard.path();
                        tracing::warn!(path = %path.display(), %err, "skipping unreadable cache directory");
                        continue;
                    }
                };
                for entry in entries {
                    let Some((entry, file_type)) = listed(&shard.path(), entry) else {
                        continue;
                    };
                    if !file_type.is_file() {
                        skip_stray(&entry.path(), "not a plain file");
                        continue;
                    }
                    match self.scan_entry(kind, &entry) {
                        Ok(Some(object)) => found.push(object),
                        Ok(None) => {}
                        Err(err) => {
                            let path = entry.path();
                            tracing::warn!(path = %path.display(), %err, "skipping unreadable cache file");
                        }
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
            Kind::Manifest => self.read_type(&digest),
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

/// A directory entry and its type (not following symlinks), or `None`, logged, if it cannot
/// be read.
fn listed(dir: &Path, entry: io::Result<fs::DirEntry>) -> Option<(fs::DirEntry, fs::FileType)> {
    let read = entry.and_then(|entry| entry.file_type().map(|kind| (entry, kind)));
    match read {
        Ok(read) => Some(read),
        Err(err) => {
            tracing::warn!(dir = %dir.display(), %err, "skipping unreadable cache entry");
            None
        }
    }
}

fn skip_stray(path: &Path, why: &str) {
    tracing::warn!(path = %path.display(), why, "skipping stray entry in the cache directory");
}

/// A small text file's contents, refusing a symlink or anything else that is not a plain
/// file, and anything over 4 KiB.
fn read_plain(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a small plain file",
        ));
    }
    let mut text = String::new();
    File::open(path)?.take(4096).read_to_string(&mut text)?;
    Ok(text)
}

/// Where the sidecar of what is known about a digest's origins lives (`cache::origins`
/// reads and writes it; removing an object removes it too).
pub fn origins_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join("origins").join("sha256").join(&hex[..2]).join(hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tags::{TagEntry, TagKey};
    use crate::oci::accept::AcceptClass;
    use crate::oci::name::{Repository, Tag};

    #[test]
    fn tag_mappings_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = TagKey {
            upstream: "127.0.0.1:5000".into(),
            repository: Repository::parse("team/app").unwrap(),
            tag: Tag::parse("v1.2").unwrap(),
            accept: AcceptClass::parse("application/vnd.oci.image.index.v1+json"),
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
        let bytes = store.read_manifest(&manifest_digest).unwrap();
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

    #[test]
    fn start_up_skips_strays_and_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        fs::write(&secret, b"not cache content").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (temp, mut file) = store.temp_file().unwrap();
        file.write_all(b"real").unwrap();
        let real = Digest::of(b"real");
        store.commit(&temp, Kind::Blob, &real).unwrap();
        // A symlink named as a digest, pointing out of the cache.
        let planted = Digest::of(b"not cache content");
        let link = store.path(Kind::Blob, &planted);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        // A manifest whose media-type sidecar is a symlink.
        let manifest = Digest::of(b"{}");
        let manifest_path = store.path(Kind::Manifest, &manifest);
        fs::create_dir_all(manifest_path.parent().unwrap()).unwrap();
        fs::write(&manifest_path, b"{}").unwrap();
        std::os::unix::fs::symlink(&secret, store.type_path(&manifest)).unwrap();
        // Stray files where directories belong, and a symlinked shard directory.
        fs::write(dir.path().join("blobs/sha256/stray"), b"x").unwrap();
        fs::write(dir.path().join("tags/stray-upstream"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("manifests/sha256/ff")).unwrap();
        fs::create_dir_all(dir.path().join("tags/up/repo")).unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("tags/up/repo/@latest")).unwrap();

        let store = Store::open(dir.path()).unwrap();
        let found = store.scan().expect("start-up survives strays");
        let digests: Vec<&Digest> = found.iter().map(|f| &f.digest).collect();
        // The manifest is found (its type comes from the document when it is read), but its
        // symlinked sidecar is not read through the link.
        assert_eq!(
            digests,
            [&real, &manifest],
            "only the real objects are found"
        );
        assert_eq!(
            found[1].media_type, None,
            "a symlinked sidecar is not followed"
        );
        assert!(store.scan_tags().expect("tags survive strays").is_empty());
        assert!(
            store.open_blob(Kind::Blob, &planted).is_err(),
            "no open through a symlink"
        );
        assert_eq!(fs::read(&secret).unwrap(), b"not cache content");
    }

    #[test]
    fn a_repository_purge_removes_its_tag_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entry = TagEntry {
            digest: Digest::of(b"m"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_ms: 1,
        };
        let key = |repository: &str, tag: &str| TagKey {
            upstream: "up".into(),
            repository: Repository::parse(repository).unwrap(),
            tag: Tag::parse(tag).unwrap(),
            accept: AcceptClass::parse(""),
        };
        for (repository, tag) in [("team", "a"), ("team", "b"), ("team/app", "a")] {
            store.write_tag(&key(repository, tag), &entry).unwrap();
        }
        let repository = Repository::parse("team").unwrap();
        assert_eq!(store.remove_repository_tags("up", &repository), 2);
        let left: Vec<TagKey> = store
            .scan_tags()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, [key("team/app", "a")]);
    }
}
