//! Going back to a snapshot, in two steps a VMM can drive itself:
//!
//! 1. [`prepare`]: check the snapshot is whole (memory file complete, frozen images present and
//!    unchanged since the snapshot) and create **new** qcow2 overlays over its frozen images, so
//!    the snapshot itself is never written and stays revertible again and again.
//! 2. The caller starts QEMU on those overlays with `-incoming defer` (and `-S`), plus, for a
//!    lazy snapshot, [`PreparedRevert::ram`]'s arguments (its RAM mapped from the image).
//! 3. [`restore`]: load the memory file into it (`migrate-incoming` through an fd, with the
//!    capabilities the save used) and resume it if the guest was running at snapshot time.
//!
//! [`discard`] removes the overlays of a prepared revert that was not used.
//! Nothing here stops or starts QEMU; `vm.rs` does that through a `Launcher`.

use crate::error::{Error, QemuFeature, Result, RevertError};
use crate::image;
use crate::launch::RamMapping;
use crate::qemu::{Capability, MigrateSetCapabilities};
use crate::snapshot::memfile;
use crate::snapshot::transport;
use crate::store::{CreateReport, Mode};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// One disk of a prepared revert.
// Only `prepare` makes one: `discard` removes the overlays it names.
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
// Only `prepare` makes one: `discard` removes the overlays it names.
#[non_exhaustive]
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
    /// A lazy snapshot: start QEMU on the command line [`RamMapping::apply`] makes so it
    /// maps the snapshot's RAM image; the load then brings only device state, and
    /// [`restore`] refuses a QEMU that does not map the image.
    pub ram: Option<RamMapping>,
    /// How long checking the memory file (length and checksum) took.
    pub verify_ms: f64,
}

/// The refusal for a snapshot that cannot be used.
fn refused(snapshot: &str, why: String) -> Error {
    RevertError::Refused {
        snapshot: snapshot.to_owned(),
        why,
    }
    .into()
}

/// Checks that the snapshot's files are whole and unchanged — the memory file's header,
/// length and checksum (read once per file version: see [`memfile::verify_cached`]), a lazy
/// snapshot's RAM image stamp, the frozen images' size and time — before anything is touched.
/// Changes nothing.
pub(crate) async fn validate(snapshot: &str, s: &CreateReport) -> Result<Validated> {
    let started = Instant::now();
    let mut memory = None;
    if let Some(mem) = &s.memory {
        memory = Some(
            memfile::verify_cached(mem.file.clone(), mem.bytes, mem.checksum.clone())
                .await
                .map_err(|e| refused(snapshot, e.to_string()))?,
        );
    }
    if let Some(lazy) = s.memory.as_ref().and_then(|m| m.lazy.as_ref()) {
        memfile::verify_ram_cached(lazy.image.clone(), lazy.checksum.clone())
            .await
            .map_err(|e| refused(snapshot, format!("its RAM image: {e}")))?;
    }
    let verify_ms = started.elapsed().as_secs_f64() * 1e3;
    for d in &s.disks {
        let now = image::stamp(&d.image)
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
    Ok(Validated { verify_ms, memory })
}

/// What [`validate`] found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Validated {
    /// How long the memory check took.
    pub verify_ms: f64,
    /// How the memory file was checked (`None`: a disk-only snapshot).
    pub memory: Option<memfile::Verified>,
}

/// Validates, then creates the new overlays (`<image stem>.<snapshot>.rN.qcow2` next to each
/// snapshot overlay, or in `overlay_dir`; 0600, never over an existing file).
pub async fn prepare(
    snapshot: &str,
    s: &CreateReport,
    overlay_dir: Option<&Path>,
) -> Result<PreparedRevert> {
    let verify_ms = validate(snapshot, s).await?.verify_ms;
    let planned = plan_overlays(s, overlay_dir).await?;
    make_overlays(snapshot, s, planned, verify_ms, &CancellationToken::new()).await
}

/// The new overlays a revert would make, one per snapshotted disk: the first free
/// `<stem>.rN.qcow2`. Changes nothing.
pub(crate) async fn plan_overlays(
    s: &CreateReport,
    overlay_dir: Option<&Path>,
) -> Result<Vec<RevertDisk>> {
    let mut out = Vec::new();
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
            let q = p.clone();
            if !crate::store::blocking(move || crate::store::exists(&q)).await? {
                break p;
            }
            n += 1;
        };
        out.push(RevertDisk {
            device: d.device.clone(),
            image: d.image.clone(),
            overlay,
        });
    }
    Ok(out)
}

/// Creates the planned overlays (all or none).
pub(crate) async fn make_overlays(
    snapshot: &str,
    s: &CreateReport,
    planned: Vec<RevertDisk>,
    verify_ms: f64,
    cancel: &CancellationToken,
) -> Result<PreparedRevert> {
    let mut made: Vec<RevertDisk> = Vec::new();
    for (d, r) in s.disks.iter().zip(planned) {
        if let Err(e) = image::create_overlay(&r.overlay, &d.image, &d.format, d.size, cancel).await
        {
            discard_disks(&made).await;
            return Err(e);
        }
        made.push(r);
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
        verify_ms,
        ram: lazy_mapping(s),
    })
}

/// How a QEMU reverting to `s` must map its RAM: privately, from the snapshot's RAM image,
/// when the snapshot is lazy.
pub(crate) fn lazy_mapping(s: &CreateReport) -> Option<RamMapping> {
    let l = s.memory.as_ref()?.lazy.as_ref()?;
    Some(RamMapping::Private {
        backend: l.backend.clone(),
        image: l.image.clone(),
        size: l.size,
        blocks: l.blocks.clone(),
    })
}

async fn discard_disks(disks: &[RevertDisk]) {
    use crate::unlink::{made_by_this_operation, Data, Kind};
    for d in disks {
        if let Err(e) = made_by_this_operation(&d.overlay, Kind::Image, Data::MustBeEmpty).await {
            tracing::warn!(error = %e, "kept a new overlay of a revert that did not happen");
        }
    }
}

/// Removes a prepared revert's overlays (when QEMU could not be started on them, or the guest
/// never ran on them): only while they hold no data.
pub async fn discard(p: &PreparedRevert) {
    discard_disks(&p.disks).await;
}

/// A device-state-only stream (a lazy snapshot) must land in a QEMU whose RAM *is* the
/// snapshot's image, mapped privately and read-only: loaded into ordinary RAM it would resume
/// a guest whose memory is zeros, and nothing in the stream could tell.
async fn check_mapping(qmp: &Qmp, p: &PreparedRevert) -> Result<()> {
    let refuse = |why: String| -> Error {
        RevertError::Refused {
            snapshot: p.snapshot.clone(),
            why,
        }
        .into()
    };
    let Some(mapping @ RamMapping::Private { image, .. }) = &p.ram else {
        return Err(refuse(
            "its memory is lazy (RAM in an image), but no RAM mapping was given for the new QEMU (start it with PreparedRevert::ram's arguments)".into(),
        ));
    };
    for block in mapping.blocks() {
        let path = format!("/objects/{}", block.id);
        let get = |property: &'static str| {
            let path = path.clone();
            async move {
                qmp.execute(types::qom_get {
                    path,
                    property: property.into(),
                })
                .await
            }
        };
        let (mem_path, share, readonly, offset, size) = (
            get("mem-path").await,
            get("share").await,
            get("readonly").await,
            get("offset").await,
            get("size").await,
        );
        let ok = matches!(&mem_path, Ok(v) if v.as_str() == Some(&image.display().to_string()))
            && matches!(&share, Ok(v) if v.as_bool() == Some(false))
            && matches!(&readonly, Ok(v) if v.as_bool() == Some(true))
            && matches!(&offset, Ok(v) if v.as_u64() == Some(block.offset))
            && matches!(&size, Ok(v) if v.as_u64() == Some(block.size));
        if !ok {
            return Err(refuse(format!(
                "the new QEMU does not map the snapshot's RAM image {} as backend {} (offset {}, size {}, share=off, readonly=on); it would resume with empty memory",
                image.display(),
                block.id,
                block.offset,
                block.size
            )));
        }
    }
    Ok(())
}

/// Resumes the reverted guest (`cont`). A VMM that keeps a journal calls [`restore`] with
/// `resume = false`, records that the new QEMU and its overlays are the VM now, and only then
/// calls this: from the first instruction the guest runs, the new overlays hold writes that a
/// recovery must keep rather than discard.
pub async fn resume(qmp: &Qmp) -> Result<()> {
    resume_at(qmp, "load.cont-sent").await
}

/// [`resume`], passing failpoint `point` after the `cont`.
pub(crate) async fn resume_at(qmp: &Qmp, point: &'static str) -> Result<()> {
    let sent = match qmp.execute(types::cont {}).await {
        Ok(_) => crate::failpoint::hit(point, qmp.peer_pid()).await,
        Err(e) => Err(Error::qmp("resuming the guest")(e)),
    };
    match sent {
        // A `cont` that timed out (or whose answer could not be read) may have run: QEMU's
        // run state says.
        Err(e) if e.may_have_run() => match qmp.execute(types::query_status {}).await {
            Ok(st) if st.running => Ok(()),
            _ => Err(e),
        },
        other => other,
    }
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
/// and resumes it if the guest was running at snapshot time and `resume` allows. A VMM with a
/// journal passes `resume = false` and calls [`resume`] once it has recorded the new QEMU.
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
    if p.capabilities.iter().any(|c| c == "x-ignore-shared") {
        check_mapping(qmp, p).await?;
    }
    if p.capabilities.iter().any(|c| c == "mapped-ram")
        && !crate::features::Features::of(qmp).await?.mapped_ram
    {
        return Err(Error::QemuLacks {
            feature: QemuFeature::MappedRam {
                snapshot: p.snapshot.clone(),
            },
            version: qmp.greeting().version.qemu.to_string(),
        });
    }
    qmp.execute(MigrateSetCapabilities {
        capabilities: caps.clone(),
    })
    .await
    .map_err(Error::qmp("setting migration capabilities for the load"))?;
    crate::failpoint::hit("load.caps-sent", qmp.peer_pid()).await?;
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
        crate::failpoint::hit("load.incoming-sent", qmp.peer_pid()).await?;
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
    // The load's capabilities go off again: left on, mapped-ram or multifd would shape the
    // VM's next migration (a socket migration refuses mapped-ram) and would be what a later
    // save's undo puts back.
    let off: Vec<Capability> = caps
        .iter()
        .filter(|c| c.capability != "events")
        .map(|c| Capability {
            capability: c.capability.clone(),
            state: false,
        })
        .collect();
    if !off.is_empty() {
        qmp.execute(MigrateSetCapabilities { capabilities: off })
            .await
            .map_err(Error::qmp("turning the load's migration capabilities off"))?;
    }
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let resumed = resume && p.was_running;
    if resumed {
        self::resume(qmp).await?;
    }
    info!(snapshot = %p.snapshot, load_ms, resumed, total_ms = started.elapsed().as_secs_f64() * 1e3, "restored");
    Ok(RestoreReport { load_ms, resumed })
}
