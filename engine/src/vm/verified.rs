//! What an earlier `check` verified, remembered per version of a file, so that a check of a
//! VM with a hundred snapshots does not read a hundred frozen files that cannot have changed.
//!
//! A version is the file's path, device, inode, size, mtime and ctime (`cache::key_of`);
//! ctime is set by the kernel on every write and no one can set it back without setting the
//! clock back. A result is remembered only when it was clean and the file had been still for
//! [`SETTLED`] before its read began, and had not changed by the end of it (timestamps come
//! from a coarse clock: a write right after a read could keep the time the read saw). So a
//! file written since, by anything, is read again.
//!
//! Only `check` remembers here, and only `check` trusts it; `check --full` reads everything.
//! A revert verifies memory on its own terms (`memfile::verify_cached`). Must never remember
//! a finding, or anything read from a file that was still changing.

use crate::chains::SETTLED;
use crate::image::{self, ImageCheck};
use crate::snapshot::memfile;
use crate::Result;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// The cache's kind for these entries (swept with the others when their file is gone).
pub(crate) const KIND: &str = "check";

/// One check's use of the remembered results.
#[derive(Debug)]
pub(super) struct Memo {
    /// Read everything (`--full`): nothing is trusted, clean results are still remembered.
    full: bool,
    /// Files not read again because an earlier check verified this very version.
    pub unchanged: usize,
}

/// One version of one file, as this module keys it.
struct Version {
    slot: String,
    key: String,
    changed: SystemTime,
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
        let started = SystemTime::now();
        let before = version(path, &what).await;
        if self.trusts(before.as_ref()).await {
            self.unchanged += 1;
            return memfile::verify(path.to_owned(), stream_len, None).await;
        }
        memfile::verify(path.to_owned(), stream_len, Some(sum.to_owned())).await?;
        remember(path, &what, before, started).await;
        Ok(())
    }

    /// The check of a lazy snapshot's RAM image against its checksum, read only when this
    /// version was not verified before.
    pub(super) async fn ram_image(&mut self, path: &Path, checksum: &str) -> Result<()> {
        let what = format!("ram|{checksum}");
        let started = SystemTime::now();
        let before = version(path, &what).await;
        if self.trusts(before.as_ref()).await {
            self.unchanged += 1;
            return Ok(());
        }
        memfile::verify_ram_image(path.to_owned(), checksum.to_owned()).await?;
        remember(path, &what, before, started).await;
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

    async fn trusts(&self, v: Option<&Version>) -> bool {
        !self.full && trusted(v).await
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
    let what = format!(
        "image|{}|{}",
        format.unwrap_or("?"),
        crate::chains::reader_identity().await
    );
    let started = SystemTime::now();
    let before = version(path, &what).await;
    if !full && trusted(before.as_ref()).await {
        return Ok((ImageCheck::default(), true));
    }
    let r = image::check(path, format, cancel).await?;
    if r.corruptions == 0 && r.check_errors == 0 {
        remember(path, &what, before, started).await;
    }
    Ok((r, false))
}

/// Whether a clean result about this very version was remembered.
async fn trusted(v: Option<&Version>) -> bool {
    match v {
        Some(v) => crate::cache::lookup_in::<bool>(KIND, &v.slot, &v.key).await == Some(true),
        None => false,
    }
}

/// This version of `path`, for the check `what` (`None`: it cannot be read).
async fn version(path: &Path, what: &str) -> Option<Version> {
    let md = tokio::fs::metadata(path).await.ok()?;
    Some(Version {
        slot: format!("{what}|{}", path.display()),
        key: crate::cache::key_of(path, &md, what),
        changed: at(md.mtime(), md.mtime_nsec()).max(at(md.ctime(), md.ctime_nsec())),
    })
}

/// Remembers a clean result about version `before` of `path`, read from `started` on, if the
/// file had been still for [`SETTLED`] before and is still that version now.
async fn remember(path: &Path, what: &str, before: Option<Version>, started: SystemTime) {
    let Some(before) = before else { return };
    // (A clock set back during the read could make a fresh change look settled.)
    if before.changed + SETTLED >= started || SystemTime::now() < started {
        return;
    }
    let Some(after) = version(path, what).await else {
        return;
    };
    if after.key == before.key {
        crate::cache::remember_in(KIND, before.slot, before.key, &true).await;
    }
}

fn at(secs: i64, nsecs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(secs).unwrap_or(0),
            u32::try_from(nsecs).unwrap_or(0),
        )
}
