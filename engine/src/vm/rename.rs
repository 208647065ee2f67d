//! Snapshot names after the fact: `rename`, the newest snapshot (`revert --latest`), and a
//! free name for one taken without a name.
//!
//! A rename gives the memory files their new names by hard links first and drops the old
//! names last, so that every step leaves each manifest naming files that exist: cut short,
//! the snapshot may exist under both names (each with its own file names, so deleting one
//! leaves the other whole), never under neither. Disk images keep their file names: chains
//! name them, and renaming an image under a chain would break it.
//!
//! This module must never overwrite a file or a manifest, and never leave a manifest naming
//! a memory file that is gone.

use super::Vm;
use crate::error::{Error, Result};
use crate::name::SnapshotName;
use crate::snapshot::CreateOptions;
use crate::store::{self, Manifest, VmRecord};
use std::path::{Path, PathBuf};

impl Vm {
    /// Renames snapshot `old` to `new`: its manifest, its memory files, its children's parent,
    /// and the VM's current snapshot. Refused when `old` does not exist or `new` does.
    pub async fn rename_snapshot(
        &self,
        old: &SnapshotName,
        new: &SnapshotName,
    ) -> Result<Manifest> {
        let op = self.begin(&format!("rename {old} to {new}")).await?;
        let mut record = op.record.clone();
        let store = self.store();
        let mut m = store.manifest(self.name(), old).await?;
        if old == new {
            return Ok(m);
        }
        if store.has_snapshot(self.name(), new).await? {
            return Err(Error::SnapshotExists {
                vm: self.name().to_string(),
                snapshot: new.to_string(),
            });
        }
        // Its pool's standbys hold the snapshot under its old name: they go with the pool
        // (first: a rename cut short leaves no pool naming a snapshot that is gone).
        self.drop_pools(std::slice::from_ref(old)).await;
        let from = store.memory_files(self.name(), old);
        let to = store.memory_files(self.name(), new);
        // Every memory file the old name has moves — also one the manifest no longer names
        // (a stream a lazy conversion cut short left beside the RAM image, which `check`
        // keeps, by this name, while the lazy files do not verify). Nothing else is renamed.
        let mut links = Vec::new();
        for (f, t) in from.iter().zip(&to) {
            let p = f.clone();
            if store::blocking(move || store::exists(&p)).await? {
                links.push((f.clone(), t.clone()));
            }
        }
        if let Some(mem) = &mut m.snapshot.memory {
            let moved = |p: &Path| links.iter().find(|(f, _)| f == p).map(|(_, t)| t.clone());
            if let Some(t) = moved(&mem.file) {
                mem.file = t;
            }
            if let Some(lazy) = &mut mem.lazy {
                if let Some(t) = moved(&lazy.image) {
                    lazy.image = t;
                }
            }
        }
        link_all(&links).await?;
        m.name = new.to_string();
        if let Err(e) = store.write_manifest(&m).await {
            // Nothing names the new links yet: they go, and the snapshot is as it was.
            let made: Vec<PathBuf> = links.iter().map(|(_, t)| t.clone()).collect();
            let _ = store::blocking(move || {
                for t in &made {
                    let _ = std::fs::remove_file(t);
                }
                Ok(())
            })
            .await;
            return Err(e);
        }
        // From here both names stand, each whole: a failure leaves the snapshot under both
        // (deleting either keeps the other), never under neither.
        for mut child in store.manifests(self.name()).await? {
            if child.parent.as_deref() == Some(old.as_str()) {
                child.parent = Some(new.to_string());
                store.replace_manifest(&child).await?;
            }
        }
        if record.current.as_deref() == Some(old.as_str()) {
            record.current = Some(new.to_string());
            store.write_record(&record).await?;
        }
        store.remove_manifest(self.name(), old).await?;
        for (old_path, _) in &links {
            let p = old_path.clone();
            store::blocking(move || store::remove_durably(&p)).await?;
        }
        drop(op);
        Ok(m)
    }

    /// The newest snapshot (by when it was taken); [`Error::UnknownSnapshot`] when the VM has
    /// none.
    pub async fn latest_snapshot(&self) -> Result<SnapshotName> {
        let all = self.store().manifests(self.name()).await?;
        let newest = all
            .iter()
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
            .ok_or_else(|| Error::UnknownSnapshot {
                vm: self.name().to_string(),
                snapshot: "(the latest: it has none)".into(),
            })?;
        SnapshotName::new(&newest.name)
    }

    /// `name`, or the first of `name-2`, `name-3`, … that a create of `opts` can take: no
    /// snapshot has it, and none of the files it would make (memory files, the overlay
    /// next to each disk's image or in the overlay directory) exists. Hold the lock.
    pub(crate) async fn free_name(
        &self,
        name: &SnapshotName,
        record: &VmRecord,
        opts: &CreateOptions,
    ) -> Result<SnapshotName> {
        let mut candidate = name.clone();
        let mut n = 1;
        while self.name_taken(&candidate, record, opts).await? {
            n += 1;
            candidate = name.numbered(n)?;
        }
        Ok(candidate)
    }

    async fn name_taken(
        &self,
        snap: &SnapshotName,
        record: &VmRecord,
        opts: &CreateOptions,
    ) -> Result<bool> {
        if self.store().has_snapshot(self.name(), snap).await? {
            return Ok(true);
        }
        let mut files: Vec<PathBuf> = self.store().memory_files(self.name(), snap).to_vec();
        for d in &record.disks {
            let stem = opts.overlay_stems.get(&d.device).cloned().or_else(|| {
                d.image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            });
            let dir = opts
                .overlay_dir
                .clone()
                .or_else(|| d.image.parent().map(Path::to_owned));
            if let (Some(stem), Some(dir)) = (stem, dir) {
                files.push(dir.join(format!("{stem}.{snap}.qcow2")));
            }
        }
        store::blocking(move || {
            for f in &files {
                if store::exists(f)? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await
    }
}

/// Hard-links each `(from, to)`; a `to` that exists is an error (never overwritten), and the
/// links made before it are removed again.
async fn link_all(links: &[(PathBuf, PathBuf)]) -> Result<()> {
    let links = links.to_vec();
    store::blocking(move || {
        let mut made: Vec<&PathBuf> = Vec::new();
        for (from, to) in &links {
            if let Err(e) = std::fs::hard_link(from, to) {
                for p in made {
                    let _ = std::fs::remove_file(p);
                }
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    return Err(Error::TargetExists { path: to.clone() });
                }
                return Err(store::io("giving a memory file its new name", to)(e));
            }
            made.push(to);
        }
        if let Some((_, to)) = links.first() {
            store::sync_dir(to.parent().unwrap_or(Path::new(".")))?;
        }
        Ok(())
    })
    .await
}
