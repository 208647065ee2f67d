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

use super::findings::{CheckReport, Findings};
use super::merge::{self, next_round};
use super::refs::{self, Live};
use super::state::VmState;
use super::verified::{self, Memo};
use super::Vm;
use crate::error::Result;
use crate::image;
use crate::store;
use std::path::PathBuf;

/// How a check goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Fix what can be fixed without losing anything.
    pub repair: bool,
    /// Read every memory file and `qemu-img check` every image, even those an earlier
    /// check verified and that are unchanged since (same inode, size, mtime and ctime).
    pub full: bool,
}

impl Vm {
    /// Checks the VM's store entries against the files and QEMU; with `repair`, fixes what
    /// can be fixed without losing anything. Files an earlier check verified and that are
    /// unchanged since are not read again ([`Vm::check_with`] and `full` read them).
    pub async fn check(&self, repair: bool) -> Result<CheckReport> {
        self.check_with(CheckOptions {
            repair,
            full: false,
        })
        .await
    }

    /// [`Vm::check`], with options.
    pub async fn check_with(&self, opts: CheckOptions) -> Result<CheckReport> {
        let repair = opts.repair;
        let mut memo = Memo::new(opts.full);
        let _lock = self.store().lock(self.name(), "check").await?;
        if self.cancel().is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        let mut found = Findings::default();
        // Cache entries about files that are gone (images deleted since) can never be served:
        // they go, so that the cache holds about as many entries as the store has files.
        crate::cache::sweep().await;

        // 1. An interrupted operation.
        let journal_path = self.store().vm_dir(self.name()).join("journal.json");
        if let Some(j) = self.store().journal(self.name()).await? {
            let what = format!(
                "an interrupted {} (qsnap pid {}, started {})",
                j.intent.describe(),
                j.pid,
                j.started_at
            );
            if repair {
                match super::recover::settle(self).await {
                    Ok(r) => {
                        // Settled, but with something left undone (a guest left paused, a
                        // file kept): not repaired, and the fix says what is left.
                        let complete = r.as_ref().map_or(true, |r| r.problems.is_empty());
                        let f = found.add(
                            "interrupted",
                            what,
                            r.map(|r| r.outcome).unwrap_or_default(),
                            complete,
                        );
                        f.about(journal_path);
                        if !complete {
                            f.by_hand();
                        }
                    }
                    Err(e) => {
                        // Nothing else is repaired over an operation that is not settled: its
                        // files would look like orphans, its journal would be overwritten.
                        // What the error says is for a person to do.
                        found
                            .add("interrupted", what, e.to_string(), false)
                            .about(journal_path)
                            .by_hand();
                        return Ok(CheckReport {
                            vm: self.name().to_string(),
                            findings: found.0,
                            unchanged: memo.unchanged,
                            clean: false,
                        });
                    }
                }
            } else {
                found
                    .add(
                        "interrupted",
                        what,
                        "`--repair` finishes it or rolls it back".into(),
                        false,
                    )
                    .about(journal_path);
            }
        }

        // A settled claim of a standby leaves no standby: nothing more to check.
        if !self.store().has_vm(self.name()).await? {
            let clean = found.0.iter().all(|f| f.repaired);
            return Ok(CheckReport {
                vm: self.name().to_string(),
                findings: found.0,
                unchanged: memo.unchanged,
                clean,
            });
        }

        // 1b. Relative image paths an older qsnap recorded: resolved before anything reads
        // the manifests, and nothing else runs while one is left.
        let relative = super::relative::settle(self, repair).await?;
        found.0.extend(relative.findings);
        if relative.remaining {
            return Ok(CheckReport {
                vm: self.name().to_string(),
                findings: found.0,
                unchanged: memo.unchanged,
                clean: false,
            });
        }

        let mut record = self.store().record(self.name()).await?;
        let manifests = self.store().manifests(self.name()).await?;
        let cancel = self.cancel().clone();

        // 2. Snapshots: memory files and frozen images.
        // (Each image's header read once for steps 2 and 3, which change no image.)
        let mut chains = crate::chains::Reader::default();
        // Memory first (a first check reads whole files, seconds each), then every image's
        // version in one go, right before the walks that use them.
        let mut verdicts = Vec::with_capacity(manifests.len());
        for m in &manifests {
            let Some(mem) = &m.snapshot.memory else {
                verdicts.push((None, None));
                continue;
            };
            let stream = memo
                .memory(&mem.file, mem.bytes, mem.checksum.as_deref())
                .await;
            let ram = match &mem.lazy {
                Some(lazy) => Some(memo.ram_image(&lazy.image, &lazy.checksum).await),
                None => None,
            };
            verdicts.push((Some(stream), ram));
        }
        chains
            .prefetch(refs::named_by(&record, &manifests).collect())
            .await;
        // Lazy snapshots whose device state or RAM image does not verify: their old stream,
        // if a crash left it, may be the only good copy of their memory.
        let mut lazy_unverified: Vec<String> = Vec::new();
        // And the other way round: a stream that does not verify, beside the device state and
        // RAM image a conversion made of it (a power cut undid the switch).
        let mut stream_unverified: Vec<String> = Vec::new();
        let stamps = image::stamps(
            manifests
                .iter()
                .flat_map(|m| m.snapshot.disks.iter().map(|d| d.image.clone()))
                .collect(),
        )
        .await;
        for (m, (stream, ram)) in manifests.iter().zip(verdicts) {
            if let Some(mem) = &m.snapshot.memory {
                if let Some(Err(e)) = stream {
                    if mem.lazy.is_some() {
                        lazy_unverified.push(m.name.clone());
                    } else {
                        stream_unverified.push(m.name.clone());
                    }
                    found
                        .add(
                            "bad-memory",
                            format!("snapshot {}: {e}", m.name),
                            format!(
                                "it cannot be reverted to; restore the file from a copy, or `qsnap delete {} {}` removes the snapshot",
                                self.name(),
                                m.name
                            ),
                            false,
                        )
                        .about(&mem.file);
                }
                if let Some(lazy) = &mem.lazy {
                    if let Some(Err(e)) = ram {
                        lazy_unverified.push(m.name.clone());
                        found
                            .add(
                                "bad-memory",
                                format!("snapshot {}: its RAM image: {e}", m.name),
                                format!(
                                    "it cannot be reverted to; restore the file from a copy, or `qsnap delete {} {}` removes the snapshot",
                                    self.name(),
                                    m.name
                                ),
                                false,
                            )
                            .about(&lazy.image);
                    }
                }
            }
            let mut unstamped = Vec::new();
            for d in &m.snapshot.disks {
                match stamps.get(&d.image).copied().flatten() {
                    // (Not "delete the snapshot": the layers above back onto the file, so a
                    // delete is refused until it is back, and would send the user here.)
                    None => {
                        found
                            .add(
                                "missing-image",
                                format!(
                                    "snapshot {}: disk {} image {} is missing",
                                    m.name,
                                    d.device,
                                    d.image.display()
                                ),
                                "restore the file from a backup: the snapshot, and every layer that backs onto it, needs it".into(),
                                false,
                            )
                            .about(&d.image);
                    }
                    Some(now) if d.frozen.is_none() => {
                        let what = format!(
                            "snapshot {}: image {} has no stamp (its size and time were not recorded when it was frozen), so a change to it would go unnoticed",
                            m.name,
                            d.image.display()
                        );
                        unstamped.push((d.device.clone(), now, what));
                    }
                    Some(now) if d.frozen.is_some_and(|f| f != now) => {
                        found
                            .add(
                                "changed-image",
                                format!(
                                    "snapshot {}: image {} changed since it was taken",
                                    m.name,
                                    d.image.display()
                                ),
                                format!(
                                    "something wrote to a frozen image, so reverting to {} is refused; restore the file from a backup, or `qsnap delete {} {}` removes the snapshot",
                                    m.name,
                                    self.name(),
                                    m.name
                                ),
                                false,
                            )
                            .about(&d.image);
                    }
                    Some(_) => {
                        // (Only what no earlier snapshot's walk read: the rest is known good.)
                        if let Err(e) = chains.chain_news(&d.image, &cancel).await {
                            found
                                .add(
                                    "broken-chain",
                                    format!(
                                        "snapshot {}: the chain of {}: {e}",
                                        m.name,
                                        d.image.display()
                                    ),
                                    "restore the missing backing file from a backup".into(),
                                    false,
                                )
                                .about(&d.image);
                        }
                    }
                }
            }
            if !unstamped.is_empty() {
                let mut fixed = m.clone();
                for x in &mut fixed.snapshot.disks {
                    if let Some((_, now, _)) = unstamped.iter().find(|(dev, ..)| dev == &x.device) {
                        x.frozen = Some(*now);
                    }
                }
                let written = if repair {
                    Some(self.store().replace_manifest(&fixed).await)
                } else {
                    None
                };
                for (device, _, what) in unstamped {
                    let (fix, repaired) = match &written {
                        Some(Ok(())) => ("stamped as it is now".into(), true),
                        Some(Err(e)) => (e.to_string(), false),
                        None => ("`--repair` stamps it as it is now".into(), false),
                    };
                    let f = found.add("unstamped-image", what, fix, repaired);
                    if let Some(d) = m.snapshot.disks.iter().find(|d| d.device == device) {
                        f.about(&d.image);
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
                        found
                            .add(
                                "unreadable-qemu",
                                format!("QEMU's disks could not be read: {e}"),
                                "nothing after this was checked or repaired; see the message, then check again"
                                    .into(),
                                false,
                            )
                            .by_hand();
                        return Ok(CheckReport {
                            vm: self.name().to_string(),
                            findings: found.0,
                            unchanged: memo.unchanged,
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
                found
                    .add("store-disagrees", what, fix.into(), repair)
                    .about(&top)
                    .about(&d.image);
                continue;
            }
            if let Err(e) = chains.chain(&d.image, &cancel).await {
                found
                    .add(
                        "broken-chain",
                        format!("disk {}: {e}", d.device),
                        "restore the missing file from a backup; the VM cannot start without it"
                            .into(),
                        false,
                    )
                    .about(&d.image);
            }
        }
        if let (true, Some(live)) = (repair, &live) {
            if merge::follow_live(&mut record, &live.disks) {
                self.store().write_record(&record).await?;
            }
        }
        // Whatever the record says, what QEMU runs is what is in use.
        let mut effective = record.clone();
        if let Some(live) = &live {
            merge::follow_live(&mut effective, &live.disks);
        }

        // 4. Owned images that are gone, or that nothing uses. One that a snapshot or the
        // record still names is not stale but missing (reported above): it stays listed as
        // qsnap's, for when it is restored.
        let named = |p: &PathBuf| {
            record.disks.iter().any(|d| &d.image == p)
                || manifests
                    .iter()
                    .any(|m| m.snapshot.disks.iter().any(|d| &d.image == p))
        };
        let owned = record.owned_images.clone();
        let there = store::blocking(move || {
            owned
                .iter()
                .map(|o| store::exists(o))
                .collect::<Result<Vec<bool>>>()
        })
        .await?;
        let stale: Vec<PathBuf> = record
            .owned_images
            .iter()
            .zip(there)
            .filter(|(o, there)| !there && !named(o))
            .map(|(o, _)| o.clone())
            .collect();
        if !stale.is_empty() {
            for s in &stale {
                found
                    .add(
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
                    )
                    .about(s);
            }
            if repair {
                record.owned_images.retain(|o| !stale.contains(o));
                self.store().write_record(&record).await?;
            }
        }
        // Who uses what, across the store. A chain that cannot be read stops the rest (an
        // image it would have named could look orphaned); what is broken is reported once,
        // with its file, and in check's own words (not a delete's refusal that points back
        // here).
        if live.is_none() && !matches!(state, VmState::Stopped) {
            // QEMU is alive but did not answer: which images it has open is unknown, and an
            // image it writes could look orphaned. Nothing of the kind is judged.
            found
                .add(
                    "unreadable-qemu",
                    format!(
                        "the VM's QEMU is alive but its monitor did not answer ({}), so which images it uses cannot be checked",
                        match &state {
                            VmState::Unreachable { why, .. } => why.clone(),
                            _ => "it closed the connection".into(),
                        }
                    ),
                    format!(
                        "free its monitor (or `qsnap stop {}`), then check again",
                        self.name()
                    ),
                    false,
                )
                .about(&record.qmp)
                .by_hand();
        }
        let viewed = if live.is_none() && !matches!(state, VmState::Stopped) {
            Err(Vec::new())
        } else {
            // Through the reader steps 2 and 3 used: nothing since changed an image.
            match refs::Graph::gather_with(
                &mut chains,
                self.store(),
                self.name(),
                &effective,
                &manifests,
                live.as_ref(),
                &cancel,
            )
            .await
            {
                Ok(g) if g.broken.is_empty() => Ok((g, live)),
                Ok(g) => Err(g
                    .broken
                    .into_iter()
                    .map(|(img, why)| (Some(img), why))
                    .collect::<Vec<_>>()),
                Err(crate::Error::Delete(crate::error::DeleteError::Refused { snapshot, why })) => {
                    Err(vec![(Some(PathBuf::from(snapshot)), why)])
                }
                Err(e) => Err(vec![(None, e.to_string())]),
            }
        };
        // Each image's format as the chains read it (for step 7: an image is checked as what
        // the header above it says it is, never probed where that is known).
        let formats = viewed
            .as_ref()
            .map(|(g, _)| g.format.clone())
            .unwrap_or_default();
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
                                found
                                    .add("orphan-image", what, "removed".into(), true)
                                    .about(&o);
                            }
                            Err(e) => {
                                found
                                    .add("orphan-image", what, e.to_string(), false)
                                    .about(&o)
                                    .by_hand();
                            }
                        }
                    } else {
                        found
                            .add("orphan-image", what, "`--repair` removes it".into(), false)
                            .about(&o);
                    }
                }
                // 5. Layers left unmerged.
                // Merges only: layers nothing uses at all were reported as orphans above.
                let steps: Vec<_> = next_round(&graph, &effective, live.as_ref())
                    .into_iter()
                    .filter(|s| matches!(s, merge::Step::Merge(_)))
                    .collect();
                if !steps.is_empty() {
                    let what = format!(
                        "{} layer(s) no snapshot needs are still in the chains",
                        steps.len()
                    );
                    let layers: Vec<PathBuf> = steps
                        .iter()
                        .filter_map(|s| match s {
                            merge::Step::Merge(m) => Some(m.lower.clone()),
                            merge::Step::Remove { .. } => None,
                        })
                        .collect();
                    let (fix, repaired) = if repair {
                        match merge::merge_leftovers(self, &mut record, None).await {
                            Ok(done) => (format!("{} merge(s) done", done.len()), true),
                            Err(e) => (e.to_string(), false),
                        }
                    } else {
                        ("`--repair` merges them".into(), false)
                    };
                    let f = found.add("unmerged-layer", what, fix, repaired);
                    for l in layers {
                        f.about(l);
                    }
                }
            }
            Err(broken) => {
                for (img, why) in broken {
                    let told = img
                        .as_ref()
                        .is_some_and(|i| found.0.iter().any(|f| f.paths.contains(i)));
                    if told {
                        continue;
                    }
                    let f = found.add(
                        "broken-chain",
                        match &img {
                            Some(i) => format!("the chain of {}: {why}", i.display()),
                            None => why,
                        },
                        "restore the missing file from a backup; until its chain reads whole, nothing is merged or removed".into(),
                        false,
                    );
                    f.by_hand();
                    if let Some(i) = img {
                        f.about(i);
                    }
                }
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
            // `<snap>.mem` beside a lazy snapshot whose own files do not verify: the stream
            // a conversion replaced, and perhaps the last good copy of that memory.
            let name = s.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let last_copy = name
                .strip_suffix(".mem")
                .is_some_and(|snap| lazy_unverified.iter().any(|l| l == snap))
                || name
                    .strip_suffix(".dev")
                    .or_else(|| name.strip_suffix(".ram"))
                    .is_some_and(|snap| stream_unverified.iter().any(|l| l == snap));
            if last_copy {
                found
                    .add(
                        "orphan-memory",
                        what,
                        "kept: the memory file the snapshot names does not verify (see above), and this one may hold the only good copy of its memory; copy it somewhere safe before deleting the snapshot".into(),
                        false,
                    )
                    .about(&s)
                    .by_hand();
            } else if repair {
                match crate::unlink::checked(&s, crate::unlink::Kind::Memory).await {
                    Ok(()) => {
                        found
                            .add("orphan-memory", what, "removed".into(), true)
                            .about(&s);
                    }
                    Err(e) => {
                        found
                            .add("orphan-memory", what, e.to_string(), false)
                            .about(&s)
                            .by_hand();
                    }
                }
            } else {
                found
                    .add("orphan-memory", what, "`--repair` removes it".into(), false)
                    .about(&s);
            }
        }

        // 7. qemu-img check of qsnap's images, a few at a time (each is mostly qemu-img's
        // start-up; the order of the findings stays the record's).
        let width = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let mut checked = Vec::with_capacity(record.owned_images.len());
        let full = memo.full();
        // Those an earlier check verified, as they are now, found in one go (a trip to the
        // blocking pool for each of a hundred images costs more than the rest of a check).
        let known = verified::known_clean(
            full,
            record
                .owned_images
                .iter()
                .map(|o| (o.clone(), formats.get(o).cloned()))
                .collect(),
        )
        .await;
        let unknown: Vec<PathBuf> = record
            .owned_images
            .iter()
            .zip(known)
            .filter_map(|(o, known)| {
                memo.note(known);
                (!known).then(|| o.clone())
            })
            .collect();
        for group in unknown.chunks(width) {
            let mut set = tokio::task::JoinSet::new();
            for (i, o) in group.iter().enumerate() {
                let (o, cancel) = (o.clone(), cancel.clone());
                let format = formats.get(&o).cloned();
                set.spawn(async move {
                    let r = verified::check_image(full, &o, format.as_deref(), &cancel).await;
                    (i, r)
                });
            }
            let mut results: Vec<_> = set.join_all().await;
            results.sort_by_key(|(i, _)| *i);
            let results = results.into_iter().map(|(_, r)| {
                r.map(|(found, trusted)| {
                    memo.note(trusted);
                    found
                })
            });
            checked.extend(group.iter().zip(results));
        }
        if cancel.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        for (o, r) in checked {
            let r = match r {
                Ok(r) => r,
                // A file that is gone was reported above; one qemu-img cannot open or check
                // is damage too (a check that cannot run must not read as clean).
                Err(_) if !tokio::fs::try_exists(o).await.unwrap_or(true) => continue,
                Err(crate::Error::Tool { why, .. }) if why.contains("does not support checks") => {
                    continue
                }
                Err(e) => {
                    found
                        .add(
                            "corrupt-image",
                            format!("{}: cannot be checked: {e}", o.display()),
                            "restore it from a backup, or run `qemu-img check -r all` on it with the VM stopped, after a backup".into(),
                            false,
                        )
                        .about(o);
                    continue;
                }
            };
            {
                if r.corruptions > 0 || r.check_errors > 0 {
                    found
                        .add(
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
                        )
                        .about(o);
                }
            }
        }

        // 6. Its standbys (`qsnap pool`): an interrupted claim, one that can no longer be used.
        self.check_standbys(&manifests, repair, &mut found).await?;

        let clean = found.0.iter().all(|f| f.repaired);
        Ok(CheckReport {
            vm: self.name().to_string(),
            findings: found.0,
            unchanged: memo.unchanged,
            clean,
        })
    }
}
