//! Which disks a snapshot covers, and their qcow2 overlays.
//!
//! Read-only devices and empty drives are skipped (and reported). Each writable disk gets an
//! overlay file created with `qemu-img create -u` (the base is locked by the running QEMU, so
//! its size comes from QMP, not from opening it), then a qcow2 node added with no backing, so
//! that one `transaction` of `blockdev-snapshot`s can switch every disk at the same instant.

use crate::error::{Error, Result};
use crate::qemu::{BlockCommit, BlockdevAddOverlay, FileNode};
use crate::SnapshotName;
use qsnap_qmp::{types, Qmp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A writable disk the snapshot switches to an overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskPlan {
    /// Device id (`-drive` id) or, for `-blockdev`, the top node name.
    pub device: String,
    /// The node that becomes the overlay's backing (QEMU's name, maybe `#block123`).
    pub node: String,
    /// Its image: frozen from the snapshot on.
    pub image: PathBuf,
    /// Its format.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The overlay to create.
    pub overlay: PathBuf,
    /// Our node name for the overlay.
    pub overlay_node: String,
    /// The frozen image's size and modification time right after the snapshot, so a later
    /// revert can tell that nobody changed it.
    #[serde(default)]
    pub frozen: Option<ImageStamp>,
}

/// An image file's size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageStamp {
    /// Size in bytes.
    pub bytes: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
}

impl ImageStamp {
    /// Reads the stamp of `path`.
    pub async fn read(path: &Path) -> Result<ImageStamp> {
        let m = tokio::fs::metadata(path)
            .await
            .map_err(|source| Error::Io {
                what: "reading an image's size and time",
                path: path.to_owned(),
                source,
            })?;
        let mtime_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(ImageStamp {
            bytes: m.len(),
            mtime_ns,
        })
    }
}

/// A device the snapshot leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SkippedDisk {
    /// Device id or node name.
    pub device: String,
    /// `read-only` or `empty`.
    pub reason: String,
}

/// Plans the overlays: one per writable disk. Changes nothing.
pub async fn plan(
    qmp: &Qmp,
    snap: &SnapshotName,
    overlay_dir: Option<&Path>,
    stems: &BTreeMap<String, String>,
) -> Result<(Vec<DiskPlan>, Vec<SkippedDisk>)> {
    let blocks = qmp
        .execute(types::query_block {})
        .await
        .map_err(Error::qmp("listing block devices"))?;
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for (i, b) in blocks.into_iter().enumerate() {
        let Some(ins) = b.inserted else {
            skipped.push(SkippedDisk {
                device: b.device,
                reason: "empty".into(),
            });
            continue;
        };
        let device = device_label(&b.device, b.qdev.as_deref(), ins.node_name.as_deref());
        if ins.ro {
            skipped.push(SkippedDisk {
                device,
                reason: "read-only".into(),
            });
            continue;
        }
        let node = ins
            .node_name
            .clone()
            .ok_or_else(|| Error::DiskNotSnapshottable {
                device: device.clone(),
                why: "QEMU reports no node name for it".into(),
            })?;
        let image = absolute_image(qmp, &ins.file).await;
        if !image.is_absolute() {
            return Err(Error::DiskNotSnapshottable {
                device,
                why: format!(
                    "its image {:?} is not a plain file path (network or json: images are not supported)",
                    ins.file
                ),
            });
        }
        let mut stem = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("disk{i}"));
        // Our own overlay (`disk.s1.qcow2`): name the next one `disk.s2.qcow2`, not
        // `disk.s1.s2.qcow2`, so names do not grow along the chain.
        if let Some(given) = stems.get(&device) {
            stem = given.clone();
        } else if node.starts_with(OVERLAY_NODE_PREFIX) {
            if let Some((base, _)) = stem.rsplit_once('.') {
                stem = base.to_owned();
            }
        }
        let dir = overlay_dir
            .map(Path::to_owned)
            .or_else(|| image.parent().map(Path::to_owned))
            .unwrap_or_default();
        disks.push(DiskPlan {
            device,
            node,
            format: ins.drv.clone(),
            size: ins.image.base.virtual_size.max(0) as u64,
            overlay: dir.join(format!("{stem}.{snap}.qcow2")),
            overlay_node: format!("{OVERLAY_NODE_PREFIX}{}-{i}", short_hash(snap.as_str())),
            image,
            frozen: None,
        });
    }
    Ok((disks, skipped))
}

/// An image path as QEMU reports it, made absolute: QEMU gives a path as its command line
/// did, so a relative one is resolved against QEMU's working directory (from its /proc entry,
/// when it runs on this host). Network and `json:` names are returned as they are.
pub(crate) async fn absolute_image(qmp: &Qmp, file: &str) -> PathBuf {
    // A format node over a plain file whose backing QEMU cannot name simply (a relative
    // backing path, say) is reported as `json:{…"file":{"driver":"file","filename":…}}`.
    let plain = file
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .filter(|v| v["file"]["driver"] == "file")
        .and_then(|v| v["file"]["filename"].as_str().map(str::to_owned));
    let file = plain.as_deref().unwrap_or(file);
    let image = PathBuf::from(file);
    if image.is_absolute() || file.starts_with("json:") || file.contains("://") {
        return image;
    }
    let Some(pid) = qmp.peer_pid() else {
        return image;
    };
    match tokio::fs::read_link(format!("/proc/{pid}/cwd")).await {
        Ok(cwd) => cwd.join(image),
        Err(_) => image,
    }
}

/// Node names qsnap gives its overlays.
const OVERLAY_NODE_PREFIX: &str = "qsnap-";

/// The stable name qsnap gives a disk: the `-drive` id, else the guest device's id (`-device …,id=vd0`
/// of a `-blockdev` disk), else QEMU's paths. Not the node name: that changes with every
/// snapshot.
pub fn device_label(device: &str, qdev: Option<&str>, node: Option<&str>) -> String {
    if !device.is_empty() {
        return device.to_owned();
    }
    match qdev {
        Some(q) => q
            .strip_prefix("/machine/peripheral/")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or(q)
            .to_owned(),
        None => node.unwrap_or_default().to_owned(),
    }
}

/// An 8-hex-digit FNV-1a hash: keeps node names short (QEMU allows 31 characters).
fn short_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// Creates the overlay image file (refusing to overwrite one).
pub async fn create_overlay_file(d: &DiskPlan) -> Result<()> {
    if tokio::fs::symlink_metadata(&d.overlay).await.is_ok() {
        return Err(Error::TargetExists {
            path: d.overlay.clone(),
        });
    }
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", &d.format, "-b"])
        .arg(&d.image)
        .arg(&d.overlay)
        .arg(d.size.to_string())
        .output()
        .await
        .map_err(|source| Error::Io {
            what: "running qemu-img",
            path: d.overlay.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ImageTool {
            path: d.overlay.clone(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Adds the overlay file as a qcow2 node with no backing yet (the switch attaches it).
pub(crate) async fn add_overlay_node(qmp: &Qmp, d: &DiskPlan) -> Result<()> {
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
    .map(drop)
    .map_err(Error::qmp("adding an overlay node"))
}

/// Switches every disk to its overlay in one `transaction`: all or none, at one instant.
pub(crate) async fn switch(qmp: &Qmp, disks: &[DiskPlan]) -> Result<()> {
    if disks.is_empty() {
        return Ok(());
    }
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
    .map(drop)
    .map_err(Error::qmp("switching the disks to their overlays"))
}

/// Undoes a switch while the VM runs: an active commit of the overlay into its base, pivot,
/// then the overlay node goes. The overlay file is left for the caller to delete.
pub(crate) async fn merge_back(qmp: &Qmp, d: &DiskPlan) -> Result<()> {
    const LIMIT: Duration = Duration::from_secs(120);
    let job = format!("merge-{}", d.overlay_node);
    let is_job = |e: &qsnap_qmp::Event, names: &[&str]| {
        names.contains(&e.name.as_str()) && e.data["device"].as_str() == Some(job.as_str())
    };
    let mut events = qmp.events();
    qmp.execute(BlockCommit {
        job_id: job.clone(),
        device: d.overlay_node.clone(),
        base_node: d.node.clone(),
    })
    .await
    .map_err(Error::qmp("merging an overlay back (block-commit)"))?;
    let ev = events
        .wait_for("the merge to be ready", LIMIT, |e| {
            is_job(
                e,
                &["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"],
            )
        })
        .await
        .map_err(Error::qmp("waiting for the merge"))?;
    if ev.name != "BLOCK_JOB_READY" {
        return Err(Error::BlockJob {
            job,
            desc: format!("{}: {}", ev.name, ev.data),
        });
    }
    qmp.execute(types::job_complete { id: job.clone() })
        .await
        .map_err(Error::qmp("pivoting back to the base image"))?;
    let ev = events
        .wait_for("the merge to complete", LIMIT, |e| {
            is_job(e, &["BLOCK_JOB_COMPLETED"])
        })
        .await
        .map_err(Error::qmp("waiting for the merge"))?;
    if let Some(err) = ev.data["error"].as_str() {
        return Err(Error::BlockJob {
            job,
            desc: err.to_owned(),
        });
    }
    qmp.execute(types::blockdev_del {
        node_name: d.overlay_node.clone(),
    })
    .await
    .map(drop)
    .map_err(Error::qmp("removing the merged overlay node"))
}
