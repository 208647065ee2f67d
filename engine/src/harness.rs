//! A test harness on clones: boot a guest once, snapshot it when it is ready, then give every
//! test its own running copy of it — in parallel, each with its own disks, console and
//! monitor, gone when the test is done (also when it panics).
//!
//! ```no_run
//! # async fn demo() -> qsnap_engine::Result<()> {
//! use qsnap_engine::harness::{console_prints, Golden};
//! let golden = Golden::boot([
//!     "qemu-system-x86_64", "-m", "256", "-accel", "tcg", "-display", "none",
//!     "-kernel", "vmlinuz", "-initrd", "initramfs.gz", "-append", "console=ttyS0",
//!     "-drive", "file=disk.qcow2,if=virtio",
//! ])
//! .ready_when(console_prints("login:"))
//! .snapshot("ready")
//! .await?;
//! let vm = golden.fork().await?; // running, from the "ready" instant
//! let qmp = vm.qmp().await?; // its own monitor
//! println!("{}", vm.console_text()); // its own console
//! drop(qmp);
//! drop(vm); // QEMU killed, overlays and files removed
//! # Ok(()) }
//! ```
//!
//! Everything lives in one private temporary store (`$TMPDIR/qsnap-h-…`), or in a cache
//! directory shared by processes ([`GoldenBuilder::cache_in`]). The golden VM's snapshot is
//! made lazy where QEMU allows it, so forks map its RAM copy-on-write and share the pages — and,
//! like a lazily reverted VM, take precopy snapshots only (QEMU cannot write-protect a private
//! file mapping for point-in-time ones). A [`Fork`] kills its QEMU and removes its directory when dropped; a [`Golden`]
//! does the same for everything on drop, and — for a golden kept in a `static` that is never
//! dropped — a watchdog process does it when the test process exits, however it exits.
//! What this module must never do: touch anything outside its own temporary store.

use crate::error::{Error, Result};
use crate::name::{SnapshotName, VmName};
use crate::vm::{CloneOptions, CloneReport, Engine, RevertReport, RunOptions, Vm};
use crate::Store;
use qsnap_qmp::Qmp;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Check = Arc<dyn Fn(Vm) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// When a booted guest counts as ready to be snapshotted.
#[derive(Clone)]
pub struct Ready(ReadyKind);

#[derive(Clone)]
enum ReadyKind {
    Console(String),
    Agent,
    Check(Check),
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ReadyKind::Console(t) => write!(f, "console_prints({t:?})"),
            ReadyKind::Agent => f.write_str("agent_answers()"),
            ReadyKind::Check(_) => f.write_str("when(…)"),
        }
    }
}

/// Ready once the guest's console has printed `text`.
pub fn console_prints(text: impl Into<String>) -> Ready {
    Ready(ReadyKind::Console(text.into()))
}

/// Ready once the QEMU guest agent in the guest answers (needs a `virtserialport` named
/// `org.qemu.guest_agent.0` on a `-chardev socket,path=…`).
pub fn agent_answers() -> Ready {
    Ready(ReadyKind::Agent)
}

/// Ready once `check` returns true (asked every 100 ms with the VM; ask its monitor, its
/// disks, a port it forwards …).
pub fn when<F, Fut>(check: F) -> Ready
where
    F: Fn(Vm) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Ready(ReadyKind::Check(Arc::new(move |vm| Box::pin(check(vm)))))
}

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
    started: std::sync::atomic::AtomicBool,
    // Last: removed after everything above is done with it.
    root: Root,
}

/// One running copy of the golden snapshot, for one test.
#[derive(Debug)]
pub struct Fork {
    vm: Vm,
    source: Vm,
    snapshot: SnapshotName,
    report: CloneReport,
    console: Option<PathBuf>,
    dir: PathBuf,
}

const CONSOLE_ID: &str = "qsnapcon";

/// Goldens made by this process so far (each names its forks by its number).
static GOLDENS: AtomicUsize = AtomicUsize::new(0);

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

    /// A running copy of the snapshot: its own overlays, monitor, console and files.
    pub async fn fork(&self) -> Result<Fork> {
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let name = VmName::new(&format!("{}{n}", self.fork_prefix()))?;
        let report = self
            .vm
            .clone_snapshot(&self.snapshot, &name, &CloneOptions::default())
            .await?;
        let vm = self.engine.vm(&name).await?;
        Ok(Fork {
            console: self.console_of(&report),
            dir: self.engine.store().vm_dir(&name),
            source: self.vm.clone(),
            snapshot: self.snapshot.clone(),
            vm,
            report,
        })
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
                watchdog(&self.own_socket(), None);
            }
        }
        self.vm.revert(&self.snapshot, false).await
    }

    /// The golden QEMU's monitor socket: in its command line, and in no fork's.
    fn own_socket(&self) -> String {
        self.root
            .path()
            .join("store/vms/golden/qmp.sock")
            .display()
            .to_string()
    }

    /// The golden VM's console file, if the harness captures it.
    pub fn console(&self) -> Option<&Path> {
        self.console.as_deref()
    }

    /// The golden's directory (its store, disks and console).
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// This golden's forks are named `f<pid>g<id>-<n>`: processes (and goldens of one
    /// process) sharing a cached store never pick the same name, and each cleans up only its
    /// own.
    fn fork_prefix(&self) -> String {
        format!("f{}g{}-", std::process::id(), self.id)
    }

    /// The golden VM of a store, with its console found in its command line.
    async fn open(engine: Engine, snapshot: SnapshotName, root: Root) -> Result<Golden> {
        let vm = engine.vm(&VmName::new("golden")?).await?;
        let (console_option, console) = vm
            .record()
            .command
            .as_ref()
            .and_then(|c| console_in(&c.argv))
            .unzip();
        Ok(Golden {
            engine,
            vm,
            snapshot,
            console,
            console_option,
            next: AtomicUsize::new(0),
            id: GOLDENS.fetch_add(1, Ordering::SeqCst) + 1,
            started: std::sync::atomic::AtomicBool::new(false),
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
        match &self.root {
            // Everything in a private store goes (the directory with the TempDir).
            Root::Temp(t) => kill_matching(&format!("{}/", t.path().display())),
            // A cached golden stays for the next process; this process's forks go.
            Root::Cached(dir) => {
                let forks = dir.join("store/vms").join(self.fork_prefix());
                kill_matching(&forks.display().to_string());
                if self.started.load(Ordering::SeqCst) {
                    kill_matching(&self.own_socket());
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
                .map_err(|e| Error::Io {
                    what: "creating the harness's store",
                    path: std::env::temp_dir(),
                    source: e,
                })?;
            let all = format!("{}/", root.path().display());
            watchdog(&all, Some(&all));
            let path = root.path().to_owned();
            return self.build(snapshot, Root::Temp(root), &path).await;
        };
        let key = self
            .key(&snapshot, std::env::current_dir().ok().as_deref())
            .await;
        let dir = cache.join(format!("golden-{key:016x}"));
        let lock_path = cache.join(format!("golden-{key:016x}.lock"));
        crate::store::blocking({
            let cache = cache.clone();
            move || {
                std::fs::create_dir_all(&cache)
                    .map_err(crate::store::io("creating the golden cache", &cache))
            }
        })
        .await?;
        // One builder at a time; the others wait (bounded by the boot timeout), then reuse.
        let lock = lock_exclusive(lock_path, self.timeout + Duration::from_secs(120)).await?;
        let complete = dir.join("complete");
        let golden = if tokio::fs::try_exists(&complete).await.unwrap_or(false) {
            Golden::reuse(snapshot, dir.clone()).await?
        } else {
            let _ = tokio::fs::remove_dir_all(&dir).await; // a build that died half-way
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(crate::store::io("creating the golden's directory", &dir))?;
            // The golden QEMU (named by its own monitor socket, which no fork's command
            // line holds) dies with a failed build, and with this process.
            let own = dir.join("store/vms/golden/qmp.sock").display().to_string(); // = own_socket()
            watchdog(&own, None);
            let built = async {
                let golden = self
                    .build(snapshot, Root::Cached(dir.clone()), &dir)
                    .await?;
                golden.vm.stop().await?;
                Ok::<_, Error>(golden)
            }
            .await;
            let golden = match built {
                Ok(g) => g,
                Err(e) => {
                    kill_matching(&own);
                    return Err(e);
                }
            };
            tokio::fs::write(&complete, b"")
                .await
                .map_err(crate::store::io("marking the golden complete", &complete))?;
            golden
        };
        drop(lock);
        let forks = dir.join("store/vms").join(golden.fork_prefix());
        let forks = forks.display().to_string();
        watchdog(&forks, Some(&forks));
        Ok(golden)
    }

    /// What makes a cached golden the same: the command line, the disks, and each named
    /// file's identity.
    async fn key(&self, snapshot: &SnapshotName, cwd: Option<&Path>) -> u64 {
        let mut text = format!(
            "{:?}|{:?}|{:?}|lazy {}|{snapshot}|schema {}|qsnap {}",
            self.argv,
            self.disks,
            self.ready,
            self.lazy,
            crate::store::SCHEMA,
            env!("CARGO_PKG_VERSION")
        );
        let binary =
            crate::cache::resolve_binary(self.argv.first().map_or("", String::as_str)).await;
        // Every absolute path counts; a relative one (from this process's directory) only as
        // the value of an option that reads it: a relative file the golden writes (a log,
        // a disk) would change with every build and the cache would never hit.
        let mut files: Vec<PathBuf> = Vec::new();
        for (i, a) in self.argv.iter().enumerate().skip(1) {
            let reads = matches!(
                self.argv[i - 1].trim_start_matches('-'),
                "kernel" | "initrd" | "bios" | "dtb"
            );
            for p in a.split([',', '=']).filter(|p| !p.is_empty()) {
                if Path::new(p).is_absolute() {
                    files.push(PathBuf::from(p));
                } else if let (true, Some(cwd)) = (reads, cwd) {
                    files.push(cwd.join(p));
                }
            }
        }
        files.extend(binary);
        for f in files {
            if let Some(k) = crate::cache::file_key(&f, "").await {
                text.push('|');
                text.push_str(&k);
            }
        }
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    }

    async fn build(self, snapshot: SnapshotName, root: Root, dir: &Path) -> Result<Golden> {
        let d = dir.display().to_string();
        let mut argv: Vec<String> = self.argv.iter().map(|a| a.replace("{dir}", &d)).collect();
        for (name, size) in &self.disks {
            let never = tokio_util::sync::CancellationToken::new();
            crate::image::create_blank(&dir.join(name), *size, &never).await?;
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
        let name = VmName::new("golden")?;
        engine.run(&name, argv, &RunOptions::default()).await?;
        let golden = Golden::open(engine, snapshot, root).await?;
        if let Some(ready) = &self.ready {
            golden.wait_ready(ready, self.timeout).await?;
        }
        let opts = golden.vm.create_options(golden.snapshot.clone());
        golden.vm.create_snapshot(opts).await?;
        if !self.lazy {
            return Ok(golden);
        }
        match golden.vm.make_lazy(&golden.snapshot).await {
            Ok(_) => {}
            // What was `Error::Unsupported` before the engine's refusals got types.
            Err(
                what @ (Error::LazyRam(_) | Error::QemuLacks { .. } | Error::ForeignJob { .. }),
            ) => {
                tracing::info!(%what, "forks load the golden snapshot's memory eagerly");
            }
            Err(e) => return Err(e),
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

async fn lock_exclusive(
    path: PathBuf,
    timeout: Duration,
) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = path.clone();
        let got = crate::store::blocking(move || {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(crate::store::io("opening the golden cache lock", &p))?;
            Ok(nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok())
        })
        .await?;
        if let Some(locked) = got {
            return Ok(locked);
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!(
                    "another process building the golden VM ({})",
                    path.display()
                ),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Golden {
    /// A clone's console: where the golden's console file went.
    fn console_of(&self, report: &CloneReport) -> Option<PathBuf> {
        let option = self.console_option.as_deref()?;
        report
            .moved
            .iter()
            .find(|m| m.option == option)
            .map(|m| m.to.clone())
    }

    async fn wait_ready(&self, ready: &Ready, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = match &ready.0 {
                ReadyKind::Console(text) => match &self.console {
                    Some(p) => tokio::fs::read_to_string(p)
                        .await
                        .map(|t| t.contains(text.as_str()))
                        .unwrap_or(false),
                    None => {
                        return Err(Error::Unsupported {
                            what: "waiting for console text: the command line sends the console elsewhere (-serial); leave it out and the harness captures it".into(),
                        })
                    }
                },
                ReadyKind::Agent => match &self.vm.record().guest_agent {
                    Some(sock) => {
                        crate::guest_agent::GuestAgent::connect(sock, Duration::from_secs(1))
                            .await
                            .is_ok()
                    }
                    None => {
                        return Err(Error::Unsupported {
                            what: "waiting for the guest agent: the command line has none (a virtserialport named org.qemu.guest_agent.0 on a -chardev socket,path=…)".into(),
                        })
                    }
                },
                ReadyKind::Check(f) => f(self.vm.clone()).await,
            };
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail = match &self.console {
                    Some(p) => {
                        let t = tokio::fs::read_to_string(p).await.unwrap_or_default();
                        let lines: Vec<&str> = t.lines().collect();
                        lines[lines.len().saturating_sub(10)..].join("\n")
                    }
                    None => String::new(),
                };
                return Err(Error::Timeout {
                    what: format!("the golden VM to be ready ({ready:?}); console:\n{tail}"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Fork {
    /// The clone as a qsnap VM (snapshot it, revert it, …).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// A connection to its monitor (drop it soon: QEMU serves one client at a time).
    pub async fn qmp(&self) -> Result<Qmp> {
        self.vm.connect().await
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
    /// starts empty again), a new QEMU.
    pub async fn reset(&mut self) -> Result<()> {
        self.vm.remove().await?;
        let report = self
            .source
            .clone_snapshot(&self.snapshot, self.vm.name(), &CloneOptions::default())
            .await?;
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
            // A QEMU's command line names its VM's directory (monitor socket, overlays).
            kill_matching(&format!("{}/", dir.display()));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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

/// The console file a command line writes (`-serial file:P`, or `-serial chardev:ID` with a
/// `-chardev file,id=ID,path=P`), and how it shows in a clone's moved paths.
fn console_in(argv: &[String]) -> Option<(String, PathBuf)> {
    let i = argv.iter().position(|a| a == "-serial")?;
    let v = argv.get(i + 1)?;
    if let Some(p) = v.strip_prefix("file:") {
        return Some(("-serial".into(), PathBuf::from(p)));
    }
    let id = v.strip_prefix("chardev:")?;
    argv.windows(2).find_map(|w| {
        let parts = crate::launch::argv::split_opts(&w[1]);
        let is_it = w[0] == "-chardev"
            && parts.first().map(String::as_str) == Some("file")
            && crate::launch::argv::get(&parts, "id") == Some(id);
        is_it
            .then(|| crate::launch::argv::get(&parts, "path").map(PathBuf::from))
            .flatten()
            .map(|p| (format!("-chardev {id}"), p))
    })
}

/// SIGKILLs every process whose command line contains `needle` (QEMUs of the harness's
/// store), synchronously: it runs in `Drop`, also while a test panics.
fn kill_matching(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // Only a QEMU of this user: an editor, a shell or a `tail -f` naming the directory
        // is someone's, not the harness's.
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        if !String::from_utf8_lossy(argv0).contains("qemu") || !owned_by_me(&e.path()) {
            continue;
        }
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether a `/proc/<pid>` entry belongs to this process's user.
fn owned_by_me(proc_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(proc_dir).is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw())
}

/// A process that outlives this one by at most half a second: when this process is gone it
/// SIGKILLs every QEMU of this user whose command line contains `pattern` (a fixed string,
/// as [`kill_matching`] does) and removes `remove*` if given. A golden in a `static` is never
/// dropped; this is what cleans up after it. Its own command line names nothing (the paths
/// are in its environment), so it does not kill itself.
fn watchdog(pattern: &str, remove: Option<&str>) {
    use std::os::unix::process::CommandExt;
    let script = r#"while kill -0 "$QSNAP_H_PID" 2>/dev/null; do sleep 0.5; done
for p in /proc/[0-9]*; do
  [ -O "$p" ] || continue
  tr '\000' '\n' < "$p/cmdline" 2>/dev/null | head -n 1 | grep -q qemu || continue
  if tr '\000' ' ' < "$p/cmdline" 2>/dev/null | grep -qF -- "$QSNAP_H_PAT"; then
    kill -9 "${p#/proc/}" 2>/dev/null
  fi
done
if [ -n "$QSNAP_H_RM" ]; then sleep 0.2; rm -rf "$QSNAP_H_RM"*; fi"#;
    let spawned = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("QSNAP_H_PID", std::process::id().to_string())
        .env("QSNAP_H_PAT", pattern)
        .env("QSNAP_H_RM", remove.unwrap_or(""))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no watchdog: a golden VM that is never dropped outlives the test process");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_qemus_naming_the_directory_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let needle = format!("{}/", dir.path().display());
        // Someone's process naming the directory, and a "QEMU" (a program whose name says
        // so) naming it.
        let qemu = dir.path().join("qemu-system-fake");
        std::os::unix::fs::symlink("/bin/sh", &qemu).unwrap();
        let mut theirs = std::process::Command::new("sh")
            .args(["-c", "sleep 30"])
            .arg(dir.path().join("serial.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut ours = std::process::Command::new(&qemu)
            .args(["-c", "sleep 30"])
            .arg(dir.path().join("qmp.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until both have exec'd (a fresh child's cmdline may read empty for a moment).
        for pid in [ours.id(), theirs.id()] {
            for _ in 0..200 {
                let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&c).contains(&needle) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        kill_matching(&needle);
        let killed = ours.wait().unwrap();
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&killed) == Some(9),
            "{killed:?}"
        );
        assert!(
            theirs.try_wait().unwrap().is_none(),
            "a process that is not a QEMU was killed"
        );
        theirs.kill().unwrap();
        theirs.wait().unwrap();
    }

    #[tokio::test]
    async fn the_cache_key_follows_files_named_relatively_or_absolutely() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"one").unwrap();
        let snap = SnapshotName::new("ready").unwrap();
        let relative = Golden::boot(["qemu-system-x86_64", "-kernel", "vmlinuz", "-D", "qemu.log"]);
        // A file the golden writes, named relatively, never counts.
        std::fs::write(dir.path().join("qemu.log"), b"").unwrap();
        let absolute = Golden::boot(["qemu-system-x86_64", "-kernel", kernel.to_str().unwrap()]);
        let (r1, a1) = (
            relative.key(&snap, Some(dir.path())).await,
            absolute.key(&snap, None).await,
        );
        // Same contents, same key; a rebuilt file, a new key — whichever way it is named.
        assert_eq!(r1, relative.key(&snap, Some(dir.path())).await);
        std::fs::write(dir.path().join("qemu.log"), b"written by QEMU").unwrap();
        assert_eq!(r1, relative.key(&snap, Some(dir.path())).await);
        std::fs::remove_file(&kernel).unwrap();
        std::fs::write(&kernel, b"two, longer").unwrap();
        assert_ne!(r1, relative.key(&snap, Some(dir.path())).await);
        assert_ne!(a1, absolute.key(&snap, None).await);
    }
}
