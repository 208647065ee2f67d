//! A clone claiming a standby: the standby's QEMU (started, memory loaded, paused) becomes
//! the clone's.
//!
//! ```text
//! clone's locks held (source shared, the new name) → each standby of the pool, its lock
//! taken at once (a busy one is skipped): made from what is there now, its moved paths the
//! clone's, its QEMU alive (the pid its record names) and paused → claim it:
//!   journal on the standby: claim as NEW                               (claim.journaled)
//!   files/, qmp.sock, qemu.log (all but record, journal, lock) renamed into vms/NEW/ (QEMU
//!     keeps its open files; its listening monitor socket moves with its name) (claim.moved)
//!   NEW's record: a clone, its QEMU and overlays the standby's — the point of no return
//!                                                                      (claim.recorded)
//!   the standby's record, then its journal, go                         (claim.released)
//!   cont                                                               (claim.resumed)
//! ```
//! Its overlays stay in `<store>/standbys/<standby>/`: QEMU names an image by the path it
//! opened, and a snapshot of the clone compares QEMU's name with the file.
//!
//! Killed at any step, the claim settles (the standby's next operation, or `check
//! --repair`) to one of two things: before NEW's record exists, the files go back and the
//! standby stays one; after, the standby's record goes and NEW is a clone (paused, if qsnap
//! died before `cont`: `qsnap resume NEW`). Never both, never neither.
//!
//! What it must never do: claim a standby whose guest has run, or whose lock it does not
//! hold; write NEW's record before every file NEW's command line names is in place.

use super::super::Vm;
use super::names::fingerprint;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::launch::clone_argv::CloneArgv;
use crate::name::{SnapshotName, VmName};
use crate::snapshot::revert::{self, RevertDisk};
use crate::store::{self, ClaimIntent, CloneOf, Fingerprint, Intent, LaunchCommand, Manifest};
use crate::store::{Origin, VmRecord};
use qsnap_qmp::types;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// What a clone asks of a standby.
pub(in crate::vm) struct Wanted<'a> {
    pub snap: &'a SnapshotName,
    /// The source's record and the snapshot, as the clone read them under its locks.
    pub source: &'a VmRecord,
    pub manifest: &'a Manifest,
    /// The clone's command line (per-VM paths in its own directory).
    pub argv: &'a CloneArgv,
    /// The clone's QMP socket.
    pub qmp: &'a Path,
    /// Leave the guest paused.
    pub paused: bool,
}

/// What a claim came to.
pub(in crate::vm) enum Claimed {
    /// The clone, made from a standby.
    Clone(Taken),
    /// No standby could be taken; why, when the snapshot has a pool.
    Cold(Option<String>),
}

/// The standby a clone took, and what became of it.
pub(in crate::vm) struct Taken {
    /// Its name.
    pub standby: String,
    /// Its QEMU, now the clone's.
    pub pid: Option<u32>,
    /// Its overlays over the snapshot's frozen images, now the clone's.
    pub disks: Vec<RevertDisk>,
    /// Whether its RAM is mapped from the snapshot's RAM image.
    pub lazy: bool,
    /// Whether the guest runs now.
    pub resumed: bool,
}

/// What stays in a standby's directory when a clone claims it (its record, journal and
/// lock, and its empty snapshot directories); everything else there (QEMU's per-VM files,
/// its monitor socket and log, an embedder's notes about the QEMU) moves to the clone's.
const STAYS: [&str; 5] = ["vm.json", "journal.json", "lock", "snapshots", "memory"];

/// Why a standby cannot be claimed (after the checks that need no QEMU, and QEMU's).
pub(super) async fn usable(
    sb: &Vm,
    record: &VmRecord,
    source: &VmName,
    snap: &SnapshotName,
    now: Option<&Fingerprint>,
) -> std::result::Result<(), String> {
    let Some(of) = &record.standby else {
        return Err("it is no standby".into());
    };
    if of.vm != source.as_str() || of.snapshot != snap.as_str() {
        return Err(format!("it is a standby of {} {}", of.vm, of.snapshot));
    }
    match now {
        None => return Err(format!("snapshot {snap} of {source} is gone")),
        Some(f) if f.snapshot_taken_at != of.fingerprint.snapshot_taken_at => {
            return Err(format!("snapshot {snap} was deleted and taken again since"))
        }
        Some(f) if f.command != of.fingerprint.command => {
            return Err(format!("{source}'s command line has changed since"))
        }
        Some(f) if f.qemu != of.fingerprint.qemu => {
            return Err("the QEMU binary has been replaced since".into())
        }
        Some(_) => {}
    }
    let qmp = sb
        .connect_quick(record)
        .await
        .map_err(|e| format!("its QEMU does not answer ({e})"))?;
    if qmp.peer_pid().is_some() && record.pid.is_some() && qmp.peer_pid() != record.pid {
        return Err("its monitor is served by another process than its QEMU".into());
    }
    let st = qmp
        .execute(types::query_status {})
        .await
        .map_err(|e| format!("its QEMU does not say its run state ({e})"))?;
    let runstate = serde_json::to_value(st.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    // Paused after its load, or before it ever started (a disk-only snapshot): anything
    // else (running, still loading, shut down) is not what a clone may be handed.
    if st.running || !matches!(runstate.as_str(), "paused" | "prelaunch") {
        return Err(format!("its QEMU is {runstate}, not paused and ready"));
    }
    Ok(())
}

impl Vm {
    /// Takes a ready standby of the snapshot's pool as clone `new`, if there is one. Holds
    /// the clone's locks (the source's shared, `new`'s).
    pub(in crate::vm) async fn claim(&self, new: &VmName, w: &Wanted<'_>) -> Result<Claimed> {
        let store = self.store();
        if store.pool(self.name(), w.snap).await?.is_none() {
            return Ok(Claimed::Cold(None));
        }
        // What a claim moves into the clone's directory can be moved back only if nothing
        // else is there: files an earlier VM of that name left make it a cold clone.
        let dir = store.vm_dir(new);
        let left = store::blocking(move || {
            Ok(std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n != "lock")
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default())
        })
        .await?;
        if !left.is_empty() {
            return Ok(Claimed::Cold(Some(format!(
                "the clone's directory holds files an earlier VM of that name left ({})",
                left.join(", ")
            ))));
        }
        let now = fingerprint(w.source, w.manifest).await?;
        let mut unusable = Vec::new();
        for sb in self.standbys(w.snap).await? {
            // At once: a standby another clone is claiming is that clone's.
            let Ok(vm) = self.engine().at_once().vm(&sb).await else {
                continue;
            };
            let Ok(op) = vm.begin(&format!("claim as {new}")).await else {
                continue;
            };
            let record = op.record.clone();
            if let Err(why) = usable(&vm, &record, self.name(), w.snap, Some(&now)).await {
                unusable.push(format!("{sb}: {why}"));
                continue;
            }
            if let Err(why) = same_paths(store, &record, new, w.argv) {
                unusable.push(format!("{sb}: {why}"));
                continue;
            }
            let taken = vm.become_clone(record, new, w, self.name()).await?;
            drop(op);
            return Ok(Claimed::Clone(taken));
        }
        Ok(Claimed::Cold(Some(if unusable.is_empty() {
            "no standby of the pool was ready".into()
        } else {
            format!(
                "no standby of the pool could be used ({}); the next refill discards them",
                unusable.join("; ")
            )
        })))
    }

    /// The claim itself, this VM being the standby (its lock held, found usable).
    async fn become_clone(
        &self,
        sb: VmRecord,
        new: &VmName,
        w: &Wanted<'_>,
        source: &VmName,
    ) -> Result<Taken> {
        let store = self.store();
        let pid = sb.pid;
        store
            .write_journal(
                self.name(),
                &Intent::Claim(ClaimIntent {
                    new: new.to_string(),
                }),
            )
            .await?;
        let moved = async {
            failpoint::hit("claim.journaled", pid).await?;
            move_files(store.vm_dir(self.name()), store.vm_dir(new)).await?;
            failpoint::hit("claim.moved", pid).await?;
            let guest_agent = w.source.guest_agent.as_ref().and_then(|g| {
                w.argv
                    .moved
                    .iter()
                    .find(|m| &m.from == g)
                    .map(|m| m.to.clone())
            });
            let record = VmRecord {
                schema: store::SCHEMA,
                name: new.to_string(),
                qmp: w.qmp.display().to_string(),
                origin: Origin::Run,
                pid: sb.pid,
                pid_start: sb.pid_start,
                command: Some(LaunchCommand {
                    argv: w.argv.argv.clone(),
                    cwd: Self::command_of(w.source)?.cwd.clone(),
                }),
                current: None,
                disks: sb.disks.clone(),
                owned_images: sb.owned_images.clone(),
                guest_agent,
                registered_at: store::now_rfc3339(),
                clone_of: Some(CloneOf {
                    vm: source.to_string(),
                    snapshot: w.snap.to_string(),
                    moved: w.argv.moved.clone(),
                    standby: Some(self.name().to_string()),
                }),
                standby: None,
            };
            store.write_record(&record).await?;
            Ok::<_, Error>(record)
        }
        .await;
        let record = match moved {
            Ok(r) => r,
            Err(e) => {
                // Before the point of no return: the standby stays one.
                if let Err(u) = finish_or_undo(self, new).await {
                    warn!(error = %u, "the claim could not be undone; `qsnap check --repair` settles it");
                } else if let Err(u) = store.clear_journal(self.name()).await {
                    warn!(error = %u, "the claim's journal stays; `qsnap check --repair` settles it");
                }
                return Err(e);
            }
        };
        // NEW exists: from here every step only finishes the claim.
        failpoint::hit("claim.recorded", pid).await?;
        // Done either way: a standby record left here (its journal with it) is settled as a
        // finished claim by the next look at it.
        if let Err(e) = store.release_standby(self.name()).await {
            warn!(standby = %self.name(), error = %e, "the claimed standby's record stays until `qsnap check {source} --repair`");
        }
        failpoint::hit("claim.released", pid).await?;
        let clone = self.engine().vm_from(new.clone(), record.clone());
        let of = sb.standby.as_ref().expect("a standby");
        let resumed = of.resume && !w.paused;
        if resumed {
            let qmp = clone.connect().await?;
            revert::resume(&qmp).await?;
            failpoint::hit("claim.resumed", pid).await?;
        }
        info!(vm = %new, standby = %self.name(), %source, snapshot = %w.snap, "cloned from a standby");
        Ok(Taken {
            standby: self.name().to_string(),
            pid,
            disks: sb
                .disks
                .iter()
                .filter(|d| d.owned)
                .map(|d| RevertDisk {
                    device: d.device.clone(),
                    image: w
                        .manifest
                        .snapshot
                        .disks
                        .iter()
                        .find(|s| s.device == d.device)
                        .map(|s| s.image.clone())
                        .unwrap_or_default(),
                    overlay: d.image.clone(),
                })
                .collect(),
            lazy: of.lazy,
            resumed,
        })
    }
}

/// Whether the standby's command line is the clone's but for its directory: the same
/// per-VM paths, moved to the same names.
fn same_paths(
    store: &store::Store,
    sb: &VmRecord,
    new: &VmName,
    argv: &CloneArgv,
) -> std::result::Result<(), String> {
    let sb_name = VmName::parse(&sb.name).ok_or("its record names no valid VM")?;
    let from = format!("{}/", store.vm_dir(&sb_name).display());
    let to = format!("{}/", store.vm_dir(new).display());
    let theirs: Vec<String> = sb
        .command
        .as_ref()
        .map(|c| c.argv.iter().map(|a| a.replace(&from, &to)).collect())
        .unwrap_or_default();
    let moved_ok = sb.clone_of.as_ref().is_some_and(|of| {
        of.moved.len() == argv.moved.len()
            && of.moved.iter().zip(&argv.moved).all(|(a, b)| {
                a.option == b.option
                    && a.from == b.from
                    && a.to.to_string_lossy().replace(&from, &to) == b.to.to_string_lossy()
            })
    });
    if theirs != argv.argv || !moved_ok {
        return Err("its command line is not the one the clone would get".into());
    }
    Ok(())
}

/// Renames what a claim moves from the standby's directory into the clone's, durably; what
/// moved already (a claim settled again) is left where it is. Never replaces anything.
async fn move_files(from: PathBuf, to: PathBuf) -> Result<()> {
    store::blocking(move || {
        let entries = match std::fs::read_dir(&from) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(store::io("listing the standby's files", &from)(e)),
        };
        for e in entries {
            let e = e.map_err(store::io("listing the standby's files", &from))?;
            let name = e.file_name();
            let keep = name
                .to_str()
                .map_or(true, |n| STAYS.contains(&n) || n.starts_with('.'));
            if keep {
                continue;
            }
            let b = to.join(&name);
            if store::exists(&b)? {
                return Err(Error::TargetExists { path: b });
            }
            std::fs::rename(e.path(), &b).map_err(store::io("moving the standby's files", &b))?;
        }
        store::sync_dir(&to)?;
        store::sync_dir(&from)
    })
    .await
}

/// Settles an interrupted claim of standby `vm` as `new` (its lock held): finished when
/// `new`'s record names the standby, else undone (the files back, the standby one again).
pub(in crate::vm) async fn settle_claim(vm: &Vm, new: &VmName) -> Result<String> {
    // `new`'s lock: another clone of that name may be under way (the name was free).
    let _new_lock = vm.store().lock(new, "settle a claim").await?;
    finish_or_undo(vm, new).await
}

/// [`settle_claim`] with `new`'s lock held by the caller.
async fn finish_or_undo(vm: &Vm, new: &VmName) -> Result<String> {
    let store = vm.store();
    let claimed = match store.record(new).await {
        Ok(r) => r
            .clone_of
            .as_ref()
            .and_then(|o| o.standby.as_deref())
            .is_some_and(|s| s == vm.name().as_str()),
        Err(Error::UnknownVm { .. }) => false,
        Err(e) => return Err(e),
    };
    if claimed {
        store.release_standby(vm.name()).await?;
        return Ok(format!(
            "finished: {new} is a clone made from standby {} (paused if qsnap died before resuming it: `qsnap resume {new}`)",
            vm.name()
        ));
    }
    // Undone: whatever moved goes back; nothing else of `new`'s exists (no record).
    move_files(store.vm_dir(new), store.vm_dir(vm.name())).await?;
    let _ = store.remove_vm_dir(new, false).await;
    Ok(format!(
        "undone: {} is a standby again, {new} was never made",
        vm.name()
    ))
}
