//! What QEMU's block layer looks like right now: the one reader of `query-block` and
//! `query-named-block-nodes`, so that every part of the engine (snapshot planning, the VM
//! record, rollback, delete, `info`) sees disks, image paths and chains the same way.
//!
//! Image paths are made absolute here: QEMU reports a path as its command line gave it, so a
//! relative one is resolved against QEMU's working directory, and QEMU's `json:{…}` name for
//! a format node over a plain file is read through.
//!
//! A pure reader: it never sends a command that changes anything. The node list is asked for
//! through `snapshot::jobs::list_nodes`, which first dismisses an ended stream job a killed
//! qsnap left (QEMU crashes on the listing otherwise).

use crate::error::{Error, Result};
use crate::qemu::{BlockInfo, ImageInfo, QueryBlock, QueryNamedBlockNodes};
use qsnap_qmp::Qmp;
use std::path::{Path, PathBuf};

/// One guest disk as QEMU runs it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The name qsnap uses for it: the `-drive` id, else the guest device's id.
    pub device: String,
    /// The `-drive` id / legacy device name (empty for `-blockdev` disks).
    pub drive: String,
    /// The guest device's id or QOM path.
    pub qdev: Option<String>,
    /// The medium, or `None` for an empty drive.
    pub medium: Option<Medium>,
}

/// What is inserted in a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Medium {
    /// The top node's name (QEMU's `#block123` for `-drive`).
    pub node: Option<String>,
    /// The top image as QEMU names it (a path, maybe relative, or `json:{…}`).
    pub raw_file: String,
    /// Read-only.
    pub read_only: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// The chain, top (the image written) first.
    pub chain: Vec<Layer>,
}

/// One image of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The image, absolute when it is a local file.
    pub image: PathBuf,
    /// Its format.
    pub format: String,
}

impl Medium {
    /// The top image (what the VM writes to).
    pub fn top(&self) -> &Path {
        &self.chain[0].image
    }

    /// The top image's format.
    pub fn format(&self) -> &str {
        &self.chain[0].format
    }
}

impl Disk {
    /// The top image, if a medium is inserted.
    pub fn top(&self) -> Option<&Path> {
        self.medium.as_ref().map(Medium::top)
    }
}

/// Every block device, in QEMU's order.
pub async fn read(qmp: &Qmp) -> Result<Vec<Disk>> {
    let blocks = qmp
        .execute(QueryBlock {})
        .await
        .map_err(Error::qmp("listing block devices"))?;
    let cwd = qemu_cwd(qmp).await;
    Ok(blocks
        .into_iter()
        .map(|b| disk(b, cwd.as_deref()))
        .collect())
}

fn disk(b: BlockInfo, cwd: Option<&Path>) -> Disk {
    let device = device_label(
        &b.device,
        b.qdev.as_deref(),
        b.inserted.as_ref().and_then(|i| i.node_name.as_deref()),
    );
    let medium = b.inserted.map(|ins| {
        let mut chain = Vec::new();
        let mut at: Option<&ImageInfo> = ins.image.as_ref();
        while let Some(img) = at {
            chain.push(Layer {
                image: absolute(&img.filename, cwd),
                format: img.format.clone(),
            });
            at = img.backing_image.as_deref();
        }
        if chain.is_empty() {
            chain.push(Layer {
                image: absolute(&ins.file, cwd),
                format: ins.drv.clone(),
            });
        }
        Medium {
            node: ins.node_name,
            raw_file: ins.file,
            read_only: ins.ro,
            size: ins
                .image
                .as_ref()
                .map_or(0, |i| u64::try_from(i.virtual_size).unwrap_or(0)),
            chain,
        }
    });
    Disk {
        device,
        drive: b.device,
        qdev: b.qdev,
        medium,
    }
}

/// A named node and the image it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its node name.
    pub name: String,
    /// Its image, absolute when it is a local file.
    pub image: PathBuf,
    /// Its driver (`qcow2`, `raw`, `file`, …).
    pub driver: String,
}

/// Every named node (format and protocol nodes alike).
///
/// Never call this directly: QEMU (10.0.2) crashes when asked while a `block-stream` job has
/// ended undismissed. [`crate::snapshot::jobs::list_nodes`] settles such jobs first, then
/// calls this.
pub(crate) async fn nodes_unguarded(qmp: &Qmp) -> Result<Vec<Node>> {
    let all = qmp
        .execute(QueryNamedBlockNodes { flat: true })
        .await
        .map_err(Error::qmp("listing block nodes"))?;
    let cwd = qemu_cwd(qmp).await;
    Ok(all
        .into_iter()
        .filter_map(|n| {
            Some(Node {
                name: n.node_name?,
                image: absolute(&n.file, cwd.as_deref()),
                driver: n.drv,
            })
        })
        .collect())
}

/// The chain of disk `device` (top first), empty for an unknown or empty disk.
pub fn chain_of(disks: &[Disk], device: &str) -> Vec<PathBuf> {
    disks
        .iter()
        .find(|d| d.device == device)
        .and_then(|d| d.medium.as_ref())
        .map(|m| m.chain.iter().map(|l| l.image.clone()).collect())
        .unwrap_or_default()
}

/// The format node that opens `image`, if QEMU has one.
pub fn format_node_for<'a>(nodes: &'a [Node], image: &Path) -> Option<&'a Node> {
    nodes
        .iter()
        .find(|n| n.image == image && n.driver != "file" && n.driver != "host_device")
}

/// QEMU's working directory (relative image paths are relative to it).
async fn qemu_cwd(qmp: &Qmp) -> Option<PathBuf> {
    let pid = qmp.peer_pid()?;
    tokio::fs::read_link(format!("/proc/{pid}/cwd")).await.ok()
}

/// An image name as QEMU reports it, made absolute. Network and `json:` names that are not a
/// plain file are returned as they are (callers refuse them).
fn absolute(file: &str, cwd: Option<&Path>) -> PathBuf {
    let plain = file
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|v| {
            // A format node over a plain file: {"driver":"qcow2","file":{"driver":"file","filename":…}}
            if v["file"]["driver"] == "file" {
                v["file"]["filename"].as_str().map(str::to_owned)
            } else if v["driver"] == "file" {
                v["filename"].as_str().map(str::to_owned)
            } else {
                None
            }
        });
    let file = plain.as_deref().unwrap_or(file);
    let image = PathBuf::from(file);
    if file.starts_with("json:") || file.contains("://") {
        return image;
    }
    if image.is_absolute() {
        return crate::store::plain_path(&image);
    }
    match cwd {
        Some(cwd) => crate::store::plain_path(&cwd.join(image)),
        None => image,
    }
}

/// The stable name qsnap gives a disk: the `-drive` id, else the guest device's id
/// (`-device …,id=vd0` of a `-blockdev` disk), else QEMU's paths. Not the node name: that
/// changes with every snapshot.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_absolute_and_json_names_read_through() {
        let cwd = Path::new("/vm");
        assert_eq!(absolute("d.qcow2", Some(cwd)), PathBuf::from("/vm/d.qcow2"));
        assert_eq!(
            absolute("/x/d.qcow2", Some(cwd)),
            PathBuf::from("/x/d.qcow2")
        );
        let j = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"o.qcow2"}}"#;
        assert_eq!(absolute(j, Some(cwd)), PathBuf::from("/vm/o.qcow2"));
        let net = "nbd://host/export";
        assert_eq!(absolute(net, Some(cwd)), PathBuf::from(net));
        assert_eq!(
            device_label("", Some("/machine/peripheral/vd0/virtio-backend"), None),
            "vd0"
        );
        assert_eq!(device_label("drive0", None, Some("#block1")), "drive0");
    }
}
