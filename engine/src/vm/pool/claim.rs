//! A clone claiming a standby: the standby's QEMU (started, memory loaded, paused) becomes
//! the clone's.
//!
//! ```text
//! clone's locks held (source shared, the new name) → each standby of the pool, its lock
//! taken at once (a busy one is skipped): made from what is there now, its moved paths the
//! clone's, its QEMU alive (the pid its record names) and paused → claim it:
//!   journal on the standby: claim as NEW                               (claim.journaled)
//!   files/, qmp.sock, qemu.log (all but record, journal, lock) renamed into vms/NEW/ (QEMU
//!     keeps its open files; its listening monitor socket moves with its name) (claim.moved)
//!   NEW's record: a clone, its QEMU and overlays the standby's — the point of no return
//!                                                                      (claim.recorded)
//!   the standby's record, then its journal, go  (claim.record-released, claim.released)
//!   cont                                                               (claim.resumed)
//! ```
//! Its overlays stay in `<store>/standbys/<standby>/`: QEMU names an image by the path it
//! opened, and a snapshot of the clone compares QEMU's name with the file.
//!
//! Killed at any step, the claim settles (the standby's next operation, or `check
//! --repair`) to one of two things: before NEW's record exists, the files go back and the
//! standby stays one; after, the standby's record goes and NEW is a clone (paused, if qsnap
//! died before `cont`: `qsnap resume NEW`). Never both, never neither.
//!
//! What it must never do: claim a standby whose guest has run, or whose lock it does not
//! hold; write NEW's record before every file NEW's command line names is in place.

use super::super::Vm;
use super::names::fingerprint;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::launch::clone_argv::CloneArgv;
use crate::name::{SnapshotName, VmName};
use crate::snapshot::revert::{self, RevertDisk};
use crate::store::{self, ClaimIntent, CloneOf, Fingerprint, Intent, LaunchCommand, Manifest};
use crate::store::{Origin, VmRecord};
use qsnap_qmp::types;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// What a clone asks of a standby.
pub(in crate::vm) struct Wanted<'a> {
    pub snap: &'a SnapshotName,
    /// The source's record and the snapshot, as the clone read them under its locks.
    pub source: &'a VmRecord,
    pub manifest: &'a Manifest,
    /// The clone's command line (per-VM paths in its own directory).
    pub argv: &'a CloneArgv,
    /// The clone's QMP socket.
    pub qmp: &'a Path,
    /// Leave the guest paused.
    pub paused: bool,
}

/// What a claim came to.
pub(in crate::vm) enum Claimed {
    /// The clone, made from a standby.
    Clone(Taken),
    /// No standby could be taken; why, when the snapshot has a pool.
    Cold(Option<String>),
}

/// The standby a clone took, and what became of it.
pub(in crate::vm) struct Taken {
    /// Its name.
    pub standby: String,
    /// Its QEMU, now the clone's.
    pub pid: Option<u32>,
    /// Its overlays over the snapshot's frozen images, now the clone's.
    pub disks: Vec<RevertDisk>,
    /// Whether its RAM is mapped from the snapshot's RAM image.
    pub lazy: bool,
    /// Whether the guest runs now.
    pub resumed: bool,
    /// What went wrong after the point of no return (the clone stands).
    pub notes: Vec<String>,
}

/// What stays in a standby's directory when a clone claims it (its record, journal and
/// lock, and its empty snapshot directories); everything else there (QEMU's per-VM files,
/// its monitor socket and log, an embedder's notes about the QEMU) moves to the clone's.
const STAYS: [&str; 5] = ["vm.json", "journal.json", "lock", "snapshots", "memory"];

/// Why a standby cannot be claimed.
#[derive(Debug)]
pub(super) enum Unfit {
    /// A claim marked it so before.
    Marked(String),
    /// It can never be used: made from something else, its QEMU gone or not its own, in a
    /// run state a fresh standby is never in.
    Never(String),
    /// Its QEMU did not answer in time (a loaded host, another client on its monitor): maybe
    /// later.
    NotNow(String),
}

impl Unfit {
    pub(super) fn why(&self) -> &str {
        match self {
            Unfit::Marked(w) | Unfit::Never(w) | Unfit::NotNow(w) => w,
        }
    }
}

/// The run states a fresh standby of `manifest` is in: `prelaunch` for a disk-only snapshot
/// (started with `-S`, never loaded); `paused` after loading a running guest's memory; a
/// paused or suspended guest's snapshot comes back as it was.
pub(super) fn fresh_states(manifest: &Manifest) -> &'static [&'static str] {
    match (&manifest.snapshot.memory, manifest.snapshot.was_running) {
        (None, _) => &["prelaunch"],
        (Some(_), true) => &["paused"],
        (Some(_), false) => &["paused", "prelaunch", "suspended"],
    }
}

/// Whether standby `sb` (its `record` read under its lock) can be claimed for `snap` of
/// `source`, made from `now` (the fingerprint of what is there now, and the run states a fresh
/// standby is in; `None`: the snapshot is gone).
pub(super) async fn usable(
    sb: &Vm,
    record: &VmRecord,
    source: &VmName,
    snap: &SnapshotName,
    now: Option<(&Fingerprint, &[&str])>,
) -> std::result::Result<(), Unfit> {
    let never = |w: String| Err(Unfit::Never(w));
    let Some(of) = &record.standby else {
        return never("it is no standby".into());
    };
    if let Some(why) = &of.unusable {
        return Err(Unfit::Marked(why.clone()));
    }
    if of.vm != source.as_str() || of.snapshot != snap.as_str() {
        return never(format!("it is a standby of {} {}", of.vm, of.snapshot));
    }
    let Some((f, fresh)) = now else {
        return never(format!("snapshot {snap} of {source} is gone"));
    };
    if f.snapshot_taken_at != of.fingerprint.snapshot_taken_at {
        return never(format!("snapshot {snap} was deleted and taken again since"));
    }
    if f.command != of.fingerprint.command {
        return never(format!("{source}'s command line has changed since"));
    }
    if f.qemu != of.fingerprint.qemu {
        return never("the QEMU binary has been replaced since".into());
    }
    // The very process its record names (pid and start time), serving its monitor.
    let Some(pid) = record.pid else {
        return never("no QEMU is recorded for it".into());
    };
    if record.pid_start.is_none() || !crate::proc::is_recorded_qemu(pid, record.pid_start).await {
        return never("its QEMU is gone".into());
    }
    let qmp = sb
        .connect_quick(record)
        .await
        .map_err(|e| Unfit::NotNow(format!("its QEMU does not answer ({e})")))?;
    if qmp.peer_pid() != Some(pid) {
        return never("its monitor is served by another process than its QEMU".into());
    }
    let st = tokio::time::timeout(LOOK, qmp.execute(types::query_status {}))
        .await
        .map_err(|_| Unfit::NotNow("its QEMU does not say its run state in time".into()))?
        .map_err(|e| Unfit::NotNow(format!("its QEMU does not say its run state ({e})")))?;
    let runstate = serde_json::to_value(st.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    // Anything else (running, still loading, shut down, a disk-only standby paused after it
    // ran) is not what a clone may be handed.
    if st.running || !fresh.contains(&runstate.as_str()) {
        return never(format!(
            "its QEMU is {runstate}, not {} as a fresh standby is",
            fresh.join(" or ")
        ));
    }
    Ok(())
}

/// How long a look at a standby's QEMU may take (a standby that does not answer in time is
/// not handed out).
const LOOK: std::time::Duration = std::time::Duration::from_secs(2);

impl Vm {
    /// Takes a ready standby of the snapshot's pool as clone `new`, if there is one. Holds
    /// the clone's locks (the source's shared, `new`'s).
    pub(in crate::vm) async fn claim(&self, new: &VmName, w: &Wanted<'_>) -> Result<Claimed> {
        let store = self.store();
        if store.pool(self.name(), w.snap).await?.is_none() {
            return Ok(Claimed::Cold(None));
        }
        // What a claim moves into the clone's directory must not meet anything there: files
        // an earlier VM of that name left (a failed clone's log) make it a cold clone.
        let left = entries(store.vm_dir(new), &["lock"]).await?;
        if !left.is_empty() {
            return Ok(Claimed::Cold(Some(format!(
                "the clone's directory holds files an earlier VM of that name left ({})",
                left.join(", ")
            ))));
        }
        let now = fingerprint(w.source, w.manifest).await?;
        let fresh = fresh_states(w.manifest);
        let mut unusable = Vec::new();
        for sb in self.standbys(w.snap).await? {
            // At once: a standby another clone is claiming is that clone's.
            let Ok(vm) = self.engine().at_once().vm(&sb).await else {
                continue;
            };
            let Ok(op) = vm.begin(&format!("claim as {new}")).await else {
                continue;
            };
            let record = op.record.clone();
            let looked = match usable(&vm, &record, self.name(), w.snap, Some((&now, fresh))).await
            {
                Ok(()) => same_paths(store, &record, new, w.argv).map_err(Unfit::Never),
                Err(unfit) => Err(unfit),
            };
            if let Err(unfit) = looked {
                // Marked when it can never be used, so that no clone looks at it again and the
                // next refill discards it.
                if let Unfit::Never(why) = &unfit {
                    vm.mark_unusable(record, why).await;
                }
                unusable.push(format!("{sb}: {}", unfit.why()));
                continue;
            }
            let taken = vm.become_clone(record, new, w, self.name()).await?;
            drop(op);
            return Ok(Claimed::Clone(taken));
        }
        Ok(Claimed::Cold(Some(if unusable.is_empty() {
            "no standby of the pool was ready".into()
        } else {
            format!(
                "no standby of the pool could be used ({}); the next refill discards them",
                unusable.join("; ")
            )
        })))
    }

    /// The claim itself, this VM being the standby (its lock held, found usable).
    async fn become_clone(
        &self,
        sb: VmRecord,
        new: &VmName,
        w: &Wanted<'_>,
        source: &VmName,
    ) -> Result<Taken> {
        let store = self.store();
        let pid = sb.pid;
        // Exactly what moves is journaled: only that ever moves back.
        let names = entries(store.vm_dir(self.name()), &STAYS).await?;
        store
            .write_journal(
                self.name(),
                &Intent::Claim(ClaimIntent {
                    new: new.to_string(),
                    moved: names.clone(),
                }),
            )
            .await?;
        let moved = async {
            failpoint::hit("claim.journaled", pid).await?;
            move_files(store.vm_dir(self.name()), store.vm_dir(new), names.clone()).await?;
            failpoint::hit("claim.moved", pid).await?;
            let guest_agent = w.source.guest_agent.as_ref().and_then(|g| {
                w.argv
                    .moved
                    .iter()
                    .find(|m| &m.from == g)
                    .map(|m| m.to.clone())
            });
            let record = VmRecord {
                schema: store::SCHEMA,
                name: new.to_string(),
                qmp: w.qmp.display().to_string(),
                origin: Origin::Run,
                pid: sb.pid,
                pid_start: sb.pid_start,
                command: Some(LaunchCommand {
                    argv: w.argv.argv.clone(),
                    cwd: Self::command_of(w.source)?.cwd.clone(),
                }),
                current: None,
                disks: sb.disks.clone(),
                owned_images: sb.owned_images.clone(),
                guest_agent,
                registered_at: store::now_rfc3339(),
                clone_of: Some(CloneOf {
                    vm: source.to_string(),
                    snapshot: w.snap.to_string(),
                    moved: w.argv.moved.clone(),
                    standby: Some(self.name().to_string()),
                }),
                standby: None,
            };
            store.write_record(&record).await?;
            Ok::<_, Error>(record)
        }
        .await;
        let record = match moved {
            Ok(r) => r,
            Err(e) => {
                // Before the point of no return: the standby stays one.
                if let Err(u) = finish_or_undo(self, new, &names).await {
                    warn!(error = %u, "the claim could not be undone; `qsnap check --repair` settles it");
                } else if let Err(u) = store.clear_journal(self.name()).await {
                    warn!(error = %u, "the claim's journal stays; `qsnap check --repair` settles it");
                }
                return Err(e);
            }
        };
        // NEW exists: from here every step only finishes the claim, and what fails is told
        // about (the clone stands), never an error of the clone.
        let mut notes = Vec::new();
        let released = async {
            failpoint::hit("claim.recorded", pid).await?;
            // A standby record left here (its journal with it) is settled as a finished claim
            // by the next look at it.
            store.release_standby(self.name()).await?;
            failpoint::hit("claim.released", pid).await
        }
        .await;
        if let Err(e) = released {
            warn!(standby = %self.name(), error = %e, "the claimed standby's record stays until the next look at it");
        }
        let clone = self.engine().vm_from(new.clone(), record.clone());
        let of = sb.standby.as_ref().expect("a standby");
        let mut resumed = false;
        if of.resume && !w.paused {
            let cont = async {
                let qmp = clone.connect().await?;
                revert::resume(&qmp).await?;
                failpoint::hit("claim.resumed", pid).await
            }
            .await;
            match cont {
                Ok(()) => resumed = true,
                Err(e) => notes.push(format!(
                    "{new} was made from standby {} but could not be resumed ({e}): it is paused; `qsnap resume {new}`",
                    self.name()
                )),
            }
        }
        info!(vm = %new, standby = %self.name(), %source, snapshot = %w.snap, "cloned from a standby");
        Ok(Taken {
            standby: self.name().to_string(),
            pid,
            disks: sb
                .disks
                .iter()
                .filter(|d| d.owned)
                .map(|d| RevertDisk {
                    device: d.device.clone(),
                    image: w
                        .manifest
                        .snapshot
                        .disks
                        .iter()
                        .find(|s| s.device == d.device)
                        .map(|s| s.image.clone())
                        .unwrap_or_default(),
                    overlay: d.image.clone(),
                })
                .collect(),
            lazy: of.lazy,
            resumed,
            notes,
        })
    }
}

/// Whether the standby's command line is the clone's but for its directory: the same
/// per-VM paths, moved to the same names.
fn same_paths(
    store: &store::Store,
    sb: &VmRecord,
    new: &VmName,
    argv: &CloneArgv,
) -> std::result::Result<(), String> {
    let sb_name = VmName::parse(&sb.name).ok_or("its record names no valid VM")?;
    let from = format!("{}/", store.vm_dir(&sb_name).display());
    let to = format!("{}/", store.vm_dir(new).display());
    let theirs: Vec<String> = sb
        .command
        .as_ref()
        .map(|c| c.argv.iter().map(|a| a.replace(&from, &to)).collect())
        .unwrap_or_default();
    let moved_ok = sb.clone_of.as_ref().is_some_and(|of| {
        of.moved.len() == argv.moved.len()
            && of.moved.iter().zip(&argv.moved).all(|(a, b)| {
                a.option == b.option
                    && a.from == b.from
                    && a.to.to_string_lossy().replace(&from, &to) == b.to.to_string_lossy()
            })
    });
    if theirs != argv.argv || !moved_ok {
        return Err("its command line is not the one the clone would get".into());
    }
    Ok(())
}

/// The entries of directory `dir` but `keep` (and dot-files: temporaries), sorted; none when
/// it is gone.
async fn entries(dir: PathBuf, keep: &'static [&'static str]) -> Result<Vec<String>> {
    store::blocking(move || {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(store::io("listing a VM's directory", &dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(store::io("listing a VM's directory", &dir))?;
            // A name that is not UTF-8 is no file qsnap or QEMU made: left where it is.
            let Some(n) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !keep.contains(&n.as_str()) && !n.starts_with('.') {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    })
    .await
}

/// Renames the entries `names` from directory `from` into `to`, durably; one that moved
/// already (a claim settled again) is left where it is. Never replaces anything.
async fn move_files(from: PathBuf, to: PathBuf, names: Vec<String>) -> Result<()> {
    store::blocking(move || {
        for name in &names {
            // A journal names plain entries only; anything else is never acted on.
            if name.contains('/') || name == ".." || name == "." {
                continue;
            }
            let (a, b) = (from.join(name), to.join(name));
            if !store::exists(&a)? {
                continue;
            }
            if store::exists(&b)? {
                return Err(Error::TargetExists { path: b });
            }
            std::fs::rename(&a, &b).map_err(store::io("moving the standby's files", &b))?;
        }
        store::sync_dir(&to)?;
        store::sync_dir(&from)
    })
    .await
}

/// Settles an interrupted claim of standby `vm` as `new`, recorded in `c` (the standby's
/// lock held): finished when `new`'s record names the standby; undone when `new` has no
/// record (what moved goes back, the standby is one again); abandoned when `new` became
/// another VM meanwhile (nothing of `new`'s is touched; the standby is marked unusable and
/// discarded by the next refill or `check --repair`).
pub(in crate::vm) async fn settle_claim(vm: &Vm, c: &ClaimIntent) -> Result<String> {
    let new = VmName::new(&c.new)?;
    // `new`'s lock: another clone of that name may be under way (the name was free).
    let _new_lock = vm.store().lock(&new, "settle a claim").await?;
    let outcome = finish_or_undo(vm, &new, &c.moved).await?;
    // Nothing of `new`'s is left when it was never made: its directory goes (the lock last).
    if !vm.store().has_vm(&new).await? {
        let _ = vm.store().remove_vm_dir(&new, false).await;
    }
    Ok(outcome)
}

/// [`settle_claim`] with `new`'s lock held by the caller.
async fn finish_or_undo(vm: &Vm, new: &VmName, moved: &[String]) -> Result<String> {
    let store = vm.store();
    let theirs = match store.record(new).await {
        Ok(r) => Some(
            r.clone_of
                .as_ref()
                .and_then(|o| o.standby.as_deref())
                .is_some_and(|s| s == vm.name().as_str()),
        ),
        Err(Error::UnknownVm { .. }) => None,
        Err(e) => return Err(e),
    };
    match theirs {
        Some(true) => {
            store.release_standby(vm.name()).await?;
            Ok(format!(
                "finished: {new} is a clone made from standby {} (paused if qsnap died before resuming it: `qsnap resume {new}`)",
                vm.name()
            ))
        }
        None => {
            move_files(store.vm_dir(new), store.vm_dir(vm.name()), moved.to_vec()).await?;
            Ok(format!(
                "undone: {} is a standby again, {new} was never made",
                vm.name()
            ))
        }
        Some(false) => {
            if let Ok(record) = store.record(vm.name()).await {
                let why =
                    format!("its claim as {new} was cut short, and {new} was made otherwise since");
                vm.mark_unusable(record, &why).await;
            }
            Ok(format!(
                "abandoned: {new} is another VM now; standby {} is discarded by the next refill or `check --repair`",
                vm.name()
            ))
        }
    }
}

/// Settles, before a clone named `new` is made (its lock held), any claim as `new` that was
/// cut short: a retried `qsnap clone` must never build beside a half-claimed standby's files.
pub(in crate::vm) async fn settle_claims_of(
    engine: &crate::vm::Engine,
    new: &VmName,
) -> Result<()> {
    let store = engine.store();
    for name in store.vms().await? {
        if !name.as_str().starts_with(super::names::STANDBY_PREFIX) {
            continue;
        }
        let Ok(Some(j)) = store.journal(&name).await else {
            continue;
        };
        let Intent::Claim(c) = &j.intent else {
            continue;
        };
        if c.new != new.as_str() {
            continue;
        }
        // Briefly: another qsnap may be settling it too (it takes `new`'s lock at once, and
        // gives up while this clone holds it).
        let _lock = engine
            .patient(std::time::Duration::from_secs(5))
            .store()
            .lock(&name, "settle a claim")
            .await?;
        let record = match store.record(&name).await {
            Ok(r) => r,
            // Released since it was listed: the claim finished (what is left, the sweep below
            // clears).
            Err(Error::UnknownVm { .. }) => continue,
            Err(e) => return Err(e),
        };
        let sb = engine.vm_from(name.clone(), record);
        let outcome = finish_or_undo(&sb, new, &c.moved).await?;
        if store.has_vm(&name).await? {
            store.clear_journal(&name).await?;
        }
        info!(standby = %name, %outcome, "an interrupted claim settled");
    }
    sweep_released(engine, |_, c| c.new == new.as_str(), true).await?;
    Ok(())
}

/// The standbys a cut-short release left as a directory with the claim's journal and no
/// record ([`crate::store::Store::released_standbys`]) that `wanted` picks (by name and
/// claim), each with the clone it became, and, with `clear`, their leftovers cleared: the claim had committed (a standby's
/// record goes only after NEW's is written), so nothing is undone — the journal goes, then
/// what is left of the directory. Never touches the standby's home (`standbys/SB/`): its
/// overlays are the clone's.
pub(in crate::vm) async fn sweep_released(
    engine: &crate::vm::Engine,
    wanted: impl Fn(&VmName, &ClaimIntent) -> bool,
    clear: bool,
) -> Result<Vec<Released>> {
    let store = engine.store();
    let mut found = Vec::new();
    for name in store
        .released_standbys(super::names::STANDBY_PREFIX)
        .await?
    {
        let Ok(Some(j)) = store.journal(&name).await else {
            continue;
        };
        let Intent::Claim(c) = &j.intent else {
            continue;
        };
        if !wanted(&name, c) {
            continue;
        }
        let kept = if clear {
            // At once: a holder is another qsnap settling it (or a release under way).
            let lock = match engine
                .at_once()
                .store()
                .lock(&name, "clear a released standby")
                .await
            {
                Ok(l) => l,
                Err(Error::Busy { what }) => {
                    found.push(Released {
                        name,
                        new: c.new.clone(),
                        kept: Some(format!("busy ({what}); run it again")),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Looked at again under the lock: a record back means it is no leftover.
            if store.has_vm(&name).await? {
                continue;
            }
            let strangers = unexpected_entries(store.vm_dir(&name)).await?;
            let kept = if strangers.is_empty() {
                if store.journal(&name).await?.is_some() {
                    store.clear_journal(&name).await?;
                    info!(standby = %name, clone = %c.new, "cleared what a cut-short release left");
                }
                store.remove_vm_dir(&name, false).await?;
                None
            } else {
                // Never guessed at: what is there was not left by a release.
                Some(format!(
                    "kept: it also holds {}; look at them before removing {} by hand",
                    strangers.join(", "),
                    store.vm_dir(&name).display()
                ))
            };
            drop(lock);
            kept
        } else {
            None
        };
        found.push(Released {
            name,
            new: c.new.clone(),
            kept,
        });
    }
    Ok(found)
}

/// A standby directory a cut-short release left (see [`sweep_released`]).
pub(in crate::vm) struct Released {
    /// The standby.
    pub name: VmName,
    /// The clone its claim made.
    pub new: String,
    /// `None`: cleared (or not asked to be); otherwise why it was kept.
    pub kept: Option<String>,
}

/// What a standby's directory holds beyond what a release leaves (its journal, lock, QEMU's
/// log, empty sub-directories).
async fn unexpected_entries(dir: PathBuf) -> Result<Vec<String>> {
    crate::store::blocking(move || {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let empty_dir = e.file_type().is_ok_and(|t| t.is_dir())
                && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none());
            if !(empty_dir || matches!(n.as_str(), "journal.json" | "lock" | "qemu.log")) {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    })
    .await
}

impl Vm {
    /// Marks this standby as one no clone may take (best effort: a standby left unmarked is
    /// still looked at, and refused, by every claim).
    pub(super) async fn mark_unusable(&self, mut record: VmRecord, why: &str) {
        if let Some(of) = &mut record.standby {
            of.unusable = Some(why.to_owned());
            if let Err(e) = self.store().write_record(&record).await {
                warn!(standby = %self.name(), error = %e, "could not mark the standby unusable");
            }
        }
    }
}
