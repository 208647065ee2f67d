//! Pools of standbys: clones made ahead of time, so that a clone asked for later only has to
//! claim one (`claim.rs`) instead of starting a QEMU and loading the snapshot's memory.
//!
//! ```text
//! qsnap pool VM SNAP --size N      record the pool (<store>/pools/VM/SNAP.json), then fill:
//!   under the pool's lock (a refill that finds it taken leaves a word to go round again, and
//!   ends), each standby of the pool is glanced at from its record and /proc — never its lock
//!   or monitor, which a claim may hold: made from what is there now (fingerprint), not
//!   marked unusable by a claim, no claim cut short, its recorded QEMU alive → ready;
//!   anything else → discarded (its QEMU killed by pid and start time, files removed)
//!   → those beyond N (by name) discarded → standbys made until N are ready
//! check VM: the full look (the standby's lock at once, its QEMU asked: paused after its load,
//!   prelaunch for a disk-only snapshot) → a `stale-record` finding, discarded by --repair
//! a standby = a clone of SNAP (make_clone, Making::Standby) named sb-<pool>-<random>, its
//!   overlays in <store>/standbys/<name>/, its QEMU started, memory loaded or mapped, paused
//! ```
//! A standby is a VM in the store like a clone: journaled, seen by `status` and `check`,
//! removed by `check --repair` when its pool, snapshot or QEMU is gone. Its guest never runs
//! before a clone claims it (`create`, `start` and `resume` refuse it), so discarding one
//! never loses anything.
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
use crate::store::{self, Fingerprint, Manifest, PoolRecord, StandbyOf, VmRecord};
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

impl PoolReport {
    /// This report followed by `later`'s round: what both made and discarded, what is ready
    /// after it.
    fn then(&mut self, later: PoolReport) {
        self.made.extend(later.made);
        self.discarded.extend(later.discarded);
        self.ready = later.ready;
        self.size = later.size;
    }
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
            // start again, a command line no clone can take as it is (what must differ per VM,
            // which standbys cannot be given).
            self.store().manifest(self.name(), snap).await?;
            let record = self.store().record(self.name()).await?;
            let command = Self::command_of(&record)?;
            let dir = self.store().vm_dir(&fresh_name(self.name(), snap)?);
            crate::launch::clone_argv::clone_argv(
                &command.argv,
                &command.cwd,
                &dir.join("files"),
                self.socket_path(&record).ok().as_deref(),
                &dir.join("qmp.sock"),
                &[],
                crate::launch::clone_argv::Purpose::Clone,
            )
            .map_err(|why| Error::CloneRefused {
                snapshot: snap.to_string(),
                why: format!("{why} (standbys are made from the command line as recorded)"),
            })?;
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
    /// --repair` discards what is left). Returns how many standbys it found.
    pub(super) async fn drop_pools(&self, snaps: &[SnapshotName]) -> usize {
        let mut standbys = 0;
        for snap in snaps {
            if let Err(e) = self.store().remove_pool(self.name(), snap).await {
                warn!(error = %e, %snap, "the pool's record could not be removed");
            }
            for sb in self.standbys(snap).await.unwrap_or_default() {
                standbys += 1;
                let gone = format!("snapshot {snap} is being deleted");
                if let Err(e) = discard_named(self, &sb, &gone).await {
                    warn!(standby = %sb, error = %e, "a standby could not be discarded");
                }
            }
        }
        standbys
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
        // The standbys first (a refill cannot make more meanwhile: it needs this VM's lock
        // shared, and the caller holds it), the pools' records once all are gone.
        for (name, _) in self.my_standbys().await? {
            let why = format!("{} is going", self.name());
            if !discard_named(self, &name, &why).await? && self.is_my_standby(name.as_str()).await {
                return Err(Error::Busy {
                    what: format!(
                        "standby {name} of {} could not be discarded (another qsnap holds it, or a VM stands on it); try again, or `qsnap check {} --repair`",
                        self.name(),
                        self.name()
                    ),
                });
            }
        }
        for p in self.store().pools(self.name()).await? {
            if let Some(snap) = SnapshotName::parse(&p.snapshot) {
                self.store().remove_pool(self.name(), &snap).await?;
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
        // One fill at a time. A refill that finds one under way leaves it a word to go round
        // once more, and ends: clones in a burst start no queue of waiting refills. The word
        // is looked for again after the lock is let go, so that one left in between is never
        // lost.
        let mut report: Option<PoolReport> = None;
        let mut size = size;
        loop {
            let lock = match size {
                Some(_) => store.lock_pool(self.name(), snap).await?,
                None => match store.try_lock_pool(self.name(), snap).await? {
                    Some(lock) => lock,
                    None => {
                        store.pool_again(self.name(), snap, true).await?;
                        // The holder may have let go before the word was left, and looked for
                        // it already: then this refill is the one to go round.
                        match store.try_lock_pool(self.name(), snap).await? {
                            Some(lock) => lock,
                            None => break,
                        }
                    }
                },
            };
            let mut round = self.fill_locked(snap, size, launcher).await?;
            while store.pool_again(self.name(), snap, false).await? {
                round.then(self.fill_locked(snap, None, launcher).await?);
            }
            drop(lock);
            report = Some(match report.take() {
                Some(mut earlier) => {
                    earlier.then(round);
                    earlier
                }
                None => round,
            });
            if !store.pool_again(self.name(), snap, false).await? {
                break;
            }
            size = None;
        }
        let mut report = match report {
            Some(r) => r,
            None => PoolReport {
                vm: self.name().to_string(),
                snapshot: snap.to_string(),
                size: store.pool(self.name(), snap).await?.map_or(0, |p| p.size),
                ready: Vec::new(),
                made: Vec::new(),
                discarded: Vec::new(),
                total_ms: 0.0,
            },
        };
        report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// [`Vm::fill`] with the pool's lock held.
    async fn fill_locked<L: Launcher>(
        &self,
        snap: &SnapshotName,
        size: Option<usize>,
        launcher: &L,
    ) -> Result<PoolReport> {
        let started = Instant::now();
        let store = self.store();
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
                unusable: None,
            };
            let opts = CloneOptions {
                paused: true,
                ..CloneOptions::default()
            };
            // Waiting for the user's operations on the source rather than giving up: a refill
            // runs in the background, and a pool left short helps no one.
            let patient = self
                .engine()
                .patient(std::time::Duration::from_secs(600))
                .vm_from(self.name().clone(), self.record().clone());
            let _making = store.making_standbys(self.name(), snap).await?;
            while ready.len() < size {
                // Never a name whose overlay directory a claimed clone still uses.
                let name = loop {
                    let n = fresh_name(self.name(), snap)?;
                    let dir = store.standby_dir(n.as_str());
                    if !store::blocking(move || store::exists(&dir)).await? {
                        break n;
                    }
                };
                if !made.is_empty() {
                    // A moment with the source's lock free between standbys: an operation
                    // waiting for it goes first (the next make waits for it in turn).
                    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
                }
                patient
                    .make_clone(snap, &name, &opts, launcher, Making::Standby(of.clone()))
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
        manifests: &[Manifest],
        repair: bool,
        found: &mut super::findings::Findings,
    ) -> Result<()> {
        let store = self.store();
        let me = store.record(self.name()).await?;
        for (name, of) in self.my_standbys().await? {
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
                    Ok(m) => Some((fingerprint(&me, &m).await?, claim::fresh_states(&m))),
                    Err(Error::UnknownSnapshot { .. }) => None,
                    Err(e) => return Err(e),
                };
                match judge(self, &name, &snap, now.as_ref().map(|(f, d)| (f, *d))).await {
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
        // Pools whose snapshot is gone (a `pool` that raced the snapshot's delete): nothing
        // can be made from them, and their standbys, if any, stand on a deleted snapshot.
        for pool in store.pools(self.name()).await? {
            let Some(snap) = SnapshotName::parse(&pool.snapshot) else {
                continue;
            };
            match store.manifest(self.name(), &snap).await {
                Err(Error::UnknownSnapshot { .. }) => {}
                _ => continue,
            }
            if repair {
                self.drop_pools(std::slice::from_ref(&snap)).await;
            }
            let repaired = repair && store.pool(self.name(), &snap).await?.is_none();
            found
                .add(
                    "stale-record",
                    format!("the pool of snapshot {snap}: the snapshot is gone"),
                    "`--repair` removes the pool and its standbys".into(),
                    repaired,
                )
                .about(store.pool_path(self.name(), &snap));
        }
        // Standbys of this VM's snapshots (or claimed as this VM) whose release was cut
        // short: a journal left without a record, which no listing of VMs shows.
        let prefixes: Vec<String> = manifests
            .iter()
            .filter_map(|m| SnapshotName::parse(&m.name))
            .map(|snap| names::prefix(self.name(), &snap))
            .collect();
        let me_name = self.name().as_str().to_owned();
        let wanted = |n: &VmName, c: &crate::store::ClaimIntent| {
            c.new == me_name || prefixes.iter().any(|p| n.as_str().starts_with(p.as_str()))
        };
        for r in claim::sweep_released(self.engine(), wanted, repair).await? {
            let what = format!(
                "standby {}: its claim as {} finished, but its journal was left",
                r.name, r.new
            );
            let path = store.vm_dir(&r.name).join("journal.json");
            match r.kept {
                None => {
                    found
                        .add(
                            "interrupted",
                            what,
                            "`--repair` removes it (the clone is whole; nothing is undone)".into(),
                            repair,
                        )
                        .about(path);
                }
                Some(why) => {
                    found.add("interrupted", what, why, false).about(path);
                }
            }
        }
        Ok(())
    }
}

/// Refuses `operation` on a standby: its guest must not run (nor its state change) before a
/// clone claims it.
pub(super) fn refuse_standby(record: &VmRecord, operation: &str) -> Result<()> {
    match &record.standby {
        Some(_) => Err(Error::StandbyUntouchable {
            vm: record.name.clone(),
            operation: operation.to_owned(),
        }),
        None => Ok(()),
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
async fn judge(
    source: &Vm,
    sb: &VmName,
    snap: &SnapshotName,
    now: Option<(&Fingerprint, &[&str])>,
) -> Judged {
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
        // Not answering in time is not reason enough to discard it.
        Err(claim::Unfit::NotNow(_)) => Judged::Busy,
        Err(unfit) => Judged::Unusable(unfit.why().to_owned()),
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
    if let Some(why) = &of.unusable {
        return Judged::Unusable(why.clone());
    }
    // A claim cut short: discarding it settles it first (and keeps it if it was finished).
    if let Ok(Some(j)) = source.store().journal(sb).await {
        return Judged::Unusable(format!("an interrupted {}", j.intent.describe()));
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
        let record = op.record.clone();
        if record.standby.is_none() {
            return Ok(false);
        }
        // Never under another VM (a snapshot of the standby someone took and cloned).
        if let Some((by, _)) = self.used_elsewhere(&record).await? {
            warn!(standby = %self.name(), %by, "a standby another VM stands on is kept");
            return Ok(false);
        }
        // By its recorded pid and start time, never through its monitor socket: a claim cut
        // short may have left that path leading to another QEMU (settled by `begin` above,
        // all the same). A standby whose pid was never recorded (qsnap died while its QEMU
        // started) was never claimed: the process serving its socket is its own.
        match record.pid {
            Some(pid) => kill_recorded(pid, record.pid_start).await?,
            None => {
                if let Ok(qmp) = self.connect_quick(&record).await {
                    if let Some(pid) = qmp.peer_pid() {
                        drop(qmp);
                        if crate::proc::is_qemu(pid).await {
                            let start = crate::proc::start_time(pid).await;
                            kill_recorded(pid, start).await?;
                        }
                    }
                }
            }
        }
        self.discard_clone(&record, super::clone::Discard::Remove)
            .await?;
        info!(standby = %self.name(), why, "standby discarded");
        drop(op);
        Ok(true)
    }
}

/// Kills the standby's QEMU (its guest never ran: nothing to flush) if `pid` is still the
/// process recorded, and waits (bounded) until it is gone.
async fn kill_recorded(pid: u32, start: Option<u64>) -> Result<()> {
    if !crate::proc::is_recorded_qemu(pid, start).await {
        return Ok(());
    }
    let Some(start) = start else {
        return Err(Error::Busy {
            what: format!(
                "the standby's QEMU (pid {pid}) has no recorded start time, so it cannot be told apart from a process given its pid since; stop it by hand"
            ),
        });
    };
    let p = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    // Until the process is gone, not until it stops looking like a QEMU: one being torn
    // down has lost its command line, and still holds its files (and its guest's RAM).
    while crate::proc::still_runs(pid, start).await {
        if Instant::now() > deadline {
            return Err(Error::Busy {
                what: format!("the standby's QEMU (pid {pid}) did not exit after SIGKILL"),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}
