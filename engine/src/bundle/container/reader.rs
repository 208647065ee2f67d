//! Reading a bundle, entry by entry: the zstd or plain tar stream (`tar.rs` parses headers),
//! sparse maps checked before use, an entry's bytes written into a file handed to it (zero
//! blocks left holes, a delta's rest from its base). Never allocates from a size the bundle
//! gives beyond the limits in `tar.rs`; never writes outside the file it is handed.

use std::cmp::min;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;

use zstd::stream::raw::Decoder;

use super::tar::{
    check_name, early, fill, invalid, padding, parse_header, parse_pax, skip, type_name, Unzstd,
    MAX_MAP, MAX_PAX, MAX_REGIONS, RECORD,
};
use crate::bundle::sparse::{self, ContentHasher, FileDigest, BLOCK, CHUNK};

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
pub(super) const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A bundle's input: zstd-compressed (a bundle file), or a plain tar stream ([`super::TarStream`]).
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
