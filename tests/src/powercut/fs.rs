//! The FUSE glue of the power-cut filesystem: turns each kernel request into a call on the
//! [`Model`], counts the durability boundaries, freezes everything after the armed cut,
//! injects write errors and notes who called.
//!
//! It must never apply a mutating request once the power is cut (those fail with `EIO`), never
//! touch the state of a newer mount (a request of an older session generation fails with `EIO`
//! without looking at anything), and never block a request: all locking (flock, POSIX and OFD
//! byte ranges) stays in the kernel, because the filesystem does not ask for
//! `FUSE_POSIX_LOCKS`/`FUSE_FLOCK_LOCKS`.

use super::model::{Attr, Ino, Kind, Model, NewNode, RenameMode, SetMeta};
use super::procs;
use super::{BoundaryEvent, Caller, EventFilter, EventKind, FailRule, InjectedFailure};
use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Whence;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How long the kernel may cache entries and attributes. Every change goes through this
/// mount, so the kernel's caches stay right; a remount starts with empty ones.
const TTL: Duration = Duration::from_secs(1);

/// Largest write request. The kernel caps requests at `fs.fuse.max_pages_limit` pages (256 by
/// default: 1 MiB), so asking for more gains nothing.
pub(crate) const MAX_WRITE: u32 = 1 << 20;

/// Why the power is off.
#[derive(Clone, Debug)]
pub(crate) enum Cut {
    /// `cut_now`, `power_cycle` or drop.
    Manual,
    /// Right after this counted boundary.
    After(BoundaryEvent),
}

/// The boundary counter started by `arm_cut` / `count_events`.
pub(crate) struct Counting {
    pub filter: EventFilter,
    pub counted: u64,
    pub cut_at: Option<u64>,
}

pub(crate) struct ActiveRule {
    pub rule: FailRule,
    pub matched: u64,
}

enum Handle {
    File(Ino),
    Dir(Ino, Vec<(OsString, Ino, Kind)>),
}

/// Everything behind the one lock: the model and the bookkeeping of the current mount.
pub(crate) struct State {
    pub model: Model,
    /// Bumped at every unmount: requests of an older session are refused.
    pub generation: u64,
    pub cut: Option<Cut>,
    pub events: Vec<BoundaryEvent>,
    pub counting: Option<Counting>,
    pub fail_rules: Vec<ActiveRule>,
    pub injected: Vec<InjectedFailure>,
    pub callers: BTreeMap<u32, Caller>,
    /// Thread id → process id (0: unknown, or a kernel thread).
    tids: HashMap<u32, u32>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    me: u32,
}

impl State {
    pub fn new(model: Model) -> State {
        State {
            model,
            generation: 1,
            cut: None,
            events: Vec::new(),
            counting: None,
            fail_rules: Vec::new(),
            injected: Vec::new(),
            callers: BTreeMap::new(),
            tids: HashMap::new(),
            handles: HashMap::new(),
            next_fh: 1,
            me: std::process::id(),
        }
    }

    /// Fresh bookkeeping for a new mount (after a power cycle): no events, no counter, no
    /// cut, no rules, no callers, no handles.
    pub fn reset(&mut self) {
        self.cut = None;
        self.events.clear();
        self.counting = None;
        self.fail_rules.clear();
        self.injected.clear();
        self.callers.clear();
        self.tids.clear();
        self.handles.clear();
    }

    /// The process of thread `tid`, noting it as a caller the first time (not the test
    /// process, not kernel threads).
    fn note(&mut self, tid: u32) -> u32 {
        if tid == 0 {
            return 0;
        }
        if let Some(&pid) = self.tids.get(&tid) {
            return pid;
        }
        let pid = procs::tgid(tid).unwrap_or(0);
        let st = if pid == 0 { None } else { procs::stat(pid) };
        let pid = match &st {
            Some(s) if procs::is_kernel_thread(pid, s) => 0,
            Some(_) => pid,
            None => 0,
        };
        self.tids.insert(tid, pid);
        if let (Some(s), true) = (st, pid != 0 && pid != self.me) {
            // Not the command line: reading it takes the caller's mmap lock, which a thread of
            // the caller may hold while it waits for this very filesystem (a page fault on a
            // mapped file), and this runs under the state lock. `callers()` reads it later.
            self.callers.entry(pid).or_insert_with(|| Caller {
                pid,
                comm: s.comm,
                cmdline: String::new(),
                starttime: s.starttime,
            });
        }
        pid
    }

    fn writable(&self) -> Result<(), Errno> {
        match self.cut {
            Some(_) => Err(Errno::EIO),
            None => Ok(()),
        }
    }

    /// Records a boundary; returns true when it is the armed one (the power is now off).
    fn boundary(
        &mut self,
        kind: EventKind,
        path: PathBuf,
        from: Option<PathBuf>,
        tid: u32,
    ) -> bool {
        let pid = self.note(tid);
        let (comm, ancestors) = if pid == 0 {
            (String::new(), Vec::new())
        } else {
            (
                procs::stat(pid).map(|s| s.comm).unwrap_or_default(),
                procs::ancestors(pid),
            )
        };
        let mut ev = BoundaryEvent {
            seq: self.events.len() as u64 + 1,
            number: None,
            kind,
            path,
            from,
            pid,
            tid,
            comm,
            ancestors,
        };
        let mut cut = false;
        if let Some(c) = &mut self.counting {
            if c.filter.matches(&ev) {
                c.counted += 1;
                ev.number = Some(c.counted);
                cut = c.cut_at == Some(c.counted) && self.cut.is_none();
            }
        }
        if cut {
            self.cut = Some(Cut::After(ev.clone()));
        }
        self.events.push(ev);
        cut
    }

    /// The error a rule injects into this write (or fsync), if any.
    fn injected_error(&mut self, ino: Ino, sync: bool, tid: u32) -> Option<Errno> {
        if self.fail_rules.is_empty() {
            return None;
        }
        let path = self.model.path(ino);
        let mut hit = None;
        for r in &mut self.fail_rules {
            if (sync && !r.rule.syncs_too) || !r.rule.matches(&path) {
                continue;
            }
            r.matched += 1;
            let fire = r.matched == r.rule.nth || (r.rule.from_then_on && r.matched > r.rule.nth);
            if fire && hit.is_none() {
                hit = Some(r.rule.errno);
            }
        }
        if let Some(errno) = hit {
            let pid = self.note(tid);
            self.injected.push(InjectedFailure {
                path,
                op: if sync { "fsync" } else { "write" },
                errno,
                pid,
            });
        }
        hit
    }
}

/// The lock and the condition variable `wait_cut` sleeps on.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub cut_cv: Condvar,
}

impl Shared {
    pub fn new(model: Model) -> Shared {
        Shared {
            state: Mutex::new(State::new(model)),
            cut_cv: Condvar::new(),
        }
    }

    /// The state. A request that panicked while holding the lock does not wedge the test.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One mount's view: a request of another generation is refused.
pub(crate) struct PowerCutFuse {
    shared: Arc<Shared>,
    generation: u64,
}

impl PowerCutFuse {
    pub fn new(shared: Arc<Shared>, generation: u64) -> Self {
        PowerCutFuse { shared, generation }
    }

    fn begin(&self, req: &Request) -> Result<MutexGuard<'_, State>, Errno> {
        let mut st = self.shared.lock();
        if st.generation != self.generation {
            return Err(Errno::EIO);
        }
        st.note(req.pid());
        Ok(st)
    }

    /// Records a boundary and wakes `wait_cut` when it cut the power.
    fn boundary(
        &self,
        st: &mut State,
        kind: EventKind,
        path: PathBuf,
        from: Option<PathBuf>,
        req: &Request,
    ) {
        if st.boundary(kind, path, from, req.pid()) {
            self.shared.cut_cv.notify_all();
        }
    }

    /// create / mknod / mkdir / symlink: a new node and its boundary; `open` also opens a
    /// handle on it under the same lock (create), so nothing can unlink it in between.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new: NewNode,
        kind: EventKind,
        open: bool,
    ) -> Result<(Attr, u64), Errno> {
        let mut st = self.begin(req)?;
        st.writable()?;
        let ino = st.model.create(parent.0, name, new)?;
        let path = st.model.path(ino);
        self.boundary(&mut st, kind, path, None, req);
        let mut fh = 0;
        if open {
            st.model.open_handle(ino)?;
            fh = st.next_fh;
            st.next_fh += 1;
            st.handles.insert(fh, Handle::File(ino));
        }
        Ok((st.model.attr(ino)?, fh))
    }
}

fn fe(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e as i32)
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Socket => FileType::Socket,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.meta.atime,
        mtime: a.meta.mtime,
        ctime: a.meta.ctime,
        crtime: a.meta.ctime,
        kind: file_type(a.kind),
        perm: u16::try_from(a.meta.perm & 0o7777).unwrap_or(0),
        nlink: a.nlink,
        uid: a.meta.uid,
        gid: a.meta.gid,
        rdev: a.meta.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn node(kind: Kind, mode: u32, req: &Request) -> NewNode {
    let mut new = NewNode::new(kind, mode);
    new.uid = req.uid();
    new.gid = req.gid();
    new
}

fn entry(reply: ReplyEntry, r: Result<Attr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(fe(e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fe(e)),
    }
}

impl Filesystem for PowerCutFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large sequential writes (RAM images) go in 1 MiB requests, not 128 KiB ones.
        let _ = config.set_max_write(MAX_WRITE);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.begin(req).and_then(|st| {
            let ino = st.model.lookup(parent.0, name)?;
            st.model.attr(ino)
        });
        entry(reply, r);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.begin(req).and_then(|st| st.model.attr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            if let Some(size) = size {
                st.model.truncate(ino.0, size)?;
            }
            let set = SetMeta {
                perm: mode,
                uid,
                gid,
                atime: atime.map(time),
                mtime: mtime.map(time),
            };
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                st.model.set_meta(ino.0, &set)?;
            }
            st.model.attr(ino.0)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.begin(req).and_then(|st| st.model.readlink(ino.0)) {
            Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => return reply.error(fe(Errno::EINVAL)),
        };
        let mut new = node(kind, mode, req);
        new.rdev = rdev;
        entry(
            reply,
            self.make(req, parent, name, new, EventKind::Mknod, false)
                .map(|(a, _)| a),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let new = node(Kind::Dir, mode, req);
        entry(
            reply,
            self.make(req, parent, name, new, EventKind::Mkdir, false)
                .map(|(a, _)| a),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            let path = st.model.child_path(parent.0, name);
            st.model.unlink(parent.0, name)?;
            self.boundary(&mut st, EventKind::Unlink, path, None, req);
            Ok(())
        });
        empty(reply, r);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            let path = st.model.child_path(parent.0, name);
            st.model.rmdir(parent.0, name)?;
            self.boundary(&mut st, EventKind::Rmdir, path, None, req);
            Ok(())
        });
        empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut new = node(Kind::Symlink, 0o777, req);
        new.target = Some(target.to_owned());
        entry(
            reply,
            self.make(req, parent, link_name, new, EventKind::Symlink, false)
                .map(|(a, _)| a),
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            return reply.error(fe(Errno::EINVAL));
        };
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            let from = st.model.child_path(parent.0, name);
            st.model
                .rename(parent.0, name, newparent.0, newname, mode)?;
            let to = st.model.child_path(newparent.0, newname);
            self.boundary(&mut st, EventKind::Rename, to, Some(from), req);
            Ok(())
        });
        empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            let from = st.model.path(ino.0);
            st.model.link(ino.0, newparent.0, newname)?;
            let to = st.model.child_path(newparent.0, newname);
            self.boundary(&mut st, EventKind::Link, to, Some(from), req);
            st.model.attr(ino.0)
        });
        entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // O_DIRECT is the kernel's business (it has direct_IO for FUSE files); the backing file
        // is always opened buffered. No FOPEN_DIRECT_IO: shared writable mmap needs the page
        // cache.
        let r = self.begin(req).and_then(|mut st| {
            st.model.open_handle(ino.0)?;
            let fh = st.next_fh;
            st.next_fh += 1;
            st.handles.insert(fh, Handle::File(ino.0));
            Ok(fh)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Reads go on after a cut (they see the live state, as the page cache would), so a
        // process that is about to be killed is not disturbed by errors it would not see on
        // a real host.
        match self
            .begin(req)
            .and_then(|mut st| st.model.read(ino.0, offset, size))
        {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            if let Some(e) = st.injected_error(ino.0, false, req.pid()) {
                return Err(e);
            }
            st.model.write(ino.0, offset, data)?;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Handles of an older generation belong to a state that is gone: nothing to release.
        let mut st = self.shared.lock();
        if st.generation == self.generation {
            if let Some(Handle::File(ino) | Handle::Dir(ino, _)) = st.handles.remove(&fh.0) {
                st.model.close_handle(ino);
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            if let Some(e) = st.injected_error(ino.0, true, req.pid()) {
                return Err(e);
            }
            st.model.fsync(ino.0)?;
            let kind = if datasync {
                EventKind::Fdatasync
            } else {
                EventKind::Fsync
            };
            let path = st.model.path(ino.0);
            self.boundary(&mut st, kind, path, None, req);
            Ok(())
        });
        empty(reply, r);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is taken at opendir, so readdir offsets stay valid while entries change.
        let r = self.begin(req).and_then(|mut st| {
            let list = st.model.entries(ino.0)?;
            st.model.open_handle(ino.0)?;
            let fh = st.next_fh;
            st.next_fh += 1;
            st.handles.insert(fh, Handle::Dir(ino.0, list));
            Ok(fh)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = match self.begin(req) {
            Ok(st) => st,
            Err(e) => return reply.error(fe(e)),
        };
        let Some(Handle::Dir(_, list)) = st.handles.get(&fh.0) else {
            return reply.error(fe(Errno::EBADF));
        };
        let parent = st.model.parent(ino.0);
        let dots = [
            (OsString::from("."), ino.0, Kind::Dir),
            (OsString::from(".."), parent, Kind::Dir),
        ];
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (name, child, kind)) in dots.iter().chain(list.iter()).enumerate().skip(start) {
            if reply.add(INodeNo(*child), i as u64 + 1, file_type(*kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.release(req, ino, fh, flags, None, false, reply);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            st.model.fsync_dir(ino.0)?;
            let path = st.model.path(ino.0);
            self.boundary(&mut st, EventKind::FsyncDir, path, None, req);
            Ok(())
        });
        empty(reply, r);
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let dir = match self.begin(req) {
            Ok(st) => st.model.backing().to_owned(),
            Err(e) => return reply.error(fe(e)),
        };
        match nix::sys::statvfs::statvfs(&dir) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                u32::try_from(s.block_size()).unwrap_or(4096),
                u32::try_from(s.name_max()).unwrap_or(255),
                u32::try_from(s.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The mount uses default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let new = node(Kind::File, mode, req);
        let r = self.make(req, parent, name, new, EventKind::Create, true);
        match r {
            Ok((a, fh)) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(fe(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.begin(req).and_then(|mut st| {
            st.writable()?;
            st.model.fallocate(ino.0, offset, length, mode)
        });
        empty(reply, r);
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let whence = match whence {
            libc::SEEK_DATA => Whence::SeekData,
            libc::SEEK_HOLE => Whence::SeekHole,
            libc::SEEK_SET => Whence::SeekSet,
            libc::SEEK_END => Whence::SeekEnd,
            _ => return reply.error(fe(Errno::EINVAL)),
        };
        match self
            .begin(req)
            .and_then(|mut st| st.model.seek(ino.0, offset, whence))
        {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(fe(e)),
        }
    }

    // Not supported, answered without fuser's "not implemented" log line: ENOSYS makes the
    // kernel stop asking (xattrs: it then answers EOPNOTSUPP itself, without a request per
    // write for security.capability).
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(fuser::Errno::ENOTTY);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The kernel falls back to reads and writes, which the model sees one by one.
        reply.error(fuser::Errno::ENOSYS);
    }
}
