//! Creating a snapshot, as typed phases:
//!
//! 1. [`preflight`] reads everything and changes nothing → a [`Planned`] create, whose
//!    [`Planned::intent`] is what a journal must hold before anything changes;
//! 2. [`Planned::take`] runs the steps, each recording its undo in a [`Rollback`] before it
//!    runs; on failure the undos run (asking QEMU what actually happened);
//! 3. the **point of no return**: once QEMU's part is done (disks switched, memory sealed),
//!    the snapshot exists. Nothing after it undoes anything; a later problem is reported as
//!    "snapshot taken, but …" by the caller, who records the snapshot first.
//!
//! Three modes share the preparation (memory file + fdset, overlay files + nodes, migration
//! settings) and differ in how memory and disks meet at one instant: `point_in_time.rs`,
//! `precopy.rs`, `disk_only.rs`. `preflight.rs` and `settings.rs` hold the rest.

mod disk_only;
pub(crate) use disk_only::thaw_guest;
mod point_in_time;
mod precopy;
mod preflight;
mod settings;

use crate::error::{CreateError, Error, Result};
use crate::failpoint;
use crate::image;
use crate::qemu::MigrateInfo;
use crate::snapshot::memfile;
use crate::snapshot::rollback::{Rollback, Undo};
use crate::snapshot::save::{ProgressFn, Watch};
use crate::snapshot::transport;
use crate::store::{
    CreateIntent, CreateReport, LivePhase, MemoryImage, Mode, PlannedOverlay, SavedSettings,
    SkippedDisk, SnapshotDisk,
};
use crate::SnapshotName;
use qsnap_qmp::{types, Qmp};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What to snapshot and where.
#[derive(Clone)]
pub struct CreateOptions {
    /// The snapshot's name.
    pub name: SnapshotName,
    /// Directory for the memory file (created 0700).
    pub dir: PathBuf,
    /// Where overlays go (default: next to each image). An absolute path: a relative one is
    /// refused ([`crate::Error::UnusableDirectory`]), since QEMU would resolve it against its
    /// own working directory and the store records paths that must work from anywhere.
    pub overlay_dir: Option<PathBuf>,
    /// Overlay file names start with these stems, by device (default: the current image's
    /// stem). The store passes each disk's original image stem, so names do not grow along
    /// the chain: `disk.s1.qcow2`, `disk.s2.qcow2`, …
    pub overlay_stems: BTreeMap<String, String>,
    /// `None` picks the best memory mode this QEMU and host support (point-in-time, else
    /// precopy).
    pub mode: Option<Mode>,
    /// Upper bound for the whole memory save.
    pub save_timeout: Duration,
    /// Precopy: how long the guest may run while memory is copied before qsnap pauses it so
    /// the save finishes.
    pub live_limit: Duration,
    /// Progress while memory is saved.
    pub progress: Option<ProgressFn>,
    /// Cancels the create (e.g. Ctrl-C): the save is cancelled and everything rolled back.
    pub cancel: CancellationToken,
    /// Disk-only: freeze the guest's filesystems through the guest agent at this socket
    /// while the disks switch (always thawed after).
    pub quiesce: Option<PathBuf>,
    /// Precopy: save in QEMU's `mapped-ram` format with `multifd` threads when QEMU has them
    /// (≥ 9.0; default on). Each RAM page has a fixed place in the file, zero pages are
    /// holes, and several threads write and later load it. Such a snapshot needs a QEMU with
    /// `mapped-ram` to be reverted. Point-in-time saves never use it (QEMU 10.0 writes a
    /// `background-snapshot` + `mapped-ram` file it cannot load).
    pub mapped_ram: bool,
    /// A line saying what the snapshot is for, kept in its manifest (at most
    /// 1024 characters, no control characters).
    pub description: Option<String>,
    /// The name was made up (no name given): when it is taken, the first free one of
    /// `NAME-2`, `NAME-3`, … is used instead of refusing.
    pub unique_name: bool,
}

impl CreateOptions {
    /// Options with defaults: auto mode, overlays next to their images, a 10-minute save
    /// limit, a 30-second precopy live phase.
    pub fn new(name: SnapshotName, dir: impl Into<PathBuf>) -> CreateOptions {
        CreateOptions {
            name,
            dir: dir.into(),
            overlay_dir: None,
            overlay_stems: BTreeMap::new(),
            mode: None,
            save_timeout: Duration::from_secs(600),
            live_limit: Duration::from_secs(30),
            progress: None,
            cancel: CancellationToken::new(),
            quiesce: None,
            mapped_ram: true,
            description: None,
            unique_name: false,
        }
    }
}

impl std::fmt::Debug for CreateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateOptions")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("overlay_dir", &self.overlay_dir)
            .field("mode", &self.mode)
            .field("save_timeout", &self.save_timeout)
            .field("live_limit", &self.live_limit)
            .field("quiesce", &self.quiesce)
            .field("mapped_ram", &self.mapped_ram)
            .finish_non_exhaustive()
    }
}

/// What preflight found; nothing has changed yet.
struct Plan {
    was_running: bool,
    /// `None` for disk-only; else the preferred memory mode (auto may still fall back).
    memory: Option<(Mode, PathBuf)>,
    auto: bool,
    /// QEMU < 9.0: its background-snapshot thread resumes the guest by itself.
    auto_resumes: bool,
    /// QEMU takes `file:` URIs (else a pipe carries the stream).
    file_uri: bool,
    /// A precopy save may use `mapped-ram` + `multifd` (asked for, and QEMU has them).
    mapped_ram: bool,
    disks: Vec<SnapshotDisk>,
    skipped: Vec<SkippedDisk>,
    /// The migration settings as they are (memory snapshots only).
    saved: Option<SavedSettings>,
}

/// A create that passed preflight and has changed nothing yet.
pub struct Planned<'q> {
    qmp: &'q Qmp,
    opts: &'q CreateOptions,
    plan: Plan,
    started: Instant,
}

/// Checks that the snapshot can be taken, changing nothing.
pub async fn preflight<'q>(qmp: &'q Qmp, opts: &'q CreateOptions) -> Result<Planned<'q>> {
    let started = Instant::now();
    let plan = preflight::preflight(qmp, opts).await?;
    Ok(Planned {
        qmp,
        opts,
        plan,
        started,
    })
}

/// Takes a snapshot of the VM behind `qmp`: memory (unless disk-only) and every writable disk.
pub async fn create(qmp: &Qmp, opts: &CreateOptions) -> Result<CreateReport> {
    preflight(qmp, opts).await?.take().await
}

impl Planned<'_> {
    /// What a journal must know before the first change: every file and node this create
    /// may make, and the settings to put back.
    pub fn intent(&self) -> CreateIntent {
        CreateIntent {
            snapshot: self.opts.name.to_string(),
            memory_file: self.plan.memory.as_ref().map(|(_, p)| p.clone()),
            overlays: planned_overlays(&self.plan.disks),
            was_running: self.plan.was_running,
            qemu_pid: self.qmp.peer_pid(),
            settings: self.plan.saved.clone(),
            quiesce: self.opts.quiesce.clone(),
            committed: None,
            offline: false,
        }
    }

    /// Runs the steps. On failure everything that happened is undone, except that disks
    /// which cannot be merged back stay on their overlays — the error names them
    /// ([`Error::kept_overlays`]).
    pub async fn take(self) -> Result<CreateReport> {
        let Planned {
            qmp,
            opts,
            plan,
            started,
        } = self;
        let mut rb = Rollback::new(qmp);
        match run_steps(qmp, opts, &plan, &mut rb).await {
            Ok(mut report) => {
                // The point of no return: the snapshot exists. Nothing below undoes it.
                for problem in rb.finish().await {
                    warn!(%problem, "could not restore a migration setting after the snapshot");
                }
                for d in &mut report.disks {
                    let stamped = match failpoint::hit("create.stamp", None).await {
                        Ok(()) => image::stamp_durable(&d.image).await,
                        Err(e) => Err(e),
                    };
                    match stamped {
                        Ok(s) => d.frozen = Some(s),
                        // Past the point of no return: the snapshot stands without a stamp,
                        // and `qsnap check` reports it until `--repair` stamps it.
                        Err(e) => {
                            warn!(error = %e, image = %d.image.display(), "cannot stamp a frozen image; `qsnap check --repair` stamps it")
                        }
                    }
                }
                report.skipped = plan.skipped;
                report.total_ms = ms(started.elapsed());
                info!(name = %opts.name, mode = %report.mode, pause_ms = report.pause_ms, "snapshot created");
                Ok(report)
            }
            Err(e) => {
                warn!(error = %e, "snapshot failed; rolling back");
                let out = rb.run().await;
                let e = if qmp.is_connected() {
                    e
                } else {
                    CreateError::QemuExited {
                        cause: Box::new(e),
                        kept_overlays: out.kept.clone(),
                    }
                    .into()
                };
                if out.problems.is_empty() {
                    Err(e)
                } else {
                    let kept = if matches!(e, Error::Create(CreateError::QemuExited { .. })) {
                        Vec::new()
                    } else {
                        out.kept
                    };
                    Err(CreateError::RollbackIncomplete {
                        cause: Box::new(e),
                        problems: out.problems,
                        kept_overlays: kept,
                    }
                    .into())
                }
            }
        }
    }
}

/// The overlays a create makes, as its journal and its rollback know them.
fn planned_overlays(disks: &[SnapshotDisk]) -> Vec<PlannedOverlay> {
    disks
        .iter()
        .map(|d| PlannedOverlay {
            device: d.device.clone(),
            image: d.image.clone(),
            node: d.node.clone(),
            overlay: d.overlay.clone(),
            overlay_node: d.overlay_node.clone(),
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run_steps(
    qmp: &Qmp,
    opts: &CreateOptions,
    plan: &Plan,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
    let pid = qmp.peer_pid();
    let cancelled = || {
        if opts.cancel.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    };
    // Memory file first, handed to QEMU as an fd: QEMU needs no path access to the store.
    let memory = match &plan.memory {
        None => None,
        Some((mode, path)) => {
            let file = memfile::create(opts.dir.clone(), path.clone()).await?;
            rb.push(Undo::RemoveFile(path.clone()));
            let (uri, stream) = transport::open_save(qmp, &file, plan.file_uri, rb).await?;
            Some((*mode, path.clone(), file, uri, stream))
        }
    };
    rb.push(Undo::Overlays {
        disks: planned_overlays(&plan.disks),
        created: Vec::new(),
        switch_sent: false,
    });
    for d in &plan.disks {
        cancelled()?;
        crate::snapshot::disks::create_overlay_file(d, &opts.cancel).await?;
        rb.overlay_created(d.overlay.clone());
        crate::snapshot::disks::add_overlay_node(qmp, d).await?;
    }
    cancelled()?;

    let Some((mode, path, file, uri, stream)) = memory else {
        failpoint::hit("create.prepared", pid).await?;
        let switched = disk_only::run(qmp, plan, opts.quiesce.as_deref(), rb).await?;
        failpoint::hit("create.resumed", pid).await?;
        return Ok(CreateReport {
            mode: Mode::DiskOnly,
            was_running: plan.was_running,
            memory: None,
            disks: plan.disks.clone(),
            skipped: Vec::new(),
            pause_ms: 0.0,
            qemu_downtime_ms: None,
            live_phase: None,
            quiesced_filesystems: switched.frozen,
            total_ms: 0.0,
            thaw_failed: switched.thaw_failed,
            fell_back: None,
        });
    };
    let saved = plan
        .saved
        .as_ref()
        .expect("preflight reads the settings of a memory snapshot");
    let (mode, capabilities, fell_back) =
        settings::set_capabilities(qmp, saved, mode, plan, rb).await?;
    settings::raise_bandwidth(qmp, saved).await?;
    cancelled()?;
    failpoint::hit("create.prepared", pid).await?;

    let watch = Watch {
        started: Instant::now(),
        timeout: opts.save_timeout,
        progress: opts.progress.as_ref(),
        cancel: &opts.cancel,
    };
    let mut report = match mode {
        Mode::PointInTime => point_in_time::run(qmp, plan, &uri, &watch, rb).await?,
        Mode::Precopy => precopy::run(qmp, plan, &uri, &watch, opts.live_limit, rb).await?,
        Mode::DiskOnly => unreachable!("disk-only returned above"),
    };
    stream.finish(&path).await?;
    let sealed = memfile::seal(file, path.clone()).await?;
    report.fell_back = fell_back;
    if let Some(m) = &mut report.memory {
        m.file = path;
        m.bytes = sealed.stream_len;
        m.capabilities = capabilities;
        m.checksum = Some(sealed.checksum);
    }
    failpoint::hit("create.saved", pid).await?;
    Ok(report)
}

fn memory_report(
    mode: Mode,
    plan: &Plan,
    done: &MigrateInfo,
    pause: Duration,
    live: Option<LivePhase>,
) -> CreateReport {
    CreateReport {
        mode,
        was_running: plan.was_running,
        memory: Some(MemoryImage {
            file: PathBuf::new(),
            bytes: 0,
            ram_bytes: done.ram.as_ref().map(|r| r.total).unwrap_or(0),
            capabilities: Vec::new(),
            checksum: None,
            lazy: None,
        }),
        disks: plan.disks.clone(),
        skipped: Vec::new(),
        pause_ms: ms(pause),
        qemu_downtime_ms: done.downtime,
        live_phase: live,
        quiesced_filesystems: None,
        total_ms: 0.0,
        thaw_failed: None,
        fell_back: None,
    }
}

async fn start_save(qmp: &Qmp, uri: &str, rb: &mut Rollback<'_>) -> Result<()> {
    qmp.execute(types::migrate {
        uri: Some(uri.to_owned()),
        channels: None,
        detach: None,
        resume: None,
    })
    .await
    .map_err(Error::qmp("starting the memory save"))?;
    // A started migration owns the named fd.
    rb.forget(|u| matches!(u, Undo::CloseFd(_)));
    Ok(())
}
