//! The merge rule of the module doc (`mod.rs`) as pure functions over the reference graph:
//! which step, if any, each disk takes next. Never does I/O, talks to QEMU or writes the
//! store: `check` reads the same answer a repair acts on, and the tests below build the
//! graph by hand, one rule at a time.

use crate::store::{MergeKind, MergeStep, VmRecord};
use crate::vm::refs::{self, Graph, Live};
use std::collections::HashMap;
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
    let depths = depths(g);
    for (device, images) in &g.by_device {
        // Bottom of the chain first: commits into an original image copy the least.
        let mut ordered: Vec<&PathBuf> = images.iter().collect();
        ordered.sort_by_key(|i| std::cmp::Reverse(depths.get(i.as_path()).copied().unwrap_or(0)));
        for x in ordered {
            if let Some(step) = step_for(g, record, live, device, x) {
                steps.push(step);
                break;
            }
        }
    }
    steps
}

/// How many layers sit above each image of the graph at most (0 for a top): one pass over
/// the backing links (a store a hundred snapshots deep is sorted in microseconds, not by
/// walking every chain from every image).
fn depths(g: &Graph) -> HashMap<&Path, usize> {
    let mut kids: HashMap<&Path, Vec<&Path>> = HashMap::new();
    for (c, b) in &g.backing {
        if let Some(b) = b {
            kids.entry(b.as_path()).or_default().push(c.as_path());
        }
    }
    fn depth<'a>(
        x: &'a Path,
        kids: &HashMap<&'a Path, Vec<&'a Path>>,
        memo: &mut HashMap<&'a Path, usize>,
        limit: usize,
    ) -> usize {
        if let Some(d) = memo.get(x) {
            return *d;
        }
        // (A loop in the links cannot come from readable headers; it must not hang here.)
        let d = match kids.get(x) {
            Some(cs) if limit > 0 => cs
                .iter()
                .map(|c| 1 + depth(c, kids, memo, limit - 1))
                .max()
                .unwrap_or(0),
            _ => 0,
        };
        memo.insert(x, d);
        d
    }
    let mut memo = HashMap::new();
    let parents: Vec<&Path> = kids.keys().copied().collect();
    for x in parents {
        depth(x, &kids, &mut memo, g.backing.len());
    }
    memo
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{Disk, Layer, Medium};
    use refs::Use;

    /// One VM's graph, record and (when it runs) QEMU's chains, written the way
    /// `Graph::gather` and `Live::read` would find them, so each rule can be set up alone.
    struct Case {
        g: Graph,
        record: VmRecord,
        live: Option<Live>,
    }

    fn img(name: &str) -> PathBuf {
        PathBuf::from(format!("/store/{name}.qcow2"))
    }

    fn stem(p: &Path) -> String {
        p.file_stem().unwrap().to_string_lossy().into_owned()
    }

    impl Case {
        fn new() -> Case {
            Case {
                g: Graph::default(),
                record: VmRecord::blank("vm"),
                live: None,
            }
        }

        /// `name` in disk `device`'s chains, backing onto `backing`.
        fn layer(mut self, device: &str, name: &str, backing: Option<&str>) -> Case {
            let p = img(name);
            self.g.backing.insert(p.clone(), backing.map(img));
            self.g.format.insert(p.clone(), "qcow2".into());
            self.g.by_device.entry(device.into()).or_default().insert(p);
            self
        }

        fn format(mut self, name: &str, format: &str) -> Case {
            self.g.format.insert(img(name), format.into());
            self
        }

        /// qsnap made `name` for this VM.
        fn made(mut self, name: &str) -> Case {
            self.record.owned_images.push(img(name));
            self
        }

        fn used(mut self, name: &str, u: Use) -> Case {
            self.g.uses.entry(img(name)).or_default().push(u);
            self
        }

        /// The VM's command line names it: it was there before qsnap.
        fn original(self, name: &str) -> Case {
            self.used(name, Use::Original { vm: "vm".into() })
        }

        /// The disk whose chains hold `name` (added with [`Case::layer`] first).
        fn device_of(&self, name: &str) -> String {
            let p = img(name);
            let found = self.g.by_device.iter().find(|(_, set)| set.contains(&p));
            found.map(|(d, _)| d.clone()).expect("a layer first")
        }

        fn current(self, name: &str) -> Case {
            let (vm, device) = ("vm".into(), self.device_of(name));
            self.used(name, Use::Current { vm, device })
        }

        /// qsnap's overlay, what the VM writes to.
        fn top(self, name: &str) -> Case {
            self.made(name).current(name)
        }

        fn frozen(self, name: &str) -> Case {
            let (vm, snapshot, device) = ("vm".into(), "s1".into(), self.device_of(name));
            self.used(
                name,
                Use::Frozen {
                    vm,
                    snapshot,
                    device,
                },
            )
        }

        /// A clone's chain runs through it.
        fn other_vm(self, name: &str) -> Case {
            self.used(name, Use::OtherVm { vm: "clone".into() })
        }

        /// The VM runs; QEMU's chain for `device`, top first.
        fn running(mut self, device: &str, chain: &[&str]) -> Case {
            let layer = |n: &&str| {
                let (image, format) = (img(n), "qcow2".into());
                Layer { image, format }
            };
            let medium = Medium {
                node: None,
                raw_file: img(chain[0]).display().to_string(),
                read_only: false,
                size: 0,
                chain: chain.iter().map(layer).collect(),
            };
            let disk = Disk {
                device: device.into(),
                drive: device.into(),
                qdev: None,
                medium: Some(medium),
            };
            let (disks, nodes) = (Vec::new(), Vec::new());
            let live = self.live.get_or_insert(Live {
                disks,
                nodes,
                pid: None,
                shape: None,
            });
            live.disks.push(disk);
            self
        }

        fn steps(&self) -> Vec<Step> {
            next_round(&self.g, &self.record, self.live.as_ref())
        }

        /// The round, one line per step: `vd0: stream x into top`, `vd0: commit top into
        /// disk` (the child's data goes down), `vd0: remove x`; ` (live)` for a block job.
        fn round(&self) -> Vec<String> {
            self.steps()
                .iter()
                .map(|s| match s {
                    Step::Remove { device, image } => format!("{device}: remove {}", stem(image)),
                    Step::Merge(m) => {
                        let (verb, from, into) = match m.kind {
                            MergeKind::Stream => ("stream", &m.lower, &m.upper),
                            MergeKind::Commit => ("commit", &m.upper, &m.lower),
                        };
                        let live = if m.live { " (live)" } else { "" };
                        format!(
                            "{}: {verb} {} into {}{live}",
                            m.device,
                            stem(from),
                            stem(into)
                        )
                    }
                })
                .collect()
        }
    }

    /// `disk` (original) ← `top` (what the VM writes to), plus `x`, a second child of `disk`
    /// that nothing names: what a revert abandons.
    fn beside_the_top() -> Case {
        Case::new()
            .layer("vd0", "disk", None)
            .original("disk")
            .layer("vd0", "top", Some("disk"))
            .top("top")
            .layer("vd0", "x", Some("disk"))
    }

    /// `x` alone in vd0's chains: no child, no backing.
    fn alone() -> Case {
        Case::new().layer("vd0", "x", None)
    }

    /// `x` ← `top` (qsnap's, what the VM writes to).
    fn under_the_top() -> Case {
        Case::new()
            .layer("vd0", "x", None)
            .layer("vd0", "top", Some("x"))
            .top("top")
    }

    /// `disk` (original) ← `top` (what the VM writes to).
    fn on_the_original() -> Case {
        Case::new()
            .layer("vd0", "disk", None)
            .original("disk")
            .layer("vd0", "top", Some("disk"))
            .current("top")
    }

    /// The rule table of the module doc, one row per line of it (and per image it leaves
    /// alone). Each row is set up so that the round changes if its rule is dropped.
    #[test]
    fn the_merge_rule_table() {
        let rows: Vec<(&str, Case, &[&str])> = vec![
            // X has no child, qsnap made it → unlink X
            (
                "no child, made by qsnap: unlinked",
                beside_the_top().made("x"),
                &["vd0: remove x"],
            ),
            (
                "no child, made by qsnap, the VM running on another chain: unlinked",
                beside_the_top().made("x").running("vd0", &["top", "disk"]),
                &["vd0: remove x"],
            ),
            ("no child, not made by qsnap: stays", beside_the_top(), &[]),
            (
                "no child, an original image (even one recorded as made): never unlinked",
                alone().made("x").original("x"),
                &[],
            ),
            (
                "no child, in the running QEMU's chain: stays",
                alone().made("x").running("vd0", &["x"]),
                &[],
            ),
            // X has one child C, qsnap made X → stream
            (
                "one child, X made by qsnap: streamed into the child",
                under_the_top().made("x"),
                &["vd0: stream x into top"],
            ),
            (
                "one child, the child in the running QEMU: a live stream",
                under_the_top().made("x").running("vd0", &["top", "x"]),
                &["vd0: stream x into top (live)"],
            ),
            // X has one child C, X is original (and qsnap made C) → commit
            (
                "one child, X original, the child made by qsnap: committed into X",
                on_the_original().made("top"),
                &["vd0: commit top into disk"],
            ),
            (
                "one child, X original though recorded as made: committed, never streamed away",
                on_the_original().made("top").made("disk"),
                &["vd0: commit top into disk"],
            ),
            (
                "one child, X original, the child not made by qsnap: stays",
                on_the_original(),
                &[],
            ),
            (
                "one child, X original, the child original too: stays",
                on_the_original().made("top").original("top"),
                &[],
            ),
            (
                "one child, X original, the child in a clone's chain: stays",
                Case::new()
                    .layer("vd0", "disk", None)
                    .original("disk")
                    .layer("vd0", "s1", Some("disk"))
                    .made("s1")
                    .frozen("s1")
                    .other_vm("s1")
                    .layer("vd0", "top", Some("s1"))
                    .top("top"),
                &[],
            ),
            // X has two or more children → stays
            (
                "two children: a shared base stays",
                Case::new()
                    .layer("vd0", "x", None)
                    .made("x")
                    .layer("vd0", "a", Some("x"))
                    .top("a")
                    .layer("vd0", "b", Some("x"))
                    .made("b")
                    .frozen("b"),
                &[],
            ),
            // Only images nothing else names are merged at all.
            (
                "frozen by a snapshot: stays",
                under_the_top().made("x").frozen("x"),
                &[],
            ),
            (
                "a VM writes to it: stays",
                alone().made("x").current("x"),
                &[],
            ),
            (
                "in a clone's chain: stays",
                under_the_top().made("x").other_vm("x"),
                &[],
            ),
            // Rounds: bottom of the chain first, at most one step per disk.
            (
                "bottom of the chain first (the names sort top first)",
                Case::new()
                    .layer("vd0", "d", None)
                    .original("d")
                    .layer("vd0", "c", Some("d"))
                    .made("c")
                    .layer("vd0", "b", Some("c"))
                    .made("b")
                    .layer("vd0", "a", Some("b"))
                    .top("a"),
                &["vd0: commit c into d"],
            ),
            (
                "one step per disk per round, every disk in it",
                Case::new()
                    .layer("vd0", "x", None)
                    .made("x")
                    .layer("vd0", "y", Some("x"))
                    .made("y")
                    .layer("vd0", "top", Some("y"))
                    .top("top")
                    .layer("vd1", "disk1", None)
                    .original("disk1")
                    .layer("vd1", "top1", Some("disk1"))
                    .top("top1"),
                &["vd0: stream x into y", "vd1: commit top1 into disk1"],
            ),
        ];
        // Every row is checked before failing, so a broken rule shows all the rows it breaks.
        let mut broken = Vec::new();
        for (rule, case, want) in rows {
            let got = case.round();
            if got != want {
                broken.push(format!("{rule}: got {got:?}, want {want:?}"));
            }
            for step in case.steps() {
                let gone = match &step {
                    Step::Remove { image, .. } => image.as_path(),
                    Step::Merge(m) => removed_by(m),
                };
                if is_original(&case.g, gone) {
                    broken.push(format!("{rule}: unlinks {}, an original", gone.display()));
                }
            }
        }
        assert!(broken.is_empty(), "\n{}", broken.join("\n"));
    }

    #[test]
    fn a_step_carries_what_running_and_redoing_it_needs() {
        let stream = Case::new()
            .layer("vd0", "s1", None)
            .format("s1", "raw")
            .made("s1")
            .frozen("s1")
            .layer("vd0", "x", Some("s1"))
            .made("x")
            .layer("vd0", "top", Some("x"))
            .top("top");
        let steps = stream.steps();
        let [Step::Merge(m)] = steps.as_slice() else {
            panic!("{:?}", stream.round());
        };
        assert_eq!(m.kind, MergeKind::Stream);
        assert_eq!((&m.lower, &m.upper), (&img("x"), &img("top")));
        assert_eq!(m.lower_backing, Some(img("s1")));
        assert_eq!(m.lower_backing_format.as_deref(), Some("raw"));
        assert_eq!(m.lower_format, "qcow2");
        assert!(m.upper_children.is_empty());
        assert!(!m.live);
        assert_eq!(m.job, None);
        assert_eq!(removed_by(m), img("x"));

        let commit = Case::new()
            .layer("vd0", "disk", None)
            .format("disk", "raw")
            .original("disk")
            .layer("vd0", "c", Some("disk"))
            .made("c")
            .layer("vd0", "top", Some("c"))
            .top("top");
        let steps = commit.steps();
        let [Step::Merge(m)] = steps.as_slice() else {
            panic!("{:?}", commit.round());
        };
        assert_eq!(m.kind, MergeKind::Commit);
        assert_eq!((&m.lower, &m.upper), (&img("disk"), &img("c")));
        assert_eq!((&m.lower_backing, &m.lower_backing_format), (&None, &None));
        assert_eq!(m.lower_format, "raw");
        assert_eq!(m.upper_children, vec![img("top")]);
        assert_eq!(removed_by(m), img("c"));
    }

    #[test]
    fn only_merges_count_as_left_to_merge() {
        let merges = |c: &Case| has_merges(&c.g, &c.record, c.live.as_ref());
        // A layer nothing uses is an orphan for `check`, not a merge left over.
        assert!(!merges(&beside_the_top().made("x")));
        assert!(merges(&under_the_top().made("x")));
        assert!(!merges(&on_the_original()));
    }

    #[test]
    fn progress_names_files_by_their_name() {
        assert_eq!(file_name(&img("disk.s1")), "disk.s1.qcow2");
        assert_eq!(file_name(Path::new("/")), "/");
    }
}
