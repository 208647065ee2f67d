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

use super::refs::{self, Graph, Live};
use super::Vm;
use crate::blocks;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::image;
use crate::snapshot::jobs::{self, LiveMerge, Points};
use crate::store::{DeleteIntent, Intent, Manifest, MergeKind, MergeStep, VmRecord};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

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
#[derive(Debug, Clone, Serialize)]
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

/// A step with the details needed to run it now.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// Unlink an image nothing uses.
    Remove { device: String, image: PathBuf },
    /// Merge two layers.
    Merge(MergeStep),
}

/// What is left to do right now: at most one step per disk.
pub(crate) fn next_round(g: &Graph, record: &VmRecord, live: Option<&Live>) -> Vec<Step> {
    let mut steps = Vec::new();
    for (device, images) in &g.by_device {
        // Bottom of the chain first: commits into an original image copy the least.
        let mut ordered: Vec<&PathBuf> = images.iter().collect();
        ordered.sort_by_key(|i| std::cmp::Reverse(depth(g, i)));
        for x in ordered {
            if let Some(step) = step_for(g, record, live, device, x) {
                steps.push(step);
                break;
            }
        }
    }
    steps
}

/// How many layers sit above `image` at most (0 for a top).
fn depth(g: &Graph, image: &Path) -> usize {
    g.children(image)
        .iter()
        .map(|c| 1 + depth(g, c))
        .max()
        .unwrap_or(0)
}

fn step_for(
    g: &Graph,
    record: &VmRecord,
    live: Option<&Live>,
    device: &str,
    x: &Path,
) -> Option<Step> {
    let owned = |p: &Path| record.owned_images.iter().any(|o| o == p);
    let needed = |p: &Path| {
        g.uses_of(p)
            .iter()
            .any(|u| !matches!(u, refs::Use::Original { .. }))
    };
    if needed(x) || g.pinned_elsewhere(x) {
        return None;
    }
    let kids = g.children(x);
    let live_chain = live.map(|l| l.chain(device)).unwrap_or_default();
    match kids.as_slice() {
        [] if owned(x) && !is_original(g, x) && !live_chain.iter().any(|p| p == x) => {
            Some(Step::Remove {
                device: device.to_owned(),
                image: x.to_owned(),
            })
        }
        [c] => {
            let kind = if owned(x) && !is_original(g, x) {
                MergeKind::Stream
            } else if owned(c) && !g.pinned_elsewhere(c) && !is_original(g, c) {
                MergeKind::Commit
            } else {
                return None;
            };
            let lower_backing = g.backing.get(x).cloned().flatten();
            Some(Step::Merge(MergeStep {
                device: device.to_owned(),
                kind,
                lower: x.to_owned(),
                upper: c.clone(),
                lower_backing_format: lower_backing
                    .as_ref()
                    .and_then(|b| g.format.get(b).cloned()),
                lower_backing,
                lower_format: g.format.get(x).cloned().unwrap_or_else(|| "qcow2".into()),
                upper_children: g.children(c),
                live: live_chain.iter().any(|p| p == c),
                job: None,
            }))
        }
        _ => None,
    }
}

fn is_original(g: &Graph, p: &Path) -> bool {
    g.uses_of(p)
        .iter()
        .any(|u| matches!(u, refs::Use::Original { .. }))
}

/// Runs rounds until nothing is left to merge. `intent` is the delete's journal entry
/// (updated with each round). Returns what was done.
pub(crate) async fn run(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &mut DeleteIntent,
    progress: Option<&MergeProgressFn>,
) -> Result<Vec<MergeReport>> {
    let mut done = Vec::new();
    // A round left by an interrupted run is redone first.
    if !intent.merges.is_empty() {
        let steps: Vec<Step> = intent.merges.iter().cloned().map(Step::Merge).collect();
        done.extend(run_round(vm, record, intent, steps, progress, true).await?);
    }
    for _ in 0..1000 {
        let manifests = vm.store().manifests(vm.name()).await?;
        let (graph, live) = view(vm, record, &manifests).await?;
        let steps = next_round(&graph, record, live.as_ref());
        if steps.is_empty() {
            break;
        }
        done.extend(run_round(vm, record, intent, steps, progress, false).await?);
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
    let done = run(vm, record, &mut intent, progress).await?;
    vm.store().clear_journal(vm.name()).await?;
    Ok(done)
}

/// Whether anything is left to merge (a merge, not a removal: a layer nothing uses at all
/// is an orphan, which `check` reports as such).
pub(crate) fn has_merges(g: &Graph, record: &VmRecord, live: Option<&Live>) -> bool {
    next_round(g, record, live)
        .iter()
        .any(|s| matches!(s, Step::Merge(_)))
}

/// The store's graph and, for a running VM, QEMU's view (checked against each other).
pub(crate) async fn view(
    vm: &Vm,
    record: &VmRecord,
    manifests: &[Manifest],
) -> Result<(Graph, Option<Live>)> {
    // Only a VM that is really stopped is worked on offline: a monitor that does not answer
    // is not a stopped QEMU (its images are open).
    let live = match super::state::VmState::observe(vm, record).await {
        super::state::VmState::Running { .. } => {
            let qmp = vm.connect_quick(record).await?;
            Some(Live::read(&qmp).await?)
        }
        super::state::VmState::Stopped => None,
        super::state::VmState::Unreachable { pid, why } => {
            return Err(Error::Unreachable {
                vm: vm.name().to_string(),
                pid,
                why,
            })
        }
    };
    let graph = Graph::gather(
        vm.store(),
        vm.name(),
        record,
        manifests,
        live.as_ref(),
        vm.cancel(),
    )
    .await?;
    if let Some((image, why)) = graph.broken.first() {
        return Err(Error::DeleteRefused {
            snapshot: image.display().to_string(),
            why: format!(
                "its chain cannot be trusted: {why} (run `qsnap check {}`)",
                vm.name()
            ),
        });
    }
    Ok((graph, live))
}

async fn run_round(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &mut DeleteIntent,
    steps: Vec<Step>,
    progress: Option<&MergeProgressFn>,
    redo: bool,
) -> Result<Vec<MergeReport>> {
    let started = Instant::now();
    let mut reports = Vec::new();
    // Removals need no journal: an unlink is one step.
    let mut merges = Vec::new();
    for s in steps {
        match s {
            Step::Remove { device, image } => {
                let manifests = vm.store().manifests(vm.name()).await?;
                let (graph, live) = view(vm, record, &manifests).await?;
                refs::safe_unlink(&image, &graph, record, live.as_ref()).await?;
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
        return Ok(reports);
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
        if !live_steps.is_empty() {
            let steps: Vec<MergeStep> = live_steps.into_iter().cloned().collect();
            if let Err(e) = merge_live(vm, record, intent, &steps, redo, &report).await {
                point_back(&streamed).await;
                return Err(e);
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = data {
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
    failpoint::hit("delete.merged", record.pid).await?;
    for m in &merges {
        finish_step(vm, record, m).await?;
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
    Ok(reports)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The image a finished step unlinks.
fn removed_by(m: &MergeStep) -> &Path {
    match m.kind {
        MergeKind::Stream => &m.lower,
        MergeKind::Commit => &m.upper,
    }
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

/// The live steps of a round: block jobs in the running QEMU, finalizing together.
///
/// The rule that keeps a guest's writes safe: **the guest never runs on an image the record
/// does not name.** An active commit switches the image the guest writes to, so when a round
/// has one (or a stream, whose copy only the pause's flush makes durable), the guest is paused
/// before any finalize (and before a job an interrupted run left
/// behind is driven to its end), the record is made to follow the chains QEMU really runs —
/// whatever the finalize did, even half of it — and only then is the guest resumed. If the
/// record cannot be written, the guest stays paused and the journal says to resume it: a
/// recovery that later finds QEMU gone can then trust the record about which image is newer.
async fn merge_live(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &mut DeleteIntent,
    steps: &[MergeStep],
    redo: bool,
    report: &(dyn Fn(f64) + Send + Sync),
) -> Result<()> {
    let qmp = vm.connect().await?;
    // Chains alone (`query-block`) where nodes are not needed: listing nodes can be refused
    // (`blocks::nodes`), and a refusal must not strand a guest paused for a switch.
    let disks = blocks::read(&qmp).await?;
    let pivots = steps.iter().any(|m| {
        m.kind == MergeKind::Commit && blocks::chain_of(&disks, &m.device).first() == Some(&m.upper)
    });
    // A stream too: QEMU keeps the mappings of the clusters it copied in its own qcow2 cache,
    // which no fsync of the file reaches, and QMP has no flush but `stop` (every drive is
    // flushed). They must be durable before the layer they came from is unlinked, or a power
    // cut loses data the guest had flushed.
    let pauses = pivots || steps.iter().any(|m| m.kind == MergeKind::Stream);
    if pauses && intent.guest_was_running.is_none() {
        // The guest will be paused for the switch: a recovery must know to resume it.
        let st = qmp
            .execute(types::query_status {})
            .await
            .map_err(Error::qmp("reading the run state"))?;
        intent.guest_was_running = Some(st.running);
        vm.store()
            .write_journal(vm.name(), &Intent::Delete(intent.clone()))
            .await?;
    }
    let guard = Pause {
        on: pauses && intent.guest_was_running == Some(true),
        flush: pauses,
        // A redo resumes as the journal says: the interrupted run may have paused the guest.
        paused_here: std::sync::atomic::AtomicBool::new(redo),
        vm: vm.name().to_string(),
    };
    let mut todo = Vec::new();
    for m in steps {
        let job = m
            .job
            .clone()
            .unwrap_or_else(|| format!("{}{}", jobs::MERGE_JOB_PREFIX, std::process::id()));
        if redo && jobs::exists(&qmp, &job).await? {
            // A job the interrupted run started is still there: drive it to its end with the
            // guest paused, and record what QEMU runs afterwards.
            guard.pause(&qmp).await?;
            let ended = jobs::finish_leftover(&qmp, &job, vm.cancel()).await;
            // The job may have copied after the pause's flush: flushed again before the
            // layer it merged can go.
            if let Err(e) = guard.flush(&qmp).await {
                return Err(guard.left_paused(e));
            }
            follow_qemu(vm, record, &qmp, &guard)
                .await
                .map_err(|e| guard.left_paused(e))?;
            guard.resume(&qmp).await?;
            match ended {
                Ok(_) => continue,
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                Err(e) => warn!(error = %e, %job, "an interrupted merge job failed; redoing it"),
            }
        }
        if redo && step_done_live(&blocks::read(&qmp).await?, m) {
            continue;
        }
        todo.push((m, job));
    }
    if !todo.is_empty() {
        let live = Live::read(&qmp).await?;
        let mut merges = Vec::new();
        for (m, job) in &todo {
            merges.push(live_merge(&live, m, job)?);
        }
        let progress = |f: f64| report(f);
        let pending =
            jobs::run_to_pending(&qmp, &merges, vm.cancel(), &progress, Points { on: true })
                .await?;
        if let Err(e) = guard.flush(&qmp).await {
            pending.abandon(&qmp).await;
            // A guest the failed pause left paused must not stay so silently.
            guard.resume(&qmp).await?;
            return Err(e);
        }
        let finalized = jobs::finalize(&qmp, &pending, Points { on: true }).await;
        failpoint::hit("delete.finalized", qmp.peer_pid())
            .await
            .map_err(|e| guard.left_paused(e))?;
        // Whatever the finalize did, the record follows QEMU before the guest runs again.
        follow_qemu(vm, record, &qmp, &guard)
            .await
            .map_err(|e| guard.left_paused(e))?;
        guard.resume(&qmp).await?;
        finalized?;
    }
    if pauses {
        intent.guest_was_running = None;
        vm.store()
            .write_journal(vm.name(), &Intent::Delete(intent.clone()))
            .await?;
    }
    // Nodes that opened the merged-away image are released by `finish_step`.
    Ok(())
}

/// Pausing the guest around a disk switch (when a round has one and the guest ran), and
/// flushing what a round's jobs wrote.
struct Pause {
    /// The guest ran, and is paused and resumed around the finalize.
    on: bool,
    /// The round streams or switches: QEMU flushes its drives (`stop`, QMP's only flush)
    /// before the finalize, also for a guest already paused.
    flush: bool,
    /// This guard paused a running guest (or a redo's journal says the interrupted run did):
    /// only then is it resumed. A guest someone paused during a long copy stays paused.
    paused_here: std::sync::atomic::AtomicBool,
    vm: String,
}

impl Pause {
    /// An error on a path that leaves the guest paused (the record could not be made to
    /// follow QEMU, so it must not run): says so, and what resumes it. The delete's journal
    /// remembers that it ran, so the repair resumes it once the record is right.
    fn left_paused(&self, e: Error) -> Error {
        if !self.on || matches!(e, Error::LeftPaused { .. }) {
            return e;
        }
        Error::LeftPaused {
            what: "a merge paused the guest to switch a disk's image, and the store could not be brought in line with what QEMU runs".into(),
            cause: Box::new(e),
            fix: format!(
                "`qsnap check {} --repair` records what QEMU runs and resumes it",
                self.vm
            ),
        }
    }

    /// Pauses a guest this guard pauses; otherwise, for a round that must flush, flushes:
    /// `stop` to a paused guest changes nothing but flushing every drive (QEMU's `do_vm_stop`
    /// flushes in any run state). A guest that runs although the round began with it paused
    /// (resumed by someone meanwhile) is paused just for the flush.
    async fn flush(&self, qmp: &Qmp) -> Result<()> {
        if self.on || !self.flush {
            return self.pause(qmp).await;
        }
        let st = qmp
            .execute(types::query_status {})
            .await
            .map_err(Error::qmp("reading the run state"))?;
        self.stop(qmp).await?;
        if st.running {
            crate::snapshot::revert::resume_at(qmp, "delete.resume-sent")
                .await
                .map_err(|e| Error::LeftPaused {
                    what: "a merge paused the guest to flush its disks, and could not resume it"
                        .into(),
                    cause: Box::new(e),
                    fix: format!("`qsnap check {} --repair` resumes it", self.vm),
                })?;
        }
        Ok(())
    }

    async fn pause(&self, qmp: &Qmp) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        let st = qmp
            .execute(types::query_status {})
            .await
            .map_err(Error::qmp("reading the run state"))?;
        if st.running {
            // Before the `stop`: one that fails or times out may still have paused it.
            self.paused_here
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.stop(qmp).await
    }

    async fn stop(&self, qmp: &Qmp) -> Result<()> {
        let sent = match qmp.execute(types::stop {}).await {
            Ok(_) => failpoint::hit("delete.pause-sent", qmp.peer_pid()).await,
            Err(e) => Err(Error::qmp("pausing the guest for the disk switch")(e)),
        };
        match sent {
            // A `stop` that timed out may have run: QEMU's run state says.
            Err(e) if e.is_timeout() => match qmp.execute(types::query_status {}).await {
                Ok(st) if !st.running => Ok(()),
                _ => Err(e),
            },
            other => other,
        }
    }

    async fn resume(&self, qmp: &Qmp) -> Result<()> {
        if !self.on || !self.paused_here.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let resumed = async {
            let st = qmp
                .execute(types::query_status {})
                .await
                .map_err(Error::qmp("reading the run state"))?;
            if st.running {
                return Ok(());
            }
            crate::snapshot::revert::resume_at(qmp, "delete.resume-sent").await
        }
        .await;
        resumed.map_err(|e| Error::LeftPaused {
            what: "a merge paused the guest to switch a disk's image; the store follows QEMU, but the guest could not be resumed".into(),
            cause: Box::new(e),
            fix: format!("`qsnap check {} --repair` resumes it", self.vm),
        })
    }
}

/// Makes the record name the images QEMU writes to now (after a finalize, whole or partial).
/// If it cannot be written, the guest is left paused (see [`merge_live`]).
async fn follow_qemu(vm: &Vm, record: &mut VmRecord, qmp: &Qmp, guard: &Pause) -> Result<()> {
    if guard.on {
        failpoint::hit("delete.chains-read", qmp.peer_pid()).await?;
    }
    let disks = blocks::read(qmp).await?;
    if follow_live(record, &disks) {
        vm.store().write_record(record).await?;
    }
    Ok(())
}

/// The record's disks set to QEMU's tops (`disks` as [`blocks::read`] gives them); true if
/// something changed.
pub(crate) fn follow_live(record: &mut VmRecord, disks: &[blocks::Disk]) -> bool {
    let mut changed = false;
    for d in &mut record.disks {
        if let Some(top) = blocks::chain_of(disks, &d.device).first() {
            if top != &d.image {
                d.image = top.clone();
                d.owned = record.owned_images.contains(top);
                changed = true;
            }
        }
    }
    changed
}

/// Whether a live step already happened (read from QEMU's chains).
fn step_done_live(disks: &[blocks::Disk], m: &MergeStep) -> bool {
    let chain = blocks::chain_of(disks, &m.device);
    match m.kind {
        // C no longer backs onto X.
        MergeKind::Stream => !chain.windows(2).any(|w| w[0] == m.upper && w[1] == m.lower),
        // C left the chain.
        MergeKind::Commit => !chain.contains(&m.upper),
    }
}

fn live_merge(live: &Live, m: &MergeStep, job: &str) -> Result<LiveMerge> {
    let node = |p: &Path| {
        blocks::format_node_for(&live.nodes, p)
            .map(|n| n.name.clone())
            .ok_or_else(|| Error::DeleteRefused {
                snapshot: m.lower.display().to_string(),
                why: format!("QEMU has no node for {} in disk {}", p.display(), m.device),
            })
    };
    let disk = live
        .disks
        .iter()
        .find(|d| d.device == m.device)
        .and_then(|d| d.medium.as_ref())
        .ok_or_else(|| Error::DeleteRefused {
            snapshot: m.lower.display().to_string(),
            why: format!("QEMU has no disk {}", m.device),
        })?;
    let root = disk.node.clone().ok_or_else(|| Error::DeleteRefused {
        snapshot: m.lower.display().to_string(),
        why: format!("QEMU names no node for disk {}", m.device),
    })?;
    Ok(match m.kind {
        MergeKind::Stream => {
            let base = match &m.lower_backing {
                Some(b) => Some(node(b)?),
                None => None,
            };
            LiveMerge::stream(job, &node(&m.upper)?, base.as_deref())
        }
        MergeKind::Commit if disk.top() == m.upper => {
            LiveMerge::active_commit(job, &root, &node(&m.lower)?)
        }
        MergeKind::Commit => LiveMerge::commit(job, &root, &node(&m.upper)?, &node(&m.lower)?),
    })
}

async fn release_nodes(qmp: &Qmp, live: &Live, image: &Path) {
    // Format nodes first, then the protocol node under them.
    let mut nodes: Vec<_> = live.nodes.iter().filter(|n| n.image == image).collect();
    nodes.sort_by_key(|n| n.driver == "file");
    for n in nodes {
        if let Err(e) = qmp
            .execute(types::blockdev_del {
                node_name: n.name.clone(),
            })
            .await
        {
            tracing::debug!(node = %n.name, error = %e, "node not released (QEMU may have dropped it)");
        }
    }
}

/// The offline steps of a round: every disk's data is copied first; if one fails, the
/// streams already done are pointed back at their old backing (which still holds its data)
/// so that no disk's chain changes.
async fn merge_offline<'a>(
    vm: &Vm,
    steps: &[&'a MergeStep],
    redo: bool,
    report: &(dyn Fn(f64) + Send + Sync),
) -> Result<Vec<&'a MergeStep>> {
    let cancel = vm.cancel();
    let mut streamed: Vec<&MergeStep> = Vec::new();
    let n = steps.len();
    for (i, m) in steps.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let part = |f: f64| report((i as f64 + f) / n as f64);
        let r = async {
            match m.kind {
                MergeKind::Stream => {
                    if redo {
                        // X is unlinked only once C was synced after its copy: gone, done.
                        let lower = m.lower.clone();
                        if !crate::store::blocking(move || crate::store::exists(&lower)).await? {
                            return Ok(());
                        }
                        // C moved off X, but its copy need not be durable: qemu-img (and QEMU)
                        // write the new backing into C's header before C's last metadata flush,
                        // so a power cut can keep the header and lose the copied clusters. C
                        // backs onto X again (it reads the same: what C holds, X's chain says
                        // too or C wrote later) and is streamed again.
                        let info = image::info(&m.upper, cancel).await?;
                        if info.full_backing_filename.as_ref() != Some(&m.lower) {
                            image::set_backing(&m.upper, &m.lower, &m.lower_format, cancel).await?;
                        }
                    }
                    match &m.lower_backing {
                        Some(b) => {
                            let fmt = m.lower_backing_format.as_deref().unwrap_or("raw");
                            image::rebase_keeping_content(&m.upper, b, fmt, cancel, &part).await
                        }
                        None => {
                            image::rebase_keeping_content(
                                &m.upper,
                                Path::new(""),
                                "qcow2",
                                cancel,
                                &part,
                            )
                            .await
                        }
                    }
                }
                MergeKind::Commit => {
                    // Gone: the interrupted run got as far as its unlink (which comes only
                    // after the data moved), and a power cut took QEMU along with qsnap.
                    let upper = m.upper.clone();
                    if redo && !crate::store::blocking(move || crate::store::exists(&upper)).await?
                    {
                        return Ok(());
                    }
                    if redo && !vm_may_commit_offline(vm, m).await? {
                        return Ok(());
                    }
                    image::commit(&m.upper, cancel, &part).await
                }
            }
        }
        .await;
        let mut r = r;
        if r.is_ok() && m.kind == MergeKind::Stream {
            streamed.push(m);
        }
        if r.is_ok() && i + 1 < n {
            r = failpoint::hit("delete.merge-started", None).await;
        }
        if let Err(e) = r {
            point_back(&streamed).await;
            return Err(e);
        }
    }
    Ok(streamed)
}

/// Undoes offline streams: each upper image backs onto the layer it was streamed from again
/// (which still holds its data, so the content does not change). With a token of its own: a
/// Ctrl-C that stopped the copy must not stop the undo.
async fn point_back(streamed: &[&MergeStep]) {
    let cancel = tokio_util::sync::CancellationToken::new();
    for s in streamed {
        // A layer already gone (a redo found the stream finished and its layer unlinked) is
        // not pointed back at: the image holds its data, and would name a missing file.
        if !matches!(tokio::fs::try_exists(&s.lower).await, Ok(true)) {
            continue;
        }
        if let Err(undo) = image::set_backing(&s.upper, &s.lower, &s.lower_format, &cancel).await {
            warn!(error = %undo, image = %s.upper.display(), "could not point a streamed image back");
        }
    }
}

/// An interrupted commit may be redone offline only while the upper layer is still what
/// the disk's chain runs through: once QEMU had switched the disk to the lower image (and
/// the guest may have written there), copying the upper layer down again would undo the
/// guest's writes.
async fn vm_may_commit_offline(vm: &Vm, m: &MergeStep) -> Result<bool> {
    let record = vm.store().record(vm.name()).await?;
    Ok(!record
        .disks
        .iter()
        .any(|d| d.device == m.device && d.image == m.lower))
}

/// After the data moved: headers, names, and the unlink.
async fn finish_step(vm: &Vm, record: &mut VmRecord, m: &MergeStep) -> Result<()> {
    let cancel = vm.cancel();
    // Files whose bytes this step changed (their content as a chain did not): the snapshots
    // that freeze them get new stamps, or a revert would take them for tampered with.
    let mut touched: Vec<PathBuf> = Vec::new();
    if m.kind == MergeKind::Commit {
        // Everything that named C names X: children's headers, manifests, the record.
        for child in &m.upper_children {
            if tokio::fs::symlink_metadata(child).await.is_err() {
                continue;
            }
            let info = image::info(child, cancel).await?;
            if info.full_backing_filename.as_deref() == Some(&m.upper) {
                image::set_backing(child, &m.lower, &m.lower_format, cancel).await?;
            }
            // (QEMU rewrote it itself after a live commit.)
            touched.push(child.clone());
        }
        for mut man in vm.store().manifests(vm.name()).await? {
            let mut changed = false;
            for d in &mut man.snapshot.disks {
                if d.image == m.upper {
                    d.image = m.lower.clone();
                    d.format = m.lower_format.clone();
                    changed = true;
                }
            }
            if changed {
                vm.store().replace_manifest(&man).await?;
            }
        }
        touched.push(m.lower.clone());
        if retarget(record, &m.upper, &m.lower) {
            vm.store().write_record(record).await?;
        }
    } else {
        touched.push(m.upper.clone());
    }
    // What the merge wrote (the data, and headers that no longer name the layer that goes)
    // is made durable before that layer is unlinked: after a power cut the surviving chain
    // must not back onto a file that is gone.
    for f in &touched {
        if tokio::fs::symlink_metadata(f).await.is_ok() {
            image::sync(f).await?;
        }
    }
    restamp(vm, &touched).await?;
    let gone = removed_by(m).to_owned();
    release_if_unused(vm, record, &gone).await;
    let manifests = vm.store().manifests(vm.name()).await?;
    let (graph, live) = view(vm, record, &manifests).await?;
    refs::safe_unlink(&gone, &graph, record, live.as_ref()).await?;
    forget_owned(vm, record, &gone).await
}

/// New stamps for the snapshots that freeze any of `files`. A stamp that cannot be read is an
/// error (the journal then keeps the round, and a repair restamps): a snapshot must never be
/// left without its tamper check, nor with one its own merge made false.
async fn restamp(vm: &Vm, files: &[PathBuf]) -> Result<()> {
    for mut man in vm.store().manifests(vm.name()).await? {
        let mut changed = false;
        for d in &mut man.snapshot.disks {
            if files.contains(&d.image) {
                failpoint::hit("delete.restamp", None).await?;
                let now = Some(image::stamp_durable(&d.image).await?);
                if d.frozen != now {
                    d.frozen = now;
                    changed = true;
                }
            }
        }
        if changed {
            vm.store().replace_manifest(&man).await?;
        }
    }
    Ok(())
}

/// A running QEMU may still hold nodes for an image that left every chain (an overlay added
/// with `blockdev-add`, a `-blockdev` of the command line, or an interrupted run that did not
/// get to release them): they go before the file does.
async fn release_if_unused(vm: &Vm, record: &VmRecord, image: &Path) {
    let Ok(qmp) = vm.connect_quick(record).await else {
        return;
    };
    let Ok(live) = Live::read(&qmp).await else {
        return;
    };
    let in_chain = live
        .disks
        .iter()
        .filter_map(|d| d.medium.as_ref())
        .any(|m| m.chain.iter().any(|l| l.image == image));
    if !in_chain && live.has_open(image) {
        release_nodes(&qmp, &live, image).await;
    }
}

/// Points the record's disks at `to` where they named `from`. True if something changed.
fn retarget(record: &mut VmRecord, from: &Path, to: &Path) -> bool {
    let mut changed = false;
    for d in &mut record.disks {
        if d.image == from {
            d.image = to.to_owned();
            d.owned = record.owned_images.iter().any(|o| o == to);
            changed = true;
        }
    }
    changed
}

/// Drops an unlinked image from the record's owned images.
async fn forget_owned(vm: &Vm, record: &mut VmRecord, image: &Path) -> Result<()> {
    let before = record.owned_images.len();
    record.owned_images.retain(|o| o != image);
    if record.owned_images.len() != before {
        vm.store().write_record(record).await?;
    }
    Ok(())
}
