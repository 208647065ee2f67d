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
//!
//! What only a person can decide (QEMU alive but not answering) ends in
//! [`Error::NeedsDecision`] with the command to run.

use super::delete::remove_snapshots;
use super::merge;
use super::refs;
use super::revert;
use super::state::VmState;
use super::Vm;
use crate::error::{Error, Result};
use crate::launch::stop_qemu;
use crate::snapshot::rollback;
use crate::store::{
    CreateIntent, DeleteIntent, DeletePhase, Intent, RevertIntent, RevertPhase, VmRecord,
};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
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
    /// What could not be undone or finished (empty: it was settled completely). `check`
    /// reports a recovery with problems as not repaired.
    pub problems: Vec<String>,
}

/// What settling one journal came to.
struct Settled {
    outcome: String,
    problems: Vec<String>,
    /// A finished revert left a layer to merge: merged once its journal is cleared (the
    /// merge journals itself).
    merge_after: bool,
}

fn done(outcome: impl Into<String>) -> Settled {
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
        Intent::Create(c) => create(vm, c).await?,
        Intent::Revert(r) => revert_(vm, r).await?,
        Intent::Delete(d) => delete(vm, d).await?,
        Intent::Start(_) | Intent::Stop(_) => lifecycle(vm).await?,
        Intent::Thaw(t) => thaw(vm, t).await?,
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

async fn create(vm: &Vm, c: CreateIntent) -> Result<Settled> {
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
        return Ok(done(format!(
            "finished: snapshot {} is recorded",
            c.snapshot
        )));
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
                // Not knowing whether the guest runs is as bad as failing to resume it: the
                // report must not say "rolled back" over a guest that may be left paused.
                let status = match crate::failpoint::hit("recover.status-sent", c.qemu_pid).await {
                    Ok(()) => qmp
                        .execute(types::query_status {})
                        .await
                        .map_err(Error::qmp("reading the run state")),
                    Err(e) => Err(e),
                };
                match status {
                    Ok(st) if st.running => {}
                    Ok(_) => {
                        if let Err(e) = qmp.execute(types::cont {}).await {
                            out.problems.push(format!(
                                "could not resume the guest ({e}); it is left paused: `qsnap qmp {} cont` resumes it",
                                record.qmp
                            ));
                        }
                    }
                    Err(e) => out.problems.push(format!(
                        "could not ask QEMU whether the guest runs ({e}); it may be left paused: `qsnap status {}` tells, `qsnap qmp {} cont` resumes it",
                        vm.name(),
                        record.qmp
                    )),
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
        // The journal's memory file is the store's own for that snapshot (checked when it was
        // read); a snapshot of that name that exists owns it, and it stays.
        let snap = crate::SnapshotName::new(&c.snapshot)?;
        if vm.store().has_snapshot(vm.name(), &snap).await? {
            out.problems.push(format!(
                "kept {}: snapshot {} exists and names it",
                mem.display(),
                c.snapshot
            ));
        } else if let Err(e) = crate::unlink::made_by_this_operation(
            mem,
            crate::unlink::Kind::Memory,
            crate::unlink::Data::MustBeEmpty,
        )
        .await
        {
            out.problems.push(e.to_string());
        }
    }
    let (kept, problems) = (out.kept, out.problems);
    super::create::follow_kept(&mut record, &kept);
    vm.store().write_record(&record).await?;
    let mut outcome = format!("rolled back: no snapshot {} was made", c.snapshot);
    if !kept.is_empty() {
        outcome.push_str(&format!(
            "; the disks stay on their new overlays, which hold the guest's writes: {}",
            crate::error::overlay_list(&kept)
        ));
    }
    Ok(Settled {
        outcome,
        problems,
        merge_after: false,
    })
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
                .any(|fd| fd.opaque.as_deref() == Some(crate::snapshot::memfile::FD_NAME))
        }) {
            let _ = qmp.remove_fd(set.fdset_id, None).await;
        }
    }
    let _ = qmp.closefd(crate::snapshot::memfile::FD_NAME).await;
}

// ---- revert -------------------------------------------------------------------------------

/// Settles an interrupted revert. The journal says `running` *before* the reverted guest is
/// resumed, so in `preparing` and `relaunching` the new overlays never held a running
/// guest — but "never" is checked, not assumed: a new overlay holding data of its own (an
/// older qsnap, an embedder that resumed first, someone's `cont`) is the reverted guest's
/// writes, and the revert goes forward rather than delete them.
async fn revert_(vm: &Vm, r: RevertIntent) -> Result<Settled> {
    let op = format!("revert {}", r.snapshot);
    let mut record = vm.store().record(vm.name()).await?;
    let state = VmState::observe(vm, &record).await;
    if let VmState::Unreachable { .. } = state {
        reachable(vm, &record, &op).await?;
    }
    let running = match &state {
        VmState::Running { runstate, .. } => Some(runstate.clone()),
        _ => None,
    };
    let new_qemu = match running {
        Some(_) => is_new_qemu(vm, &record, &r).await,
        None => None,
    };
    let forward = |pid: Option<u32>, how: String, record: VmRecord| {
        let r = &r;
        async move {
            let mut record = record;
            let f = revert::finish(vm, &mut record, r, pid).await?;
            Ok::<_, Error>(Settled {
                outcome: how,
                problems: Vec::new(),
                merge_after: f.mergeable,
            })
        }
    };
    let runs = format!("finished: the VM runs snapshot {}", r.snapshot);
    match (r.phase, running.as_deref(), new_qemu) {
        (RevertPhase::Preparing, ..) => {
            let problems = drop_new_overlays(vm, &record, &r).await?;
            Ok(with_problems(
                "rolled back: the VM was not touched".into(),
                &problems,
            ))
        }
        // The revert's QEMU runs, the snapshot loaded (QEMU's own word is the proof): forward,
        // resumed as the revert would have (qsnap died between the journal and `cont`).
        (RevertPhase::Running | RevertPhase::Relaunching, Some(rs @ ("running" | "paused")), Some(pid)) => {
            if r.resume && rs == "paused" {
                resume(vm, &record).await?;
            }
            forward(pid, runs, record).await
        }
        (RevertPhase::Running, Some(_), None) => Err(needs_decision(
            vm,
            &op,
            "a QEMU runs the VM that is not the one the revert started; qsnap changes nothing: stop it (`qsnap stop`), then run `qsnap check --repair`".into(),
        )),
        (RevertPhase::Relaunching, Some(_), None) => {
            // The old QEMU never went: nothing changed.
            let problems = drop_new_overlays(vm, &record, &r).await?;
            Ok(with_problems(
                "rolled back: the VM was not touched".into(),
                &problems,
            ))
        }
        (phase, running, new) => {
            if let (Some(_), Some(pid)) = (running, new) {
                // The revert's QEMU, started but not loaded: it goes.
                stop_qemu(&record.qmp, pid, Duration::from_secs(5)).await?;
            }
            // No QEMU runs the snapshot. Going forward needs new overlays that are what the
            // revert made: qcow2 images over the snapshot's frozen images. Past `running`
            // the guest may have run on them; before it, data of their own is what a guest
            // resumed early wrote.
            let unsound = overlays_unsound(vm, &r).await;
            let written = match phase {
                RevertPhase::Running => None,
                _ => new_overlays_written(vm, &r).await?,
            };
            match (phase, &unsound, written) {
                (RevertPhase::Running, None, _) => {
                    forward(
                        None,
                        format!(
                            "finished: the VM is at snapshot {0} (stopped: its QEMU went); `qsnap start {1}` starts it",
                            r.snapshot,
                            vm.name()
                        ),
                        record,
                    )
                    .await
                }
                (_, None, Some(written)) => {
                    forward(
                        None,
                        format!(
                            "finished: the reverted guest had written to its new disks ({}) before its QEMU went; the VM is stopped on them at snapshot {}; `qsnap start {}` starts it",
                            written.join(", "),
                            r.snapshot,
                            vm.name()
                        ),
                        record,
                    )
                    .await
                }
                (_, Some(why), Some(written)) => Err(needs_decision(
                    vm,
                    &op,
                    format!(
                        "{} hold data of their own but are not what the revert made ({why}); qsnap changes nothing: check them by hand",
                        written.join(", ")
                    ),
                )),
                (_, _, None) => {
                    let problems = drop_new_overlays(vm, &record, &r).await?;
                    super::state::record_qemu(&mut record, None).await;
                    vm.store().write_record(&record).await?;
                    let why = unsound.map(|w| format!(" ({w})")).unwrap_or_default();
                    Ok(with_problems(
                        format!(
                            "rolled back{why}: the VM is stopped on its previous disks; `qsnap start {0}` starts it on them, `qsnap revert {0} {1}` tries the revert again",
                            vm.name(),
                            r.snapshot
                        ),
                        &problems,
                    ))
                }
            }
        }
    }
}

async fn resume(vm: &Vm, record: &VmRecord) -> Result<()> {
    let qmp = vm.connect_quick(record).await?;
    crate::snapshot::revert::resume(&qmp).await
}

/// Whether the QEMU answering the monitor is the one the revert started (`Some`, with its pid
/// when known): told by the pid and start time the journal recorded right after the launch
/// (compared with the monitor's peer, never the record's old pid), else by what QEMU itself
/// says it runs (a disk on one of the new overlays). Never by matching paths in
/// `/proc/PID/cmdline`, where QEMU's `,`-doubling hides them.
async fn is_new_qemu(vm: &Vm, record: &VmRecord, r: &RevertIntent) -> Option<Option<u32>> {
    let qmp = vm.connect_quick(record).await.ok()?;
    let peer = qmp.peer_pid();
    if let (Some(now), Some(new)) = (peer, r.new_pid) {
        if now == new {
            return crate::proc::is_recorded_qemu(new, r.new_pid_start)
                .await
                .then_some(peer);
        }
        if r.new_pid_start.is_some() {
            return None;
        }
    }
    let disks = crate::blocks::read(&qmp).await.ok()?;
    disks
        .iter()
        .filter_map(|d| d.top())
        .any(|top| r.new_overlays.iter().any(|o| o == top))
        .then_some(peer)
}

/// Why the new overlays are not what the revert made (`None`: they are): each must exist and
/// be a qcow2 image whose backing file is the frozen image of its disk in the snapshot.
async fn overlays_unsound(vm: &Vm, r: &RevertIntent) -> Option<String> {
    let snap = match crate::SnapshotName::new(&r.snapshot) {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    let manifest = match vm.store().manifest(vm.name(), &snap).await {
        Ok(m) => m,
        Err(e) => return Some(format!("the snapshot cannot be read: {e}")),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    for o in &r.new_overlays {
        let Some(disk) = r.new_disks.iter().find(|d| &d.image == o) else {
            return Some(format!("{} is none of the new disks", o.display()));
        };
        let Some(frozen) = manifest
            .snapshot
            .disks
            .iter()
            .find(|d| d.device == disk.device)
        else {
            return Some(format!("the snapshot has no disk {}", disk.device));
        };
        match crate::image::info(o, &cancel).await {
            Ok(i)
                if i.format == "qcow2"
                    && i.full_backing_filename.as_ref() == Some(&frozen.image) => {}
            Ok(_) => {
                return Some(format!(
                    "{} is not a qcow2 overlay over {}",
                    o.display(),
                    frozen.image.display()
                ))
            }
            Err(e) => return Some(format!("{} cannot be read: {e}", o.display())),
        }
    }
    None
}

/// The new overlays that hold data of their own (`None`: none does). "Cannot tell" is an
/// error: either way would risk someone's writes.
async fn new_overlays_written(vm: &Vm, r: &RevertIntent) -> Result<Option<Vec<String>>> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut written = Vec::new();
    for o in &r.new_overlays {
        if tokio::fs::symlink_metadata(o).await.is_err() {
            continue;
        }
        match crate::image::has_own_data(o, &cancel).await {
            Ok(true) => written.push(o.display().to_string()),
            Ok(false) => {}
            Err(e) => {
                return Err(needs_decision(
                    vm,
                    &format!("revert {}", r.snapshot),
                    format!(
                        "qsnap cannot tell whether the reverted guest wrote to {} ({e}); nothing was changed: check the file, then run `qsnap check {} --repair` again",
                        o.display(),
                        vm.name()
                    ),
                ))
            }
        }
    }
    Ok((!written.is_empty()).then_some(written))
}

/// Removes the new overlays of a revert that did not happen, through the door for files an
/// operation made: only those nothing names, that hold no data of their own.
async fn drop_new_overlays(vm: &Vm, record: &VmRecord, r: &RevertIntent) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut present = Vec::new();
    for o in &r.new_overlays {
        if tokio::fs::symlink_metadata(o).await.is_ok() {
            present.push(o.clone());
        }
    }
    if present.is_empty() {
        return Ok(problems);
    }
    // What names the files is all that matters here: a chain elsewhere that cannot be read
    // keeps them (reported), it does not stop the recovery.
    let manifests = vm.store().manifests(vm.name()).await?;
    let live = match vm.connect_quick(record).await {
        Ok(qmp) => refs::Live::read(&qmp).await.ok(),
        Err(_) => None,
    };
    let graph = match refs::Graph::gather(
        vm.store(),
        vm.name(),
        record,
        &manifests,
        live.as_ref(),
        vm.cancel(),
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            for o in &present {
                problems.push(format!("kept {}: {e}", o.display()));
            }
            return Ok(problems);
        }
    };
    for o in &present {
        if let Err(e) = refs::unlink_made(o, &graph, live.as_ref()).await {
            problems.push(e.to_string());
        }
    }
    Ok(problems)
}

fn with_problems(outcome: String, problems: &[String]) -> Settled {
    Settled {
        outcome,
        problems: problems.to_vec(),
        merge_after: false,
    }
}

fn with_problems_text(outcome: String, problems: &[String]) -> String {
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
    let merges = merge::run(vm, &mut record, &mut d, None).await?;
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
