//! Deleting snapshots — any of them, in any position of the tree, the VM running or stopped
//! — and merging the layers they leave (`merge/`).
//!
//! ```text
//! lock → settle → state Running or Stopped → checks, changing nothing: the snapshots exist,
//!   every chain reads back whole, QEMU runs the chains the record names, no block job runs
//!   ── any doubt: refused, nothing changed
//! → journal: delete (removing), with the manifests
//! → children of a deleted snapshot move to its parent; `current` moves up likewise; the
//!   record is written; manifests go
//! → journal: consolidating → the memory files are unlinked (delete.unlinking-memory) beside
//!   rounds of merges until no layer is left that nothing needs; both end before the next step
//! → journal cleared
//! ```
//! A failure or a cancel after the snapshots are gone leaves every chain whole (unmerged
//! layers are harmless) and says so; `qsnap check --repair` merges them later.

use super::merge;
use super::state::{Operation, VmState};
use super::Vm;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::name::SnapshotName;
use crate::qemu::QueryJobs;
use crate::store::{DeleteIntent, DeletePhase, Intent, Manifest, VmRecord};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tracing::warn;

pub use super::merge::{MergeProgress, MergeProgressFn, MergeReport};

/// How a delete goes.
#[derive(Clone, Default)]
pub struct DeleteOptions {
    /// Called as merges progress (a few times a second).
    pub progress: Option<MergeProgressFn>,
}

impl std::fmt::Debug for DeleteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeleteOptions").finish_non_exhaustive()
    }
}

/// What a delete did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct DeleteReport {
    /// The snapshots deleted.
    pub deleted: Vec<String>,
    /// Their memory files, removed.
    pub memory_removed: Vec<PathBuf>,
    /// The merges (and removals of layers nothing uses) that followed.
    pub merges: Vec<MergeReport>,
    /// Image files unlinked.
    pub images_removed: Vec<PathBuf>,
    /// The VM's current snapshot afterwards.
    pub current: Option<String>,
    /// Whether the VM was running (merges ran live in its QEMU).
    pub live: bool,
    /// Wall time.
    pub total_ms: f64,
}

impl Vm {
    /// Deletes one snapshot and merges the layers no snapshot needs any more.
    pub async fn delete_snapshot(
        &self,
        snap: &SnapshotName,
        opts: &DeleteOptions,
    ) -> Result<DeleteReport> {
        self.delete(Pick::These(std::slice::from_ref(snap), false), opts)
            .await
    }

    /// Deletes these snapshots — and, with `children`, every snapshot descending from them —
    /// in one operation (one journal, one round of merges). Any unknown name refuses the
    /// whole delete before anything changes.
    pub async fn delete_snapshots(
        &self,
        snaps: &[SnapshotName],
        children: bool,
        opts: &DeleteOptions,
    ) -> Result<DeleteReport> {
        self.delete(Pick::These(snaps, children), opts).await
    }

    /// Deletes every snapshot; the VM ends up on one image per disk (its original images,
    /// with everything merged into them).
    pub async fn delete_all(&self, opts: &DeleteOptions) -> Result<DeleteReport> {
        self.delete(Pick::All, opts).await
    }

    async fn delete(&self, pick: Pick<'_>, opts: &DeleteOptions) -> Result<DeleteReport> {
        let started = Instant::now();
        let what = match pick {
            Pick::All => "all snapshots".to_owned(),
            Pick::These(snaps, children) => {
                let names: Vec<String> = snaps.iter().map(ToString::to_string).collect();
                format!(
                    "{}{}",
                    names.join(", "),
                    if children { " and their children" } else { "" }
                )
            }
        };
        let op = self.begin(&format!("delete {what}")).await?;
        // Each reference graph this delete gathers asks the cache about every image of the
        // store: the cache is read up front in one task (what is stale dropped), not one
        // blocking read per image.
        crate::cache::sweep().await;
        let mut record = op.record.clone();
        let manifests = self.store().manifests(self.name()).await?;
        let victims: Vec<Manifest> = match pick {
            Pick::These(snaps, children) => {
                let mut chosen: Vec<String> = Vec::new();
                for snap in snaps {
                    if !manifests.iter().any(|m| m.name == snap.as_str()) {
                        return Err(Error::UnknownSnapshot {
                            vm: self.name().to_string(),
                            snapshot: snap.to_string(),
                        });
                    }
                    if !chosen.iter().any(|c| c == snap.as_str()) {
                        chosen.push(snap.to_string());
                    }
                }
                if children {
                    // Descendants: whatever has a chosen parent, until nothing is added.
                    loop {
                        let more: Vec<String> = manifests
                            .iter()
                            .filter(|m| !chosen.contains(&m.name))
                            .filter(|m| m.parent.as_ref().is_some_and(|p| chosen.contains(p)))
                            .map(|m| m.name.clone())
                            .collect();
                        if more.is_empty() {
                            break;
                        }
                        chosen.extend(more);
                    }
                }
                manifests
                    .iter()
                    .filter(|m| chosen.contains(&m.name))
                    .cloned()
                    .collect()
            }
            Pick::All => manifests.clone(),
        };
        let state = VmState::observe(self, &record).await;
        state.allows(self.name().as_str(), Operation::Delete)?;
        let refuse = |why: String| {
            Error::from(crate::error::DeleteError::Refused {
                snapshot: what.clone(),
                why,
            })
        };
        // ---- checks: nothing has changed yet ----
        for v in &victims {
            if let Some(mem) = &v.snapshot.memory {
                let own = self
                    .store()
                    .memory_files(self.name(), &SnapshotName::new(&v.name)?);
                if !own.contains(&mem.file) {
                    return Err(refuse(format!(
                        "its memory file {} is not the store's",
                        mem.file.display()
                    )));
                }
            }
        }
        let (graph, live) = merge::view(self, &record, &manifests).await?;
        let was_live = live.is_some();
        if let Some(live) = &live {
            for d in &record.disks {
                let top = live.chain(&d.device).first().cloned();
                if top.as_ref() != Some(&d.image) {
                    return Err(refuse(format!(
                        "QEMU writes disk {} to {}, the store says {}; run `qsnap check {} --repair`",
                        d.device,
                        top.map_or("nothing".into(), |t| t.display().to_string()),
                        d.image.display(),
                        self.name()
                    )));
                }
            }
            let qmp = self.connect().await?;
            let jobs = qmp
                .execute(QueryJobs {})
                .await
                .map_err(Error::qmp("listing block jobs"))?;
            if let Some(j) = jobs.first() {
                return Err(Error::Busy {
                    what: format!("block job {} is running", j.id),
                });
            }
        }

        // The pools of these snapshots go (their standbys were never run): left, their chains
        // would keep the snapshots' layers from merging.
        let pooled: Vec<SnapshotName> = victims
            .iter()
            .filter_map(|m| SnapshotName::parse(&m.name))
            .collect();
        let dropped = self.drop_pools(&pooled).await;
        let mut intent = DeleteIntent {
            snapshots: victims.iter().map(|m| m.name.clone()).collect(),
            manifests: victims.clone(),
            phase: DeletePhase::Removing,
            merges: Vec::new(),
            guest_was_running: None,
        };
        self.store()
            .write_journal(self.name(), &Intent::Delete(intent.clone()))
            .await?;
        failpoint::hit("delete.journaled", state.pid()).await?;
        detach_snapshots(self, &mut record, &victims).await?;
        failpoint::hit("delete.removed", state.pid()).await?;
        intent.phase = DeletePhase::Consolidating;
        self.store()
            .write_journal(self.name(), &Intent::Delete(intent.clone()))
            .await?;
        // The memory files go beside the merges (see `remove_memory`), in this future: both
        // end (or are dropped) together, so nothing unlinks after the VM's lock is let go.
        let memory = async {
            failpoint::hit("delete.unlinking-memory", state.pid()).await?;
            remove_memory(self.store().clone(), self.name().clone(), victims.clone()).await
        };
        // The first round is planned from the checks' look at QEMU: this delete changed
        // nothing in it since (every step looks again before it changes anything).
        // (Standbys dropped: the other VMs are not what the checks saw; read again.)
        let mut seen = merge::Seen::of(&graph, live);
        if dropped > 0 {
            seen.others = None;
        }
        let merging = merge::run(self, &mut record, &mut intent, opts.progress.as_ref(), seen);
        let (memory_removed, merged) = tokio::join!(memory, merging);
        // Whatever fails leaves the journal (but for a cancelled round with nothing else
        // left): the next operation's recovery removes what memory is left and merges on.
        let merges = match merged {
            Ok(m) => m,
            Err(e) => {
                if let Err(m) = &memory_removed {
                    warn!(error = %m, "the deleted snapshots' memory files were not all removed; the next operation's recovery removes them");
                }
                // A cancelled round was undone (jobs cancelled before any chain changed,
                // offline copies pointed back): nothing is left half-done.
                if matches!(e, Error::Cancelled) && memory_removed.is_ok() {
                    self.store().clear_journal(self.name()).await?;
                }
                return Err(Error::from(crate::error::DeleteError::MergeUnfinished {
                    vm: self.name().to_string(),
                    snapshots: intent.snapshots.clone(),
                    problem: Box::new(e),
                }));
            }
        };
        let memory_removed = memory_removed.inspect_err(|e| {
            warn!(error = %e, "the snapshots are deleted and merged, but their memory files were not all removed; the next operation's recovery removes them");
        })?;
        self.store().clear_journal(self.name()).await?;
        Ok(DeleteReport {
            deleted: intent.snapshots,
            memory_removed,
            images_removed: merges.iter().filter_map(|m| m.removed.clone()).collect(),
            merges,
            current: record.current.clone(),
            live: was_live,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Removes snapshots from the store: their children (and `current`) move to the nearest
/// surviving ancestor, their manifests go, then their memory files. Safe to run again on a
/// half-done removal (a recovery does, in either phase of a delete).
pub(crate) async fn remove_snapshots(
    vm: &Vm,
    record: &mut VmRecord,
    victims: &[Manifest],
) -> Result<Vec<PathBuf>> {
    detach_snapshots(vm, record, victims).await?;
    remove_memory(vm.store().clone(), vm.name().clone(), victims.to_vec()).await
}

/// The victims' memory files, removed durably (those already gone are skipped). Unlinking a
/// file the page cache holds costs tens of milliseconds per 100 MB, so a delete runs this
/// beside its merges: nothing else reads a deleted snapshot's memory, and a crash before it
/// ends leaves the files for the delete's recovery (which runs it again) or `check --repair`
/// (`orphan-memory`).
pub(crate) async fn remove_memory(
    store: crate::store::Store,
    vm: crate::name::VmName,
    victims: Vec<Manifest>,
) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for v in &victims {
        let snap = SnapshotName::new(&v.name)?;
        removed.extend(store.remove_memory(&vm, &snap).await?);
    }
    Ok(removed)
}

/// [`remove_snapshots`] but the memory files: children and `current` re-parented, manifests
/// removed.
async fn detach_snapshots(vm: &Vm, record: &mut VmRecord, victims: &[Manifest]) -> Result<()> {
    let gone = |name: &str| victims.iter().any(|v| v.name == name);
    let survivor = |mut p: Option<String>| {
        while let Some(name) = p.clone() {
            if !gone(&name) {
                break;
            }
            p = victims
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.parent.clone());
        }
        p
    };
    for mut m in vm.store().manifests(vm.name()).await? {
        if gone(&m.name) {
            continue;
        }
        let parent = survivor(m.parent.clone());
        if parent != m.parent {
            m.parent = parent;
            vm.store().replace_manifest(&m).await?;
        }
    }
    let current = survivor(record.current.clone());
    if current != record.current {
        record.current = current;
        vm.store().write_record(record).await?;
    }
    for v in victims {
        let snap = SnapshotName::new(&v.name)?;
        vm.store().remove_manifest(vm.name(), &snap).await?;
    }
    Ok(())
}

/// Which snapshots a delete takes.
#[derive(Debug, Clone, Copy)]
enum Pick<'a> {
    /// Every one.
    All,
    /// These, and with `true` their descendants.
    These(&'a [SnapshotName], bool),
}
