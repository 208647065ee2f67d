//! Preflight: everything a create needs to know, read from QEMU without changing anything —
//! run state, migration blockers (with the invtsc fix and its Hz), a busy migration or block
//! job, the disks and their overlays, the memory mode, names and target files, and the
//! migration settings a create will change (so they can be put back, even by a recovery).
//! Every image it would freeze must be the file QEMU has open (`disks::check_open`), and every
//! directory it would write into (overlays, memory) must exist, or be creatable, and take a
//! new file: such a problem is refused here, naming the directory, rather than met after the
//! guest paused.

use super::{CreateOptions, Plan};
use crate::error::{CreateError, Error, QemuFeature, Result};
use crate::launch::tsc;
use crate::qemu::{QueryCpusFast, QueryMaxBandwidth, QueryMigrate, QueryMigrateCapabilities};
use crate::snapshot::disks;
use crate::store::{self, Mode, SavedSettings};
use qsnap_qmp::{types, Qmp};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub(super) async fn preflight(qmp: &Qmp, opts: &CreateOptions) -> Result<Plan> {
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
        return Err(CreateError::QuiesceNeedsDiskOnly.into());
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
            return Err(CreateError::MigrationBlocked { reasons, tsc_hz }.into());
        }
    }
    let jobs = qmp
        .execute(crate::qemu::QueryJobs {})
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
    if let Some(dir) = opts.overlay_dir.as_deref().filter(|d| d.is_relative()) {
        return Err(Error::UnusableDirectory {
            what: "overlay directory",
            path: dir.to_owned(),
            why: "it is a relative path: QEMU would resolve it against its own working \
                  directory and the store would record a path no other directory can follow; \
                  give an absolute path"
                .into(),
        });
    }
    let features = crate::features::Features::of(qmp).await?;
    let file_uri = features.file_uri;
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
    let mut overlay_dirs: Vec<PathBuf> = Vec::new();
    for d in &disks {
        let dir = d.overlay.parent().map(Path::to_owned).unwrap_or_default();
        if !overlay_dirs.contains(&dir) {
            overlay_dirs.push(dir);
        }
    }
    for dir in overlay_dirs {
        let hint = if opts.overlay_dir.is_some() {
            "pass --overlay-dir a writable directory"
        } else {
            "overlays go next to each disk's image unless --overlay-dir names a writable \
             directory for them"
        };
        usable_dir("overlay directory", dir, false, hint).await?;
    }
    if memory.is_some() {
        usable_dir(
            "memory directory",
            opts.dir.clone(),
            true,
            "the memory file goes into the store's directory for this VM; point --store at a \
             writable place",
        )
        .await?;
    }
    let targets = disks.iter().map(|d| &d.overlay);
    for path in targets.chain(memory.as_ref().map(|(_, p)| p)) {
        let p = path.clone();
        if store::blocking(move || store::exists(&p)).await? {
            return Err(Error::TargetExists { path: path.clone() });
        }
    }
    let mut mapped_ram = opts.mapped_ram && file_uri && features.mapped_ram;
    let saved = if memory.is_some() {
        let caps = qmp
            .execute(QueryMigrateCapabilities {})
            .await
            .map_err(Error::qmp("reading migration capabilities"))?;
        let bw = qmp
            .execute(QueryMaxBandwidth {})
            .await
            .map_err(Error::qmp("reading migration parameters"))?;
        if let Some(why) = bw.mapped_ram_obstacle() {
            tracing::info!(%why, "precopy writes the plain stream: QEMU refuses mapped-ram with these settings");
            mapped_ram = false;
        }
        Some(SavedSettings {
            capabilities: caps.into_iter().map(|c| (c.capability, c.state)).collect(),
            max_bandwidth: bw.max_bandwidth,
        })
    } else {
        None
    };
    Ok(Plan {
        was_running: status.running,
        memory,
        auto: opts.mode.is_none(),
        auto_resumes,
        file_uri,
        mapped_ram,
        disks,
        skipped,
        saved,
    })
}

/// Refuses a directory a create could not write into: missing (unless `may_create`, when the
/// nearest existing parent must take the new directory), not a directory, or not taking a
/// new file — tried for real with a probe file created `O_EXCL` and removed at once, which
/// also catches a read-only filesystem, ACLs and root squashing that permission bits hide.
async fn usable_dir(
    what: &'static str,
    dir: PathBuf,
    may_create: bool,
    hint: &'static str,
) -> Result<()> {
    store::blocking(move || {
        let refuse = |path: &Path, why: String| Error::UnusableDirectory {
            what,
            path: path.to_owned(),
            why: format!("{why}; {hint}"),
        };
        // The directory itself, or (when it may be made) the nearest parent that exists.
        let mut at = dir.as_path();
        let meta = loop {
            match std::fs::metadata(at) {
                Ok(m) => break m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                    Some(up) if may_create && !up.as_os_str().is_empty() => at = up,
                    _ => return Err(refuse(&dir, "it does not exist".into())),
                },
                Err(e) => return Err(refuse(at, format!("it cannot be examined ({e})"))),
            }
        };
        if !meta.is_dir() {
            return Err(refuse(at, "it is not a directory".into()));
        }
        // Unique within this process too: an embedder may run creates side by side.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = at.join(format!(".qsnap-probe-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
        {
            Ok(f) => {
                drop(f);
                std::fs::remove_file(&probe).map_err(store::io("removing a probe file", &probe))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(refuse(
                at,
                format!(
                    "{} is in the way (a qsnap killed while probing left it); remove it",
                    probe.display()
                ),
            )),
            Err(e) => Err(refuse(at, format!("qsnap cannot create files in it ({e})"))),
        }
    })
    .await
}

/// The memory mode to use: what was asked for if this QEMU can, else the best it can.
async fn memory_mode(qmp: &Qmp, asked: Option<Mode>, running: bool) -> Result<Mode> {
    let version = qmp.greeting().version.qemu;
    let bg = crate::features::Features::of(qmp)
        .await?
        .background_snapshot;
    // Before 9.0 QEMU's background-snapshot thread resumes the guest when it is done with the
    // device state, even if it was paused: a paused VM must use precopy there.
    let resumes_paused = !version.at_least(9, 0) && !running;
    match asked {
        Some(Mode::PointInTime) if !bg => Err(Error::QemuLacks {
            feature: QemuFeature::BackgroundSnapshot,
            version: version.to_string(),
        }),
        Some(Mode::PointInTime) if resumes_paused => Err(Error::QemuLacks {
            feature: QemuFeature::PausedBackgroundSnapshot,
            version: version.to_string(),
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
        None => tsc::host_nominal_hz().await.map(|(hz, _)| hz),
    }
}
