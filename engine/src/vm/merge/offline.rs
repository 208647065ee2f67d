//! Offline merges with `qemu-img`, and their undo: every disk's data is copied before any
//! header changes. Must never leave a chain changed after a failed round, nor copy a layer
//! down over writes the guest has made since.

use crate::error::Result;
use crate::failpoint;
use crate::image;
use crate::store::{MergeKind, MergeStep};
use crate::vm::Vm;
use std::path::Path;
use tracing::warn;

/// The offline steps of a round: every disk's data is copied first; if one fails, the
/// streams already done are pointed back at their old backing (which still holds its data)
/// so that no disk's chain changes.
pub(super) async fn merge_offline<'a>(
    vm: &Vm,
    steps: &[&'a MergeStep],
    redo: bool,
    report: &(dyn Fn(f64) + Send + Sync),
) -> Result<Vec<&'a MergeStep>> {
    let cancel = vm.cancel();
    let mut streamed: Vec<&MergeStep> = Vec::new();
    let n = steps.len();
    for (i, m) in steps.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let part = |f: f64| report((i as f64 + f) / n as f64);
        let r = async {
            match m.kind {
                MergeKind::Stream => {
                    if redo {
                        // X is unlinked only once C was synced after its copy: gone, done.
                        let lower = m.lower.clone();
                        if !crate::store::blocking(move || crate::store::exists(&lower)).await? {
                            return Ok(());
                        }
                        // C moved off X, but its copy need not be durable: qemu-img (and QEMU)
                        // write the new backing into C's header before C's last metadata flush,
                        // so a power cut can keep the header and lose the copied clusters. C
                        // backs onto X again (it reads the same: what C holds, X's chain says
                        // too or C wrote later) and is streamed again.
                        let info = image::info(&m.upper, cancel).await?;
                        if info.full_backing_filename.as_ref() != Some(&m.lower) {
                            image::set_backing(&m.upper, &m.lower, &m.lower_format, cancel).await?;
                        }
                    }
                    match &m.lower_backing {
                        Some(b) => {
                            let fmt = m.lower_backing_format.as_deref().unwrap_or("raw");
                            image::rebase_keeping_content(&m.upper, b, fmt, cancel, &part).await
                        }
                        None => {
                            image::rebase_keeping_content(
                                &m.upper,
                                Path::new(""),
                                "qcow2",
                                cancel,
                                &part,
                            )
                            .await
                        }
                    }
                }
                MergeKind::Commit => {
                    // Gone: the interrupted run got as far as its unlink (which comes only
                    // after the data moved), and a power cut took QEMU along with qsnap.
                    let upper = m.upper.clone();
                    if redo && !crate::store::blocking(move || crate::store::exists(&upper)).await?
                    {
                        return Ok(());
                    }
                    if redo && !vm_may_commit_offline(vm, m).await? {
                        return Ok(());
                    }
                    image::commit(&m.upper, cancel, &part).await
                }
            }
        }
        .await;
        let mut r = r;
        if r.is_ok() && m.kind == MergeKind::Stream {
            streamed.push(m);
        }
        if r.is_ok() && i + 1 < n {
            r = failpoint::hit("delete.merge-started", None).await;
        }
        if let Err(e) = r {
            point_back(&streamed).await;
            return Err(e);
        }
    }
    Ok(streamed)
}

/// Undoes offline streams: each upper image backs onto the layer it was streamed from again
/// (which still holds its data, so the content does not change). With a token of its own: a
/// Ctrl-C that stopped the copy must not stop the undo.
pub(super) async fn point_back(streamed: &[&MergeStep]) {
    let cancel = tokio_util::sync::CancellationToken::new();
    for s in streamed {
        // A layer already gone (a redo found the stream finished and its layer unlinked) is
        // not pointed back at: the image holds its data, and would name a missing file.
        if !matches!(tokio::fs::try_exists(&s.lower).await, Ok(true)) {
            continue;
        }
        if let Err(undo) = image::set_backing(&s.upper, &s.lower, &s.lower_format, &cancel).await {
            warn!(error = %undo, image = %s.upper.display(), "could not point a streamed image back");
        }
    }
}

/// An interrupted commit may be redone offline only while the upper layer is still what
/// the disk's chain runs through: once QEMU had switched the disk to the lower image (and
/// the guest may have written there), copying the upper layer down again would undo the
/// guest's writes.
async fn vm_may_commit_offline(vm: &Vm, m: &MergeStep) -> Result<bool> {
    let record = vm.store().record(vm.name()).await?;
    Ok(!record
        .disks
        .iter()
        .any(|d| d.device == m.device && d.image == m.lower))
}
