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

/// One file an import stages and then moves into place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Move {
    pub staged: PathBuf,
    pub place: PathBuf,
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
    /// Every file staged and where it goes.
    pub moves: Vec<Move>,
    /// Files made in place (overlays, the VM's directories), removed unless committed.
    pub made: Vec<PathBuf>,
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
        store::create_dir_durably(&root, 0o700)?;
        store::create_dir_durably(&root.join("staging"), 0o700)?;
        store::create_dir_durably(&d, 0o700)?;
        store::write_json(&path, &note, false)
    })
    .await
}

/// Removes what an import into `vm` left, if one did. Hold `vm`'s lock. Returns what it
/// removed (empty: there was nothing, or the import had committed and only its staging
/// leftovers went).
pub(crate) async fn sweep(store: &Store, vm: &VmName) -> Result<Vec<PathBuf>> {
    let path = note_path(store, vm);
    let p = path.clone();
    let Some(note) = blocking(move || store::read_json::<Note>(&p)).await? else {
        // A staging directory without a note: the import died before its first file.
        let d = dir(store, vm);
        let _ = blocking(move || Ok(std::fs::remove_dir(&d))).await;
        return Ok(Vec::new());
    };
    let committed = match SnapshotName::parse(&note.snapshot) {
        _ if note.new_vm => store.has_vm(vm).await?,
        Some(s) => store.has_snapshot(vm, &s).await?,
        None => false,
    };
    remove(store, vm, &note, committed).await
}

/// Removes the staging of `note` — and, unless `committed`, every file it placed or made.
pub(crate) async fn remove(
    store: &Store,
    vm: &VmName,
    note: &Note,
    committed: bool,
) -> Result<Vec<PathBuf>> {
    let (note, vm_dir, sdir, npath) = (
        note.clone(),
        store.vm_dir(vm),
        dir(store, vm),
        note_path(store, vm),
    );
    blocking(move || {
        let mut removed = Vec::new();
        let mut gone = |p: &Path| {
            if matches!(std::fs::symlink_metadata(p), Ok(m) if m.is_file())
                && std::fs::remove_file(p).is_ok()
            {
                removed.push(p.to_owned());
            }
        };
        for m in &note.moves {
            gone(&m.staged);
            if !committed {
                gone(&m.place);
            }
        }
        if !committed {
            for p in &note.made {
                gone(p);
            }
            if note.new_vm {
                for sub in ["memory", "boot", "files", "disks", "snapshots"] {
                    let _ = std::fs::remove_dir(vm_dir.join(sub));
                }
                // The VM never existed: its lock file and directory go too (the lock is
                // held by whoever sweeps, which is only ever the one caller).
                let _ = std::fs::remove_file(vm_dir.join("lock"));
                let _ = std::fs::remove_dir(&vm_dir);
            }
        }
        for d in note.dirs.iter().rev() {
            if d != &sdir {
                let _ = std::fs::remove_dir(d);
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
        let Ok(_lock) = store.lock(&vm, "sweep import staging").await else {
            continue; // an import (or another operation) runs: not a leftover
        };
        removed.extend(sweep(store, &vm).await?);
    }
    Ok(removed)
}
