//! The golden VM: boot a guest from its command line (disks made first, console captured in a
//! file), wait until it is ready, snapshot it, and start forks of that snapshot. Kept in a
//! private temporary store, or in a cache directory that later processes reuse (`cache.rs`
//! keys and locks it).
//!
//! What it must never do: write outside its own directory (the temporary store, or its entry
//! in the cache directory), or kill a QEMU other than those its store records (`watchdog.rs`).

use crate::cache;
use crate::error::{Error, Result};
use crate::fork::Fork;
use crate::pool::Refiller;
use crate::ready::{wait_ready, Ready};
use crate::watchdog::{kill_qemus, launcher, watchdog, Remove, Vms};
use qsnap_engine::launch::argv::serial_file;
use qsnap_engine::{
    create_blank_image, CloneOptions, CloneReport, Engine, Error as EngineError, PoolReport,
    RevertOptions, RevertReport, RunOptions, SnapshotName, Store, Vm, VmName,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the golden VM is booted; [`GoldenBuilder::snapshot`] does it.
#[derive(Debug)]
pub struct GoldenBuilder {
    argv: Vec<String>,
    ready: Option<Ready>,
    timeout: Duration,
    disks: Vec<(String, u64)>,
    cache: Option<PathBuf>,
    lazy: bool,
}

/// A booted guest and its snapshot, from which [`Golden::fork`] starts running copies.
#[derive(Debug)]
pub struct Golden {
    engine: Engine,
    vm: Vm,
    snapshot: SnapshotName,
    console: Option<PathBuf>,
    /// How the console shows in a clone's moved paths (`-chardev ID` or `-serial`).
    console_option: Option<String>,
    next: AtomicUsize,
    /// This golden's number in this process (several may share a cached store).
    id: usize,
    /// A cached golden this process started again ([`Golden::reset`]).
    started: AtomicBool,
    /// Its pool of standbys, once [`Golden::pool`] made one.
    pool: std::sync::Mutex<Option<Arc<Refiller>>>,
    // Last: removed after everything above is done with it.
    root: Root,
}

/// The golden VM's name in its store.
const GOLDEN: &str = "golden";

/// The id of the console chardev the harness adds to a command line that has no `-serial`.
const CONSOLE_ID: &str = "qsnapcon";

/// Goldens made by this process so far (each names its forks by its number).
static GOLDENS: AtomicUsize = AtomicUsize::new(0);

/// The directory of the VMs of the store in a golden's directory `root`.
fn vms_of(root: &Path) -> PathBuf {
    root.join("store").join("vms")
}

impl Golden {
    /// A golden VM from QEMU's command line (binary first). Its console is captured in a file
    /// unless the command line sends it somewhere itself (`-serial`).
    pub fn boot<I, S>(argv: I) -> GoldenBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        GoldenBuilder {
            argv: argv.into_iter().map(Into::into).collect(),
            ready: None,
            timeout: Duration::from_secs(120),
            disks: Vec::new(),
            cache: None,
            lazy: true,
        }
    }

    /// A running copy of the snapshot: its own overlays, monitor, console and files. With a
    /// pool ([`Golden::pool`]) it is a standby claimed (`report().standby` names it), and the
    /// pool refills in the background.
    pub async fn fork(&self) -> Result<Fork> {
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let name = VmName::new(&format!("{}{n}", self.fork_prefix()))?;
        let report = self
            .vm
            .clone_with(&self.snapshot, &name, &CloneOptions::default(), &launcher())
            .await?;
        let pool = self.refiller();
        if let Some(p) = &pool {
            p.poke();
        }
        let vm = self.engine.vm(&name).await?;
        Ok(Fork::new(
            vm,
            self.vm.clone(),
            self.snapshot.clone(),
            self.console_of(&report),
            report,
            pool,
        ))
    }

    /// Keeps `n` standbys of the golden snapshot ready (0: none): clones made ahead of time,
    /// their QEMU started and memory loaded (or mapped), paused before their guest runs. A
    /// [`Golden::fork`] (and a [`Fork::reset`]) then only claims one, and the pool refills in
    /// the background. Returns once `n` are ready. Standbys are VMs of the golden's private
    /// store, killed with the golden; a golden kept in a cache (`cache_in`) has no pool
    /// ([`crate::Error::PoolInSharedCache`]).
    pub async fn pool(&self, n: usize) -> Result<PoolReport> {
        if let Root::Cached(_) = &self.root {
            return Err(crate::Error::PoolInSharedCache);
        }
        let report = self.vm.pool_with(&self.snapshot, n, &launcher()).await?;
        let mut slot = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        match (n, slot.as_ref()) {
            (0, Some(old)) => {
                old.abort();
                *slot = None;
            }
            (0, None) | (_, Some(_)) => {}
            (_, None) => *slot = Some(Refiller::new(self.vm.clone(), self.snapshot.clone())),
        }
        Ok(report)
    }

    fn refiller(&self) -> Option<Arc<Refiller>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The golden VM itself (for serial reuse: run a test on it, then [`Golden::reset`]).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Reverts the golden VM to its snapshot, in place.
    /// A cached golden (stopped once built) runs again after this, until this golden is
    /// dropped or the process exits.
    pub async fn reset(&self) -> Result<RevertReport> {
        if let Root::Cached(_) = &self.root {
            if !self.started.swap(true, Ordering::SeqCst) {
                watchdog(&self.vms(), Vms::Named(GOLDEN), Remove::Nothing);
            }
        }
        let opts = RevertOptions::default();
        Ok(self
            .vm
            .revert_with(&self.snapshot, &opts, &launcher())
            .await?)
    }

    /// The golden VM's console file, if the harness captures it.
    pub fn console(&self) -> Option<&Path> {
        self.console.as_deref()
    }

    /// The golden's directory (its store, disks and console).
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// The directory of the VMs of its store (the golden and its forks).
    fn vms(&self) -> PathBuf {
        vms_of(self.root.path())
    }

    /// This golden's forks are named `f<pid>g<id>-<n>`: processes (and goldens of one
    /// process) sharing a cached store never pick the same name, and each cleans up only its
    /// own.
    fn fork_prefix(&self) -> String {
        format!("f{}g{}-", std::process::id(), self.id)
    }

    /// A clone's console: where the golden's console file went.
    fn console_of(&self, report: &CloneReport) -> Option<PathBuf> {
        let option = self.console_option.as_deref()?;
        report
            .moved
            .iter()
            .find(|m| m.option == option)
            .map(|m| m.to.clone())
    }

    /// The golden VM of a store, with its console found in its command line.
    async fn open(engine: Engine, snapshot: SnapshotName, root: Root) -> Result<Golden> {
        let vm = engine.vm(&VmName::new(GOLDEN)?).await?;
        let (console_option, console) = vm
            .record()
            .command
            .as_ref()
            .and_then(|c| serial_file(&c.argv))
            .map(|s| (s.option, s.path))
            .unzip();
        Ok(Golden {
            engine,
            vm,
            snapshot,
            console,
            console_option,
            next: AtomicUsize::new(0),
            id: GOLDENS.fetch_add(1, Ordering::SeqCst) + 1,
            started: AtomicBool::new(false),
            pool: std::sync::Mutex::new(None),
            root,
        })
    }

    /// A golden snapshot another process made.
    async fn reuse(snapshot: SnapshotName, dir: PathBuf) -> Result<Golden> {
        let engine = Engine::new(Store::new(dir.join("store")));
        let golden = Golden::open(engine, snapshot, Root::Cached(dir)).await?;
        golden.vm.snapshot(&golden.snapshot).await?;
        Ok(golden)
    }
}

impl Drop for Golden {
    fn drop(&mut self) {
        let vms = self.vms();
        let pooled = self.refiller();
        if let Some(p) = &pooled {
            p.abort();
        }
        match &self.root {
            // Everything in a private store goes (the directory with the TempDir).
            Root::Temp(_) => kill_qemus(&vms, Vms::Prefixed("")),
            // A cached golden stays for the next process; this process's forks go.
            Root::Cached(_) => {
                kill_qemus(&vms, Vms::Prefixed(&self.fork_prefix()));
                if self.started.load(Ordering::SeqCst) {
                    kill_qemus(&vms, Vms::Named(GOLDEN));
                }
            }
        }
    }
}

impl GoldenBuilder {
    /// When the guest is ready to be snapshotted (default: as soon as QEMU runs).
    pub fn ready_when(mut self, ready: Ready) -> Self {
        self.ready = Some(ready);
        self
    }

    /// Creates an empty qcow2 image `name` of `size` bytes in the golden's directory before
    /// it boots; the command line names it `{dir}/name` (`{dir}` is replaced in every
    /// argument).
    pub fn disk(mut self, name: &str, size: u64) -> Self {
        self.disks.push((name.to_owned(), size));
        self
    }

    /// Whether forks map the snapshot's RAM (default) or load it. Mapped, forks start
    /// sooner and share the pages, but take precopy snapshots only, like a lazily reverted
    /// VM; loaded, they take point-in-time snapshots too.
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Keeps the golden snapshot in `dir` and reuses it: the first process to ask boots the
    /// guest and snapshots it (others wait on a lock), later ones — other test processes, a
    /// later run — fork from it at once. Keyed by the command line, the disks and the identity
    /// (size, mtime, inode) of the QEMU binary, of every file the command line names by
    /// absolute path and of a `-kernel`/`-initrd`/`-bios`/`-dtb` named relatively, so a
    /// rebuilt kernel or QEMU makes a new one. (Name files the golden writes with `{dir}`: an
    /// absolute path to one would change the key on every build.) The golden VM is stopped
    /// once its snapshot is made: forks need only the snapshot's files.
    pub fn cache_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache = Some(dir.into());
        self
    }

    /// How long booting and becoming ready may take (default 120 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Boots the VM, waits until it is ready, and takes snapshot `name` of it (made lazy
    /// where QEMU allows, so forks share its RAM pages). With [`GoldenBuilder::cache_in`], a
    /// snapshot made before is reused instead.
    pub async fn snapshot(self, name: &str) -> Result<Golden> {
        let snapshot = SnapshotName::new(name)?;
        let Some(cache) = self.cache.clone() else {
            let root = tempfile::Builder::new()
                .prefix("qsnap-h-")
                .tempdir()
                .map_err(crate::io(
                    "creating the harness's store",
                    &std::env::temp_dir(),
                ))?;
            let path = root.path().to_owned();
            watchdog(&vms_of(&path), Vms::Prefixed(""), Remove::Dir(&path));
            return self.build(snapshot, Root::Temp(root), &path).await;
        };
        let key = self
            .key(&snapshot, std::env::current_dir().ok().as_deref())
            .await;
        let dir = cache.join(format!("golden-{key:016x}"));
        let lock_path = cache.join(format!("golden-{key:016x}.lock"));
        crate::blocking({
            let cache = cache.clone();
            move || {
                std::fs::create_dir_all(&cache)
                    .map_err(crate::io("creating the golden cache", &cache))
            }
        })
        .await?;
        // One builder at a time; the others wait (bounded by the boot timeout), then reuse.
        let lock =
            cache::lock_exclusive(lock_path, self.timeout + Duration::from_secs(120)).await?;
        let complete = dir.join("complete");
        let vms = vms_of(&dir);
        let golden = if tokio::fs::try_exists(&complete).await.unwrap_or(false) {
            Golden::reuse(snapshot, dir.clone()).await?
        } else {
            let _ = tokio::fs::remove_dir_all(&dir).await; // a build that died half-way
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(crate::io("creating the golden's directory", &dir))?;
            // The golden QEMU this build starts dies with a failed build, and with this
            // process while the build runs (not after: the next golden QEMU may be another
            // process's, started by its reset or by its own build after a failed one).
            let dog = watchdog(&vms, Vms::Named(GOLDEN), Remove::Nothing);
            let built = async {
                let golden = self
                    .build(snapshot, Root::Cached(dir.clone()), &dir)
                    .await?;
                golden.vm.stop().await?;
                Ok::<_, Error>(golden)
            }
            .await;
            if built.is_err() {
                kill_qemus(&vms, Vms::Named(GOLDEN));
            }
            if let Some(dog) = dog {
                dog.dismiss();
            }
            let golden = built?;
            tokio::fs::write(&complete, b"")
                .await
                .map_err(crate::io("marking the golden complete", &complete))?;
            golden
        };
        drop(lock);
        watchdog(&vms, Vms::Prefixed(&golden.fork_prefix()), Remove::TheVms);
        Ok(golden)
    }

    /// The key of this golden in a cache (`cache.rs`); relative names resolved against `cwd`.
    pub(crate) async fn key(&self, snapshot: &SnapshotName, cwd: Option<&Path>) -> u64 {
        let ready = self.ready.as_ref();
        cache::key(&self.argv, &self.disks, ready, self.lazy, snapshot, cwd).await
    }

    async fn build(self, snapshot: SnapshotName, root: Root, dir: &Path) -> Result<Golden> {
        let d = dir.display().to_string();
        let mut argv: Vec<String> = self.argv.iter().map(|a| a.replace("{dir}", &d)).collect();
        for (name, size) in &self.disks {
            create_blank_image(&dir.join(name), *size, &Default::default()).await?;
        }
        if !argv.iter().any(|a| a == "-serial" || a == "-nographic") {
            argv.extend([
                "-chardev".into(),
                format!(
                    "file,id={CONSOLE_ID},path={},append=on",
                    dir.join("console.log").display()
                ),
                "-serial".into(),
                format!("chardev:{CONSOLE_ID}"),
            ]);
        }
        let engine = Engine::new(Store::new(dir.join("store")));
        let name = VmName::new(GOLDEN)?;
        engine
            .run_with(&name, argv, &RunOptions::default(), &launcher())
            .await?;
        let golden = Golden::open(engine, snapshot, root).await?;
        if let Some(ready) = &self.ready {
            wait_ready(&golden.vm, golden.console(), ready, self.timeout).await?;
        }
        let opts = golden.vm.create_options(golden.snapshot.clone());
        golden.vm.create_snapshot(opts).await?;
        if !self.lazy {
            return Ok(golden);
        }
        match golden.vm.make_lazy(&golden.snapshot).await {
            Ok(_) => {}
            // What QEMU or the command line rule out (forks still work, loading the memory).
            Err(
                what @ (EngineError::LazyRam(_)
                | EngineError::QemuLacks { .. }
                | EngineError::ForeignJob { .. }),
            ) => {
                tracing::info!(%what, "forks load the golden snapshot's memory eagerly");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(golden)
    }
}

/// Where a golden lives: a private temporary store (removed with it), or a cache directory
/// (kept for the next process).
#[derive(Debug)]
enum Root {
    Temp(tempfile::TempDir),
    Cached(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Temp(t) => t.path(),
            Root::Cached(p) => p,
        }
    }
}
