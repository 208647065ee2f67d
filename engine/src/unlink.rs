//! The door every removal of an image or memory file goes through.
//!
//! Whoever decides that a file may go — `vm::refs::safe_unlink` (an image qsnap made for a
//! VM that nothing uses any more), `vm::refs::unlink_made` (an image an interrupted operation
//! made and nothing names), a rollback giving up the files its own create made, `check`
//! removing a memory file no snapshot names, `lazy-ram` replacing a stream, `remove` taking a
//! clone's images — the removal itself happens here, by one rule for what the file must look
//! like first:
//! - its path is absolute and plain (no `.` or `..` part: a hand-edited journal or record
//!   cannot climb out of where it points);
//! - it is a regular file (never a symlink or a directory), of the kind expected — a qcow2
//!   image, or a qsnap memory file (or empty: a crash between its creation and its first
//!   write);
//! - an image given up by [`made_by_this_operation`] goes only while it holds no data of its
//!   own, unless the caller knows its data is elsewhere (it was merged back).
//!
//! A doubt (the file cannot be read) keeps the file. This module never decides *whether*
//! something is still needed; that is the callers' job, and `vm/refs.rs` for images.

use crate::error::{Error, Result};
use crate::store;
use crate::store::plain_absolute;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// What a file must be before it may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A qcow2 image (an overlay qsnap made).
    Image,
    /// A qsnap memory file (header magic `QSNAPMEM`) or a RAM image of one; may be empty (a
    /// crash between its creation and its first write).
    Memory,
}

/// Whether an overlay's own data may be dropped with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Data {
    /// Only if it holds none: the guest may have written there, and those writes exist
    /// nowhere else.
    MustBeEmpty,
    /// Its data is elsewhere too (it was merged back into its base).
    MergedElsewhere,
}

/// Removes `path` — of `kind` — that this operation made, durably. A file already gone is
/// fine. Refuses (keeping it) anything that is not plainly such a file, and an image that
/// holds data of its own unless `data` says it is elsewhere too.
pub(crate) async fn made_by_this_operation(path: &Path, kind: Kind, data: Data) -> Result<()> {
    let Some(len) = looks_right(path, kind).await? else {
        return Ok(());
    };
    if kind == Kind::Image && data == Data::MustBeEmpty && len > 0 {
        let has_data = crate::image::has_own_data(path, &CancellationToken::new())
            .await
            .map_err(|e| refused(path, format!("cannot tell whether it holds data ({e})")))?;
        if has_data {
            return Err(refused(
                path,
                "it holds data of its own (writes the guest made)".into(),
            ));
        }
    }
    remove(path).await
}

/// The last step of every removal: the checks above, then the unlink and a sync of the
/// directory. A file already gone is success.
pub(crate) async fn checked(path: &Path, kind: Kind) -> Result<()> {
    if looks_right(path, kind).await?.is_none() {
        return Ok(());
    }
    remove(path).await
}

async fn remove(path: &Path) -> Result<()> {
    let p = path.to_owned();
    store::blocking(move || store::remove_durably(&p)).await
}

fn refused(path: &Path, why: String) -> Error {
    Error::UnlinkRefused {
        path: path.to_owned(),
        why,
    }
}

/// `Ok(Some(length))`: the file is there and is what `kind` says (or empty: a crash between
/// its creation and its first write); `Ok(None)`: it is already gone; an error: it must stay.
async fn looks_right(path: &Path, kind: Kind) -> Result<Option<u64>> {
    if !plain_absolute(path) {
        return Err(refused(
            path,
            "its path is not absolute and plain (a `.` or `..` part, or relative)".into(),
        ));
    }
    let p = path.to_owned();
    store::blocking(move || {
        use std::io::Read;
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Io {
                    what: "looking at a file before removing it",
                    path: p.clone(),
                    source: e,
                })
            }
        };
        if !meta.file_type().is_file() {
            return Err(refused(&p, "it is not a regular file".into()));
        }
        let mut magic = [0u8; 8];
        let mut f = std::fs::File::open(&p).map_err(|e| Error::Io {
            what: "reading a file before removing it",
            path: p.clone(),
            source: e,
        })?;
        let n = f.read(&mut magic).map_err(|e| Error::Io {
            what: "reading a file before removing it",
            path: p.clone(),
            source: e,
        })?;
        let ok = n == 0
            || match kind {
                Kind::Image => n >= 4 && &magic[..4] == b"QFI\xfb",
                // A memory file starts with its header; a RAM image is guest RAM from byte 0.
                Kind::Memory => {
                    (n == 8 && &magic == b"QSNAPMEM") || p.extension().is_some_and(|x| x == "ram")
                }
            };
        if !ok {
            return Err(refused(
                &p,
                match kind {
                    Kind::Image => "it is not a qcow2 image".into(),
                    Kind::Memory => "it is not a qsnap memory file".into(),
                },
            ));
        }
        Ok(Some(meta.len()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_what_is_not_plainly_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.qcow2");
        std::fs::write(&text, b"hello").unwrap();
        assert!(checked(&text, Kind::Image).await.is_err());
        assert!(checked(&text, Kind::Memory).await.is_err());
        assert!(text.exists());
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&text, &link).unwrap();
        assert!(checked(&link, Kind::Image).await.is_err());
        assert!(link.exists());
        let climbing = dir.path().join("sub/../notes.qcow2");
        assert!(checked(&climbing, Kind::Image).await.is_err());
        // Gone already: fine.
        assert!(checked(&dir.path().join("gone.qcow2"), Kind::Image)
            .await
            .is_ok());
        let mem = dir.path().join("s1.mem");
        std::fs::write(&mem, b"QSNAPMEM\0\0\0\0").unwrap();
        checked(&mem, Kind::Memory).await.unwrap();
        assert!(!mem.exists());
    }
}
