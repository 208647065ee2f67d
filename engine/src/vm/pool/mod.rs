//! Pools of standbys: clones made ahead of time, so that a clone asked for later only has to
//! claim one (`claim.rs`) instead of starting a QEMU and loading the snapshot's memory.
//!
//! ```text
//! qsnap pool VM SNAP --size N      record the pool (<store>/pools/VM/SNAP.json), then fill:
//!   under the pool's lock, each standby of the pool is judged (its lock taken at once; a
//!   busy one is being claimed): made from what is there now (fingerprint), QEMU alive and
//!   paused → ready; anything else → discarded (stopped, files removed)
//!   → the newest beyond N discarded → standbys made until N are ready
//! a standby = a clone of SNAP (make_clone, Making::Standby) named sb-<pool>-<random>, its
//!   overlays in <store>/standbys/<name>/, its QEMU started, memory loaded or mapped, paused
//! ```
//! A standby is a VM in the store like a clone: journaled, seen by `status` and `check`,
//! removed by `check --repair` when its pool, snapshot or QEMU is gone. Its guest never runs
//! before a clone claims it, so discarding one never loses anything.
//!
//! What this module must never do: discard a standby without holding its lock (a claim in
//! progress holds it), or hand out one whose fingerprint differs from what is there now.

pub(super) mod claim;
mod names;

use names::{fingerprint, fresh_name};

use super::clone::Making;
use super::Vm;
use crate::error::{Error, Result};
use crate::launch::{Launcher, ProcessLauncher};
use crate::name::{SnapshotName, VmName};
use crate::store::{self, Fingerprint, PoolRecord, StandbyOf};
use crate::CloneOptions;
use serde::Serialize;
use std::time::Instant;
use tracing::{info, warn};

/// What `qsnap pool` (or a refill) did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PoolReport {
    /// The source VM.
    pub vm: String,
    /// The snapshot.
    pub snapshot: String,
    /// How many standbys the pool keeps ready (0: the pool is gone).
    pub size: usize,
    /// The standbys ready now, by name.
    pub ready: Vec<String>,
    /// Those this call made.
    pub made: Vec<String>,
    /// Those this call discarded, and why.
    pub discarded: Vec<DiscardedStandby>,
    /// How long it took.
    pub total_ms: f64,
}

/// A standby that was discarded.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct DiscardedStandby {
    /// Its name.
    pub standby: String,
    /// Why it could no longer be used (or was one too many).
    pub why: String,
}

/// One pool of a VM, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PoolStatus {
    /// The snapshot.
    pub snapshot: String,
    /// How many standbys it keeps ready.
    pub size: usize,
    /// Its standbys in the store now (those being made or claimed included).
    pub standbys: Vec<String>,
}

impl Vm {
    /// Keeps `size` standbys of `snap` ready (0: none, and the pool is forgotten), and
    /// returns once they are.
    pub async fn pool(&self, snap: &SnapshotName, size: usize) -> Result<PoolReport> {
        self.pool_with(snap, size, &ProcessLauncher::default())
            .await
    }

    /// [`Vm::pool`] with a launcher of your own.
    pub async fn pool_with<L: Launcher>(
        &self,
        snap: &SnapshotName,
        size: usize,
        launcher: &L,
    ) -> Result<PoolReport> {
        if size > 0 {
            // Refused before anything is recorded: an unknown snapshot, a VM qsnap cannot
            // start again.
            self.store().manifest(self.name(), snap).await?;
            Self::command_of(&self.store().record(self.name()).await?)?;
        }
        self.fill(snap, Some(size), launcher).await
    }

    /// Brings the pool of `snap` back to its size (after clones took standbys): what a
    /// clone starts in the background. Without a pool, discards whatever standbys of
    /// `snap` are left.
    pub async fn refill_pool(&self, snap: &SnapshotName) -> Result<PoolReport> {
        self.refill_with(snap, &ProcessLauncher::default()).await
    }

    /// [`Vm::refill_pool`] with a launcher of your own.
    pub async fn refill_with<L: Launcher>(
        &self,
        snap: &SnapshotName,
        launcher: &L,
    ) -> Result<PoolReport> {
        self.fill(snap, None, launcher).await
    }

    /// The VM's pools and their standbys.
    pub async fn pools(&self) -> Result<Vec<PoolStatus>> {
        let mut out = Vec::new();
        for p in self.store().pools(self.name()).await? {
            let Some(snap) = SnapshotName::parse(&p.snapshot) else {
                continue;
            };
            out.push(PoolStatus {
                standbys: self
                    .standbys(&snap)
                    .await?
                    .into_iter()
                    .map(|n| n.to_string())
                    .collect(),
                snapshot: p.snapshot,
                size: p.size,
            });
        }
        Ok(out)
    }

    /// Discards the standbys of `snaps` and forgets their pools (a delete of those
    /// snapshots): best effort, never waiting for a standby another qsnap holds (`check
    /// --repair` discards what is left).
    pub(super) async fn drop_pools(&self, snaps: &[SnapshotName]) {
        for snap in snaps {
            if let Err(e) = self.store().remove_pool(self.name(), snap).await {
                warn!(error = %e, %snap, "the pool's record could not be removed");
            }
            for sb in self.standbys(snap).await.unwrap_or_default() {
                let gone = format!("snapshot {snap} is being deleted");
                if let Err(e) = discard_named(self, &sb, &gone).await {
                    warn!(standby = %sb, error = %e, "a standby could not be discarded");
                }
            }
        }
    }

    /// Whether VM `name` is a standby of this VM (by its record).
    pub(super) async fn is_my_standby(&self, name: &str) -> bool {
        let Some(n) = VmName::parse(name) else {
            return false;
        };
        self.store()
            .record(&n)
            .await
            .ok()
            .and_then(|r| r.standby)
            .is_some_and(|s| s.vm == self.name().as_str())
    }

    /// Discards every standby of this VM and forgets its pools (the VM is going: `remove`,
    /// `forget`). Fails if one cannot be discarded (another qsnap holds it): nothing of the VM
    /// may go while a standby still stands on its snapshots.
    pub(super) async fn drop_all_pools(&self) -> Result<()> {
        for p in self.store().pools(self.name()).await? {
            if let Some(snap) = SnapshotName::parse(&p.snapshot) {
                self.store().remove_pool(self.name(), &snap).await?;
            }
        }
        for name in self.store().vms().await? {
            if !name.as_str().starts_with("sb-") || !self.is_my_standby(name.as_str()).await {
                continue;
            }
            let why = format!("{} is going", self.name());
            if !discard_named(self, &name, &why).await? && self.is_my_standby(name.as_str()).await {
                return Err(Error::Busy {
                    what: format!("standby {name} of {} is held by another qsnap", self.name()),
                });
            }
        }
        Ok(())
    }

    /// Judges the pool's standbys, discards those that cannot be used (and those beyond the
    /// size), and makes new ones until the pool is full. `size`: set the pool to it; `None`:
    /// the recorded size (0 without a record).
    async fn fill<L: Launcher>(
        &self,
        snap: &SnapshotName,
        size: Option<usize>,
        launcher: &L,
    ) -> Result<PoolReport> {
        let started = Instant::now();
        let store = self.store();
        let _pool = store.lock_pool(self.name(), snap).await?;
        let size = match size {
            Some(0) => {
                store.remove_pool(self.name(), snap).await?;
                0
            }
            Some(n) => {
                store
                    .write_pool(&PoolRecord {
                        schema: store::SCHEMA,
                        vm: self.name().to_string(),
                        snapshot: snap.to_string(),
                        size: n,
                        set_at: store::now_rfc3339(),
                    })
                    .await?;
                n
            }
            None => store.pool(self.name(), snap).await?.map_or(0, |p| p.size),
        };
        // What standbys must be made from now; `None`: the snapshot (or the VM) is gone.
        let now = match (
            store.record(self.name()).await,
            store.manifest(self.name(), snap).await,
        ) {
            (Ok(rec), Ok(m)) => Some((fingerprint(&rec, &m).await?, m)),
            (Err(Error::UnknownVm { .. }), _) | (_, Err(Error::UnknownSnapshot { .. })) => None,
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let mut ready = Vec::new();
        let mut discarded = Vec::new();
        for sb in self.standbys(snap).await? {
            let why = match glance(self, &sb, snap, now.as_ref().map(|(f, _)| f)).await {
                Judged::Ready => {
                    ready.push(sb);
                    continue;
                }
                Judged::Busy => continue,
                Judged::Unusable(why) => why,
            };
            match discard_named(self, &sb, &why).await {
                Ok(true) => discarded.push(DiscardedStandby {
                    standby: sb.to_string(),
                    why,
                }),
                Ok(false) => {}
                Err(e) => warn!(standby = %sb, error = %e, "a standby could not be discarded"),
            }
        }
        while ready.len() > size {
            let sb = ready.pop().expect("more ready than the size");
            let why = "the pool is smaller now".to_owned();
            if discard_named(self, &sb, &why).await? {
                discarded.push(DiscardedStandby {
                    standby: sb.to_string(),
                    why,
                });
            }
        }
        let mut made = Vec::new();
        if ready.len() < size {
            let Some((fingerprint, manifest)) = now else {
                return Err(Error::UnknownSnapshot {
                    vm: self.name().to_string(),
                    snapshot: snap.to_string(),
                });
            };
            let of = StandbyOf {
                vm: self.name().to_string(),
                snapshot: snap.to_string(),
                fingerprint,
                // A memory snapshot's clone runs if its guest ran; a disk-only one boots.
                resume: manifest.snapshot.memory.is_none() || manifest.snapshot.was_running,
                lazy: crate::snapshot::revert::lazy_mapping(&manifest.snapshot).is_some(),
            };
            let opts = CloneOptions {
                paused: true,
                ..CloneOptions::default()
            };
            while ready.len() < size {
                // Never a name whose overlay directory a claimed clone still uses.
                let name = loop {
                    let n = fresh_name(self.name(), snap)?;
                    let dir = store.standby_dir(n.as_str());
                    if !store::blocking(move || store::exists(&dir)).await? {
                        break n;
                    }
                };
                self.make_clone(snap, &name, &opts, launcher, Making::Standby(of.clone()))
                    .await?;
                info!(standby = %name, vm = %self.name(), %snap, "standby ready");
                made.push(name.to_string());
                ready.push(name);
            }
        }
        ready.sort();
        Ok(PoolReport {
            vm: self.name().to_string(),
            snapshot: snap.to_string(),
            size,
            ready: ready.iter().map(ToString::to_string).collect(),
            made,
            discarded,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

impl Vm {
    /// `check`'s look at this VM's standbys: an interrupted claim (settled by `repair`), a
    /// standby that can no longer be used or whose pool is gone (discarded by `repair`).
    pub(super) async fn check_standbys(
        &self,
        repair: bool,
        found: &mut super::findings::Findings,
    ) -> Result<()> {
        let store = self.store();
        let me = store.record(self.name()).await?;
        for name in store.vms().await? {
            if !name.as_str().starts_with("sb-") {
                continue;
            }
            let Ok(rec) = store.record(&name).await else {
                continue;
            };
            let Some(of) = rec.standby.clone() else {
                continue;
            };
            if of.vm != self.name().as_str() {
                continue;
            }
            let dir = store.vm_dir(&name);
            if let Ok(Some(j)) = store.journal(&name).await {
                let what = format!("standby {name}: an interrupted {}", j.intent.describe());
                let settled = if repair {
                    match self.engine().at_once().vm(&name).await {
                        Ok(vm) => match vm.begin("check --repair").await {
                            Ok(_) | Err(Error::UnknownVm { .. }) => Ok(()),
                            Err(e) => Err(e),
                        },
                        Err(Error::UnknownVm { .. }) => Ok(()),
                        Err(e) => Err(e),
                    }
                } else {
                    Err(Error::Busy {
                        what: "`--repair` finishes it or undoes it".into(),
                    })
                };
                let (fix, done) = match settled {
                    Ok(()) => ("settled: see `qsnap status`".to_owned(), true),
                    Err(Error::Busy { what }) => (what, false),
                    Err(e) => (e.to_string(), false),
                };
                found
                    .add("interrupted", what, fix, done)
                    .about(dir.join("journal.json"));
                continue;
            }
            let Some(snap) = SnapshotName::parse(&of.snapshot) else {
                continue;
            };
            let why = if store.pool(self.name(), &snap).await?.is_none() {
                Some(format!("its pool ({snap}) is gone"))
            } else {
                let now = match store.manifest(self.name(), &snap).await {
                    Ok(m) => Some(fingerprint(&me, &m).await?),
                    Err(Error::UnknownSnapshot { .. }) => None,
                    Err(e) => return Err(e),
                };
                match judge(self, &name, &snap, now.as_ref()).await {
                    Judged::Ready | Judged::Busy => None,
                    Judged::Unusable(why) => Some(why),
                }
            };
            let Some(why) = why else { continue };
            let repaired = repair && discard_named(self, &name, &why).await.unwrap_or(false);
            found
                .add(
                    "stale-record",
                    format!("standby {name} of snapshot {snap} cannot be used: {why}"),
                    "`--repair` stops it and removes its files (its guest never ran)".into(),
                    repaired,
                )
                .about(dir);
        }
        Ok(())
    }
}

/// What a look at one standby found.
enum Judged {
    Ready,
    /// Another qsnap holds it (a claim, a discard): left alone.
    Busy,
    Unusable(String),
}

/// The full look (`check`): the standby's lock taken at once (a busy one is being claimed),
/// its QEMU asked for its run state.
async fn judge(source: &Vm, sb: &VmName, snap: &SnapshotName, now: Option<&Fingerprint>) -> Judged {
    let vm = match source.engine().at_once().vm(sb).await {
        Ok(vm) => vm,
        Err(_) => return Judged::Busy,
    };
    let op = match vm.begin("look at the standby").await {
        Ok(op) => op,
        Err(_) => return Judged::Busy,
    };
    match claim::usable(&vm, &op.record, source.name(), snap, now).await {
        Ok(()) => Judged::Ready,
        Err(why) => Judged::Unusable(why),
    }
}

/// A refill's look: from the record and `/proc` only, without the standby's lock or its
/// monitor, so that a clone claiming it meanwhile is never turned away. (A standby that looks
/// ready here and is not is skipped by the claim, which asks QEMU, and discarded by `check
/// --repair`.)
async fn glance(
    source: &Vm,
    sb: &VmName,
    snap: &SnapshotName,
    now: Option<&Fingerprint>,
) -> Judged {
    let Ok(record) = source.store().record(sb).await else {
        return Judged::Busy;
    };
    let Some(of) = &record.standby else {
        return Judged::Busy;
    };
    if of.vm != source.name().as_str() || of.snapshot != snap.as_str() {
        return Judged::Busy;
    }
    if now != Some(&of.fingerprint) {
        return Judged::Unusable(match now {
            None => format!("snapshot {snap} is gone"),
            Some(_) => "what it was made from has changed since (the snapshot, the command line or the QEMU binary)".into(),
        });
    }
    match record.pid {
        Some(pid) if crate::proc::is_recorded_qemu(pid, record.pid_start).await => Judged::Ready,
        // A standby being made has no QEMU recorded yet: its maker holds its lock.
        None if source
            .engine()
            .at_once()
            .store()
            .lock(sb, "look at the standby")
            .await
            .is_err() =>
        {
            Judged::Busy
        }
        _ => Judged::Unusable("its QEMU is gone".into()),
    }
}

/// Discards standby `sb` (stops its QEMU, removes its files and record) if it still is one;
/// `Ok(false)` when it is not (a clone claimed it) or another qsnap holds it.
pub(super) async fn discard_named(source: &Vm, sb: &VmName, why: &str) -> Result<bool> {
    let vm = match source.engine().at_once().vm(sb).await {
        Ok(vm) => vm,
        Err(Error::UnknownVm { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    vm.discard_standby(why).await
}

impl Vm {
    /// Discards this standby: `Ok(false)` when it is none (any more) or is busy.
    pub(super) async fn discard_standby(&self, why: &str) -> Result<bool> {
        // Its lock first, and with it any interrupted claim settled: a standby a clone has
        // claimed is that clone's QEMU and overlays from then on.
        let op = match self.begin(&format!("discard the standby ({why})")).await {
            Ok(op) => op,
            Err(Error::Locked { .. } | Error::UnknownVm { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut record = op.record.clone();
        if record.standby.is_none() {
            return Ok(false);
        }
        let state = super::state::VmState::observe(self, &record).await;
        if !matches!(state, super::state::VmState::Stopped) {
            self.stop_before_discarding(&mut record, &state, "discard the standby")
                .await?;
        }
        self.discard_clone(&record, super::clone::Discard::Remove)
            .await?;
        info!(standby = %self.name(), why, "standby discarded");
        drop(op);
        Ok(true)
    }
}
