//! Finishing a step once its data moved: headers, manifests and the record name what stays,
//! frozen snapshots get new stamps, QEMU lets go of the layer that goes, then it is unlinked.
//! Must never unlink before what the merge wrote is durable, nor but through
//! `refs::safe_unlink`.

use super::live::release_nodes;
use super::plan::removed_by;
use super::{view, Seen};
use crate::blocks::Node;
use crate::error::Result;
use crate::failpoint;
use crate::image;
use crate::snapshot::jobs;
use crate::store::{MergeKind, MergeStep, VmRecord};
use crate::vm::refs::{self, Live};
use crate::vm::Vm;
use std::path::{Path, PathBuf};

/// After the data moved: headers, names, and the unlink. `before_jobs`: QEMU's nodes as the
/// look just before the merge's jobs named them (for a live merge). Returns QEMU's view as
/// the reference guard saw it (nothing in QEMU changes after it), and the other VMs as it
/// read them.
pub(super) async fn finish_step(
    vm: &Vm,
    record: &mut VmRecord,
    m: &MergeStep,
    before_jobs: Option<&[Node]>,
) -> Result<Seen> {
    let cancel = vm.cancel();
    // Files whose bytes this step changed (their content as a chain did not): the snapshots
    // that freeze them get new stamps, or a revert would take them for tampered with.
    let mut touched: Vec<PathBuf> = Vec::new();
    if m.kind == MergeKind::Commit {
        // Everything that named C names X: children's headers, manifests, the record.
        for child in &m.upper_children {
            if tokio::fs::symlink_metadata(child).await.is_err() {
                continue;
            }
            let info = image::info(child, cancel).await?;
            if info.full_backing_filename.as_deref() == Some(&m.upper) {
                image::set_backing(child, &m.lower, &m.lower_format, cancel).await?;
            }
            // (QEMU rewrote it itself after a live commit.)
            touched.push(child.clone());
        }
        for mut man in vm.store().manifests(vm.name()).await? {
            let mut changed = false;
            for d in &mut man.snapshot.disks {
                if d.image == m.upper {
                    d.image = m.lower.clone();
                    d.format = m.lower_format.clone();
                    changed = true;
                }
            }
            if changed {
                vm.store().replace_manifest(&man).await?;
            }
        }
        touched.push(m.lower.clone());
        if retarget(record, &m.upper, &m.lower) {
            vm.store().write_record(record).await?;
        }
    } else {
        touched.push(m.upper.clone());
    }
    // What the merge wrote (the data, and headers that no longer name the layer that goes)
    // is made durable before that layer is unlinked: after a power cut the surviving chain
    // must not back onto a file that is gone.
    for f in &touched {
        if tokio::fs::symlink_metadata(f).await.is_ok() {
            image::sync(f).await?;
        }
    }
    restamp(vm, &touched).await?;
    let gone = removed_by(m).to_owned();
    release_if_unused(vm, record, &gone, before_jobs).await;
    let manifests = vm.store().manifests(vm.name()).await?;
    let (graph, live) = view(vm, record, &manifests).await?;
    refs::safe_unlink(&gone, &graph, record, live.as_ref()).await?;
    forget_owned(vm, record, &gone).await?;
    Ok(Seen::of(&graph, live))
}

/// New stamps for the snapshots that freeze any of `files`. A stamp that cannot be read is an
/// error (the journal then keeps the round, and a repair restamps): a snapshot must never be
/// left without its tamper check, nor with one its own merge made false.
pub(super) async fn restamp(vm: &Vm, files: &[PathBuf]) -> Result<()> {
    for mut man in vm.store().manifests(vm.name()).await? {
        let mut changed = false;
        for d in &mut man.snapshot.disks {
            if files.contains(&d.image) {
                failpoint::hit("delete.restamp", None).await?;
                let now = Some(image::stamp_durable(&d.image).await?);
                if d.frozen != now {
                    d.frozen = now;
                    changed = true;
                }
            }
        }
        if changed {
            vm.store().replace_manifest(&man).await?;
        }
    }
    Ok(())
}

/// A running QEMU may still hold nodes for an image that left every chain (an overlay added
/// with `blockdev-add`, a `-blockdev` of the command line, or an interrupted run that did not
/// get to release them): they go before the file does. The reference guard in front of the
/// unlink looks again, in full, and refuses a file QEMU still has open.
async fn release_if_unused(vm: &Vm, record: &VmRecord, image: &Path, before: Option<&[Node]>) {
    let Ok(qmp) = vm.connect_quick(record).await else {
        return;
    };
    // The nodes the look before the jobs named for the image: those now loose are released
    // (from the block graph alone, where a full look costs ≈ 20 times more on a long chain).
    let held: Vec<Node> = before
        .unwrap_or_default()
        .iter()
        .filter(|n| n.image == image)
        .cloned()
        .collect();
    if !held.is_empty() {
        match jobs::loose_nodes_of(&qmp, &held).await {
            Ok(Some(loose)) => {
                release_nodes(&qmp, &loose.iter().collect::<Vec<_>>()).await;
                // Test builds insist that this released what a full look would have.
                #[cfg(feature = "testing")]
                if let Ok(live) = Live::read(&qmp).await {
                    assert!(
                        live.in_chain(image) || !live.has_open(image),
                        "nodes of {} left after its release from the block graph: {:?}",
                        image.display(),
                        live.nodes
                    );
                }
                return;
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
    let Ok(live) = Live::read(&qmp).await else {
        return;
    };
    if !live.in_chain(image) {
        let nodes: Vec<&Node> = live.nodes.iter().filter(|n| n.image == image).collect();
        release_nodes(&qmp, &nodes).await;
    }
}

/// Points the record's disks at `to` where they named `from`. True if something changed.
fn retarget(record: &mut VmRecord, from: &Path, to: &Path) -> bool {
    let mut changed = false;
    for d in &mut record.disks {
        if d.image == from {
            d.image = to.to_owned();
            d.owned = record.owned_images.iter().any(|o| o == to);
            changed = true;
        }
    }
    changed
}

/// Drops an unlinked image from the record's owned images.
pub(super) async fn forget_owned(vm: &Vm, record: &mut VmRecord, image: &Path) -> Result<()> {
    let before = record.owned_images.len();
    record.owned_images.retain(|o| o != image);
    if record.owned_images.len() != before {
        vm.store().write_record(record).await?;
    }
    Ok(())
}
