//! Taking a snapshot of a VM in the store, with the store kept in step with QEMU at every
//! moment:
//!
//! ```text
//! lock → settle an interrupted operation → state must be Running → preflight (no change)
//! → journal: create (every file and node it may make, the settings to restore)
//! → snapshot::Planned::take  ── failure: rolled back; disks that stay on overlays are
//!                                recorded before the error is returned
//! → POINT OF NO RETURN: the snapshot exists
//! → journal: committed (the whole manifest) → record (the VM writes to the overlays now)
//! → manifest → journal cleared
//! ```
//! After the point of no return nothing is undone: a failure to write the store is
//! "snapshot taken, but …" and the committed journal lets the next command (or
//! `qsnap check --repair`) finish the bookkeeping.
//!
//! A disk-only snapshot of a stopped VM is made offline, with `qemu-img` (`create/offline.rs`),
//! through the same journal.
//!
//! [`Vm::create_snapshot_with`] is a create and what a command asks to follow it (making its
//! memory lazy), each its own operation on the VM; what follows never undoes the snapshot,
//! and a failure of it comes back in the [`CreateOutcome`], not as an error.

use super::state::{Operation, VmState};
use super::Vm;
use crate::error::{CreateError, Error, Result};
use crate::failpoint;
use crate::snapshot::{self, CreateOptions};
use crate::store::{self, CurrentDisk, Intent, Manifest, ThawIntent, VmRecord};
use qsnap_qmp::{types, Qmp};
use std::path::{Path, PathBuf};

mod offline;

/// A snapshot and what is to follow it once it is taken ([`Vm::create_snapshot_with`]).
#[derive(Debug)]
pub struct VmCreateOptions {
    /// The snapshot itself ([`Vm::create_options`] gives the defaults).
    pub create: CreateOptions,
    /// Then make its memory lazy, as [`Vm::make_lazy`] does. If that fails the snapshot stays
    /// as taken (its memory a stream, which reverts load) and
    /// [`CreateOutcome::lazy_ram_failed`] says why.
    pub lazy_ram: bool,
}

/// What [`Vm::create_snapshot_with`] did.
#[derive(Debug)]
pub struct CreateOutcome {
    /// The snapshot as the store holds it now (with its RAM image when it was made lazy; as
    /// taken, in the rare case the store could not be read back after that).
    pub manifest: Manifest,
    /// `lazy_ram` was asked for and failed: why. The snapshot was taken all the same.
    pub lazy_ram_failed: Option<Error>,
}

impl Vm {
    /// [`Vm::create_snapshot`], then what `opts` asks to follow it. An error means no
    /// snapshot was taken (or, as for `create_snapshot`, one was taken but not recorded in
    /// full); a failure of what follows is in the outcome.
    pub async fn create_snapshot_with(&self, opts: VmCreateOptions) -> Result<CreateOutcome> {
        let manifest = self.create_snapshot(opts.create).await?;
        // The name taken, which a generated one may have moved on from (`NAME-2`).
        let snap = crate::name::SnapshotName::new(&manifest.name)?;
        if !opts.lazy_ram {
            return Ok(CreateOutcome {
                manifest,
                lazy_ram_failed: None,
            });
        }
        match self.make_lazy(&snap).await {
            // The snapshot stands either way: an error here would read as "none was taken".
            Ok(_) => Ok(CreateOutcome {
                manifest: match self.snapshot(&snap).await {
                    Ok(lazy) => lazy,
                    Err(e) => {
                        tracing::warn!(error = %e, %snap, "made lazy, but its manifest could not be read back; the one shown is from before");
                        manifest
                    }
                },
                lazy_ram_failed: None,
            }),
            Err(e) => Ok(CreateOutcome {
                manifest,
                lazy_ram_failed: Some(e),
            }),
        }
    }

    /// Takes a snapshot and records it: the record notes the new current snapshot and disk
    /// images first, then the manifest is written. Refuses when another operation holds the
    /// VM, the VM is not running, or the name is taken.
    pub async fn create_snapshot(&self, opts: CreateOptions) -> Result<Manifest> {
        let snap = opts.name.clone();
        let op = self.begin(&format!("create {snap}")).await?;
        super::pool::refuse_standby(&op.record, "create")?;
        self.create_locked(op.record, &opts).await
    }

    /// The create itself, for a caller that holds the VM's lock (and settled its journal).
    pub(crate) async fn create_locked(
        &self,
        mut record: VmRecord,
        opts: &CreateOptions,
    ) -> Result<Manifest> {
        if let Some(d) = &opts.description {
            crate::name::check_description(d)?;
        }
        let owned;
        let opts = if opts.unique_name {
            let mut o = opts.clone();
            o.name = self.free_name(&opts.name, &record, opts).await?;
            owned = o;
            &owned
        } else {
            opts
        };
        let snap = &opts.name;
        if self.store().has_snapshot(self.name(), snap).await? {
            return Err(Error::SnapshotExists {
                vm: self.name().to_string(),
                snapshot: snap.to_string(),
            });
        }
        let state = VmState::observe(self, &record).await;
        if matches!(state, VmState::Stopped) && opts.mode == Some(snapshot::Mode::DiskOnly) {
            return offline::create(self, record, opts).await;
        }
        state.allows(self.name().as_str(), Operation::Create)?;
        let created_at = store::now_rfc3339();
        let qmp = self.connect().await?;
        let pid = qmp.peer_pid();
        let planned = snapshot::preflight(&qmp, opts).await?;
        let mut intent = planned.intent();
        self.store()
            .write_journal(self.name(), &Intent::Create(intent.clone()))
            .await?;
        failpoint::hit("create.journaled", pid).await?;

        let report = match planned.take().await {
            Ok(r) => r,
            Err(e) => return self.record_failure(record, e).await,
        };

        // ---- the point of no return: the snapshot exists ----
        let manifest = Manifest {
            schema: store::SCHEMA,
            vm: self.name().to_string(),
            name: snap.to_string(),
            parent: record.current.clone(),
            created_at,
            qemu_version: qmp.greeting().version.qemu.to_string(),
            machine: machine_type(&qmp).await,
            snapshot: report,
            imported: None,
            description: opts.description.clone(),
        };
        apply(&mut record, &manifest, qmp.peer_pid()).await;
        drop(qmp);
        intent.committed = Some(Box::new(manifest.clone()));
        // If the committed journal cannot be written, the uncommitted one must not stay
        // either: a recovery would take the snapshot for a half-made one and undo it.
        let journaled = self
            .store()
            .write_journal(self.name(), &Intent::Create(intent))
            .await
            .is_ok();
        if !journaled {
            let _ = self.store().clear_journal(self.name()).await;
        }
        let taken_but = |problem: Error| -> Error {
            CreateError::TakenBut {
                vm: self.name().to_string(),
                snapshot: snap.to_string(),
                problem: Box::new(problem),
                journaled,
            }
            .into()
        };
        failpoint::hit("create.committed", pid)
            .await
            .map_err(taken_but)?;
        // The record first: QEMU writes to the new overlays now, and a restart must open
        // them whatever else fails.
        self.store()
            .write_record(&record)
            .await
            .map_err(taken_but)?;
        failpoint::hit("create.recorded", pid)
            .await
            .map_err(taken_but)?;
        self.store()
            .write_manifest(&manifest)
            .await
            .map_err(taken_but)?;
        if let (Some(why), Some(socket)) = (&manifest.snapshot.thaw_failed, &opts.quiesce) {
            // The snapshot stands; the thaw it owes the guest is journaled, so the next
            // command (or `check --repair`) retries it.
            let owed = ThawIntent {
                snapshot: snap.to_string(),
                socket: socket.clone(),
            };
            self.store()
                .write_journal(self.name(), &Intent::Thaw(owed))
                .await
                .map_err(taken_but)?;
            return Err(CreateError::TakenWithProblem {
                vm: self.name().to_string(),
                snapshot: snap.to_string(),
                problem: format!(
                    "the guest's filesystems could not be thawed after it ({why}); they may still be frozen (the guest's writes wait)"
                ),
                fix: format!(
                    "`qsnap check {} --repair` retries the thaw (so does the next qsnap command on {})",
                    self.name(),
                    self.name()
                ),
            }
            .into());
        }
        self.store()
            .clear_journal(self.name())
            .await
            .map_err(taken_but)?;
        Ok(manifest)
    }

    /// A create failed and was rolled back: disks that stay on their new overlays (QEMU
    /// died, or merging back failed) become the record's disks before the error goes back.
    async fn record_failure(&self, mut record: VmRecord, e: Error) -> Result<Manifest> {
        let kept = e.kept_overlays();
        let stored = async {
            if !kept.is_empty() {
                follow_kept(&mut record, &kept);
                if e.is_disconnected() {
                    super::state::record_qemu(&mut record, None).await;
                }
                self.store().write_record(&record).await?;
            }
            self.store().clear_journal(self.name()).await
        }
        .await;
        match stored {
            Ok(()) => Err(e),
            Err(problem) => Err(Error::StoreBehind {
                vm: self.name().to_string(),
                cause: Box::new(e),
                problem: Box::new(problem),
            }),
        }
    }
}

/// The record after a snapshot: current is the new snapshot, the switched disks write to
/// their overlays (qsnap's own paths: QEMU may describe an overlay over a relative path as
/// `json:{…}`), which qsnap owns.
pub(crate) async fn apply(record: &mut VmRecord, manifest: &Manifest, pid: Option<u32>) {
    // (Also the offline create's: `create/offline.rs`.)
    record.current = Some(manifest.name.clone());
    for d in &manifest.snapshot.disks {
        if !record.disks.iter().any(|r| r.device == d.device) {
            record.disks.push(CurrentDisk {
                device: d.device.clone(),
                image: d.image.clone(),
                launch_image: d.image.clone(),
                owned: false,
            });
        }
        on_overlay(record, &d.device, &d.overlay);
    }
    if pid.is_some() && record.pid != pid {
        super::state::record_qemu(record, pid).await;
    }
}

/// Disks that stay on new overlays (a failed create could not merge them back): the VM
/// writes there, so the record names them, and they are qsnap's.
pub(crate) fn follow_kept(record: &mut VmRecord, kept: &[(String, PathBuf)]) {
    for (device, overlay) in kept {
        on_overlay(record, device, overlay);
    }
}

/// Disk `device` writes to `overlay`, an image qsnap made.
fn on_overlay(record: &mut VmRecord, device: &str, overlay: &Path) {
    if let Some(d) = record.disks.iter_mut().find(|d| d.device == device) {
        d.image = overlay.to_owned();
        d.owned = true;
    }
    if !record.owned_images.iter().any(|o| o == overlay) {
        record.owned_images.push(overlay.to_owned());
    }
}

/// The machine type (`pc-i440fx-10.0`), so a revert relaunches exactly it.
async fn machine_type(qmp: &Qmp) -> Option<String> {
    let v = qmp
        .execute(types::qom_get {
            path: "/machine".into(),
            property: "type".into(),
        })
        .await
        .ok()?;
    v.as_str()
        .map(|t| t.strip_suffix("-machine").unwrap_or(t).to_owned())
}
