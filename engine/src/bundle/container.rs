//! The bundle container: writes and reads the archive a snapshot is exported into.
//!
//! # Format (public: other tools read it)
//!
//! A bundle is a POSIX tar archive (pax) compressed as a zstd stream (one or more frames,
//! frame checksums on). `tar --zstd -tvf B` lists it and `tar --zstd -xSf B` extracts it.
//! Every entry is a regular file with a relative name (no `..`, no leading `/`), owner 0:0,
//! mtime 0 (a bundle of the same files is the same bytes). Nothing else: no directories,
//! links or devices; readers refuse them.
//! - Small files (JSON): plain entries, mode 0644.
//! - Data files: mode 0600. A file with skipped regions (filesystem holes, or 4 KiB blocks at
//!   multiples of 4096 that are all zero) is written in GNU tar's PAX sparse format 1.0: pax
//!   records `GNU.sparse.major=1`, `GNU.sparse.minor=0`, `GNU.sparse.name=<real name>`,
//!   `GNU.sparse.realsize=<size>`; the ustar name is `GNUSparseFile.0/<real name>` (cut to
//!   100 bytes: the real name is only ever the `GNU.sparse.name`). The entry's data starts
//!   with the sparse map, decimal ASCII numbers each ended by `\n` (the region count, then
//!   `offset` and `length` per region, offsets increasing), NUL-padded to 512 bytes, then the
//!   regions' bytes back to back. When the last region ends before the size, a final region
//!   `(size, 0)` follows: GNU tar truncates the extracted file there, giving it its size. A
//!   file with no skipped region is a plain entry.
//! - A delta entry (of a file against a base file the importer already has) has the same
//!   shape, always sparse: its regions are the 4 KiB blocks that differ from the base;
//!   every byte outside them is the base's byte at the same offset (zero past its end).
//! - Sizes past 8 GiB go in a pax `size` record (the ustar field then says 0).
//!
//! A reader also takes the same tar uncompressed (told by the absence of zstd's magic
//! number): what `pull` hands `import`, its data having come compressed as chunks.
//!
//! The archive ends with two zero blocks. A reader stops there, after checking that the zstd
//! frame holding them is complete; whatever follows that frame is ignored.
//!
//! This module never trusts a size read from a bundle for an allocation, never writes
//! outside the file it is handed, and never runs tar or zstd binaries (only its tests do).

use std::cmp::min;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use self::tar::{check_name, header, padding, pax_record, OCTAL_MAX, RECORD};
use super::sparse::{self, ContentHasher, FileDigest, Regions, BLOCK, BLOCK_USIZE, CHUNK};

mod reader;
mod tar;
#[cfg(test)]
mod tests;

#[cfg(test)]
use self::reader::ZSTD_MAGIC;
pub(crate) use self::reader::{read, Entry};

/// Writes a bundle. A failed `add_*` leaves a half-written entry: the writer then refuses
/// everything, the caller discards the output.
pub(crate) struct Writer<W: Write> {
    zstd: Sink<W>,
    broken: bool,
}

/// Where the tar bytes go: through zstd (a bundle), or as they are (the stream `pull`
/// hands to `import`, whose data came compressed as chunks).
enum Sink<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Zstd(z) => z.write(buf),
            Sink::Plain(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Zstd(z) => z.flush(),
            Sink::Plain(w) => w.flush(),
        }
    }
}

impl<W: Write> Writer<W> {
    /// zstd at `level` with `threads` worker threads (0 = single-threaded).
    pub(crate) fn new(out: W, level: i32, threads: u32) -> io::Result<Self> {
        let mut zstd = zstd::stream::write::Encoder::new(out, level)?;
        zstd.include_checksum(true)?;
        if threads > 0 {
            zstd.multithread(threads)?;
        }
        Ok(Writer {
            zstd: Sink::Zstd(zstd),
            broken: false,
        })
    }

    /// An uncompressed tar stream.
    pub(crate) fn plain(out: W) -> Self {
        Writer {
            zstd: Sink::Plain(out),
            broken: false,
        }
    }

    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        if self.broken {
            return Err(io::Error::other("an earlier write to this bundle failed"));
        }
        self.broken = true;
        let value = f(self)?;
        self.broken = false;
        Ok(value)
    }

    /// A small regular entry (mode 0644).
    pub(crate) fn add_bytes(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name, io::ErrorKind::InvalidInput)?;
        self.guarded(|w| {
            w.headers(name, name, 0o644, data.len() as u64, Vec::new())?;
            w.zstd.write_all(data)?;
            w.pad(data.len() as u64)
        })
    }

    /// A data file, sparse as the format says. Reads the file twice: once to find its
    /// non-zero blocks (the map precedes the data), once to ship and hash them, so the
    /// digest is of exactly the bytes shipped. `progress` follows the second pass.
    pub(crate) fn add_file(
        &mut self,
        name: &str,
        path: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<FileDigest> {
        check_name(name, io::ErrorKind::InvalidInput)?;
        let file = open_regular(path)?;
        let size = file.metadata()?.len();
        let regions = sparse::nonzero_regions(&file, size)?;
        let dense = regions.iter().map(|r| r.1).sum::<u64>() == size;
        let mut hasher = ContentHasher::new();
        let stored = self.guarded(|w| {
            w.regions(name, &file, size, &regions, !dense, &mut |off, chunk| {
                hasher.feed(off, chunk);
                progress(off + chunk.len() as u64);
            })
        })?;
        progress(size);
        Ok(FileDigest {
            hash: hasher.finish(size),
            size,
            stored,
        })
    }

    /// A delta of `path` against `base` (see the format). Both files are read once, side by
    /// side (that pass drives `progress`), then the differing blocks are shipped.
    pub(crate) fn add_delta(
        &mut self,
        name: &str,
        path: &Path,
        base: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<FileDigest> {
        check_name(name, io::ErrorKind::InvalidInput)?;
        let new = open_regular(path)?;
        let delta = delta_regions(&new, &open_regular(base)?, progress)?;
        let (size, regions) = (delta.size, delta.regions);
        let stored =
            self.guarded(|w| w.regions(name, &new, size, &regions, true, &mut |_, _| {}))?;
        progress(size);
        Ok(FileDigest {
            hash: delta.hash,
            size,
            stored,
        })
    }

    /// Ends the archive (the two zero blocks) and the zstd stream; returns the inner writer
    /// flushed.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.guarded(|w| w.zstd.write_all(&[0; 2 * RECORD]))?;
        let mut out = match self.zstd {
            Sink::Zstd(z) => z.finish()?,
            Sink::Plain(w) => w,
        };
        out.flush()?;
        Ok(out)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        self.zstd.write_all(&[0; RECORD][..padding(len)])
    }

    /// The pax header (when `pax` has records or the entry needs one) and the ustar header.
    fn headers(
        &mut self,
        name: &str,
        ustar: &str,
        mode: u64,
        size: u64,
        mut pax: Vec<u8>,
    ) -> io::Result<()> {
        if size > OCTAL_MAX {
            pax_record(&mut pax, "size", &size.to_string());
        }
        if ustar == name && name.len() > 100 {
            pax_record(&mut pax, "path", name);
        }
        if !pax.is_empty() {
            let base = name.rsplit('/').next().unwrap_or(name);
            let h = header(&format!("PaxHeaders/{base}"), 0o644, pax.len() as u64, b'x');
            self.zstd.write_all(&h)?;
            self.zstd.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        self.zstd.write_all(&header(ustar, mode, size, b'0'))
    }

    /// Writes `regions` of `file` as one entry (with a sparse map when `sparse`), handing
    /// each chunk shipped to `seen`. Returns the region bytes shipped.
    fn regions(
        &mut self,
        name: &str,
        file: &File,
        size: u64,
        regions: &[(u64, u64)],
        sparse: bool,
        seen: &mut dyn FnMut(u64, &[u8]),
    ) -> io::Result<u64> {
        self.regions_from(name, size, regions, sparse, &mut |w| {
            sparse::read_spans(file, regions, |off, chunk| {
                seen(off, chunk);
                w(off, chunk)
            })
        })
    }

    /// Writes an entry of `regions` whose bytes `data` hands, in order, to the function it
    /// is given (offset, bytes); they must cover the regions exactly.
    fn regions_from(
        &mut self,
        name: &str,
        size: u64,
        regions: &[(u64, u64)],
        sparse: bool,
        data: Source<'_>,
    ) -> io::Result<u64> {
        let stored: u64 = regions.iter().map(|r| r.1).sum();
        let mut map = Vec::new();
        if sparse {
            let mut list = regions.to_vec();
            if list.last().map_or(true, |l| l.0 + l.1 < size) {
                list.push((size, 0));
            }
            map.extend_from_slice(format!("{}\n", list.len()).as_bytes());
            for (off, len) in list {
                map.extend_from_slice(format!("{off}\n{len}\n").as_bytes());
            }
            map.resize(map.len() + padding(map.len() as u64), 0);
            let mut pax = Vec::new();
            pax_record(&mut pax, "GNU.sparse.major", "1");
            pax_record(&mut pax, "GNU.sparse.minor", "0");
            pax_record(&mut pax, "GNU.sparse.name", name);
            pax_record(&mut pax, "GNU.sparse.realsize", &size.to_string());
            let ustar = format!("GNUSparseFile.0/{name}");
            self.headers(name, &ustar, 0o600, map.len() as u64 + stored, pax)?;
            self.zstd.write_all(&map)?;
        } else {
            self.headers(name, name, 0o600, stored, Vec::new())?;
        }
        let mut written = 0u64;
        let out = &mut self.zstd;
        // Where the next bytes must start: region `at.0`, offset `at.1`.
        let mut at = (0usize, regions.first().map_or(0, |r| r.0));
        data(&mut |off, chunk| {
            while let Some(&(start, len)) = regions.get(at.0) {
                if at.1 < start + len {
                    break;
                }
                at = (at.0 + 1, regions.get(at.0 + 1).map_or(0, |r| r.0));
            }
            let Some(&(start, len)) = regions.get(at.0) else {
                return Err(io::Error::other(format!("`{name}` grew while being added")));
            };
            if off != at.1 || off + chunk.len() as u64 > start + len {
                return Err(io::Error::other(format!(
                    "`{name}`: bytes at {off} handed where {} was due",
                    at.1
                )));
            }
            at.1 += chunk.len() as u64;
            written += chunk.len() as u64;
            out.write_all(chunk)
        })
        .and_then(|()| {
            if written < stored {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short"))
            } else {
                Ok(())
            }
        })
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                io::Error::other(format!("`{name}` shrank while being added"))
            }
            _ => e,
        })?;
        self.pad(map.len() as u64 + stored)?;
        Ok(stored)
    }
}

/// Takes an entry's bytes (offset, bytes), in order.
pub type DataSink<'a> = &'a mut dyn FnMut(u64, &[u8]) -> io::Result<()>;
/// Hands an entry's bytes, in order, to the [`DataSink`] it is given.
type Source<'a> = &'a mut dyn FnMut(DataSink<'_>) -> io::Result<()>;

/// An uncompressed bundle stream written from data that is not in local files: what `pull`
/// builds from an object store's chunks and hands to `import`, which checks it as it checks
/// any bundle. Same format as a bundle, without the zstd layer (a reader takes both).
pub struct TarStream<W: Write> {
    inner: Writer<W>,
}

impl<W: Write> std::fmt::Debug for TarStream<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarStream").finish_non_exhaustive()
    }
}

impl<W: Write> TarStream<W> {
    /// A stream into `out`.
    pub fn new(out: W) -> Self {
        TarStream {
            inner: Writer::plain(out),
        }
    }

    /// A small regular entry (the manifest, the seal, the signature).
    pub fn add_bytes(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.inner.add_bytes(name, data)
    }

    /// A data file of `size` bytes holding data only in `regions` (increasing, apart; holes
    /// elsewhere). `data` hands the regions' bytes, in order, to the function it is given.
    pub fn add_sparse(
        &mut self,
        name: &str,
        size: u64,
        regions: &[(u64, u64)],
        data: Source<'_>,
    ) -> io::Result<()> {
        check_name(name, io::ErrorKind::InvalidInput)?;
        let mut end = 0u64;
        for &(off, len) in regions {
            if off < end || off.checked_add(len).map_or(true, |e| e > size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{name}`: regions overlap, go backwards or pass the size"),
                ));
            }
            end = off + len;
        }
        let dense = regions.iter().map(|r| r.1).sum::<u64>() == size;
        self.inner
            .guarded(|w| w.regions_from(name, size, regions, !dense, data))
            .map(|_| ())
    }

    /// Ends the archive; returns the output, flushed.
    pub fn finish(self) -> io::Result<W> {
        self.inner.finish()
    }
}

/// What a delta of a file against a base ships: the 4 KiB blocks that differ.
#[derive(Debug, Clone)]
pub struct Delta {
    /// The new file's size.
    pub size: u64,
    /// The differing blocks, merged, in order.
    pub regions: Vec<(u64, u64)>,
    /// The new file's content hash (of all of it: what a seal holds).
    pub hash: String,
}

/// Compares `new` with `base` block by block (both read once, side by side; `progress`
/// follows): the regions a delta of `new` ships, and `new`'s content hash.
pub fn delta_regions(new: &File, base: &File, progress: &mut dyn FnMut(u64)) -> io::Result<Delta> {
    let (size, base_len) = (new.metadata()?.len(), base.metadata()?.len());
    // Where neither file has data both are zeros: nothing to read there.
    let mut spans = sparse::data_spans(new, size)?;
    // Whole blocks of the new file: a base ending mid-block is compared to the block's end.
    let theirs = sparse::data_spans(base, base_len)?
        .into_iter()
        .filter(|s| s.0 < size);
    spans.extend(
        theirs.map(|(off, len)| (off, min((off + len).div_ceil(BLOCK) * BLOCK, size) - off)),
    );
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (off, len) in spans {
        match merged.last_mut() {
            Some(last) if last.0 + last.1 >= off => {
                last.1 = (off + len).max(last.0 + last.1) - last.0
            }
            _ => merged.push((off, len)),
        }
    }
    let mut hasher = ContentHasher::new();
    let mut regions = Regions::default();
    let mut theirs = vec![0u8; CHUNK];
    sparse::read_spans(new, &merged, |off, ours| {
        hasher.feed(off, ours);
        let theirs = &mut theirs[..ours.len()];
        let have = usize::try_from(base_len.saturating_sub(off))
            .map_or(ours.len(), |n| min(n, ours.len()));
        base.read_exact_at(&mut theirs[..have], off)?;
        theirs[have..].fill(0);
        let blocks = ours.chunks(BLOCK_USIZE).zip(theirs.chunks(BLOCK_USIZE));
        for (i, (a, b)) in blocks.enumerate() {
            if a != b {
                regions.push(off + i as u64 * BLOCK, a.len() as u64);
            }
        }
        progress(off + ours.len() as u64);
        Ok(())
    })?;
    Ok(Delta {
        size,
        regions: regions.into_vec(),
        hash: hasher.finish(size),
    })
}

fn open_regular(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        let msg = format!("{} is not a regular file", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    Ok(file)
}
