//! The memory file: qsnap's 4 KiB header, then QEMU's migration stream.
//!
//! The header says whether the stream is complete, so an interrupted save can never be
//! mistaken for a good one: it is written "incomplete" before QEMU writes a byte, and flipped to
//! "complete" only after QEMU reported success and the stream was fsynced. The file is created
//! 0600 (O_EXCL: never overwrite) in a 0700 directory, because guest memory holds secrets.
//! All file I/O here runs on the blocking pool, never on a runtime worker.

use crate::error::{Error, Result};
use crate::store::blocking;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Size of qsnap's header; QEMU's stream starts here (`file:…,offset=HEADER_LEN`).
pub const HEADER_LEN: u64 = 4096;
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
pub async fn create(dir: PathBuf, path: PathBuf) -> Result<File> {
    blocking(move || {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating the snapshot directory", &dir))?;
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
        Ok(file)
    })
    .await
}

/// Fsyncs QEMU's stream, then marks the header complete and fsyncs again. Returns the stream
/// length.
pub async fn seal(file: File, path: PathBuf) -> Result<u64> {
    blocking(move || {
        file.sync_all()
            .map_err(io_err("flushing the memory file", &path))?;
        let len = file
            .metadata()
            .map_err(io_err("reading the memory file size", &path))?
            .len();
        let stream_len = len.saturating_sub(HEADER_LEN);
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
        Ok(stream_len)
    })
    .await
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
    let mut buf = vec![0u8; HEADER_LEN as usize];
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
        let len = seal(file, path.clone()).await.unwrap();
        assert_eq!(len, 11);
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
}
