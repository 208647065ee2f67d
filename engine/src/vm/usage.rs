//! What a VM's snapshots take on disk: per snapshot its memory files and the disk layers it
//! froze that qsnap made, and for the VM the total — each as allocated bytes (what `du`
//! counts: a mapped-ram file or a lazy RAM image is sparse, zero pages take nothing) beside
//! the apparent size (what `ls -l` shows).
//!
//! Reads file metadata only; never opens an image or asks QEMU.

use super::Vm;
use crate::error::Result;
use crate::name::SnapshotName;
use crate::store::{self, Manifest};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// One file's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Size {
    /// Bytes on disk (blocks allocated; what `du` shows).
    pub allocated: u64,
    /// The file's length (what `ls -l` shows); more than `allocated` for a sparse file.
    pub apparent: u64,
}

impl Size {
    fn add(&mut self, other: Size) {
        self.allocated += other.allocated;
        self.apparent += other.apparent;
    }
}

/// What one snapshot takes.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotUsage {
    /// The snapshot.
    pub name: String,
    /// Its memory files (stream, or device state + RAM image), `None` for disk-only.
    pub memory: Option<Size>,
    /// Its memory is a RAM image that reverts map (lazy): the apparent size is the guest's
    /// RAM, the allocated one what the guest had written.
    pub lazy: bool,
    /// The disk layers it froze that qsnap made (the overlays written between its parent and
    /// it); the images a VM started with are not counted here.
    pub layers: Size,
}

/// What a VM's snapshots and overlays take.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Usage {
    /// Per snapshot, oldest first.
    pub snapshots: Vec<SnapshotUsage>,
    /// The overlays the VM writes now (what it did since its current snapshot).
    pub current: Size,
    /// Every memory file and every image qsnap made for the VM, each counted once.
    pub total: Size,
}

impl Vm {
    /// What its snapshots and overlays take on disk (see the module docs).
    pub async fn usage(&self, manifests: &[Manifest]) -> Result<Usage> {
        let record = self.record().clone();
        let owned: BTreeSet<PathBuf> = record.owned_images.iter().cloned().collect();
        let mut plan = Vec::new();
        for m in manifests {
            let mut memory = Vec::new();
            if let Some(mem) = &m.snapshot.memory {
                memory.push(mem.file.clone());
                if let Some(lazy) = &mem.lazy {
                    memory.push(lazy.image.clone());
                }
                if let Ok(snap) = SnapshotName::new(&m.name) {
                    for f in self.store().memory_files(self.name(), &snap) {
                        if !memory.contains(&f) {
                            memory.push(f);
                        }
                    }
                }
            }
            let layers: Vec<PathBuf> = m
                .snapshot
                .disks
                .iter()
                .map(|d| d.image.clone())
                .filter(|p| owned.contains(p))
                .collect();
            let lazy = m.snapshot.memory.as_ref().is_some_and(|x| x.lazy.is_some());
            plan.push((
                m.name.clone(),
                m.snapshot.memory.is_some(),
                lazy,
                memory,
                layers,
            ));
        }
        let current_images: Vec<PathBuf> = record
            .disks
            .iter()
            .map(|d| d.image.clone())
            .filter(|p| owned.contains(p))
            .collect();
        store::blocking(move || {
            let size = |p: &PathBuf| -> Size {
                use std::os::unix::fs::MetadataExt;
                match std::fs::metadata(p) {
                    Ok(md) => Size {
                        allocated: md.blocks() * 512,
                        apparent: md.len(),
                    },
                    Err(_) => Size::default(),
                }
            };
            let mut counted: BTreeSet<PathBuf> = BTreeSet::new();
            let mut total = Size::default();
            let mut count = |p: &PathBuf, into: &mut Size| {
                let s = size(p);
                into.add(s);
                if counted.insert(p.clone()) {
                    total.add(s);
                }
            };
            let mut snapshots = Vec::new();
            for (name, has_memory, lazy, memory, layers) in plan {
                let mut mem = Size::default();
                for f in &memory {
                    count(f, &mut mem);
                }
                let mut lay = Size::default();
                for f in &layers {
                    count(f, &mut lay);
                }
                snapshots.push(SnapshotUsage {
                    name,
                    memory: has_memory.then_some(mem),
                    lazy,
                    layers: lay,
                });
            }
            let mut current = Size::default();
            for f in &current_images {
                count(f, &mut current);
            }
            for f in &owned {
                let mut ignored = Size::default();
                count(f, &mut ignored);
            }
            Ok(Usage {
                snapshots,
                current,
                total,
            })
        })
        .await
    }
}
