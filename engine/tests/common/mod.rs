//! Shared by the tests that relaunch QEMU: a launcher that gives every QEMU its own console
//! file, so a test can tell the reverted guest's first tick from the last ticks of the QEMU it
//! replaced (both would otherwise append to one file, in a racy order); and [`Guest`], a test
//! guest under qsnap with snapshot and revert helpers that check what the guest sees.
#![allow(dead_code)] // each test binary uses part of this

use qsnap_engine::launch::{LaunchSpec, Launched, Launcher, ProcessLauncher};
use qsnap_engine::{Engine, RevertOptions, RunOptions, SnapshotName, Store, Vm, VmName};
use qsnap_harness::{Fork, Golden};

/// The golden snapshot of the test guest, the one the harness's own tests share (one cached
/// boot serves both crates).
#[path = "../../../harness/tests/common/mod.rs"]
mod shared;
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{create_image, DiskStyle, KillRecordedQemu, VmBuilder};
pub use shared::golden;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub fn n(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

pub fn v(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

/// Rewrites the console path (`-chardev file,id=qsnapser,path=…`) to `serial-N.log`, N
/// counting launches, and follows the newest file.
pub struct PerLaunchSerial {
    dir: PathBuf,
    launches: AtomicUsize,
    current: Mutex<Option<SerialLog>>,
}

impl PerLaunchSerial {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PerLaunchSerial {
            dir: dir.into(),
            launches: AtomicUsize::new(0),
            current: Mutex::new(None),
        }
    }

    /// Follows `path` as the current console (a QEMU started by someone else).
    pub fn follow(&self, path: &std::path::Path) {
        *self.current.lock().unwrap() = Some(SerialLog::follow(path));
    }

    /// The console of the QEMU launched last.
    pub fn serial(&self) -> SerialLog {
        self.current
            .lock()
            .unwrap()
            .clone()
            .expect("nothing launched yet")
    }

    /// Its file.
    pub fn path(&self) -> PathBuf {
        let n = self.launches.load(Ordering::SeqCst);
        self.dir.join(format!("serial-{n}.log"))
    }
}

impl Launcher for PerLaunchSerial {
    async fn launch(&self, spec: &LaunchSpec) -> qsnap_engine::Result<Launched> {
        let n = self.launches.fetch_add(1, Ordering::SeqCst) + 1;
        let path = self.dir.join(format!("serial-{n}.log"));
        let mut spec = spec.clone();
        for a in &mut spec.command.argv {
            if a.starts_with("file,id=qsnapser,") {
                *a = format!("file,id=qsnapser,path={},append=on", path.display());
            }
        }
        *self.current.lock().unwrap() = Some(SerialLog::follow(&path));
        ProcessLauncher::default().launch(&spec).await
    }
}

/// A VM under qsnap whose console the test follows (each QEMU writes its own file).
pub struct Guest {
    pub vm: Vm,
    pub engine: Engine,
    pub launcher: PerLaunchSerial,
    /// The image the VM wrote to when the test began (its overlays go next to it).
    pub base: PathBuf,
    _kill: Option<KillRecordedQemu>,
    /// A fork of the shared golden snapshot ([`Guest::fork`]): killed and removed first…
    _fork: Option<Fork>,
    /// …then its golden (which kills its forks when dropped).
    _golden: Option<Golden>,
    _dir: tempfile::TempDir,
    /// The test's own directory (consoles of relaunched QEMUs; the store for `start`).
    pub dir: PathBuf,
}

impl Guest {
    pub async fn start(builder: VmBuilder, disk_fmt: &str) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join(format!("disk.{disk_fmt}"));
        create_image(&disk, disk_fmt, "64M").await;
        Self::start_in(dir, builder.disk(&disk, disk_fmt, DiskStyle::Blockdev)).await
    }

    /// Starts `builder` (its disks already added, in `dir`) under qsnap as VM `g`.
    pub async fn start_in(dir: tempfile::TempDir, builder: VmBuilder) -> Guest {
        let path = dir.path().to_owned();
        let serial_path = path.join("serial.log");
        let argv = builder.command_line(&serial_path).await;
        let engine = Engine::new(Store::new(path.join("store")));
        let launcher = PerLaunchSerial::new(&path);
        let kill = KillRecordedQemu::new(&path.join("store"), "g");
        let report = engine
            .run_with(&v("g"), argv, &RunOptions::default(), &launcher)
            .await
            .unwrap();
        assert!(report.tsc_pinned.is_none());
        let vm = engine.vm(&v("g")).await.unwrap();
        Guest {
            base: vm.record().disks[0].image.clone(),
            vm,
            engine,
            launcher,
            _kill: Some(kill),
            _fork: None,
            _golden: None,
            _dir: dir,
            dir: path,
        }
    }

    /// A running test guest without a boot of its own: a fork of the shared golden snapshot
    /// (256 MiB, idle, one qcow2 disk `vd0`), a full VM in the golden's store.
    pub async fn fork() -> Guest {
        let golden = golden().await;
        let fork = golden.fork().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let launcher = PerLaunchSerial::new(dir.path());
        launcher.follow(fork.console().unwrap());
        let vm = fork.vm().clone();
        Guest {
            base: fork.disks()[0].clone(),
            engine: vm.engine().clone(),
            vm,
            launcher,
            _kill: None,
            _fork: Some(fork),
            _golden: Some(golden),
            dir: dir.path().to_owned(),
            _dir: dir,
        }
    }

    /// Where its overlays go.
    pub fn disk_dir(&self) -> PathBuf {
        self.base.parent().unwrap().to_owned()
    }

    /// The console of the current QEMU.
    pub fn serial(&self) -> SerialLog {
        self.launcher.serial()
    }

    pub fn report(&self) -> String {
        let log = std::fs::read_to_string(self.vm.store().vm_dir(self.vm.name()).join("qemu.log"))
            .unwrap_or_default();
        format!(
            "--- qemu.log:\n{log}\n--- serial ({}):\n{}",
            self.launcher.path().display(),
            self.serial().tail(20)
        )
    }

    pub fn last_tick(&self) -> u64 {
        self.serial().ticks().last().copied().unwrap_or(0)
    }

    /// Waits for a tick above `n` printed after line `from`; returns the line index after it.
    pub async fn tick_above(&self, from: usize, n: u64) -> usize {
        match self
            .serial()
            .wait_from(from, Duration::from_secs(90), |l| {
                parse_tick(l).filter(|&t| t > n)
            })
            .await
        {
            Ok((i, _)) => i,
            Err(e) => panic!("no tick above {n}: {e}\n{}", self.report()),
        }
    }

    /// Takes snapshot `name` (default options); panics with the report if it fails.
    pub async fn take(&self, name: &str) -> qsnap_engine::Manifest {
        self.vm
            .create_snapshot(self.vm.create_options(n(name)))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", self.report()))
    }

    /// Whether the VM's QEMU is at least `major.minor`.
    pub async fn qemu_at_least(&self, major: u32, minor: u32) -> bool {
        let qmp = self.vm.connect().await.unwrap();
        qmp.greeting().version.qemu.at_least(major, minor)
    }

    /// Snapshot; returns the tick range it was taken in.
    pub async fn snapshot(&self, name: &str) -> (u64, u64) {
        self.snapshot_with(name, |_| {}).await
    }

    /// Snapshot with options changed by `set`; returns the tick range it was taken in.
    pub async fn snapshot_with(
        &self,
        name: &str,
        set: impl FnOnce(&mut qsnap_engine::snapshot::CreateOptions),
    ) -> (u64, u64) {
        let before = self.last_tick();
        let mut opts = self.vm.create_options(n(name));
        set(&mut opts);
        self.vm
            .create_snapshot(opts)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", self.report()));
        let after = self
            .serial()
            .wait_new_tick(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("no tick after {name}: {e}\n{}", self.report()));
        (before, after)
    }

    /// Reverts to `name`; returns the report and the reverted guest's first tick, after
    /// checking it lies in the snapshot's range `(before, after)` and that memory and disk
    /// agree for a few ticks.
    pub async fn revert_first_tick(
        &self,
        name: &str,
        (before, after): (u64, u64),
    ) -> (qsnap_engine::RevertReport, u64) {
        let r = self
            .vm
            .revert_with(&n(name), &RevertOptions::default(), &self.launcher)
            .await
            .unwrap_or_else(|e| panic!("revert {name}: {e}\n{}", self.report()));
        eprintln!(
            "revert {name}: {:.0} ms total, load {:.0} ms",
            r.total_ms, r.load_ms
        );
        assert!(r.memory_restored && r.resumed);
        // A new QEMU, a new console file: its first tick is the reverted guest's first.
        let (idx, first) = self
            .serial()
            .wait_from(0, Duration::from_secs(60), parse_tick)
            .await
            .unwrap_or_else(|e| panic!("no tick after revert: {e}\n{}", self.report()));
        assert!(
            first > before && first <= after + 1,
            "reverted to {name} ({}) but resumed at tick {first}; it was taken between {before} and {after}\n{}",
            r.ram,
            self.report()
        );
        // A few more ticks, with memory (counter) and disk (sector 0) agreeing.
        self.tick_above(idx, first + 2).await;
        assert!(self.serial().mismatches().is_empty(), "{}", self.report());
        (r, first)
    }

    /// Revert, then check the guest resumes inside `range` with memory and disk agreeing.
    pub async fn revert_and_check(&self, name: &str, range: (u64, u64)) {
        self.revert_first_tick(name, range).await;
        let st = self.vm.status().await.unwrap();
        assert!(st.running);
        assert_eq!(st.current.as_deref(), Some(name));
    }
}
