//! Which disks a snapshot covers, and their qcow2 overlays.
//!
//! Read-only devices and empty drives are skipped (and reported). Each writable disk gets an
//! overlay file created with `qemu-img create -u` (the base is locked by the running QEMU, so
//! its size comes from QMP, not from opening it), then a qcow2 node added with no backing, so
//! that one `transaction` of `blockdev-snapshot`s can switch every disk at the same instant.

use crate::error::{Error, Result};
use crate::snapshot::SnapshotName;
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A writable disk the snapshot switches to an overlay.
#[derive(Debug, Clone, Serialize)]
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
}

/// A device the snapshot leaves alone, and why.
#[derive(Debug, Clone, Serialize)]
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
        let device = if b.device.is_empty() {
            ins.node_name.clone().unwrap_or_default()
        } else {
            b.device.clone()
        };
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
        let image = PathBuf::from(&ins.file);
        if !image.is_absolute() || ins.file.starts_with("json:") {
            return Err(Error::DiskNotSnapshottable {
                device,
                why: format!(
                    "its image {:?} is not a plain file path (network or json: images are not supported)",
                    ins.file
                ),
            });
        }
        let stem = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("disk{i}"));
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
            overlay_node: format!("qsnap-{}-{i}", short_hash(snap.as_str())),
            image,
        });
    }
    Ok((disks, skipped))
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
