//! Which disks a snapshot covers, and their qcow2 overlays.
//!
//! Read-only devices and empty drives are skipped (and reported). Each writable disk gets an
//! overlay file (`image.rs`: 0600, never over an existing file; the base is locked by the
//! running QEMU, so its size comes from QMP), then a qcow2 node with no backing, so that one
//! `transaction` of `blockdev-snapshot`s switches every disk at the same instant. Where a disk
//! is now is always asked of QEMU (`positions`), never assumed: a command that timed out
//! may still have run.

use crate::blocks;
use crate::error::{Error, Result};
use crate::image;
use crate::qemu::{BlockdevAddOverlay, FileNode};
use crate::snapshot::jobs;
use crate::store::{PlannedOverlay, SkippedDisk, SnapshotDisk};
use crate::SnapshotName;
use qsnap_qmp::{types, Qmp};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Plans the overlays: one per writable disk. Changes nothing.
pub async fn plan(
    qmp: &Qmp,
    snap: &SnapshotName,
    overlay_dir: Option<&Path>,
    stems: &BTreeMap<String, String>,
) -> Result<(Vec<SnapshotDisk>, Vec<SkippedDisk>)> {
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for (i, d) in blocks::read(qmp).await?.into_iter().enumerate() {
        let Some(m) = &d.medium else {
            skipped.push(SkippedDisk {
                device: d.device,
                reason: "empty".into(),
            });
            continue;
        };
        if m.read_only {
            skipped.push(SkippedDisk {
                device: d.device,
                reason: "read-only".into(),
            });
            continue;
        }
        let node = m.node.clone().ok_or_else(|| Error::DiskNotSnapshottable {
            device: d.device.clone(),
            why: "QEMU reports no node name for it".into(),
        })?;
        let image = m.top().to_owned();
        if !image.is_absolute() {
            return Err(Error::DiskNotSnapshottable {
                device: d.device,
                why: format!(
                    "its image {:?} is not a plain file path (network or json: images are not supported)",
                    m.raw_file
                ),
            });
        }
        let mut stem = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("disk{i}"));
        // Our own overlay (`disk.s1.qcow2`): name the next one `disk.s2.qcow2`, not
        // `disk.s1.s2.qcow2`, so names do not grow along the chain.
        if let Some(given) = stems.get(&d.device) {
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
        disks.push(SnapshotDisk {
            device: d.device,
            node,
            format: m.format().to_owned(),
            size: m.size,
            overlay: dir.join(format!("{stem}.{snap}.qcow2")),
            overlay_node: format!("{OVERLAY_NODE_PREFIX}{}-{i}", short_hash(snap.as_str())),
            image,
            frozen: None,
        });
    }
    Ok((disks, skipped))
}

/// Node names qsnap gives its overlays.
pub(crate) const OVERLAY_NODE_PREFIX: &str = "qsnap-";

/// An 8-hex-digit FNV-1a hash: keeps node names short (QEMU allows 31 characters).
pub(crate) fn short_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// Creates the overlay image file (0600; refusing to overwrite anything).
pub async fn create_overlay_file(d: &SnapshotDisk, cancel: &CancellationToken) -> Result<()> {
    image::create_overlay(&d.overlay, &d.image, &d.format, d.size, cancel).await
}

/// Adds the overlay file as a qcow2 node with no backing yet (the switch attaches it).
pub(crate) async fn add_overlay_node(qmp: &Qmp, d: &SnapshotDisk) -> Result<()> {
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
pub(crate) async fn switch(qmp: &Qmp, disks: &[SnapshotDisk]) -> Result<()> {
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
    .map_err(Error::qmp("switching the disks to their overlays"))?;
    crate::failpoint::hit("create.switch-sent", qmp.peer_pid()).await
}

/// Where a planned disk is, as QEMU says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// Writing to its new overlay: the switch happened.
    OnOverlay,
    /// Still on its old image; the overlay node exists (added, unused).
    NodeAdded,
    /// Still on its old image; no overlay node.
    Untouched,
}

/// Asks QEMU where each planned disk is.
pub(crate) async fn positions(qmp: &Qmp, disks: &[PlannedOverlay]) -> Result<Vec<Position>> {
    let now = blocks::read(qmp).await?;
    let nodes = blocks::nodes(qmp).await?;
    Ok(disks
        .iter()
        .map(|d| {
            let on_overlay = now.iter().any(|b| {
                b.device == d.device
                    && b.medium.as_ref().is_some_and(|m| {
                        m.node.as_deref() == Some(d.overlay_node.as_str()) || m.top() == d.overlay
                    })
            });
            if on_overlay {
                Position::OnOverlay
            } else if nodes.iter().any(|n| n.name == d.overlay_node) {
                Position::NodeAdded
            } else {
                Position::Untouched
            }
        })
        .collect())
}

/// Undoes a switch while the VM runs: an active commit of the overlay back into the image
/// below it and a pivot, then the overlay node goes. The overlay file is left for the caller.
pub(crate) async fn merge_back(qmp: &Qmp, d: &PlannedOverlay) -> Result<()> {
    crate::failpoint::hit("rollback.merge-back", qmp.peer_pid()).await?;
    let job = format!("qsnap-back-{}", d.overlay_node);
    let disk = jobs::LiveMerge::active_commit(&job, &d.overlay_node, &d.node);
    jobs::run_all(qmp, &[disk], &CancellationToken::new(), &|_| {}).await?;
    delete_node(qmp, &d.overlay_node).await
}

/// Removes a node qsnap added (after it left every chain).
pub(crate) async fn delete_node(qmp: &Qmp, node: &str) -> Result<()> {
    qmp.execute(types::blockdev_del {
        node_name: node.to_owned(),
    })
    .await
    .map(drop)
    .map_err(Error::qmp("removing an overlay node"))
}

/// The overlay paths of `disks`, for messages.
pub(crate) fn overlay_list(disks: &[(String, PathBuf)]) -> String {
    disks
        .iter()
        .map(|(dev, p)| format!("{dev}: {}", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}
