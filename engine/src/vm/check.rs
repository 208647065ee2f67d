//! `qsnap check`: the store against reality, and (`--repair`) reality brought back in line.
//!
//! Looks at: an interrupted operation (journal); relative image paths an older qsnap
//! recorded (`relative.rs`: resolved by a repair only to a file that proves to be it);
//! every snapshot's memory file (header,
//! length, checksum) and frozen images (present, unchanged, chains readable); the VM's
//! current disks (present, chains readable, and for a running VM what QEMU really writes
//! to); images qsnap made that nothing uses any more; memory files no snapshot names; layers
//! left unmerged; `qemu-img check` of every image qsnap made. A repair settles the journal,
//! makes the record follow QEMU, unlinks orphans (through the reference guard), and merges
//! leftover layers. Damage only a person can judge (a corrupt image, a changed memory file)
//! is reported with what to do, never "repaired" by deleting data.

use super::consolidate::{self, next_round};
use super::refs::{self, Live};
use super::state::VmState;
use super::Vm;
use crate::error::Result;
use crate::image;
use crate::snapshot::memfile;
use crate::store::{self, DeleteIntent, DeletePhase, Intent};
use serde::Serialize;
use std::path::PathBuf;

/// One thing `check` found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Finding {
    /// What kind: `interrupted`, `bad-memory`, `missing-image`, `changed-image`,
    /// `broken-chain`, `store-disagrees`, `orphan-image`, `orphan-memory`, `stale-record`,
    /// `unmerged-layer`, `corrupt-image`, `unreadable-qemu`, `relative-path`.
    pub kind: String,
    /// What exactly.
    pub what: String,
    /// How to fix it (what `--repair` does, or what a person must do).
    pub fix: String,
    /// True when `--repair` fixed it.
    pub repaired: bool,
}

/// What `check` found and did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// The VM.
    pub vm: String,
    /// Everything found (repaired or not).
    pub findings: Vec<Finding>,
    /// True when nothing is left to fix.
    pub clean: bool,
}

impl Vm {
    /// Checks the VM's store entries against the files and QEMU; with `repair`, fixes what
    /// can be fixed without losing anything.
    pub async fn check(&self, repair: bool) -> Result<CheckReport> {
        let _lock = self.store().lock(self.name(), "check").await?;
        if self.cancel().is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        let mut findings: Vec<Finding> = Vec::new();
        let mut add = |kind: &str, what: String, fix: String, repaired: bool| {
            findings.push(Finding {
                kind: kind.into(),
                what,
                fix,
                repaired,
            });
        };

        // 1. An interrupted operation.
        if let Some(j) = self.store().journal(self.name()).await? {
            let what = format!(
                "an interrupted {} (qsnap pid {}, started {})",
                j.intent.describe(),
                j.pid,
                j.started_at
            );
            if repair {
                match super::recover::settle(self).await {
                    Ok(r) => add(
                        "interrupted",
                        what,
                        r.map(|r| r.outcome).unwrap_or_default(),
                        true,
                    ),
                    Err(e) => {
                        // Nothing else is repaired over an operation that is not settled: its
                        // files would look like orphans, its journal would be overwritten.
                        add("interrupted", what, e.to_string(), false);
                        return Ok(CheckReport {
                            vm: self.name().to_string(),
                            findings,
                            clean: false,
                        });
                    }
                }
            } else {
                add(
                    "interrupted",
                    what,
                    "`--repair` finishes it or rolls it back".into(),
                    false,
                );
            }
        }

        // 1b. Relative image paths an older qsnap recorded: resolved before anything reads
        // the manifests, and nothing else runs while one is left.
        let relative = super::relative::settle(self, repair).await?;
        for f in relative.findings {
            add(&f.kind, f.what, f.fix, f.repaired);
        }
        if relative.remaining {
            return Ok(CheckReport {
                vm: self.name().to_string(),
                findings,
                clean: false,
            });
        }

        let mut record = self.store().record(self.name()).await?;
        let manifests = self.store().manifests(self.name()).await?;
        let cancel = self.cancel().clone();

        // 2. Snapshots: memory files and frozen images.
        for m in &manifests {
            if let Some(mem) = &m.snapshot.memory {
                if let Err(e) =
                    memfile::verify(mem.file.clone(), mem.bytes, mem.checksum.clone()).await
                {
                    add(
                        "bad-memory",
                        format!("snapshot {}: {e}", m.name),
                        format!(
                            "it cannot be reverted to; `qsnap delete {} {}` removes it",
                            self.name(),
                            m.name
                        ),
                        false,
                    );
                }
                if let Some(lazy) = &mem.lazy {
                    if let Err(e) =
                        memfile::verify_ram_image(lazy.image.clone(), lazy.checksum.clone()).await
                    {
                        add(
                            "bad-memory",
                            format!("snapshot {}: its RAM image: {e}", m.name),
                            format!(
                                "it cannot be reverted to; `qsnap delete {} {}` removes it",
                                self.name(),
                                m.name
                            ),
                            false,
                        );
                    }
                }
            }
            for d in &m.snapshot.disks {
                match image::stamp(&d.image).await {
                    Err(_) => add(
                        "missing-image",
                        format!(
                            "snapshot {}: disk {} image {} is missing",
                            m.name,
                            d.device,
                            d.image.display()
                        ),
                        format!(
                            "restore the file, or `qsnap delete {} {}`",
                            self.name(),
                            m.name
                        ),
                        false,
                    ),
                    Ok(now) if d.frozen.is_some_and(|f| f != now) => add(
                        "changed-image",
                        format!(
                            "snapshot {}: image {} changed since it was taken",
                            m.name,
                            d.image.display()
                        ),
                        "something wrote to a frozen image; reverting to it is refused".into(),
                        false,
                    ),
                    Ok(_) => {
                        if let Err(e) = image::chain(&d.image, &cancel).await {
                            add(
                                "broken-chain",
                                format!(
                                    "snapshot {}: the chain of {}: {e}",
                                    m.name,
                                    d.image.display()
                                ),
                                "restore the missing backing file".into(),
                                false,
                            );
                        }
                    }
                }
            }
        }

        // 3. The current disks, and what QEMU really writes to.
        let state = VmState::observe(self, &record).await;
        let live = match &state {
            VmState::Running { .. } => match self.connect_quick(&record).await {
                Ok(qmp) => match Live::read(&qmp).await {
                    Ok(live) => Some(live),
                    Err(e) => {
                        // Without QEMU's view every later finding would be a guess (an
                        // image QEMU uses would look orphaned): stop here.
                        add(
                            "unreadable-qemu",
                            format!("QEMU's disks could not be read: {e}"),
                            "nothing after this was checked or repaired; see the message, then check again"
                                .into(),
                            false,
                        );
                        return Ok(CheckReport {
                            vm: self.name().to_string(),
                            findings,
                            clean: false,
                        });
                    }
                },
                Err(_) => None,
            },
            _ => None,
        };
        for d in &record.disks {
            let top = live
                .as_ref()
                .and_then(|l| l.chain(&d.device).first().cloned());
            if let Some(top) = top.filter(|t| t != &d.image) {
                let what = format!(
                    "disk {}: QEMU writes to {}, the record says {}",
                    d.device,
                    top.display(),
                    d.image.display()
                );
                let fix = if repair {
                    "the record now follows QEMU"
                } else {
                    "`--repair` makes the record follow QEMU"
                };
                add("store-disagrees", what, fix.into(), repair);
                continue;
            }
            if let Err(e) = image::chain(&d.image, &cancel).await {
                add(
                    "broken-chain",
                    format!("disk {}: {e}", d.device),
                    "restore the missing file; the VM cannot start without it".into(),
                    false,
                );
            }
        }
        if let (true, Some(live)) = (repair, &live) {
            if consolidate::follow_live(&mut record, &live.disks) {
                self.store().write_record(&record).await?;
            }
        }
        // Whatever the record says, what QEMU runs is what is in use.
        let mut effective = record.clone();
        if let Some(live) = &live {
            consolidate::follow_live(&mut effective, &live.disks);
        }

        // 4. Owned images that are gone, or that nothing uses.
        let mut stale = Vec::new();
        for o in &record.owned_images {
            let p = o.clone();
            if !store::blocking(move || store::exists(&p)).await? {
                stale.push(o.clone());
            }
        }
        if !stale.is_empty() {
            for s in &stale {
                add(
                    "stale-record",
                    format!(
                        "the record lists {} as qsnap's, but it is gone",
                        s.display()
                    ),
                    if repair {
                        "dropped from the record".into()
                    } else {
                        "`--repair` drops it from the record".into()
                    },
                    repair,
                );
            }
            if repair {
                record.owned_images.retain(|o| !stale.contains(o));
                self.store().write_record(&record).await?;
            }
        }
        let viewed = consolidate::view(self, &effective, &manifests).await;
        match viewed {
            Ok((graph, live)) => {
                let orphans: Vec<PathBuf> = record
                    .owned_images
                    .iter()
                    .filter(|o| !stale.contains(o))
                    .filter(|o| graph.uses_of(o).is_empty() && graph.children(o).is_empty())
                    .filter(|o| !live.as_ref().is_some_and(|l| l.has_open(o)))
                    .cloned()
                    .collect();
                for o in orphans {
                    let what = format!("{} was made by qsnap and nothing uses it", o.display());
                    if repair {
                        match refs::safe_unlink(&o, &graph, &record, live.as_ref()).await {
                            Ok(()) => {
                                record.owned_images.retain(|x| x != &o);
                                self.store().write_record(&record).await?;
                                add("orphan-image", what, "removed".into(), true);
                            }
                            Err(e) => add("orphan-image", what, e.to_string(), false),
                        }
                    } else {
                        add("orphan-image", what, "`--repair` removes it".into(), false);
                    }
                }
                // 5. Layers left unmerged.
                // Merges only: layers nothing uses at all were reported as orphans above.
                let steps: Vec<_> = next_round(&graph, &effective, live.as_ref())
                    .into_iter()
                    .filter(|s| matches!(s, consolidate::Step::Merge(_)))
                    .collect();
                if !steps.is_empty() {
                    let what = format!(
                        "{} layer(s) no snapshot needs are still in the chains",
                        steps.len()
                    );
                    if repair {
                        let mut intent = DeleteIntent {
                            snapshots: Vec::new(),
                            manifests: Vec::new(),
                            phase: DeletePhase::Consolidating,
                            merges: Vec::new(),
                            guest_was_running: None,
                        };
                        self.store()
                            .write_journal(self.name(), &Intent::Delete(intent.clone()))
                            .await?;
                        match consolidate::run(self, &mut record, &mut intent, None).await {
                            Ok(done) => {
                                self.store().clear_journal(self.name()).await?;
                                add(
                                    "unmerged-layer",
                                    what,
                                    format!("{} merge(s) done", done.len()),
                                    true,
                                );
                            }
                            Err(e) => add("unmerged-layer", what, e.to_string(), false),
                        }
                    } else {
                        add(
                            "unmerged-layer",
                            what,
                            "`--repair` merges them".into(),
                            false,
                        );
                    }
                }
            }
            Err(e) => {
                add(
                    "broken-chain",
                    e.to_string(),
                    "restore the missing files".into(),
                    false,
                );
            }
        }

        // 6. Memory files no snapshot names.
        let names: Vec<PathBuf> = manifests
            .iter()
            .filter_map(|m| m.snapshot.memory.as_ref())
            .flat_map(|x| {
                std::iter::once(x.file.clone()).chain(x.lazy.as_ref().map(|l| l.image.clone()))
            })
            .collect();
        let dir = self.store().memory_dir(self.name());
        let strays: Vec<PathBuf> = store::blocking(move || {
            let mut out = Vec::new();
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    if e.file_type().is_ok_and(|t| t.is_file()) && !names.contains(&p) {
                        out.push(p);
                    }
                }
            }
            Ok(out)
        })
        .await?;
        for s in strays {
            let what = format!("memory file {} belongs to no snapshot", s.display());
            if repair {
                let p = s.clone();
                match store::blocking(move || store::remove_durably(&p)).await {
                    Ok(()) => add("orphan-memory", what, "removed".into(), true),
                    Err(e) => add("orphan-memory", what, e.to_string(), false),
                }
            } else {
                add("orphan-memory", what, "`--repair` removes it".into(), false);
            }
        }

        // 7. qemu-img check of qsnap's images.
        for o in &record.owned_images {
            if let Ok(r) = image::check(o, &cancel).await {
                if r.corruptions > 0 || r.check_errors > 0 {
                    add(
                        "corrupt-image",
                        format!(
                            "{}: {} corruption(s), {} check error(s)",
                            o.display(),
                            r.corruptions,
                            r.check_errors
                        ),
                        "run `qemu-img check -r all` on it with the VM stopped, after a backup"
                            .into(),
                        false,
                    );
                }
            }
        }

        let clean = findings.iter().all(|f| f.repaired);
        Ok(CheckReport {
            vm: self.name().to_string(),
            findings,
            clean,
        })
    }
}
