//! How the memory stream travels between QEMU and the memory file, without QEMU ever opening a
//! path in the store:
//! - QEMU ≥ 8.2: the file itself, as an fd in an fdset (`file:/dev/fdset/N,offset=4096`).
//! - older QEMU: a pipe (`fd:NAME` after `getfd`) that qsnap drains into the file on save, or
//!   fills from it on load. (`fd:` on a regular file is deprecated, so never that.)
//!
//! The copy runs on the blocking pool; it ends when QEMU closes its end (done, cancelled or
//! dead), so it can never outlive the migration.

use crate::error::{Error, Result};
use crate::snapshot::memfile::{FD_NAME, HEADER_LEN};
use crate::snapshot::rollback::{Rollback, Undo};
use qsnap_qmp::Qmp;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tokio::task::JoinHandle;

/// Whether this QEMU takes `file:` migration URIs (and so fdsets).
pub async fn has_file_uri(qmp: &Qmp) -> Result<bool> {
    Ok(crate::features::Features::of(qmp).await?.file_uri)
}

/// The save side, set up.
pub(crate) enum SaveStream {
    /// QEMU writes the file itself through the fdset.
    Fdset,
    /// qsnap copies from the pipe into the file.
    Pipe(JoinHandle<std::io::Result<u64>>),
}

impl SaveStream {
    /// Waits for the copy to drain (after QEMU reported completion).
    pub(crate) async fn finish(self, path: &Path) -> Result<()> {
        if let SaveStream::Pipe(copier) = self {
            copier
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                .map_err(|source| Error::Io {
                    what: "copying QEMU's memory stream into the memory file",
                    path: path.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// Hands the memory file (positioned after the header) to QEMU; returns the `migrate` URI.
pub(crate) async fn open_save(
    qmp: &Qmp,
    file: &File,
    file_uri: bool,
    rb: &mut Rollback<'_>,
) -> Result<(String, SaveStream)> {
    if file_uri {
        let fdset = qmp
            .add_fd(file, None, Some(FD_NAME))
            .await
            .map_err(Error::qmp("passing the memory file to QEMU"))?;
        rb.push(Undo::RemoveFdset);
        return Ok((
            format!("file:/dev/fdset/{},offset={HEADER_LEN}", fdset.fdset_id),
            SaveStream::Fdset,
        ));
    }
    let (read, write) = nix::unistd::pipe().map_err(|e| Error::Io {
        what: "creating a pipe for the memory stream",
        path: PathBuf::from("(pipe)"),
        source: e.into(),
    })?;
    qmp.getfd(FD_NAME, &write)
        .await
        .map_err(Error::qmp("passing the memory pipe to QEMU"))?;
    // Our copy of the write end must go, or the copy would never see the end of the stream.
    drop(write);
    rb.push(Undo::CloseFd(FD_NAME.into()));
    let mut out = file.try_clone().map_err(|source| Error::Io {
        what: "duplicating the memory file handle",
        path: PathBuf::from("(memory file)"),
        source,
    })?;
    let copier = tokio::task::spawn_blocking(move || {
        let mut input = File::from(read);
        std::io::copy(&mut input, &mut out)
    });
    Ok((format!("fd:{FD_NAME}"), SaveStream::Pipe(copier)))
}

/// The load side, set up.
pub(crate) enum LoadStream {
    /// QEMU reads through an fdset.
    Fdset(i64),
    /// qsnap copies the file into a pipe.
    Pipe(JoinHandle<()>),
}

/// Hands the memory file at `path` (stream of `stream_len` bytes after the header) to QEMU;
/// returns the `migrate-incoming` URI.
pub(crate) async fn open_load(
    qmp: &Qmp,
    path: &Path,
    stream_len: u64,
    file_uri: bool,
) -> Result<(String, LoadStream)> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source: std::io::Error| Error::Io { what, path, source }
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(io("opening the memory file"))?
        .into_std()
        .await;
    if file_uri {
        let fdset = qmp
            .add_fd(&file, None, Some(FD_NAME))
            .await
            .map_err(Error::qmp("passing the memory file to QEMU"))?;
        return Ok((
            format!("file:/dev/fdset/{},offset={HEADER_LEN}", fdset.fdset_id),
            LoadStream::Fdset(fdset.fdset_id),
        ));
    }
    let (read, write) = nix::unistd::pipe().map_err(|e| io("creating a pipe")(e.into()))?;
    qmp.getfd(FD_NAME, &read)
        .await
        .map_err(Error::qmp("passing the memory pipe to QEMU"))?;
    drop(read);
    let feeder = tokio::task::spawn_blocking(move || {
        let mut file = file;
        let mut pipe = File::from(write);
        // QEMU closing its end early (a failed load) ends the copy; the load reports why.
        let _ = file
            .seek(SeekFrom::Start(HEADER_LEN))
            .and_then(|_| std::io::copy(&mut file.by_ref().take(stream_len), &mut pipe));
    });
    Ok((format!("fd:{FD_NAME}"), LoadStream::Pipe(feeder)))
}

impl LoadStream {
    /// Releases what the load used.
    pub(crate) async fn finish(self, qmp: &Qmp) {
        match self {
            LoadStream::Fdset(id) => {
                let _ = qmp.remove_fd(id, None).await;
            }
            LoadStream::Pipe(feeder) => {
                // Ends by itself: at the end of the stream, or when QEMU closes its end.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), feeder).await;
            }
        }
    }
}
