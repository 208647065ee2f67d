//! Reverting a VM to a snapshot: the VM comes back with the memory and disks it had then.
//!
//! ```text
//! lock → settle → state Running or Stopped
//! → checks, changing nothing: memory file (header, length, checksum), frozen images
//!   unchanged, the QEMU binary offers the snapshot's machine type, the command line names
//!   every disk        ── any failure: refused, the VM untouched
//! → [--keep-current: a snapshot of the current state first]
//! → journal: revert (preparing) → new overlays over the frozen images
//! → journal: relaunching → stop the old QEMU → start the new one with the snapshot's exact
//!   machine type, -incoming defer -S → journal: its pid and start time → load
//!                       ── failure: new QEMU stopped, journal cleared, new overlays gone, the
//!                          VM stopped on its untouched disks; the error says `qsnap start`
//! → journal: running (before the guest may run) → cont → record (disks, current, pid)
//!   → abandoned overlays removed (through the reference guard) → journal cleared
//!   → a layer their removal made mergeable is merged (journaled as a delete of nothing)
//! ```
//! Reverting discards the current state (what the guest did since its last snapshot) unless
//! `keep_current` saves it as a snapshot first.

use super::merge;
use super::refs;
use super::state::{Operation, VmState};
use super::Vm;
use crate::error::{Error, Result, RevertError};
use crate::failpoint;
use crate::launch::{self, stop_qemu, LaunchSpec, Launched, Launcher, ProcessLauncher};
use crate::name::SnapshotName;
use crate::snapshot::memfile;
use crate::snapshot::revert::{self, PreparedRevert, RestoreReport, RevertDisk};
use crate::store::{CurrentDisk, Intent, RevertIntent, RevertPhase, VmRecord};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How a revert goes.
#[derive(Debug, Clone, Default)]
pub struct RevertOptions {
    /// Leave the guest paused after loading its memory.
    pub paused: bool,
    /// Save the current state as a snapshot of this name first (a revert otherwise discards
    /// what the guest did since its last snapshot).
    pub keep_current: Option<SnapshotName>,
    /// `keep_current`'s name was made up: when it is taken, the first free one of `NAME-2`,
    /// `NAME-3`, … is used instead of refusing.
    pub keep_current_unique: bool,
}

/// What a revert did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RevertReport {
    /// The snapshot reverted to.
    pub snapshot: String,
    /// The new overlays the VM runs on.
    pub disks: Vec<RevertDisk>,
    /// True for a memory snapshot (state restored); false for disk-only (booted).
    pub memory_restored: bool,
    /// Whether the guest runs now.
    pub resumed: bool,
    /// Checking the memory file (length and checksum) before anything was touched.
    pub verify_ms: f64,
    /// True when the memory file's checksum was not read again: it matched at an earlier
    /// revert and the file was not written since.
    pub memory_verified_before: bool,
    /// How guest RAM came back.
    pub ram: RamRestore,
    /// Memory load time (device state only, for lazy RAM).
    pub load_ms: f64,
    /// From the request to the guest running (or ready, when paused).
    pub total_ms: f64,
    /// After that, while the guest runs: the record, and removing the abandoned overlays.
    pub bookkeeping_ms: f64,
    /// The overlays of the abandoned state that were deleted (what the guest did since its
    /// last snapshot).
    pub removed: Vec<PathBuf>,
    /// Layers the removal of the abandoned overlays made mergeable, merged (a layer that was
    /// a shared base of the abandoned state and the snapshot's).
    pub merges: Vec<super::delete::MergeReport>,
    /// Why merging those did not finish (the revert itself succeeded; a repair finishes it).
    pub merge_problem: Option<String>,
    /// The snapshot `keep_current` took of the state before the revert.
    pub kept_current: Option<String>,
    /// QEMU's pid.
    pub pid: Option<u32>,
}

/// How a revert brought guest RAM back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "how")]
pub enum RamRestore {
    /// A disk-only snapshot: the guest booted.
    None,
    /// Mapped from the snapshot's RAM image, copy-on-write; pages load as the guest touches
    /// them.
    Lazy,
    /// Loaded from the memory stream, all of it, before the guest ran.
    Eager {
        /// Why not lazily.
        why: String,
    },
}

impl RamRestore {
    /// How a launch of `spec` brings back `manifest`'s RAM (a snapshot `snap` of VM `vm`).
    pub(super) fn of(
        manifest: &crate::store::Manifest,
        spec: &LaunchSpec,
        vm: &crate::name::VmName,
        snap: &SnapshotName,
    ) -> RamRestore {
        match (&manifest.snapshot.memory, &spec.ram) {
            (None, _) => RamRestore::None,
            (Some(_), Some(_)) => RamRestore::Lazy,
            (Some(_), None) => RamRestore::Eager {
                why: super::lazy::why_not(&spec.command.argv, manifest.machine.as_deref())
                    .unwrap_or_else(|| {
                        format!(
                            "the snapshot has no RAM image yet (`qsnap lazy-ram {vm} {snap}` makes one)"
                        )
                    }),
            },
        }
    }
}

impl std::fmt::Display for RamRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RamRestore::None => f.write_str("none (disk-only snapshot: the guest booted)"),
            RamRestore::Lazy => f.write_str("mapped lazily from the snapshot's RAM image"),
            RamRestore::Eager { why } => write!(f, "loaded from the memory stream; {why}"),
        }
    }
}

impl Vm {
    /// Reverts to `snap`: the VM comes back with the memory and disks it had then, running if
    /// it was running then (unless `paused`). The current state is discarded.
    pub async fn revert(&self, snap: &SnapshotName, paused: bool) -> Result<RevertReport> {
        let opts = RevertOptions {
            paused,
            ..RevertOptions::default()
        };
        self.revert_with(snap, &opts, &ProcessLauncher::default())
            .await
    }

    /// [`Vm::revert`] with options and a launcher of your own.
    pub async fn revert_with<L: Launcher>(
        &self,
        snap: &SnapshotName,
        opts: &RevertOptions,
        launcher: &L,
    ) -> Result<RevertReport> {
        let started = Instant::now();
        let op = self.begin(&format!("revert {snap}")).await?;
        let mut record = op.record.clone();
        let manifest = self.store().manifest(self.name(), snap).await?;
        let state = VmState::observe(self, &record).await;
        state.allows(self.name().as_str(), Operation::Revert)?;
        let command = Self::command_of(&record)?.clone();
        let socket = self.socket_path(&record)?;
        let refuse = |why: String| -> Error {
            RevertError::Refused {
                snapshot: snap.to_string(),
                why,
            }
            .into()
        };
        for d in &manifest.snapshot.disks {
            if !record.disks.iter().any(|r| r.device == d.device) {
                return Err(refuse(format!("the VM has no disk {} any more", d.device)));
            }
        }
        // The snapshot's files are checked (the memory file hashed in full, unless this very
        // file was checked before) while the machine type is checked and the overlays are
        // made: all of that only reads or makes new files. The check is awaited before
        // anything the VM runs on changes (a snapshot kept, the old QEMU stopped).
        let mut checking = Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
            let (snap, report) = (snap.to_string(), manifest.snapshot.clone());
            async move { revert::validate(&snap, &report).await }
        })));
        binary_can_load(&command.argv[0], &manifest, self.cancel())
            .await
            .map_err(refuse)?;
        let t_checked = started.elapsed();
        let planned = revert::plan_overlays(&manifest.snapshot, None).await?;
        // The new chain: the snapshot's disks on their new overlays, others as they are.
        let mut new_disks = record.disks.clone();
        for d in &mut new_disks {
            if let Some(r) = planned.iter().find(|r| r.device == d.device) {
                d.image = r.overlay.clone();
                d.owned = true;
            }
        }
        let spec = LaunchSpec {
            vm: self.name().to_string(),
            command,
            disks: Self::substitutions(&new_disks),
            qmp_socket: socket,
            incoming: manifest.snapshot.memory.is_some(),
            // Always -S: the guest runs only once the journal says the new QEMU is the VM
            // (for a disk-only snapshot too, whose guest boots).
            paused: true,
            machine: manifest.machine.clone(),
            log: self.log_path(),
            ram: revert::lazy_mapping(&manifest.snapshot),
        };
        let ram = RamRestore::of(&manifest, &spec, self.name(), snap);
        // Check the command line rewrites before anything changes.
        launch::build_argv(&spec).map_err(|e| refuse(e.to_string()))?;
        if self.cancel().is_cancelled() {
            return Err(Error::Cancelled);
        }

        let mut verified = None;
        if opts.keep_current.is_some() {
            verified = Some(checked(&mut checking).await?);
        }
        let kept_current = match &opts.keep_current {
            None => None,
            Some(name) => {
                if !state.is_running() {
                    return Err(refuse(
                        "--keep-current needs the VM running (its current state lives in QEMU)"
                            .into(),
                    ));
                }
                let mut co = self.create_options(name.clone());
                co.unique_name = opts.keep_current_unique;
                let m = self.create_locked(record.clone(), &co).await?;
                record = self.store().record(self.name()).await?;
                // The snapshot moved the disks onto new overlays: the new chain keeps them
                // for the disks the revert does not touch.
                for d in &mut new_disks {
                    if !planned.iter().any(|r| r.device == d.device) {
                        if let Some(r) = record.disks.iter().find(|r| r.device == d.device) {
                            *d = r.clone();
                        }
                    }
                }
                Some(m.name)
            }
        };

        let mut intent = RevertIntent {
            snapshot: snap.to_string(),
            phase: RevertPhase::Preparing,
            new_overlays: planned.iter().map(|r| r.overlay.clone()).collect(),
            old_disks: record.disks.clone(),
            new_disks: new_disks.clone(),
            // What the revert itself will do, so a recovery does the same: a memory snapshot
            // resumes as it was taken (running or paused); a disk-only one boots.
            resume: !opts.paused
                && (manifest.snapshot.memory.is_none() || manifest.snapshot.was_running),
            old_pid: state.pid(),
            new_pid: None,
            new_pid_start: None,
            kept_current: kept_current.clone(),
        };
        self.store()
            .write_journal(self.name(), &Intent::Revert(intent.clone()))
            .await?;
        failpoint::hit("revert.journaled", state.pid()).await?;
        let mut prepared = match revert::make_overlays(
            snap.as_str(),
            &manifest.snapshot,
            planned,
            0.0,
            self.cancel(),
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = self.store().clear_journal(self.name()).await;
                return Err(e);
            }
        };
        let verified = match verified {
            Some(v) => v,
            None => match checked(&mut checking).await {
                Ok(v) => v,
                Err(e) => {
                    revert::discard(&prepared).await;
                    let _ = self.store().clear_journal(self.name()).await;
                    return Err(e);
                }
            },
        };
        let verify_ms = verified.verify_ms;
        prepared.verify_ms = verify_ms;
        failpoint::hit("revert.prepared", state.pid()).await?;
        let t_prepared = started.elapsed();
        if self.cancel().is_cancelled() {
            revert::discard(&prepared).await;
            let _ = self.store().clear_journal(self.name()).await;
            return Err(Error::Cancelled);
        }
        let spec = LaunchSpec {
            disks: Self::substitutions(&new_disks),
            ..spec
        };

        // ---- from here the old QEMU goes away: finish, or leave the VM stopped ----
        intent.phase = RevertPhase::Relaunching;
        self.store()
            .write_journal(self.name(), &Intent::Revert(intent.clone()))
            .await?;
        // Only the QEMU the state saw (its pid checked against the recorded start time): a
        // stale pid the kernel gave another process is never signalled.
        if state.is_running() || state.pid().is_some() {
            stop_qemu(&record.qmp, state.pid(), crate::launch::QUIT_TIMEOUT).await?;
        }
        failpoint::hit("revert.stopped", None).await?;
        let t_stopped = started.elapsed();
        let fail = |cause: Error, record: &VmRecord| -> Error {
            RevertError::Failed {
                vm: self.name().to_string(),
                cause: Box::new(cause),
                disks: record
                    .disks
                    .iter()
                    .map(|d| format!("{}: {}", d.device, d.image.display()))
                    .collect(),
            }
            .into()
        };
        let relaunched = match self.relaunch(launcher, &spec, &prepared, &mut intent).await {
            Ok(x) => x,
            Err((cause, pid)) => {
                self.abandon_relaunch(&mut record, &prepared, pid).await;
                return Err(fail(cause, &record));
            }
        };
        let (launched, restored, qmp) = relaunched;
        failpoint::hit("revert.loaded", launched.pid).await?;

        // ---- the journal says the new QEMU is the VM *before* its guest runs: from the
        // first `cont` on, the new overlays hold guest writes a recovery must keep ----
        intent.phase = RevertPhase::Running;
        if launched.pid != intent.new_pid {
            // (The monitor's peer, where the launcher did not know the pid.)
            intent.new_pid = launched.pid;
            intent.new_pid_start = match launched.pid {
                Some(p) => crate::proc::start_time(p).await,
                None => None,
            };
        }
        if let Err(e) = self
            .store()
            .write_journal(self.name(), &Intent::Revert(intent.clone()))
            .await
        {
            // The guest never ran on the new overlays: going back loses nothing.
            drop(qmp);
            self.abandon_relaunch(&mut record, &prepared, launched.pid)
                .await;
            return Err(fail(e, &record));
        }
        let resume = intent.resume;
        let resumed = if resume {
            revert::resume(&qmp).await
        } else {
            Ok(())
        };
        drop(qmp);
        let running_ms = started.elapsed().as_secs_f64() * 1e3;
        failpoint::hit("revert.resumed", launched.pid).await?;

        // ---- the new VM runs: record it, then drop the abandoned state ----
        let Finished { removed, mergeable } =
            finish(self, &mut record, &intent, launched.pid).await?;
        self.store().clear_journal(self.name()).await?;
        let merged = if mergeable {
            merge::merge_leftovers(self, &mut record, None).await
        } else {
            Ok(Vec::new())
        };
        let (merges, merge_problem) = match merged {
            Ok(m) => (m, None),
            Err(e) => {
                warn!(error = %e, "merging the layers the revert left mergeable did not finish");
                (
                    Vec::new(),
                    Some(format!(
                        "{e}; nothing is lost: `qsnap check {} --repair` finishes the merge",
                        self.name()
                    )),
                )
            }
        };
        if let Err(e) = resumed {
            return Err(Error::LeftPaused {
                what: format!("the VM was reverted to {snap}, but its guest could not be resumed"),
                cause: Box::new(e),
                fix: format!("resume it with `qsnap qmp {} cont`", record.qmp),
            });
        }
        info!(vm = %self.name(), %snap, ms = started.elapsed().as_secs_f64() * 1e3, "reverted");
        tracing::debug!(verify_ms, ?t_checked, ?t_prepared, ?t_stopped, load_ms = restored.load_ms, total = ?started.elapsed(), "revert breakdown");
        Ok(RevertReport {
            snapshot: snap.to_string(),
            disks: prepared.disks.clone(),
            memory_restored: prepared.memory.is_some(),
            resumed: resume,
            ram,
            verify_ms,
            memory_verified_before: verified.memory == Some(memfile::Verified::Remembered),
            load_ms: restored.load_ms,
            total_ms: running_ms,
            bookkeeping_ms: started.elapsed().as_secs_f64() * 1e3 - running_ms,
            removed,
            merges,
            merge_problem,
            kept_current,
            pid: launched.pid,
        })
    }

    /// Starts the new QEMU, records it in the journal (pid and start time, before anything
    /// is loaded into it), and loads the snapshot. The guest is left paused: the caller
    /// resumes it once the journal says the new QEMU is the VM.
    async fn relaunch<L: Launcher>(
        &self,
        launcher: &L,
        spec: &LaunchSpec,
        prepared: &PreparedRevert,
        intent: &mut RevertIntent,
    ) -> std::result::Result<(Launched, RestoreReport, qsnap_qmp::Qmp), (Error, Option<u32>)> {
        let t0 = Instant::now();
        let launched = launcher.launch(spec).await.map_err(|e| (e, None))?;
        let t_launched = t0.elapsed();
        let pid = launched.pid;
        intent.new_pid = pid;
        intent.new_pid_start = match pid {
            Some(p) => crate::proc::start_time(p).await,
            None => None,
        };
        self.store()
            .write_journal(self.name(), &Intent::Revert(intent.clone()))
            .await
            .map_err(|e| (e, pid))?;
        failpoint::hit("revert.launched", pid)
            .await
            .map_err(|e| (e, pid))?;
        let qmp = self.connect().await.map_err(|e| (e, pid))?;
        tracing::debug!(?t_launched, t_connected = ?t0.elapsed(), "relaunched");
        let restored = revert::restore(&qmp, prepared, false, Duration::from_secs(600))
            .await
            .map_err(|e| (e, pid))?;
        let pid = qmp.peer_pid().or(pid);
        tracing::debug!(t_restored = ?t0.elapsed(), "restored");
        Ok((Launched { pid, ..launched }, restored, qmp))
    }

    /// A relaunch that failed before the guest ran: the new QEMU stopped, the new overlays
    /// removed (they hold nothing the guest wrote), the VM recorded as stopped on its
    /// previous disks, the journal cleared.
    async fn abandon_relaunch(
        &self,
        record: &mut VmRecord,
        prepared: &PreparedRevert,
        pid: Option<u32>,
    ) {
        if let Some(pid) = pid {
            let _ = stop_qemu(&record.qmp, Some(pid), Duration::from_secs(2)).await;
        }
        super::state::record_qemu(record, None).await;
        let _ = self.store().write_record(record).await;
        // The journal goes before the overlays: a journal left naming overlays that are gone
        // would make a recovery point the record at them. If it cannot go, the overlays stay
        // (empty; the recovery removes them, or goes forward onto them, from the journal).
        if self.store().clear_journal(self.name()).await.is_ok() {
            revert::discard(prepared).await;
        }
    }
}

/// The outcome of the snapshot's check started at the top of a revert (taken once).
async fn checked(
    checking: &mut Option<tokio_util::task::AbortOnDropHandle<Result<revert::Validated>>>,
) -> Result<revert::Validated> {
    let Some(handle) = checking.take() else {
        unreachable!("the snapshot's check is awaited once");
    };
    handle
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Refuses (with why) when the QEMU binary cannot load `manifest`'s snapshot: its exact
/// machine type, and for a mapped-ram memory file QEMU ≥ 9.0. Reads only (cached per binary).
pub(super) async fn binary_can_load(
    binary: &str,
    manifest: &crate::store::Manifest,
    cancel: &tokio_util::sync::CancellationToken,
) -> std::result::Result<(), String> {
    if let Some(machine) = &manifest.machine {
        launch::machine::check(binary, machine, cancel).await?;
    }
    let mapped_ram = manifest
        .snapshot
        .memory
        .as_ref()
        .is_some_and(|m| m.capabilities.iter().any(|c| c == "mapped-ram"));
    if mapped_ram {
        launch::machine::check_version(
            binary,
            (9, 0),
            "the snapshot's memory file (QEMU's mapped-ram format)",
            cancel,
        )
        .await?;
    }
    Ok(())
}

/// The last part of a revert (also what a recovery of one that got this far does): the
/// record names the new disks, the snapshot and the new QEMU; the overlays of the abandoned
/// state go (through the reference guard: only files qsnap made that nothing uses).
pub(crate) async fn finish(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &RevertIntent,
    pid: Option<u32>,
) -> Result<Finished> {
    record.disks = intent.new_disks.clone();
    record.current = Some(intent.snapshot.clone());
    super::state::record_qemu(record, pid).await;
    for p in &intent.new_overlays {
        if !record.owned_images.contains(p) {
            record.owned_images.push(p.clone());
        }
    }
    vm.store().write_record(record).await?;
    failpoint::hit("revert.recorded", pid).await?;
    let (removed, mergeable) = remove_abandoned(vm, record, &intent.old_disks).await;
    Ok(Finished { removed, mergeable })
}

/// What the end of a revert did besides recording it.
pub(crate) struct Finished {
    /// The abandoned overlays removed.
    pub removed: Vec<PathBuf>,
    /// Their removal left a layer no snapshot needs (it was the second child of a base no
    /// snapshot names any more): the caller merges it once the revert's journal is cleared
    /// (`merge::merge_leftovers`, journaled as a delete of nothing), so that the chains
    /// stay as short as the snapshots allow and `check` stays clean.
    pub mergeable: bool,
}

/// Deletes the overlays of the abandoned state that qsnap made and nothing uses. Returns
/// them, and whether their removal left a layer to merge (read from the same view of the
/// store, with the removed overlays taken out of it).
async fn remove_abandoned(
    vm: &Vm,
    record: &mut VmRecord,
    old: &[CurrentDisk],
) -> (Vec<PathBuf>, bool) {
    let candidates: Vec<PathBuf> = old
        .iter()
        .filter(|d| record.owned_images.contains(&d.image))
        .filter(|d| !record.disks.iter().any(|n| n.image == d.image))
        .map(|d| d.image.clone())
        .collect();
    if candidates.is_empty() {
        return (Vec::new(), false);
    }
    let manifests = match vm.store().manifests(vm.name()).await {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "cannot read manifests; keeping the old overlays");
            return (Vec::new(), false);
        }
    };
    let (mut graph, live) = match merge::view(vm, record, &manifests).await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "cannot check who uses the old overlays; keeping them");
            return (Vec::new(), false);
        }
    };
    let mut removed = Vec::new();
    for image in candidates {
        match refs::safe_unlink(&image, &graph, record, live.as_ref()).await {
            Ok(()) => {
                record.owned_images.retain(|o| o != &image);
                graph.forget(&image);
                removed.push(image);
            }
            Err(e) => warn!(image = %image.display(), error = %e, "kept an abandoned overlay"),
        }
    }
    if !removed.is_empty() {
        if let Err(e) = vm.store().write_record(record).await {
            warn!(error = %e, "could not record the removed overlays");
        }
    }
    let mergeable = !removed.is_empty() && merge::has_merges(&graph, record, live.as_ref());
    (removed, mergeable)
}
