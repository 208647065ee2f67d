//! The merge rule of the module doc (`mod.rs`) as pure functions over the reference graph:
//! which step, if any, each disk takes next. Never does I/O, talks to QEMU or writes the
//! store: `check` reads the same answer a repair acts on.

use crate::store::{MergeKind, MergeStep, VmRecord};
use crate::vm::refs::{self, Graph, Live};
use std::path::{Path, PathBuf};

/// A step with the details needed to run it now.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// Unlink an image nothing uses.
    Remove { device: String, image: PathBuf },
    /// Merge two layers.
    Merge(MergeStep),
}

/// What is left to do right now: at most one step per disk.
pub(crate) fn next_round(g: &Graph, record: &VmRecord, live: Option<&Live>) -> Vec<Step> {
    let mut steps = Vec::new();
    for (device, images) in &g.by_device {
        // Bottom of the chain first: commits into an original image copy the least.
        let mut ordered: Vec<&PathBuf> = images.iter().collect();
        ordered.sort_by_key(|i| std::cmp::Reverse(depth(g, i)));
        for x in ordered {
            if let Some(step) = step_for(g, record, live, device, x) {
                steps.push(step);
                break;
            }
        }
    }
    steps
}

/// How many layers sit above `image` at most (0 for a top).
fn depth(g: &Graph, image: &Path) -> usize {
    g.children(image)
        .iter()
        .map(|c| 1 + depth(g, c))
        .max()
        .unwrap_or(0)
}

fn step_for(
    g: &Graph,
    record: &VmRecord,
    live: Option<&Live>,
    device: &str,
    x: &Path,
) -> Option<Step> {
    let owned = |p: &Path| record.owned_images.iter().any(|o| o == p);
    let needed = |p: &Path| {
        g.uses_of(p)
            .iter()
            .any(|u| !matches!(u, refs::Use::Original { .. }))
    };
    if needed(x) || g.pinned_elsewhere(x) {
        return None;
    }
    let kids = g.children(x);
    let live_chain = live.map(|l| l.chain(device)).unwrap_or_default();
    match kids.as_slice() {
        [] if owned(x) && !is_original(g, x) && !live_chain.iter().any(|p| p == x) => {
            Some(Step::Remove {
                device: device.to_owned(),
                image: x.to_owned(),
            })
        }
        [c] => {
            let kind = if owned(x) && !is_original(g, x) {
                MergeKind::Stream
            } else if owned(c) && !g.pinned_elsewhere(c) && !is_original(g, c) {
                MergeKind::Commit
            } else {
                return None;
            };
            let lower_backing = g.backing.get(x).cloned().flatten();
            Some(Step::Merge(MergeStep {
                device: device.to_owned(),
                kind,
                lower: x.to_owned(),
                upper: c.clone(),
                lower_backing_format: lower_backing
                    .as_ref()
                    .and_then(|b| g.format.get(b).cloned()),
                lower_backing,
                lower_format: g.format.get(x).cloned().unwrap_or_else(|| "qcow2".into()),
                upper_children: g.children(c),
                live: live_chain.iter().any(|p| p == c),
                job: None,
            }))
        }
        _ => None,
    }
}

fn is_original(g: &Graph, p: &Path) -> bool {
    g.uses_of(p)
        .iter()
        .any(|u| matches!(u, refs::Use::Original { .. }))
}

/// Whether anything is left to merge (a merge, not a removal: a layer nothing uses at all
/// is an orphan, which `check` reports as such).
pub(crate) fn has_merges(g: &Graph, record: &VmRecord, live: Option<&Live>) -> bool {
    next_round(g, record, live)
        .iter()
        .any(|s| matches!(s, Step::Merge(_)))
}

pub(super) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The image a finished step unlinks.
pub(super) fn removed_by(m: &MergeStep) -> &Path {
    match m.kind {
        MergeKind::Stream => &m.lower,
        MergeKind::Commit => &m.upper,
    }
}
