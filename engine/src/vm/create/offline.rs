//! A disk-only snapshot of a stopped VM, made with `qemu-img`: each disk's current image is
//! frozen under a new overlay that the next `start` opens instead (every relaunch rewrites
//! the command line's images to the current ones).
//!
//! The same journal as a live create, so an interruption settles the same way: before the
//! commit, the overlays it made (nobody has written to them: no QEMU runs) are removed; after
//! it, the record and manifest are finished from the journal.
//!
//! This module must never write to an image it freezes, and never run while a QEMU runs the
//! VM (the caller saw it stopped under the VM's lock, which `start` needs too).

use crate::error::{Error, Result};
use crate::image;
use crate::snapshot::{CreateOptions, CreateReport, Mode, SkippedDisk, SnapshotDisk};
use crate::store::{self, CreateIntent, Intent, Manifest, PlannedOverlay, VmRecord};
use crate::vm::Vm;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Takes the disk-only snapshot `opts` asks for of the stopped VM whose record is `record`.
/// Hold the VM's lock.
pub(super) async fn create(
    vm: &Vm,
    mut record: VmRecord,
    opts: &CreateOptions,
) -> Result<Manifest> {
    let started = Instant::now();
    let snap = &opts.name;
    if opts.quiesce.is_some() {
        return Err(Error::NotRunning {
            vm: vm.name().to_string(),
        });
    }
    if record.disks.is_empty() {
        return Err(Error::DiskNotSnapshottable {
            device: "(all)".into(),
            why: "the VM has no writable disk, so a disk-only snapshot would capture nothing"
                .into(),
        });
    }
    // ---- plan: nothing changes ----
    // The formats are QEMU's, as the snapshots recorded them (or qcow2 for qsnap's own
    // overlays): never guessed from the contents, which a guest writes. A disk no snapshot
    // ever froze is refused, unless QEMU skipped it as read-only.
    let manifests = vm.store().manifests(vm.name()).await?;
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for (i, d) in record.disks.iter().enumerate() {
        let known = manifests
            .iter()
            .flat_map(|m| m.snapshot.disks.iter())
            .find(|s| s.image == d.image)
            .map(|s| s.format.clone());
        let format = match (d.owned, known) {
            (true, _) => "qcow2".to_owned(),
            (false, Some(f)) => f,
            (false, None) => {
                let read_only = manifests.iter().any(|m| {
                    m.snapshot
                        .skipped
                        .iter()
                        .any(|s| s.device == d.device && s.reason == "read-only")
                });
                if read_only {
                    skipped.push(SkippedDisk {
                        device: d.device.clone(),
                        reason: "read-only".into(),
                    });
                    continue;
                }
                return Err(Error::DiskNotSnapshottable {
                    device: d.device.clone(),
                    why: format!(
                        "qsnap does not know the format of {} (it learns it from QEMU at a live \
                         snapshot); start the VM and take this snapshot live",
                        d.image.display()
                    ),
                });
            }
        };
        image::refuse_if_open(&d.image, &format, vm.cancel()).await?;
        let info = image::info_as(&d.image, &format, vm.cancel()).await?;
        // (As for a live snapshot: a chain QEMU could describe to qsnap once it runs.)
        let layers = crate::chains::files(&d.image, vm.cancel()).await?.len();
        if layers >= crate::blocks::MAX_CHAIN {
            return Err(Error::DiskNotSnapshottable {
                device: d.device.clone(),
                why: format!(
                    "its backing chain is {layers} images long; qsnap makes chains of at \
                     most {} images, so that it can always read QEMU's description of them: \
                     delete snapshots first",
                    crate::blocks::MAX_CHAIN
                ),
            });
        }
        let stem = opts
            .overlay_stems
            .get(&d.device)
            .cloned()
            .or_else(|| {
                d.image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| format!("disk{i}"));
        let dir = opts
            .overlay_dir
            .as_deref()
            .map(store::plain_path)
            .or_else(|| d.image.parent().map(Path::to_owned))
            .unwrap_or_default();
        let taken: Vec<PathBuf> = disks
            .iter()
            .map(|d: &SnapshotDisk| d.overlay.clone())
            .collect();
        let overlay =
            crate::snapshot::disks::free_overlay(&dir, &stem, snap.as_str(), &taken).await?;
        disks.push(SnapshotDisk {
            device: d.device.clone(),
            node: String::new(),
            image: d.image.clone(),
            format,
            size: info.virtual_size,
            overlay,
            overlay_node: String::new(),
            frozen: None,
        });
    }
    if disks.is_empty() {
        return Err(Error::DiskNotSnapshottable {
            device: "(all)".into(),
            why: "the VM has no writable disk, so a disk-only snapshot would capture nothing"
                .into(),
        });
    }
    let mut intent = CreateIntent {
        snapshot: snap.to_string(),
        memory_file: None,
        overlays: disks
            .iter()
            .map(|d| PlannedOverlay {
                device: d.device.clone(),
                image: d.image.clone(),
                node: String::new(),
                overlay: d.overlay.clone(),
                overlay_node: String::new(),
            })
            .collect(),
        was_running: false,
        qemu_pid: None,
        settings: None,
        quiesce: None,
        committed: None,
        offline: true,
    };
    vm.store()
        .write_journal(vm.name(), &Intent::Create(intent.clone()))
        .await?;
    // ---- the overlays: undone on failure ----
    let mut made = Vec::new();
    for d in &mut disks {
        let created =
            image::create_overlay(&d.overlay, &d.image, &d.format, d.size, vm.cancel()).await;
        if created.is_ok() {
            made.push(d.overlay.clone());
        }
        let stamped = match created {
            Ok(()) => match crate::failpoint::hit("create.offline-overlay", None).await {
                // Durable first, as a live create stamps: a power cut must not leave a stamp
                // the file disagrees with.
                Ok(()) => image::stamp_durable(&d.image).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match stamped {
            Ok(s) => d.frozen = Some(s),
            Err(e) => {
                undo(&made).await;
                let _ = vm.store().clear_journal(vm.name()).await;
                return Err(e);
            }
        }
    }
    // ---- the point of no return: the journal says the snapshot exists ----
    let manifest = Manifest {
        schema: store::SCHEMA,
        vm: vm.name().to_string(),
        name: snap.to_string(),
        parent: record.current.clone(),
        created_at: store::now_rfc3339(),
        qemu_version: String::new(),
        machine: None,
        snapshot: CreateReport {
            mode: Mode::DiskOnly,
            was_running: false,
            memory: None,
            disks,
            skipped,
            pause_ms: 0.0,
            qemu_downtime_ms: None,
            live_phase: None,
            quiesced_filesystems: None,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            thaw_failed: None,
            fell_back: None,
        },
        imported: None,
        description: opts.description.clone(),
    };
    intent.committed = Some(Box::new(manifest.clone()));
    if let Err(e) = vm
        .store()
        .write_journal(vm.name(), &Intent::Create(intent))
        .await
    {
        undo(&made).await;
        let _ = vm.store().clear_journal(vm.name()).await;
        return Err(e);
    }
    // ---- past the point of no return: a failure is "taken, but", which the journal finishes ----
    let taken_but = |problem: Error| -> Error {
        crate::error::CreateError::TakenBut {
            vm: vm.name().to_string(),
            snapshot: snap.to_string(),
            problem: Box::new(problem),
            journaled: true,
        }
        .into()
    };
    super::apply(&mut record, &manifest, None).await;
    vm.store().write_record(&record).await.map_err(taken_but)?;
    vm.store()
        .write_manifest(&manifest)
        .await
        .map_err(taken_but)?;
    vm.store()
        .clear_journal(vm.name())
        .await
        .map_err(taken_but)?;
    Ok(manifest)
}

/// Removes the overlays this create made (newest first), through the guard every image
/// removal passes: no QEMU ever opened them.
async fn undo(made: &[PathBuf]) {
    for p in made.iter().rev() {
        if let Err(e) = crate::unlink::checked(p, crate::unlink::Kind::Image).await {
            tracing::warn!(error = %e, overlay = %p.display(), "an offline create's overlay could not be removed");
        }
    }
}
