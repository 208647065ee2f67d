//! Disk image files, offline: everything qsnap does with `qemu-img` — create an overlay,
//! read a backing chain, ask whether a layer holds data of its own, merge two layers (commit
//! down, or rebase up), check an image. Every call is bounded and cancellable (`tool.rs`).
//!
//! Rules kept here: an image is created only where no file is (an O_EXCL placeholder, 0600 —
//! guest disk data is private — is made first and `qemu-img` writes into it), and nothing here
//! ever unlinks a file: deciding what may go is the callers' job.

use crate::error::{Error, Result};
use crate::store::{blocking, ImageStamp};
use crate::tool;
use serde::Deserialize;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Quick metadata work (create an overlay, read headers).
const QUICK: Duration = Duration::from_secs(60);
/// Data-copying work (commit, safe rebase): bounded, but generously — a big layer takes time.
const LONG: Duration = Duration::from_secs(6 * 3600);

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// Creates an empty qcow2 image of `size` bytes with no backing file, never over an existing
/// file (the lazy-RAM helper's stand-in disks; a test harness's blank disks). Public as
/// `create_blank_image`: it can only make a new file.
pub async fn create_blank(path: &Path, size: u64, cancel: &CancellationToken) -> Result<()> {
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string());
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        return Err(Error::TargetExists {
            path: path.to_owned(),
        });
    }
    tool::run(cmd, "qemu-img create", path, QUICK, cancel)
        .await
        .map(drop)
}

/// Creates a qcow2 overlay at `overlay` over `backing` (absolute path, format `format`),
/// `size` bytes, without opening the backing (`-u`: a running QEMU holds it). Refuses when
/// anything exists at `overlay`; the file is 0600.
pub async fn create_overlay(
    overlay: &Path,
    backing: &Path,
    format: &str,
    size: u64,
    cancel: &CancellationToken,
) -> Result<()> {
    let placeholder = overlay.to_owned();
    blocking(move || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&placeholder)
            .map(drop)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::TargetExists {
                        path: placeholder.clone(),
                    }
                } else {
                    Error::Io {
                        what: "creating an overlay file",
                        path: placeholder.clone(),
                        source,
                    }
                }
            })
    })
    .await?;
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2", "-u", "-F", format, "-b"])
        .arg(backing)
        .arg(overlay)
        .arg(size.to_string());
    let made = tool::run(cmd, "qemu-img create", overlay, QUICK, cancel).await;
    if made.is_err() {
        // Ours, and empty or half-written: it goes.
        let _ = tokio::fs::remove_file(overlay).await;
    }
    made?;
    // Durable before anything names it: a record or manifest that survives a power cut must
    // not name an overlay whose header, or whose directory entry, did not.
    fsync(overlay, "syncing a new overlay").await?;
    let dir = overlay.parent().unwrap_or(Path::new(".")).to_owned();
    blocking(move || crate::store::sync_dir(&dir)).await
}

/// `fsync` of one file (its data and metadata), on the blocking pool.
async fn fsync(path: &Path, what: &'static str) -> Result<()> {
    let p = path.to_owned();
    blocking(move || {
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|source| Error::Io {
                what,
                path: p.clone(),
                source,
            })
    })
    .await
}

/// One image of a backing chain, as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainImage {
    /// The image file.
    pub filename: PathBuf,
    /// Its format.
    pub format: String,
    /// Its backing file, resolved (absolute), if it has one.
    #[serde(default)]
    pub full_backing_filename: Option<PathBuf>,
    /// Its backing file's format, if recorded.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// Virtual size.
    #[serde(default)]
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// The backing file as the header names it (unresolved).
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// Format-specific facts (for qcow2: `data.data-file`, an external data file).
    #[serde(default)]
    pub format_specific: Option<serde_json::Value>,
}

/// An image's backing chain, top first (`qemu-img info -U --backing-chain`). `-U` reads
/// without a lock: the result for an image a running QEMU writes may lag behind it, so for
/// a running VM ask QEMU instead.
pub async fn chain(image: &Path, cancel: &CancellationToken) -> Result<Vec<ChainImage>> {
    read_info(image, None, true, cancel).await
}

/// [`chain`] of an image read as `format` (no probing: what the header above it says it is).
pub async fn chain_as(
    image: &Path,
    format: &str,
    cancel: &CancellationToken,
) -> Result<Vec<ChainImage>> {
    read_info(image, Some(format), true, cancel).await
}

/// One image alone, read as `format` (no probing: an image from elsewhere is read as what
/// it is declared to be).
pub async fn info_as(image: &Path, format: &str, cancel: &CancellationToken) -> Result<ChainImage> {
    info_with(image, Some(format), cancel).await
}

/// Refuses an image another process has open for writing (a QEMU started outside qsnap on
/// it): `qemu-img info` without `-U` takes the image's shared lock, which QEMU's write lock
/// denies. For work that must not run beside a writer (freezing the image offline).
pub async fn refuse_if_open(image: &Path, format: &str, cancel: &CancellationToken) -> Result<()> {
    let mut cmd = qemu_img();
    cmd.args(["info", "--output=json", "-f", format]).arg(image);
    match tool::run(cmd, "qemu-img info", image, QUICK, cancel).await {
        Ok(_) => Ok(()),
        Err(Error::Tool { why, .. }) if why.contains("lock") => Err(Error::DiskNotSnapshottable {
            device: image.display().to_string(),
            why: format!("another process has it open for writing ({why}); stop it first"),
        }),
        Err(e) => Err(e),
    }
}

/// Whether a qcow2 image's header asks for an external data file (incompatible feature bit
/// 2 of a version-3 header): read here, before any tool opens the image.
pub fn qcow2_has_data_file(image: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut h = [0u8; 80];
    let mut f = std::fs::File::open(image)?;
    let n = f.read(&mut h)?;
    if n < 80 || &h[..4] != b"QFI\xfb" || u32::from_be_bytes([h[4], h[5], h[6], h[7]]) < 3 {
        return Ok(false);
    }
    let incompatible = u64::from_be_bytes(h[72..80].try_into().expect("8 bytes"));
    Ok(incompatible & 0b100 != 0)
}

/// One image alone (its own header).
pub async fn info(image: &Path, cancel: &CancellationToken) -> Result<ChainImage> {
    info_with(image, None, cancel).await
}

async fn info_with(
    image: &Path,
    format: Option<&str>,
    cancel: &CancellationToken,
) -> Result<ChainImage> {
    read_info(image, format, false, cancel).await
}

/// `qemu-img info -U` of `image` (read as `format`, else probed), alone or with its backing
/// chain (then a list, top first).
async fn read_info<T: serde::de::DeserializeOwned>(
    image: &Path,
    format: Option<&str>,
    backing_chain: bool,
    cancel: &CancellationToken,
) -> Result<T> {
    let mut cmd = qemu_img();
    cmd.args(["info", "-U", "--output=json"]);
    if backing_chain {
        cmd.arg("--backing-chain");
    }
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    cmd.arg(image);
    let out = tool::run(cmd, "qemu-img info", image, QUICK, cancel).await?;
    serde_json::from_slice(&out.stdout).map_err(|e| Error::Tool {
        tool: "qemu-img info".into(),
        path: image.to_owned(),
        why: format!("unreadable output: {e}"),
    })
}

#[derive(Deserialize)]
struct MapEntry {
    depth: u64,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    data: bool,
    #[serde(default)]
    zero: bool,
}

/// Whether the top image holds any cluster of its own (data or zeroes that hide its
/// backing): an overlay the guest never wrote to has none. Only meaningful while no QEMU has
/// the image open (QEMU may not have written its metadata yet).
pub async fn has_own_data(image: &Path, cancel: &CancellationToken) -> Result<bool> {
    let mut cmd = qemu_img();
    cmd.args(["map", "-U", "--output=json"]).arg(image);
    let out = tool::run(cmd, "qemu-img map", image, QUICK, cancel).await?;
    let map: Vec<MapEntry> = serde_json::from_slice(&out.stdout).map_err(|e| Error::Tool {
        tool: "qemu-img map".into(),
        path: image.to_owned(),
        why: format!("unreadable output: {e}"),
    })?;
    Ok(map
        .iter()
        .any(|m| m.depth == 0 && m.present.unwrap_or(m.data || m.zero)))
}

/// Copies `top`'s data down into its backing file (`qemu-img commit -d`: `top` keeps its
/// data, so until its children are moved it stays valid).
pub async fn commit(
    top: &Path,
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<()> {
    let mut cmd = qemu_img();
    cmd.args(["commit", "-p", "-d"]).arg(top);
    tool::run_with_progress(cmd, "qemu-img commit", top, LONG, cancel, progress).await
}

/// Moves `image` onto `backing` (format `format`) keeping its content: whatever differs
/// between the old and the new backing is copied into `image` first (a safe `rebase`, the
/// offline form of a block-stream).
pub async fn rebase_keeping_content(
    image: &Path,
    backing: &Path,
    format: &str,
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<()> {
    let mut cmd = qemu_img();
    cmd.args(["rebase", "-p"]);
    if backing.as_os_str().is_empty() {
        // No new backing: the image takes in everything and stands alone.
        cmd.args(["-b", ""]);
    } else {
        cmd.args(["-F", format, "-b"]).arg(backing);
    }
    cmd.arg(image);
    tool::run_with_progress(cmd, "qemu-img rebase", image, LONG, cancel, progress).await
}

/// Points `image`'s header at `backing` without copying anything (`rebase -u`): only right
/// when the new backing reads exactly like the old one.
pub async fn set_backing(
    image: &Path,
    backing: &Path,
    format: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut cmd = qemu_img();
    // Only qcow2 images have a backing to set: never let qemu-img probe the format.
    cmd.args(["rebase", "-u", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(image);
    tool::run(cmd, "qemu-img rebase -u", image, QUICK, cancel)
        .await
        .map(drop)
}

/// Makes `image` stand alone in its header (`rebase -u -b ""`), copying nothing: only right
/// for an image that holds all its data itself, or one about to get a backing of its own.
pub async fn drop_backing(image: &Path, cancel: &CancellationToken) -> Result<()> {
    let mut cmd = qemu_img();
    cmd.args(["rebase", "-u", "-f", "qcow2", "-b", ""])
        .arg(image);
    tool::run(cmd, "qemu-img rebase -u", image, QUICK, cancel)
        .await
        .map(drop)
}

/// What `qemu-img check` found.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageCheck {
    /// Corruptions (data at risk).
    #[serde(default)]
    pub corruptions: u64,
    /// Leaked clusters (harmless, space only; only the tests look).
    #[serde(default)]
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub leaks: u64,
    /// Check errors.
    #[serde(default)]
    pub check_errors: u64,
}

/// Runs `qemu-img check` on one image (`-U`: it may be in use) read as `format` (`None`:
/// probed). A qcow2 image is checked without opening its backing chain (`"backing": null`):
/// its own metadata is what is checked, and opening a chain a hundred deep for each of its
/// images made `qsnap check` quadratic.
pub async fn check(
    image: &Path,
    format: Option<&str>,
    cancel: &CancellationToken,
) -> Result<ImageCheck> {
    let mut cmd = qemu_img();
    cmd.args(["check", "-U", "--output=json"]);
    match (format, image.to_str()) {
        (Some("qcow2"), Some(p)) => cmd.arg(format!(
            "json:{}",
            serde_json::json!({
                "driver": "qcow2",
                "backing": null,
                "file": {"driver": "file", "filename": p},
            })
        )),
        (Some(f), _) => cmd.args(["-f", f]).arg(image),
        // (Format unknown, or a name JSON cannot carry: the plain form.)
        (None, _) => cmd.arg(image),
    };
    // `check` exits non-zero when it finds something: read its report either way.
    let out = tool::output(cmd, "qemu-img check", image, QUICK, cancel).await?;
    serde_json::from_slice(&out.stdout).map_err(|_| Error::Tool {
        tool: "qemu-img check".into(),
        path: image.to_owned(),
        why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Makes `path` durable (data and metadata: its mtime is what a stamp records) and reads its
/// stamp: after a power cut the file has what the stamp says. For images frozen (or
/// rewritten by a merge) just now; QEMU's flush is an `fdatasync`, which need not keep the
/// mtime.
pub async fn stamp_durable(path: &Path) -> Result<ImageStamp> {
    fsync(path, "syncing a frozen image").await?;
    stamp(path).await
}

/// Makes what was written to `path` (by QEMU, `qemu-img` or anyone) durable, data and
/// metadata: `fsync` on a descriptor of our own (any descriptor of the file will do).
pub async fn sync(path: &Path) -> Result<()> {
    fsync(path, "syncing an image").await
}

/// Reads the stamp (size and mtime) of `path`.
pub async fn stamp(path: &Path) -> Result<ImageStamp> {
    let m = tokio::fs::metadata(path)
        .await
        .map_err(|source| Error::Io {
            what: "reading an image's size and time",
            path: path.to_owned(),
            source,
        })?;
    Ok(stamp_of(&m))
}

/// The stamps of many images, read in one blocking task (a check of a hundred snapshots
/// would otherwise hand a hundred tasks to the blocking pool); `None` where the file cannot
/// be read.
pub(crate) async fn stamps(
    paths: Vec<PathBuf>,
) -> std::collections::HashMap<PathBuf, Option<ImageStamp>> {
    tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|p| {
                let s = std::fs::metadata(&p).ok().map(|m| stamp_of(&m));
                (p, s)
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn stamp_of(m: &std::fs::Metadata) -> ImageStamp {
    let mtime_ns = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    ImageStamp {
        bytes: m.len(),
        mtime_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn an_overlay_is_never_created_over_an_existing_file_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let taken = dir.path().join("taken.qcow2");
        std::fs::write(&taken, b"someone's file").unwrap();
        let cancel = CancellationToken::new();
        // Refused before qemu-img runs: the file keeps its bytes (qemu-img would truncate it).
        let err = create_overlay(&taken, &base, "qcow2", 1 << 20, &cancel)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TargetExists { .. }), "{err}");
        assert_eq!(std::fs::read(&taken).unwrap(), b"someone's file");
        // A failed qemu-img leaves nothing behind.
        let bad = dir.path().join("bad.qcow2");
        let err = create_overlay(&bad, &base, "no-such-format", 1 << 20, &cancel)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Tool { .. }), "{err}");
        assert!(!bad.exists());
        // A good one is 0600.
        let good = dir.path().join("good.qcow2");
        create_overlay(&good, &base, "qcow2", 1 << 20, &cancel)
            .await
            .unwrap();
        let mode = std::fs::metadata(&good).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(&std::fs::read(&good).unwrap()[..4], b"QFI\xfb");
    }

    /// `check` reads the image's own metadata only (its backing chain is not opened), and
    /// still finds a damaged refcount table — in an overlay whose backing file is gone, even.
    #[tokio::test]
    async fn check_finds_damage_without_opening_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let base = dir.path().join("base,1.qcow2");
        create_blank(&base, 1 << 20, &cancel).await.unwrap();
        let top = dir.path().join("top \"x\".qcow2");
        create_overlay(&top, &base, "qcow2", 1 << 20, &cancel)
            .await
            .unwrap();
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 7 0 64k"])
            .arg(&top)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let clean = check(&top, Some("qcow2"), &cancel).await.unwrap();
        assert_eq!((clean.corruptions, clean.check_errors), (0, 0));

        // The backing file gone: the plain form could not even open the image.
        std::fs::remove_file(&base).unwrap();
        let still = check(&top, Some("qcow2"), &cancel).await.unwrap();
        assert_eq!((still.corruptions, still.check_errors), (0, 0));

        // The first refcount block zeroed: every cluster in use has refcount 0.
        qsnap_testkit::disk_io::zero_first_refcount_block(&top);
        let damaged = check(&top, Some("qcow2"), &cancel).await.unwrap();
        assert!(damaged.corruptions > 0, "{damaged:?}");
    }
}
