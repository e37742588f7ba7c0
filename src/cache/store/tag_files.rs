//! The tag mappings on disk, beside the objects: one small file per (upstream, repository,
//! tag, Accept class) under `tags/`, written atomically, read back at start-up. What a tag
//! means in memory is `cache::tags`'.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{listed, read_plain, skip_stray, Store};
use crate::cache::tags::{TagEntry, TagKey};
use crate::oci::accept::AcceptClass;
use crate::oci::digest::Digest;
use crate::oci::name::{Repository, Tag};

impl Store {
    /// Removes the persisted tag mappings of one repository (not of repositories nested
    /// under it), so a purge survives a restart. Returns how many files went.
    pub fn remove_repository_tags(&self, upstream: &str, repository: &Repository) -> usize {
        let probe = TagKey {
            upstream: upstream.into(),
            repository: repository.clone(),
            tag: Tag::parse("x").expect("a valid tag"),
            accept: AcceptClass::parse(""),
        };
        let Some(dir) = self
            .tag_path(&probe)
            .and_then(|p| p.parent().map(Path::to_path_buf))
        else {
            return 0;
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with('@'))
            .filter(|entry| fs::remove_file(entry.path()).is_ok())
            .count()
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
        // `@<tag>@<class>`: a tag never holds `@`.
        path.push(format!("@{}@{}", key.tag.as_str(), key.accept.to_hex()));
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

    /// Every persisted tag mapping; malformed files are removed. Unreadable entries are
    /// logged and skipped, and symlinks are neither followed nor read.
    pub fn scan_tags(&self) -> io::Result<Vec<(TagKey, TagEntry)>> {
        let root = self.dir.join("tags");
        let mut found = Vec::new();
        for upstream in fs::read_dir(&root)? {
            let Some((upstream, kind)) = listed(&root, upstream) else {
                continue;
            };
            if !kind.is_dir() {
                skip_stray(&upstream.path(), "not a directory");
                continue;
            }
            let name = upstream.file_name().to_string_lossy().into_owned();
            let mut pending = vec![(upstream.path(), String::new())];
            while let Some((dir, repository)) = pending.pop() {
                let entries = match fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(err) => {
                        tracing::warn!(path = %dir.display(), %err, "skipping unreadable cache directory");
                        continue;
                    }
                };
                for entry in entries {
                    let Some((entry, kind)) = listed(&dir, entry) else {
                        continue;
                    };
                    let file_name = entry.file_name().to_string_lossy().into_owned();
                    if kind.is_dir() {
                        let nested = match repository.is_empty() {
                            true => file_name,
                            false => format!("{repository}/{file_name}"),
                        };
                        pending.push((entry.path(), nested));
                    } else if !kind.is_file() {
                        skip_stray(&entry.path(), "not a plain file");
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
}

fn read_tag(
    path: &Path,
    upstream: &str,
    repository: &str,
    tag: &str,
) -> Option<(TagKey, TagEntry)> {
    let text = read_plain(path).ok()?;
    let mut lines = text.lines();
    let digest = Digest::parse(lines.next()?).ok()?;
    let media_type = lines.next().filter(|m| !m.is_empty())?;
    let checked_ms = lines.next()?.parse().ok()?;
    // Files from before tags were keyed by Accept class have no class: dropped, refetched.
    let (tag, accept) = tag.split_once('@')?;
    let key = TagKey {
        upstream: upstream.into(),
        repository: Repository::parse(repository).ok()?,
        tag: Tag::parse(tag).ok()?,
        accept: AcceptClass::from_hex(accept)?,
    };
    let entry = TagEntry {
        digest,
        media_type: media_type.into(),
        checked_ms,
    };
    Some((key, entry))
}
