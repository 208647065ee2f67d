//! The store: where qsnap keeps what it knows about VMs and their snapshots.
//!
//! ```text
//! <store>/                         0700
//!   vms/<vm>/vm.json               the VM record (socket, command line, current disks, owned images)
//!   vms/<vm>/lock                  flock: one operation per VM at a time
//!   vms/<vm>/journal.json          an operation in progress (or interrupted)
//!   vms/<vm>/snapshots/<snap>.json one manifest per snapshot
//!   vms/<vm>/memory/<snap>.mem     guest memory (0600 in a 0700 directory)
//! ```
//! Every JSON file is written atomically (temp file, fsync, rename, fsync dir); a new manifest
//! never replaces a file. This module knows files, not QEMU: it never talks QMP, and it
//! imports nothing above it (the file format lives in [`schema`]).

mod atomic;
mod lock;
mod pools;

/// How an operation that makes a standby names itself in its source's lock.
pub(crate) const MAKING_STANDBY: &str = "make standby";

/// How long any lock is waited for while its holder is making a standby.
const STANDBY_WAIT: Duration = Duration::from_secs(60);
pub mod schema;
mod verify;

pub(crate) use atomic::{
    blocking, create_dir_durably, exists, io, read_json, remove_durably, sync_dir, write_json,
    write_json_volatile,
};
pub use lock::{lock_holder, LockHolder, VmLock};
pub use schema::{
    ClaimIntent, CloneOf, CreateIntent, CreateReport, CurrentDisk, DeleteIntent, DeletePhase,
    Fingerprint, ImageStamp, Imported, ImportedFile, Intent, Journal, LaunchCommand, LazyRam,
    LivePhase, Manifest, MemoryImage, MergeKind, MergeStep, Mode, MovedPath, Origin,
    PlannedOverlay, PoolRecord, RamBlock, RevertIntent, RevertPhase, SavedSettings, SkippedDisk,
    SnapshotDisk, StandbyOf, StartIntent, StopIntent, ThawIntent, VmRecord, SCHEMA,
    SCHEMA_NAMED_RAM,
};
pub(crate) use verify::plain_absolute;
pub use verify::plain_path;
use verify::{check_manifest, check_schema, plain_journal, plain_manifest, plain_record};

use crate::error::{Error, Result};
use crate::name::{SnapshotName, VmName};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The note a forgotten VM leaves in its directory when files of it stay there.
const FORGOTTEN: &str = "FORGOTTEN";

/// A store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// How long taking a VM's lock waits for another operation to finish.
    lock_wait: Duration,
    /// Whether a lock held by an operation making a standby is waited for regardless
    /// ([`STANDBY_WAIT`]); off for best-effort work that must never queue.
    wait_for_standbys: bool,
}

impl Store {
    /// A store at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            lock_wait: Duration::ZERO,
            wait_for_standbys: true,
        }
    }

    /// Taking a VM's lock waits up to `wait` for an operation that holds it (default: none,
    /// [`Error::Locked`] at once), then reports it as before.
    pub fn with_lock_wait(mut self, wait: Duration) -> Store {
        self.lock_wait = wait;
        self
    }

    /// The same store, never waiting for a lock (not even for a standby being made): for
    /// best-effort work that must not queue.
    pub(crate) fn at_once(mut self) -> Store {
        self.lock_wait = Duration::ZERO;
        self.wait_for_standbys = false;
        self
    }

    /// Retries `take` while the lock is held by another operation, up to the lock wait.
    async fn waiting<F, Fut>(&self, vm: &VmName, mut take: F) -> Result<VmLock>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<VmLock>>,
    {
        // A wait too long to add to the clock is as good as forever.
        let deadline = tokio::time::Instant::now()
            .checked_add(self.lock_wait)
            .unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400)
            });
        // A standby being made (a pool's background refill) holds its source's lock for a
        // second or so: waited for even without `--wait`, so that a refill started by a clone
        // never turns the user's next command away.
        let standby_deadline = tokio::time::Instant::now() + STANDBY_WAIT;
        loop {
            match take().await {
                Err(Error::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(Error::Locked { holder, .. })
                    if self.wait_for_standbys
                        && tokio::time::Instant::now() < standby_deadline
                        && (holder.contains(MAKING_STANDBY)
                            || self.standby_being_made(vm).await) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// The default location: `/var/lib/qsnap` for root (uid 0), else `$XDG_STATE_HOME/qsnap`,
    /// else `~/.local/state/qsnap`.
    pub fn default_root() -> PathBuf {
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/qsnap");
        }
        if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("qsnap");
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/state/qsnap"),
            None => PathBuf::from("/var/lib/qsnap"),
        }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of one VM.
    pub fn vm_dir(&self, vm: &VmName) -> PathBuf {
        self.root.join("vms").join(vm.as_str())
    }

    /// Where a VM's memory files go.
    pub fn memory_dir(&self, vm: &VmName) -> PathBuf {
        self.vm_dir(vm).join("memory")
    }

    /// The memory file a snapshot of this name has (whether or not it exists).
    pub fn memory_path(&self, vm: &VmName, snap: &SnapshotName) -> PathBuf {
        self.memory_dir(vm).join(format!("{snap}.mem"))
    }

    /// A lazy snapshot's device-state file and RAM image (whether or not they exist).
    pub fn lazy_paths(&self, vm: &VmName, snap: &SnapshotName) -> (PathBuf, PathBuf) {
        let dir = self.memory_dir(vm);
        (
            dir.join(format!("{snap}.dev")),
            dir.join(format!("{snap}.ram")),
        )
    }

    /// Every memory file a snapshot of this name may have: stream, device state, RAM image.
    pub fn memory_files(&self, vm: &VmName, snap: &SnapshotName) -> [PathBuf; 3] {
        let (dev, ram) = self.lazy_paths(vm, snap);
        [self.memory_path(vm, snap), dev, ram]
    }

    fn record_path(&self, vm: &VmName) -> PathBuf {
        self.vm_dir(vm).join("vm.json")
    }

    fn journal_path(&self, vm: &VmName) -> PathBuf {
        self.vm_dir(vm).join("journal.json")
    }

    fn snapshots_dir(&self, vm: &VmName) -> PathBuf {
        self.vm_dir(vm).join("snapshots")
    }

    fn manifest_path(&self, vm: &VmName, snap: &SnapshotName) -> PathBuf {
        self.snapshots_dir(vm).join(format!("{snap}.json"))
    }

    async fn ensure_dir(&self, dir: PathBuf) -> Result<()> {
        let root = self.root.clone();
        // Durably: a VM directory whose name a power cut loses takes its record along.
        blocking(move || {
            for d in [&root, &dir] {
                create_dir_durably(d, 0o700)?;
            }
            Ok(())
        })
        .await
    }

    /// Takes the VM's lock for `operation` (e.g. `create s1`), refusing if another operation
    /// holds it — after the store's lock wait, if it has one ([`Store::with_lock_wait`]).
    pub async fn lock(&self, vm: &VmName, operation: &str) -> Result<VmLock> {
        self.waiting(vm, || self.lock_now(vm, operation)).await
    }

    async fn lock_now(&self, vm: &VmName, operation: &str) -> Result<VmLock> {
        let dir = self.vm_dir(vm);
        let mut tries = 0;
        loop {
            self.ensure_dir(dir.clone()).await?;
            let (name, op, d) = (vm.to_string(), operation.to_owned(), dir.clone());
            match blocking(move || VmLock::acquire(&d.join("lock"), &name, &op)).await {
                // The directory went between making it and opening the lock (the last
                // holder of a VM that was never made removed it): make it again.
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && tries < 5 =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Takes a VM's lock shared (for operations that only read its snapshots: clones);
    /// refused while an exclusive holder runs, and keeps exclusive ones out meanwhile.
    pub async fn lock_shared(&self, vm: &VmName, operation: &str) -> Result<VmLock> {
        self.waiting(vm, || self.lock_shared_now(vm, operation))
            .await
    }

    async fn lock_shared_now(&self, vm: &VmName, operation: &str) -> Result<VmLock> {
        let dir = self.vm_dir(vm);
        self.ensure_dir(dir.clone()).await?;
        let (name, op) = (vm.to_string(), operation.to_owned());
        blocking(move || VmLock::acquire_shared(&dir.join("lock"), &name, &op)).await
    }

    /// Reads a VM's record; [`Error::UnknownVm`] when there is none.
    pub async fn record(&self, vm: &VmName) -> Result<VmRecord> {
        let path = self.record_path(vm);
        let (p, name) = (path.clone(), vm.clone());
        let Some(rec) = blocking(move || read_record(&p, &name)).await? else {
            let root = self.root.clone();
            let known = match blocking(move || exists(&root)).await {
                Ok(true) => Some(
                    self.vms()
                        .await
                        .unwrap_or_default()
                        .into_iter()
                        .map(|n| n.to_string())
                        .collect(),
                ),
                _ => None,
            };
            return Err(Error::UnknownVm {
                vm: vm.to_string(),
                store: self.root.clone(),
                known,
            });
        };
        Ok(rec)
    }

    /// The records and manifests of `vms`, all read in one trip to the blocking pool (a
    /// reference graph reads every VM of the store: a trip per file costs more than the
    /// read). A VM with no record is [`Error::UnknownVm`], as for [`Store::record`].
    pub(crate) async fn records_and_manifests(
        &self,
        vms: Vec<VmName>,
    ) -> Result<Vec<(VmName, VmRecord, Vec<Manifest>)>> {
        let at: Vec<_> = vms
            .into_iter()
            .map(|vm| (self.record_path(&vm), self.snapshots_dir(&vm), vm))
            .collect();
        let read = blocking(move || {
            at.into_iter()
                .map(|(record, snapshots, vm)| {
                    let rec = read_record(&record, &vm)?;
                    let manifests = read_manifests(&snapshots, &vm)?;
                    Ok((vm, rec, manifests))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let mut out = Vec::with_capacity(read.len());
        for (vm, rec, manifests) in read {
            let rec = match rec {
                Some(rec) => rec,
                // (Its error, as `record` words it; or the record, if it was written just now,
                // beside manifests read a moment before: as two reads one after the other
                // would pair them.)
                None => self.record(&vm).await?,
            };
            out.push((vm, rec, manifests));
        }
        Ok(out)
    }

    /// Whether a VM record exists. An unreadable store is an error, not "no".
    pub async fn has_vm(&self, vm: &VmName) -> Result<bool> {
        let path = self.record_path(vm);
        blocking(move || exists(&path)).await
    }

    /// Writes (replaces) a VM's record. Hold the VM's lock.
    pub(crate) async fn write_record(&self, rec: &VmRecord) -> Result<()> {
        let vm = VmName::new(&rec.name)?;
        self.ensure_dir(self.vm_dir(&vm)).await?;
        let (path, mut rec) = (self.record_path(&vm), rec.clone());
        plain_record(&mut rec);
        blocking(move || write_json(&path, &rec, false)).await
    }

    /// Removes a VM from the store (its record, journal, lock and empty directories). The
    /// caller has made sure nothing is left in it that matters.
    pub(crate) async fn forget_vm(&self, vm: &VmName) -> Result<()> {
        let dir = self.vm_dir(vm);
        blocking(move || {
            // The directories first: the record's removal, last, makes their removal durable
            // too (one fsync of the VM's directory).
            for d in ["snapshots", "memory"] {
                let _ = std::fs::remove_dir(dir.join(d));
            }
            for f in ["journal.json", "vm.json"] {
                remove_durably(&dir.join(f))?;
            }
            Ok(())
        })
        .await
    }

    /// Writes, durably, the `FORGOTTEN` note of a VM whose files stay in its directory (its
    /// disk images): before its record goes, so that at no moment is the directory both
    /// unregistered and unmarked (a new VM of the name would move in beside them).
    pub(crate) async fn mark_forgotten(&self, vm: &VmName, note: &str) -> Result<()> {
        let (dir, note) = (self.vm_dir(vm), note.to_owned());
        blocking(move || {
            use std::io::Write;
            let (tmp, path) = (dir.join(".FORGOTTEN.tmp"), dir.join(FORGOTTEN));
            let mut f = std::fs::File::create(&tmp).map_err(io("writing the note", &tmp))?;
            f.write_all(note.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io("writing the note", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("writing the note", &path))?;
            sync_dir(&dir)
        })
        .await
    }

    /// After the record is gone ([`Store::forget_vm`]): removes what qsnap keeps in a VM's
    /// directory — QEMU's log, its monitor socket when `socket_dead` (no QEMU serves it), the
    /// empty sub-directories — and then, if nothing else is left, the lock and the directory.
    /// Anything else stays (a forgotten VM's disk images, with their note), and the lock with
    /// it: an operation waiting on it must not take a fresh one beside what stays. Returns
    /// the directory when it stays. Hold the lock.
    pub(crate) async fn remove_vm_dir(
        &self,
        vm: &VmName,
        socket_dead: bool,
    ) -> Result<Option<PathBuf>> {
        let dir = self.vm_dir(vm);
        blocking(move || {
            let _ = std::fs::remove_file(dir.join("qemu.log"));
            if socket_dead {
                let _ = std::fs::remove_file(dir.join("qmp.sock"));
            }
            for d in ["snapshots", "memory", "files", "disks", "boot"] {
                let _ = std::fs::remove_dir(dir.join(d));
            }
            let left: Vec<std::ffi::OsString> = match std::fs::read_dir(&dir) {
                Ok(entries) => entries.flatten().map(|e| e.file_name()).collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io("listing what is left", &dir)(e)),
            };
            if left.iter().any(|n| n != "lock") {
                return Ok(Some(dir));
            }
            // The lock last: nothing is left for a waiting operation to find half-removed.
            let _ = std::fs::remove_file(dir.join("lock"));
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    sync_dir(dir.parent().unwrap_or(Path::new(".")))?;
                    Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(_) => Ok(Some(dir)),
            }
        })
        .await
    }

    /// The directory a forgotten VM of this name left (its disk images were in the store),
    /// when there is one: a new VM may not take the name until it is gone.
    pub async fn leftovers(&self, vm: &VmName) -> Result<Option<PathBuf>> {
        let dir = self.vm_dir(vm);
        blocking(move || Ok(exists(&dir.join(FORGOTTEN))?.then_some(dir))).await
    }

    /// Refuses a name a new VM cannot take: one in the store, or one a forgotten VM's files
    /// still hold ([`Store::leftovers`]).
    pub(crate) async fn refuse_taken(&self, vm: &VmName) -> Result<()> {
        if self.has_vm(vm).await? {
            return Err(Error::VmExists {
                vm: vm.to_string(),
                leftovers: None,
            });
        }
        if let Some(dir) = self.leftovers(vm).await? {
            return Err(Error::VmExists {
                vm: vm.to_string(),
                leftovers: Some(dir),
            });
        }
        Ok(())
    }

    /// The names of all VMs in the store, sorted.
    pub async fn vms(&self) -> Result<Vec<VmName>> {
        self.vm_dirs(|_, dir| exists(&dir.join("vm.json"))).await
    }

    /// The names of the directories under `vms/` that name a VM and that `keep` accepts
    /// (given the name and the directory), sorted.
    pub(crate) async fn vm_dirs(
        &self,
        keep: impl Fn(&VmName, &Path) -> Result<bool> + Send + 'static,
    ) -> Result<Vec<VmName>> {
        let dir = self.root.join("vms");
        blocking(move || {
            let mut names = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                Err(e) => return Err(io("listing VMs", &dir)(e)),
            };
            for e in entries {
                let e = e.map_err(io("listing VMs", &dir))?;
                if let Some(n) = e.file_name().to_str().and_then(VmName::parse) {
                    if keep(&n, &e.path())? {
                        names.push(n);
                    }
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    /// Writes a new snapshot's manifest; never replaces one. Hold the VM's lock.
    pub(crate) async fn write_manifest(&self, m: &Manifest) -> Result<()> {
        self.put_manifest(m, true).await
    }

    /// Replaces an existing manifest (a delete moving children to a new parent, or naming
    /// the image a merge left). Hold the VM's lock.
    pub(crate) async fn replace_manifest(&self, m: &Manifest) -> Result<()> {
        self.put_manifest(m, false).await
    }

    async fn put_manifest(&self, m: &Manifest, exclusive: bool) -> Result<()> {
        let (vm, snap) = (VmName::new(&m.vm)?, SnapshotName::new(&m.name)?);
        let path = self.manifest_path(&vm, &snap);
        // Never write what the reader would refuse: a store qsnap wrote is one it can read.
        let mut m = m.clone();
        plain_manifest(&mut m);
        let named_ram = m
            .snapshot
            .memory
            .as_ref()
            .and_then(|x| x.lazy.as_ref())
            .is_some_and(|l| !l.blocks.is_empty());
        m.schema = if named_ram {
            schema::SCHEMA_NAMED_RAM
        } else {
            SCHEMA
        };
        check_manifest(&m, &vm, &path)?;
        let m = &m;
        self.ensure_dir(self.snapshots_dir(&vm)).await?;
        let m = m.clone();
        blocking(move || write_json(&path, &m, exclusive)).await
    }

    /// Removes a snapshot's memory files — whatever of stream, device state and RAM image it
    /// has (an interrupted lazy conversion may have left either) — then its manifest, durably.
    /// Returns the memory files removed. Hold the VM's lock.
    pub(crate) async fn remove_snapshot(
        &self,
        vm: &VmName,
        snap: &SnapshotName,
    ) -> Result<Vec<PathBuf>> {
        let removed = self.remove_memory(vm, snap).await?;
        self.remove_manifest(vm, snap).await?;
        Ok(removed)
    }

    /// Removes a snapshot's memory files (durably), those that exist; returns them. Hold the
    /// VM's lock.
    pub(crate) async fn remove_memory(
        &self,
        vm: &VmName,
        snap: &SnapshotName,
    ) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for path in self.memory_files(vm, snap) {
            let p = path.clone();
            if blocking(move || exists(&p)).await? {
                let p = path.clone();
                blocking(move || remove_durably(&p)).await?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Removes a manifest (durably). Hold the VM's lock.
    pub(crate) async fn remove_manifest(&self, vm: &VmName, snap: &SnapshotName) -> Result<()> {
        let path = self.manifest_path(vm, snap);
        blocking(move || remove_durably(&path)).await
    }

    /// How many snapshot manifests a VM has, counted by name without reading them (so that a
    /// damaged one does not hide the count from `status`).
    pub async fn snapshot_count(&self, vm: &VmName) -> usize {
        let dir = self.snapshots_dir(vm);
        blocking(move || {
            Ok(std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            let n = e.file_name();
                            let n = n.to_string_lossy();
                            n.ends_with(".json") && !n.starts_with('.')
                        })
                        .count()
                })
                .unwrap_or(0))
        })
        .await
        .unwrap_or(0)
    }

    /// Whether a snapshot of that name exists. An unreadable store is an error, not "no".
    pub async fn has_snapshot(&self, vm: &VmName, snap: &SnapshotName) -> Result<bool> {
        let path = self.manifest_path(vm, snap);
        blocking(move || exists(&path)).await
    }

    /// One snapshot's manifest; [`Error::UnknownSnapshot`] when there is none.
    pub async fn manifest(&self, vm: &VmName, snap: &SnapshotName) -> Result<Manifest> {
        let path = self.manifest_path(vm, snap);
        let p = path.clone();
        let mut m: Manifest =
            blocking(move || read_json(&p))
                .await?
                .ok_or_else(|| Error::UnknownSnapshot {
                    vm: vm.to_string(),
                    snapshot: snap.to_string(),
                })?;
        plain_manifest(&mut m);
        check_manifest(&m, vm, &path)?;
        if m.name != snap.as_str() {
            return Err(Error::CorruptStore {
                path,
                why: format!("it names the snapshot \"{}\"", m.name.escape_debug()),
            });
        }
        Ok(m)
    }

    /// All of a VM's manifests, oldest first.
    pub async fn manifests(&self, vm: &VmName) -> Result<Vec<Manifest>> {
        let (dir, owner) = (self.snapshots_dir(vm), vm.clone());
        blocking(move || read_manifests(&dir, &owner)).await
    }

    /// The journal of an unfinished operation on the VM, if there is one. Checked like a
    /// manifest: a recovery acts on the paths it names (removes files it made), so a journal
    /// naming a path that is not absolute and plain, a memory file that is not the store's
    /// own for that snapshot, or a manifest that does not check, is refused as corrupt.
    pub async fn journal(&self, vm: &VmName) -> Result<Option<Journal>> {
        let path = self.journal_path(vm);
        let p = path.clone();
        let mut j: Option<Journal> = blocking(move || read_json(&p)).await?;
        if let Some(j) = &mut j {
            plain_journal(j);
            check_schema(j.schema, &path)?;
            self.check_journal(j, vm, &path)?;
        }
        Ok(j)
    }

    /// Writes (replaces) the VM's journal. Hold the VM's lock.
    pub(crate) async fn write_journal(&self, vm: &VmName, intent: &Intent) -> Result<()> {
        self.ensure_dir(self.vm_dir(vm)).await?;
        let path = self.journal_path(vm);
        let mut j = Journal {
            schema: SCHEMA,
            pid: std::process::id(),
            started_at: now_rfc3339(),
            intent: intent.clone(),
        };
        // Never write what the reader would refuse (the next command could not settle it).
        plain_journal(&mut j);
        self.check_journal(&j, vm, &path)?;
        blocking(move || write_json(&path, &j, false)).await
    }

    /// Removes the VM's journal: the operation is over. Hold the VM's lock.
    pub(crate) async fn clear_journal(&self, vm: &VmName) -> Result<()> {
        let path = self.journal_path(vm);
        blocking(move || remove_durably(&path)).await
    }
}

impl Store {
    /// The VM's manifests whose only fault is a relative disk path (an older qsnap recorded a
    /// relative `--overlay-dir` as given), each with its file: what `check` reports and
    /// `check --repair` resolves. Every other check of [`Store::manifests`] still applies —
    /// a manifest wrong in any other way is an error here too.
    pub(crate) async fn manifests_with_relative_paths(
        &self,
        vm: &VmName,
    ) -> Result<Vec<(PathBuf, Manifest)>> {
        let dir = self.snapshots_dir(vm);
        let owner = vm.clone();
        blocking(move || {
            let mut out = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(io("listing snapshots", &dir)(e)),
            };
            for e in entries {
                let path = e.map_err(io("listing snapshots", &dir))?.path();
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if !path.extension().is_some_and(|x| x == "json")
                    || SnapshotName::parse(stem).is_none()
                {
                    continue;
                }
                let Some(mut m) = read_json::<Manifest>(&path)? else {
                    continue;
                };
                plain_manifest(&mut m);
                let relative = m
                    .snapshot
                    .disks
                    .iter()
                    .any(|d| d.image.is_relative() || d.overlay.is_relative());
                if !relative {
                    continue;
                }
                // Strict about everything else: the same checks, on a copy whose relative
                // paths are made absolute only to pass the path rule.
                let mut probe = m.clone();
                for d in &mut probe.snapshot.disks {
                    d.image = plain_path(&Path::new("/").join(&d.image));
                    d.overlay = plain_path(&Path::new("/").join(&d.overlay));
                }
                check_manifest(&probe, &owner, &path)?;
                if m.name != stem {
                    return Err(Error::CorruptStore {
                        path,
                        why: format!("it names the snapshot \"{}\"", m.name.escape_debug()),
                    });
                }
                out.push((path, m));
            }
            Ok(out)
        })
        .await
    }
}

/// Now, as RFC 3339 UTC with milliseconds (sortable as text).
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A VM's record at `path` (`None`: there is none), checked to be a record of `vm`.
fn read_record(path: &Path, vm: &VmName) -> Result<Option<VmRecord>> {
    let Some(mut rec) = read_json::<VmRecord>(path)? else {
        return Ok(None);
    };
    check_schema(rec.schema, path)?;
    plain_record(&mut rec);
    if rec.name != vm.as_str() {
        return Err(Error::CorruptStore {
            path: path.to_owned(),
            why: format!("it names the VM \"{}\"", rec.name.escape_debug()),
        });
    }
    Ok(Some(rec))
}

/// The manifests in `dir` (VM `owner`'s snapshots), each checked, oldest first.
fn read_manifests(dir: &Path, owner: &VmName) -> Result<Vec<Manifest>> {
    let mut out: Vec<Manifest> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("listing snapshots", dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io("listing snapshots", dir))?;
        let path = e.path();
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if SnapshotName::parse(stem).is_none() {
            continue; // temp files and strays
        }
        if let Some(mut m) = read_json::<Manifest>(&path)? {
            plain_manifest(&mut m);
            check_manifest(&m, owner, &path)?;
            if m.name != stem {
                return Err(Error::CorruptStore {
                    path,
                    why: format!("it names the snapshot \"{}\"", m.name.escape_debug()),
                });
            }
            out.push(m);
        }
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one trip reads for many VMs is what `record` and `manifests` read for each, in
    /// the order asked; a VM with no record is `UnknownVm`, as from `record`.
    #[tokio::test]
    async fn records_and_manifests_read_what_record_and_manifests_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let write = |path: PathBuf, v: serde_json::Value| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
        };
        let names: Vec<VmName> = ["b", "a"].iter().map(|n| VmName::new(n).unwrap()).collect();
        for vm in &names {
            write(
                store.record_path(vm),
                serde_json::json!({
                    "schema": 1, "name": vm.as_str(), "qmp": format!("/run/{vm}.sock"),
                    "origin": "run", "pid": 4242, "pid-start": 1,
                    "command": {"argv": ["qemu-system-x86_64"], "cwd": "/"},
                    "current": null,
                    "disks": [{"device": "d0", "image": format!("/i/{vm}.s2.qcow2"),
                               "launch-image": format!("/i/{vm}.qcow2"), "owned": true}],
                    "owned-images": [format!("/i/{vm}.s1.qcow2"), format!("/i/{vm}.s2.qcow2")],
                    "registered-at": "2025-01-02T03:04:05.678Z"
                }),
            );
            // Written newest first: read back oldest first.
            for (snap, at) in [
                ("s2", "2025-01-03T00:00:00.000Z"),
                ("s1", "2025-01-02T00:00:00.000Z"),
            ] {
                write(
                    store.snapshots_dir(vm).join(format!("{snap}.json")),
                    serde_json::json!({
                        "schema": 1, "vm": vm.as_str(), "name": snap, "parent": null,
                        "created-at": at, "qemu-version": "10.0.2", "machine": "pc",
                        "mode": "point-in-time", "was-running": true, "memory": null,
                        "disks": [{"device": "d0", "node": "#block1", "image": format!("/i/{vm}.qcow2"),
                                   "format": "qcow2", "size": 1, "overlay": format!("/i/{vm}.{snap}.qcow2"),
                                   "overlay-node": "qsnap-x"}],
                        "skipped": [], "pause-ms": 1.0, "total-ms": 2.0
                    }),
                );
            }
        }
        let read = store.records_and_manifests(names.clone()).await.unwrap();
        assert_eq!(read.len(), 2);
        for ((vm, rec, manifests), want) in read.iter().zip(&names) {
            assert_eq!(vm, want);
            assert_eq!(rec, &store.record(vm).await.unwrap());
            assert_eq!(manifests, &store.manifests(vm).await.unwrap());
            let order: Vec<&str> = manifests.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(order, ["s1", "s2"]);
        }
        let gone = VmName::new("gone").unwrap();
        let err = store
            .records_and_manifests(vec![names[0].clone(), gone])
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::UnknownVm { ref vm, .. } if vm == "gone"),
            "{err}"
        );
    }

    #[test]
    fn paths_are_made_plain_lexically() {
        for (given, plain) in [
            ("/vm/../disk.qcow2", "/disk.qcow2"),
            ("/a/./b/../c", "/a/c"),
            ("/../x", "/x"),
            ("ovl/../x", "x"),
            ("../ovl/x", "../ovl/x"),
            ("/a/b", "/a/b"),
        ] {
            assert_eq!(
                plain_path(Path::new(given)),
                PathBuf::from(plain),
                "{given}"
            );
            assert!(!given.starts_with('/') || plain_absolute(&plain_path(Path::new(given))));
        }
    }
}
