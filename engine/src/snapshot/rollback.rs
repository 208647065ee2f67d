//! The undo log of a create: each step that changed something pushes how to take it back.
//!
//! On failure the log runs newest first, except that a running save is always cancelled
//! before anything else (its fdset and file cannot go while QEMU writes to them). One failed
//! undo does not stop the others; what could not be undone is returned so the error can say
//! it. If QEMU is gone, only local files are tidied, and overlays the VM had switched to are
//! kept: they hold the guest's writes since the switch.

use crate::qemu::{Capability, MigrateSetCapabilities, QueryMigrate, SetMaxBandwidth};
use crate::snapshot::disks::{self, DiskPlan};
use qsnap_qmp::{types, Qmp};
use std::path::PathBuf;
use std::time::Duration;
use tracing::{info, warn};

/// How to take one step back.
#[derive(Debug)]
pub(crate) enum Undo {
    /// A file qsnap created (memory file or an unused overlay).
    RemoveFile(PathBuf),
    /// The fdset holding the memory file.
    RemoveFd(i64),
    /// A named fd given with `getfd` that no migration has taken yet.
    CloseFd(String),
    /// An overlay node not (yet) in the disk chain.
    BlockdevDel(String),
    /// Migration capabilities as they were.
    RestoreCapabilities(Vec<Capability>),
    /// `max-bandwidth` as it was.
    RestoreBandwidth(u64),
    /// A save in progress.
    CancelMigration,
    /// The guest was running and qsnap (or QEMU, for precopy) paused it.
    Resume,
    /// Disks already switched to overlays: commit each overlay back into its base, pivot the
    /// device back, drop the overlay node and file.
    MergeBack(Vec<DiskPlan>),
}

impl Undo {
    /// Kept after success: settings go back and the fdset is released either way.
    fn restores_settings(&self) -> bool {
        matches!(
            self,
            Undo::RemoveFd(_) | Undo::RestoreCapabilities(_) | Undo::RestoreBandwidth(_)
        )
    }
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

    /// The disks switched to their overlays: from now on those overlays hold guest writes, so
    /// the undo is a merge back, never a delete.
    pub(crate) fn switched(&mut self, disks: &[DiskPlan]) {
        self.forget(|u| match u {
            Undo::BlockdevDel(n) => disks.iter().any(|d| &d.overlay_node == n),
            Undo::RemoveFile(p) => disks.iter().any(|d| &d.overlay == p),
            _ => false,
        });
        self.push(Undo::MergeBack(disks.to_vec()));
    }

    /// The disks that have switched to their overlays so far.
    pub(crate) fn switched_disks(&self) -> Vec<DiskPlan> {
        self.undo
            .iter()
            .filter_map(|u| match u {
                Undo::MergeBack(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Success: restores settings, keeps everything made.
    pub(crate) async fn finish(mut self) -> Vec<String> {
        self.undo.retain(Undo::restores_settings);
        self.run().await
    }

    /// Failure: undoes everything; returns what could not be undone.
    pub(crate) async fn run(mut self) -> Vec<String> {
        let mut problems = Vec::new();
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
                match u {
                    Undo::RemoveFile(p) => {
                        if let Err(e) = tokio::fs::remove_file(&p).await {
                            problems.push(format!("could not remove {}: {e}", p.display()));
                        }
                    }
                    Undo::MergeBack(disks) => problems.push(format!(
                        "QEMU is gone after the disks switched; the overlays hold the guest's \
                         latest writes and were kept: {}",
                        disks
                            .iter()
                            .map(|d| d.overlay.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    _ => {}
                }
                continue;
            }
            let outcome = self.undo_one(&u).await;
            match outcome {
                Ok(()) => info!(?u, "rolled back"),
                Err(e) => {
                    warn!(?u, error = %e, "rollback step failed");
                    problems.push(e);
                }
            }
        }
        problems
    }

    async fn undo_one(&self, u: &Undo) -> Result<(), String> {
        let qmp = self.qmp;
        let s = |e: qsnap_qmp::Error| e.to_string();
        match u {
            Undo::RemoveFile(p) => tokio::fs::remove_file(p)
                .await
                .map_err(|e| format!("could not remove {}: {e}", p.display())),
            Undo::RemoveFd(set) => qmp.remove_fd(*set, None).await.map_err(s),
            Undo::CloseFd(name) => qmp.closefd(name).await.map_err(s),
            Undo::BlockdevDel(node) => qmp
                .execute(types::blockdev_del {
                    node_name: node.clone(),
                })
                .await
                .map(drop)
                .map_err(s),
            Undo::RestoreCapabilities(caps) => qmp
                .execute(MigrateSetCapabilities {
                    capabilities: caps.clone(),
                })
                .await
                .map(drop)
                .map_err(s),
            Undo::RestoreBandwidth(bw) => qmp
                .execute(SetMaxBandwidth { max_bandwidth: *bw })
                .await
                .map(drop)
                .map_err(s),
            Undo::CancelMigration => cancel_migration(qmp).await,
            Undo::Resume => qmp.execute(types::cont {}).await.map(drop).map_err(s),
            Undo::MergeBack(list) => {
                let mut failed = Vec::new();
                for d in list {
                    match disks::merge_back(qmp, d).await {
                        Ok(()) => {
                            if let Err(e) = tokio::fs::remove_file(&d.overlay).await {
                                failed.push(format!("{}: {e}", d.overlay.display()));
                            }
                        }
                        Err(e) => failed.push(format!(
                            "{} stays on overlay {} (merging it back failed: {e})",
                            d.device,
                            d.overlay.display()
                        )),
                    }
                }
                if failed.is_empty() {
                    Ok(())
                } else {
                    Err(failed.join("; "))
                }
            }
        }
    }
}

async fn cancel_migration(qmp: &Qmp) -> Result<(), String> {
    qmp.execute(types::migrate_cancel {})
        .await
        .map_err(|e| e.to_string())?;
    // Wait (bounded) for the cancel to land, so the fdset and file can go.
    for _ in 0..1000 {
        let info = qmp
            .execute(QueryMigrate {})
            .await
            .map_err(|e| e.to_string())?;
        if !info.is_running() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the save did not stop within 10 s of migrate_cancel".into())
}
