//! Settling an interrupted operation: a journal left in the VM's directory means the qsnap
//! that wrote it died (SIGKILL, a host crash) or QEMU did, part-way. The next operation on
//! the VM (or `qsnap check --repair`) runs this first, under the VM's lock:
//!
//! | operation | got to | what happens |
//! | --- | --- | --- |
//! | create | before its point of no return | rolled back from what QEMU says now: a running save cancelled, switched disks merged back (kept, and recorded, if that fails), nodes and settings undone, the guest resumed, files removed; QEMU gone → an overlay the guest wrote to is kept and recorded |
//! | create | committed | finished: record and manifest written from the journal |
//! | revert | preparing | rolled back: new overlays removed, the VM was never touched |
//! | revert | relaunching | the new QEMU runs the snapshot → finished; otherwise the VM is left stopped on its previous disks and the message says `qsnap start` or `qsnap revert` |
//! | revert | running | finished: record, abandoned overlays |
//! | delete | any | finished: snapshots removed, the round in progress redone, merging goes on |
//! | start, stop | any | the record follows what runs |
//!
//! What only a person can decide (QEMU alive but not answering) ends in
//! [`Error::NeedsDecision`] with the command to run.

use super::consolidate;
use super::delete::remove_snapshots;
use super::revert;
use super::state::VmState;
use super::Vm;
use crate::error::{Error, Result};
use crate::launch::stop_qemu;
use crate::snapshot::disks;
use crate::snapshot::rollback;
use crate::store::{
    CreateIntent, DeleteIntent, DeletePhase, Intent, RevertIntent, RevertPhase, VmRecord,
};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use tracing::{info, warn};

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
}

/// Settles the VM's journal, if there is one. Hold the VM's lock.
pub(crate) async fn settle(vm: &Vm) -> Result<Option<Recovery>> {
    let Some(journal) = vm.store().journal(vm.name()).await? else {
        return Ok(None);
    };
    let operation = journal.intent.describe();
    info!(vm = %vm.name(), %operation, pid = journal.pid, "settling an interrupted operation");
    let outcome = match journal.intent {
        Intent::Create(c) => create(vm, c).await?,
        Intent::Revert(r) => revert_(vm, r).await?,
        Intent::Delete(d) => delete(vm, d).await?,
        Intent::Start(_) | Intent::Stop(_) => lifecycle(vm).await?,
    };
    vm.store().clear_journal(vm.name()).await?;
    Ok(Some(Recovery {
        operation,
        qsnap_pid: journal.pid,
        started_at: journal.started_at,
        outcome,
    }))
}

fn needs_decision(vm: &Vm, operation: &str, what: String) -> Error {
    Error::NeedsDecision {
        vm: vm.name().to_string(),
        operation: operation.to_owned(),
        what,
    }
}

async fn reachable(vm: &Vm, record: &VmRecord, operation: &str) -> Result<Option<Qmp>> {
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

// ---- create -------------------------------------------------------------------------------

async fn create(vm: &Vm, c: CreateIntent) -> Result<String> {
    let op = format!("create {}", c.snapshot);
    let mut record = vm.store().record(vm.name()).await?;
    if let Some(socket) = &c.quiesce {
        // qsnap may have died with the guest's filesystems frozen: thaw them first.
        let thawed = async {
            let mut agent =
                crate::guest_agent::GuestAgent::connect(socket, Duration::from_secs(10)).await?;
            agent.thaw().await
        }
        .await;
        if let Err(e) = thawed {
            warn!(error = %e, "could not thaw the guest's filesystems");
        }
    }
    if let Some(manifest) = &c.committed {
        // QEMU's part was done: finish the bookkeeping.
        super::create::apply(&mut record, manifest, None).await;
        vm.store().write_record(&record).await?;
        let snap = crate::SnapshotName::new(&manifest.name)?;
        if !vm.store().has_snapshot(vm.name(), &snap).await? {
            vm.store().write_manifest(manifest).await?;
        }
        if let Some(qmp) = reachable(vm, &record, &op).await.ok().flatten() {
            tidy_qemu(&qmp, &c).await;
        }
        return Ok(format!("finished: snapshot {} is recorded", c.snapshot));
    }
    // Every overlay the journal planned was made by this create, if it exists: preflight
    // refused any file already there.
    let created: Vec<std::path::PathBuf> = c.overlays.iter().map(|o| o.overlay.clone()).collect();
    let mut out = rollback::Outcome::default();
    let qemu = reachable(vm, &record, &op).await?;
    if let (Some(qmp), Some(then)) = (&qemu, c.qemu_pid) {
        if let Some(now) = qmp.peer_pid().filter(|&now| now != then) {
            // Someone restarted QEMU (on the old images) after the create began: the new
            // overlays may hold guest writes the new QEMU does not see. Two timelines; qsnap
            // picks neither.
            let files: Vec<String> = c
                .overlays
                .iter()
                .filter(|o| o.overlay.exists())
                .map(|o| o.overlay.display().to_string())
                .collect();
            return Err(needs_decision(
                vm,
                &op,
                format!(
                    "the create talked to QEMU pid {then}, but pid {now} runs the VM now (restarted \
                     outside qsnap); the overlays it made ({}) may hold guest writes from before the \
                     restart that the running QEMU does not see. qsnap changes nothing: keep or \
                     remove them by hand, then remove {}",
                    if files.is_empty() { "none left".into() } else { files.join(", ") },
                    vm.store().vm_dir(vm.name()).join("journal.json").display()
                ),
            ));
        }
    }
    match qemu {
        Some(qmp) => {
            if let Err(e) = rollback::cancel_migration(&qmp).await {
                out.problems.push(e);
            }
            if let Err(e) =
                rollback::undo_overlays(&qmp, &c.overlays, &created, true, &mut out).await
            {
                out.problems.push(e);
            }
            if c.was_running {
                if let Ok(st) = qmp.execute(types::query_status {}).await {
                    if !st.running {
                        if let Err(e) = qmp.execute(types::cont {}).await {
                            out.problems
                                .push(format!("could not resume the guest: {e}"));
                        }
                    }
                }
            }
            tidy_qemu(&qmp, &c).await;
        }
        None => {
            // QEMU is gone: an overlay it wrote to holds the guest's last writes.
            rollback::undo_overlays_offline(&c.overlays, &created, true, &mut out).await;
            super::state::record_qemu(&mut record, None).await;
        }
    }
    if let Some(mem) = &c.memory_file {
        remove_file(mem, &mut out.problems).await;
    }
    let (kept, problems) = (out.kept, out.problems);
    super::create::follow_kept(&mut record, &kept);
    vm.store().write_record(&record).await?;
    let mut outcome = format!("rolled back: no snapshot {} was made", c.snapshot);
    if !kept.is_empty() {
        outcome.push_str(&format!(
            "; the disks stay on their new overlays, which hold the guest's writes: {}",
            disks::overlay_list(&kept)
        ));
    }
    if !problems.is_empty() {
        outcome.push_str(&format!("; not undone: {}", problems.join("; ")));
    }
    Ok(outcome)
}

/// Settings back, the memory fdset and pipe released (best effort: each may already be so).
async fn tidy_qemu(qmp: &Qmp, c: &CreateIntent) {
    if let Some(saved) = &c.settings {
        if let Err(e) = rollback::restore_settings(qmp, saved).await {
            warn!(error = %e, "could not restore the migration settings");
        }
    }
    if let Ok(sets) = qmp.execute(crate::qemu::QueryFdsets {}).await {
        for set in sets.iter().filter(|f| {
            f.fds
                .iter()
                .any(|fd| fd.opaque.as_deref() == Some(crate::snapshot::transport::FD_NAME))
        }) {
            let _ = qmp.remove_fd(set.fdset_id, None).await;
        }
    }
    let _ = qmp.closefd(crate::snapshot::transport::FD_NAME).await;
}

async fn remove_file(p: &Path, problems: &mut Vec<String>) {
    match tokio::fs::remove_file(p).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => problems.push(format!("could not remove {}: {e}", p.display())),
    }
}

// ---- revert -------------------------------------------------------------------------------

async fn revert_(vm: &Vm, r: RevertIntent) -> Result<String> {
    let op = format!("revert {}", r.snapshot);
    let mut record = vm.store().record(vm.name()).await?;
    let drop_new = |problems: &mut Vec<String>| {
        let files = r.new_overlays.clone();
        let mut problems = std::mem::take(problems);
        async move {
            for f in &files {
                remove_file(f, &mut problems).await;
            }
            problems
        }
    };
    match r.phase {
        RevertPhase::Preparing => {
            let problems = drop_new(&mut Vec::new()).await;
            Ok(with_problems(
                "rolled back: the VM was not touched".into(),
                &problems,
            ))
        }
        RevertPhase::Running => {
            let pid = VmState::observe(vm, &record).await.pid();
            revert::finish(vm, &mut record, &r, pid).await?;
            Ok(format!("finished: the VM runs snapshot {}", r.snapshot))
        }
        RevertPhase::Relaunching => {
            let state = VmState::observe(vm, &record).await;
            if let VmState::Unreachable { .. } = state {
                reachable(vm, &record, &op).await?;
            }
            if let VmState::Running { pid, runstate } = &state {
                let is_new = match pid {
                    Some(p) => runs_new_overlays(*p, &r).await,
                    None => false,
                };
                if !is_new {
                    // The old QEMU never went: nothing changed.
                    let problems = drop_new(&mut Vec::new()).await;
                    return Ok(with_problems(
                        "rolled back: the VM was not touched".into(),
                        &problems,
                    ));
                }
                if runstate == "running" || runstate == "paused" {
                    // The new QEMU has loaded the snapshot: go forward.
                    if r.resume && runstate == "paused" {
                        if let Ok(qmp) = vm.connect_quick(&record).await {
                            let _ = qmp.execute(types::cont {}).await;
                        }
                    }
                    revert::finish(vm, &mut record, &r, *pid).await?;
                    return Ok(format!("finished: the VM runs snapshot {}", r.snapshot));
                }
                // Started but not loaded: it goes.
                stop_qemu(&record.qmp, *pid, Duration::from_secs(5)).await?;
            }
            let problems = drop_new(&mut Vec::new()).await;
            super::state::record_qemu(&mut record, None).await;
            vm.store().write_record(&record).await?;
            Ok(with_problems(
                format!(
                    "rolled back: the VM is stopped on its previous disks; `qsnap start {0}` starts it on them, `qsnap revert {0} {1}` tries the revert again",
                    vm.name(),
                    r.snapshot
                ),
                &problems,
            ))
        }
    }
}

/// Whether QEMU `pid` opens any of the revert's new overlays (it is the new QEMU).
async fn runs_new_overlays(pid: u32, r: &RevertIntent) -> bool {
    let Ok(raw) = tokio::fs::read(format!("/proc/{pid}/cmdline")).await else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    r.new_overlays
        .iter()
        .any(|o| text.contains(&o.display().to_string()))
}

fn with_problems(outcome: String, problems: &[String]) -> String {
    if problems.is_empty() {
        outcome
    } else {
        format!("{outcome}; not undone: {}", problems.join("; "))
    }
}

// ---- delete -------------------------------------------------------------------------------

async fn delete(vm: &Vm, mut d: DeleteIntent) -> Result<String> {
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
    }
    match &qemu {
        Some(qmp) if d.guest_was_running == Some(true) => {
            // It may have been paused for a disk switch when qsnap died. The record follows
            // the images QEMU runs now before the guest may write again.
            let disks = crate::blocks::read(qmp).await?;
            if consolidate::follow_live(&mut record, &disks) {
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
    let merges = consolidate::run(vm, &mut record, &mut d, None).await?;
    Ok(format!(
        "finished: {} deleted{}",
        d.snapshots.join(", "),
        if merges.is_empty() {
            String::new()
        } else {
            format!(", {} layer(s) merged or removed", merges.len())
        }
    ))
}

// ---- start, stop --------------------------------------------------------------------------

async fn lifecycle(vm: &Vm) -> Result<String> {
    let mut record = vm.store().record(vm.name()).await?;
    match VmState::observe(vm, &record).await {
        VmState::Running { pid, .. } => {
            if pid.is_some() && record.pid != pid {
                super::state::record_qemu(&mut record, pid).await;
                vm.store().write_record(&record).await?;
            }
            Ok("the VM runs; its record says so".into())
        }
        VmState::Stopped => {
            if record.pid.is_some() {
                super::state::record_qemu(&mut record, None).await;
                vm.store().write_record(&record).await?;
            }
            Ok("the VM is stopped; its record says so".into())
        }
        VmState::Unreachable { pid, .. } => {
            if pid.is_some() && record.pid != pid {
                record.pid = pid;
                vm.store().write_record(&record).await?;
            }
            Ok("the VM's QEMU is alive but does not answer; its record keeps its pid".into())
        }
    }
}
