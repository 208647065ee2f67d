//! Answers worth remembering across operations and processes, keyed by what they depend on:
//! a file's identity (path, size, modification time) — a QEMU binary's features and machine
//! types, a memory file's verified checksum, a disk image's header (`chains.rs`). In memory for the process and, once [`cache_in`]
//! names a directory (the [`crate::Engine`] points it into its store), on disk as small JSON
//! files. A lost or unreadable entry is simply asked again; an entry never outlives a change
//! of what its key names. Must never hold anything that is not re-computable.
//!
//! The directory is process-wide (the last [`crate::Engine`] created names it): every key
//! names absolute facts (a file's identity), so an entry written into another store's cache is
//! still true there.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

type Memory = Mutex<HashMap<String, Entry>>;

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

/// What a file is, for a cache key: `path|device|inode|size|mtime|ctime|`, or `None` when it
/// cannot be read. A rebuilt or reinstalled file changes its inode or ctime even when its size
/// and mtime are kept, so a key that holds this never serves an answer about the old file.
pub async fn file_identity(path: &std::path::Path) -> Option<String> {
    file_key(path, "").await
}

/// `path|size|mtime_ns|extra` of a file (a QEMU binary), if it can be read.
pub(crate) async fn file_key(path: &std::path::Path, extra: &str) -> Option<String> {
    stat_key(path, path, extra).await
}

/// `name|device|inode|size|mtime|ctime|extra` of the file `stat` resolves (for a QEMU,
/// `/proc/<pid>/exe`: the very binary it runs, in its own mount namespace). A rebuilt or
/// reinstalled binary changes its inode or ctime even when size and mtime are kept.
pub(crate) async fn stat_key(
    name: &std::path::Path,
    stat: &std::path::Path,
    extra: &str,
) -> Option<String> {
    let md = tokio::fs::metadata(stat).await.ok()?;
    Some(key_of(name, &md, extra))
}

/// `name|device|inode|size|mtime|ctime|extra` of a file whose metadata is `md`.
pub(crate) fn key_of(name: &std::path::Path, md: &std::fs::Metadata, extra: &str) -> String {
    format!(
        "{}|{}|{}|{}|{}.{}|{}.{}|{extra}",
        name.display(),
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    )
}

/// One version of a file, as the caches key answers about what it holds.
#[derive(Debug, Clone)]
pub(crate) struct FileVersion {
    /// The slot an answer about the file goes in (one at a time).
    pub slot: String,
    /// This version: path, device, inode, size, mtime, ctime ([`key_of`]), what else the
    /// answer depends on, and this boot.
    pub key: String,
    /// When the file last changed (the later of mtime and ctime).
    pub changed: std::time::SystemTime,
}

/// The version of `path` now, for an answer that goes in `slot` and depends on `extra` too;
/// `None` when the file cannot be examined.
pub(crate) async fn version_of(
    path: &std::path::Path,
    slot: String,
    extra: &str,
) -> Option<FileVersion> {
    let md = tokio::fs::metadata(path).await.ok()?;
    Some(version_from(path, &md, slot, extra, boot_id().await))
}

/// [`version_of`] for many files, `(path, slot, extra)` each, in one trip to the blocking
/// pool: a command that asks about every image of a hundred-snapshot chain would otherwise
/// pay a trip per image, which costs more than the `stat` itself. Each version is what the
/// file was when this ran (as if each file were asked about at that moment).
pub(crate) async fn versions_of(
    files: Vec<(PathBuf, String, String)>,
) -> Vec<(PathBuf, std::io::Result<FileVersion>)> {
    if files.is_empty() {
        return Vec::new();
    }
    let boot = boot_id().await;
    tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|(path, slot, extra)| {
                let v =
                    std::fs::metadata(&path).map(|md| version_from(&path, &md, slot, &extra, boot));
                (path, v)
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

fn version_from(
    path: &std::path::Path,
    md: &std::fs::Metadata,
    slot: String,
    extra: &str,
    boot: &str,
) -> FileVersion {
    let key = key_of(path, md, &format!("{extra}|boot {boot}"));
    let changed = at(md.mtime(), md.mtime_nsec()).max(at(md.ctime(), md.ctime_nsec()));
    FileVersion { slot, key, changed }
}

/// A file time (`mtime`, `ctime`) as a `SystemTime`.
fn at(secs: i64, nsecs: i64) -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(secs).unwrap_or(0),
            u32::try_from(nsecs).unwrap_or(0),
        )
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`; empty where there is none), for the keys
/// of answers about what a file holds: after a power cut a file can keep the times of a write
/// whose data the page cache lost, so such an answer is never served after a reboot.
pub(crate) async fn boot_id() -> &'static str {
    static ID: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    ID.get_or_init(|| async {
        tokio::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .await
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
    .await
}

/// A binary given by name (`qemu-system-x86_64`) as the file `PATH` finds (a path is taken
/// as it is).
pub async fn resolve_binary(binary: &str) -> Option<PathBuf> {
    let binary = binary.to_owned();
    tokio::task::spawn_blocking(move || resolve_binary_blocking(&binary))
        .await
        .ok()
        .flatten()
}

fn resolve_binary_blocking(binary: &str) -> Option<PathBuf> {
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

/// One on-disk entry's file: `<kind>-<hash of slot>.json`. A slot holds one entry at a time
/// (the latest answer about one thing); its key says which version of that thing it is about.
fn file_for(dir: &std::path::Path, kind: &str, slot: &str) -> PathBuf {
    dir.join(entry_name(kind, slot))
}

/// An entry's name, on disk and in memory (so that [`sweep`], which sees only files, can
/// keep what it read for the lookups that follow).
fn entry_name(kind: &str, slot: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(slot.as_bytes());
    format!("{kind}-{h:016x}.json")
}

/// Entries about a QEMU binary (its machine types, its features).
pub(crate) const QEMU: &str = "qemu";
/// Entries about an image's header (`chains.rs`).
pub(crate) const CHAIN: &str = "chain";
/// What an earlier `check` verified (`vm/verified.rs`).
pub(crate) const CHECK: &str = "check";
/// The kinds of entry files [`sweep`] looks after.
const KINDS: [&str; 3] = [QEMU, CHAIN, CHECK];

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    key: String,
    value: serde_json::Value,
}

/// What was remembered under `key` (in memory, else on disk).
pub(crate) async fn lookup<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
    lookup_in(QEMU, key, key).await
}

/// Remembers `value` under `key`, in memory and (best effort) on disk.
pub(crate) async fn remember<T: Serialize>(key: String, value: &T) {
    remember_in(QEMU, key.clone(), key, value).await
}

/// What slot `slot` of `kind` holds, if it was remembered under `key` (the slot may hold an
/// answer about another version of its file: that one is never served).
pub(crate) async fn lookup_in<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    slot: &str,
    key: &str,
) -> Option<T> {
    let mem_slot = entry_name(kind, slot);
    let cached = memory()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&mem_slot)
        .cloned();
    let entry = match cached {
        Some(e) => e,
        None => {
            let dir = disk_dir()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()?;
            let file = file_for(&dir, kind, slot);
            let entry = tokio::task::spawn_blocking(move || {
                crate::store::read_json::<Entry>(&file).ok().flatten()
            })
            .await
            .ok()
            .flatten()?;
            memory()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(mem_slot, entry.clone());
            entry
        }
    };
    if entry.key != key {
        return None;
    }
    serde_json::from_value(entry.value).ok()
}

/// Puts `value`, an answer about version `key` of what `slot` names, into slot `slot` of
/// `kind`: in memory and (best effort) on disk, replacing what the slot held.
pub(crate) async fn remember_in<T: Serialize>(
    kind: &'static str,
    slot: String,
    key: String,
    value: &T,
) {
    let Ok(value) = serde_json::to_value(value) else {
        return;
    };
    let entry = Entry { key, value };
    memory()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(entry_name(kind, &slot), entry.clone());
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
                crate::store::write_json_volatile(&file_for(&dir, kind, &slot), &entry)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot write qsnap's cache");
        }
    })
    .await;
}

/// Removes the on-disk entries whose file is gone or is no longer the file the entry was
/// about (another inode, size or time): they can never be served again. Returns how many
/// went. Entries that cannot be read are left alone (asked again when needed). The entries
/// that stay are kept in memory: the lookups that follow (a check asks about every file of
/// the VM) are not read from disk a second time.
pub async fn sweep() -> usize {
    let Some(dir) = disk_dir().lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return 0;
    };
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let mut removed = 0;
        let mut kept = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            let is_entry = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                KINDS.iter().any(|k| {
                    n.strip_prefix(k)
                        .is_some_and(|r| r.starts_with('-') && r.ends_with(".json"))
                })
            });
            if !is_entry {
                continue;
            }
            let Ok(Some(entry)) = crate::store::read_json::<Entry>(&p) else {
                continue;
            };
            if !stale(&entry.key) {
                if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                    kept.push((name.to_owned(), entry));
                }
            } else if std::fs::remove_file(&p).is_ok() {
                removed += 1;
            }
        }
        let mut memory = memory().lock().unwrap_or_else(|e| e.into_inner());
        for (name, entry) in kept {
            // What this process remembered itself is at least as new as the file.
            memory.entry(name).or_insert(entry);
        }
        tracing::debug!(
            kept = memory.len(),
            removed,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "cache swept"
        );
        removed
    })
    .await
    .unwrap_or(0)
}

/// Whether a `name|device|inode|size|mtime|ctime|…` key names a file that is gone or changed.
fn stale(key: &str) -> bool {
    let parts: Vec<&str> = key.split('|').collect();
    let (Some(name), Some(dev), Some(ino), Some(size)) =
        (parts.first(), parts.get(1), parts.get(2), parts.get(3))
    else {
        return false;
    };
    match std::fs::metadata(name) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(md) => {
            *dev != md.dev().to_string()
                || *ino != md.ino().to_string()
                || *size != md.size().to_string()
        }
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[test]
    fn an_entry_of_a_gone_or_replaced_file_is_stale_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("qemu-bin");
        std::fs::write(&f, b"x").unwrap();
        let md = std::fs::metadata(&f).unwrap();
        let key = format!("{}|{}|{}|1|0.0|0.0|", f.display(), md.dev(), md.ino());
        assert!(stale(&format!(
            "{}|{}|{}|2|0.0|0.0|",
            f.display(),
            md.dev(),
            md.ino()
        )));
        assert!(!stale(&key));
        std::fs::remove_file(&f).unwrap();
        assert!(stale(&key));
        assert!(!stale("not a key"));
    }
}
