//! Settling an interrupted operation: a journal left in the VM's directory means the qsnap
//! that wrote it died (SIGKILL, a host crash) or QEMU did, part-way. The next operation on
//! the VM (or `qsnap check --repair`) runs this first, under the VM's lock:
//!
//! | operation | got to | what happens |
//! | --- | --- | --- |
//! | create | before its point of no return | rolled back from what QEMU says now: a running save cancelled, switched disks merged back (kept, and recorded, if that fails), nodes and settings undone, the guest resumed, files removed; QEMU gone → an overlay the guest wrote to is kept and recorded |
//! | create | committed | finished: record and manifest written from the journal |
//! | revert | preparing | rolled back: new overlays removed (only while they hold no data), the VM was never touched |
//! | revert | relaunching | the revert's QEMU (by pid and start time, or by its chains) holds the snapshot → finished, resumed; the old one runs → rolled back; neither: new overlays with data of their own that are what the revert made → finished (the VM stopped on them), else the VM is left stopped on its previous disks and the message says `qsnap start` or `qsnap revert` |
//! | revert | running | finished: record, abandoned overlays (the guest resumed if qsnap died before `cont`); with no QEMU, only onto new overlays that are what the revert made, else rolled back |
//! | delete | any | finished: snapshots removed, the round in progress redone, merging goes on |
//! | start, stop | any | the record follows what runs |
//! | thaw | — | the guest's filesystems thawed (nothing to do once it is gone, or thawed already) |
//! | claim (of a standby) | before the clone's record | undone: the moved files back, the standby one again |
//! | claim | after | finished: the standby's record goes, the clone stays (paused if qsnap died before `cont`) |
//!
//! What only a person can decide (QEMU alive but not answering) ends in
//! [`Error::NeedsDecision`] with the command to run.

mod interrupted_create;
mod interrupted_revert;

use super::delete::{remove_memory, remove_snapshots};
use super::merge;
use super::state::VmState;
use super::Vm;
use crate::error::{Error, Result};
use crate::store::{DeleteIntent, DeletePhase, Intent, VmRecord};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::time::Duration;
use tracing::info;

/// An interrupted operation that was settled.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Recovery {
    /// What it was (`create s1`, `delete s2`, …).
    pub operation: String,
    /// The qsnap process that started it.
    pub qsnap_pid: u32,
    /// When it started.
    pub started_at: String,
    /// What was done about it.
    pub outcome: String,
    /// What could not be undone or finished (empty: it was settled completely). `check`
    /// reports a recovery with problems as not repaired.
    pub problems: Vec<String>,
}

/// What settling one journal came to.
pub(super) struct Settled {
    pub(super) outcome: String,
    pub(super) problems: Vec<String>,
    /// A finished revert left a layer to merge: merged once its journal is cleared (the
    /// merge journals itself).
    pub(super) merge_after: bool,
}

pub(super) fn done(outcome: impl Into<String>) -> Settled {
    Settled {
        outcome: outcome.into(),
        problems: Vec::new(),
        merge_after: false,
    }
}

/// Settles the VM's journal, if there is one. Hold the VM's lock.
pub(crate) async fn settle(vm: &Vm) -> Result<Option<Recovery>> {
    let Some(journal) = vm.store().journal(vm.name()).await? else {
        return Ok(None);
    };
    let operation = journal.intent.describe();
    info!(vm = %vm.name(), %operation, pid = journal.pid, "settling an interrupted operation");
    let Settled {
        mut outcome,
        mut problems,
        merge_after,
    } = match journal.intent {
        Intent::Create(c) => interrupted_create::settle(vm, c).await?,
        Intent::Revert(r) => interrupted_revert::settle(vm, r).await?,
        Intent::Delete(d) => delete(vm, d).await?,
        Intent::Start(_) | Intent::Stop(_) => lifecycle(vm).await?,
        Intent::Thaw(t) => thaw(vm, t).await?,
        Intent::Claim(c) => done(super::pool::claim::settle_claim(vm, &c).await?),
    };
    vm.store().clear_journal(vm.name()).await?;
    if merge_after {
        let mut record = vm.store().record(vm.name()).await?;
        match merge::merge_leftovers(vm, &mut record, None).await {
            Ok(m) if !m.is_empty() => {
                outcome.push_str(&format!("; {} layer(s) it left unneeded merged", m.len()));
            }
            Ok(_) => {}
            Err(e) => problems.push(format!(
                "merging the layers it left unneeded did not finish ({e}); `qsnap check {} --repair` finishes it",
                vm.name()
            )),
        }
    }
    Ok(Some(Recovery {
        operation,
        qsnap_pid: journal.pid,
        started_at: journal.started_at,
        outcome: with_problems_text(outcome, &problems),
        problems,
    }))
}

pub(super) fn needs_decision(vm: &Vm, operation: &str, what: String) -> Error {
    Error::NeedsDecision {
        vm: vm.name().to_string(),
        operation: operation.to_owned(),
        what,
    }
}

pub(super) async fn reachable(vm: &Vm, record: &VmRecord, operation: &str) -> Result<Option<Qmp>> {
    match VmState::observe(vm, record).await {
        VmState::Running { .. } => Ok(Some(vm.connect_quick(record).await?)),
        VmState::Stopped => Ok(None),
        VmState::Unreachable { pid, why } => Err(needs_decision(
            vm,
            operation,
            format!(
                "its QEMU{} is alive but does not answer ({why}); free its monitor, or stop it with `qsnap stop {}`, then run `qsnap check {} --repair`",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                vm.name(),
                vm.name()
            ),
        )),
    }
}

pub(super) fn with_problems(outcome: String, problems: &[String]) -> Settled {
    Settled {
        outcome,
        problems: problems.to_vec(),
        merge_after: false,
    }
}

pub(super) fn with_problems_text(outcome: String, problems: &[String]) -> String {
    if problems.is_empty() {
        outcome
    } else {
        format!("{outcome}; not undone: {}", problems.join("; "))
    }
}

// ---- delete -------------------------------------------------------------------------------

async fn delete(vm: &Vm, mut d: DeleteIntent) -> Result<Settled> {
    let op = format!("delete {}", d.snapshots.join(", "));
    let mut record = vm.store().record(vm.name()).await?;
    // Whether QEMU runs is asked once, of the monitor and the recorded process together: a
    // connection that fails for a moment must not pass for a stopped QEMU, or a merge meant
    // for the running QEMU would be redone offline on images it has open.
    let qemu = reachable(vm, &record, &op).await?;
    if d.phase == DeletePhase::Removing {
        remove_snapshots(vm, &mut record, &d.manifests).await?;
        d.phase = DeletePhase::Consolidating;
        vm.store()
            .write_journal(vm.name(), &Intent::Delete(d.clone()))
            .await?;
    } else {
        // The memory files go beside the merges: some may be left.
        remove_memory(vm.store().clone(), vm.name().clone(), d.manifests.clone()).await?;
    }
    match &qemu {
        Some(qmp) if d.guest_was_running == Some(true) => {
            // It may have been paused for a disk switch when qsnap died. The record follows
            // the images QEMU runs now before the guest may write again.
            let disks = crate::blocks::read(qmp).await?;
            if merge::follow_live(&mut record, &disks) {
                vm.store().write_record(&record).await?;
            }
            let st = qmp
                .execute(types::query_status {})
                .await
                .map_err(Error::qmp("asking whether the guest is paused"))?;
            if !st.running && st.status == types::RunState::paused {
                qmp.execute(types::cont {})
                    .await
                    .map_err(Error::qmp("resuming the guest"))?;
            }
        }
        Some(_) => {}
        None => {
            // A live merge round whose QEMU is gone is redone offline.
            for m in &mut d.merges {
                m.live = false;
            }
            if record.pid.is_some() {
                super::state::record_qemu(&mut record, None).await;
                vm.store().write_record(&record).await?;
            }
        }
    }
    d.guest_was_running = None;
    // QEMU serves one monitor client at a time; the merges connect on their own.
    drop(qemu);
    let merges = merge::run(vm, &mut record, &mut d, None, merge::Seen::default()).await?;
    let merged = format!("{} layer(s) merged or removed", merges.len());
    Ok(done(if d.snapshots.is_empty() {
        format!("finished: {merged}")
    } else if merges.is_empty() {
        format!("finished: {} deleted", d.snapshots.join(", "))
    } else {
        format!("finished: {} deleted, {merged}", d.snapshots.join(", "))
    }))
}

// ---- thaw -------------------------------------------------------------------------------

/// A `--quiesce` snapshot whose thaw failed: the guest's filesystems may still be frozen.
/// Thawed now, or nothing to do once the guest is gone; otherwise nothing else goes on until
/// someone decides (a guest writing to frozen filesystems hangs).
async fn thaw(vm: &Vm, t: crate::store::ThawIntent) -> Result<Settled> {
    let record = vm.store().record(vm.name()).await?;
    if let VmState::Stopped = VmState::observe(vm, &record).await {
        return Ok(done("the guest is gone; nothing is frozen"));
    }
    let thawed = match crate::failpoint::hit("recover.thaw", record.pid).await {
        Ok(()) => crate::snapshot::thaw_guest(&t.socket).await,
        Err(e) => Err(e),
    };
    let e = match thawed {
        Ok(n) => {
            return Ok(done(format!(
                "the guest's filesystems are thawed ({n} were frozen)"
            )))
        }
        Err(e) => e,
    };
    // Thawed by hand in the guest: the agent says so.
    let status = async {
        let mut agent =
            crate::guest_agent::GuestAgent::connect(&t.socket, Duration::from_secs(10)).await?;
        agent.status().await
    }
    .await;
    if status.is_ok_and(|s| s == "thawed") {
        return Ok(done("the guest's filesystems are thawed"));
    }
    Err(needs_decision(
        vm,
        &format!("thaw after create {}", t.snapshot),
        format!(
            "the guest's filesystems may still be frozen since snapshot {} and its agent at {} does not thaw them ({e}); \
             thaw them in the guest (`fsfreeze -u MOUNTPOINT`): once its agent says they are thawed, the next qsnap command goes on. \
             If the agent cannot answer, `qsnap stop {}` ends it (a stopped guest has nothing frozen), or, once you have \
             thawed them by hand, remove {}",
            t.snapshot,
            t.socket.display(),
            vm.name(),
            vm.store().vm_dir(vm.name()).join("journal.json").display()
        ),
    ))
}

// ---- start, stop --------------------------------------------------------------------------

async fn lifecycle(vm: &Vm) -> Result<Settled> {
    let mut record = vm.store().record(vm.name()).await?;
    match VmState::observe(vm, &record).await {
        VmState::Running { pid, .. } => {
            if pid.is_some() && record.pid != pid {
                super::state::record_qemu(&mut record, pid).await;
                vm.store().write_record(&record).await?;
            }
            Ok(done("the VM runs; its record says so"))
        }
        VmState::Stopped => {
            if record.pid.is_some() {
                super::state::record_qemu(&mut record, None).await;
                vm.store().write_record(&record).await?;
            }
            Ok(done("the VM is stopped; its record says so"))
        }
        VmState::Unreachable { pid, .. } => {
            if pid.is_some() && record.pid != pid {
                record.pid = pid;
                vm.store().write_record(&record).await?;
            }
            Ok(done(
                "the VM's QEMU is alive but does not answer; its record keeps its pid",
            ))
        }
    }
}
