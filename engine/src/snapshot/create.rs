//! Creating a snapshot: preflight (changes nothing), then explicit steps, each recording its
//! undo in a [`Rollback`].
//!
//! Three modes share the preparation (memory file + fdset, overlay files + nodes, migration
//! settings) and differ in how memory and disks meet at one instant:
//! - **point-in-time**: the guest is frozen (`stop`) before QEMU starts the save and before
//!   the disks switch, and resumed only once QEMU has saved the device state and armed write
//!   protection for RAM; QEMU then writes RAM as it was at `stop` while the guest runs.
//! - **precopy**: the guest runs while QEMU copies RAM; QEMU pauses it to finish (qsnap pauses
//!   it itself if the live phase outlasts its limit), the disks switch while it is paused.
//! - **disk-only**: one `transaction`, no memory (crash-consistent).

use crate::error::{Error, Result};
use crate::guest_agent::GuestAgent;
use crate::qemu::{
    BlockdevSetActive, Capability, MigrateInfo, MigrateSetCapabilities, QueryCpusFast,
    QueryMaxBandwidth, QueryMigrate, QueryMigrateCapabilities, SetMaxBandwidth,
};
use crate::snapshot::disks::{self, DiskPlan, ImageStamp, SkippedDisk};
use crate::snapshot::memfile;
use crate::snapshot::rollback::{Rollback, Undo};
use crate::snapshot::save::{self, ProgressFn, Watch};
use crate::snapshot::transport;
use crate::SnapshotName;
use qsnap_qmp::{types, Qmp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How a snapshot captures the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Memory as it was at the request (background-snapshot); the guest pauses for
    /// milliseconds whatever its dirty rate.
    PointInTime,
    /// Memory as it was at the end of a live copy; the guest pauses while the last dirty
    /// pages are written.
    Precopy,
    /// Disks only (crash-consistent), no memory.
    DiskOnly,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::PointInTime => "point-in-time",
            Mode::Precopy => "precopy",
            Mode::DiskOnly => "disk-only",
        })
    }
}

/// What to snapshot and where.
#[derive(Clone)]
pub struct CreateOptions {
    /// The snapshot's name.
    pub name: SnapshotName,
    /// Directory for the memory file (created 0700).
    pub dir: PathBuf,
    /// Where overlays go (default: next to each image).
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
            .finish_non_exhaustive()
    }
}

/// The memory part of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryImage {
    /// The memory file (qsnap header, then QEMU's stream).
    pub file: PathBuf,
    /// Bytes of QEMU's stream in it.
    pub bytes: u64,
    /// Guest RAM size as QEMU reported it.
    pub ram_bytes: u64,
    /// Migration capabilities that were on for the save (a restore sets the same).
    pub capabilities: Vec<String>,
}

/// Precopy's live phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LivePhase {
    /// How long the guest ran while memory was copied.
    pub live_ms: f64,
    /// Passes over RAM.
    pub passes: u64,
    /// True when the copy did not converge within the limit and qsnap paused the guest.
    pub forced_pause: bool,
}

/// What a successful create did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateReport {
    /// How the VM was captured.
    pub mode: Mode,
    /// Whether the guest was running when the snapshot was taken.
    pub was_running: bool,
    /// The memory image (`None` for disk-only).
    pub memory: Option<MemoryImage>,
    /// Disks switched to overlays (their images are frozen from now on).
    pub disks: Vec<DiskPlan>,
    /// Devices left alone.
    pub skipped: Vec<SkippedDisk>,
    /// How long the guest's vCPUs were stopped, measured by qsnap.
    pub pause_ms: f64,
    /// QEMU's own figure for the stop (`downtime`), when it gives one.
    pub qemu_downtime_ms: Option<u64>,
    /// Precopy's live phase.
    pub live_phase: Option<LivePhase>,
    /// Disk-only with `quiesce`: how many guest filesystems were frozen for the switch.
    #[serde(default)]
    pub quiesced_filesystems: Option<u64>,
    /// Wall time of the whole create.
    pub total_ms: f64,
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
    disks: Vec<DiskPlan>,
    skipped: Vec<SkippedDisk>,
}

/// Takes a snapshot of the VM behind `qmp`: memory (unless disk-only) and every writable disk.
pub async fn create(qmp: &Qmp, opts: &CreateOptions) -> Result<CreateReport> {
    let started = Instant::now();
    let plan = preflight(qmp, opts).await?;
    let mut rb = Rollback::new(qmp);
    let result = run_steps(qmp, opts, &plan, &mut rb).await;
    match result {
        Ok(mut report) => {
            for problem in rb.finish().await {
                warn!(%problem, "could not restore a migration setting after the snapshot");
            }
            for d in &mut report.disks {
                d.frozen = Some(ImageStamp::read(&d.image).await?);
            }
            report.skipped = plan.skipped;
            report.total_ms = ms(started.elapsed());
            info!(name = %opts.name, mode = %report.mode, pause_ms = report.pause_ms, "snapshot created");
            Ok(report)
        }
        Err(e) => {
            warn!(error = %e, "snapshot failed; rolling back");
            let switched = rb.switched_disks();
            let problems = rb.run().await;
            let e = if qmp.is_connected() {
                e
            } else {
                Error::QemuExited {
                    cause: Box::new(e),
                    kept_overlays: switched
                        .into_iter()
                        .map(|d| (d.device, d.overlay))
                        .collect(),
                }
            };
            Err(if problems.is_empty() {
                e
            } else {
                Error::RollbackIncomplete {
                    cause: Box::new(e),
                    problems,
                }
            })
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn preflight(qmp: &Qmp, opts: &CreateOptions) -> Result<Plan> {
    let status = qmp
        .execute(types::query_status {})
        .await
        .map_err(Error::qmp("reading the run state"))?;
    if !matches!(
        status.status,
        types::RunState::running | types::RunState::paused
    ) {
        return Err(Error::BadRunState {
            state: serde_json::to_value(status.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        });
    }
    let disk_only = opts.mode == Some(Mode::DiskOnly);
    if opts.quiesce.is_some() && !disk_only {
        return Err(Error::Unsupported {
            what: "quiescing is for disk-only snapshots: a memory snapshot already holds what the guest has not written, and would save its filesystems frozen".into(),
        });
    }
    let mig = qmp
        .execute(QueryMigrate {})
        .await
        .map_err(Error::qmp("reading the migration state"))?;
    if mig.is_running() {
        return Err(Error::Busy {
            what: format!(
                "a migration is in progress ({})",
                mig.status.unwrap_or_default()
            ),
        });
    }
    if !disk_only {
        if let Some(reasons) = mig.blocked_reasons.filter(|r| !r.is_empty()) {
            let tsc_hz = if reasons.iter().any(|r| r.contains("invtsc")) {
                tsc_frequency(qmp).await
            } else {
                None
            };
            return Err(Error::MigrationBlocked { reasons, tsc_hz });
        }
    }
    let jobs = qmp
        .execute(types::query_jobs {})
        .await
        .map_err(Error::qmp("listing block jobs"))?;
    if let Some(j) = jobs.first() {
        return Err(Error::Busy {
            what: format!("block job {} is running", j.id),
        });
    }
    let auto_resumes = !qmp.greeting().version.qemu.at_least(9, 0);
    let memory = if disk_only {
        None
    } else {
        let mode = memory_mode(qmp, opts.mode, status.running).await?;
        Some((mode, opts.dir.join(format!("{}.mem", opts.name))))
    };
    let file_uri = transport::has_file_uri(qmp).await?;
    let (disks, skipped) = disks::plan(
        qmp,
        &opts.name,
        opts.overlay_dir.as_deref(),
        &opts.overlay_stems,
    )
    .await?;
    if disk_only && disks.is_empty() {
        return Err(Error::DiskNotSnapshottable {
            device: "(all)".into(),
            why: "the VM has no writable disk, so a disk-only snapshot would capture nothing"
                .into(),
        });
    }
    let targets = disks.iter().map(|d| &d.overlay);
    for path in targets.chain(memory.as_ref().map(|(_, p)| p)) {
        if tokio::fs::symlink_metadata(path).await.is_ok() {
            return Err(Error::TargetExists { path: path.clone() });
        }
    }
    Ok(Plan {
        was_running: status.running,
        memory,
        auto: opts.mode.is_none(),
        auto_resumes,
        file_uri,
        disks,
        skipped,
    })
}

/// The memory mode to use: what was asked for if this QEMU can, else the best it can.
async fn memory_mode(qmp: &Qmp, asked: Option<Mode>, running: bool) -> Result<Mode> {
    let version = qmp.greeting().version.qemu;
    let schema = qmp
        .schema()
        .await
        .map_err(Error::qmp("reading QEMU's schema"))?;
    let bg = schema.has_migration_capability("background-snapshot");
    // Before 9.0 QEMU's background-snapshot thread resumes the guest when it is done with the
    // device state, even if it was paused: a paused VM must use precopy there.
    let resumes_paused = !version.at_least(9, 0) && !running;
    match asked {
        Some(Mode::PointInTime) if !bg => Err(Error::Unsupported {
            what: format!(
                "point-in-time snapshots need background-snapshot, which QEMU {version} lacks; use --mode precopy"
            ),
        }),
        Some(Mode::PointInTime) if resumes_paused => Err(Error::Unsupported {
            what: format!(
                "QEMU {version} (< 9.0) would resume this paused VM during a point-in-time snapshot; use --mode precopy"
            ),
        }),
        Some(m) => Ok(m),
        None if bg && !resumes_paused => Ok(Mode::PointInTime),
        None => Ok(Mode::Precopy),
    }
}

/// The guest's TSC frequency, for the invtsc fix: QEMU knows it even when it was not set;
/// failing that, the host's nominal frequency.
async fn tsc_frequency(qmp: &Qmp) -> Option<u64> {
    let from_vm = async {
        let cpus = qmp.execute(QueryCpusFast {}).await.ok()?;
        let path = cpus.first()?.qom_path.clone();
        qmp.execute(types::qom_get {
            path,
            property: "tsc-frequency".into(),
        })
        .await
        .ok()?
        .as_u64()
        .filter(|&hz| hz > 0)
    };
    match from_vm.await {
        Some(hz) => Some(hz),
        None => host_tsc_hz().await,
    }
}

/// The host's nominal CPU frequency from cpuinfo (the TSC runs at it on invariant-TSC hosts).
pub(crate) async fn host_tsc_hz() -> Option<u64> {
    let text = tokio::fs::read_to_string("/proc/cpuinfo").await.ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1e6) as u64)
}

async fn run_steps(
    qmp: &Qmp,
    opts: &CreateOptions,
    plan: &Plan,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
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
    for d in &plan.disks {
        cancelled()?;
        disks::create_overlay_file(d).await?;
        rb.push(Undo::RemoveFile(d.overlay.clone()));
        disks::add_overlay_node(qmp, d).await?;
        rb.push(Undo::BlockdevDel(d.overlay_node.clone()));
    }
    cancelled()?;

    let Some((mode, path, file, uri, stream)) = memory else {
        // Disk-only: the transaction alone is atomic across disks; the guest never pauses.
        let quiesced = match &opts.quiesce {
            None => {
                disks::switch(qmp, &plan.disks).await?;
                None
            }
            Some(socket) => Some(switch_quiesced(qmp, socket, &plan.disks).await?),
        };
        rb.switched(&plan.disks);
        return Ok(CreateReport {
            mode: Mode::DiskOnly,
            was_running: plan.was_running,
            memory: None,
            disks: plan.disks.clone(),
            skipped: Vec::new(),
            pause_ms: 0.0,
            qemu_downtime_ms: None,
            live_phase: None,
            quiesced_filesystems: quiesced,
            total_ms: 0.0,
        });
    };
    let (mode, capabilities) = set_capabilities(qmp, mode, plan.auto, rb).await?;
    raise_bandwidth(qmp, rb).await?;
    cancelled()?;

    let watch = Watch {
        started: Instant::now(),
        timeout: opts.save_timeout,
        progress: opts.progress.as_ref(),
        cancel: &opts.cancel,
    };
    let mut report = match mode {
        Mode::PointInTime => point_in_time(qmp, plan, &uri, &watch, rb).await?,
        Mode::Precopy => precopy(qmp, plan, &uri, &watch, opts.live_limit, rb).await?,
        Mode::DiskOnly => unreachable!("disk-only returned above"),
    };
    stream.finish(&path).await?;
    let bytes = memfile::seal(file, path.clone()).await?;
    if let Some(m) = &mut report.memory {
        m.file = path;
        m.bytes = bytes;
        m.capabilities = capabilities;
    }
    Ok(report)
}

/// Freezes the guest's filesystems, switches the disks, and thaws — always, whatever the
/// switch did. Returns how many filesystems were frozen.
async fn switch_quiesced(qmp: &Qmp, socket: &Path, disks: &[DiskPlan]) -> Result<u64> {
    let mut agent = GuestAgent::connect(socket, Duration::from_secs(10)).await?;
    let frozen = agent.freeze().await?;
    let switched = disks::switch(qmp, disks).await;
    let thawed = agent.thaw().await;
    if let Err(e) = &thawed {
        warn!(error = %e, "thawing the guest's filesystems failed");
    }
    switched?;
    thawed?;
    Ok(frozen)
}

/// Switches on what the save needs (`events`, and `background-snapshot` for point-in-time)
/// and off everything else (multifd, postcopy, … are incompatible with a file save or with
/// background-snapshot). In auto mode a host that refuses background-snapshot (no
/// userfaultfd write-protect) falls back to precopy.
async fn set_capabilities(
    qmp: &Qmp,
    mode: Mode,
    auto: bool,
    rb: &mut Rollback<'_>,
) -> Result<(Mode, Vec<String>)> {
    let current = qmp
        .execute(QueryMigrateCapabilities {})
        .await
        .map_err(Error::qmp("reading migration capabilities"))?;
    let mut try_mode = mode;
    loop {
        let on: &[&str] = match try_mode {
            Mode::PointInTime => &["events", "background-snapshot"],
            _ => &["events"],
        };
        let want: Vec<Capability> = current
            .iter()
            .filter(|c| c.state || on.contains(&c.capability.as_str()))
            .map(|c| Capability {
                capability: c.capability.clone(),
                state: on.contains(&c.capability.as_str()),
            })
            .collect();
        match qmp
            .execute(MigrateSetCapabilities {
                capabilities: want.clone(),
            })
            .await
        {
            Ok(_) => {
                let restore = want
                    .iter()
                    .filter_map(|w| {
                        current
                            .iter()
                            .find(|c| c.capability == w.capability && c.state != w.state)
                            .cloned()
                    })
                    .collect();
                rb.push(Undo::RestoreCapabilities(restore));
                return Ok((try_mode, on.iter().map(|s| s.to_string()).collect()));
            }
            Err(e) if auto && try_mode == Mode::PointInTime => {
                warn!(error = %e, "background-snapshot refused; falling back to precopy");
                try_mode = Mode::Precopy;
            }
            Err(e) => return Err(Error::qmp("setting migration capabilities")(e)),
        }
    }
}

/// QEMU's default 128 MiB/s would throttle a save to a local file.
async fn raise_bandwidth(qmp: &Qmp, rb: &mut Rollback<'_>) -> Result<()> {
    let current = qmp
        .execute(QueryMaxBandwidth {})
        .await
        .map_err(Error::qmp("reading migration parameters"))?
        .max_bandwidth;
    if let Some(bw) = current {
        qmp.execute(SetMaxBandwidth {
            max_bandwidth: u64::MAX >> 1,
        })
        .await
        .map_err(Error::qmp("raising max-bandwidth"))?;
        rb.push(Undo::RestoreBandwidth(bw));
    }
    Ok(())
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
        }),
        disks: plan.disks.clone(),
        skipped: Vec::new(),
        pause_ms: ms(pause),
        qemu_downtime_ms: done.downtime,
        live_phase: live,
        quiesced_filesystems: None,
        total_ms: 0.0,
    }
}

async fn point_in_time(
    qmp: &Qmp,
    plan: &Plan,
    uri: &str,
    watch: &Watch<'_>,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
    // ---- the freeze: the guest must not run from `stop` to `cont` ----
    let frozen = Instant::now();
    if plan.was_running {
        qmp.execute(types::stop {})
            .await
            .map_err(Error::qmp("pausing the guest"))?;
        rb.push(Undo::Resume);
    }
    let t_stop = frozen.elapsed();
    let mut events = qmp.events();
    if plan.auto_resumes {
        // QEMU < 9.0 resumes the guest itself right after arming write protection, so the
        // disks must switch before the save starts (the guest is frozen either way).
        disks::switch(qmp, &plan.disks).await?;
        rb.switched(&plan.disks);
    }
    start_save(qmp, uri, rb).await?;
    rb.push(Undo::CancelMigration);
    let t_migrate = frozen.elapsed();
    if plan.auto_resumes {
        // Its RESUME is the signal that device state is saved and RAM write-protected.
        events
            .wait_for("QEMU to resume the guest", Duration::from_secs(30), |e| {
                e.name == "RESUME"
            })
            .await
            .map_err(Error::qmp("waiting for the background snapshot to arm"))?;
        rb.forget(|u| matches!(u, Undo::Resume));
    } else {
        // QEMU's thread stops the VM itself and saves device state, arms write protection,
        // then writes RAM: only then may the guest run again. The disks switch meanwhile (the
        // guest is frozen either way, so the order inside the window does not matter, and
        // overlapping the two shortens the pause).
        let (armed, switched) = tokio::join!(
            save::wait_armed(qmp, Duration::from_secs(30)),
            disks::switch(qmp, &plan.disks)
        );
        if switched.is_ok() {
            rb.switched(&plan.disks);
        }
        switched?;
        armed?;
    }
    let t_armed_and_switched = frozen.elapsed();
    if plan.was_running && !plan.auto_resumes {
        qmp.execute(types::cont {})
            .await
            .map_err(Error::qmp("resuming the guest"))?;
        rb.forget(|u| matches!(u, Undo::Resume));
    }
    let pause = frozen.elapsed();
    debug!(
        ?t_stop,
        ?t_migrate,
        ?t_armed_and_switched,
        ?pause,
        "pause breakdown (time since stop was sent)"
    );

    // ---- RAM keeps flowing to the file while the guest runs ----
    let done = watch.until_completed(qmp, |_| async { Ok(()) }).await?;
    rb.forget(|u| matches!(u, Undo::CancelMigration));
    Ok(memory_report(Mode::PointInTime, plan, &done, pause, None))
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

async fn precopy(
    qmp: &Qmp,
    plan: &Plan,
    uri: &str,
    watch: &Watch<'_>,
    live_limit: Duration,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
    let mut events = qmp.events();
    start_save(qmp, uri, rb).await?;
    rb.push(Undo::CancelMigration);
    if plan.was_running {
        // QEMU pauses the guest to finish; a failure at any point must resume it.
        rb.push(Undo::Resume);
    }
    let live_started = Instant::now();
    let mut forced_at: Option<Instant> = None;
    let mut passes = 0;
    let done = watch
        .until_completed(qmp, |info| {
            passes = info.ram.as_ref().map_or(passes, |r| r.dirty_sync_count);
            let force =
                plan.was_running && forced_at.is_none() && live_started.elapsed() > live_limit;
            if force {
                forced_at = Some(Instant::now());
            }
            async move {
                if force {
                    info!(
                        ?live_limit,
                        "precopy did not converge; pausing the guest to finish"
                    );
                    qmp.execute(types::stop {})
                        .await
                        .map_err(Error::qmp("pausing the guest to finish the save"))?;
                }
                Ok(())
            }
        })
        .await?;
    rb.forget(|u| matches!(u, Undo::CancelMigration));
    let live_ms = ms(forced_at.unwrap_or_else(Instant::now) - live_started);
    // The pause began when QEMU (or qsnap) stopped the vCPUs.
    let mut paused_at = forced_at;
    while let Some(ev) = events.try_next() {
        if ev.name == "STOP" && paused_at.is_none() {
            paused_at = Some(ev.received);
        }
    }
    disks::switch(qmp, &plan.disks).await?;
    rb.switched(&plan.disks);
    if plan.was_running {
        qmp.execute(types::cont {})
            .await
            .map_err(Error::qmp("resuming the guest"))?;
        rb.forget(|u| matches!(u, Undo::Resume));
    } else if qmp
        .schema()
        .await
        .is_ok_and(|s| s.has_command("blockdev-set-active"))
    {
        // A paused VM stays paused, but its disks must not stay inactive.
        qmp.execute(BlockdevSetActive { active: true })
            .await
            .map_err(Error::qmp("reactivating the disks"))?;
    }
    let pause = paused_at.map(|t| t.elapsed()).unwrap_or_default();
    let live = LivePhase {
        live_ms,
        passes: done.ram.as_ref().map_or(passes, |r| r.dirty_sync_count),
        forced_pause: forced_at.is_some(),
    };
    Ok(memory_report(Mode::Precopy, plan, &done, pause, Some(live)))
}
