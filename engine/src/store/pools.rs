//! Where pools of standbys live in the store: each pool's record
//! (`<store>/pools/<vm>/<snapshot>.json`, the size the user asked for) and its lock, and
//! each standby's overlays (`<store>/standbys/<standby>/`), which stay where the standby's
//! QEMU opened them when a clone claims it (QEMU names its images by the path it opened).
//!
//! What it must never do: decide whether a standby may be discarded; `vm/pool/` does, under
//! the standby's lock.

use super::*;

/// The name prefix of the file a fill keeps in the source's directory while it makes
/// standbys (its pid in it): the lock's note may name another sharer, or one gone.
const MAKING: &str = ".making-standby.";

/// Notes, for as long as it lives, that this process makes standbys of `vm`'s snapshot `snap`.
pub(crate) struct MakingStandbys(PathBuf);

impl Drop for MakingStandbys {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How long a pool's fill waits for the one before it.
const POOL_LOCK_WAIT: Duration = Duration::from_secs(600);

impl Store {
    /// The directory of a standby's overlays (and, once claimed, of its clone's).
    pub fn standby_dir(&self, standby: &str) -> PathBuf {
        self.root.join("standbys").join(standby)
    }

    pub(crate) fn pool_path(&self, vm: &VmName, snap: &SnapshotName) -> PathBuf {
        self.root
            .join("pools")
            .join(vm.as_str())
            .join(format!("{snap}.json"))
    }

    /// The pool of `snap` of `vm`, if one was asked for.
    pub async fn pool(&self, vm: &VmName, snap: &SnapshotName) -> Result<Option<PoolRecord>> {
        let path = self.pool_path(vm, snap);
        let p = path.clone();
        let rec: Option<PoolRecord> = blocking(move || read_json(&p)).await?;
        if let Some(r) = &rec {
            check_schema(r.schema, &path)?;
            if r.vm != vm.as_str() || r.snapshot != snap.as_str() {
                return Err(Error::CorruptStore {
                    path,
                    why: "it names another VM or snapshot".into(),
                });
            }
        }
        Ok(rec)
    }

    /// Every pool of `vm`'s snapshots, by snapshot name.
    pub async fn pools(&self, vm: &VmName) -> Result<Vec<PoolRecord>> {
        let dir = self.root.join("pools").join(vm.as_str());
        let names = blocking(move || {
            let mut names = Vec::new();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
                Err(e) => return Err(io("listing pools", &dir)(e)),
            };
            for e in entries.flatten() {
                let n = e.file_name();
                if let Some(s) = n
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .and_then(SnapshotName::parse)
                {
                    names.push(s);
                }
            }
            names.sort();
            Ok(names)
        })
        .await?;
        let mut out = Vec::new();
        for s in names {
            if let Some(p) = self.pool(vm, &s).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Records (replaces) a pool. Hold its lock ([`Store::lock_pool`]).
    pub(crate) async fn write_pool(&self, rec: &PoolRecord) -> Result<()> {
        let (vm, snap) = (VmName::new(&rec.vm)?, SnapshotName::new(&rec.snapshot)?);
        let path = self.pool_path(&vm, &snap);
        let rec = rec.clone();
        blocking(move || {
            create_dir_durably(path.parent().unwrap_or(Path::new(".")), 0o700)?;
            write_json(&path, &rec, false)
        })
        .await
    }

    /// Removes a pool's record (its standbys are discarded by the caller). Hold its lock.
    pub(crate) async fn remove_pool(&self, vm: &VmName, snap: &SnapshotName) -> Result<()> {
        let path = self.pool_path(vm, snap);
        blocking(move || {
            remove_durably(&path)?;
            // The VM's pools directory goes with its last pool.
            let _ = std::fs::remove_dir(path.parent().unwrap_or(Path::new(".")));
            Ok(())
        })
        .await
    }

    /// Takes a pool's lock if no one holds it (`None`: a fill is under way).
    pub(crate) async fn try_lock_pool(
        &self,
        vm: &VmName,
        snap: &SnapshotName,
    ) -> Result<Option<VmLock>> {
        let dir = self.root.join("pools").join(vm.as_str());
        let path = dir.join(format!("{snap}.lock"));
        let what = format!("{vm} {snap}");
        match blocking(move || {
            create_dir_durably(&dir, 0o700)?;
            VmLock::acquire(&path, &what, "fill the pool")
        })
        .await
        {
            Ok(l) => Ok(Some(l)),
            Err(Error::Locked { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Leaves (`set`) or takes (`!set`: whether it was there) the word that a fill under way
    /// should go round once more: standbys were taken meanwhile.
    pub(crate) async fn pool_again(
        &self,
        vm: &VmName,
        snap: &SnapshotName,
        set: bool,
    ) -> Result<bool> {
        let path = self
            .root
            .join("pools")
            .join(vm.as_str())
            .join(format!("{snap}.again"));
        blocking(move || {
            if set {
                std::fs::write(&path, b"").map_err(io("asking for another round", &path))?;
                return Ok(true);
            }
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io("taking the word for another round", &path)(e)),
            }
        })
        .await
    }

    /// Takes a pool's lock: one filling (or resizing) at a time, waiting for the one before
    /// (a fill makes standbys one by one: a few seconds each), at most [`POOL_LOCK_WAIT`].
    pub(crate) async fn lock_pool(&self, vm: &VmName, snap: &SnapshotName) -> Result<VmLock> {
        let dir = self.root.join("pools").join(vm.as_str());
        let path = dir.join(format!("{snap}.lock"));
        let what = format!("{vm} {snap}");
        let deadline = tokio::time::Instant::now() + POOL_LOCK_WAIT;
        loop {
            let (d, p, w) = (dir.clone(), path.clone(), what.clone());
            let taken = blocking(move || {
                create_dir_durably(&d, 0o700)?;
                VmLock::acquire(&p, &w, "fill the pool")
            })
            .await;
            match taken {
                Err(Error::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                // The directory went with the last pool between making it and opening the lock.
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => return other,
            }
        }
    }
}

impl Store {
    /// Forgets a standby a clone has claimed: its record first, then its journal (the
    /// claim's: while it is there, a record without it would look like a standby whose
    /// claim never began), then what is left of its directory. Hold its lock.
    pub(crate) async fn release_standby(&self, sb: &VmName) -> Result<()> {
        let dir = self.vm_dir(sb);
        blocking(move || {
            remove_durably(&dir.join("vm.json"))?;
            Ok(())
        })
        .await?;
        // A cut here leaves the journal alone in the directory: see
        // [`Store::released_standbys`].
        crate::failpoint::hit("claim.record-released", None).await?;
        let dir = self.vm_dir(sb);
        blocking(move || {
            remove_durably(&dir.join("journal.json"))?;
            for d in ["snapshots", "memory"] {
                let _ = std::fs::remove_dir(dir.join(d));
            }
            Ok(())
        })
        .await?;
        self.remove_vm_dir(sb, false).await.map(drop)
    }
}

impl Store {
    /// The VM directories named with `prefix` that hold a journal but no record: standbys a
    /// release cut short ([`Store::release_standby`] removes the record, then the journal).
    /// No listing of VMs shows them; the claim they journal had committed.
    pub(crate) async fn released_standbys(&self, prefix: &str) -> Result<Vec<VmName>> {
        let prefix = prefix.to_owned();
        self.vm_dirs(move |name, dir| {
            Ok(name.as_str().starts_with(&prefix)
                && !exists(&dir.join("vm.json"))?
                && exists(&dir.join("journal.json"))?)
        })
        .await
    }

    /// Notes that this process makes standbys of `snap` of `vm` until the guard drops: a
    /// lock the refill holds is waited for ([`Store::standby_being_made`]).
    pub(crate) async fn making_standbys(
        &self,
        vm: &VmName,
        snap: &SnapshotName,
    ) -> Result<MakingStandbys> {
        let path = self.vm_dir(vm).join(format!("{MAKING}{snap}"));
        let p = path.clone();
        blocking(move || {
            std::fs::write(&p, std::process::id().to_string())
                .map_err(io("noting a standby being made", &p))
        })
        .await?;
        Ok(MakingStandbys(path))
    }

    /// Whether a live process notes that it makes standbys of one of `vm`'s snapshots.
    pub(crate) async fn standby_being_made(&self, vm: &VmName) -> bool {
        let dir = self.vm_dir(vm);
        blocking(move || {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                return Ok(false);
            };
            for e in rd.flatten() {
                if !e.file_name().to_string_lossy().starts_with(MAKING) {
                    continue;
                }
                let pid = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                if let Some(pid) = pid.filter(|p| *p > 0) {
                    let gone = matches!(
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                        Err(nix::errno::Errno::ESRCH)
                    );
                    if !gone {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        })
        .await
        .unwrap_or(false)
    }
}
