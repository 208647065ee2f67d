//! Live merges: the steps of a round whose layers are in the running QEMU's chains, as block
//! jobs that finalize together. Must never let the guest run on an image the record does not
//! name, nor resume a guest someone else paused.

use crate::blocks;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::snapshot::jobs::{self, LiveMerge, Points};
use crate::store::{DeleteIntent, Intent, MergeKind, MergeStep, VmRecord};
use crate::vm::refs::Live;
use crate::vm::Vm;
use qsnap_qmp::{types, Qmp};
use std::path::{Path, PathBuf};
use tracing::warn;

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
///
/// Returns QEMU's nodes as the look just before the jobs named them (`None` if no job ran):
/// what the layers that left the chains are opened by, for their release.
pub(super) async fn merge_live(
    vm: &Vm,
    record: &mut VmRecord,
    intent: &mut DeleteIntent,
    steps: &[MergeStep],
    redo: bool,
    planned: Option<Live>,
    report: &(dyn Fn(f64) + Send + Sync),
) -> Result<Option<Vec<blocks::Node>>> {
    let qmp = vm.connect().await?;
    // A redo reads chains alone (`query-block`) until it needs nodes: listing nodes can be
    // refused (`jobs::list_nodes_of`: a stream job a killed run left), and a refusal must not
    // strand a guest paused for a switch. A first run pauses nothing before its jobs start,
    // so it reads everything now, once (each look costs QEMU ≈ 35 ms with a hundred layers),
    // or takes the look the round was planned from if QEMU's block graph kept its shape.
    let mut first_look = match (redo, planned) {
        (true, _) => None,
        (false, Some(planned)) => Some(Live::refresh(&qmp, planned).await?),
        (false, None) => Some(Live::read(&qmp).await?),
    };
    let disks = match &first_look {
        Some(live) => live.disks.clone(),
        None => blocks::read(&qmp).await?,
    };
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
            follow_qemu(vm, record, &qmp, &guard, None)
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
    let mut before_jobs = None;
    if !todo.is_empty() {
        // (Without a redo nothing ran in QEMU since the first look: no job, no pause.)
        let live = match first_look.take() {
            Some(live) => live,
            None => Live::read(&qmp).await?,
        };
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
        follow_qemu(vm, record, &qmp, &guard, Some(&live))
            .await
            .map_err(|e| guard.left_paused(e))?;
        guard.resume(&qmp).await?;
        finalized?;
        before_jobs = Some(live.nodes);
    }
    if pauses {
        intent.guest_was_running = None;
        vm.store()
            .write_journal(vm.name(), &Intent::Delete(intent.clone()))
            .await?;
    }
    // Nodes that opened the merged-away image are released by `finish_step`.
    Ok(before_jobs)
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
            // A `stop` that timed out (or whose answer could not be read) may have run: QEMU's
            // run state says.
            Err(e) if e.may_have_run() => match qmp.execute(types::query_status {}).await {
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
/// `before`: the look just before the jobs, whose node names let the block graph tell each
/// disk's top (the guest is paused meanwhile; see [`blocks::tops_from_graph`]); without it,
/// or where the graph does not tell, the chains are read. If the record cannot be written,
/// the guest is left paused (see [`merge_live`]).
async fn follow_qemu(
    vm: &Vm,
    record: &mut VmRecord,
    qmp: &Qmp,
    guard: &Pause,
    before: Option<&Live>,
) -> Result<()> {
    if guard.on {
        failpoint::hit("delete.chains-read", qmp.peer_pid()).await?;
    }
    let told = match before {
        // (A job someone else left ended makes the graph not tell: the chains then do.)
        Some(l) => jobs::tops_of(qmp, &l.disks, &l.nodes).await.ok().flatten(),
        None => None,
    };
    let read = || async { Ok::<_, Error>(disk_tops(&blocks::read(qmp).await?)) };
    // Test builds insist that what the graph told is what the chains say.
    #[cfg(feature = "testing")]
    if let Some(told) = &told {
        let mut told = told.clone();
        let mut chains = read().await?;
        told.sort();
        chains.sort();
        assert_eq!(
            told, chains,
            "the tops the block graph told are not QEMU's chains"
        );
    }
    let tops = match told {
        Some(tops) => tops,
        None => read().await?,
    };
    if follow_tops(record, &tops) {
        vm.store().write_record(record).await?;
    }
    Ok(())
}

/// The record's disks set to QEMU's tops (`disks` as [`blocks::read`] gives them); true if
/// something changed.
pub(crate) fn follow_live(record: &mut VmRecord, disks: &[blocks::Disk]) -> bool {
    follow_tops(record, &disk_tops(disks))
}

/// Each disk with a medium, and the image it writes to: `(device, top image)`.
fn disk_tops(disks: &[blocks::Disk]) -> Vec<(String, PathBuf)> {
    disks
        .iter()
        .filter_map(|d| Some((d.device.clone(), d.top()?.to_owned())))
        .collect()
}

/// The record's disks set to `tops` (`(device, top image)`); true if something changed.
fn follow_tops(record: &mut VmRecord, tops: &[(String, PathBuf)]) -> bool {
    let mut changed = false;
    for d in &mut record.disks {
        if let Some((_, top)) = tops.iter().find(|(device, _)| *device == d.device) {
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
            .ok_or_else(|| {
                Error::from(crate::error::DeleteError::Refused {
                    snapshot: m.lower.display().to_string(),
                    why: format!("QEMU has no node for {} in disk {}", p.display(), m.device),
                })
            })
    };
    let disk = live
        .disks
        .iter()
        .find(|d| d.device == m.device)
        .and_then(|d| d.medium.as_ref())
        .ok_or_else(|| {
            Error::from(crate::error::DeleteError::Refused {
                snapshot: m.lower.display().to_string(),
                why: format!("QEMU has no disk {}", m.device),
            })
        })?;
    let root = disk.node.clone().ok_or_else(|| {
        Error::from(crate::error::DeleteError::Refused {
            snapshot: m.lower.display().to_string(),
            why: format!("QEMU names no node for disk {}", m.device),
        })
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

/// Releases `nodes` (format nodes before the protocol nodes under them), as far as QEMU lets.
pub(super) async fn release_nodes(qmp: &Qmp, nodes: &[&blocks::Node]) {
    let mut nodes = nodes.to_vec();
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
