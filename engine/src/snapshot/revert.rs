//! Going back to a snapshot, in two steps a VMM can drive itself:
//!
//! 1. [`prepare`]: check the snapshot is whole (memory file complete, frozen images present and
//!    unchanged since the snapshot) and create **new** qcow2 overlays over its frozen images, so
//!    the snapshot itself is never written and stays revertible again and again.
//! 2. The caller starts QEMU on those overlays with `-incoming defer` (and `-S`).
//! 3. [`restore`]: load the memory file into it (`migrate-incoming` through an fd, with the
//!    capabilities the save used) and resume it if the guest was running at snapshot time.
//!
//! [`discard`] removes the overlays of a prepared revert that was not used.
//! Nothing here stops or starts QEMU; `vm.rs` does that through a `Launcher`.

use crate::error::{Error, Result};
use crate::qemu::{Capability, MigrateSetCapabilities};
use crate::snapshot::disks::ImageStamp;
use crate::snapshot::memfile::{self, HEADER_LEN};
use crate::snapshot::transport;
use crate::snapshot::{CreateReport, Mode};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::info;

/// One disk of a prepared revert.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RevertDisk {
    /// Device name.
    pub device: String,
    /// The snapshot's frozen image (the new overlay's backing; never written).
    pub image: PathBuf,
    /// The new overlay QEMU must open for this disk.
    pub overlay: PathBuf,
}

/// What the caller starts QEMU with.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PreparedRevert {
    /// The snapshot.
    pub snapshot: String,
    /// New overlays, one per snapshotted disk.
    pub disks: Vec<RevertDisk>,
    /// The memory file to load (`None`: a disk-only snapshot, which boots).
    pub memory: Option<PathBuf>,
    /// Capabilities to set on the incoming side.
    pub capabilities: Vec<String>,
    /// Whether the guest was running at snapshot time.
    pub was_running: bool,
}

/// The refusal for a snapshot that cannot be used.
fn refused(snapshot: &str, why: String) -> Error {
    Error::RevertRefused {
        snapshot: snapshot.to_owned(),
        why,
    }
}

/// Checks that the snapshot's files are whole and unchanged. Changes nothing.
pub async fn validate(snapshot: &str, s: &CreateReport) -> Result<()> {
    if let Some(mem) = &s.memory {
        let header = memfile::read_header(mem.file.clone())
            .await
            .map_err(|e| refused(snapshot, e.to_string()))?;
        if !header.complete {
            return Err(refused(
                snapshot,
                format!("its memory file {} is incomplete", mem.file.display()),
            ));
        }
        let len = tokio::fs::metadata(&mem.file)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if len != HEADER_LEN + header.stream_len || header.stream_len != mem.bytes {
            return Err(refused(
                snapshot,
                format!(
                    "its memory file {} has {len} bytes, the snapshot wrote {} (truncated or changed)",
                    mem.file.display(),
                    HEADER_LEN + mem.bytes
                ),
            ));
        }
    }
    for d in &s.disks {
        let now = ImageStamp::read(&d.image)
            .await
            .map_err(|e| refused(snapshot, format!("its image for {}: {e}", d.device)))?;
        if let Some(then) = d.frozen {
            if now != then {
                return Err(refused(
                    snapshot,
                    format!(
                        "its image {} changed since the snapshot (size/mtime {}/{} then, {}/{} now)",
                        d.image.display(),
                        then.bytes,
                        then.mtime_ns,
                        now.bytes,
                        now.mtime_ns
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Validates, then creates the new overlays (`<image stem>.<snapshot>.rN.qcow2` next to each
/// snapshot overlay, or in `overlay_dir`).
pub async fn prepare(
    snapshot: &str,
    s: &CreateReport,
    overlay_dir: Option<&Path>,
) -> Result<PreparedRevert> {
    validate(snapshot, s).await?;
    let mut made: Vec<RevertDisk> = Vec::new();
    for d in &s.disks {
        let dir = overlay_dir
            .map(Path::to_owned)
            .or_else(|| d.overlay.parent().map(Path::to_owned))
            .unwrap_or_default();
        let stem = d
            .overlay
            .file_stem()
            .map(|x| x.to_string_lossy().into_owned())
            .unwrap_or_else(|| d.device.clone());
        let mut n = 1;
        let overlay = loop {
            let p = dir.join(format!("{stem}.r{n}.qcow2"));
            if tokio::fs::symlink_metadata(&p).await.is_err() {
                break p;
            }
            n += 1;
        };
        let plan = crate::snapshot::disks::DiskPlan {
            overlay: overlay.clone(),
            ..d.clone()
        };
        if let Err(e) = crate::snapshot::disks::create_overlay_file(&plan).await {
            discard_disks(&made).await;
            return Err(e);
        }
        made.push(RevertDisk {
            device: d.device.clone(),
            image: d.image.clone(),
            overlay,
        });
    }
    Ok(PreparedRevert {
        snapshot: snapshot.to_owned(),
        disks: made,
        memory: s.memory.as_ref().map(|m| m.file.clone()),
        capabilities: s
            .memory
            .as_ref()
            .map(|m| m.capabilities.clone())
            .unwrap_or_default(),
        was_running: s.was_running && s.mode != Mode::DiskOnly,
    })
}

async fn discard_disks(disks: &[RevertDisk]) {
    for d in disks {
        let _ = tokio::fs::remove_file(&d.overlay).await;
    }
}

/// Removes a prepared revert's overlays (when QEMU could not be started on them).
pub async fn discard(p: &PreparedRevert) {
    discard_disks(&p.disks).await;
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreReport {
    /// Time to load the memory file.
    pub load_ms: f64,
    /// Whether the guest was resumed.
    pub resumed: bool,
}

/// Loads the prepared memory file into the QEMU behind `qmp` (started with `-incoming defer`)
/// and resumes it if the guest was running at snapshot time and `resume` allows.
pub async fn restore(
    qmp: &Qmp,
    p: &PreparedRevert,
    resume: bool,
    timeout: Duration,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let Some(mem) = &p.memory else {
        // A disk-only snapshot: QEMU boots on the overlays; nothing to load.
        return Ok(RestoreReport {
            load_ms: 0.0,
            resumed: false,
        });
    };
    // The save's capabilities, except those that only mean something on the saving side.
    let caps: Vec<Capability> = p
        .capabilities
        .iter()
        .filter(|c| c.as_str() != "background-snapshot")
        .map(|c| Capability {
            capability: c.clone(),
            state: true,
        })
        .collect();
    qmp.execute(MigrateSetCapabilities { capabilities: caps })
        .await
        .map_err(Error::qmp("setting migration capabilities for the load"))?;
    let header = memfile::read_header(mem.clone()).await?;
    let file_uri = transport::has_file_uri(qmp).await?;
    let (uri, stream) = transport::open_load(qmp, mem, header.stream_len, file_uri).await?;
    let mut events = qmp.events();
    let loaded = async {
        qmp.execute(types::migrate_incoming {
            uri: Some(uri),
            channels: None,
            exit_on_error: None,
        })
        .await
        .map_err(Error::qmp("loading the memory file"))?;
        let ev = events
            .wait_for("the memory load", timeout, |e| {
                e.name == "MIGRATION"
                    && matches!(e.data["status"].as_str(), Some("completed" | "failed"))
            })
            .await
            .map_err(Error::qmp("waiting for the memory load"))?;
        if ev.data["status"] == "failed" {
            let info = qmp.execute(crate::qemu::QueryMigrate {}).await.ok();
            return Err(Error::SaveFailed {
                desc: format!(
                    "loading the memory file failed: {}",
                    info.and_then(|i| i.error_desc)
                        .unwrap_or_else(|| "QEMU gave no reason".into())
                ),
            });
        }
        Ok(())
    }
    .await;
    stream.finish(qmp).await;
    loaded?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let resumed = resume && p.was_running;
    if resumed {
        qmp.execute(types::cont {})
            .await
            .map_err(Error::qmp("resuming the guest"))?;
    }
    info!(snapshot = %p.snapshot, load_ms, resumed, "restored");
    Ok(RestoreReport { load_ms, resumed })
}
