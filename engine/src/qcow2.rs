//! A qcow2 image's header, read from the file by qsnap itself: version, virtual size, the
//! backing file's name and format, feature bits. For the questions asked at every look before
//! an unlink (which file backs onto which), so that reading a running VM's top costs a `pread`,
//! not a `qemu-img` process (≈ 17 ms each).
//!
//! It reads the header fields that name the backing file, and answers only for the plain
//! images qsnap makes: [`read`] gives `None` ("ask `qemu-img`") for anything else — not a
//! regular file, another format, a header field out of the bounds QEMU enforces
//! (cluster size, header length, refcount order, extended L2 with small clusters), a feature
//! that changes how the header reads or that this reader does not know (encryption, an external
//! data file, the corrupt bit, a compression type, unknown incompatible bits), malformed header
//! extensions. A caller then asks `qemu-img`, whose answer (or error) is the reference. An
//! answer it gives is what `qemu-img info` says about the same header (its tests compare the
//! two on real images). It does not read the tables QEMU also checks when it opens an image
//! (L1, refcounts, snapshots): damage there is `qemu-img check`'s to find, and never changes
//! which file backs onto which.
//!
//! Layout (QEMU's `docs/interop/qcow2.rst`): big-endian; magic `QFI\xfb`, version (2 or 3),
//! backing-file offset and size, cluster bits, virtual size, encryption method; version 3 adds
//! incompatible/compatible/autoclear features and the header length; header extensions follow
//! the header, up to the backing-file name (or the end of the first cluster).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The magic every qcow2 image starts with.
const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Incompatible feature bits QEMU opens images with, read-only, without special meaning for
/// the questions asked here: dirty (0), extended L2 entries (4, with clusters of 16 KiB or
/// more). Corrupt (1), external data file (2) and compression type (3, which QEMU checks
/// against a header field) are left to `qemu-img`.
const PLAIN_INCOMPATIBLE: u64 = 0b1_0001;
/// Extended L2 entries need clusters of at least 16 KiB.
const EXTENDED_L2: u64 = 1 << 4;
/// QEMU's limit for a backing file name (`bs->backing_file` holds 1023 bytes).
const MAX_BACKING_NAME: usize = 1023;
/// QEMU's limit for a backing format name (`bs->backing_format` holds 15 bytes).
const MAX_BACKING_FORMAT: usize = 15;

/// What a plain qcow2 header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The guest-visible size, in bytes.
    pub virtual_size: u64,
    /// The backing file as the header names it (unresolved), if any.
    pub backing: Option<String>,
    /// The backing file's format, if the header records it.
    pub backing_format: Option<String>,
    /// Version 3's incompatible feature bits (0 for version 2).
    pub incompatible: u64,
}

/// The header of `image`, if it is a plain qcow2 image in a regular file (see the module docs);
/// `None` when it is something `qemu-img` must answer for. Blocking (a read of one cluster at
/// most): call it off the async workers.
pub(crate) fn read(image: &Path) -> Option<Header> {
    // Non-blocking: a FIFO or a device named as a backing file must not hang the open.
    let f = std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(image)
        .ok()?;
    if !f.metadata().ok()?.file_type().is_file() {
        return None;
    }
    let fixed = read_at(&f, 104)?;
    let fixed = fixed.as_slice();
    if fixed.len() < 72 || &fixed[..4] != MAGIC {
        return None;
    }
    let version = be32(fixed, 4)?;
    let cluster_bits = be32(fixed, 20)?;
    // QEMU's bounds for the cluster size.
    if !(9..=21).contains(&cluster_bits) {
        return None;
    }
    let cluster = 1usize << cluster_bits;
    let (header_len, incompatible) = match version {
        2 => (72usize, 0u64),
        3 => {
            let len = usize::try_from(be32(fixed, 100)?).ok()?;
            if len < 104 || len > cluster {
                return None;
            }
            (len, be64(fixed, 72)?)
        }
        _ => return None,
    };
    if incompatible & !PLAIN_INCOMPATIBLE != 0
        || (incompatible & EXTENDED_L2 != 0 && cluster_bits < 14)
        || be32(fixed, 32)? != 0
    {
        return None;
    }
    // QEMU's bound for the refcount width (2^order bits, at most 64); version 2 has 16.
    if version == 3 && be32(fixed, 96)? > 6 {
        return None;
    }
    // Everything else QEMU reads to answer lies in the first cluster.
    let first = read_at(&f, cluster)?;
    let backing_offset = usize::try_from(be64(&first, 8)?).ok()?;
    let backing_len = usize::try_from(be32(&first, 16)?).ok()?;
    let backing = if backing_offset == 0 {
        None
    } else {
        if backing_len == 0
            || backing_len > MAX_BACKING_NAME
            || backing_offset < header_len
            || backing_offset.checked_add(backing_len)? > cluster
        {
            return None;
        }
        let name = first.get(backing_offset..backing_offset + backing_len)?;
        if name.contains(&0) {
            return None;
        }
        Some(String::from_utf8(name.to_vec()).ok()?)
    };
    let ext_end = if backing_offset == 0 {
        cluster
    } else {
        backing_offset
    };
    let backing_format = extensions(&first, header_len, ext_end)?;
    if backing.is_none() && backing_format.is_some() {
        // QEMU ignores it then; qemu-img would not show it: not the plain case.
        return None;
    }
    Some(Header {
        version,
        // QEMU counts the size in 512-byte sectors: a size that is not a multiple reads
        // rounded down.
        virtual_size: be64(&first, 24)? / 512 * 512,
        backing,
        backing_format,
        incompatible,
    })
}

/// Walks the header extensions in `first[start..end]`; the backing format, if one is recorded.
/// `None` (outer) when they are malformed.
fn extensions(first: &[u8], start: usize, end: usize) -> Option<Option<String>> {
    let end = end.min(first.len());
    let mut at = start;
    let mut format = None;
    while at + 8 <= end {
        let kind = be32(first, at)?;
        let len = usize::try_from(be32(first, at + 4)?).ok()?;
        at += 8;
        if kind == 0 {
            // QEMU writes the end marker with no data; anything else is left to qemu-img.
            return (len == 0).then_some(format);
        }
        let data = first.get(at..at.checked_add(len)?)?;
        if at + len > end {
            return None;
        }
        if kind == EXT_BACKING_FORMAT {
            if len == 0 || len > MAX_BACKING_FORMAT || data.contains(&0) {
                return None;
            }
            format = Some(String::from_utf8(data.to_vec()).ok()?);
        }
        // Each extension's data is padded to 8 bytes.
        at = at.checked_add(len.div_ceil(8) * 8)?;
    }
    // No end marker within bounds: QEMU would read on; leave it to qemu-img.
    None
}

/// The first `len` bytes of `f` (fewer when the file is shorter).
fn read_at(f: &std::fs::File, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    buf.truncate(n);
    Some(buf)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is needed for this test (Debian's qemu-utils)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What the reader answers equals what qemu-img says about the same file; what it
    /// declines is what it must not answer for.
    #[test]
    fn reads_what_qemu_img_reads_and_declines_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "64M"]);
        qemu_img(&["create", "-q", "-f", "raw", &p("base.raw"), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &p("v2.qcow2"),
            "8M",
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            &p("rel.qcow2"),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &p("base.raw"),
            &p("abs.qcow2"),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16384,extended_l2=on",
            "-F",
            "qcow2",
            "-b",
            "rel.qcow2",
            &p("small.qcow2"),
        ]);
        // No backing format recorded (older images; today's qemu-img makes none): the
        // extension's type overwritten with one nobody knows, which both must skip.
        let mut bytes = std::fs::read(p("rel.qcow2")).unwrap();
        let mut at = be32(&bytes, 100).unwrap() as usize;
        while be32(&bytes, at).unwrap() != EXT_BACKING_FORMAT {
            assert_ne!(be32(&bytes, at).unwrap(), 0, "no backing format extension");
            at += 8 + (be32(&bytes, at + 4).unwrap() as usize).div_ceil(8) * 8;
        }
        bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        std::fs::write(p("nofmt.qcow2"), &bytes).unwrap();
        for name in [
            "base.qcow2",
            "v2.qcow2",
            "rel.qcow2",
            "abs.qcow2",
            "small.qcow2",
            "nofmt.qcow2",
        ] {
            let out = Command::new("qemu-img")
                .args(["info", "-U", "--output=json", &p(name)])
                .output()
                .unwrap();
            let truth: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let h = read(Path::new(&p(name))).unwrap_or_else(|| panic!("{name} declined"));
            assert_eq!(truth["format"], "qcow2", "{name}");
            assert_eq!(
                Some(h.virtual_size),
                truth["virtual-size"].as_u64(),
                "{name}"
            );
            assert_eq!(
                h.backing.as_deref(),
                truth["backing-filename"].as_str(),
                "{name}"
            );
            assert_eq!(
                h.backing_format.as_deref(),
                truth["backing-filename-format"].as_str(),
                "{name}"
            );
        }
        assert_eq!(read(Path::new(&p("v2.qcow2"))).unwrap().version, 2);
        let nofmt = read(Path::new(&p("nofmt.qcow2"))).unwrap();
        assert_eq!(
            (nofmt.backing.as_deref(), nofmt.backing_format),
            (Some("base.qcow2"), None)
        );
        // Declined: not qcow2, missing, an external data file, encryption, a protocol is
        // the caller's to judge (the name is returned as written).
        assert!(read(Path::new(&p("base.raw"))).is_none());
        assert!(read(Path::new(&p("missing.qcow2"))).is_none());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p("data.raw")),
            &p("external.qcow2"),
            "8M",
        ]);
        assert!(read(Path::new(&p("external.qcow2"))).is_none());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &p("enc.qcow2"),
            "8M",
        ]);
        assert!(read(Path::new(&p("enc.qcow2"))).is_none());
        // A truncated header, and an unknown incompatible feature bit.
        let mut bytes = std::fs::read(p("rel.qcow2")).unwrap();
        std::fs::write(p("short.qcow2"), &bytes[..60]).unwrap();
        assert!(read(Path::new(&p("short.qcow2"))).is_none());
        bytes[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        std::fs::write(p("unknown.qcow2"), &bytes).unwrap();
        assert!(read(Path::new(&p("unknown.qcow2"))).is_none());
        // Headers qemu-img refuses: the compression bit with zlib, a refcount order of 7.
        for (name, at, value) in [("compress.qcow2", 72, 1u64 << 3), ("refcount.qcow2", 96, 7)] {
            let mut bytes = std::fs::read(p("rel.qcow2")).unwrap();
            if at == 72 {
                bytes[72..80].copy_from_slice(&value.to_be_bytes());
            } else {
                bytes[96..100].copy_from_slice(&u32::try_from(value).unwrap().to_be_bytes());
            }
            std::fs::write(p(name), &bytes).unwrap();
            let refused = !Command::new("qemu-img")
                .args(["info", "-U", &p(name)])
                .output()
                .unwrap()
                .status
                .success();
            assert!(refused, "qemu-img reads {name}");
            assert!(read(Path::new(&p(name))).is_none(), "{name}");
        }
        // A size that is not a multiple of 512 reads rounded down, as qemu-img says.
        let mut bytes = std::fs::read(p("base.qcow2")).unwrap();
        bytes[24..32].copy_from_slice(&1_048_676u64.to_be_bytes());
        std::fs::write(p("odd.qcow2"), &bytes).unwrap();
        let out = Command::new("qemu-img")
            .args(["info", "-U", "--output=json", &p("odd.qcow2")])
            .output()
            .unwrap();
        let truth: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            Some(read(Path::new(&p("odd.qcow2"))).unwrap().virtual_size),
            truth["virtual-size"].as_u64()
        );
        // Not a regular file: a FIFO nobody writes to is declined at once, never waited on.
        nix::unistd::mkfifo(Path::new(&p("fifo.qcow2")), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read(Path::new(&p("fifo.qcow2"))).is_none());
    }
}
