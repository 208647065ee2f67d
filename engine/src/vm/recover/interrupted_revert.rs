//! Settling an interrupted revert from its journal: which QEMU runs (the revert's, by pid and
//! start time or by its chains, or the old one) and whether the new overlays hold data decide
//! between finishing it and rolling it back (see the table in `mod.rs`).

use super::{needs_decision, reachable, with_problems, Settled};
use crate::error::{Error, Result};
use crate::launch::stop_qemu;
use crate::store::{RevertIntent, RevertPhase, VmRecord};
use crate::vm::state::VmState;
use crate::vm::{refs, revert, Vm};
use std::time::Duration;

/// Settles an interrupted revert. The journal says `running` *before* the reverted guest is
/// resumed, so in `preparing` and `relaunching` the new overlays never held a running
/// guest — but "never" is checked, not assumed: a new overlay holding data of its own (an
/// older qsnap, an embedder that resumed first, someone's `cont`) is the reverted guest's
/// writes, and the revert goes forward rather than delete them.
pub(super) async fn settle(vm: &Vm, r: RevertIntent) -> Result<Settled> {
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
                    crate::vm::state::record_qemu(&mut record, None).await;
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
