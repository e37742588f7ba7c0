//! A fill's bytes appended to its temp file past the page cache: `O_DIRECT` writes of whole
//! aligned blocks, the final partial block written through the page cache.
//!
//! Why: a buffered write copies every byte into page-cache pages the kernel has just allocated.
//! On a virtual machine whose host takes free guest memory back (free page reporting, a
//! balloon), each such page faults into the host on its first touch: on the 2-core VM of
//! `benches/compare` a buffered 1 GiB write into a new file costs 5-6 CPU-seconds (`dd`; 0.2
//! when the pages happen to be backed), the direct write 0.07. A cold fill is the one writer of
//! its bytes and they are read back (by followers, and by later hits) through the page cache
//! on demand. On a filesystem without `O_DIRECT` (tmpfs before Linux 6.6) it writes buffered.
//!
//! Owns: the order and alignment of the writes, and how many bytes the file holds. Does not own:
//! hashing, publishing, or the bytes readers take from memory meanwhile (`cache::spill`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use bytes::{Buf, Bytes};

/// The alignment `O_DIRECT` asks of buffers, offsets and lengths (a page: enough for any
/// logical block size).
const ALIGN: usize = 4096;
/// One direct write; readers see the file grow by this much at a time.
pub(super) const BLOCK: usize = 1 << 20;

/// Appends a blob's bytes, in order, to its temp file.
pub(super) struct Appender<'f> {
    /// The temp file's ordinary handle: the tail, and every write when direct is unavailable.
    file: &'f File,
    direct: Option<Direct>,
    /// Bytes `[0, len)` are in the file.
    len: u64,
    /// Bytes appended but not yet in the file, oldest first.
    pending: VecDeque<Bytes>,
    pending_len: usize,
}

/// The temp file opened again with `O_DIRECT`, and the aligned block it writes from.
struct Direct {
    file: File,
    buf: Vec<u8>,
    /// Where in `buf` the aligned block starts.
    start: usize,
}

impl<'f> Appender<'f> {
    /// An appender of `file` (at `path`), direct when the filesystem allows it.
    pub(super) fn open(file: &'f File, path: &Path) -> Appender<'f> {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
            .map(|file| {
                let buf = vec![0; BLOCK + ALIGN];
                let start = buf.as_ptr().align_offset(ALIGN);
                Direct { file, buf, start }
            });
        Appender::with(file, direct)
    }

    /// An appender that writes everything through the page cache.
    #[cfg(test)]
    pub(super) fn buffered(file: &'f File) -> Appender<'f> {
        Appender::with(file, None)
    }

    fn with(file: &'f File, direct: Option<Direct>) -> Appender<'f> {
        Appender {
            file,
            direct,
            len: 0,
            pending: VecDeque::new(),
            pending_len: 0,
        }
    }

    /// How many bytes are in the file (readable there).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Appends `chunk`: into the file at once when buffered, else once a whole block is
    /// pending. On an error the file holds `len()` good bytes (the caller keeps the rest).
    pub(super) fn append(&mut self, chunk: Bytes) -> io::Result<()> {
        self.pending_len += chunk.len();
        self.pending.push_back(chunk);
        while self.direct.is_some() && self.pending_len >= BLOCK {
            self.write_block()?;
        }
        match self.direct {
            Some(_) => Ok(()),
            None => self.write_pending(),
        }
    }

    /// Writes what is still pending (the last partial block) through the page cache.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        self.write_pending()
    }

    /// Writes the first `BLOCK` pending bytes with one direct write. A filesystem that
    /// refuses the direct write itself (EINVAL) gets every later byte buffered instead.
    fn write_block(&mut self) -> io::Result<()> {
        let direct = self.direct.as_mut().expect("only called when direct");
        let block = &mut direct.buf[direct.start..direct.start + BLOCK];
        let mut filled = 0;
        for chunk in &self.pending {
            let n = chunk.len().min(BLOCK - filled);
            block[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == BLOCK {
                break;
            }
        }
        match direct.file.write_all_at(block, self.len) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                return Ok(());
            }
            Err(err) => return Err(err),
        }
        self.len += BLOCK as u64;
        self.consume(BLOCK);
        Ok(())
    }

    fn write_pending(&mut self) -> io::Result<()> {
        while let Some(chunk) = self.pending.front() {
            self.file.write_all_at(chunk, self.len)?;
            self.len += chunk.len() as u64;
            self.pending_len -= chunk.len();
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Drops the first `n` pending bytes (now in the file).
    fn consume(&mut self, mut n: usize) {
        self.pending_len -= n;
        while n > 0 {
            let front = self.pending.front_mut().expect("n bytes are pending");
            if front.len() <= n {
                n -= front.len();
                self.pending.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: usize) -> Bytes {
        (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
    }

    /// Appends `sizes` chunks, then finishes; returns what went in and the file's contents.
    fn append_all(appender: &mut Appender, file: &File, sizes: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let mut want = Vec::new();
        for (seed, &size) in sizes.iter().enumerate() {
            let chunk = pattern(size, seed);
            want.extend_from_slice(&chunk);
            appender.append(chunk).unwrap();
            assert_eq!(
                appender.len() + appender.pending_len as u64,
                want.len() as u64
            );
        }
        appender.finish().unwrap();
        let mut got = vec![0; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut got, 0).unwrap();
        (want, got)
    }

    #[test]
    fn chunks_of_any_size_land_in_the_file_in_order_direct_or_not() {
        let sizes = [1, 4095, 70_000, BLOCK, 3 * BLOCK + 17, 12, BLOCK - 1, 5];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("direct");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut direct = Appender::open(&file, &path);
        let (want, got) = append_all(&mut direct, &file, &sizes);
        assert!(
            got == want,
            "direct: {} bytes in, {} out",
            want.len(),
            got.len()
        );
        assert_eq!(direct.len(), want.len() as u64);

        let file = tempfile::tempfile().unwrap();
        let mut buffered = Appender::buffered(&file);
        let (want, got) = append_all(&mut buffered, &file, &sizes);
        assert!(got == want, "buffered");
    }

    #[test]
    fn a_direct_appender_writes_whole_blocks_and_keeps_the_rest_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks");
        let file = File::create_new(&path).unwrap();
        let mut appender = Appender::open(&file, &path);
        if appender.direct.is_none() {
            return; // This filesystem has no O_DIRECT: the buffered case is tested above.
        }
        appender.append(pattern(BLOCK - 1, 0)).unwrap();
        assert_eq!(appender.len(), 0, "nothing written before a whole block");
        appender.append(pattern(10, 1)).unwrap();
        assert_eq!((appender.len(), appender.pending_len), (BLOCK as u64, 9));
        appender.finish().unwrap();
        assert_eq!(appender.len(), BLOCK as u64 + 9);
    }
}
