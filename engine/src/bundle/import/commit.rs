//! The commit of an import: it runs only after the whole bundle is in staging, and it checks
//! the seal (every file's hash and size, the manifest's hash, the signature when keys are
//! trusted) before anything else; nothing unverified is ever placed.
//!
//! Then: disk headers pointed at their final places (`qemu-img rebase -u`) and checked (no
//! external data file, the declared format, never probed) → fsync → noted by identity →
//! renamed into place with `RENAME_NOREPLACE` (it never writes over a file) → a new VM's
//! overlays (staged, noted, renamed likewise) → manifest → record (the commit) → note removed.
//! Any error removes what the note names (`fail`).

use super::{check_seal, corrupt, fail, ImportReport, Read_};
use crate::bundle::staging::{self, FileId, Move};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::image;
use crate::launch::argv::guest_agent_socket;
use crate::name::VmName;
use crate::store::{
    self, blocking, CurrentDisk, Imported, ImportedFile, LaunchCommand, Origin, VmRecord,
};
use crate::vm::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

impl Engine {
    /// Checks the seal, puts every file in place and commits.
    pub(super) async fn commit(
        &self,
        read: Read_,
        name: &VmName,
        keys: &[minisign::PublicKey],
    ) -> Result<ImportReport> {
        let store = self.store().clone();
        let note = read.plan.note.clone();
        match self.commit_inner(read, name, keys).await {
            Ok(r) => Ok(r),
            Err(e) => Err(fail(&store, name, &note, e).await),
        }
    }

    async fn commit_inner(
        &self,
        read: Read_,
        name: &VmName,
        keys: &[minisign::PublicKey],
    ) -> Result<ImportReport> {
        let Read_ {
            mut plan,
            digests,
            seal,
            signature,
        } = read;
        let store = self.store().clone();
        let cancel = CancellationToken::new();
        check_seal(&plan, &digests, &seal.0)?;
        if !keys.is_empty() {
            crate::bundle::sign::verify(keys, &seal.1, signature.as_deref())?;
        }
        let (seal, seal_bytes) = seal;
        let seal_hash = crate::bundle::hash_bytes(&seal_bytes);

        // Disk headers: each layer onto the one below it, at its final place.
        let m = plan.manifest.clone();
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for (i, d) in m.disks.iter().enumerate() {
            for (k, l) in d.layers.iter().enumerate() {
                let dest = &plan.dests[&l.name];
                if l.format == "qcow2" {
                    // Read here before any tool opens it: an external data file is a second
                    // host file the image would reach.
                    let p = dest.staged.clone();
                    let data_file = blocking(move || {
                        image::qcow2_has_data_file(&p)
                            .map_err(store::io("reading an imported image", &p))
                    })
                    .await?;
                    if data_file {
                        return Err(corrupt(format!(
                            "{} asks for an external data file (a host file qsnap would have to trust)",
                            l.name
                        )));
                    }
                }
                // Read as what it is declared to be, never probed.
                let info = image::info_as(&dest.staged, &l.format, &cancel)
                    .await
                    .map_err(|e| {
                        corrupt(format!("{} is not a {} image ({e})", l.name, l.format))
                    })?;
                sizes.insert(l.name.clone(), info.virtual_size);
                if l.format != "qcow2" {
                    continue;
                }
                if info
                    .format_specific
                    .as_ref()
                    .and_then(|f| f.get("data"))
                    .and_then(|d| d.get("data-file"))
                    .is_some()
                {
                    return Err(corrupt(format!(
                        "{} names an external data file (a host file qsnap would have to trust)",
                        l.name
                    )));
                }
                let below = if k > 0 {
                    let b = &d.layers[k - 1];
                    Some((plan.dests[&b.name].place.clone(), b.format.clone()))
                } else {
                    plan.on_base[i].clone()
                };
                match below {
                    Some((path, fmt)) => {
                        image::set_backing(&dest.staged, &path, &fmt, &cancel).await?
                    }
                    None => image::drop_backing(&dest.staged, &cancel).await?,
                }
            }
        }

        // Durable, noted by identity (only these very files are ever removed again), then
        // into place: never over an existing file.
        for dest in plan.dests.values() {
            image::sync(&dest.staged).await?;
        }
        for m in &mut plan.note.moves {
            let staged = m.staged.clone();
            m.id = blocking(move || Ok(FileId::of(&staged))).await?;
        }
        staging::write(&store, &plan.note).await?;
        failpoint::hit("import.staged", None).await?;
        for dest in plan.dests.values() {
            let (from, to) = (dest.staged.clone(), dest.place.clone());
            blocking(move || {
                if let Some(dir) = to.parent() {
                    store::create_dir_durably(dir, 0o700)?;
                }
                rename_noreplace(&from, &to)?;
                store::sync_dir(to.parent().unwrap_or(Path::new("/")))
            })
            .await?;
        }

        failpoint::hit("import.placed", None).await?;
        let vm_dir = store.vm_dir(name);
        let snap = plan.snap.clone();
        let place = |bundle_name: &Path| -> PathBuf {
            plan.dests[&bundle_name.to_string_lossy().into_owned()]
                .place
                .clone()
        };
        let mut manifest = m.snapshot.clone();
        manifest.vm = name.to_string();
        manifest.name = snap.to_string();
        manifest.parent = plan.base.as_ref().map(|b| b.name.clone());
        let mut overlays = Vec::new();
        for (i, d) in manifest.snapshot.disks.iter_mut().enumerate() {
            let frozen = match m.disks[i].layers.last() {
                Some(l) => plan.dests[&l.name].place.clone(),
                None => plan.on_base[i].clone().map(|(p, _)| p).unwrap_or_default(),
            };
            let stem = frozen
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".into());
            d.image = frozen.clone();
            d.overlay = frozen.with_file_name(format!("{stem}.{snap}.qcow2"));
            d.frozen = Some(image::stamp(&frozen).await?);
            // What the frozen image is, as checked (never what the manifest claims).
            if let Some(top) = m.disks[i].layers.last() {
                d.format.clone_from(&top.format);
                d.size = sizes.get(&top.name).copied().unwrap_or(d.size);
            }
            overlays.push((
                d.device.clone(),
                d.overlay.clone(),
                frozen,
                d.format.clone(),
                d.size,
            ));
        }
        if let Some(mem) = manifest.snapshot.memory.as_mut() {
            mem.file = place(&mem.file);
            if let Some(l) = mem.lazy.as_mut() {
                l.image = place(&l.image);
                l.stamp = image::stamp(&l.image).await?;
            }
        }
        let mut files = Vec::new();
        for (bname, dest) in &plan.dests {
            files.push(ImportedFile {
                path: dest.place.clone(),
                hash: seal.files[bname].hash.clone(),
                stamp: image::stamp(&dest.place).await?,
            });
        }
        manifest.imported = Some(Imported {
            vm: m.vm.clone(),
            snapshot: m.snapshot.name.clone(),
            at: store::now_rfc3339(),
            bundle: seal_hash.clone(),
            files,
        });

        // A new VM writes to overlays of its own over the snapshot's frozen images (a cold
        // start must never write into them).
        let mut current = Vec::new();
        if plan.new_vm {
            blocking({
                let d = vm_dir.join("files");
                move || store::create_dir_durably(&d, 0o700)
            })
            .await?;
            for (k, (device, overlay, frozen, format, size)) in overlays.iter().enumerate() {
                // Made in the disks' staging directory, noted, then moved into place like
                // every other file: a kill at any moment leaves nothing a sweep cannot tell
                // for the import's own.
                let stage = plan
                    .note
                    .dirs
                    .iter()
                    .find(|d| overlay.parent().is_some_and(|p| d.parent() == Some(p)))
                    .cloned()
                    .unwrap_or_else(|| staging::dir(&store, name));
                let staged = stage.join(format!("overlay-{k}.qcow2"));
                image::create_overlay(&staged, frozen, format, *size, &cancel).await?;
                let s2 = staged.clone();
                let id = blocking(move || Ok(FileId::of(&s2))).await?;
                plan.note.moves.push(Move {
                    staged: staged.clone(),
                    place: overlay.clone(),
                    id,
                });
                staging::write(&store, &plan.note).await?;
                let to = overlay.clone();
                blocking(move || {
                    rename_noreplace(&staged, &to)?;
                    store::sync_dir(to.parent().unwrap_or(Path::new("/")))
                })
                .await?;
                let bottom = m
                    .disks
                    .iter()
                    .find(|x| x.device == *device)
                    .and_then(|x| x.layers.first())
                    .map(|l| plan.dests[&l.name].place.clone())
                    .unwrap_or_default();
                current.push(CurrentDisk {
                    device: device.clone(),
                    image: overlay.clone(),
                    launch_image: bottom,
                    owned: true,
                });
            }
        }
        let mut owned: Vec<PathBuf> = Vec::new();
        for d in &m.disks {
            for (k, l) in d.layers.iter().enumerate() {
                // A new VM's bottom layers are its command line's images, like a `run` VM's
                // own: never merged away. Everything above is qsnap's.
                if k > 0 || !plan.new_vm {
                    owned.push(plan.dests[&l.name].place.clone());
                }
            }
        }
        if plan.new_vm {
            // The manifest, then the record: the commit (a manifest without its record is
            // this import's, and a sweep removes it).
            failpoint::hit("import.overlays-made", None).await?;
            store.write_manifest(&manifest).await?;
            failpoint::hit("import.manifest-written", None).await?;
            owned.extend(current.iter().map(|c| c.image.clone()));
            let qmp = vm_dir.join("qmp.sock");
            let command = LaunchCommand {
                argv: plan.argv.clone(),
                cwd: vm_dir.clone(),
            };
            let record = VmRecord {
                schema: store::SCHEMA,
                name: name.to_string(),
                qmp: qmp.display().to_string(),
                origin: Origin::Run,
                pid: None,
                pid_start: None,
                guest_agent: guest_agent_socket(&command.argv, &command.cwd),
                command: Some(command),
                current: Some(snap.to_string()),
                disks: current,
                owned_images: owned,
                registered_at: store::now_rfc3339(),
                clone_of: None,
                standby: None,
            };
            store.write_record(&record).await?; // the commit
        } else {
            // The record owns the new layers first, then the manifest commits (a sweep takes
            // them out of the record again when it did not).
            let mut record = store.record(name).await?;
            record.owned_images.extend(owned);
            store.write_record(&record).await?;
            store.write_manifest(&manifest).await?; // the commit
        }
        failpoint::hit("import.committed", None).await?;
        staging::remove(&store, name, &plan.note, true, false).await?;
        Ok(ImportReport {
            vm: name.to_string(),
            snapshot: snap.to_string(),
            new_vm: plan.new_vm,
            source: format!("{}/{}", m.vm, m.snapshot.name),
            base: plan.base.as_ref().map(|b| b.name.clone()),
            files: plan.dests.values().map(|d| d.place.clone()).collect(),
            moved: plan.moved.clone(),
            notes: plan.notes.clone(),
            seal: seal_hash,
            bytes: digests.values().map(|d| d.size).sum(),
            total_ms: 0.0,
        })
    }
}

/// `rename(2)` that fails rather than replace a file (`RENAME_NOREPLACE`).
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    nix::fcntl::renameat2(
        None,
        from,
        None,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|errno| {
        if errno == nix::errno::Errno::EEXIST {
            Error::TargetExists {
                path: to.to_owned(),
            }
        } else {
            Error::Io {
                what: "moving an imported file into place",
                path: to.to_owned(),
                source: std::io::Error::from(errno),
            }
        }
    })
}
