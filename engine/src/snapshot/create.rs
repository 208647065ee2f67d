//! Creating a live snapshot: an explicit sequence of steps, each recording its undo.
//!
//! The guest is frozen (`stop`) before QEMU starts the save and before the disks switch, and
//! resumed only once QEMU has saved the device state and armed write protection for RAM, so
//! memory and disks are captured at the same instant. On any failure the recorded undos run in
//! reverse: the VM ends in the run state it had, on a valid disk chain, with no partial files.

use crate::error::{Error, Result};
use crate::qemu::{
    BlockdevAddOverlay, Capability, FileNode, MigrateInfo, MigrateSetCapabilities,
    QueryMaxBandwidth, QueryMigrate, QueryMigrateCapabilities, SetMaxBandwidth,
};
use crate::snapshot::disks::{self, DiskPlan, SkippedDisk};
use crate::snapshot::memfile::{self, HEADER_LEN};
use crate::snapshot::SnapshotName;
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What to snapshot and where.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The snapshot's name.
    pub name: SnapshotName,
    /// Directory for the memory file (created 0700).
    pub dir: PathBuf,
    /// Where overlays go (default: next to each image).
    pub overlay_dir: Option<PathBuf>,
    /// Upper bound for the whole memory save.
    pub save_timeout: Duration,
}

/// What a successful create did.
#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    /// `point-in-time`.
    pub mode: &'static str,
    /// The memory file.
    pub memory_file: PathBuf,
    /// Bytes of QEMU's stream in it.
    pub memory_bytes: u64,
    /// Guest RAM size as QEMU reported it.
    pub ram_bytes: u64,
    /// Disks switched to overlays (their images are now frozen).
    pub disks: Vec<DiskPlan>,
    /// Devices left alone.
    pub skipped: Vec<SkippedDisk>,
    /// How long the guest's vCPUs were stopped, measured by qsnap (`stop` sent → `cont` acked).
    pub pause_ms: f64,
    /// QEMU's own figure for the stop (`downtime`), when it gives one.
    pub qemu_downtime_ms: Option<u64>,
    /// Whether the guest was running when the snapshot was taken.
    pub was_running: bool,
    /// Wall time of the whole create.
    pub total_ms: f64,
}

/// An undo for a step that changed something.
#[derive(Debug)]
enum Undo {
    RemoveFile(PathBuf),
    RemoveFd(i64),
    BlockdevDel(String),
    RestoreCapabilities(Vec<Capability>),
    RestoreBandwidth(u64),
    CancelMigration,
    Resume,
}

struct Rollback<'a> {
    qmp: &'a Qmp,
    undo: Vec<Undo>,
}

impl Rollback<'_> {
    fn push(&mut self, u: Undo) {
        self.undo.push(u);
    }

    /// Runs every undo, newest first. Failures are logged, not returned: the original error is
    /// what the caller needs, and one failed undo must not stop the others.
    async fn run(mut self) {
        while let Some(u) = self.undo.pop() {
            let outcome: std::result::Result<(), String> = match &u {
                Undo::RemoveFile(p) => tokio::fs::remove_file(p).await.map_err(|e| e.to_string()),
                Undo::RemoveFd(set) => self
                    .qmp
                    .remove_fd(*set, None)
                    .await
                    .map_err(|e| e.to_string()),
                Undo::BlockdevDel(node) => self
                    .qmp
                    .execute(types::blockdev_del {
                        node_name: node.clone(),
                    })
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Undo::RestoreCapabilities(caps) => self
                    .qmp
                    .execute(MigrateSetCapabilities {
                        capabilities: caps.clone(),
                    })
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Undo::RestoreBandwidth(bw) => self
                    .qmp
                    .execute(SetMaxBandwidth { max_bandwidth: *bw })
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Undo::CancelMigration => cancel_migration(self.qmp).await,
                Undo::Resume => self
                    .qmp
                    .execute(types::cont {})
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
            };
            match outcome {
                Ok(()) => info!(?u, "rolled back"),
                Err(e) => warn!(?u, error = %e, "rollback step failed"),
            }
        }
    }

    /// The steps succeeded: keep what they made, but still run the undos that restore
    /// settings (capabilities, bandwidth) and release the fdset.
    fn commit(self) -> Vec<Undo> {
        self.undo
            .into_iter()
            .filter(|u| {
                matches!(
                    u,
                    Undo::RemoveFd(_) | Undo::RestoreCapabilities(_) | Undo::RestoreBandwidth(_)
                )
            })
            .collect()
    }
}

async fn cancel_migration(qmp: &Qmp) -> std::result::Result<(), String> {
    qmp.execute(types::migrate_cancel {})
        .await
        .map_err(|e| e.to_string())?;
    // Wait (bounded) for the cancel to land, so the fdset and file can go.
    for _ in 0..500 {
        let info = qmp
            .execute(QueryMigrate {})
            .await
            .map_err(|e| e.to_string())?;
        if !matches!(
            info.status.as_deref(),
            Some("active" | "setup" | "cancelling" | "device" | "pre-switchover")
        ) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("migration did not stop after migrate_cancel".into())
}

/// Capabilities that background-snapshot cannot run with are switched off for the save.
fn save_capabilities(current: &[Capability]) -> Vec<Capability> {
    let mut want: Vec<Capability> = current
        .iter()
        .filter(|c| c.state && c.capability != "events" && c.capability != "background-snapshot")
        .map(|c| Capability {
            capability: c.capability.clone(),
            state: false,
        })
        .collect();
    for name in ["events", "background-snapshot"] {
        want.push(Capability {
            capability: name.into(),
            state: true,
        });
    }
    want
}

/// Takes a point-in-time snapshot (memory + all writable disks) of the VM behind `qmp`.
pub async fn create(qmp: &Qmp, opts: &CreateOptions) -> Result<CreateReport> {
    let started = Instant::now();
    // ---- preflight: nothing changes here ----
    let status = qmp
        .execute(types::query_status {})
        .await
        .map_err(Error::qmp("reading the run state"))?;
    let was_running = status.running;
    if !matches!(
        status.status,
        types::RunState::running | types::RunState::paused
    ) {
        return Err(Error::BadRunState {
            state: serde_json::to_value(status.status)
                .map(|v| v.as_str().unwrap_or("?").to_owned())
                .unwrap_or_default(),
        });
    }
    let mig = qmp
        .execute(QueryMigrate {})
        .await
        .map_err(Error::qmp("reading the migration state"))?;
    if let Some(reasons) = mig.blocked_reasons.filter(|r| !r.is_empty()) {
        return Err(Error::MigrationBlocked { reasons });
    }
    if matches!(
        mig.status.as_deref(),
        Some("setup" | "active" | "cancelling" | "device" | "pre-switchover" | "postcopy-active")
    ) {
        return Err(Error::Busy {
            what: format!(
                "a migration is in progress ({})",
                mig.status.unwrap_or_default()
            ),
        });
    }
    let jobs = qmp
        .execute_raw("query-jobs", None)
        .await
        .map_err(Error::qmp("listing block jobs"))?;
    if jobs.as_array().is_some_and(|j| !j.is_empty()) {
        return Err(Error::Busy {
            what: format!("block jobs are running: {jobs}"),
        });
    }
    let version = qmp.greeting().version.qemu;
    let schema = qmp
        .schema()
        .await
        .map_err(Error::qmp("reading QEMU's schema"))?;
    if !schema.has_migration_capability("background-snapshot") || !version.at_least(9, 0) {
        return Err(Error::Unsupported {
            what: format!(
                "point-in-time memory snapshots need QEMU >= 9.0 with background-snapshot (this is {version})"
            ),
        });
    }
    if !schema.has_argument("migrate", &["channels", "addr", "filename"]) {
        return Err(Error::Unsupported {
            what: format!("file: migration to an fdset needs QEMU >= 8.2 (this is {version})"),
        });
    }
    let (disks, skipped) = disks::plan(qmp, &opts.name, opts.overlay_dir.as_deref()).await?;
    let mem_path = opts.dir.join(format!("{}.mem", opts.name));
    for path in disks.iter().map(|d| &d.overlay).chain([&mem_path]) {
        if tokio::fs::symlink_metadata(path).await.is_ok() {
            return Err(Error::TargetExists { path: path.clone() });
        }
    }

    // ---- steps that change things, each with its undo ----
    let mut rb = Rollback {
        qmp,
        undo: Vec::new(),
    };
    match run_steps(qmp, opts, &disks, &mem_path, was_running, &mut rb).await {
        Ok(mut report) => {
            let keep = rb.commit();
            Rollback { qmp, undo: keep }.run().await;
            report.skipped = skipped;
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            info!(name = %opts.name, pause_ms = report.pause_ms, "snapshot created");
            Ok(report)
        }
        Err(e) => {
            warn!(error = %e, "snapshot failed; rolling back");
            rb.run().await;
            Err(e)
        }
    }
}

async fn run_steps(
    qmp: &Qmp,
    opts: &CreateOptions,
    disks: &[DiskPlan],
    mem_path: &PathBuf,
    was_running: bool,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
    // Memory file, handed to QEMU as an fd: QEMU needs no path access to the store.
    let file = memfile::create(opts.dir.clone(), mem_path.clone()).await?;
    rb.push(Undo::RemoveFile(mem_path.clone()));
    let fdset = qmp
        .add_fd(&file, None, Some("qsnap-memory"))
        .await
        .map_err(Error::qmp("passing the memory file to QEMU"))?;
    rb.push(Undo::RemoveFd(fdset.fdset_id));

    for d in disks {
        disks::create_overlay_file(d).await?;
        rb.push(Undo::RemoveFile(d.overlay.clone()));
        qmp.execute(BlockdevAddOverlay {
            driver: "qcow2",
            node_name: d.overlay_node.clone(),
            file: FileNode {
                driver: "file",
                filename: d.overlay.display().to_string(),
            },
            backing: None,
        })
        .await
        .map_err(Error::qmp("adding an overlay node"))?;
        rb.push(Undo::BlockdevDel(d.overlay_node.clone()));
    }

    let caps = qmp
        .execute(QueryMigrateCapabilities {})
        .await
        .map_err(Error::qmp("reading migration capabilities"))?;
    let want = save_capabilities(&caps);
    let restore: Vec<Capability> = want
        .iter()
        .filter_map(|w| {
            caps.iter()
                .find(|c| c.capability == w.capability && c.state != w.state)
                .cloned()
        })
        .collect();
    qmp.execute(MigrateSetCapabilities { capabilities: want })
        .await
        .map_err(Error::qmp("enabling background-snapshot"))?;
    rb.push(Undo::RestoreCapabilities(restore));
    if let Some(bw) = qmp
        .execute(QueryMaxBandwidth {})
        .await
        .map_err(Error::qmp("reading migration parameters"))?
        .max_bandwidth
    {
        // QEMU's default 128 MiB/s would throttle the save; the guest does not wait for it, but
        // the snapshot should finish as fast as the disk allows.
        qmp.execute(SetMaxBandwidth {
            max_bandwidth: u64::MAX >> 1,
        })
        .await
        .map_err(Error::qmp("raising max-bandwidth"))?;
        rb.push(Undo::RestoreBandwidth(bw));
    }

    // ---- the freeze: the guest must not run from here to `cont` ----
    let mut events = qmp.events();
    let frozen = Instant::now();
    if was_running {
        qmp.execute(types::stop {})
            .await
            .map_err(Error::qmp("pausing the guest"))?;
        rb.push(Undo::Resume);
    }
    qmp.execute(types::migrate {
        uri: Some(format!(
            "file:/dev/fdset/{},offset={HEADER_LEN}",
            fdset.fdset_id
        )),
        channels: None,
        detach: None,
        resume: None,
    })
    .await
    .map_err(Error::qmp("starting the memory save"))?;
    rb.push(Undo::CancelMigration);
    let armed = wait_armed(qmp, Duration::from_secs(30)).await?;

    if !disks.is_empty() {
        let actions = disks
            .iter()
            .map(|d| {
                types::TransactionAction::blockdev_snapshot(
                    types::BlockdevSnapshot {
                        node: d.node.clone(),
                        overlay: d.overlay_node.clone(),
                    }
                    .into(),
                )
            })
            .collect();
        qmp.execute(types::transaction {
            actions,
            properties: None,
        })
        .await
        .map_err(Error::qmp("switching the disks to their overlays"))?;
        // From here the guest writes to the overlays: deleting them would lose its data.
        rb.undo.retain(|u| match u {
            Undo::BlockdevDel(_) => false,
            Undo::RemoveFile(p) => p == mem_path,
            _ => true,
        });
    }
    if was_running {
        qmp.execute(types::cont {})
            .await
            .map_err(Error::qmp("resuming the guest"))?;
        rb.undo.retain(|u| !matches!(u, Undo::Resume));
    }
    let pause = frozen.elapsed();

    // ---- RAM keeps flowing to the file while the guest runs ----
    let done = wait_completed(qmp, &mut events, armed, opts.save_timeout).await?;
    rb.undo.retain(|u| !matches!(u, Undo::CancelMigration));
    let memory_bytes = memfile::seal(file, mem_path.clone()).await?;

    Ok(CreateReport {
        mode: "point-in-time",
        memory_file: mem_path.clone(),
        memory_bytes,
        ram_bytes: done.ram.as_ref().map(|r| r.total).unwrap_or(0),
        disks: disks.to_vec(),
        skipped: Vec::new(),
        pause_ms: pause.as_secs_f64() * 1e3,
        qemu_downtime_ms: done.downtime,
        was_running,
        total_ms: 0.0,
    })
}

fn failed(info: &MigrateInfo) -> Option<Error> {
    match info.status.as_deref() {
        Some("failed" | "cancelled") => Some(Error::SaveFailed {
            desc: info
                .error_desc
                .clone()
                .unwrap_or_else(|| format!("migration {}", info.status.as_deref().unwrap_or("?"))),
        }),
        _ => None,
    }
}

/// Waits until QEMU's background-snapshot thread has saved the device state and armed write
/// protection: it writes RAM pages only after both, so the first page counted is the signal.
async fn wait_armed(qmp: &Qmp, timeout: Duration) -> Result<MigrateInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp
            .execute(QueryMigrate {})
            .await
            .map_err(Error::qmp("polling the memory save"))?;
        if let Some(e) = failed(&info) {
            return Err(e);
        }
        let pages = info
            .ram
            .as_ref()
            .map(|r| r.normal + r.duplicate)
            .unwrap_or(0);
        if pages > 0 || info.status.as_deref() == Some("completed") {
            return Ok(info);
        }
        if Instant::now() > deadline {
            return Err(Error::SaveFailed {
                desc: format!("QEMU did not start writing RAM within {timeout:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn wait_completed(
    qmp: &Qmp,
    events: &mut qsnap_qmp::EventStream,
    last: MigrateInfo,
    timeout: Duration,
) -> Result<MigrateInfo> {
    if last.status.as_deref() != Some("completed") {
        let ev = events
            .wait_for("MIGRATION completed or failed", timeout, |e| {
                e.name == "MIGRATION"
                    && matches!(
                        e.data["status"].as_str(),
                        Some("completed" | "failed" | "cancelled")
                    )
            })
            .await;
        if let Err(e) = ev {
            return Err(match e {
                qsnap_qmp::Error::EventTimeout { .. } => Error::SaveFailed {
                    desc: format!("the memory save did not finish within {timeout:?}"),
                },
                other => Error::qmp("waiting for the memory save")(other),
            });
        }
    }
    let info = qmp
        .execute(QueryMigrate {})
        .await
        .map_err(Error::qmp("reading the save result"))?;
    if let Some(e) = failed(&info) {
        return Err(e);
    }
    Ok(info)
}
