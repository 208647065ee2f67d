//! A fork: one running copy of the golden snapshot for one test — its own overlays, monitor,
//! console and directory — killed and removed when dropped, also while the test panics, with
//! any VM a test cloned from it (which stands on its files) removed first.
//!
//! What it must never do: remove anything but its own VM directory and those of VMs cloned
//! from it, or kill any process but the QEMUs their records name (`watchdog.rs`).

use crate::error::Result;
use crate::pool::Refiller;
use crate::watchdog::{kill_qemus_of, launcher};
use qsnap_engine::{CloneOptions, CloneReport, SnapshotName, Vm};
use qsnap_qmp::Qmp;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One running copy of the golden snapshot, for one test.
#[derive(Debug)]
pub struct Fork {
    vm: Vm,
    source: Vm,
    snapshot: SnapshotName,
    report: CloneReport,
    console: Option<PathBuf>,
    dir: PathBuf,
    /// The golden's pool, when it has one: a reset takes a standby, and pokes its refill.
    pool: Option<Arc<Refiller>>,
}

impl Fork {
    /// The fork `vm`, cloned from `snapshot` of `source` (`report`); its console file, if the
    /// harness captures the console.
    pub(crate) fn new(
        vm: Vm,
        source: Vm,
        snapshot: SnapshotName,
        console: Option<PathBuf>,
        report: CloneReport,
        pool: Option<Arc<Refiller>>,
    ) -> Fork {
        Fork {
            dir: vm.store().vm_dir(vm.name()),
            vm,
            source,
            snapshot,
            report,
            console,
            pool,
        }
    }

    /// The clone as a qsnap VM (snapshot it, revert it, …).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// A connection to its monitor (drop it soon: QEMU serves one client at a time).
    pub async fn qmp(&self) -> Result<Qmp> {
        Ok(self.vm.connect().await?)
    }

    /// Its console file, if the harness captures the console.
    pub fn console(&self) -> Option<&Path> {
        self.console.as_deref()
    }

    /// Its console so far.
    pub fn console_text(&self) -> String {
        self.console
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Its disks' top images (its own overlays).
    pub fn disks(&self) -> Vec<PathBuf> {
        self.report
            .disks
            .iter()
            .map(|d| d.overlay.clone())
            .collect()
    }

    /// What the clone did.
    pub fn report(&self) -> &CloneReport {
        &self.report
    }

    /// Back to the golden snapshot, in place: the same name, paths and console file (which
    /// starts empty again), a new QEMU — a standby of the golden's pool, when it has one.
    pub async fn reset(&mut self) -> Result<()> {
        self.vm.remove().await?;
        // The note of the QEMU `remove` stopped: the next one's (a standby's, moved in with
        // it) takes its place.
        let _ = std::fs::remove_file(self.dir.join(crate::watchdog::SPAWNED));
        let report = self
            .source
            .clone_with(
                &self.snapshot,
                self.vm.name(),
                &CloneOptions::default(),
                &launcher(),
            )
            .await?;
        if let Some(p) = &self.pool {
            p.poke();
        }
        // Same name, same paths: the console file is where it was.
        self.report = report;
        self.vm = self.source.engine().vm(self.vm.name()).await?;
        Ok(())
    }
}

impl Drop for Fork {
    fn drop(&mut self) {
        // VMs cloned from this fork (a test that failed before removing them) stand on its
        // files: they go first, so that nothing in the store is left on a missing image.
        let mut doomed = vec![self.dir.clone()];
        let mut i = 0;
        while i < doomed.len() {
            if let Some(name) = doomed[i]
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
            {
                doomed.extend(clones_of(&self.dir.with_file_name(""), &name));
            }
            i += 1;
        }
        for dir in doomed.iter().rev() {
            // Its QEMU, as its record names it (pid and start time).
            kill_qemus_of(dir);
            // A fork made from a standby has its overlays in the standby's directory.
            if let Some(home) = standby_home(dir) {
                let _ = std::fs::remove_dir_all(home);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Where the overlays of the VM of directory `dir` are when it was made from a standby:
/// `<store>/standbys/<standby>/`, the name as the engine makes them (`sb-…`, no path in it).
fn standby_home(dir: &Path) -> Option<PathBuf> {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).ok()?).ok()?;
    let name = record["clone-of"]["standby"].as_str()?;
    let plain = name.starts_with("sb-")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let store = dir.parent()?.parent()?;
    plain.then(|| store.join("standbys").join(name))
}

/// The directories of the VMs in `vms` whose record says they are clones of VM `name`.
fn clones_of(vms: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(vms) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|d| {
            std::fs::read(d.join("vm.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                .is_some_and(|r| r["clone-of"]["vm"] == name)
        })
        .collect()
}
