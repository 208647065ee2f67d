//! Live merges: QEMU block jobs (`block-commit`, `block-stream`) run in the VM's own QEMU,
//! several at once (one per disk), finishing together or not at all.
//!
//! Every job starts with `auto-finalize: false` and `auto-dismiss: false`. An active commit
//! is completed (`job-complete`) once ready; then the runner waits until every job is
//! `pending` — its data copied, the graph not yet changed — and only then finalizes them all.
//! A failure or a cancel before that point cancels every job: no disk's chain changes. (QEMU
//! has no transaction for these jobs, so a finalize itself could still fail on its own; the
//! caller reads the chains back afterwards.) Nothing waits without a deadline.

use crate::blocks;
use crate::error::{Error, Result};
use crate::qemu::{BlockCommit, BlockStream, JobInfo, QueryJobs};
use qsnap_qmp::{types, Qmp};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How a delete's merge jobs are named (`qsnap-merge-<pid>-<n>`): how [`list_nodes_of`] tells
/// the ended stream jobs a killed qsnap left from anyone else's.
pub(crate) const MERGE_JOB_PREFIX: &str = "qsnap-merge-";

/// Every named block node (format and protocol nodes alike), asked for safely and listed in
/// full (see [`list_nodes_of`], which the engine itself uses).
#[cfg(any(test, feature = "testing"))]
pub async fn list_nodes(qmp: &Qmp) -> Result<Vec<blocks::Node>> {
    dismiss_ended_streams(qmp).await?;
    blocks::nodes_unguarded(qmp).await
}

/// Every named block node, asked for safely (see below): told from QEMU's block graph when
/// the chains of `disks` (just read by [`blocks::read`]) explain every node in it, which
/// costs a tenth of the full listing on a long chain; listed in full otherwise
/// ([`blocks::nodes_from_graph`]: the same nodes, in another order).
///
/// QEMU (10.0.2, checked here) dies of a NULL pointer (SIGSEGV in `bdrv_refresh_filename`)
/// when `query-named-block-nodes` meets the filter node of a `block-stream` job that has
/// concluded — finished or cancelled — but is not dismissed: the filter has lost its child,
/// yet the job still holds it in the node list. A commit job in that state does no harm. So
/// such jobs are looked for first: one of qsnap's (`qsnap-merge-…`) is dismissed, as its
/// outcome is in the chains every caller reads next; anyone else's is refused, since
/// dismissing it would take its outcome from its owner.
pub async fn list_nodes_of(qmp: &Qmp, disks: &[blocks::Disk]) -> Result<Vec<blocks::Node>> {
    Ok(list_nodes_shaped(qmp, disks).await?.0)
}

/// [`list_nodes_of`], and the shape of the block graph it read (see [`blocks::Shape`]).
pub(crate) async fn list_nodes_shaped(
    qmp: &Qmp,
    disks: &[blocks::Disk],
) -> Result<(Vec<blocks::Node>, Option<blocks::Shape>)> {
    dismiss_ended_streams(qmp).await?;
    match blocks::nodes_and_shape(qmp, disks).await {
        (Some(nodes), shape) => Ok((nodes, shape)),
        (None, shape) => Ok((blocks::nodes_unguarded(qmp).await?, shape)),
    }
}

/// The shape of QEMU's block graph now, asked for safely (see [`blocks::Shape`]).
pub(crate) async fn graph_shape(qmp: &Qmp) -> Result<Option<blocks::Shape>> {
    dismiss_ended_streams(qmp).await?;
    Ok(blocks::shape(qmp).await)
}

/// Which of `held` (nodes an earlier look named) QEMU holds loose now, asked for safely
/// ([`blocks::loose_among`]; `None`: the graph could not be read).
pub(crate) async fn loose_nodes_of(
    qmp: &Qmp,
    held: &[blocks::Node],
) -> Result<Option<Vec<blocks::Node>>> {
    dismiss_ended_streams(qmp).await?;
    Ok(blocks::loose_among(qmp, held).await)
}

/// The image each disk writes to now, told from QEMU's block graph and an earlier look's
/// `disks` and `nodes` ([`blocks::tops_from_graph`]; `None`: the graph does not tell).
pub(crate) async fn tops_of(
    qmp: &Qmp,
    disks: &[blocks::Disk],
    nodes: &[blocks::Node],
) -> Result<Option<Vec<(String, std::path::PathBuf)>>> {
    dismiss_ended_streams(qmp).await?;
    Ok(blocks::tops_from_graph(qmp, disks, nodes).await)
}

/// How long a merge may take in all (a guard against a job that never ends, not a target).
const LIMIT: Duration = Duration::from_secs(6 * 3600);
/// How often job states and progress are read.
const POLL: Duration = Duration::from_millis(100);

/// One job to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveMerge {
    /// Our job id.
    pub job: String,
    what: What,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    /// The active layer `root` into `base` (then pivot).
    ActiveCommit { root: String, base: String },
    /// The layer `top` (below the active one of disk `root`) into `base`.
    Commit {
        root: String,
        top: String,
        base: String,
    },
    /// Everything between `node` and `base` into `node`.
    Stream { node: String, base: Option<String> },
}

impl LiveMerge {
    /// The disk's active layer (root node `root`) is committed into `base` and the disk
    /// pivots to it.
    pub(crate) fn active_commit(job: &str, root: &str, base: &str) -> LiveMerge {
        LiveMerge {
            job: job.into(),
            what: What::ActiveCommit {
                root: root.into(),
                base: base.into(),
            },
        }
    }

    /// Layer `top` of the disk whose root node is `root` is committed into `base`; the layer
    /// above `top` backs onto `base` afterwards.
    pub(crate) fn commit(job: &str, root: &str, top: &str, base: &str) -> LiveMerge {
        LiveMerge {
            job: job.into(),
            what: What::Commit {
                root: root.into(),
                top: top.into(),
                base: base.into(),
            },
        }
    }

    /// The layers between `node` and `base` are copied into `node`, which then backs onto
    /// `base`.
    pub(crate) fn stream(job: &str, node: &str, base: Option<&str>) -> LiveMerge {
        LiveMerge {
            job: job.into(),
            what: What::Stream {
                node: node.into(),
                base: base.map(str::to_owned),
            },
        }
    }

    async fn start(&self, qmp: &Qmp) -> Result<()> {
        let r = match &self.what {
            What::ActiveCommit { root, base } => {
                qmp.execute(BlockCommit {
                    job_id: self.job.clone(),
                    device: root.clone(),
                    top_node: None,
                    base_node: base.clone(),
                    auto_finalize: Some(false),
                    auto_dismiss: Some(false),
                })
                .await
            }
            What::Commit { root, top, base } => {
                qmp.execute(BlockCommit {
                    job_id: self.job.clone(),
                    device: root.clone(),
                    top_node: Some(top.clone()),
                    base_node: base.clone(),
                    auto_finalize: Some(false),
                    auto_dismiss: Some(false),
                })
                .await
            }
            What::Stream { node, base } => {
                qmp.execute(BlockStream {
                    job_id: self.job.clone(),
                    device: node.clone(),
                    base_node: base.clone(),
                    auto_finalize: false,
                    auto_dismiss: false,
                })
                .await
            }
        };
        r.map(drop).map_err(Error::qmp("starting a merge job"))
    }
}

/// Which failpoints a run passes (delete's; a create's rollback passes none).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Points {
    /// Named points on.
    pub on: bool,
}

/// Runs `merges` to the end, all finalizing together, or none. `progress` gets the fraction
/// done (0–1).
pub(crate) async fn run_all(
    qmp: &Qmp,
    merges: &[LiveMerge],
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<()> {
    let pending = run_to_pending(qmp, merges, cancel, progress, Points::default()).await?;
    finalize(qmp, &pending, Points::default()).await
}

/// Jobs whose data is copied and which wait, all of them, for [`finalize`]. Dropping this
/// without finalizing leaves them waiting in QEMU (the guest's I/O on those disks waits with
/// them): finalize or [`abandon`] them promptly.
#[must_use]
pub(crate) struct Pending {
    merges: Vec<LiveMerge>,
}

/// Starts every job and waits until all are `pending` (data copied, no chain changed yet).
/// A failure or a cancel before that cancels them all: nothing changes.
pub(crate) async fn run_to_pending(
    qmp: &Qmp,
    merges: &[LiveMerge],
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
    points: Points,
) -> Result<Pending> {
    let pid = qmp.peer_pid();
    let mut started: Vec<&LiveMerge> = Vec::new();
    for m in merges {
        let r = match m.start(qmp).await {
            Ok(()) if points.on => crate::failpoint::hit("delete.job-sent", pid).await,
            other => other,
        };
        if let Err(e) = r {
            // A start that timed out may have made the job: it is cancelled with the others.
            started.push(m);
            if qmp.is_connected() {
                abandon(qmp, &started).await;
            }
            return Err(e);
        }
        started.push(m);
    }
    let outcome = async {
        if points.on {
            crate::failpoint::hit("delete.merge-started", pid).await?;
        }
        to_pending(qmp, merges, cancel, progress).await?;
        if points.on {
            crate::failpoint::hit("delete.merge-ready", pid).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        if qmp.is_connected() {
            abandon(qmp, &started).await;
        }
        return Err(e);
    }
    Ok(Pending {
        merges: merges.to_vec(),
    })
}

fn ours<'a>(all: &'a [JobInfo], merges: &[LiveMerge]) -> BTreeMap<String, &'a JobInfo> {
    all.iter()
        .filter(|j| merges.iter().any(|m| m.job == j.id))
        .map(|j| (j.id.clone(), j))
        .collect()
}

async fn jobs(qmp: &Qmp) -> Result<Vec<JobInfo>> {
    qmp.execute(QueryJobs {})
        .await
        .map_err(Error::qmp("reading the merge jobs"))
}

async fn to_pending(
    qmp: &Qmp,
    merges: &[LiveMerge],
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<()> {
    let started = Instant::now();
    let mut completed: Vec<String> = Vec::new();
    let mut events = qmp.events();
    loop {
        let all = jobs(qmp).await?;
        let mine = ours(&all, merges);
        if let Some(m) = merges.iter().find(|m| !mine.contains_key(&m.job)) {
            return Err(Error::BlockJob {
                job: m.job.clone(),
                desc: "the job disappeared (dismissed by someone else?)".into(),
            });
        }
        let (done, total) = mine.values().fold((0u64, 0u64), |(d, t), j| {
            (d + j.current_progress, t + j.total_progress.max(1))
        });
        #[allow(clippy::cast_precision_loss)]
        progress((done as f64 / total as f64).min(1.0));
        for j in mine.values() {
            if let Some(err) = &j.error {
                return Err(Error::BlockJob {
                    job: j.id.clone(),
                    desc: err.clone(),
                });
            }
            if matches!(j.status.as_str(), "aborting" | "concluded" | "null") {
                return Err(Error::BlockJob {
                    job: j.id.clone(),
                    desc: format!("it ended early ({})", j.status),
                });
            }
        }
        // An active commit that has caught up is completed (it then goes pending, with the
        // disk's I/O drained until the finalize) only once every other job is as far: a
        // disk must not wait with its I/O held while another disk's data is still copying.
        let all_caught_up = mine
            .values()
            .all(|j| matches!(j.status.as_str(), "ready" | "pending"));
        if all_caught_up {
            for j in mine.values() {
                if j.status == "ready" && !completed.contains(&j.id) {
                    let sent = match qmp.execute(types::job_complete { id: j.id.clone() }).await {
                        Ok(_) => {
                            crate::failpoint::hit("delete.complete-sent", qmp.peer_pid()).await
                        }
                        Err(e) => Err(Error::qmp("completing an active merge")(e)),
                    };
                    match sent {
                        Ok(()) => completed.push(j.id.clone()),
                        // It may have run: the job's state says so at the next look (still
                        // `ready`: completed again).
                        Err(e) if e.may_have_run() => {
                            warn!(job = %j.id, error = %e, "completing a merge got no answer to go by; looking again");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if mine.values().all(|j| j.status == "pending") {
            progress(1.0);
            return Ok(());
        }
        if started.elapsed() > LIMIT {
            return Err(Error::BlockJob {
                job: merges[0].job.clone(),
                desc: format!("not done within {LIMIT:?}"),
            });
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(Error::Cancelled),
            _ = events.wait_for("a job state change", POLL, |e| e.name == "JOB_STATUS_CHANGE") => {}
        }
    }
}

impl Pending {
    /// Gives up on jobs that are pending: each is cancelled (no chain changes, the drained
    /// disks get their I/O back).
    pub(crate) async fn abandon(self, qmp: &Qmp) {
        let refs: Vec<&LiveMerge> = self.merges.iter().collect();
        abandon(qmp, &refs).await;
    }
}

/// Finalizes pending jobs (each changes its disk's chain now), waits until they conclude and
/// dismisses them.
///
/// QEMU has no transaction for this, so one finalize can fail while others worked. A job
/// left `pending` keeps its disk's I/O drained, and the guest would hang on that disk once
/// resumed: every job is finalized (a failure does not stop the others), and one whose
/// finalize failed and which is still pending is cancelled (its chain does not change) —
/// at once when QEMU refused, after a grace period when the answer timed out or could not
/// be read (it may have run). Whatever happened, no job of `pending` is left pending when this returns; the
/// caller reads the chains back.
pub(crate) async fn finalize(qmp: &Qmp, pending: &Pending, points: Points) -> Result<()> {
    let merges = &pending.merges;
    if merges.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let mut events = qmp.events();
    let mut failure: Option<Error> = None;
    // Jobs whose finalize failed: when, and whether QEMU may have run it all the same.
    let mut unsure: BTreeMap<String, (Instant, Error)> = BTreeMap::new();
    for m in merges {
        let sent = async {
            if points.on {
                crate::failpoint::hit("delete.finalize", qmp.peer_pid()).await?;
            }
            qmp.execute(types::job_finalize { id: m.job.clone() })
                .await
                .map_err(Error::qmp("finalizing a merge"))?;
            if points.on {
                crate::failpoint::hit("delete.finalize-sent", qmp.peer_pid()).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = sent {
            if !qmp.is_connected() {
                return Err(e);
            }
            warn!(job = %m.job, error = %e, "a merge did not finalize");
            unsure.insert(m.job.clone(), (Instant::now(), e));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cancelled: Vec<String> = Vec::new();
    loop {
        let all = jobs(qmp).await?;
        let mine = ours(&all, merges);
        if mine.values().all(|j| j.status == "concluded") {
            if points.on {
                // Ended, not yet dismissed: the state in which QEMU must not be asked for
                // its block nodes (`list_nodes_of`).
                crate::failpoint::hit("delete.concluded", qmp.peer_pid()).await?;
            }
            for j in mine.values() {
                if let Some(err) = &j.error {
                    failure.get_or_insert(Error::BlockJob {
                        job: j.id.clone(),
                        desc: err.clone(),
                    });
                }
                let _ = qmp.execute(types::job_dismiss { id: j.id.clone() }).await;
            }
            break;
        }
        // A job still pending after its finalize failed gives its disk back.
        // (A finalize that timed out, or whose answer could not be read, may have run: its job
        // then concludes by itself, and only its outcome counts.)
        for j in mine.values().filter(|j| j.status == "pending") {
            let Some((when, e)) = unsure.get(&j.id) else {
                continue;
            };
            let grace = if e.may_have_run() {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            };
            if when.elapsed() >= grace && !cancelled.contains(&j.id) {
                warn!(job = %j.id, "cancelling a merge left pending by a failed finalize");
                if let Err(e) = qmp.execute(types::job_cancel { id: j.id.clone() }).await {
                    debug!(job = %j.id, error = %e, "cancel");
                }
                cancelled.push(j.id.clone());
                if let Some((_, e)) = unsure.remove(&j.id) {
                    failure.get_or_insert(e);
                }
            }
        }
        if Instant::now() > deadline {
            // Last resort: nothing may stay pending with its disk drained.
            let left: Vec<&LiveMerge> = merges
                .iter()
                .filter(|m| mine.get(&m.job).is_some_and(|j| j.status == "pending"))
                .collect();
            abandon(qmp, &left).await;
            return Err(Error::BlockJob {
                job: merges[0].job.clone(),
                desc: "finalized but not concluded within 60 s".into(),
            });
        }
        let _ = events
            .wait_for("a job state change", POLL, |e| {
                e.name == "JOB_STATUS_CHANGE"
            })
            .await;
    }
    info!(
        jobs = merges.len(),
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "merge jobs finalized"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Cancels (forced: a ready active commit does not pivot) and dismisses jobs, waiting
/// (bounded) until they are gone.
pub(crate) async fn abandon(qmp: &Qmp, started: &[&LiveMerge]) {
    for m in started {
        if let Err(e) = qmp.execute(types::job_cancel { id: m.job.clone() }).await {
            debug!(job = %m.job, error = %e, "cancel");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(all) = jobs(qmp).await else { return };
        let left: Vec<&JobInfo> = all
            .iter()
            .filter(|j| started.iter().any(|m| m.job == j.id))
            .collect();
        if left.is_empty() {
            return;
        }
        for j in left.iter().filter(|j| j.status == "concluded") {
            let _ = qmp.execute(types::job_dismiss { id: j.id.clone() }).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    warn!("merge jobs did not go away within 30 s of being cancelled");
}

/// Whether QEMU has a job with this id.
pub(crate) async fn exists(qmp: &Qmp, id: &str) -> Result<bool> {
    Ok(jobs(qmp).await?.iter().any(|j| j.id == id))
}

/// Drives a job a previous (interrupted) qsnap started to its end: completes it when ready,
/// finalizes it when pending, dismisses it when concluded. Returns `Ok(true)` when it ended
/// well, `Ok(false)` when there was no such job. Cancelling cancels the job (nothing changes).
pub(crate) async fn finish_leftover(
    qmp: &Qmp,
    id: &str,
    cancel: &CancellationToken,
) -> Result<bool> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if cancel.is_cancelled() {
            let m = LiveMerge {
                job: id.into(),
                what: What::Stream {
                    node: String::new(),
                    base: None,
                },
            };
            abandon(qmp, &[&m]).await;
            return Err(Error::Cancelled);
        }
        let all = jobs(qmp).await?;
        let Some(j) = all.iter().find(|j| j.id == id) else {
            return Ok(false);
        };
        match j.status.as_str() {
            "ready" => {
                let _ = qmp.execute(types::job_complete { id: id.into() }).await;
            }
            "pending" => {
                let _ = qmp.execute(types::job_finalize { id: id.into() }).await;
            }
            "concluded" => {
                let err = j.error.clone();
                let _ = qmp.execute(types::job_dismiss { id: id.into() }).await;
                return match err {
                    None => Ok(true),
                    Some(desc) => Err(Error::BlockJob {
                        job: id.into(),
                        desc,
                    }),
                };
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(Error::BlockJob {
                job: id.into(),
                desc: "an interrupted merge did not end".into(),
            });
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Makes `query-named-block-nodes` safe to send (see [`list_nodes_of`]).
async fn dismiss_ended_streams(qmp: &Qmp) -> Result<()> {
    let jobs = qmp
        .execute(QueryJobs {})
        .await
        .map_err(Error::qmp("reading block jobs"))?;
    for j in jobs
        .iter()
        .filter(|j| j.kind == "stream" && j.status == "concluded")
    {
        if !j.id.starts_with(MERGE_JOB_PREFIX) {
            return Err(Error::ForeignJob { job: j.id.clone() });
        }
        match &j.error {
            None => tracing::info!(job = %j.id, "dismissing an ended stream job a qsnap left"),
            // Its chain is as it was; the merge that wanted it is redone from the journal.
            Some(e) => {
                tracing::warn!(job = %j.id, error = %e, "dismissing a failed stream job a qsnap left")
            }
        }
        qmp.execute(types::job_dismiss { id: j.id.clone() })
            .await
            .map_err(Error::qmp("dismissing an ended stream job"))?;
    }
    Ok(())
}
