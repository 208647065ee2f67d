//! Clones: a new VM started from a snapshot of another, running next to it — and removing one.
//!
//! ```text
//! source lock (shared: clones of one VM start side by side; delete/revert wait) + clone lock
//! → refuse: a name in use, an interrupted operation on the source, a damaged snapshot, a
//!   `--replace` that does not fit the recorded command line, a command line with what must
//!   differ per VM (launch/clone_argv.rs)                          ── nothing changed
//! → record of the clone, stopped, naming its overlays-to-be (from here `qsnap remove` undoes)
//! → a standby of the snapshot's pool claimed instead, when one is ready (`pool/claim.rs`)
//! → overlays in <store>/vms/<clone>/disks (a standby's: <store>/standbys/<name>/) over the
//!   snapshot's frozen images (never written)
//! → QEMU with the rewritten command line, -incoming defer → load (or map the RAM image
//!   lazily) → cont                            ── failure: QEMU stopped, everything removed
//! → record: running, pid
//! ```
//! The clone's chains back onto the source's frozen images; every delete and merge in the
//! store already leaves alone whatever another VM's chain touches (`refs.rs`), so the source
//! can delete the snapshot and its own layers without breaking a clone. Only a clone can be
//! removed (`remove`): its overlays hold nothing but what the clone did.

use super::refs::Use;
use super::revert::RamRestore;
use super::Vm;
use crate::error::{Error, RemoveRefusal, Result};
use crate::failpoint;
use crate::launch::clone_argv::{clone_argv, Purpose};
use crate::launch::replace::split_replacement;
use crate::launch::{self, stop_qemu, LaunchSpec, Launcher, ProcessLauncher};
use crate::name::{SnapshotName, VmName};
use crate::snapshot::revert::{self, RevertDisk};
use crate::store::{self, CloneOf, CurrentDisk, LaunchCommand, MovedPath, Origin, VmRecord};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How a clone is made.
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// Leave the clone's guest paused after loading its memory.
    pub paused: bool,
    /// Text replacements on the recorded command line, applied first: how the user gives a
    /// clone what must differ per VM (a `hostfwd` port, `-name`, …). A clone with
    /// replacements never takes a standby (standbys are made from the command line as
    /// recorded).
    pub replace: Vec<Replacement>,
    /// Never take a standby of a pool (`qsnap pool`): always start a QEMU of its own.
    pub cold: bool,
}

/// One text replacement on the source's recorded command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    /// `OLD=NEW` as the user wrote it (`--replace`), split against the source's recorded
    /// command line when the clone is made: OLD and NEW may hold `=` themselves, and the
    /// split taken is the one whose OLD appears there (the middle `=` when several do).
    /// One that does not fit is refused ([`Error::CloneRefused`]), never guessed.
    Text(String),
    /// `OLD` and `NEW`, already apart.
    Pair(String, String),
}

impl Replacement {
    /// `(OLD, NEW)` for the command line `argv`.
    pub(crate) fn split(&self, argv: &[String]) -> std::result::Result<(String, String), String> {
        match self {
            Replacement::Text(r) => split_replacement(r, argv),
            Replacement::Pair(old, new) => Ok((old.clone(), new.clone())),
        }
    }
}

/// What a clone did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct CloneReport {
    /// The new VM.
    pub vm: String,
    /// The VM and snapshot it came from.
    pub source: String,
    /// The snapshot.
    pub snapshot: String,
    /// Its overlays over the snapshot's frozen images.
    pub disks: Vec<RevertDisk>,
    /// Where each per-VM path of the command line went.
    pub moved: Vec<MovedPath>,
    /// What the user must know about the command line they gave the clone (e.g. a network
    /// of its own still carries the snapshot's MAC address).
    pub notes: Vec<String>,
    /// Its monitor socket.
    pub qmp: PathBuf,
    /// QEMU's stdout and stderr.
    pub log: PathBuf,
    /// How guest RAM came back.
    pub ram: RamRestore,
    /// Whether the guest runs now.
    pub resumed: bool,
    /// Memory load time.
    pub load_ms: f64,
    /// From the request to the guest running (or ready, when paused).
    pub total_ms: f64,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// The standby it was made from (`qsnap pool`), when it took one; its QEMU had been
    /// started and its memory loaded before the clone was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// Why it started a QEMU of its own although the snapshot has a pool (none ready, or
    /// those there were made from something that has changed since and were discarded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_because: Option<String>,
}

/// What a clone is made as.
#[derive(Debug, Clone)]
pub(super) enum Making {
    /// A clone the user asked for (a standby is claimed when one is ready).
    Clone,
    /// A standby of a pool: paused before its guest ever runs, its overlays in
    /// `<store>/standbys/<name>/`.
    Standby(crate::store::StandbyOf),
}

/// What removing a clone did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RemoveReport {
    /// The clone.
    pub vm: String,
    /// Whether its QEMU had to be stopped.
    pub stopped: bool,
    /// Its snapshots that went with it.
    pub snapshots: Vec<String>,
    /// The images removed.
    pub removed: Vec<PathBuf>,
    /// Layers of the source VM that only the clone's chains had kept (a snapshot the source
    /// deleted under the clone), merged now that it is gone.
    pub source_merges: Vec<super::delete::MergeReport>,
    /// Why those were not merged, when they were not (the removal itself is done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_note: Option<String>,
}

impl Vm {
    /// Starts a new VM `new` from `snap`: its own overlays over the snapshot's frozen images,
    /// its own monitor, log and per-VM files, and the snapshot's memory.
    pub async fn clone_snapshot(
        &self,
        snap: &SnapshotName,
        new: &VmName,
        opts: &CloneOptions,
    ) -> Result<CloneReport> {
        self.clone_with(snap, new, opts, &ProcessLauncher::default())
            .await
    }

    /// [`Vm::clone_snapshot`] with a launcher of your own.
    pub async fn clone_with<L: Launcher>(
        &self,
        snap: &SnapshotName,
        new: &VmName,
        opts: &CloneOptions,
        launcher: &L,
    ) -> Result<CloneReport> {
        self.make_clone(snap, new, opts, launcher, Making::Clone)
            .await
    }

    /// A clone or a standby: the cold path, and the claim of a standby for a clone.
    pub(super) async fn make_clone<L: Launcher>(
        &self,
        snap: &SnapshotName,
        new: &VmName,
        opts: &CloneOptions,
        launcher: &L,
        making: Making,
    ) -> Result<CloneReport> {
        let started = Instant::now();
        let store = self.store().clone();
        // Before any lock: a clone named as its source would otherwise meet the source's
        // lock, held by this very clone, and blame it.
        store.refuse_taken(new).await?;
        let _source_lock = self
            .lock_for_reading(&match &making {
                Making::Clone => format!("clone {snap} to {new}"),
                Making::Standby(_) => format!("{} {new} of {snap}", crate::store::MAKING_STANDBY),
            })
            .await?;
        let _lock = store.lock(new, "clone").await?;
        // A claim as `new` that qsnap died in is settled first (finished: `new` exists).
        super::pool::claim::settle_claims_of(self.engine(), new).await?;
        store.refuse_taken(new).await?;
        let source = store.record(self.name()).await?;
        let manifest = store.manifest(self.name(), snap).await?;
        let command = Self::command_of(&source)?.clone();
        let refuse = |why: String| Error::CloneRefused {
            snapshot: snap.to_string(),
            why,
        };
        let replace = opts
            .replace
            .iter()
            .map(|r| r.split(&command.argv))
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(refuse)?;
        let dir = store.vm_dir(new);
        let qmp = dir.join("qmp.sock");
        let source_qmp = self.socket_path(&source).ok();
        let rewritten = clone_argv(
            &command.argv,
            &command.cwd,
            &dir.join("files"),
            source_qmp.as_deref(),
            &qmp,
            &replace,
            Purpose::Clone,
        )
        .map_err(refuse)?;
        let standby = match &making {
            Making::Standby(of) => Some(of.clone()),
            Making::Clone => None,
        };
        let mut cold_because = None;
        if standby.is_none() && !opts.cold && replace.is_empty() {
            let wanted = super::pool::claim::Wanted {
                snap,
                source: &source,
                manifest: &manifest,
                argv: &rewritten,
                qmp: &qmp,
                paused: opts.paused,
            };
            match self.claim(new, &wanted).await? {
                super::pool::claim::Claimed::Clone(taken) => {
                    return Ok(self.claimed_report(snap, new, &manifest, &rewritten, taken, started))
                }
                super::pool::claim::Claimed::Cold(why) => cold_because = why,
            }
        }
        let disk_dir = match &standby {
            Some(_) => store.standby_dir(new.as_str()),
            None => dir.join("disks"),
        };
        let machine_ok = super::revert::binary_can_load(&command.argv[0], &manifest, self.cancel());
        let (machine_ok, verified) = tokio::join!(
            machine_ok,
            revert::validate(snap.as_str(), &manifest.snapshot)
        );
        let verify_ms = verified?.verify_ms;
        machine_ok.map_err(refuse)?;
        let planned = revert::plan_overlays(&manifest.snapshot, Some(&disk_dir)).await?;
        let disks: Vec<CurrentDisk> = source
            .disks
            .iter()
            .map(|d| match planned.iter().find(|p| p.device == d.device) {
                Some(p) => Ok(CurrentDisk {
                    device: d.device.clone(),
                    image: p.overlay.clone(),
                    launch_image: d.launch_image.clone(),
                    owned: true,
                }),
                // Read-only or empty at the snapshot: shared as it is, never written.
                None if manifest
                    .snapshot
                    .skipped
                    .iter()
                    .any(|s| s.device == d.device && s.reason == "read-only") =>
                {
                    Ok(CurrentDisk {
                        owned: false,
                        ..d.clone()
                    })
                }
                // A writable disk the snapshot does not hold (added since): never shared.
                None => Err(refuse(format!(
                    "the snapshot holds no state of disk {}; a clone would share it with {}",
                    d.device,
                    self.name()
                ))),
            })
            .collect::<Result<_>>()?;
        let command = LaunchCommand {
            argv: rewritten.argv,
            cwd: command.cwd,
        };
        let spec = LaunchSpec {
            vm: new.to_string(),
            command: command.clone(),
            disks: Self::substitutions(&disks),
            qmp_socket: qmp.clone(),
            incoming: manifest.snapshot.memory.is_some(),
            // A standby's guest never runs before a clone claims it.
            paused: manifest.snapshot.memory.is_some() || opts.paused || standby.is_some(),
            machine: manifest.machine.clone(),
            log: dir.join("qemu.log"),
            ram: revert::lazy_mapping(&manifest.snapshot),
        };
        launch::build_argv(&spec).map_err(|e| refuse(e.to_string()))?;
        let ram = RamRestore::of(&manifest, &spec, self.name(), snap);
        let guest_agent = source.guest_agent.as_ref().and_then(|g| {
            rewritten
                .moved
                .iter()
                .find(|m| &m.from == g)
                .map(|m| m.to.clone())
        });
        let mut record = VmRecord {
            schema: store::SCHEMA,
            name: new.to_string(),
            qmp: qmp.display().to_string(),
            origin: Origin::Run,
            pid: None,
            pid_start: None,
            command: Some(command),
            current: None,
            disks,
            owned_images: planned.iter().map(|p| p.overlay.clone()).collect(),
            guest_agent,
            registered_at: store::now_rfc3339(),
            clone_of: Some(CloneOf {
                vm: self.name().to_string(),
                snapshot: snap.to_string(),
                moved: rewritten.moved.clone(),
                standby: None,
            }),
            standby: standby.clone(),
        };
        // Recorded before anything is made (its directories too): from here the clone is a
        // (stopped) VM, and `remove` undoes whatever a crash leaves; before, a crash leaves
        // nothing but the lock.
        store.write_record(&record).await?;
        let clone = self.engine.vm_from(new.clone(), record.clone());
        let made = async {
            failpoint::hit("clone.recorded", None)
                .await
                .map_err(|e| (e, None))?;
            for d in [dir.join("files"), disk_dir.clone()] {
                make_dir(d).await.map_err(|e| (e, None))?;
            }
            let prepared = revert::make_overlays(
                snap.as_str(),
                &manifest.snapshot,
                planned,
                verify_ms,
                self.cancel(),
            )
            .await
            .map_err(|e| (e, None))?;
            failpoint::hit("clone.overlays-made", None)
                .await
                .map_err(|e| (e, None))?;
            let launched = launcher.launch(&spec).await.map_err(|e| (e, None))?;
            // Recorded at once: a crash during the load (up to minutes) leaves a record that
            // names this QEMU, so `remove` can stop it even when its monitor does not answer.
            let pid = launched.pid;
            super::state::record_qemu(&mut record, pid).await;
            store.write_record(&record).await.map_err(|e| (e, pid))?;
            failpoint::hit("clone.launched", pid)
                .await
                .map_err(|e| (e, pid))?;
            let qmp = clone.connect().await.map_err(|e| (e, pid))?;
            let pid = qmp.peer_pid().or(pid);
            if pid != record.pid {
                // A launcher of the embedder's that did not know it.
                super::state::record_qemu(&mut record, pid).await;
                store.write_record(&record).await.map_err(|e| (e, pid))?;
            }
            let resume = !opts.paused && standby.is_none();
            let restored = revert::restore(&qmp, &prepared, resume, Duration::from_secs(600))
                .await
                .map_err(|e| (e, pid))?;
            failpoint::hit("clone.loaded", pid)
                .await
                .map_err(|e| (e, pid))?;
            Ok::<_, (Error, Option<u32>)>((prepared, pid, restored))
        }
        .await;
        let (prepared, pid, restored) = match made {
            Ok(x) => x,
            Err((e, pid)) => {
                if let Some(pid) = pid {
                    if let Err(s) = stop_qemu(&record.qmp, Some(pid), Duration::from_secs(2)).await
                    {
                        // Its record stays, naming the QEMU (and its start time, so that a
                        // reused pid is never taken for it): `remove` stops it and cleans up.
                        warn!(error = %s, "the failed clone's QEMU could not be stopped");
                        if record.pid != Some(pid) {
                            super::state::record_qemu(&mut record, Some(pid)).await;
                        }
                        let _ = store.write_record(&record).await;
                        return Err(e);
                    }
                }
                // The log stays: the error points at it (a standby's goes: nothing names it).
                let why = if standby.is_some() {
                    Discard::Remove
                } else {
                    Discard::FailedClone
                };
                if let Err(u) = clone.discard_clone(&record, why).await {
                    warn!(error = %u, "the failed clone's files could not all be removed; `qsnap remove {new}` finishes");
                }
                return Err(e);
            }
        };
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        info!(vm = %new, source = %self.name(), %snap, total_ms, "cloned");
        Ok(CloneReport {
            vm: new.to_string(),
            source: self.name().to_string(),
            snapshot: snap.to_string(),
            disks: prepared.disks,
            moved: rewritten.moved,
            notes: rewritten.notes,
            qmp,
            log: dir.join("qemu.log"),
            ram,
            // A disk-only snapshot's clone boots: it runs unless it was asked paused.
            resumed: if manifest.snapshot.memory.is_some() {
                restored.resumed
            } else {
                !opts.paused && standby.is_none()
            },
            load_ms: restored.load_ms,
            total_ms,
            pid,
            standby: None,
            cold_because,
        })
    }

    /// The report of a clone that claimed a standby.
    fn claimed_report(
        &self,
        snap: &SnapshotName,
        new: &VmName,
        manifest: &store::Manifest,
        argv: &crate::launch::clone_argv::CloneArgv,
        taken: super::pool::claim::Taken,
        started: Instant,
    ) -> CloneReport {
        let dir = self.store().vm_dir(new);
        CloneReport {
            vm: new.to_string(),
            source: self.name().to_string(),
            snapshot: snap.to_string(),
            disks: taken.disks,
            moved: argv.moved.clone(),
            notes: argv.notes.iter().cloned().chain(taken.notes).collect(),
            qmp: dir.join("qmp.sock"),
            log: dir.join("qemu.log"),
            ram: match (&manifest.snapshot.memory, taken.lazy) {
                (None, _) => RamRestore::None,
                (Some(_), true) => RamRestore::Lazy,
                (Some(_), false) => RamRestore::Eager {
                    why: "the standby loaded it before the clone was asked for (the snapshot \
                          had no RAM image then)"
                        .into(),
                },
            },
            resumed: taken.resumed,
            load_ms: 0.0,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            pid: taken.pid,
            standby: Some(taken.standby),
            cold_because: None,
        }
    }

    /// Removes a clone: stops its QEMU, then deletes its snapshots, its overlays, its files
    /// and its record. Refused for a VM that is not a clone (its overlays hold its data:
    /// `delete --all` merges them back first), and while another VM's chain uses an image of
    /// this one (a clone of its snapshots).
    pub async fn remove(&self) -> Result<RemoveReport> {
        if self.record().clone_of.is_none() {
            return Err(Error::RemoveRefused {
                vm: self.name().to_string(),
                reason: RemoveRefusal::NotAClone,
            });
        }
        // Under the lock, refused before anything stops.
        let op = self.begin("remove").await?;
        let mut record = op.record.clone();
        self.refuse_if_used_elsewhere(&record).await?;
        // Its standbys stand on its snapshots: they go first (their guests never ran), and a
        // busy one refuses the remove before anything of the clone's stops.
        self.drop_all_pools().await?;
        let manifests = self.store().manifests(self.name()).await?;
        // Whatever runs stops first — also a QEMU whose monitor is busy (unreachable): its
        // files must not go while it runs.
        let state = super::state::VmState::observe(self, &record).await;
        let stopped = !matches!(state, super::state::VmState::Stopped);
        if stopped {
            self.stop_before_discarding(&mut record, &state, "remove it")
                .await?;
        }
        failpoint::hit("remove.stopped", None).await?;
        let removed = self.discard_clone(&record, Discard::Remove).await?;
        drop(op);
        let (source_merges, source_note) = match &record.clone_of {
            Some(of) => self.merge_in_source(&of.vm).await,
            None => (Vec::new(), None),
        };
        Ok(RemoveReport {
            vm: self.name().to_string(),
            stopped,
            snapshots: manifests.into_iter().map(|m| m.name).collect(),
            removed,
            source_merges,
            source_note,
        })
    }

    /// The clone's chains may have been all that kept a layer of its source from merging (the
    /// source deleted the snapshot the clone stood on): what the source's delete left for
    /// later is merged now, under the source's lock, so that its `check` stays clean. Best
    /// effort: a busy or unreachable source is told about, not waited for.
    async fn merge_in_source(
        &self,
        source: &str,
    ) -> (Vec<super::delete::MergeReport>, Option<String>) {
        let later = |why: String| {
            Some(format!(
                "{source} may have layers to merge now that {} is gone ({why}); `qsnap check {source} --repair` merges them",
                self.name()
            ))
        };
        let Ok(name) = VmName::new(source) else {
            return (Vec::new(), None);
        };
        // Best effort: told about when busy, never queued behind it (`--wait` or not).
        let vm = match self.engine().at_once().vm(&name).await {
            Ok(vm) => vm,
            Err(Error::UnknownVm { .. }) => return (Vec::new(), None),
            Err(e) => return (Vec::new(), later(e.to_string())),
        };
        let merged = async {
            let op = vm
                .begin(&format!("merge after removing {}", self.name()))
                .await?;
            let mut record = op.record.clone();
            let manifests = vm.store().manifests(vm.name()).await?;
            let (graph, live) = super::merge::view(&vm, &record, &manifests).await?;
            if !super::merge::has_merges(&graph, &record, live.as_ref()) {
                return Ok(Vec::new());
            }
            drop(live);
            super::merge::merge_leftovers(&vm, &mut record, None).await
        }
        .await;
        match merged {
            Ok(m) => (m, None),
            Err(e) => (Vec::new(), later(e.to_string())),
        }
    }

    /// Refuses while another VM's chain uses an image this one made (a clone of one of its
    /// snapshots).
    async fn refuse_if_used_elsewhere(&self, record: &VmRecord) -> Result<()> {
        match self.used_elsewhere(record).await? {
            Some((by, image)) => Err(Error::RemoveRefused {
                vm: self.name().to_string(),
                reason: RemoveRefusal::InUse { by, image },
            }),
            None => Ok(()),
        }
    }

    /// Another VM whose chain uses an image this one made (a clone of one of its snapshots),
    /// and that image.
    pub(super) async fn used_elsewhere(
        &self,
        record: &VmRecord,
    ) -> Result<Option<(String, PathBuf)>> {
        self.used_elsewhere_of(record, &record.owned_images).await
    }

    /// Another VM whose chain uses one of `images`, and that image.
    pub(super) async fn used_elsewhere_of(
        &self,
        record: &VmRecord,
        images: &[PathBuf],
    ) -> Result<Option<(String, PathBuf)>> {
        let manifests = self.store().manifests(self.name()).await?;
        let graph = super::refs::Graph::gather(
            self.store(),
            self.name(),
            record,
            &manifests,
            None,
            self.cancel(),
        )
        .await?;
        for img in images {
            for u in graph.uses_of(img) {
                let Use::OtherVm { vm } = u else { continue };
                // This VM's own standbys do not count: they go with it (`drop_all_pools`).
                if self.is_my_standby(vm.as_str()).await {
                    continue;
                }
                return Ok(Some((vm.to_string(), img.clone())));
            }
        }
        Ok(None)
    }

    /// Deletes a stopped clone's snapshots, owned images, files and record (the lock held).
    pub(super) async fn discard_clone(
        &self,
        record: &VmRecord,
        why: Discard,
    ) -> Result<Vec<PathBuf>> {
        let removing = matches!(why, Discard::Remove);
        let store = self.store();
        for m in store.manifests(self.name()).await? {
            let snap = SnapshotName::new(&m.name)?;
            store.remove_snapshot(self.name(), &snap).await?;
        }
        if removing {
            failpoint::hit("remove.snapshots-removed", None).await?;
        }
        let mut removed = Vec::new();
        // A standby's overlays, and those of the clone that claimed it, are in its own
        // directory under `<store>/standbys/`.
        let home = standby_home(store, record);
        // Newest first: an image is always made after its backing, so a removal cut short (a
        // crash, a power loss) never leaves an image whose backing is gone.
        for img in record.owned_images.iter().rev() {
            // Only what the clone made: in its own directory (a plain path, so no `..` climbs
            // out of it), and a regular qcow2 file (the door checks).
            let own = img.starts_with(store.vm_dir(self.name()))
                || home.as_ref().is_some_and(|h| img.starts_with(h));
            if !store::plain_absolute(img) || !own {
                warn!(image = %img.display(), "kept: not in the clone's directory");
                continue;
            }
            let p = img.clone();
            let present =
                store::blocking(move || Ok(std::fs::symlink_metadata(&p).is_ok())).await?;
            if present {
                crate::unlink::checked(img, crate::unlink::Kind::Image).await?;
                removed.push(img.clone());
            }
        }
        if removing {
            failpoint::hit("remove.images-removed", None).await?;
        }
        let dir = store.vm_dir(self.name());
        store::blocking(move || {
            for sub in ["files", "disks"] {
                match std::fs::remove_dir_all(dir.join(sub)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(store::io("removing the clone's files", &dir)(e)),
                }
            }
            // Its overlays are gone (above): the directory is empty unless a file of someone
            // else's was put there, which stays.
            if let Some(h) = &home {
                let _ = std::fs::remove_dir(h);
            }
            if removing {
                let _ = std::fs::remove_file(dir.join("qemu.log"));
            }
            Ok(())
        })
        .await?;
        store.forget_vm(self.name()).await?;
        if removing {
            store.remove_vm_dir(self.name(), true).await?;
        }
        Ok(removed)
    }
}

/// Why a clone's files go.
#[derive(Debug, Clone, Copy)]
pub(super) enum Discard {
    /// The clone failed: everything goes but QEMU's log, which its error points at.
    FailedClone,
    /// `remove`: everything goes.
    Remove,
}

/// Makes a clone's directory, its name durable: a power cut must not take the clone's
/// overlays (and the writes its guest flushed there) along with a directory entry never synced.
async fn make_dir(dir: PathBuf) -> Result<()> {
    store::blocking(move || store::create_dir_durably(&dir, 0o700)).await
}

/// The directory under `<store>/standbys/` where a standby's overlays are, or those of the
/// clone that claimed it; `None` for any other VM.
pub(super) fn standby_home(store: &store::Store, record: &VmRecord) -> Option<PathBuf> {
    let name = match (&record.standby, &record.clone_of) {
        (Some(_), _) => record.name.as_str(),
        (
            None,
            Some(CloneOf {
                standby: Some(s), ..
            }),
        ) => s.as_str(),
        _ => return None,
    };
    // A name read from a record: only a valid VM name may become a path.
    VmName::parse(name).map(|n| store.standby_dir(n.as_str()))
}
