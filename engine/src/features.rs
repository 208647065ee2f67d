//! What a QEMU can do, asked of its own schema once per QEMU *binary* rather than on every
//! operation: `query-qmp-schema` costs tens of milliseconds (QEMU renders ~300 KB of JSON and
//! qsnap parses it), which a revert or a create would otherwise pay each time.
//!
//! The answers are cached in memory for the process and, when [`cache_in`] names a directory
//! (the [`crate::Engine`] points it into its store), on disk — keyed by the binary's path,
//! size and modification time as `/proc/<pid>/exe` shows them for the QEMU at the other end of
//! the socket, plus the version in its greeting. An upgraded or rebuilt binary changes the
//! key; a QEMU whose binary cannot be identified (TCP monitor, deleted binary) is asked every
//! time. This module only reads the schema; it never changes QEMU.

use crate::error::{Error, Result};
use qsnap_qmp::Qmp;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The features qsnap decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Features {
    /// The `background-snapshot` migration capability (point-in-time snapshots).
    pub background_snapshot: bool,
    /// `file:` migration URIs (and so fdsets as the memory file): QEMU ≥ 8.2.
    pub file_uri: bool,
    /// `blockdev-set-active` (QEMU ≥ 10.0).
    pub blockdev_set_active: bool,
    /// The `x-ignore-shared` migration capability (lazy RAM).
    pub ignore_shared: bool,
}

impl Features {
    fn from_schema(schema: &qsnap_qmp::Schema) -> Features {
        Features {
            background_snapshot: schema.has_migration_capability("background-snapshot"),
            file_uri: schema.has_argument("migrate", &["channels", "addr", "filename"]),
            blockdev_set_active: schema.has_command("blockdev-set-active"),
            ignore_shared: schema.has_migration_capability("x-ignore-shared"),
        }
    }

    /// The features of the QEMU behind `qmp`: from the cache when its binary was seen before,
    /// else from its schema (then cached).
    pub async fn of(qmp: &Qmp) -> Result<Features> {
        let key = match qmp.peer_pid() {
            Some(pid) => {
                binary_key(pid, &format!("features|{}", qmp.greeting().version.qemu)).await
            }
            None => None,
        };
        if let Some(key) = &key {
            if let Some(f) = lookup(key).await {
                return Ok(f);
            }
        }
        let schema = qmp
            .schema()
            .await
            .map_err(Error::qmp("reading QEMU's schema"))?;
        let f = Features::from_schema(&schema);
        if let Some(key) = key {
            remember(key, &f).await;
        }
        Ok(f)
    }
}

type Memory = Mutex<HashMap<String, serde_json::Value>>;

fn memory() -> &'static Memory {
    static M: OnceLock<Memory> = OnceLock::new();
    M.get_or_init(Memory::default)
}

fn disk_dir() -> &'static Mutex<Option<PathBuf>> {
    static D: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    D.get_or_init(|| Mutex::new(None))
}

/// Keeps the on-disk cache in `dir` (created 0700 when first written). Without it the cache
/// lives only as long as the process.
pub fn cache_in(dir: impl Into<PathBuf>) {
    *disk_dir().lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.into());
}

/// `path|size|mtime_ns|version` of the QEMU binary running as `pid`, if it can be told.
async fn binary_key(pid: u32, version: &str) -> Option<String> {
    let exe = tokio::fs::read_link(format!("/proc/{pid}/exe"))
        .await
        .ok()?;
    // A replaced binary shows as "… (deleted)": its features are the old file's.
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return None;
    }
    file_key(&exe, version).await
}

/// `path|size|mtime_ns|extra` of a file (a QEMU binary), if it can be read.
pub(crate) async fn file_key(path: &std::path::Path, extra: &str) -> Option<String> {
    let md = tokio::fs::metadata(path).await.ok()?;
    let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
    Some(format!(
        "{}|{}|{}|{extra}",
        path.display(),
        md.size(),
        mtime_ns
    ))
}

/// A binary given by name (`qemu-system-x86_64`) as the file `PATH` finds.
pub(crate) fn resolve_binary(binary: &str) -> Option<PathBuf> {
    let p = std::path::Path::new(binary);
    if p.components().count() > 1 {
        return Some(p.to_owned());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(binary))
        .find(|c| c.is_file())
}

fn file_for(dir: &std::path::Path, key: &str) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
    dir.join(format!("qemu-{h:016x}.json"))
}

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    value: serde_json::Value,
}

/// What was remembered under `key` (in memory, else on disk).
pub(crate) async fn lookup<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
    let cached = memory()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(key)
        .cloned();
    let value = match cached {
        Some(v) => v,
        None => {
            let dir = disk_dir()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()?;
            let k = key.to_owned();
            let entry = tokio::task::spawn_blocking(move || {
                crate::store::read_json::<Entry>(&file_for(&dir, &k))
                    .ok()
                    .flatten()
                    .filter(|e| e.key == k)
            })
            .await
            .ok()
            .flatten()?;
            memory()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_owned(), entry.value.clone());
            entry.value
        }
    };
    serde_json::from_value(value).ok()
}

/// Remembers `value` under `key`, in memory and (best effort) on disk.
pub(crate) async fn remember<T: Serialize>(key: String, value: &T) {
    let Ok(value) = serde_json::to_value(value) else {
        return;
    };
    memory()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone(), value.clone());
    let Some(dir) = disk_dir().lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return;
    };
    let _ = tokio::task::spawn_blocking(move || {
        // Best effort: a cache that cannot be written is asked again next time.
        let written = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                crate::store::write_json(&file_for(&dir, &key), &Entry { key, value }, false)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot write the QEMU feature cache");
        }
    })
    .await;
}
