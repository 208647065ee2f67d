//! Chunks: a file's data cut at content-defined points (FastCDC 2020), named by the BLAKE3
//! of their plain bytes, stored zstd-compressed. In a whole file, holes and chunks that are
//! all zeros are not chunks: the chunk list leaves them out and a pull leaves them holes. In
//! a delta (against a base file the receiver has), the chunks cover the blocks that differ,
//! zeros included; every other byte is the base's.
//!
//! Runs on blocking threads (it reads whole files); never writes the files it reads.

use crate::format::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
use qsnap_engine::bundle::{data_spans, ContentHasher};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A chunk cut from a file.
#[derive(Debug)]
pub(crate) struct Cut {
    /// Its offset in the file.
    pub offset: u64,
    /// BLAKE3 of `data`, hex.
    pub hash: String,
    /// The plain bytes.
    pub data: Vec<u8>,
}

/// Reads `[pos, end)` of a file, for the chunker.
struct Span<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Span<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end - self.pos).map_or(buf.len(), |n| n.min(buf.len()));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was read",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Cuts the file at `path` into chunks, handing each (in order) to `f`; returns the file's
/// content hash (the one a bundle's seal holds) and its size. Only data regions are read;
/// each is cut on its own, so a hole is never inside a chunk; a chunk of zeros is no chunk.
pub(crate) fn cut_file(
    path: &Path,
    f: impl FnMut(Cut) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut hasher = ContentHasher::new();
    let spans = data_spans(&file, size)?;
    cut(
        &file,
        &spans,
        true,
        &mut |off, data| hasher.feed(off, data),
        f,
    )?;
    Ok((hasher.finish(size), size))
}

/// Cuts the blocks of `path` that differ from `base` (the base snapshot's file, which the
/// receiver has) into chunks; returns the whole file's content hash and its size. Zeros
/// here are chunks like any bytes: outside the chunks, a pull takes the base's bytes.
pub(crate) fn cut_delta(
    path: &Path,
    base: &Path,
    f: impl FnMut(Cut) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    let file = File::open(path)?;
    let delta = qsnap_engine::bundle::delta_regions(&file, &File::open(base)?, &mut |_| {})?;
    // Scattered 4 KiB differences would make as many tiny chunks: regions closer than 64 KiB
    // are cut as one (the blocks between equal the base's: shipping them is right, and
    // cheaper than a request each; a wider gap would ship too much of what did not change).
    let mut regions: Vec<(u64, u64)> = Vec::new();
    for (off, len) in delta.regions {
        match regions.last_mut() {
            Some(last) if off - (last.0 + last.1) < DELTA_GAP => {
                last.1 = off + len - last.0;
            }
            _ => regions.push((off, len)),
        }
    }
    cut(&file, &regions, false, &mut |_, _| {}, f)?;
    Ok((delta.hash, delta.size))
}

fn cut(
    file: &File,
    regions: &[(u64, u64)],
    skip_zeros: bool,
    seen: &mut dyn FnMut(u64, &[u8]),
    mut f: impl FnMut(Cut) -> io::Result<()>,
) -> io::Result<()> {
    for &(off, len) in regions {
        let span = Span {
            file,
            pos: off,
            end: off + len,
        };
        let cdc = fastcdc::v2020::StreamCDC::new(span, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        for c in cdc {
            let c = c.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => e,
                other => io::Error::other(other.to_string()),
            })?;
            let offset = off + c.offset;
            seen(offset, &c.data);
            if skip_zeros && c.data.iter().all(|&b| b == 0) {
                continue;
            }
            f(Cut {
                offset,
                hash: blake3::hash(&c.data).to_hex().to_string(),
                data: c.data,
            })?;
        }
    }
    Ok(())
}

/// Differing regions of a delta closer than this are cut as one.
const DELTA_GAP: u64 = 64 << 10;

/// A chunk as stored: zstd at level 1 (measured: level 3 made a push CPU-bound on 2 cores
/// for a few percent less stored).
pub(crate) fn compress(plain: &[u8]) -> io::Result<Vec<u8>> {
    zstd::bulk::compress(plain, 1)
}

/// A stored chunk back to its plain bytes, checked against the name it was fetched by and
/// the length the manifest gives; never allocates more than that length.
pub(crate) fn open(stored: &[u8], hash: &str, len: u32) -> Result<Vec<u8>, String> {
    let plain = zstd::bulk::decompress(stored, len as usize)
        .map_err(|e| format!("chunk {hash} does not decompress ({e})"))?;
    if plain.len() != len as usize {
        return Err(format!(
            "chunk {hash} holds {} bytes, and the manifest says {len}",
            plain.len()
        ));
    }
    if blake3::hash(&plain).to_hex().as_str() != hash {
        return Err(format!("chunk {hash}'s bytes do not hash to its name"));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_moves_only_nearby_cut_points_and_zeros_are_not_chunks() {
        let dir = tempfile::tempdir().unwrap();
        // xorshift: no period a chunker could lock onto.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data: Vec<u8> = (0..24u32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect();
        data[10 << 20..12 << 20].fill(0);
        let a = dir.path().join("a");
        std::fs::write(&a, &data).unwrap();
        data.splice(100..100, [7u8; 1000]);
        let b = dir.path().join("b");
        std::fs::write(&b, &data).unwrap();
        let cuts = |p: &Path| {
            let mut v = Vec::new();
            let (hash, size) = cut_file(p, |c| {
                v.push((c.offset, c.data.len(), c.hash));
                Ok(())
            })
            .unwrap();
            (v, hash, size)
        };
        let (ca, ha, _) = cuts(&a);
        let (cb, _, sb) = cuts(&b);
        assert_eq!(sb, 24 << 20 | 1000);
        let avg = (24 << 20) / ca.len();
        assert!((1 << 20..=4 << 20).contains(&avg), "{avg}");
        let names_a: std::collections::BTreeSet<_> = ca.iter().map(|c| &c.2).collect();
        let shared = cb.iter().filter(|c| names_a.contains(&c.2)).count();
        assert!(shared + 2 >= cb.len(), "{shared} of {}", cb.len());
        // The zeroed 2 MiB is no chunk's data.
        assert!(!ca
            .iter()
            .any(|c| c.0 >= (10 << 20) + (1 << 20) && c.0 + c.1 as u64 <= 12 << 20));
        // The content hash is the bundle's (a sealed file's).
        let whole = std::fs::read(&a).unwrap();
        let mut h = ContentHasher::new();
        h.feed(0, &whole);
        assert_eq!(ha, h.finish(whole.len() as u64));
        // A delta: b against a (the insert shifts everything after it), with a block of b
        // zeroed where a has data. Base bytes + the chunks at their offsets = b exactly, and
        // the hash is b's whole content hash.
        let mut bz = std::fs::read(&b).unwrap();
        bz[(16 << 20)..(16 << 20) + 4096].fill(0);
        std::fs::write(&b, &bz).unwrap();
        let mut rebuilt = std::fs::read(&a).unwrap();
        rebuilt.resize(bz.len(), 0);
        let (hd, sd) = cut_delta(&b, &a, |c| {
            let at = usize::try_from(c.offset).unwrap();
            rebuilt[at..at + c.data.len()].copy_from_slice(&c.data);
            Ok(())
        })
        .unwrap();
        assert_eq!(sd, bz.len() as u64);
        assert!(rebuilt == bz, "base + delta chunks is not the file");
        let mut h = ContentHasher::new();
        h.feed(0, &bz);
        assert_eq!(hd, h.finish(bz.len() as u64));
        // An unchanged file is an empty delta.
        let mut none = 0;
        cut_delta(&a, &a, |_| {
            none += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(none, 0);
        let stored = compress(b"hello").unwrap();
        let h = blake3::hash(b"hello").to_hex().to_string();
        assert_eq!(open(&stored, &h, 5).unwrap(), b"hello");
        assert!(open(&stored, &h, 4).is_err());
        assert!(open(&stored, &"0".repeat(64), 5).is_err());
    }
}
