//! Where an import writes before it commits, and the removal of what an interrupted one left.
//!
//! ```text
//! <store>/staging/<vm>/note.json      what this import makes: staged → final paths, overlays
//! <store>/staging/<vm>/…              memory and boot files, staged
//! <disk-dir>/.qsnap-staging-<vm>/…    disk layers, staged (same filesystem as their place)
//! ```
//! The note is written before the first file. An import holds the VM's lock from before the
//! note until after it is removed, so a note whose VM lock is free was left by an import that
//! died; [`sweep`] then removes everything it names unless the import had committed (the VM's
//! record exists, for a new VM; the snapshot's manifest, for a snapshot added to one).
//! Removes only what a note names; never a file a committed import left in place.

use crate::error::Result;
use crate::name::{SnapshotName, VmName};
use crate::store::{self, blocking, Store};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A file's identity (device and inode): what a removal checks, so that only the file the
/// import made goes — never one that took its path since, or stood there before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (not following a symlink), if there is one.
    pub(crate) fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        m.is_file().then(|| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// One file an import stages and then moves into place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Move {
    pub staged: PathBuf,
    pub place: PathBuf,
    /// The staged file's identity, noted before it is moved (a rename keeps it); without
    /// one the file was never moved, and nothing at `place` is the import's.
    #[serde(default)]
    pub id: Option<FileId>,
}

/// What an import makes (`note.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Note {
    /// The VM imported into.
    pub vm: String,
    /// The snapshot imported.
    pub snapshot: String,
    /// True when the import makes the VM (committed once its record exists); false when it
    /// adds a snapshot to an existing one (committed once the manifest exists).
    pub new_vm: bool,
    /// The staging directories (removed whole: only the import writes there).
    pub dirs: Vec<PathBuf>,
    /// Every file staged (the bundle's, and a new VM's overlays) and where it goes.
    pub moves: Vec<Move>,
    /// The importing process: while it runs, its note is no leftover (it is written before
    /// the VM's lock is taken, so the lock alone cannot say so).
    #[serde(default)]
    pub writer: Option<Writer>,
}

/// A process, for good: its pid and start time (the pid alone may be reused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Writer {
    pub pid: u32,
    pub start: Option<u64>,
}

impl Writer {
    /// This process.
    pub(crate) async fn this() -> Writer {
        let pid = std::process::id();
        Writer {
            pid,
            start: crate::proc::start_time(pid).await,
        }
    }

    /// Whether it is another process that still runs.
    async fn other_and_alive(&self) -> bool {
        self.pid != std::process::id()
            && crate::proc::alive(self.pid).await
            && (self.start.is_none() || crate::proc::start_time(self.pid).await == self.start)
    }
}

/// The store-side staging directory of an import into `vm`.
pub(crate) fn dir(store: &Store, vm: &VmName) -> PathBuf {
    store.root().join("staging").join(vm.as_str())
}

fn note_path(store: &Store, vm: &VmName) -> PathBuf {
    dir(store, vm).join("note.json")
}

/// Writes (replaces) the note, durably.
pub(crate) async fn write(store: &Store, note: &Note) -> Result<()> {
    let vm = VmName::new(&note.vm)?;
    let d = dir(store, &vm);
    let root = store.root().to_owned();
    let (path, note) = (note_path(store, &vm), note.clone());
    blocking(move || {
        // Another import that could not take the lock removes the staging directory if it
        // finds it empty: make it again and retry.
        let mut tries = 0;
        loop {
            store::create_dir_durably(&root, 0o700)?;
            store::create_dir_durably(&root.join("staging"), 0o700)?;
            store::create_dir_durably(&d, 0o700)?;
            match store::write_json(&path, &note, false) {
                Err(crate::error::Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && tries < 5 =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    })
    .await
}

/// Writes the note unless one is there already; says whether it wrote it.
pub(crate) async fn write_new(store: &Store, note: &Note) -> Result<bool> {
    let vm = VmName::new(&note.vm)?;
    let path = note_path(store, &vm);
    let p = path.clone();
    if blocking(move || store::exists(&p)).await? {
        return Ok(false);
    }
    write(store, note).await?;
    Ok(true)
}

/// Removes a note that made nothing (an import that could not take the VM's lock) — if it
/// is still this process's: the holder of the lock may have written its own since.
pub(crate) async fn forget(store: &Store, vm: &VmName) {
    let (path, d) = (note_path(store, vm), dir(store, vm));
    let me = Writer::this().await;
    let _ = blocking(move || {
        if let Ok(Some(n)) = store::read_json::<Note>(&path) {
            if n.writer.as_ref() == Some(&me) && n.moves.is_empty() {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_dir(&d);
            }
        }
        Ok(())
    })
    .await;
}

/// Removes what an import into `vm` left, if one did and its process is gone. Hold `vm`'s
/// lock; `holding_on`: the caller goes on with the VM (an import), so its lock file and
/// directory stay. Returns what it removed (empty: there was nothing, the import still
/// runs, or it had committed and only its staging leftovers went).
pub(crate) async fn sweep(store: &Store, vm: &VmName, holding_on: bool) -> Result<Vec<PathBuf>> {
    let path = note_path(store, vm);
    let p = path.clone();
    let Some(note) = blocking(move || store::read_json::<Note>(&p)).await? else {
        // A staging directory without a note: the import died while writing its first one
        // (a temporary file at most), before it made anything.
        let d = dir(store, vm);
        let _ = blocking(move || Ok(std::fs::remove_dir_all(&d))).await;
        return Ok(Vec::new());
    };
    if let Some(w) = &note.writer {
        if w.other_and_alive().await {
            return Ok(Vec::new()); // a live import's (it has not taken the lock, or lost it)
        }
    }
    let committed = match SnapshotName::parse(&note.snapshot) {
        _ if note.new_vm => store.has_vm(vm).await?,
        Some(s) => store.has_snapshot(vm, &s).await?,
        None => false,
    };
    remove(store, vm, &note, committed, holding_on).await
}

/// Removes the staging of `note` — and, unless `committed`, every file it placed or made.
pub(crate) async fn remove(
    store: &Store,
    vm: &VmName,
    note: &Note,
    committed: bool,
    holding_on: bool,
) -> Result<Vec<PathBuf>> {
    if !note.new_vm && !committed {
        // The record of the VM it was adding to may already own the new layers: it must not
        // name files that are about to go.
        if let Ok(mut rec) = store.record(vm).await {
            let before = rec.owned_images.len();
            rec.owned_images
                .retain(|p| !note.moves.iter().any(|m| &m.place == p));
            if rec.owned_images.len() != before {
                store.write_record(&rec).await?;
            }
        }
    }
    let (note, vm_dir, sdir, npath) = (
        note.clone(),
        store.vm_dir(vm),
        dir(store, vm),
        note_path(store, vm),
    );
    blocking(move || {
        let mut removed = Vec::new();
        let mut gone = |p: &Path, id: Option<FileId>| {
            // Staged files live in the import's own directories; a file in place goes only
            // while it is the very file the import made.
            let ours = match id {
                None => true,
                Some(id) => FileId::of(p) == Some(id),
            };
            if ours
                && matches!(std::fs::symlink_metadata(p), Ok(m) if m.is_file())
                && std::fs::remove_file(p).is_ok()
            {
                removed.push(p.to_owned());
            }
        };
        for m in &note.moves {
            gone(&m.staged, None);
            if !committed {
                if let Some(id) = m.id {
                    gone(&m.place, Some(id));
                }
            }
        }
        // The staging directories are the import's own (named for it): whatever a kill left
        // in them, half-written, goes with them. First: they may sit in the new VM's
        // directory (its default disk directory), which goes next.
        for d in note.dirs.iter().rev() {
            if d != &sdir {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        if !committed && note.new_vm {
            // A new VM's manifest is written just before its record (the commit): one
            // without the record is this import's.
            if let Some(s) = SnapshotName::parse(&note.snapshot) {
                gone(&vm_dir.join("snapshots").join(format!("{s}.json")), None);
            }
            for sub in ["memory", "boot", "files", "disks", "snapshots"] {
                let _ = std::fs::remove_dir(vm_dir.join(sub));
            }
            // The VM never existed: its lock file and directory go too — unless the caller
            // goes on holding the lock (an import sweeping a dead one's leftovers). Otherwise
            // this is the last thing the holder does (a failed import returns, a sweep moves
            // on); a process that opened the old lock file meanwhile finds it unlinked after
            // taking it, and opens the new one (`store/lock.rs`).
            if !holding_on {
                let _ = std::fs::remove_file(vm_dir.join("lock"));
                let _ = std::fs::remove_dir(&vm_dir);
            }
        }
        store::remove_durably(&npath)?;
        let _ = std::fs::remove_dir_all(&sdir);
        Ok(removed)
    })
    .await
}

/// The VMs with an import's staging in the store (finished or not).
pub(crate) async fn pending(store: &Store) -> Result<Vec<VmName>> {
    let d = store.root().join("staging");
    blocking(move || {
        let mut out = Vec::new();
        match std::fs::read_dir(&d) {
            Ok(entries) => {
                for e in entries.flatten() {
                    if let Some(n) = e.file_name().to_str().and_then(VmName::parse) {
                        out.push(n);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(store::io("listing import staging", &d)(e)),
        }
        out.sort();
        Ok(out)
    })
    .await
}

/// Removes what every interrupted import left whose VM is not locked by another operation.
pub(crate) async fn sweep_all(store: &Store) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for vm in pending(store).await? {
        let p = note_path(store, &vm);
        let q = p.clone();
        if let Ok(Some(Note {
            writer: Some(w), ..
        })) = blocking(move || store::read_json::<Note>(&q)).await
        {
            if w.other_and_alive().await {
                continue; // an import that runs (perhaps before its lock): not a leftover
            }
        }
        if !blocking(move || store::exists(&p)).await? {
            // Nothing was made before the note: no lock to take (taking it would make the
            // VM's directory).
            removed.extend(sweep(store, &vm, false).await.unwrap_or_default());
            continue;
        }
        // Held means in use, not "wait": a sweep never queues behind a live operation.
        let at_once = store.clone().with_lock_wait(std::time::Duration::ZERO);
        let Ok(_lock) = at_once.lock(&vm, "sweep import staging").await else {
            continue; // an import (or another operation) runs: not a leftover
        };
        // One leftover that cannot be removed must not stop every later import.
        match sweep(store, &vm, false).await {
            Ok(r) => removed.extend(r),
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "an interrupted import's staging could not be removed")
            }
        }
    }
    Ok(removed)
}
