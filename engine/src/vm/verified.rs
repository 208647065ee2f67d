//! What an earlier `check` verified, remembered per version of a file, so that a check of a
//! VM with a hundred snapshots does not read a hundred frozen files that cannot have changed.
//!
//! A version is the file's path, device, inode, size, mtime and ctime (`cache::key_of`), in
//! this boot (a power cut can keep a write's times and lose its data); ctime is set by the
//! kernel on every write and no one can set it back without setting the clock back. (A write
//! through a shared mapping sets it only when a clean page is first dirtied: the one writer
//! that maps a store file, `lazy-ram`'s helper, holds the VM's lock, as a check does.) A
//! result is remembered only when it was clean and the file had been still for
//! [`SETTLED`](crate::chains::SETTLED) before its read began, and had not changed by the end
//! of it (timestamps come from a coarse clock: a write right after a read could keep the time
//! the read saw). So a file written since, by anything, is read again.
//!
//! Only `check` remembers here, and only `check` trusts it; `check --full` reads everything.
//! A revert verifies memory on its own terms (`memfile::verify_cached`). Must never remember
//! a finding, or anything read from a file that was still changing.

use crate::cache::FileVersion as Version;
use crate::chains::settled;
use crate::image::{self, ImageCheck};
use crate::snapshot::memfile;
use crate::Result;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// The cache's kind for these entries (swept with the others when their file is gone).
const KIND: &str = crate::cache::CHECK;

/// One check's use of the remembered results.
#[derive(Debug)]
pub(super) struct Memo {
    /// Read everything (`--full`): nothing is trusted, clean results are still remembered.
    full: bool,
    /// Files not read again because an earlier check verified this very version.
    pub unchanged: usize,
}

impl Memo {
    pub(super) fn new(full: bool) -> Self {
        Memo { full, unchanged: 0 }
    }

    /// [`memfile::verify`] of a memory stream, its checksum read only when this version of
    /// the file was not verified before (its header and length always are).
    pub(super) async fn memory(
        &mut self,
        path: &Path,
        stream_len: u64,
        checksum: Option<&str>,
    ) -> Result<()> {
        let Some(sum) = checksum else {
            return memfile::verify(path.to_owned(), stream_len, None).await;
        };
        let what = format!("memory|{sum}");
        let read = async {
            memfile::verify(path.to_owned(), stream_len, Some(sum.to_owned())).await?;
            Ok(((), true))
        };
        if unless_known(self.full, path, &what, read).await?.is_none() {
            self.unchanged += 1;
            return memfile::verify(path.to_owned(), stream_len, None).await;
        }
        Ok(())
    }

    /// The check of a lazy snapshot's RAM image against its checksum, read only when this
    /// version was not verified before.
    pub(super) async fn ram_image(&mut self, path: &Path, checksum: &str) -> Result<()> {
        let what = format!("ram|{checksum}");
        let read = async {
            memfile::verify_ram_image(path.to_owned(), checksum.to_owned()).await?;
            Ok(((), true))
        };
        if unless_known(self.full, path, &what, read).await?.is_none() {
            self.unchanged += 1;
        }
        Ok(())
    }

    /// Whether files are read even when an earlier check verified them.
    pub(super) fn full(&self) -> bool {
        self.full
    }

    /// Counts what [`check_image`] did not read again.
    pub(super) fn note(&mut self, trusted: bool) {
        self.unchanged += usize::from(trusted);
    }
}

/// `qemu-img check` of one image read as `format`, or a clean result when this version of
/// the file, read as `format` by this `qemu-img`, checked clean before (and not `full`): the
/// result, and whether it was remembered rather than read. (A free function: a check runs a
/// few at a time.)
pub(super) async fn check_image(
    full: bool,
    path: &Path,
    format: Option<&str>,
    cancel: &CancellationToken,
) -> Result<(ImageCheck, bool)> {
    let what = image_check(format, crate::chains::reader_identity().await);
    let read = async {
        let r = image::check(path, format, cancel).await?;
        let clean = r.corruptions == 0 && r.check_errors == 0;
        Ok((r, clean))
    };
    Ok(match unless_known(full, path, &what, read).await? {
        Some(r) => (r, false),
        None => (ImageCheck::default(), true),
    })
}

/// For each of `images` (with the format each is read as), whether this version of it,
/// read as that format by this `qemu-img`, checked clean before — what [`check_image`] would
/// not read again. All looked at in one trip to the blocking pool; never true under `full`.
pub(super) async fn known_clean(full: bool, images: Vec<(PathBuf, Option<String>)>) -> Vec<bool> {
    if full {
        return vec![false; images.len()];
    }
    let reader = crate::chains::reader_identity().await;
    let files = images
        .into_iter()
        .map(|(path, format)| {
            let what = image_check(format.as_deref(), reader);
            let slot = slot_of(&path, &what);
            (path, slot, what)
        })
        .collect();
    let mut out = Vec::new();
    for (_, v) in crate::cache::versions_of(files).await {
        out.push(trusted(v.ok().as_ref()).await);
    }
    out
}

/// What a `qemu-img check` of an image read as `format` by the `qemu-img` `reader` is
/// remembered under.
fn image_check(format: Option<&str>, reader: &str) -> String {
    format!("image|{}|{reader}", format.unwrap_or("?"))
}

/// What `read` finds (and whether it is clean), or `None` without reading when this version
/// of `path` was found clean before under `what` and `full` is not asked for. A clean read is
/// remembered (see [`remember`]).
async fn unless_known<T>(
    full: bool,
    path: &Path,
    what: &str,
    read: impl std::future::Future<Output = Result<(T, bool)>>,
) -> Result<Option<T>> {
    let started = SystemTime::now();
    let before = version(path, what).await;
    if !full && trusted(before.as_ref()).await {
        return Ok(None);
    }
    let (found, clean) = read.await?;
    if clean {
        remember(path, what, before, started).await;
    }
    Ok(Some(found))
}

/// Whether a clean result about this very version was remembered.
async fn trusted(v: Option<&Version>) -> bool {
    match v {
        Some(v) => crate::cache::lookup_in::<bool>(KIND, &v.slot, &v.key).await == Some(true),
        None => false,
    }
}

/// This version of `path`, for the check `what` (`kind|detail`: one slot per kind of check
/// and file, whatever the detail; `None`: it cannot be read).
async fn version(path: &Path, what: &str) -> Option<Version> {
    crate::cache::version_of(path, slot_of(path, what), what).await
}

/// The slot of a check `what` of `path`: one per kind of check and file, whatever the detail.
fn slot_of(path: &Path, what: &str) -> String {
    let kind = what.split('|').next().unwrap_or(what);
    format!("{kind}|{}", path.display())
}

/// Remembers a clean result about version `before` of `path`, read from `started` on, if the
/// file had been still for [`SETTLED`](crate::chains::SETTLED) before and is still that
/// version now.
async fn remember(path: &Path, what: &str, before: Option<Version>, started: SystemTime) {
    let Some(before) = before else { return };
    if !settled(before.changed, started) {
        return;
    }
    let Some(after) = version(path, what).await else {
        return;
    };
    if after.key == before.key {
        crate::cache::remember_in(KIND, before.slot, before.key, &true).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;
    use std::time::Duration;

    /// A clean `qemu-img check` is remembered only for a file that had been still for
    /// [`SETTLED`](crate::chains::SETTLED), served only for that very version of it (a write,
    /// or times set back after one, is read again), and never under `full`.
    #[tokio::test]
    async fn only_a_settled_unchanged_file_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("i.qcow2");
        let made = Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                image.to_str().unwrap(),
                "16M",
            ])
            .status()
            .expect("qemu-img is needed for this test (Debian's qemu-utils)");
        assert!(made.success());
        let cancel = CancellationToken::new();
        let check = |full: bool| {
            let (image, cancel) = (image.clone(), cancel.clone());
            async move {
                let (r, trusted) = check_image(full, &image, Some("qcow2"), &cancel)
                    .await
                    .unwrap();
                assert_eq!((r.corruptions, r.check_errors), (0, 0));
                trusted
            }
        };
        // What a check finds in one go for many images agrees with each image's own look.
        let known = |full: bool| {
            let image = image.clone();
            async move { known_clean(full, vec![(image, Some("qcow2".into()))]).await == [true] }
        };
        // Fresh: read by every check.
        assert!(!known(false).await);
        assert!(!check(false).await);
        assert!(!check(false).await, "a file just written was remembered");
        // Settled: read once more, then trusted — but never under `full`.
        tokio::time::sleep(crate::chains::SETTLED + Duration::from_millis(300)).await;
        assert!(!check(false).await);
        assert!(
            known(false).await,
            "a settled, unchanged file is not known clean"
        );
        assert!(
            check(false).await,
            "a settled, unchanged file was read again"
        );
        assert!(!known(true).await, "`full` trusted a remembered result");
        assert!(!check(true).await, "`full` trusted a remembered result");
        // Known clean only as the format it was checked as.
        assert_eq!(
            known_clean(false, vec![(image.clone(), Some("raw".into()))]).await,
            [false]
        );
        // Written (its times then set back as they were): read again.
        let md = std::fs::metadata(&image).unwrap();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&image)
            .unwrap();
        use std::io::Write;
        (&f).write_all(&[0u8; 512]).unwrap();
        f.set_len(md.len()).unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_modified(md.modified().unwrap())
                .set_accessed(md.accessed().unwrap()),
        )
        .unwrap();
        drop(f);
        let now = std::fs::metadata(&image).unwrap();
        assert_eq!((now.len(), now.mtime()), (md.len(), md.mtime()));
        assert!(!known(false).await, "a file written since is known clean");
        assert!(!check(false).await, "a file written since was trusted");
    }
}
