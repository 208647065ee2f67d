//! Settling an interrupted create from its journal: rolled back from what QEMU says now
//! before the point of no return, finished from the journal after it (see the table in
//! `mod.rs`).

use super::{done, needs_decision, reachable, Settled};
use crate::error::{Error, Result};
use crate::snapshot::rollback;
use crate::store::CreateIntent;
use crate::vm::Vm;
use qsnap_qmp::{types, Qmp};
use std::time::Duration;
use tracing::warn;

pub(super) async fn settle(vm: &Vm, c: CreateIntent) -> Result<Settled> {
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
        crate::vm::create::apply(&mut record, manifest, None).await;
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
            // A live create's overlay may hold the guest's last writes; an offline one's was
            // never opened by a QEMU, and a half-written one must not become the disk.
            rollback::undo_overlays_offline(&c.overlays, &created, !c.offline, &mut out).await;
            crate::vm::state::record_qemu(&mut record, None).await;
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
    crate::vm::create::follow_kept(&mut record, &kept);
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
