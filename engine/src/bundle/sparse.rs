//! Sparse files for bundles: where a file's data is, which 4 KiB blocks are worth shipping,
//! and the content hash that names a file's bytes whatever their layout on disk.
//!
//! The content hash (BLAKE3) is defined on the logical bytes only. Cut the file into 4 KiB
//! blocks at multiples of [`BLOCK`] (the last one may be short); every maximal run of blocks
//! that are not all zero is fed as `offset` (u64 LE) ++ the run's bytes ++ `length` (u64 LE),
//! in increasing offset order; then `b"qsnap-size"` ++ `size` (u64 LE). Rendered
//! `blake3:<64 hex>`. The length comes after the bytes so that the hash can be computed in one
//! streaming pass (a run's length is only known at its end); the encoding stays unambiguous
//! because it decodes from its end (fixed trailer, then each run's length tells how far back
//! its offset is).
//!
//! This module never reads a filesystem hole (holes are zeros by definition; reading them
//! would make hashing a 1 TB sparse file take hours) and never writes anything.

use std::cmp::min;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// The granularity of zero detection, of the content hash and of deltas.
pub(crate) const BLOCK: u64 = 4096;
/// [`BLOCK`] for slicing.
pub(crate) const BLOCK_USIZE: usize = 4096;
const _: () = assert!(BLOCK_USIZE as u64 == BLOCK);
/// Files are read in chunks this big (a multiple of [`BLOCK`]).
pub(crate) const CHUNK: usize = 1 << 20;
/// The most regions a writer puts in one sparse map: past it, regions separated by small gaps
/// are merged (the zeros in between are shipped, they compress to nothing). Keeps the map
/// (~40 bytes a region) far below what a reader accepts.
pub(crate) const MAX_WRITE_REGIONS: usize = 1 << 18;

static ZEROS: [u8; BLOCK_USIZE] = [0; BLOCK_USIZE];

/// What a bundle knows of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileDigest {
    /// The content hash, `blake3:<64 hex>`.
    pub(crate) hash: String,
    /// The logical size in bytes.
    pub(crate) size: u64,
    /// Bytes of region data written into (or read from) the bundle.
    pub(crate) stored: u64,
}

/// Whether `bytes` (at most one block) are all zero. Slice equality is a `memcmp` even in
/// debug builds, where a byte loop would crawl through a RAM image.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(ZEROS.len()).all(|b| b == &ZEROS[..b.len()])
}

/// A length within one block, as usize.
fn in_block(len: u64) -> usize {
    usize::try_from(len.min(BLOCK)).unwrap_or(BLOCK_USIZE)
}

fn off_t(pos: u64) -> io::Result<i64> {
    i64::try_from(pos).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too big"))
}

/// The filesystem's data extents of `file` within `[0, size)`, as `(offset, len)`. A
/// filesystem that cannot tell (no `SEEK_DATA`) reports the whole file as data.
pub(crate) fn data_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let unsupported = |e: Errno| matches!(e, Errno::EINVAL | Errno::EOPNOTSUPP);
    let all = || if size == 0 { vec![] } else { vec![(0, size)] };
    let mut regions = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match lseek(fd, off_t(pos)?, Whence::SeekData) {
            Ok(o) => u64::try_from(o).map_err(io::Error::other)?,
            Err(Errno::ENXIO) => break,
            Err(e) if unsupported(e) => return Ok(all()),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, off_t(start)?, Whence::SeekHole) {
            Ok(o) => min(u64::try_from(o).map_err(io::Error::other)?, size),
            // The file shrank under us: what is left of it is data.
            Err(Errno::ENXIO) => size,
            Err(e) if unsupported(e) => return Ok(all()),
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            // Never loop forever on a filesystem that answers nonsense.
            return Ok(all());
        }
        regions.push((start, end - start));
        pos = end;
    }
    Ok(regions)
}

/// The data regions (`SEEK_DATA`/`SEEK_HOLE`) widened to whole 4 KiB blocks and merged: what
/// must be read to see every non-zero block. Widening reads a few zeros on filesystems with
/// blocks under 4 KiB.
pub fn data_spans(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for (off, len) in data_regions(file, size)? {
        let start = off / BLOCK * BLOCK;
        let end = min((off + len).div_ceil(BLOCK) * BLOCK, size);
        match spans.last_mut() {
            Some(last) if last.0 + last.1 >= start => last.1 = end.max(last.0 + last.1) - last.0,
            _ => spans.push((start, end - start)),
        }
    }
    Ok(spans)
}

/// Reads `spans` of `file` in [`CHUNK`]s, in order, handing each chunk with its offset to `f`.
pub(crate) fn read_spans(
    file: &File,
    spans: &[(u64, u64)],
    mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0; CHUNK];
    for &(off, len) in spans {
        let mut pos = off;
        while pos < off + len {
            let n = usize::try_from(min(len - (pos - off), CHUNK as u64)).unwrap_or(CHUNK);
            file.read_exact_at(&mut buf[..n], pos)?;
            f(pos, &buf[..n])?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Collects regions in increasing order, coalescing adjacent ones, and never holds more than
/// [`MAX_WRITE_REGIONS`]: past that it merges regions across ever larger gaps.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    list: Vec<(u64, u64)>,
    max_gap: u64,
}

impl Regions {
    pub(crate) fn push(&mut self, off: u64, len: u64) {
        match self.list.last_mut() {
            Some(last) if off - (last.0 + last.1) <= self.max_gap => last.1 = off + len - last.0,
            _ => self.list.push((off, len)),
        }
        while self.list.len() > MAX_WRITE_REGIONS {
            self.max_gap = (self.max_gap * 2).max(BLOCK);
            let gap = self.max_gap;
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.list.len());
            for &(o, l) in &self.list {
                match merged.last_mut() {
                    Some(last) if o - (last.0 + last.1) <= gap => last.1 = o + l - last.0,
                    _ => merged.push((o, l)),
                }
            }
            self.list = merged;
        }
    }

    pub(crate) fn into_vec(self) -> Vec<(u64, u64)> {
        self.list
    }
}

/// The regions of `file` worth shipping: its non-zero blocks, coalesced. Holes are not read.
pub(crate) fn nonzero_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut regions = Regions::default();
    read_spans(file, &data_spans(file, size)?, |off, chunk| {
        for (i, block) in chunk.chunks(BLOCK_USIZE).enumerate() {
            if !is_zero(block) {
                regions.push(off + i as u64 * BLOCK, block.len() as u64);
            }
        }
        Ok(())
    })?;
    Ok(regions.into_vec())
}

/// The content hash (see the module docs), fed incrementally.
pub struct ContentHasher {
    hasher: blake3::Hasher,
    /// The bytes fed so far of the block `next` is in; always `next % BLOCK` long.
    block: Vec<u8>,
    /// The offset after the last byte fed.
    next: u64,
    /// The length so far of the open run of non-zero blocks.
    run: Option<u64>,
    nonzero: u64,
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHasher {
    /// A hasher of an empty file.
    pub fn new() -> Self {
        ContentHasher {
            hasher: blake3::Hasher::new(),
            block: Vec::with_capacity(BLOCK_USIZE),
            next: 0,
            run: None,
            nonzero: 0,
        }
    }

    /// The file's bytes at `offset`; offsets only increase, and bytes never fed are zeros.
    pub fn feed(&mut self, offset: u64, mut bytes: &[u8]) {
        assert!(offset >= self.next, "ContentHasher fed out of order");
        self.skip_to(offset);
        if !self.block.is_empty() {
            let take = min(BLOCK_USIZE - self.block.len(), bytes.len());
            self.block.extend_from_slice(&bytes[..take]);
            self.next += take as u64;
            bytes = &bytes[take..];
            if self.block.len() == BLOCK_USIZE {
                self.flush_block();
            }
        }
        let whole = bytes.len() / BLOCK_USIZE * BLOCK_USIZE;
        self.blocks(self.next, &bytes[..whole]);
        self.next += whole as u64;
        self.block.extend_from_slice(&bytes[whole..]);
        self.next += (bytes.len() - whole) as u64;
    }

    /// Bytes of non-zero blocks fed so far.
    pub(crate) fn nonzero(&self) -> u64 {
        self.nonzero
    }

    /// The hash of a file of `size` bytes (at least the end of what was fed).
    pub fn finish(mut self, size: u64) -> String {
        assert!(size >= self.next, "ContentHasher fed past the size");
        self.skip_to(size);
        if !self.block.is_empty() {
            // The file's last, short block.
            let start = self.next - self.block.len() as u64;
            let block = std::mem::take(&mut self.block);
            self.blocks(start, &block);
        }
        self.close_run();
        self.hasher.update(b"qsnap-size");
        self.hasher.update(&size.to_le_bytes());
        format!("blake3:{}", self.hasher.finalize().to_hex())
    }

    /// Treats everything between `next` and `offset` as zeros.
    fn skip_to(&mut self, offset: u64) {
        if offset == self.next {
            return;
        }
        if !self.block.is_empty() {
            let fill = min(offset - self.next, BLOCK - self.block.len() as u64);
            self.block.resize(self.block.len() + in_block(fill), 0);
            self.next += fill;
            if self.block.len() == BLOCK_USIZE {
                self.flush_block();
            }
        }
        if self.next < offset {
            let whole_end = offset / BLOCK * BLOCK;
            if whole_end > self.next {
                self.close_run();
                self.next = whole_end;
            }
            self.block.resize(in_block(offset - self.next), 0);
            self.next = offset;
        }
    }

    fn flush_block(&mut self) {
        let block = std::mem::take(&mut self.block);
        self.blocks(self.next - BLOCK, &block);
        self.block = block;
        self.block.clear();
    }

    /// Whole blocks (or the last, short one) at `at`, a multiple of [`BLOCK`]. Non-zero
    /// neighbours go to BLAKE3 in one update: it is only fast on big inputs.
    fn blocks(&mut self, at: u64, bytes: &[u8]) {
        let mut span: Option<usize> = None;
        for (i, block) in bytes.chunks(BLOCK_USIZE).enumerate() {
            let pos = i * BLOCK_USIZE;
            if is_zero(block) {
                if let Some(s) = span.take() {
                    self.run_bytes(at + s as u64, &bytes[s..pos]);
                }
                self.close_run();
            } else if span.is_none() {
                span = Some(pos);
            }
        }
        if let Some(s) = span {
            self.run_bytes(at + s as u64, &bytes[s..]);
        }
    }

    fn run_bytes(&mut self, at: u64, bytes: &[u8]) {
        let run = self.run.get_or_insert_with(|| {
            self.hasher.update(&at.to_le_bytes());
            0
        });
        *run += bytes.len() as u64;
        self.hasher.update(bytes);
        self.nonzero += bytes.len() as u64;
    }

    fn close_run(&mut self) {
        if let Some(len) = self.run.take() {
            self.hasher.update(&len.to_le_bytes());
        }
    }
}

/// The digest of an open file: `stored` is the bytes of its non-zero blocks.
pub(crate) fn hash_open(file: &File) -> io::Result<FileDigest> {
    let size = file.metadata()?.len();
    let mut hasher = ContentHasher::new();
    read_spans(file, &data_spans(file, size)?, |off, chunk| {
        hasher.feed(off, chunk);
        Ok(())
    })?;
    let stored = hasher.nonzero();
    Ok(FileDigest {
        hash: hasher.finish(size),
        size,
        stored,
    })
}

/// The digest of the file at `path` (see [`hash_open`]).
pub(crate) fn hash_file(path: &Path) -> io::Result<FileDigest> {
    hash_open(&File::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn file_with(dir: &Path, name: &str, size: u64, writes: &[(u64, &[u8])]) -> File {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join(name))
            .unwrap();
        f.set_len(size).unwrap();
        for (off, bytes) in writes {
            f.write_all_at(bytes, *off).unwrap();
        }
        f
    }

    #[test]
    fn hash_ignores_layout_but_not_content() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * 1024 * 1024 + 123;
        let data = vec![7u8; 10_000];
        let holes = file_with(dir.path(), "holes", size, &[(1 << 20, &data)]);
        let zeros = vec![0u8; usize::try_from(size).unwrap()];
        let dense = file_with(dir.path(), "dense", size, &[(0, &zeros), (1 << 20, &data)]);
        assert!(holes.metadata().unwrap().len() == dense.metadata().unwrap().len());
        let (a, b) = (hash_open(&holes).unwrap(), hash_open(&dense).unwrap());
        assert_eq!(a.hash, b.hash);
        assert!(a.hash.starts_with("blake3:") && a.hash.len() == 7 + 64);
        // 10_000 bytes starting on a block boundary touch 3 blocks.
        assert_eq!((a.stored, b.stored), (3 * BLOCK, 3 * BLOCK));

        holes.write_all_at(&[1], 3 << 20).unwrap();
        assert_ne!(hash_open(&holes).unwrap().hash, a.hash);
        holes.write_all_at(&[0], 3 << 20).unwrap();
        assert_eq!(hash_open(&holes).unwrap().hash, a.hash);
        holes.set_len(size + 1).unwrap();
        assert_ne!(hash_open(&holes).unwrap().hash, a.hash);
    }

    #[test]
    fn hasher_is_split_invariant() {
        let mut content = vec![0u8; 40_000];
        for (i, b) in content.iter_mut().enumerate() {
            if !(8192..16384).contains(&i) && i % 7 == 0 {
                *b = u8::try_from(i % 251).unwrap() | 1;
            }
        }
        let whole = {
            let mut h = ContentHasher::new();
            h.feed(0, &content);
            h.finish(content.len() as u64 + 5000)
        };
        for step in [1, 100, 4095, 4096, 4097, 30_000] {
            let mut h = ContentHasher::new();
            for (i, piece) in content.chunks(step).enumerate() {
                h.feed((i * step) as u64, piece);
            }
            assert_eq!(h.finish(content.len() as u64 + 5000), whole, "step {step}");
        }
        // Zeros never fed are the same as zeros fed.
        let mut h = ContentHasher::new();
        h.feed(0, &content[..8292]);
        h.feed(16_000, &content[16_000..]);
        assert_eq!(h.finish(content.len() as u64 + 5000), whole);
        // One more byte changes the hash.
        let mut h = ContentHasher::new();
        h.feed(0, &content);
        h.feed(44_000, &[1]);
        assert_ne!(h.finish(content.len() as u64 + 5000), whole);
    }

    #[test]
    fn regions_skip_holes_and_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let zero = vec![0u8; 3 * BLOCK_USIZE];
        let f = file_with(
            dir.path(),
            "f",
            64 << 20,
            &[
                (BLOCK, &[1; 10]),
                (2 * BLOCK, &zero),
                (5 * BLOCK, &[2; 4097]),
                (32 << 20, &[3]),
            ],
        );
        let data = data_regions(&f, 64 << 20).unwrap();
        assert!(
            data.iter().map(|r| r.1).sum::<u64>() < 1 << 20,
            "holes seen: {data:?}"
        );
        assert_eq!(
            nonzero_regions(&f, 64 << 20).unwrap(),
            vec![(BLOCK, BLOCK), (5 * BLOCK, 2 * BLOCK), (32 << 20, BLOCK)]
        );
        // A short last block is a region of its own length.
        let g = file_with(dir.path(), "g", 3 * BLOCK + 10, &[(3 * BLOCK + 9, &[1])]);
        assert_eq!(
            nonzero_regions(&g, 3 * BLOCK + 10).unwrap(),
            vec![(3 * BLOCK, 10)]
        );
    }

    #[test]
    fn regions_are_capped() {
        let mut r = Regions::default();
        for i in 0..(MAX_WRITE_REGIONS as u64 + 10) {
            r.push(i * 2 * BLOCK, BLOCK);
        }
        let v = r.into_vec();
        assert!(v.len() <= MAX_WRITE_REGIONS);
        assert_eq!(v[0].0, 0);
        let last = v.last().unwrap();
        assert_eq!(
            last.0 + last.1,
            (MAX_WRITE_REGIONS as u64 + 9) * 2 * BLOCK + BLOCK
        );
        assert!(v.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
    }

    #[test]
    fn a_terabyte_of_holes_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1u64 << 40;
        let f = file_with(dir.path(), "huge", size, &[(size / 2, &[9; 100])]);
        let start = std::time::Instant::now();
        let d = hash_open(&f).unwrap();
        assert_eq!((d.size, d.stored), (size, BLOCK));
        assert!(
            start.elapsed().as_secs() < 5,
            "holes were read: {:?}",
            start.elapsed()
        );
        let mut h = ContentHasher::new();
        h.feed(size / 2, &[9; 100]);
        assert_eq!(h.finish(size), d.hash);
    }
}
