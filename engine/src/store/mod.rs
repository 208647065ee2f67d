//! The store: where qsnap keeps what it knows about VMs and their snapshots.
//!
//! ```text
//! <store>/                         0700
//!   vms/<vm>/vm.json               the VM record (socket, command line, current disks)
//!   vms/<vm>/lock                  flock: one operation per VM at a time
//!   vms/<vm>/snapshots/<snap>.json one manifest per snapshot
//!   vms/<vm>/memory/<snap>.mem     guest memory (0600 in a 0700 directory)
//! ```
//! Every JSON file is written atomically (temp file, fsync, rename, fsync dir); manifests are never overwritten. This
//! module knows files, not QEMU: it never talks QMP.

mod atomic;
mod lock;
pub mod schema;

pub(crate) use atomic::blocking;
pub use lock::VmLock;
pub use schema::{CurrentDisk, LaunchCommand, Manifest, Origin, VmRecord, SCHEMA};

use crate::error::{Error, Result};
use crate::name::{Name, SnapshotName, VmName};
use atomic::{io, read_json, write_json};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// A store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// A store at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// The default location: `$XDG_STATE_HOME/qsnap`, else `~/.local/state/qsnap`, else
    /// `/var/lib/qsnap` for root (uid 0).
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

    fn record_path(&self, vm: &VmName) -> PathBuf {
        self.vm_dir(vm).join("vm.json")
    }

    fn manifest_path(&self, vm: &VmName, snap: &SnapshotName) -> PathBuf {
        self.vm_dir(vm)
            .join("snapshots")
            .join(format!("{snap}.json"))
    }

    async fn ensure_dir(&self, dir: PathBuf) -> Result<()> {
        let root = self.root.clone();
        blocking(move || {
            for d in [&root, &dir] {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .map_err(io("creating a store directory", d))?;
            }
            Ok(())
        })
        .await
    }

    /// Takes the VM's lock for `operation` (e.g. `create s1`), refusing if another operation
    /// holds it.
    pub async fn lock(&self, vm: &VmName, operation: &str) -> Result<VmLock> {
        let dir = self.vm_dir(vm);
        self.ensure_dir(dir.clone()).await?;
        let (name, op) = (vm.to_string(), operation.to_owned());
        blocking(move || VmLock::acquire(&dir.join("lock"), &name, &op)).await
    }

    /// Reads a VM's record; [`Error::UnknownVm`] when there is none.
    pub async fn record(&self, vm: &VmName) -> Result<VmRecord> {
        let path = self.record_path(vm);
        let rec: VmRecord =
            blocking(move || read_json(&path))
                .await?
                .ok_or_else(|| Error::UnknownVm {
                    vm: vm.to_string(),
                    store: self.root.clone(),
                })?;
        check_schema(rec.schema, &self.record_path(vm))?;
        Ok(rec)
    }

    /// Whether a VM record exists.
    pub async fn has_vm(&self, vm: &VmName) -> bool {
        tokio::fs::try_exists(self.record_path(vm))
            .await
            .unwrap_or(false)
    }

    /// Writes (replaces) a VM's record. Hold the VM's lock.
    pub async fn write_record(&self, rec: &VmRecord) -> Result<()> {
        let vm = Name::new(&rec.name)?;
        self.ensure_dir(self.vm_dir(&vm)).await?;
        let (path, rec) = (self.record_path(&vm), rec.clone());
        blocking(move || write_json(&path, &rec, false)).await
    }

    /// The names of all VMs in the store, sorted.
    pub async fn vms(&self) -> Result<Vec<VmName>> {
        let dir = self.root.join("vms");
        blocking(move || {
            let mut names = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                Err(e) => return Err(io("listing VMs", &dir)(e)),
            };
            for e in entries.flatten() {
                if let Some(n) = e.file_name().to_str().and_then(Name::parse) {
                    if e.path().join("vm.json").exists() {
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
    pub async fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let (vm, snap) = (Name::new(&m.vm)?, Name::new(&m.name)?);
        let path = self.manifest_path(&vm, &snap);
        self.ensure_dir(path.parent().expect("has a parent").to_owned())
            .await?;
        let m = m.clone();
        blocking(move || write_json(&path, &m, true)).await
    }

    /// Whether a snapshot of that name exists.
    pub async fn has_snapshot(&self, vm: &VmName, snap: &SnapshotName) -> bool {
        tokio::fs::try_exists(self.manifest_path(vm, snap))
            .await
            .unwrap_or(false)
    }

    /// One snapshot's manifest; [`Error::UnknownSnapshot`] when there is none.
    pub async fn manifest(&self, vm: &VmName, snap: &SnapshotName) -> Result<Manifest> {
        let path = self.manifest_path(vm, snap);
        let p = path.clone();
        let m: Manifest =
            blocking(move || read_json(&p))
                .await?
                .ok_or_else(|| Error::UnknownSnapshot {
                    vm: vm.to_string(),
                    snapshot: snap.to_string(),
                })?;
        check_schema(m.schema, &path)?;
        Ok(m)
    }

    /// All of a VM's manifests, oldest first.
    pub async fn manifests(&self, vm: &VmName) -> Result<Vec<Manifest>> {
        let dir = self.vm_dir(vm).join("snapshots");
        let mut all: Vec<Manifest> = blocking(move || {
            let mut out = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(io("listing snapshots", &dir)(e)),
            };
            for e in entries.flatten() {
                let path = e.path();
                let name = e.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                if Name::parse(stem).is_none() {
                    continue; // temp files and strays
                }
                if let Some(m) = read_json::<Manifest>(&path)? {
                    check_schema(m.schema, &path)?;
                    out.push(m);
                }
            }
            Ok(out)
        })
        .await?;
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        Ok(all)
    }
}

fn check_schema(found: u32, path: &Path) -> Result<()> {
    if found == SCHEMA {
        Ok(())
    } else {
        Err(Error::CorruptStore {
            path: path.to_owned(),
            why: format!(
                "schema {found}, this qsnap reads schema {SCHEMA} (a newer qsnap wrote it?)"
            ),
        })
    }
}

/// Now, as RFC 3339 UTC with milliseconds (sortable as text).
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
