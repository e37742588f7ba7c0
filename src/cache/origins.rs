//! Where each cached object came from, and which repositories are known to hold it: the facts
//! the policy access mode serves content by (`access::holdings` holds the rule itself).
//!
//! An `Origin` per digest lists the upstreams that served bytes verified against the digest
//! (its provenance) and the (upstream, repository) pairs known to hold it (its holders). It lives
//! in memory (bounded, LRU) and, for objects in the cache, in a sidecar file
//! `<dir>/origins/sha256/ab/<hex>`, so it survives a restart:
//!
//! ```text
//! berth-origin 1
//! from <upstream>
//! held <upstream> <repository>
//! sum <sha256 of the lines above>
//! ```
//!
//! A sidecar is written whole to a temp file and renamed into place, and is removed with its
//! object (`Store::remove`); start-up removes any whose object is gone. Anything wrong with a
//! sidecar (too big, a bad line, a wrong sum) makes it absent: the object is then served only
//! after the upstream is asked again, never more freely. Knowledge about digests that are not
//! cached stays in memory, so a hostile manifest listing millions of digests costs no disk.
//!
//! Deliberately not here: deciding what to serve, and asking upstreams.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use super::store::Store;
use crate::oci::digest::Digest;
use crate::oci::name::Repository;

/// Upstreams remembered per object; the same bytes rarely come from more than a few.
pub const MAX_FROM: usize = 16;
/// Holders remembered per object (the oldest is dropped first: it is re-confirmed when asked
/// for again). A base layer shared by many repositories is the case this bounds.
pub const MAX_HELD: usize = 128;
/// A sidecar at its limits is well under this; a larger file is not read.
const MAX_SIDECAR: u64 = 64 * 1024;
/// Origins kept in memory, counted in entries (`from` + `held` lines, at least one each): a
/// few hundred bytes each at worst (a long repository name), so tens of MiB at most.
const MAX_MEMORY_ENTRIES: u64 = 250_000;
/// Upstream names are config names or hosts; anything longer is not one of ours.
const MAX_UPSTREAM_LEN: usize = 255;
const MAGIC: &str = "berth-origin 1";

/// The known facts about one digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Upstreams that served bytes verified against the digest, oldest first.
    pub from: Vec<Arc<str>>,
    /// (upstream, repository) pairs known to hold the digest, oldest first.
    pub held: Vec<(Arc<str>, Repository)>,
    /// Whether the sidecar on disk says all of this (not part of the sidecar itself).
    saved: bool,
}

impl Origin {
    pub fn served_by(&self, upstream: &str) -> bool {
        self.from.iter().any(|u| &**u == upstream)
    }

    pub fn held_by(&self, upstream: &str, repository: &Repository) -> bool {
        self.held
            .iter()
            .any(|(u, r)| &**u == upstream && r == repository)
    }

    /// Adds what is new; returns whether anything was.
    fn add(&mut self, from: Option<&str>, held: Option<(&str, &Repository)>) -> bool {
        let mut changed = false;
        if let Some(upstream) = from.filter(|u| !self.served_by(u)) {
            if self.from.len() >= MAX_FROM {
                self.from.remove(0);
            }
            self.from.push(upstream.into());
            changed = true;
        }
        if let Some((upstream, repository)) = held.filter(|(u, r)| !self.held_by(u, r)) {
            if self.held.len() >= MAX_HELD {
                self.held.remove(0);
            }
            self.held.push((upstream.into(), repository.clone()));
            changed = true;
        }
        changed
    }

    fn weight(&self) -> u32 {
        (self.from.len() + self.held.len()).max(1) as u32
    }

    /// The sidecar text, checksum included.
    pub fn encode(&self) -> String {
        let mut text = format!("{MAGIC}\n");
        for upstream in &self.from {
            text.push_str(&format!("from {upstream}\n"));
        }
        for (upstream, repository) in &self.held {
            text.push_str(&format!("held {upstream} {repository}\n"));
        }
        let sum = hex::encode(Sha256::digest(text.as_bytes()));
        text.push_str(&format!("sum {sum}\n"));
        text
    }

    /// Reads a sidecar; `None` for anything that is not exactly what `encode` writes.
    pub fn decode(bytes: &[u8]) -> Option<Origin> {
        if bytes.len() as u64 > MAX_SIDECAR {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let body = text.strip_suffix('\n')?;
        let (body, sum_line) = body.rsplit_once('\n')?;
        let body = format!("{body}\n");
        let sum = sum_line.strip_prefix("sum ")?;
        if hex::encode(Sha256::digest(body.as_bytes())) != sum {
            return None;
        }
        let mut lines = body.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut origin = Origin::default();
        for line in lines {
            let mut words = line.split(' ');
            match (words.next()?, words.next(), words.next(), words.next()) {
                ("from", Some(upstream), None, None) if plain_upstream(upstream) => {
                    origin.add(Some(upstream), None);
                }
                ("held", Some(upstream), Some(repository), None) if plain_upstream(upstream) => {
                    let repository = Repository::parse(repository).ok()?;
                    origin.add(None, Some((upstream, &repository)));
                }
                _ => return None,
            }
        }
        Some(origin)
    }
}

/// An upstream name that fits a sidecar line.
fn plain_upstream(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_UPSTREAM_LEN && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Every digest's origin: memory in front of the sidecars.
pub struct Origins {
    store: Arc<Store>,
    memory: moka::sync::Cache<Digest, Arc<Origin>>,
    /// Held while an origin is changed and written, so two updates of one digest cannot
    /// write their snapshots out of order. Updates are rare (new knowledge only) and small.
    writing: Mutex<()>,
}

impl Origins {
    pub fn new(store: Arc<Store>) -> Origins {
        Origins {
            store,
            memory: moka::sync::Cache::builder()
                .max_capacity(MAX_MEMORY_ENTRIES)
                .weigher(|_, origin: &Arc<Origin>| origin.weight())
                .build(),
            writing: Mutex::new(()),
        }
    }

    /// Where a digest's sidecar lives.
    pub fn path(dir: &Path, digest: &Digest) -> PathBuf {
        super::store::origins_path(dir, digest)
    }

    /// What is known about `digest`, from memory or its sidecar. Blocking on a memory miss.
    pub fn get(&self, digest: &Digest) -> Arc<Origin> {
        if let Some(origin) = self.memory.get(digest) {
            return origin;
        }
        let origin = Arc::new(self.read(digest).unwrap_or_default());
        self.memory.insert(digest.clone(), Arc::clone(&origin));
        origin
    }

    /// The same without touching the disk: `None` when memory does not know.
    pub fn get_cached(&self, digest: &Digest) -> Option<Arc<Origin>> {
        self.memory.get(digest)
    }

    /// Records that `upstream` served bytes verified as `digest` through `repository`, and
    /// writes the sidecar when `persist` (the object is in the cache). Blocking.
    pub fn fetched(&self, digest: &Digest, upstream: &str, repository: &Repository, persist: bool) {
        self.update(digest, Some(upstream), (upstream, repository), persist);
    }

    /// Records that `repository` on `upstream` holds `digest` (learned from one of its
    /// manifests, or confirmed by the upstream). Blocking.
    pub fn learned(&self, digest: &Digest, upstream: &str, repository: &Repository, persist: bool) {
        self.update(digest, None, (upstream, repository), persist);
    }

    fn update(
        &self,
        digest: &Digest,
        from: Option<&str>,
        held: (&str, &Repository),
        persist: bool,
    ) {
        if !plain_upstream(held.0) {
            return;
        }
        // An object not in the cache has no sidecar (it went with the object): memory only, so
        // a manifest listing many digests costs no disk reads.
        let known = match persist {
            true => self.get(digest),
            false => self.memory.get(digest).unwrap_or_default(),
        };
        let new = !from.is_none_or(|u| known.served_by(u)) || !known.held_by(held.0, held.1);
        if !new && (!persist || known.saved) {
            return;
        }
        let _writing = self.writing.lock().expect("origins lock");
        // Read again under the lock: another update may have landed since.
        let mut origin = match persist {
            true => (*self.get(digest)).clone(),
            false => self
                .memory
                .get(digest)
                .map(|o| (*o).clone())
                .unwrap_or_default(),
        };
        if origin.add(from, Some(held)) {
            origin.saved = false;
        }
        if persist && !origin.saved {
            match self.write(digest, &origin) {
                Ok(()) => origin.saved = true,
                Err(err) => {
                    tracing::warn!(%digest, %err, "cannot persist where an object came from")
                }
            }
        }
        self.memory.insert(digest.clone(), Arc::new(origin));
    }

    fn read(&self, digest: &Digest) -> Option<Origin> {
        use std::io::Read as _;
        let file = fs::File::open(Self::path(self.store.dir(), digest)).ok()?;
        let mut bytes = Vec::new();
        file.take(MAX_SIDECAR + 1).read_to_end(&mut bytes).ok()?;
        let mut origin = Origin::decode(&bytes)?;
        origin.saved = true;
        Some(origin)
    }

    fn write(&self, digest: &Digest, origin: &Origin) -> io::Result<()> {
        let path = Self::path(self.store.dir(), digest);
        let (temp, mut file) = self.store.temp_file()?;
        if let Err(err) = file.write_all(origin.encode().as_bytes()) {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        fs::create_dir_all(path.parent().expect("sidecar paths have a parent"))?;
        fs::rename(&temp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
    }

    /// Removes sidecars whose object is not cached (an eviction that raced an update, a crash)
    /// and anything else that is not a sidecar. At start-up, after the index is rebuilt.
    pub fn sweep(&self, cached: impl Fn(&Digest) -> bool) -> io::Result<()> {
        let root = self.store.dir().join("origins").join("sha256");
        fs::create_dir_all(&root)?;
        for shard in fs::read_dir(&root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                let _ = fs::remove_file(shard.path());
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let keep = Digest::parse(&format!("sha256:{}", name.to_string_lossy()))
                    .is_ok_and(|digest| cached(&digest));
                if !keep {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str) -> Repository {
        Repository::parse(name).unwrap()
    }

    #[test]
    fn origins_of_cached_objects_survive_a_reopen_and_others_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let origins = Origins::new(Arc::clone(&store));
        let (cached, learned) = (Digest::of(b"cached"), Digest::of(b"learned"));
        origins.fetched(&cached, "victim.io", &repo("team/app"), true);
        origins.learned(&cached, "victim.io", &repo("team/other"), true);
        origins.learned(&learned, "evil.io", &repo("evil/app"), false);
        assert!(origins.get(&learned).held_by("evil.io", &repo("evil/app")));

        let reopened = Origins::new(store);
        let origin = reopened.get(&cached);
        assert_eq!(&*origin.from, [Arc::<str>::from("victim.io")]);
        assert!(origin.held_by("victim.io", &repo("team/app")));
        assert!(origin.held_by("victim.io", &repo("team/other")));
        assert!(!origin.held_by("evil.io", &repo("team/app")));
        assert_eq!(*reopened.get(&learned), Origin::default());
    }

    #[test]
    fn a_corrupt_or_oversized_sidecar_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let origins = Origins::new(Arc::clone(&store));
        let digest = Digest::of(b"x");
        origins.fetched(&digest, "victim.io", &repo("team/app"), true);
        let path = Origins::path(dir.path(), &digest);
        let good = fs::read_to_string(&path).unwrap();
        let edits = [
            good.replace("team/app", "evil/app"),
            good.replace("victim.io", "evil.io"),
            good.replace("berth-origin 1", "berth-origin 2"),
            good[..good.len() - 5].to_string(),
            String::new(),
            format!("{good}held evil.io evil/app\n"),
            "x".repeat(MAX_SIDECAR as usize + 1),
        ];
        for edit in edits {
            fs::write(&path, &edit).unwrap();
            let fresh = Origins::new(Arc::clone(&store));
            assert_eq!(*fresh.get(&digest), Origin::default(), "{edit:?}");
        }
    }

    #[test]
    fn a_sidecar_holds_at_most_its_bounds_and_round_trips() {
        let mut origin = Origin::default();
        for i in 0..MAX_FROM + 3 {
            origin.add(Some(&format!("u{i}.io")), None);
        }
        for i in 0..MAX_HELD + 3 {
            origin.add(None, Some(("u.io", &repo(&format!("r/{i}")))));
        }
        assert_eq!((origin.from.len(), origin.held.len()), (MAX_FROM, MAX_HELD));
        // The oldest went first.
        assert!(!origin.served_by("u0.io") && origin.served_by("u3.io"));
        let encoded = origin.encode();
        assert!((encoded.len() as u64) < MAX_SIDECAR);
        assert_eq!(Origin::decode(encoded.as_bytes()).unwrap(), origin);
        // Names that could split a line are never written.
        assert!(!plain_upstream("evil.io victim.io"));
        assert!(!plain_upstream("evil\nfrom victim.io"));
    }

    #[test]
    fn sweep_removes_sidecars_of_objects_no_longer_cached_and_removal_takes_them_along() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let origins = Origins::new(Arc::clone(&store));
        let (kept, gone, removed) = (Digest::of(b"k"), Digest::of(b"g"), Digest::of(b"r"));
        for digest in [&kept, &gone, &removed] {
            origins.fetched(digest, "victim.io", &repo("team/app"), true);
        }
        store.remove(super::super::Kind::Blob, &removed).unwrap();
        assert!(!Origins::path(dir.path(), &removed).exists());
        origins.sweep(|digest| *digest == kept).unwrap();
        assert!(Origins::path(dir.path(), &kept).exists());
        assert!(!Origins::path(dir.path(), &gone).exists());
    }
}
