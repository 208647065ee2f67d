//! Crash-safe JSON files: write a temp file beside the target, fsync it, rename it over the
//! target, fsync the directory. A reader sees the old file or the new one, never half of one.
//! Runs on the blocking pool; never call these from a place that must not wait for a disk.

use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Runs file work on the blocking pool (a tokio worker must never wait for a disk).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes `value` as pretty JSON to `path`, atomically and durably. `exclusive` refuses to
/// replace an existing file, atomically (`renameat2(RENAME_NOREPLACE)`, or a hard link where
/// the filesystem lacks it): two writers can never both "create" one manifest.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T, exclusive: bool) -> Result<()> {
    write(path, value, exclusive, true)
}

/// [`write_json`] without the fsyncs, for what may be lost in a crash (a cache entry): a
/// reader still sees the old file or the new one, and after a power cut perhaps neither.
pub(crate) fn write_json_volatile<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write(path, value, false, false)
}

fn write<T: Serialize>(path: &Path, value: &T, exclusive: bool, durable: bool) -> Result<()> {
    if exclusive && path.symlink_metadata().is_ok() {
        return Err(Error::TargetExists {
            path: path.to_owned(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    // A name no other writer (nor a temp left by a crash before a reboot reused our pid)
    // can hold: pid, time and a counter.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}-{nanos}-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut text = serde_json::to_vec_pretty(value).expect("store types serialise");
    text.push(b'\n');
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating a temporary file", &tmp))?;
        f.write_all(&text).map_err(io("writing", &tmp))?;
        if durable {
            f.sync_all().map_err(io("syncing", &tmp))?;
        }
        if exclusive {
            rename_noreplace(&tmp, path)?;
        } else {
            std::fs::rename(&tmp, path).map_err(io("replacing", path))?;
        }
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` to `to`, failing with [`Error::TargetExists`] instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => Err(Error::TargetExists {
            path: to.to_owned(),
        }),
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            // A filesystem without RENAME_NOREPLACE: a hard link fails the same way if `to`
            // exists, and is just as atomic.
            match std::fs::hard_link(from, to) {
                Ok(()) => std::fs::remove_file(from).map_err(io("removing", from)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Err(Error::TargetExists {
                        path: to.to_owned(),
                    })
                }
                Err(e) => Err(io("linking", to)(e)),
            }
        }
        Err(e) => Err(io("renaming", to)(e.into())),
    }
}

/// Makes a directory's entries (a new, renamed or removed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory", dir))
}

/// Creates `dir` and whichever of its parents are missing (each with `mode`), and makes each
/// new directory's name durable: its parent is fsynced. A directory whose own entry a power
/// cut throws away takes everything in it along, however well each file in it was synced
/// (a VM's record, manifests and memory files; a clone's overlays).
pub(crate) fn create_dir_durably(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut d = dir;
    loop {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(d),
            Err(e) => return Err(io("looking for", d)(e)),
        }
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => {}
            // Another writer made it at the same moment: its name is synced below all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("creating a directory", d)(e)),
        }
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
        sync_dir(parent.unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Removes a store file and makes the removal durable; a file already gone is fine.
pub(crate) fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("removing", path)(e)),
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Whether `path` exists. Unlike `Path::exists`, an error other than "not found" (a
/// permission problem, an I/O error) is an error, never "absent".
pub(crate) fn exists(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("looking for", path)(e)),
    }
}

/// Reads a JSON file written by [`write_json`]. `None` when it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", path)(e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| Error::CorruptStore {
            path: path.to_owned(),
            why: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_exclusive_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_json(&p, &serde_json::json!({"v": 1}), true).unwrap();
        assert!(matches!(
            write_json(&p, &serde_json::json!({"v": 2}), true),
            Err(Error::TargetExists { .. })
        ));
        write_json(&p, &serde_json::json!({"v": 3}), false).unwrap();
        let v: serde_json::Value = read_json(&p).unwrap().unwrap();
        assert_eq!(v["v"], 3);
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A file in the way of a rename is never replaced.
        let other = dir.path().join("b");
        std::fs::write(&other, b"x").unwrap();
        assert!(matches!(
            rename_noreplace(&other, &p),
            Err(Error::TargetExists { .. })
        ));
        assert!(other.exists());
        // Directories are made with their parents, and only where missing.
        let deep = dir.path().join("x/y/z");
        create_dir_durably(&deep, 0o700).unwrap();
        create_dir_durably(&deep, 0o700).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for d in [dir.path().join("x"), deep.clone()] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        assert!(create_dir_durably(&p.join("below-a-file"), 0o700).is_err());
        std::fs::remove_dir_all(dir.path().join("x")).unwrap();
        // "Not there" and "cannot tell" are different answers.
        assert!(!exists(&dir.path().join("none")).unwrap());
        assert!(exists(&p.join("below-a-file")).is_err());
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            read_json::<serde_json::Value>(&p),
            Err(Error::CorruptStore { .. })
        ));
        assert!(read_json::<serde_json::Value>(&dir.path().join("none"))
            .unwrap()
            .is_none());
    }
}
