//! The memory file: qsnap's 4 KiB header, then QEMU's migration stream.
//!
//! The header says whether the stream is complete, so an interrupted save can never be
//! mistaken for a good one: it is written "incomplete" before QEMU writes a byte, and flipped to
//! "complete" only after QEMU reported success and the stream was fsynced. The file is created
//! 0600 (O_EXCL: never overwrite) in a 0700 directory, because guest memory holds secrets.
//! A checksum of the stream (xxh3-128) is computed when the file is sealed and recorded in the
//! manifest; a revert recomputes it before it touches the VM, so a bit flipped or a stream
//! cut short after the header is caught while the old QEMU still runs.
//! All file I/O here runs on the blocking pool, never on a runtime worker.

use crate::error::{Error, Result};
use crate::store::blocking;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The name (opaque or `getfd` name) of the memory file's descriptor in QEMU.
pub(crate) const FD_NAME: &str = "qsnap-memory";

/// Size of qsnap's header; QEMU's stream starts here (`file:…,offset=HEADER_LEN`).
pub const HEADER_LEN: u64 = 4096;
const HEADER_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"QSNAPMEM";
const VERSION: u32 = 1;
const STATE_INCOMPLETE: u32 = 0;
const STATE_COMPLETE: u32 = 1;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// True once the save finished and was fsynced.
    pub complete: bool,
    /// Length of QEMU's stream after the header (0 while incomplete).
    pub stream_len: u64,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (0700, if missing) and the memory file in it (0600, must not exist), with an
/// "incomplete" header. Returns the open file, for handing to QEMU.
pub(crate) async fn create(dir: PathBuf, path: PathBuf) -> Result<File> {
    blocking(move || {
        // Its name durable too, or a power cut takes the sealed file along with it.
        crate::store::create_dir_durably(&dir, 0o700)?;
        // An existing directory keeps its mode; memory must still not be readable by others.
        let mode = std::fs::metadata(&dir)
            .map_err(io_err("reading the snapshot directory", &dir))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("restricting the snapshot directory to 0700", &dir))?;
        }
        // Write-only: QEMU picks an fdset member whose access mode matches the URI's (O_WRONLY).
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::TargetExists { path: path.clone() }
                } else {
                    io_err("creating the memory file", &path)(source)
                }
            })?;
        file.write_all(&encode(Header {
            complete: false,
            stream_len: 0,
        }))
        .map_err(io_err("writing the memory file header", &path))?;
        // The new name must survive a crash too, or a recovery could not find the file.
        crate::store::sync_dir(&dir)?;
        Ok(file)
    })
    .await
}

/// A sealed memory file: its stream's length and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sealed {
    /// Bytes of QEMU's stream.
    pub stream_len: u64,
    /// `xxh3-128:<hex>` of the stream.
    pub checksum: String,
}

/// Fsyncs QEMU's stream, checksums it, then marks the header complete and fsyncs again.
pub(crate) async fn seal(file: File, path: PathBuf) -> Result<Sealed> {
    blocking(move || {
        file.sync_all()
            .map_err(io_err("flushing the memory file", &path))?;
        let len = file
            .metadata()
            .map_err(io_err("reading the memory file size", &path))?
            .len();
        let stream_len = len.saturating_sub(HEADER_LEN);
        // The file was opened write-only (for QEMU's fdset); read it back through a new handle.
        let checksum = checksum_of(&path, HEADER_LEN, stream_len)?;
        file.write_all_at(
            &encode(Header {
                complete: true,
                stream_len,
            }),
            0,
        )
        .map_err(io_err("marking the memory file complete", &path))?;
        file.sync_all()
            .map_err(io_err("flushing the memory file header", &path))?;
        Ok(Sealed {
            stream_len,
            checksum,
        })
    })
    .await
}

/// Reads `len` bytes from `offset` and checks their checksum is `expected` (blocking).
fn compare_checksum(path: &Path, offset: u64, len: u64, expected: &str) -> Result<()> {
    let found = checksum_of(path, offset, len)?;
    if found == expected {
        Ok(())
    } else {
        Err(Error::BadMemoryFile {
            path: path.to_owned(),
            why: format!(
                "its contents changed since the snapshot (checksum {found}, recorded {expected})"
            ),
        })
    }
}

/// The checksum of the `stream_len` bytes from `offset` (blocking). Holes count as the
/// zeros they read as, but are hashed without being read: reading a hole makes the kernel
/// fill page-cache pages with zeros, 0.9 s for a 512 MiB mapped-ram file or RAM image here,
/// against a few milliseconds to hash the zeros. So the checksum is of the contents alone,
/// the same for a sparse file and a dense copy of it.
fn checksum_of(path: &Path, offset: u64, stream_len: u64) -> Result<String> {
    let read_err = io_err("reading the memory file", path);
    let mut f = File::open(path).map_err(io_err("reading the memory file", path))?;
    let end = offset
        .checked_add(stream_len)
        .ok_or_else(|| Error::BadMemoryFile {
            path: path.to_owned(),
            why: format!("its recorded stream length {stream_len} is impossible"),
        })?;
    let len = f.metadata().map_err(read_err)?.len();
    if len < end {
        return Err(Error::BadMemoryFile {
            path: path.to_owned(),
            why: format!("it ends {} bytes before its stream does", end - len),
        });
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let zeros = vec![0u8; 1 << 20];
    let mut pos = offset;
    while pos < end {
        // Clamped: an lseek answer before `pos` would loop, one past `end` is only holes.
        let data = next_data(&f, pos).clamp(pos, end);
        let mut hole = data - pos;
        while hole > 0 {
            let n = usize::try_from(hole).map_or(zeros.len(), |h| h.min(zeros.len()));
            hasher.update(&zeros[..n]);
            hole -= n as u64;
        }
        pos = data;
        if pos == end {
            break;
        }
        // No progress (a filesystem that answers oddly, a hole punched meanwhile): read to
        // the end instead of looping.
        let mut data_end = next_hole(&f, pos).min(end);
        if data_end <= pos {
            data_end = end;
        }
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(pos))
            .map_err(io_err("reading the memory file", path))?;
        while pos < data_end {
            let want = usize::try_from((data_end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            let n = f
                .read(&mut buf[..want])
                .map_err(io_err("reading the memory file", path))?;
            if n == 0 {
                return Err(Error::BadMemoryFile {
                    path: path.to_owned(),
                    why: format!("it ends {} bytes before its stream does", end - pos),
                });
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
    }
    // Holes past a truncation would have hashed as zeros: the file must still be whole.
    let now = f
        .metadata()
        .map_err(io_err("reading the memory file", path))?
        .len();
    if now < end {
        return Err(Error::BadMemoryFile {
            path: path.to_owned(),
            why: format!("it shrank while being read (now {now} bytes)"),
        });
    }
    Ok(format!("xxh3-128:{:032x}", hasher.digest128()))
}

/// Where data starts at or after `pos`: `u64::MAX` when only a hole follows; `pos` itself
/// when the filesystem cannot tell (then everything is read).
fn next_data(f: &File, pos: u64) -> u64 {
    seek(f, pos, nix::unistd::Whence::SeekData).unwrap_or_else(|e| match e {
        nix::errno::Errno::ENXIO => u64::MAX,
        _ => pos,
    })
}

/// Where the data at `pos` ends (end of file when the filesystem cannot tell).
fn next_hole(f: &File, pos: u64) -> u64 {
    seek(f, pos, nix::unistd::Whence::SeekHole).unwrap_or(u64::MAX)
}

fn seek(f: &File, pos: u64, whence: nix::unistd::Whence) -> nix::Result<u64> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(pos).map_err(|_| nix::errno::Errno::EOVERFLOW)?;
    nix::unistd::lseek(f.as_raw_fd(), off, whence).map(|o| o as u64)
}

/// How [`verify_cached`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verified {
    /// The whole stream was read and its checksum matched.
    Read,
    /// Header and length checked; the checksum matched before, for this very file (inode,
    /// size, mtime and ctime unchanged since, so it was not written since).
    Remembered,
}

/// [`verify`], but a file whose checksum matched before and that was not written since
/// (same inode, size, mtime and ctime — ctime no one can set back) is not read again: a
/// snapshot reverted to again and again is read once. `qsnap check` always reads it all.
pub(crate) async fn verify_cached(
    path: PathBuf,
    stream_len: u64,
    checksum: Option<String>,
) -> Result<Verified> {
    let Some(expected) = checksum.clone() else {
        verify(path, stream_len, None).await?;
        return Ok(Verified::Read);
    };
    let identity = identity("verified", &path, &expected).await;
    if let Some(key) = &identity {
        if crate::cache::lookup::<bool>(key).await == Some(true) {
            verify(path, stream_len, None).await?;
            return Ok(Verified::Remembered);
        }
    }
    verify(path, stream_len, checksum).await?;
    if let Some(key) = identity {
        crate::cache::remember(key, &true).await;
    }
    Ok(Verified::Read)
}

/// The cache key of one version of a file with a checksum (`None`: it cannot be read, so
/// nothing is remembered for it and the full check says why).
async fn identity(what: &str, path: &Path, checksum: &str) -> Option<String> {
    crate::cache::file_key(path, &format!("{what}|{checksum}")).await
}

/// Checks a lazy snapshot's RAM image against its checksum — reading all of it only when this
/// version of the file (inode, size, mtime, ctime) was not checked before: a lazy revert must
/// not pay for reading all of RAM, but an image that changed is never mapped unread.
pub(crate) async fn verify_ram_cached(path: PathBuf, checksum: String) -> Result<Verified> {
    let key = identity("ram-verified", &path, &checksum).await;
    if let Some(key) = &key {
        if crate::cache::lookup::<bool>(key).await == Some(true) {
            return Ok(Verified::Remembered);
        }
    }
    verify_ram_image(path, checksum).await?;
    if let Some(key) = key {
        crate::cache::remember(key, &true).await;
    }
    Ok(Verified::Read)
}

/// Remembers that this version of a RAM image has `checksum` (it was just computed).
pub(crate) async fn remember_ram_verified(path: &Path, checksum: &str) {
    if let Some(key) = identity("ram-verified", path, checksum).await {
        crate::cache::remember(key, &true).await;
    }
}

/// Checks a memory file against what its snapshot recorded: header complete, length and
/// checksum right. Reads the whole stream (the cost is reported by revert).
pub async fn verify(path: PathBuf, stream_len: u64, checksum: Option<String>) -> Result<()> {
    let header = read_header(path.clone()).await?;
    if !header.complete {
        return Err(Error::BadMemoryFile {
            path,
            why: "it is incomplete (the save never finished)".into(),
        });
    }
    let len = tokio::fs::metadata(&path)
        .await
        .map_err(io_err("reading the memory file size", &path))?
        .len();
    if len != HEADER_LEN + header.stream_len || header.stream_len != stream_len {
        return Err(Error::BadMemoryFile {
            path,
            why: format!(
                "it has {len} bytes, the snapshot wrote {} (truncated or changed)",
                HEADER_LEN + stream_len
            ),
        });
    }
    let Some(expected) = checksum else {
        return Ok(()); // a snapshot from before checksums: length only
    };
    blocking(move || compare_checksum(&path, HEADER_LEN, stream_len, &expected)).await
}

/// Reads and checks a memory file's header.
pub async fn read_header(path: PathBuf) -> Result<Header> {
    blocking(move || {
        let mut buf = [0u8; 24];
        File::open(&path)
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(io_err("reading the memory file header", &path))?;
        decode(&buf).ok_or_else(|| Error::BadMemoryFile {
            path: path.clone(),
            why: "no qsnap header (not a qsnap memory file, or a newer version)".into(),
        })
    })
    .await
}

fn encode(h: Header) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_BYTES];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let state = if h.complete {
        STATE_COMPLETE
    } else {
        STATE_INCOMPLETE
    };
    buf[12..16].copy_from_slice(&state.to_le_bytes());
    buf[16..24].copy_from_slice(&h.stream_len.to_le_bytes());
    buf
}

fn decode(buf: &[u8; 24]) -> Option<Header> {
    let word = |r: std::ops::Range<usize>| u32::from_le_bytes(buf[r].try_into().unwrap());
    if &buf[..8] != MAGIC || word(8..12) != VERSION {
        return None;
    }
    let complete = match word(12..16) {
        STATE_COMPLETE => true,
        STATE_INCOMPLETE => false,
        _ => return None,
    };
    let stream_len = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    Some(Header {
        complete,
        stream_len,
    })
}

/// Creates a RAM image for lazy RAM: `size` bytes of holes, 0600, never over an existing
/// file (the memory directory exists: the snapshot's stream is in it).
pub(crate) async fn create_ram_image(path: PathBuf, size: u64) -> Result<()> {
    blocking(move || {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => Error::TargetExists { path: path.clone() },
                _ => Error::Io {
                    what: "creating the RAM image",
                    path: path.clone(),
                    source,
                },
            })?;
        f.set_len(size)
            .map_err(io_err("sizing the RAM image", &path))?;
        // The name must survive a crash too: a leftover is found (and never overwritten).
        crate::store::sync_dir(path.parent().unwrap_or(Path::new(".")))
    })
    .await
}

/// Makes a RAM image QEMU filled durable and returns its checksum (whole file; holes read as
/// zeros).
pub(crate) async fn seal_ram_image(path: PathBuf) -> Result<String> {
    blocking(move || {
        let f = File::open(&path).map_err(io_err("opening the RAM image", &path))?;
        f.sync_all()
            .map_err(io_err("flushing the RAM image", &path))?;
        let len = f
            .metadata()
            .map_err(io_err("reading the RAM image size", &path))?
            .len();
        checksum_of(&path, 0, len)
    })
    .await
}

/// Checks a RAM image against its recorded checksum (reads all of it).
pub(crate) async fn verify_ram_image(path: PathBuf, checksum: String) -> Result<()> {
    blocking(move || {
        let len = std::fs::metadata(&path)
            .map_err(io_err("reading the RAM image", &path))?
            .len();
        compare_checksum(&path, 0, len, &checksum)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn created_private_incomplete_then_sealed_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snaps/vm1");
        let path = dir.join("s1.mem");
        let file = create(dir.clone(), path.clone()).await.unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let h = read_header(path.clone()).await.unwrap();
        assert!(!h.complete);
        file.write_all_at(b"QEVM-stream", HEADER_LEN).unwrap();
        let sealed = seal(file, path.clone()).await.unwrap();
        assert_eq!(sealed.stream_len, 11);
        verify(path.clone(), 11, Some(sealed.checksum.clone()))
            .await
            .unwrap();
        // One flipped bit after the header is caught; so is a cut.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"P", HEADER_LEN + 1).unwrap();
        let err = verify(path.clone(), 11, Some(sealed.checksum.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("contents changed"), "{err}");
        f.set_len(HEADER_LEN + 5).unwrap();
        let err = verify(path.clone(), 11, Some(sealed.checksum))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let h = read_header(path.clone()).await.unwrap();
        assert_eq!(
            h,
            Header {
                complete: true,
                stream_len: 11
            }
        );
        // Never overwrite.
        let err = create(dir, path).await.unwrap_err();
        assert!(matches!(err, Error::TargetExists { .. }), "{err}");
    }

    #[test]
    fn holes_hash_as_the_zeros_they_read_as() {
        let tmp = tempfile::tempdir().unwrap();
        let sparse = tmp.path().join("sparse");
        let dense = tmp.path().join("dense");
        // Data, a 3 MiB hole, data, then a hole to the end: as mapped-ram and RAM images are.
        let size: u64 = 8 << 20;
        let len = 8usize << 20;
        let f = File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"head", 4096).unwrap();
        f.write_all_at(b"middle", (4 << 20) + 17).unwrap();
        let mut all = vec![0u8; len];
        all[4096..4100].copy_from_slice(b"head");
        all[(4 << 20) + 17..(4 << 20) + 23].copy_from_slice(b"middle");
        std::fs::write(&dense, &all).unwrap();
        let a = checksum_of(&sparse, 0, size).unwrap();
        assert_eq!(a, checksum_of(&dense, 0, size).unwrap());
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&all[100..]);
        assert_eq!(
            checksum_of(&sparse, 100, size - 100).unwrap(),
            format!("xxh3-128:{:032x}", h.digest128())
        );
        // A change inside a hole is seen; so is a file shorter than its stream.
        f.write_all_at(b"x", 2 << 20).unwrap();
        assert_ne!(a, checksum_of(&sparse, 0, size).unwrap());
        let err = checksum_of(&sparse, 0, size + 1).unwrap_err();
        assert!(err.to_string().contains("ends 1 bytes before"), "{err}");
    }
}
