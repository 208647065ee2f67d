//! The undo log of a create: each step that may change something pushes how to take it back
//! *before* it runs, and every undo first asks QEMU what actually happened — a command that
//! timed out may still have run (a late `transaction` leaves the guest writing to the new
//! overlay, a late `stop` leaves it paused).
//!
//! On failure the log runs newest first, except that a running save is always cancelled
//! before anything else (its fdset and file cannot go while QEMU writes to them). One failed
//! undo does not stop the others; what could not be undone is returned so the error can say
//! it, and so are the overlays the VM stays on (they hold its writes). If QEMU is gone, only
//! local files are tidied: an overlay QEMU may have written to is kept when it holds data.

use crate::error::Result;
use crate::image;
use crate::qemu::{Capability, MigrateSetCapabilities, QueryFdsets, QueryMigrate, SetMaxBandwidth};
use crate::snapshot::disks::{self, Position};
use crate::snapshot::memfile::FD_NAME;
use crate::store::{PlannedOverlay, SavedSettings};
use crate::unlink::{Data, Kind};
use qsnap_qmp::{types, Qmp};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How to take one step back.
#[derive(Debug)]
pub(crate) enum Undo {
    /// A file qsnap created (the memory file).
    RemoveFile(PathBuf),
    /// The fdset holding the memory file (found by its opaque name).
    RemoveFdset,
    /// A named fd given with `getfd` that no migration has taken yet.
    CloseFd(String),
    /// The overlays: files made so far, nodes added, and — once the switch was sent — disks
    /// that may be on them (merged back if they are).
    Overlays {
        /// Every planned overlay.
        disks: Vec<PlannedOverlay>,
        /// The overlay files this create made (only those may be removed).
        created: Vec<PathBuf>,
        /// The switch was sent (it may have happened even if it reported an error).
        switch_sent: bool,
    },
    /// Migration capabilities and `max-bandwidth` as they were.
    RestoreSettings(SavedSettings),
    /// A save that may be running.
    CancelMigration,
    /// The guest ran and qsnap (or QEMU, for precopy) may have paused it.
    Resume,
}

impl Undo {
    /// Kept after success: settings go back and the fdset is released either way.
    fn restores_settings(&self) -> bool {
        matches!(self, Undo::RemoveFdset | Undo::RestoreSettings(_))
    }
}

/// What a rollback could not do, and where the disks stay.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// What could not be undone.
    pub problems: Vec<String>,
    /// Disks that stay on their new overlay: `(device, overlay)`.
    pub kept: Vec<(String, PathBuf)>,
}

pub(crate) struct Rollback<'a> {
    qmp: &'a Qmp,
    undo: Vec<Undo>,
}

impl<'a> Rollback<'a> {
    pub(crate) fn new(qmp: &'a Qmp) -> Self {
        Rollback {
            qmp,
            undo: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, u: Undo) {
        self.undo.push(u);
    }

    /// Forgets undos that no longer apply (e.g. `Resume` once the guest was resumed).
    pub(crate) fn forget(&mut self, f: impl Fn(&Undo) -> bool) {
        self.undo.retain(|u| !f(u));
    }

    fn overlays(&mut self) -> Option<(&mut Vec<PathBuf>, &mut bool)> {
        self.undo.iter_mut().find_map(|u| match u {
            Undo::Overlays {
                created,
                switch_sent,
                ..
            } => Some((created, switch_sent)),
            _ => None,
        })
    }

    /// An overlay file was made (by this create: only such files may be removed).
    pub(crate) fn overlay_created(&mut self, path: PathBuf) {
        if let Some((created, _)) = self.overlays() {
            created.push(path);
        }
    }

    /// The switch is about to be sent: from now on the disks may be on their overlays.
    pub(crate) fn switch_sent(&mut self) {
        if let Some((_, sent)) = self.overlays() {
            *sent = true;
        }
    }

    /// Success: restores settings, keeps everything made.
    pub(crate) async fn finish(mut self) -> Vec<String> {
        self.undo.retain(Undo::restores_settings);
        self.run().await.problems
    }

    /// Failure: undoes everything that happened.
    pub(crate) async fn run(mut self) -> Outcome {
        let mut out = Outcome::default();
        if let Some(i) = self
            .undo
            .iter()
            .position(|u| matches!(u, Undo::CancelMigration))
        {
            let u = self.undo.remove(i);
            self.undo.push(u);
        }
        while let Some(u) = self.undo.pop() {
            if !self.qmp.is_connected() {
                undo_offline(u, &mut out).await;
                continue;
            }
            match self.undo_one(&u, &mut out).await {
                Ok(()) => info!(?u, "rolled back"),
                Err(e) => {
                    warn!(?u, error = %e, "rollback step failed");
                    out.problems.push(e);
                }
            }
        }
        out
    }

    async fn undo_one(&self, u: &Undo, out: &mut Outcome) -> Result<(), String> {
        let qmp = self.qmp;
        let s = |e: qsnap_qmp::Error| e.to_string();
        match u {
            Undo::RemoveFile(p) => remove(p, Kind::Memory, Data::MustBeEmpty).await,
            Undo::RemoveFdset => {
                let sets = qmp.execute(QueryFdsets {}).await.map_err(s)?;
                for set in sets
                    .iter()
                    .filter(|f| f.fds.iter().any(|fd| fd.opaque.as_deref() == Some(FD_NAME)))
                {
                    qmp.remove_fd(set.fdset_id, None).await.map_err(s)?;
                }
                Ok(())
            }
            Undo::CloseFd(name) => {
                // Fails harmlessly when a migration took it.
                let _ = qmp.closefd(name).await;
                Ok(())
            }
            Undo::RestoreSettings(saved) => restore_settings(qmp, saved).await,
            Undo::CancelMigration => cancel_migration(qmp).await,
            Undo::Resume => {
                // A save that just completed may still be finalizing; `cont` waits for it.
                let _ = crate::snapshot::save::wait_finalized(qmp).await;
                let st = qmp.execute(types::query_status {}).await.map_err(s)?;
                if st.running {
                    return Ok(());
                }
                qmp.execute(types::cont {}).await.map(drop).map_err(s)
            }
            Undo::Overlays {
                disks,
                created,
                switch_sent,
            } => undo_overlays(qmp, disks, created, *switch_sent, out).await,
        }
    }
}

/// Removes a file this create made (through the door: `unlink.rs`): the memory file, or an
/// overlay — one the guest may have written to only when its data is merged back.
async fn remove(p: &std::path::Path, kind: Kind, data: Data) -> Result<(), String> {
    crate::unlink::made_by_this_operation(p, kind, data)
        .await
        .map_err(|e| format!("could not remove {}: {e}", p.display()))
}

/// QEMU is gone: only files can be tidied.
async fn undo_offline(u: Undo, out: &mut Outcome) {
    match u {
        Undo::RemoveFile(p) => {
            if let Err(e) = remove(&p, Kind::Memory, Data::MustBeEmpty).await {
                out.problems.push(e);
            }
        }
        Undo::Overlays {
            disks,
            created,
            switch_sent,
        } => {
            undo_overlays_offline(&disks, &created, switch_sent, out).await;
            if !out.kept.is_empty() {
                out.problems.push(format!(
                    "QEMU is gone after the disks switched; the overlays hold the guest's latest writes and were kept: {}",
                    crate::error::overlay_list(&out.kept)
                ));
            }
        }
        _ => {}
    }
}

/// QEMU is gone: of the overlay files in `created`, one the guest may have written to (the
/// switch may have happened) is kept if it holds anything — in `out.kept` — and the rest are
/// removed (an empty overlay reads exactly like its base). Also what a recovery does.
pub(crate) async fn undo_overlays_offline(
    disks: &[PlannedOverlay],
    created: &[PathBuf],
    may_have_switched: bool,
    out: &mut Outcome,
) {
    for d in disks.iter().filter(|d| created.contains(&d.overlay)) {
        if tokio::fs::symlink_metadata(&d.overlay).await.is_err() {
            continue; // never made, or already gone
        }
        let keep = may_have_switched
            && image::has_own_data(&d.overlay, &CancellationToken::new())
                .await
                .unwrap_or(true);
        if keep {
            out.kept.push((d.device.clone(), d.overlay.clone()));
        } else if let Err(e) = remove(&d.overlay, Kind::Image, Data::MustBeEmpty).await {
            out.problems.push(e);
        }
    }
}

/// Takes the overlays back from what QEMU says now: a disk on its overlay is merged back
/// (kept, in `out.kept`, if that fails), an added node deleted, and the files in `created`
/// removed. Also what a recovery of an interrupted create does.
pub(crate) async fn undo_overlays(
    qmp: &Qmp,
    disks: &[PlannedOverlay],
    created: &[PathBuf],
    switch_sent: bool,
    out: &mut Outcome,
) -> Result<(), String> {
    let positions = disks::positions(qmp, disks)
        .await
        .map_err(|e| format!("could not ask QEMU where the disks are: {e}"))?;
    let mut failed = Vec::new();
    for (d, pos) in disks.iter().zip(positions) {
        match pos {
            Position::OnOverlay => {
                if !switch_sent {
                    warn!(device = %d.device, "a disk is on its overlay though no switch was sent");
                }
                match disks::merge_back(qmp, d).await {
                    Ok(()) => {
                        if let Err(e) = remove(&d.overlay, Kind::Image, Data::MergedElsewhere).await
                        {
                            failed.push(e);
                        }
                    }
                    Err(e) => {
                        failed.push(format!(
                            "{} stays on overlay {} (merging it back failed: {e})",
                            d.device,
                            d.overlay.display()
                        ));
                        out.kept.push((d.device.clone(), d.overlay.clone()));
                    }
                }
            }
            Position::NodeAdded => {
                if let Err(e) = disks::delete_node(qmp, &d.overlay_node).await {
                    failed.push(e.to_string());
                } else if created.contains(&d.overlay) {
                    if let Err(e) = remove(&d.overlay, Kind::Image, Data::MustBeEmpty).await {
                        failed.push(e);
                    }
                }
            }
            Position::Untouched => {
                if created.contains(&d.overlay) {
                    if let Err(e) = remove(&d.overlay, Kind::Image, Data::MustBeEmpty).await {
                        failed.push(e);
                    }
                }
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Puts capabilities and `max-bandwidth` back as they were (only what differs now).
pub(crate) async fn restore_settings(qmp: &Qmp, saved: &SavedSettings) -> Result<(), String> {
    let s = |e: qsnap_qmp::Error| e.to_string();
    let now = qmp
        .execute(crate::qemu::QueryMigrateCapabilities {})
        .await
        .map_err(s)?;
    let back: Vec<Capability> = saved
        .capabilities
        .iter()
        .filter(|(name, state)| {
            now.iter()
                .any(|c| &c.capability == name && c.state != *state)
        })
        .map(|(name, state)| Capability {
            capability: name.clone(),
            state: *state,
        })
        .collect();
    if !back.is_empty() {
        qmp.execute(MigrateSetCapabilities { capabilities: back })
            .await
            .map_err(s)?;
    }
    if let Some(bw) = saved.max_bandwidth {
        qmp.execute(SetMaxBandwidth { max_bandwidth: bw })
            .await
            .map_err(s)?;
    }
    Ok(())
}

/// Cancels a save if one is running, and waits (bounded) until it has stopped, so the fdset
/// and file can go.
pub(crate) async fn cancel_migration(qmp: &Qmp) -> Result<(), String> {
    let s = |e: qsnap_qmp::Error| e.to_string();
    if !qmp.execute(QueryMigrate {}).await.map_err(s)?.is_running() {
        return Ok(());
    }
    qmp.execute(types::migrate_cancel {}).await.map_err(s)?;
    for _ in 0..1000 {
        if !qmp.execute(QueryMigrate {}).await.map_err(s)?.is_running() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the save did not stop within 10 s of migrate_cancel".into())
}
