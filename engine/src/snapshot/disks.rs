//! Which disks a snapshot covers, and their qcow2 overlays.
//!
//! Read-only devices and empty drives are skipped (and reported). Each writable disk gets an
//! overlay file (`image.rs`: 0600, never over an existing file; the base is locked by the
//! running QEMU, so its size comes from QMP), then a qcow2 node with no backing, so that one
//! `transaction` of `blockdev-snapshot`s switches every disk at the same instant. Where a disk
//! is now is always asked of QEMU (`positions`), never assumed: a command that timed out
//! may still have run.
//!
//! Before a disk is frozen (and before `run` or `attach` records one), the image path qsnap
//! resolved for it must be the very file QEMU has open (`check_open`): a path that leads
//! elsewhere (a relative name QEMU resolved in a directory it has left, a file replaced since)
//! or nowhere (the temporary file of `snapshot=on`) would put the guest's writes, or the
//! snapshot's, where no later start can find them. It must never guess: a doubt refuses.

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
    let now = blocks::read(qmp).await?;
    let frozen: Vec<blocks::Disk> = now
        .iter()
        .filter(|d| d.medium.as_ref().is_some_and(|m| !m.read_only))
        .cloned()
        .collect();
    if let Err(e) = check_open(qmp.peer_pid(), &frozen).await? {
        return Err(Error::DiskNotSnapshottable {
            device: e.device,
            why: e.why,
        });
    }
    for (i, d) in now.into_iter().enumerate() {
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
        if m.chain.len() >= blocks::MAX_CHAIN {
            return Err(Error::DiskNotSnapshottable {
                device: d.device,
                why: format!(
                    "its backing chain is {} images long; qsnap makes chains of at most {} \
                     images, so that it can always read QEMU's description of them: delete \
                     snapshots first",
                    m.chain.len(),
                    blocks::MAX_CHAIN
                ),
            });
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
            .map(crate::store::plain_path)
            .or_else(|| image.parent().map(Path::to_owned))
            .unwrap_or_default();
        let taken: Vec<PathBuf> = disks
            .iter()
            .map(|d: &SnapshotDisk| d.overlay.clone())
            .collect();
        let overlay = free_overlay(&dir, &stem, snap.as_str(), &taken).await?;
        disks.push(SnapshotDisk {
            device: d.device,
            node,
            format: m.format().to_owned(),
            size: m.size,
            // From the overlay's path, which no file has: a name from the snapshot's alone
            // is the node of the overlay a deleted snapshot of that name left in use.
            overlay_node: format!(
                "{OVERLAY_NODE_PREFIX}{}-{i}",
                short_hash(&overlay.to_string_lossy())
            ),
            overlay,
            image,
            frozen: None,
        });
    }
    Ok((disks, skipped))
}

/// Where a new overlay of `stem` for snapshot `snap` goes in `dir`: `STEM.SNAP.qcow2`, or,
/// when a file has that name (the overlay a deleted snapshot of the same name made, which the
/// VM may still write to) or another disk of this snapshot takes it, the first free
/// `STEM.SNAP-2.qcow2`, `-3`, …. qsnap names overlays itself, so a taken name is no reason to
/// refuse a snapshot — and never one to overwrite a file (the overlay is created exclusively).
pub(crate) async fn free_overlay(
    dir: &Path,
    stem: &str,
    snap: &str,
    taken: &[PathBuf],
) -> Result<PathBuf> {
    let (dir, stem, snap, taken) = (
        dir.to_owned(),
        stem.to_owned(),
        snap.to_owned(),
        taken.to_vec(),
    );
    crate::store::blocking(move || {
        let first = dir.join(format!("{stem}.{snap}.qcow2"));
        for n in 1..=100u32 {
            let p = match n {
                1 => first.clone(),
                _ => dir.join(format!("{stem}.{snap}-{n}.qcow2")),
            };
            // A directory that cannot be looked into (not one, not ours): the name as it is,
            // for the preflight to refuse with what to do.
            if !taken.contains(&p) && !crate::store::exists(&p).unwrap_or(false) {
                return Ok(p);
            }
        }
        Err(Error::TargetExists { path: first })
    })
    .await
}

/// A disk whose image path is not the file QEMU has open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotOpen {
    /// The disk.
    pub device: String,
    /// What is wrong, and what to do.
    pub why: String,
}

/// Checks that every local image of `disks` (each layer of each chain, as [`blocks`] resolved
/// it) is the file QEMU — process `pid` — has open: the same device and inode as one of its
/// open descriptors (`/proc/PID/fd`). Refuses a deleted file (`snapshot=on`'s temporary
/// overlay), a path that leads nowhere or to another file, a file that cannot be examined,
/// and a relative name when QEMU's descriptors cannot be read (another user's QEMU): qsnap
/// would otherwise record or freeze a path that is not what the guest writes. The outer
/// `Result` is for the store's blocking pool only.
pub(crate) async fn check_open(
    pid: Option<u32>,
    disks: &[blocks::Disk],
) -> Result<std::result::Result<(), NotOpen>> {
    let disks = disks.to_vec();
    crate::store::blocking(move || Ok(check_open_now(pid, &disks))).await
}

/// One of QEMU's open descriptors.
struct OpenFile {
    /// What `/proc` says it points at (`PATH (deleted)` for a deleted file).
    target: PathBuf,
    /// The device and inode of the file it has open.
    id: Option<(u64, u64)>,
}

/// QEMU's open files; `None` when they cannot be read.
fn open_files(pid: u32) -> Option<Vec<OpenFile>> {
    use std::os::unix::fs::MetadataExt;
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).ok()? {
        let fd = e.ok()?.path();
        let Ok(target) = std::fs::read_link(&fd) else {
            continue; // closed meanwhile
        };
        let id = std::fs::metadata(&fd).ok().map(|m| (m.dev(), m.ino()));
        out.push(OpenFile { target, id });
    }
    Some(out)
}

fn check_open_now(pid: Option<u32>, disks: &[blocks::Disk]) -> std::result::Result<(), NotOpen> {
    use std::os::unix::fs::MetadataExt;
    let cwd = pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/cwd")).ok());
    let open = pid.and_then(open_files);
    for d in disks {
        let Some(m) = &d.medium else { continue };
        let refuse = |why: String| NotOpen {
            device: d.device.clone(),
            why,
        };
        // How QEMU named the top image: a relative name was resolved against QEMU's working
        // directory *now*, which need not be the one it opened the file from.
        let raw = plain_name(&m.raw_file);
        let relative = !Path::new(&raw).is_absolute() && !raw.contains("://");
        let from_cwd = |p: &Path| match &cwd {
            Some(c) => format!(
                "QEMU names its image \"{raw}\", a relative path, which from QEMU's working \
                 directory {} is {}",
                c.display(),
                p.display()
            ),
            None => format!("QEMU names its image \"{raw}\", a relative path"),
        };
        const ABSOLUTE: &str = "QEMU resolved it against the directory it started in and has \
            moved since (a daemonized QEMU moves to /), so qsnap cannot follow it; start QEMU \
            with absolute image paths";
        for (k, layer) in m.chain.iter().enumerate() {
            let p = &layer.image;
            if !p.is_absolute() {
                continue; // not a local file: planning refuses it with its own reason
            }
            let top_relative = k == 0 && relative;
            match std::fs::metadata(p) {
                Ok(meta) => match &open {
                    Some(open) if !open.iter().any(|f| f.id == Some((meta.dev(), meta.ino()))) => {
                        return Err(refuse(if top_relative {
                            format!("{}, not the file QEMU has open: {ABSOLUTE}", from_cwd(p))
                        } else {
                            format!(
                                "{} is not the file QEMU has open (it was replaced or renamed \
                                 after QEMU opened it); put the image back, or restart QEMU on \
                                 the image you mean",
                                p.display()
                            )
                        }));
                    }
                    Some(_) => {}
                    None if top_relative => {
                        return Err(refuse(format!(
                            "{}, and QEMU's open files cannot be read to confirm that it is the \
                             file QEMU has open; start QEMU with absolute image paths",
                            from_cwd(p)
                        )))
                    }
                    None => {}
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let deleted = format!("{} (deleted)", p.display());
                    let was_deleted = open
                        .iter()
                        .flatten()
                        .any(|f| f.target.as_os_str() == deleted.as_str());
                    let temp = p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vl.") && n.len() == 9);
                    return Err(refuse(if was_deleted && temp {
                        format!(
                            "it writes to {}, a temporary file QEMU deleted when it opened it: \
                             the drive has snapshot=on, or QEMU runs with -snapshot. The guest's \
                             writes go to that throwaway file and are lost when QEMU exits, and a \
                             snapshot of it could never be reverted or restarted; start QEMU \
                             without snapshot=on and -snapshot (qsnap's snapshots are the way back)",
                            p.display()
                        )
                    } else if was_deleted {
                        format!(
                            "its image {} was deleted after QEMU opened it: the guest writes to a \
                             file no path leads to, which qsnap could never open again",
                            p.display()
                        )
                    } else if top_relative {
                        format!("{}, which does not exist: {ABSOLUTE}", from_cwd(p))
                    } else {
                        format!(
                            "its image {} does not exist (moved or deleted after QEMU opened it)",
                            p.display()
                        )
                    }));
                }
                Err(e) => {
                    return Err(refuse(format!(
                        "its image {} cannot be examined ({e}), so qsnap cannot tell which \
                         file the guest writes",
                        p.display()
                    )))
                }
            }
        }
    }
    Ok(())
}

/// The file name inside QEMU's `json:{…}` name for a format node over a plain file, else the
/// name itself.
fn plain_name(raw: &str) -> String {
    raw.strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|v| {
            v["file"]["filename"]
                .as_str()
                .or_else(|| v["filename"].as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| raw.to_owned())
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
    let nodes = jobs::list_nodes_of(qmp, &now).await?;
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
