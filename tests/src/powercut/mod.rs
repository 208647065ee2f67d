//! # A FUSE filesystem that can lose power
//!
//! [`PowerCutFs`] mounts a directory whose every write goes to a backing directory the test
//! gives, while it tracks what a real filesystem would have made *durable*. Power can fail
//! right after any durability boundary ([`PowerCutFs::arm_cut`]); [`PowerCutFs::power_cycle`]
//! then throws away what a host power loss throws away and mounts the survivors again at the
//! same path. The trust tests use it to show that qsnap survives a power loss at any instant,
//! not only a SIGKILL (like Jepsen's LazyFS, SQLite's crash-test VFS, CrashMonkey, ALICE).
//!
//! ## What survives a power cut
//! Strict POSIX, as the weakest journaling filesystem allows, not ext4's kindness:
//! - **File contents, size and metadata** (mode, owner, mtime) are those of the file's last
//!   `fsync` or `fdatasync` (any descriptor of the inode, or `msync`). A file never synced has
//!   its size, mode and times of creation (size 0). `fdatasync` counts as `fsync` for the
//!   mtime too (a file QEMU wrote and flushed keeps the mtime of that flush: qsnap stamps
//!   images by size and mtime); chmod, chown and utimensat alone are lost without one.
//! - **Directory entries** (create, mknod, mkdir, symlink, link, unlink, rmdir, rename) are
//!   those of the directory's last `fsync` (`fsync` on a descriptor of the directory). A new
//!   file whose directory was not synced vanishes with its data; an unlinked or renamed-over
//!   file whose directory was not synced comes back with its durable contents.
//! - **A rename between directories** is durable in each directory separately, when that
//!   directory is synced: after a cut the file may be in both (two hard links) or in neither.
//!   A directory that durable entries name in two places stays in the first place a
//!   breadth-first walk by name finds (a filesystem is a tree).
//! - Sockets and fifos are entries like any other; after a power cycle a socket node is dead
//!   (nobody listens). Locks (flock, POSIX, OFD) are the kernel's and die with the processes.
//! - With [`Options::tear_last_write`], each surviving file's last unsynced write keeps its
//!   first half (in whole 512-byte sectors): a torn write.
//!
//! ## Durability boundaries
//! Counted, in order, with the calling process: every successful `fsync`/`fdatasync` of a
//! file, `fsync` of a directory, create/mknod/mkdir/symlink, link, unlink, rmdir and rename.
//! Writes, truncates, fallocate and metadata changes are not boundaries: nothing they do is
//! durable until the next `fsync`, which is one, so "right after boundary n" reaches every
//! distinct durable state. [`PowerCutFs::arm_cut`]`(n, filter)` cuts the power right after
//! the n-th boundary that `filter` accepts, counted from that call: the n-th operation is
//! applied and answered, and from then on every mutating request fails with `EIO` and
//! changes nothing. Reads, lookups and `stat` go on (they see the live state, as the page cache
//! would), until the test kills the callers ([`PowerCutFs::kill_callers`]).
//!
//! ## Example
//! ```no_run
//! use qsnap_testkit::powercut::{EventFilter, PowerCutFs};
//! use std::time::Duration;
//! # fn main() -> std::io::Result<()> {
//! let tmp = tempfile::tempdir()?;
//! let (mnt, backing) = (tmp.path().join("mnt"), tmp.path().join("backing"));
//! std::fs::create_dir(&mnt)?;
//! let mut fs = PowerCutFs::mount(&mnt, &backing)?;
//! // … set up a store and a VM under fs.path("store") …
//! fs.sync_all()?; // the set-up is durable
//! // Count only qsnap's process tree (QEMU, detached, flushes its images when it likes).
//! fs.arm_cut(3, EventFilter::descendants_of_self());
//! let mut child = std::process::Command::new("qsnap")
//!     .arg("--store")
//!     .arg(fs.path("store"))
//!     .args(["create", "vm1", "snap1"])
//!     .spawn()?;
//! match fs.wait_cut(Duration::from_secs(60)) {
//!     Some(ev) => eprintln!("cut after {ev}"), // "boundary 3 (#41 since mount): rename of …"
//!     None => eprintln!("no boundary 3 within 60 s: did qsnap finish first?"),
//! }
//! fs.kill_callers(Duration::from_secs(10))?; // qsnap, qemu-img, QEMU: whoever used the mount
//! let _ = child.wait();
//! let report = fs.power_cycle()?;
//! eprintln!("{report}"); // what vanished, what came back, which files rolled back
//! // … run qsnap again on the same absolute paths: check, list, revert …
//! # Ok(()) }
//! ```
//!
//! Directories, names and metadata are kept in memory (they are small); file contents only in
//! the backing directory. fuser may log `Failed to send FUSE reply: No such file or
//! directory` at an unmount: a release the kernel sent without waiting raced the unmount
//! (harmless).
//!
//! It must never hang a test (every wait has a deadline; a stuck unmount or FUSE thread is an
//! error), never leave a mount behind (dropping the handle unmounts, lazily if busy), never
//! kill a process that is not a caller or a user of the mount (nor the test process or its
//! ancestors), and never keep file contents in memory: they live in the backing directory.

mod fs;
mod model;
pub(crate) mod procs;

pub use model::{CutReport, Rollback};

use fs::{ActiveRule, Counting, Cut, PowerCutFuse, Shared};
use model::Model;
use nix::errno::Errno;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Which operation a boundary was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `fsync` of a file (also `msync(MS_SYNC)`).
    Fsync,
    /// `fdatasync` of a file.
    Fdatasync,
    /// `fsync` of a directory.
    FsyncDir,
    /// A regular file created by `open(O_CREAT)`.
    Create,
    /// `mknod` (a unix socket's `bind`, a fifo, a device node, or a file without `create`).
    Mknod,
    /// `mkdir`.
    Mkdir,
    /// `symlink`.
    Symlink,
    /// `link` (a new hard link; `from` is the existing name).
    Link,
    /// `unlink`.
    Unlink,
    /// `rmdir`.
    Rmdir,
    /// `rename`/`renameat2` (`from` is the old name).
    Rename,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::Fsync => "fsync",
            EventKind::Fdatasync => "fdatasync",
            EventKind::FsyncDir => "fsync of directory",
            EventKind::Create => "create",
            EventKind::Mknod => "mknod",
            EventKind::Mkdir => "mkdir",
            EventKind::Symlink => "symlink",
            EventKind::Link => "link",
            EventKind::Unlink => "unlink",
            EventKind::Rmdir => "rmdir",
            EventKind::Rename => "rename",
        })
    }
}

/// One durability boundary, as a test prints it: "boundary 3: fsync of vms/vm1/journal.json by
/// pid 1234 (qsnap)".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundaryEvent {
    /// 1-based position among all boundaries since the mount.
    pub seq: u64,
    /// 1-based position among the boundaries counted since [`PowerCutFs::arm_cut`] or
    /// [`PowerCutFs::count_events`] (those the filter accepted); `None` when not counted.
    pub number: Option<u64>,
    /// The operation.
    pub kind: EventKind,
    /// The path it made (or synced, or removed), relative to the mount root.
    pub path: PathBuf,
    /// The old path of a rename, the existing name of a link.
    pub from: Option<PathBuf>,
    /// The calling process (0 when unknown: a kernel thread, or gone already).
    pub pid: u32,
    /// The calling thread (what FUSE reports).
    pub tid: u32,
    /// The caller's command name (`/proc/<pid>/comm`, at most 15 bytes: `qemu-system-x86`).
    pub comm: String,
    /// The caller's parent, grandparent, … up to init, at the time of the event.
    pub ancestors: Vec<u32>,
}

impl fmt::Display for BoundaryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number {
            Some(n) => write!(f, "boundary {n} (#{} since mount): ", self.seq)?,
            None => write!(f, "boundary #{} since mount: ", self.seq)?,
        }
        write!(f, "{}", self.kind)?;
        match &self.from {
            Some(from) => write!(f, " of {} -> {}", from.display(), self.path.display())?,
            None => write!(f, " of {}", self.path.display())?,
        }
        write!(f, " by pid {} ({})", self.pid, self.comm)
    }
}

type EventPred = dyn Fn(&BoundaryEvent) -> bool + Send + Sync;

/// Which boundaries count toward [`PowerCutFs::arm_cut`]. QEMU syncs its images whenever the
/// guest flushes; counting only one process tree or one subtree keeps the numbering
/// reproducible.
#[derive(Clone)]
pub struct EventFilter {
    pred: Arc<EventPred>,
    desc: String,
}

impl fmt::Debug for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventFilter({})", self.desc)
    }
}

impl EventFilter {
    /// Any boundary that `pred` accepts; `desc` names it in `Debug` output. Filters run
    /// under the filesystem's lock, inside a FUSE request: `pred` must not touch the mount or
    /// this handle.
    pub fn custom(
        desc: impl Into<String>,
        pred: impl Fn(&BoundaryEvent) -> bool + Send + Sync + 'static,
    ) -> Self {
        EventFilter {
            pred: Arc::new(pred),
            desc: desc.into(),
        }
    }

    /// Every boundary.
    pub fn all() -> Self {
        Self::custom("all", |_| true)
    }

    /// Boundaries whose path (or old path) lies under `dir`, relative to the mount root
    /// (component-wise: `vms/vm1` does not match `vms/vm10`; not an absolute path).
    pub fn under(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref().to_owned();
        Self::custom(format!("under {}", dir.display()), move |ev| {
            ev.path.starts_with(&dir) || ev.from.as_ref().is_some_and(|f| f.starts_with(&dir))
        })
    }

    /// Boundaries of process `pid` itself (any of its threads).
    pub fn pid(pid: u32) -> Self {
        Self::custom(format!("pid {pid}"), move |ev| ev.pid == pid)
    }

    /// Boundaries of process `pid` and its descendants (by the parent chain at the time of the
    /// event: a daemon that re-parents itself to init leaves the tree).
    pub fn pid_tree(pid: u32) -> Self {
        Self::custom(format!("pid tree {pid}"), move |ev| {
            ev.pid == pid || ev.ancestors.contains(&pid)
        })
    }

    /// Boundaries of the test process's descendants, not of the test process itself: the
    /// children a scenario spawns after arming (no race with their first operation).
    pub fn descendants_of_self() -> Self {
        let me = std::process::id();
        Self::custom("descendants of the test process", move |ev| {
            ev.pid != me && ev.ancestors.contains(&me)
        })
    }

    /// Boundaries of processes whose command name is `comm` (15 bytes at most, as the kernel
    /// keeps it).
    pub fn comm(comm: impl Into<String>) -> Self {
        let comm = comm.into();
        Self::custom(format!("comm {comm}"), move |ev| ev.comm == comm)
    }

    /// Boundaries of these kinds.
    pub fn kinds(kinds: &[EventKind]) -> Self {
        let kinds = kinds.to_vec();
        Self::custom(format!("kinds {kinds:?}"), move |ev| {
            kinds.contains(&ev.kind)
        })
    }

    /// Both filters accept.
    pub fn and(self, other: EventFilter) -> Self {
        let desc = format!("({} and {})", self.desc, other.desc);
        Self::custom(desc, move |ev| self.matches(ev) && other.matches(ev))
    }

    /// Either filter accepts.
    pub fn or(self, other: EventFilter) -> Self {
        let desc = format!("({} or {})", self.desc, other.desc);
        Self::custom(desc, move |ev| self.matches(ev) || other.matches(ev))
    }

    /// This filter accepts and `other` does not.
    pub fn and_not(self, other: EventFilter) -> Self {
        let desc = format!("({} and not {})", self.desc, other.desc);
        Self::custom(desc, move |ev| self.matches(ev) && !other.matches(ev))
    }

    /// Whether the filter accepts `ev`.
    pub fn matches(&self, ev: &BoundaryEvent) -> bool {
        (self.pred)(ev)
    }
}

type PathPred = dyn Fn(&Path) -> bool + Send + Sync;

/// Makes matching writes fail: [`PowerCutFs::fail_write`]. Counts FUSE write requests (a
/// `write(2)` larger than 1 MiB is several) to paths the rule matches, and with
/// [`FailRule::and_syncs`] also `fsync`/`fdatasync` of them; the `nth` one fails with
/// `errno` (default `EIO`), once or, with [`FailRule::from_then_on`], every one after too.
#[derive(Clone)]
pub struct FailRule {
    pred: Arc<PathPred>,
    desc: String,
    syncs_too: bool,
    nth: u64,
    errno: Errno,
    from_then_on: bool,
}

impl fmt::Debug for FailRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FailRule({}, nth {}, {}{}{})",
            self.desc,
            self.nth,
            self.errno,
            if self.syncs_too { ", syncs too" } else { "" },
            if self.from_then_on {
                ", from then on"
            } else {
                ""
            }
        )
    }
}

impl FailRule {
    /// Writes to paths (relative to the mount root) that contain `needle`.
    pub fn path_contains(needle: impl Into<String>) -> Self {
        let needle = needle.into();
        let desc = format!("path contains {needle:?}");
        Self::paths(desc, move |p| p.to_string_lossy().contains(&needle))
    }

    /// Writes to paths (relative to the mount root) that `pred` accepts.
    pub fn paths(
        desc: impl Into<String>,
        pred: impl Fn(&Path) -> bool + Send + Sync + 'static,
    ) -> Self {
        FailRule {
            pred: Arc::new(pred),
            desc: desc.into(),
            syncs_too: false,
            nth: 1,
            errno: Errno::EIO,
            from_then_on: false,
        }
    }

    /// Fails the `n`-th matching request (1-based; the default is the first).
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = n.max(1);
        self
    }

    /// Fails with `errno` (`ENOSPC`, `EIO`, …).
    pub fn errno(mut self, errno: Errno) -> Self {
        self.errno = errno;
        self
    }

    /// Fails every matching request from the `nth` on, not only the `nth`.
    pub fn from_then_on(mut self) -> Self {
        self.from_then_on = true;
        self
    }

    /// Counts (and fails) `fsync`/`fdatasync` of matching files too.
    pub fn and_syncs(mut self) -> Self {
        self.syncs_too = true;
        self
    }

    fn matches(&self, path: &Path) -> bool {
        (self.pred)(path)
    }
}

/// One error a [`FailRule`] injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedFailure {
    /// The file, relative to the mount root.
    pub path: PathBuf,
    /// `"write"` or `"fsync"`.
    pub op: &'static str,
    /// The error returned.
    pub errno: Errno,
    /// The calling process.
    pub pid: u32,
}

/// A process that sent requests to the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Process id.
    pub pid: u32,
    /// Command name when first seen.
    pub comm: String,
    /// Command line, as first read by [`PowerCutFs::callers`] (empty when the process had
    /// ended by then).
    pub cmdline: String,
    /// Start time (clock ticks after boot): with `pid`, names this process even after the pid
    /// is recycled.
    pub starttime: u64,
}

impl Caller {
    /// Whether the process still runs (not gone, not a zombie, not a recycled pid).
    pub fn alive(&self) -> bool {
        !procs::ended(self.pid, self.starttime)
    }
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct Options {
    /// Tear each surviving file's last unsynced write at a power cut (keep its first half).
    pub tear_last_write: bool,
    /// FUSE server threads.
    pub threads: usize,
    /// Deadline of every mount and unmount.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tear_last_write: false,
            threads: 2,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The running FUSE session of one mount.
struct Running {
    thread: JoinHandle<io::Result<()>>,
    unmounter: fuser::SessionUnmounter,
    /// The connection's name under /sys/fs/fuse/connections, to abort it if it outlives the
    /// unmount.
    conn: Option<String>,
}

/// A mounted power-cut filesystem. See the module docs. Drop it before the temp dir that holds
/// its mount point.
pub struct PowerCutFs {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    backing: PathBuf,
    options: Options,
    running: Option<Running>,
}

impl fmt::Debug for PowerCutFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PowerCutFs")
            .field("mountpoint", &self.mountpoint)
            .field("backing", &self.backing)
            .field("mounted", &self.running.is_some())
            .finish()
    }
}

/// Whether this test can mount FUSE. Locally, not being root or having no `/dev/fuse` skips it
/// loudly; under `CI` (root, with `/dev/fuse`) it is a failure.
pub fn fuse_or_skip(test: &str) -> bool {
    if !crate::root_or_skip(test) {
        return false;
    }
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(
        !crate::under_ci(),
        "{test}: /dev/fuse is missing, and CI must run the power-cut tests"
    );
    eprintln!("\n*** SKIPPED {test}: no /dev/fuse here (modprobe fuse; CI has it) ***\n");
    false
}

impl PowerCutFs {
    /// Mounts an empty power-cut filesystem on `mountpoint` (an existing directory), keeping
    /// its files in `backing` (created; must hold no earlier `objects/` or `undo/`).
    pub fn mount(mountpoint: impl AsRef<Path>, backing: impl AsRef<Path>) -> io::Result<Self> {
        Self::mount_with(mountpoint, backing, Options::default())
    }

    /// [`PowerCutFs::mount`] with options.
    pub fn mount_with(
        mountpoint: impl AsRef<Path>,
        backing: impl AsRef<Path>,
        options: Options,
    ) -> io::Result<Self> {
        let mountpoint = mountpoint.as_ref().canonicalize()?;
        let backing = backing.as_ref().to_owned();
        if backing.starts_with(&mountpoint) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the backing directory cannot be inside the mount point",
            ));
        }
        let model = Model::new(&backing, options.tear_last_write)?;
        let backing = backing.canonicalize()?;
        let shared = Arc::new(Shared::new(model));
        let running = start(&shared, &mountpoint, 1, &options)?;
        Ok(PowerCutFs {
            shared,
            mountpoint,
            backing,
            options,
            running: Some(running),
        })
    }

    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing directory (canonical).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// `rel` under the mount point.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Makes everything durable now, as if every file and directory had been fsynced (for a
    /// test's set-up). Not a boundary.
    pub fn sync_all(&self) -> io::Result<()> {
        self.shared.lock().model.sync_all().map_err(io::Error::from)
    }

    /// Starts counting the boundaries `filter` accepts (from 1), without a cut: a dry run
    /// learns how many boundaries an operation has ([`PowerCutFs::counted`]).
    pub fn count_events(&self, filter: EventFilter) {
        self.shared.lock().counting = Some(Counting {
            filter,
            counted: 0,
            cut_at: None,
        });
    }

    /// Cuts the power right after the `n`-th boundary (1-based) that `filter` accepts, counted
    /// from now.
    pub fn arm_cut(&self, n: u64, filter: EventFilter) {
        self.shared.lock().counting = Some(Counting {
            filter,
            counted: 0,
            cut_at: Some(n.max(1)),
        });
    }

    /// Stops counting (and disarms a cut that has not happened).
    pub fn disarm(&self) {
        self.shared.lock().counting = None;
    }

    /// The boundaries counted since [`PowerCutFs::arm_cut`] / [`PowerCutFs::count_events`].
    pub fn counted(&self) -> Vec<BoundaryEvent> {
        let st = self.shared.lock();
        st.events
            .iter()
            .filter(|e| e.number.is_some())
            .cloned()
            .collect()
    }

    /// Every boundary since the mount (or the last power cycle).
    pub fn events(&self) -> Vec<BoundaryEvent> {
        self.shared.lock().events.clone()
    }

    /// Cuts the power now: every later mutating request fails with `EIO`.
    pub fn cut_now(&self) {
        self.shared.lock().cut.get_or_insert(Cut::Manual);
        self.shared.cut_cv.notify_all();
    }

    /// Whether the power is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.lock().cut.is_some()
    }

    /// Waits up to `timeout` for the armed cut; returns the boundary it came after, or `None`
    /// when it did not come in time (or the cut was [`PowerCutFs::cut_now`]).
    pub fn wait_cut(&self, timeout: Duration) -> Option<BoundaryEvent> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            match &st.cut {
                Some(Cut::After(ev)) => return Some(ev.clone()),
                Some(Cut::Manual) => return None,
                None => {}
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            st = self
                .shared
                .cut_cv
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// The processes (not the test process, not kernel threads) that sent requests since the
    /// mount, alive or not.
    pub fn callers(&self) -> Vec<Caller> {
        let mut callers: Vec<Caller> = self.shared.lock().callers.values().cloned().collect();
        // Command lines are read here, outside the lock (see `State::note`).
        let mut found = Vec::new();
        for c in callers
            .iter_mut()
            .filter(|c| c.cmdline.is_empty() && c.alive())
        {
            c.cmdline = procs::cmdline(c.pid);
            found.push((c.pid, c.cmdline.clone()));
        }
        let mut st = self.shared.lock();
        for (pid, cmdline) in found {
            if let Some(c) = st.callers.get_mut(&pid) {
                c.cmdline = cmdline;
            }
        }
        callers
    }

    /// SIGKILLs every caller still running, every other process with a file, mapping or
    /// working directory in the mount, and every process descended from one of them (never
    /// the test process or its ancestors), all stopped first as one tree, and waits up
    /// to `timeout` for them to end (zombies count as ended: their files are closed). Returns
    /// the processes killed; an error names those that outlived the deadline.
    pub fn kill_callers(&self, timeout: Duration) -> io::Result<Vec<Caller>> {
        let mut targets: Vec<Caller> = self.callers().into_iter().filter(Caller::alive).collect();
        for pid in procs::mount_users(&self.mountpoint) {
            if targets.iter().any(|c| c.pid == pid) {
                continue;
            }
            if let Some(st) = procs::stat(pid) {
                if !procs::is_kernel_thread(pid, &st) {
                    targets.push(Caller {
                        pid,
                        comm: st.comm,
                        cmdline: String::new(),
                        starttime: st.starttime,
                    });
                }
            }
        }
        let pairs: Vec<(u32, u64)> = targets.iter().map(|c| (c.pid, c.starttime)).collect();
        // Stopped as one tree first: what they forked in the meantime dies with them.
        let pairs = procs::freeze_tree(&pairs);
        for &(pid, starttime) in &pairs {
            if !targets.iter().any(|c| c.pid == pid) {
                targets.push(Caller {
                    pid,
                    comm: procs::stat(pid).map(|s| s.comm).unwrap_or_default(),
                    cmdline: String::new(),
                    starttime,
                });
            }
        }
        let left = procs::kill_and_wait(&pairs, timeout);
        if !left.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("still running {timeout:?} after SIGKILL: {left:?}"),
            ));
        }
        Ok(targets)
    }

    /// Adds a write-error rule (see [`FailRule`]).
    pub fn fail_write(&self, rule: FailRule) {
        self.shared
            .lock()
            .fail_rules
            .push(ActiveRule { rule, matched: 0 });
    }

    /// Removes every write-error rule.
    pub fn clear_fail_rules(&self) {
        self.shared.lock().fail_rules.clear();
    }

    /// How many requests each rule (in the order added) has matched so far, failed or not: a
    /// rule whose `nth` is never reached counts an operation's writes (a dry run), so that a
    /// test can then fail each one in turn.
    pub fn rule_matches(&self) -> Vec<u64> {
        self.shared
            .lock()
            .fail_rules
            .iter()
            .map(|r| r.matched)
            .collect()
    }

    /// The errors the rules injected so far.
    pub fn injected_failures(&self) -> Vec<InjectedFailure> {
        self.shared.lock().injected.clone()
    }

    /// The power loss and the reboot: cuts the power (if no cut came yet), unmounts (lazily
    /// when a process still holds files there: those get errors from now on), throws away
    /// what was not durable (see the module docs) and mounts the survivors again at the same
    /// path, with fresh bookkeeping: everything there is durable, and no events, counter,
    /// cut, rules or callers are left. Kill the callers first ([`PowerCutFs::kill_callers`]).
    pub fn power_cycle(&mut self) -> io::Result<CutReport> {
        self.cut_now();
        if let Some(running) = self.running.take() {
            self.shared.lock().generation += 1;
            stop(running, &self.mountpoint, self.options.timeout)?;
        }
        let (report, generation) = {
            let mut st = self.shared.lock();
            let report = st.model.crash()?;
            st.reset();
            (report, st.generation)
        };
        self.running = Some(start(
            &self.shared,
            &self.mountpoint,
            generation,
            &self.options,
        )?);
        Ok(report)
    }

    /// Unmounts now (lazily when busy), with errors; dropping does the same silently.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        {
            let mut st = self.shared.lock();
            st.cut.get_or_insert(Cut::Manual);
            st.generation += 1;
        }
        self.shared.cut_cv.notify_all();
        stop(running, &self.mountpoint, self.options.timeout)
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!(
                "powercut: unmounting {} failed: {e}",
                self.mountpoint.display()
            );
        }
    }
}

/// Mounts a session of generation `generation` and serves it on its own thread.
fn start(
    shared: &Arc<Shared>,
    mountpoint: &Path,
    generation: u64,
    options: &Options,
) -> io::Result<Running> {
    let fs = PowerCutFuse::new(shared.clone(), generation);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("powercut".into()),
        fuser::MountOption::Subtype("powercut".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
    ];
    // allow_other: QEMU or a helper may run as another user.
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(options.threads.max(1));
    let (tx, rx) = mpsc::channel();
    let mp = mountpoint.to_owned();
    let thread = std::thread::Builder::new()
        .name("powercut-fuse".into())
        .spawn(move || {
            // mount(2) and the INIT handshake happen here, so a kernel that never answers
            // cannot hang the test: the caller waits with a deadline.
            let mut session = match fuser::Session::new(fs, &mp, &config) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = tx.send(Ok(session.unmount_callable()));
            session.run()
        })?;
    match rx.recv_timeout(options.timeout) {
        Ok(Ok(unmounter)) => Ok(Running {
            thread,
            unmounter,
            conn: connection(mountpoint),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(io::Error::new(
                e.kind(),
                format!("mounting FUSE on {}: {e}", mountpoint.display()),
            ))
        }
        Err(_) => {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "mounting FUSE on {} took over {:?}",
                    mountpoint.display(),
                    options.timeout
                ),
            ))
        }
    }
}

/// Unmounts (when busy: forced, which aborts the FUSE connection, and lazily) and waits for the
/// session's threads, aborting the connection through fusectl if they outlive a grace period.
fn stop(running: Running, mountpoint: &Path, timeout: Duration) -> io::Result<()> {
    let Running {
        thread,
        mut unmounter,
        conn,
    } = running;
    let deadline = Instant::now() + timeout;
    if let Err(e) = unmounter.unmount() {
        // Busy (a process still holds a file there: EBUSY) or any other failure: detach it
        // lazily, so no mount is left behind whatever happens next. MNT_FORCE makes FUSE
        // abort the connection first: the holders get errors, the session's reads end.
        if connection(mountpoint).is_some() {
            let flags = nix::mount::MntFlags::MNT_FORCE | nix::mount::MntFlags::MNT_DETACH;
            nix::mount::umount2(mountpoint, flags).map_err(|d| {
                io::Error::other(format!(
                    "unmounting {}: {e}; detaching it: {d}",
                    mountpoint.display()
                ))
            })?;
        }
    }
    // Both a clean unmount and a forced one end the session by themselves; aborting the
    // connection through fusectl is the fallback for a kernel that did not.
    let grace = Instant::now() + (timeout / 4).min(Duration::from_secs(2));
    while !thread.is_finished() && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(2));
    }
    if !thread.is_finished() {
        if let Some(conn) = &conn {
            abort_connection(conn);
        }
    }
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !thread.is_finished() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the FUSE session of {} did not end within {timeout:?} of its unmount",
                mountpoint.display()
            ),
        ));
    }
    // An aborted connection ends the session with ECONNABORTED: that is the expected end.
    let _ = thread.join();
    Ok(())
}

/// The FUSE connection's name in fusectl (the mount's device number, as the kernel prints
/// it), from /proc/self/mountinfo: no request to the filesystem needed. `None` when nothing is
/// mounted there.
fn connection(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dev = f.get(2)?;
            let point = f.get(4)?.replace("\\040", " ");
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            (point == want && fstype.starts_with("fuse")).then_some(*dev)
        })
        .next_back()
        .and_then(|dev| {
            let (major, minor) = dev.split_once(':')?;
            let (major, minor): (u64, u64) = (major.parse().ok()?, minor.parse().ok()?);
            Some(((major << 20) | minor).to_string())
        })
}

/// Aborts FUSE connection `conn` (every request fails, the server's reads end), mounting
/// fusectl first when nothing has.
fn abort_connection(conn: &str) {
    let base = Path::new("/sys/fs/fuse/connections");
    if !base.join(conn).exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            base,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let _ = std::fs::write(base.join(conn).join("abort"), b"1");
}
