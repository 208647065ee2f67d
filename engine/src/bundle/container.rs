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
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use zstd::stream::raw::Decoder;

use self::tar::{
    check_name, early, fill, header, invalid, padding, parse_header, parse_pax, pax_record, skip,
    type_name, Unzstd, MAX_MAP, MAX_PAX, MAX_REGIONS, OCTAL_MAX, RECORD,
};
use super::sparse::{self, ContentHasher, FileDigest, Regions, BLOCK, BLOCK_USIZE, CHUNK};

mod tar;
#[cfg(test)]
mod tests;

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
        let (new, old) = (open_regular(path)?, open_regular(base)?);
        let (size, base_len) = (new.metadata()?.len(), old.metadata()?.len());
        // Where neither file has data both are zeros: nothing to read there.
        let mut spans = sparse::data_spans(&new, size)?;
        // Whole blocks of the new file: a base ending mid-block is compared to the block's end.
        let theirs = sparse::data_spans(&old, base_len)?
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
        sparse::read_spans(&new, &merged, |off, ours| {
            hasher.feed(off, ours);
            let theirs = &mut theirs[..ours.len()];
            let have = usize::try_from(base_len.saturating_sub(off))
                .map_or(ours.len(), |n| min(n, ours.len()));
            old.read_exact_at(&mut theirs[..have], off)?;
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
        let regions = regions.into_vec();
        let stored =
            self.guarded(|w| w.regions(name, &new, size, &regions, true, &mut |_, _| {}))?;
        progress(size);
        Ok(FileDigest {
            hash: hasher.finish(size),
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

fn open_regular(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        let msg = format!("{} is not a regular file", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    Ok(file)
}

/// Reads a bundle entry by entry (see [`Entry`]). Ends at the archive's end marker; input
/// that stops before it is `UnexpectedEof`; what follows the frame holding it is ignored.
pub(crate) fn read<R: Read, E: From<io::Error>>(
    input: R,
    mut visit: impl FnMut(&mut Entry<'_>) -> Result<(), E>,
) -> Result<(), E> {
    // The first four bytes tell zstd from plain tar; a pipe may hand them one at a time.
    let (mut head, mut n) = ([0u8; 4], 0);
    let mut input = input;
    while n < head.len() {
        match input.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let zstd = head[..n] == ZSTD_MAGIC;
    let input = BufReader::with_capacity(CHUNK, io::Cursor::new(head[..n].to_vec()).chain(input));
    let mut src = if zstd {
        Input::Zstd(Unzstd {
            input,
            zstd: Decoder::new()?,
            in_frame: false,
            stop_at_boundary: false,
        })
    } else {
        Input::Plain(input)
    };
    let mut pax: Vec<(String, String)> = Vec::new();
    loop {
        let mut h = [0u8; RECORD];
        fill(&mut src, &mut h, "no end-of-archive marker")?;
        if h == [0; RECORD] {
            fill(&mut src, &mut h, "no end-of-archive marker")?;
            if h == [0; RECORD] {
                break;
            }
            return Err(invalid("a lone zero block in the middle of the bundle").into());
        }
        let (mut name, mut data) = parse_header(&h)?;
        let records = std::mem::take(&mut pax);
        for (key, value) in &records {
            match key.as_str() {
                "path" => name.clone_from(value),
                "size" => {
                    data = value
                        .parse()
                        .map_err(|_| invalid("a pax size is not a number"))?
                }
                _ => {}
            }
        }
        match h[156] {
            b'x' | b'g' if data > MAX_PAX => {
                return Err(invalid(format!("a pax header of {data} bytes")).into())
            }
            b'x' => {
                let mut buf = Vec::new();
                src.by_ref().take(data).read_to_end(&mut buf)?;
                if buf.len() as u64 != data {
                    return Err(early("in a pax header").into());
                }
                pax = parse_pax(&buf)?;
                skip(&mut src, padding(data) as u64, "in a pax header")?;
                continue;
            }
            b'g' => {
                skip(&mut src, data + padding(data) as u64, "in a pax header")?;
                continue;
            }
            b'0' | b'\0' => {}
            kind => {
                let msg = format!("bundle entry `{name}` is {} (tar type '{}'); a bundle holds only regular files", type_name(kind), kind.escape_ascii());
                return Err(invalid(msg).into());
            }
        }
        let field = |key: &str| records.iter().find(|r| r.0 == key).map(|r| r.1.as_str());
        let mut size = data;
        let sparse = records.iter().any(|r| r.0.starts_with("GNU.sparse."));
        if sparse {
            if (field("GNU.sparse.major"), field("GNU.sparse.minor")) != (Some("1"), Some("0")) {
                return Err(invalid(format!(
                    "bundle entry `{name}` uses a sparse format other than 1.0"
                ))
                .into());
            }
            name = field("GNU.sparse.name")
                .ok_or_else(|| invalid("a sparse entry without GNU.sparse.name"))?
                .to_owned();
            size = field("GNU.sparse.realsize")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| invalid(format!("sparse entry `{name}` has no valid realsize")))?;
        }
        check_name(&name, io::ErrorKind::InvalidData)?;
        let mut entry = Entry {
            src: &mut src,
            name,
            size,
            data,
            remaining: data,
            sparse,
            consumed: false,
        };
        visit(&mut entry)?;
        if !entry.consumed {
            return Err(invalid(format!("bundle entry `{}` was not expected", entry.name)).into());
        }
        if entry.remaining != 0 {
            return Err(invalid(format!(
                "bundle entry `{}` was not read to its end",
                entry.name
            ))
            .into());
        }
        skip(&mut src, padding(data) as u64, "after an entry")?;
    }
    // The frame's end (its checksum) is part of the bundle: a bundle cut there is cut short.
    if let Input::Zstd(z) = &mut src {
        z.stop_at_boundary = true;
        io::copy(z, &mut io::sink())?;
    }
    Ok(())
}

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A bundle's input: zstd-compressed (a bundle file), or a plain tar stream ([`TarStream`]).
enum Input<R: Read> {
    Zstd(Unzstd<BufReader<R>>),
    Plain(BufReader<R>),
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::Zstd(z) => z.read(buf),
            Input::Plain(p) => p.read(buf),
        }
    }
}

/// One entry of a bundle being read; consume it with [`Entry::bytes`] or
/// [`Entry::write_to`], once.
pub(crate) struct Entry<'a> {
    src: &'a mut dyn Read,
    name: String,
    size: u64,
    /// The entry's data size in the archive (map + regions for a sparse entry).
    data: u64,
    remaining: u64,
    sparse: bool,
    consumed: bool,
}

impl Entry<'_> {
    /// The real name (`GNU.sparse.name` for sparse entries).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The logical size (the realsize of a sparse entry).
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    fn start(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.consumed, true) {
            return Err(io::Error::other(format!(
                "bundle entry `{}` read twice",
                self.name
            )));
        }
        Ok(())
    }

    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() as u64 > self.remaining {
            return Err(invalid(format!(
                "bundle entry `{}`: sparse map and data size disagree",
                self.name
            )));
        }
        fill(self.src, buf, &format!("in entry `{}`", self.name))?;
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    /// The regions: the sparse map, checked, or the whole data of a plain entry.
    fn regions(&mut self) -> io::Result<Vec<(u64, u64)>> {
        if !self.sparse {
            return Ok(if self.data == 0 {
                vec![]
            } else {
                vec![(0, self.data)]
            });
        }
        let name = self.name.clone();
        let bad = |what: &str| invalid(format!("bundle entry `{name}`: bad sparse map ({what})"));
        let mut block = [0u8; RECORD];
        let (mut pos, mut read) = (RECORD, 0u64);
        let mut number = |e: &mut Self| -> io::Result<u64> {
            let mut value: Option<u64> = None;
            loop {
                if pos == RECORD {
                    if read >= MAX_MAP {
                        return Err(invalid(format!(
                            "bundle entry `{}`: sparse map too big",
                            e.name
                        )));
                    }
                    e.take(&mut block)?;
                    (pos, read) = (0, read + RECORD as u64);
                }
                let c = block[pos];
                pos += 1;
                match c {
                    b'0'..=b'9' => {
                        let v = value
                            .unwrap_or(0)
                            .checked_mul(10)
                            .and_then(|v| v.checked_add(u64::from(c - b'0')));
                        value = Some(v.ok_or_else(|| {
                            invalid(format!(
                                "bundle entry `{}`: sparse map number too big",
                                e.name
                            ))
                        })?);
                    }
                    b'\n' if value.is_some() => return Ok(value.unwrap_or(0)),
                    _ => {
                        return Err(invalid(format!(
                            "bundle entry `{}`: malformed sparse map",
                            e.name
                        )))
                    }
                }
            }
        };
        let count = number(self)?;
        if count > MAX_REGIONS {
            return Err(bad("too many regions"));
        }
        let (mut regions, mut end, mut total) = (Vec::new(), 0u64, 0u64);
        for _ in 0..count {
            let (off, len) = (number(self)?, number(self)?);
            let stop = off.checked_add(len).ok_or_else(|| bad("overflow"))?;
            if off < end || stop > self.size {
                return Err(bad("regions overlap, go backwards or pass the size"));
            }
            (end, total) = (stop, total + len);
            regions.push((off, len));
        }
        if total != self.remaining {
            return Err(bad("its lengths do not add up to the entry's data"));
        }
        Ok(regions)
    }

    /// The whole entry as bytes; an entry larger than `limit` is refused without reading it.
    pub(crate) fn bytes(&mut self, limit: u64) -> io::Result<Vec<u8>> {
        self.start()?;
        if self.size > limit {
            return Err(invalid(format!(
                "bundle entry `{}` is {} bytes, more than the {limit} expected",
                self.name, self.size
            )));
        }
        let regions = self.regions()?;
        let mut out = vec![0; usize::try_from(self.size).map_err(io::Error::other)?];
        for (off, len) in regions {
            let (off, len) = (
                usize::try_from(off).map_err(io::Error::other)?,
                usize::try_from(len).map_err(io::Error::other)?,
            );
            self.take(&mut out[off..off + len])?;
        }
        Ok(out)
    }

    /// Writes the entry into `out`, a new, empty file opened read+write: region bytes at
    /// their offsets (zero blocks skipped: they stay holes), the rest holes or, with `base`
    /// (a delta), the base's bytes. Returns the digest of the resulting file.
    pub(crate) fn write_to(
        &mut self,
        out: &File,
        base: Option<&File>,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<FileDigest> {
        self.start()?;
        if out.metadata()?.len() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write_to needs an empty file",
            ));
        }
        let regions = self.regions()?;
        let mut hasher = ContentHasher::new();
        let mut from_base = match base {
            Some(b) => {
                let len = min(b.metadata()?.len(), self.size);
                Some((b, sparse::data_spans(b, len)?, 0usize))
            }
            None => None,
        };
        let (mut buf, mut pos, mut stored) = (vec![0u8; CHUNK], 0u64, 0u64);
        for (off, len) in regions {
            if let Some((b, spans, next)) = &mut from_base {
                copy_spans(b, out, spans, next, pos, off)?;
            }
            let mut at = off;
            while at < off + len {
                let n = usize::try_from(min(off + len - at, CHUNK as u64)).unwrap_or(CHUNK);
                self.take(&mut buf[..n])?;
                hasher.feed(at, &buf[..n]);
                write_nonzero(out, at, &buf[..n])?;
                at += n as u64;
                progress(at);
            }
            (pos, stored) = (off + len, stored + len);
        }
        if let Some((b, spans, next)) = &mut from_base {
            copy_spans(b, out, spans, next, pos, self.size)?;
        }
        out.set_len(self.size)?;
        progress(self.size);
        Ok(match from_base {
            Some(_) => FileDigest {
                stored,
                ..sparse::hash_open(out)?
            },
            None => FileDigest {
                hash: hasher.finish(self.size),
                size: self.size,
                stored,
            },
        })
    }
}

/// Copies the parts of `spans` (the base's data, in order; `next` is the first one not yet
/// done) within `[from, to)` from `base` to `out`, leaving zero blocks as holes.
fn copy_spans(
    base: &File,
    out: &File,
    spans: &[(u64, u64)],
    next: &mut usize,
    from: u64,
    to: u64,
) -> io::Result<()> {
    let mut parts = Vec::new();
    while let Some(&(off, len)) = spans.get(*next) {
        let (start, end) = (off.max(from), min(off + len, to));
        if start < end {
            parts.push((start, end - start));
        }
        if off + len > to {
            break;
        }
        *next += 1;
    }
    sparse::read_spans(base, &parts, |at, chunk| write_nonzero(out, at, chunk))
}

/// Writes the blocks of `chunk` (at `at`) that are not all zero.
fn write_nonzero(out: &File, at: u64, chunk: &[u8]) -> io::Result<()> {
    let (mut i, mut start) = (0usize, None);
    while i < chunk.len() {
        let to_boundary = usize::try_from(BLOCK - (at + i as u64) % BLOCK).unwrap_or(1);
        let end = min(chunk.len(), i + to_boundary);
        if sparse::is_zero(&chunk[i..end]) {
            if let Some(s) = start.take() {
                out.write_all_at(&chunk[s..i], at + s as u64)?;
            }
        } else if start.is_none() {
            start = Some(i);
        }
        i = end;
    }
    if let Some(s) = start {
        out.write_all_at(&chunk[s..], at + s as u64)?;
    }
    Ok(())
}
