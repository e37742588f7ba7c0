//! Has a file changed? A `Stamp` is what `stat` says about one version of a file: modification
//! time, length and inode. Rewriting a file changes the first two; Kubernetes replaces a mounted
//! Secret or ConfigMap with a new file (rename), which changes the inode even when time and
//! length happen to match. Used by everything berth re-reads on change: pull secrets, access
//! principals and policies, and the TLS certificate and key.

use std::path::Path;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    pub fn of(path: &Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        Ok(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: std::os::unix::fs::MetadataExt::ino(&meta),
        })
    }

    /// The file's length in bytes.
    pub(crate) fn file_len(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_or_a_replacement_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").unwrap();
        let first = Stamp::of(&path).unwrap();
        assert_eq!(Stamp::of(&path).unwrap(), first);
        std::fs::write(&path, b"three").unwrap();
        let rewritten = Stamp::of(&path).unwrap();
        assert_ne!(rewritten, first, "a new length");
        // Same length, same contents, new inode: still a change.
        let replacement = dir.path().join("g");
        std::fs::write(&replacement, b"three").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        assert_ne!(Stamp::of(&path).unwrap(), rewritten);
        assert!(Stamp::of(&dir.path().join("missing")).is_err());
    }
}
