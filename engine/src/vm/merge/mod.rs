//! Merging the layers no snapshot needs any more — what a delete does after the snapshot's
//! manifest and memory are gone, and what `check --repair` finishes.
//!
//! The rule (drawn in `docs/snapshots.md`), per disk, for an image X that no snapshot
//! freezes, that no VM writes to, and that no other VM's chain touches:
//!
//! ```text
//! X has no child, qsnap made it     → unlink X
//! X has one child C, qsnap made X   → stream:  C absorbs X's data, backs onto X's backing;
//!                                              unlink X            (writes only into C,
//!                                              whose content does not change)
//! X has one child C, X is original  → commit:  C's data goes down into X; whatever named C
//!   (and qsnap made C)                         names X; unlink C   (writes only into X,
//!                                              which nothing but C reads)
//! X has two or more children        → stays, a shared unnamed base, until one is left
//! ```
//! Original images (those a VM had before qsnap) are never unlinked. Rounds take at most one
//! step per disk, bottom of the chain first; the live steps of a round (layers in the running
//! QEMU's chains) run as block jobs that finalize together, the offline ones (`qemu-img`) copy
//! their data first and change headers only once every disk's copy succeeded. Each round is
//! journaled before it starts; every step can be redone from its journal entry.
//!
//! Files: `plan.rs` (the rule above, as pure functions), `live.rs` (block jobs in the running
//! QEMU), `offline.rs` (`qemu-img`, and its undo), `finish.rs` (what follows once a step's
//! data moved). This file runs the rounds: it journals each one before its first change, so
//! that a crash part-way is redone from the journal; it never decides a step itself, or
//! `check` and a repair could disagree about what is left to merge.

mod finish;
mod live;
mod offline;
mod plan;

use super::refs::{self, Graph, Live, Others};
use super::Vm;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::snapshot::jobs;
use crate::store::{DeleteIntent, Intent, Manifest, MergeKind, MergeStep, VmRecord};
use finish::{finish_step, forget_owned, restamp};
use live::merge_live;
use offline::{merge_offline, point_back};
use plan::{file_name, removed_by};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

pub(crate) use live::follow_live;
pub(crate) use plan::{has_merges, next_round, Step};

/// How far a merge has got, for a progress bar.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MergeProgress {
    /// Fraction done (0–1) of the current round.
    pub fraction: f64,
    /// What is being merged (`vd0: disk.s1.qcow2 into disk.s2.qcow2`).
    pub what: String,
    /// Bytes to move in this round (the layers' allocated size, an estimate).
    pub bytes: u64,
}

/// Progress callback for merges. Must not block.
pub type MergeProgressFn = Arc<dyn Fn(&MergeProgress) + Send + Sync>;

/// One merge (or removal) that happened.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct MergeReport {
    /// The disk.
    pub device: String,
    /// `stream`, `commit` or `remove`.
    pub kind: String,
    /// The image merged away (or into, for a commit).
    pub lower: PathBuf,
    /// Its child, if it was merged with one.
    pub upper: Option<PathBuf>,
    /// In the running QEMU (block job) or offline (`qemu-img`).
    pub live: bool,
    /// How long it took.
    pub ms: f64,
    /// The file that was unlinked.
    pub removed: Option<PathBuf>,
}

/// What an operation's last look saw, for planning its next round without looking again
/// (see [`view_from`]): QEMU's view, if nothing in QEMU changed since, and what the store's
/// other VMs hold.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// QEMU's view.
    pub live: Option<Live>,
    /// What the other VMs hold.
    pub others: Option<Others>,
}

impl Seen {
    /// What a look that gave `graph` and `live` saw.
    pub(crate) fn of(graph: &Graph, live: Option<Live>) -> Seen {
        Seen {
            live,
            others: Some(graph.others()),
        }
    }
}

/// Runs rounds until nothing is left to merge. `intent` is the delete's journal entry
/// (updated with each round). `seen`: what the caller saw since it last changed anything in
/// QEMU (the first round is planned from it). Returns what was done.
pub(crate) async fn run(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &mut DeleteIntent,
    progress: Option<&MergeProgressFn>,
    seen: Seen,
) -> Result<Vec<MergeReport>> {
    let mut done = Vec::new();
    let mut seen = seen;
    // A round left by an interrupted run is redone first.
    if !intent.merges.is_empty() {
        let steps: Vec<Step> = intent.merges.iter().cloned().map(Step::Merge).collect();
        let (reports, after) = run_round(vm, record, intent, steps, progress, true, None).await?;
        done.extend(reports);
        seen = after;
    }
    for _ in 0..1000 {
        let manifests = vm.store().manifests(vm.name()).await?;
        let reused = seen.others.is_some();
        let (graph, mut live) =
            view_from(vm, record, &manifests, std::mem::take(&mut seen)).await?;
        let mut steps = next_round(&graph, record, live.as_ref());
        let commits = steps
            .iter()
            .any(|s| matches!(s, Step::Merge(m) if m.kind == MergeKind::Commit));
        if reused && commits {
            // A commit writes into the lower image: whether another VM stands on it is read
            // afresh, not taken from an earlier look (see `Graph::gather_reusing`).
            let again = Seen { live, others: None };
            let (graph, looked) = view_from(vm, record, &manifests, again).await?;
            steps = next_round(&graph, record, looked.as_ref());
            live = looked;
        }
        if steps.is_empty() {
            break;
        }
        let (reports, after) = run_round(vm, record, intent, steps, progress, false, live).await?;
        done.extend(reports);
        seen = after;
    }
    failpoint::hit("delete.consolidated", record.pid).await?;
    Ok(done)
}

/// Merges the layers nothing needs any more that are left in the VM's chains — what a
/// removal elsewhere in the tree made mergeable (a revert's abandoned overlay was the second
/// child of an unnamed base), or what an interrupted delete left — journaled as a delete of
/// no snapshot, so that a crash part-way is finished like any delete. Hold the VM's lock,
/// with no journal of its own left to settle.
pub(crate) async fn merge_leftovers(
    vm: &Vm,
    record: &mut VmRecord,
    progress: Option<&MergeProgressFn>,
) -> Result<Vec<MergeReport>> {
    let mut intent = DeleteIntent {
        snapshots: Vec::new(),
        manifests: Vec::new(),
        phase: crate::store::DeletePhase::Consolidating,
        merges: Vec::new(),
        guest_was_running: None,
    };
    vm.store()
        .write_journal(vm.name(), &Intent::Delete(intent.clone()))
        .await?;
    let done = run(vm, record, &mut intent, progress, Seen::default()).await?;
    vm.store().clear_journal(vm.name()).await?;
    Ok(done)
}

/// The store's graph and, for a running VM, QEMU's view (checked against each other).
pub(crate) async fn view(
    vm: &Vm,
    record: &VmRecord,
    manifests: &[Manifest],
) -> Result<(Graph, Option<Live>)> {
    view_from(vm, record, manifests, Seen::default()).await
}

/// [`view`], with QEMU's view taken from `seen` (when the VM still runs) rather than asked
/// again: what this operation read since it last changed anything in QEMU; and what the
/// other VMs hold as `seen` read it ([`Graph::gather_reusing`]). For planning a round only —
/// every step looks at QEMU again before it changes anything (`merge_live`, the reference
/// guard in front of each unlink, which also reads the other VMs afresh) — and it saves a
/// look that, with a hundred layers in a chain, costs QEMU ≈ 35 ms, and ≈ 0.4 ms per other VM.
pub(crate) async fn view_from(
    vm: &Vm,
    record: &VmRecord,
    manifests: &[Manifest],
    seen: Seen,
) -> Result<(Graph, Option<Live>)> {
    let Seen { live: seen, others } = seen;
    // Only a VM that is really stopped is worked on offline: a monitor that does not answer
    // is not a stopped QEMU (its images are open).
    let live = match super::state::VmState::observe(vm, record).await {
        // (Only the very QEMU that gave the look: one restarted meanwhile is asked again.)
        super::state::VmState::Running { pid, .. } => match seen {
            Some(seen) if pid.is_some() && seen.pid == pid => Some(seen),
            _ => {
                let qmp = vm.connect_quick(record).await?;
                Some(Live::read(&qmp).await?)
            }
        },
        super::state::VmState::Stopped => None,
        super::state::VmState::Unreachable { pid, why } => {
            return Err(Error::Unreachable {
                vm: vm.name().to_string(),
                pid,
                why,
            })
        }
    };
    let graph = match &others {
        Some(others) => {
            Graph::gather_reusing(
                vm.store(),
                vm.name(),
                record,
                manifests,
                live.as_ref(),
                others,
                vm.cancel(),
            )
            .await?
        }
        None => {
            Graph::gather(
                vm.store(),
                vm.name(),
                record,
                manifests,
                live.as_ref(),
                vm.cancel(),
            )
            .await?
        }
    };
    if let Some((image, why)) = graph.broken.first() {
        return Err(Error::from(crate::error::DeleteError::Refused {
            snapshot: image.display().to_string(),
            why: format!(
                "its chain cannot be trusted: {why} (run `qsnap check {}`)",
                vm.name()
            ),
        }));
    }
    Ok((graph, live))
}

/// One round: what it did, and QEMU's view as its last look saw it (nothing in QEMU changed
/// after that look), for planning the next round. `planned`: the look the round was planned
/// from, which its live merge refreshes rather than reads again when QEMU kept its shape.
async fn run_round(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &mut DeleteIntent,
    steps: Vec<Step>,
    progress: Option<&MergeProgressFn>,
    redo: bool,
    planned: Option<Live>,
) -> Result<(Vec<MergeReport>, Seen)> {
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut seen = Seen::default();
    // Removals need no journal: an unlink is one step.
    let mut merges = Vec::new();
    for s in steps {
        match s {
            Step::Remove { device, image } => {
                let manifests = vm.store().manifests(vm.name()).await?;
                let (graph, live) = view(vm, record, &manifests).await?;
                refs::safe_unlink(&image, &graph, record, live.as_ref()).await?;
                seen = Seen::of(&graph, live);
                forget_owned(vm, record, &image).await?;
                info!(image = %image.display(), "removed a layer nothing uses");
                reports.push(MergeReport {
                    device,
                    kind: "remove".into(),
                    lower: image.clone(),
                    upper: None,
                    live: false,
                    ms: 0.0,
                    removed: Some(image),
                });
            }
            Step::Merge(m) => merges.push(m),
        }
    }
    if merges.is_empty() {
        return Ok((reports, seen));
    }
    for (i, m) in merges.iter_mut().enumerate() {
        if m.live && m.job.is_none() {
            m.job = Some(format!(
                "{}{}-{i}",
                jobs::MERGE_JOB_PREFIX,
                std::process::id()
            ));
        }
    }
    intent.merges = merges.clone();
    vm.store()
        .write_journal(vm.name(), &Intent::Delete(intent.clone()))
        .await?;
    let what = merges
        .iter()
        .map(|m| {
            format!(
                "{}: {} {} {}",
                m.device,
                file_name(&m.lower),
                match m.kind {
                    MergeKind::Stream => "into",
                    MergeKind::Commit => "absorbs",
                },
                file_name(&m.upper)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let bytes = estimate(&merges).await;
    let report = |f: f64| {
        if let Some(p) = progress {
            p(&MergeProgress {
                fraction: f,
                what: what.clone(),
                bytes,
            });
        }
    };
    report(0.0);
    // Data first, all disks — the offline copies, then the live jobs (so that a live failure
    // can still point the offline streams back) — then headers and names.
    let (live_steps, offline): (Vec<&MergeStep>, Vec<&MergeStep>) =
        merges.iter().partition(|m| m.live);
    let streams: Vec<PathBuf> = merges
        .iter()
        .filter(|m| m.kind == MergeKind::Stream)
        .map(|m| m.upper.clone())
        .collect();
    let data = async {
        let streamed = if offline.is_empty() {
            Vec::new()
        } else {
            merge_offline(vm, &offline, redo, &report).await?
        };
        if live_steps.is_empty() {
            return Ok(None);
        }
        let steps: Vec<MergeStep> = live_steps.into_iter().cloned().collect();
        match merge_live(vm, record, intent, &steps, redo, planned, &report).await {
            Ok(before_jobs) => Ok(before_jobs),
            Err(e) => {
                point_back(&streamed).await;
                Err(e)
            }
        }
    }
    .await;
    let before_jobs = match data {
        Ok(nodes) => nodes,
        Err(e) => {
            // A stream that stopped half-way wrote into its upper image (its content as a chain
            // is unchanged): the snapshots that freeze it get new stamps, or they could not be
            // reverted to. If that fails, the round stays journaled (even after a cancel) so a
            // repair redoes it and restamps.
            if let Err(stamp) = restamp(vm, &streams).await {
                warn!(error = %stamp, "could not restamp streamed images");
                return Err(Error::StoreBehind {
                    vm: vm.name().to_string(),
                    cause: Box::new(e),
                    problem: Box::new(stamp),
                });
            }
            return Err(e);
        }
    };
    failpoint::hit("delete.merged", record.pid).await?;
    for m in &merges {
        let before = before_jobs.as_deref().filter(|_| m.live);
        seen = finish_step(vm, record, m, before).await?;
    }
    failpoint::hit("delete.rebased", record.pid).await?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    for m in &merges {
        reports.push(MergeReport {
            device: m.device.clone(),
            kind: match m.kind {
                MergeKind::Stream => "stream".into(),
                MergeKind::Commit => "commit".into(),
            },
            lower: m.lower.clone(),
            upper: Some(m.upper.clone()),
            live: m.live,
            ms,
            removed: Some(removed_by(m).to_owned()),
        });
    }
    intent.merges.clear();
    vm.store()
        .write_journal(vm.name(), &Intent::Delete(intent.clone()))
        .await?;
    report(1.0);
    Ok((reports, seen))
}

/// The bytes a round copies (allocated size of the layers whose data moves).
async fn estimate(merges: &[MergeStep]) -> u64 {
    let mut total = 0;
    for m in merges {
        let moving = match m.kind {
            MergeKind::Stream => &m.lower,
            MergeKind::Commit => &m.upper,
        };
        if let Ok(meta) = tokio::fs::metadata(moving).await {
            use std::os::unix::fs::MetadataExt;
            total += meta.blocks() * 512;
        }
    }
    total
}
