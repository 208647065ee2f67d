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
/// replace an existing file (the check and the rename are not one step, so the caller must
/// hold the VM's lock for it to mean anything).
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T, exclusive: bool) -> Result<()> {
    if exclusive && path.symlink_metadata().is_ok() {
        return Err(Error::TargetExists {
            path: path.to_owned(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
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
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("replacing", path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the directory", dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
