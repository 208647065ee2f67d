//! The durable-state model of the power-cut filesystem: what a host power loss would keep.
//!
//! It knows nothing of FUSE: the filesystem layer (`fs.rs`) turns requests into calls here, and
//! the unit tests below call it directly. The model holds the namespace (per directory the
//! *live* entries and the *durable* ones, as of the directory's last `fsync`) and the
//! inodes' metadata in memory; file contents live in one backing file per inode
//! (`<backing>/objects/<ino>`), which always holds the *live* bytes. What the last `fsync`
//! made durable is kept as an undo log (`<backing>/undo/<ino>`): the durable size, plus the
//! old bytes of every block below it that was changed since (holes are saved as holes), or,
//! after a truncation to less than a block (`O_TRUNC`), the whole old object moved aside
//! (`<backing>/undo/<ino>.base`), so that costs nothing. [`Model::crash`] applies the
//! power loss: it rolls each surviving file back through its undo log and truncates it to its
//! durable size, rebuilds every directory from its durable entries, and drops every inode that
//! no durable entry reaches.
//!
//! It must never make durable what a real filesystem may lose: nothing but an `fsync` of a
//! file makes its data, size or metadata durable, and nothing but an `fsync` of a directory
//! makes that directory's entries durable. It must not do work in proportion to a file's size
//! on a write (only in proportion to the bytes written), and it never calls into FUSE.

use nix::errno::Errno;
use nix::unistd::Whence;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// An inode number, also the FUSE node id (stable for the inode's life, across power cycles).
pub type Ino = u64;

/// The root directory's inode number.
pub const ROOT: Ino = 1;

/// Copies and undo saves go in chunks of this size, so a large save never holds a large buffer.
const CHUNK: usize = 1 << 20;

/// What kind of node an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A regular file (with a backing object file).
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A unix socket node (`mknod(S_IFSOCK)`, as `bind` makes): no data, nobody listens after a
    /// power cycle.
    Socket,
    /// A named pipe.
    Fifo,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
}

/// An inode's metadata as `stat` shows it (besides size, which files keep with their data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (`0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u32,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Status change time.
    pub ctime: SystemTime,
}

/// What `getattr` answers.
#[derive(Clone, Debug)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Kind.
    pub kind: Kind,
    /// Live size in bytes.
    pub size: u64,
    /// 512-byte blocks the backing file allocates (holes do not count).
    pub blocks: u64,
    /// Live links.
    pub nlink: u32,
    /// Live metadata.
    pub meta: Meta,
}

/// A node to create.
#[derive(Clone, Debug)]
pub struct NewNode {
    /// Kind.
    pub kind: Kind,
    /// Permission bits.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (device nodes only).
    pub rdev: u32,
    /// Target (symlinks only).
    pub target: Option<PathBuf>,
}

impl NewNode {
    /// A node of `kind` with permissions `perm`, owned by root, no device number.
    pub fn new(kind: Kind, perm: u32) -> Self {
        NewNode {
            kind,
            perm,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        }
    }
}

/// How a rename treats an existing target (`renameat2` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// Plain `rename`: replace the target.
    Replace,
    /// `RENAME_NOREPLACE`: fail with `EEXIST` when the target exists.
    NoReplace,
    /// `RENAME_EXCHANGE`: swap the two names.
    Exchange,
}

/// Metadata changes of a `setattr` (each `None` leaves that field alone).
#[derive(Clone, Debug, Default)]
pub struct SetMeta {
    /// New permission bits.
    pub perm: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New access time.
    pub atime: Option<SystemTime>,
    /// New modification time.
    pub mtime: Option<SystemTime>,
}

/// Where the durable contents of a saved range are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The durable range was a hole: restored by punching one, so sparse files stay sparse.
    Hole,
    /// In the undo file at this offset.
    Undo(u64),
    /// In the base file (the whole old object, moved aside by a truncation to almost
    /// nothing), at the same offset.
    Base,
}

/// One saved range of a file's durable contents.
#[derive(Clone, Copy, Debug)]
struct Saved {
    len: u64,
    src: Source,
}

/// The durable contents of a file below its durable size that the live file no longer has.
#[derive(Debug, Default)]
struct Undo {
    /// Disjoint ranges by start offset. The first save of a byte wins: that is the durable one.
    ranges: BTreeMap<u64, Saved>,
    file: Option<File>,
    /// Append position in `file`.
    len: u64,
    /// Whether `<undo>.base` holds the object as it was before a truncation to (almost)
    /// nothing: moving it aside costs nothing where copying it out would cost its size.
    base: bool,
}

impl Undo {
    /// The parts of `[start, end)` that no saved range covers yet.
    fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut pos = start;
        if let Some((&s, r)) = self.ranges.range(..start).next_back() {
            pos = pos.max(s + r.len);
        }
        for (&s, r) in self.ranges.range(start..end) {
            if s > pos {
                gaps.push((pos, s));
            }
            pos = pos.max(s + r.len);
        }
        if pos < end {
            gaps.push((pos, end));
        }
        gaps
    }

    fn bytes(&self) -> u64 {
        self.ranges.values().map(|r| r.len).sum()
    }
}

#[derive(Debug)]
struct FileData {
    /// The backing object (live bytes), opened read-write.
    file: File,
    /// Live size (kept here so no request needs an `fstat`).
    size: u64,
    /// Size as of the last `fsync`.
    durable_size: u64,
    undo: Undo,
    /// The last write since the last `fsync` (offset, length): what a torn write tears.
    last_write: Option<(u64, u64)>,
    /// Whether the contents changed since the last `fsync`.
    dirty: bool,
}

#[derive(Debug, Default)]
struct DirData {
    live: BTreeMap<OsString, Ino>,
    /// The entries as of this directory's last `fsync`.
    durable: BTreeMap<OsString, Ino>,
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Dir(DirData),
    Symlink(PathBuf),
    /// Sockets, fifos, device nodes: metadata only.
    Special,
    /// A node nothing can reach any more (no live entry, no durable entry, not open): its data
    /// is deleted, the record stays for a kernel that still asks about it.
    Gone,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    live: Meta,
    /// Metadata as of the last `fsync` (or creation).
    durable: Meta,
    /// Live entries naming this node: (directory, name).
    links: BTreeSet<(Ino, OsString)>,
    /// The last entry that named it, for the paths of unlinked nodes in reports.
    last_link: Option<(Ino, OsString)>,
    /// How many durable directory maps name this node.
    durable_refs: u32,
    /// Open handles (FUSE open/opendir not yet released).
    open: u32,
    body: Body,
}

/// One file whose contents or metadata a power cycle took back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollback {
    /// Path after the power cycle (relative to the mount root).
    pub path: PathBuf,
    /// Size before the power cycle.
    pub live_size: u64,
    /// Size after it (the size of the last `fsync`).
    pub durable_size: u64,
    /// Bytes below the durable size put back from the undo log (whole backing blocks around
    /// what changed, clamped to the durable size).
    pub bytes_restored: u64,
    /// The torn prefix of the last write that was kept (offset, length), with torn writes on.
    pub torn: Option<(u64, u64)>,
    /// Whether only metadata (mode, owner, times) went back, not contents.
    pub meta_only: bool,
}

/// What a power cycle discarded; `Display` prints it for a failing test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Paths that existed before the power cut and do not after it.
    pub vanished: Vec<PathBuf>,
    /// Paths that did not exist before and do after (undone unlinks and renames).
    pub reappeared: Vec<PathBuf>,
    /// Paths that name another inode than before (an undone rename over them).
    pub replaced: Vec<PathBuf>,
    /// Surviving files whose contents or metadata went back to their last `fsync`.
    pub rolled_back: Vec<Rollback>,
    /// Live bytes the power cut threw away: restored or cut-off bytes of surviving files and the
    /// live size of vanished files.
    pub discarded_bytes: u64,
}

impl CutReport {
    /// True when the power cut lost nothing (everything was durable).
    pub fn is_empty(&self) -> bool {
        self.vanished.is_empty()
            && self.reappeared.is_empty()
            && self.replaced.is_empty()
            && self.rolled_back.is_empty()
    }
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "power cut: nothing lost (everything was durable)");
        }
        writeln!(f, "power cut: {} bytes discarded", self.discarded_bytes)?;
        for p in &self.vanished {
            writeln!(f, "  vanished:    {}", p.display())?;
        }
        for p in &self.reappeared {
            writeln!(f, "  reappeared:  {}", p.display())?;
        }
        for p in &self.replaced {
            writeln!(
                f,
                "  replaced:    {} (names its durable inode again)",
                p.display()
            )?;
        }
        for r in &self.rolled_back {
            if r.meta_only {
                writeln!(f, "  metadata back: {}", r.path.display())?;
                continue;
            }
            write!(
                f,
                "  rolled back: {} size {} -> {}, {} bytes restored",
                r.path.display(),
                r.live_size,
                r.durable_size,
                r.bytes_restored
            )?;
            if let Some((off, len)) = r.torn {
                write!(f, ", torn write kept {len} bytes at {off}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32))
}

fn off(v: u64) -> Result<i64, Errno> {
    i64::try_from(v).map_err(|_| Errno::EFBIG)
}

/// Splits `[start, end)` of `file` into (start, end, is_data) segments by `SEEK_DATA` and
/// `SEEK_HOLE`. A filesystem without them reports one data segment.
fn segments(file: &File, start: u64, end: u64) -> Result<Vec<(u64, u64, bool)>, Errno> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match nix::unistd::lseek(fd, off(pos)?, Whence::SeekData) {
            Ok(d) => u64::try_from(d).unwrap_or(end).min(end),
            // No data after pos: the rest is a hole (or lies past the end of file).
            Err(Errno::ENXIO) => end,
            Err(Errno::EINVAL) => {
                out.push((pos, end, true));
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push((pos, data, false));
        }
        if data >= end {
            break;
        }
        let hole = match nix::unistd::lseek(fd, off(data)?, Whence::SeekHole) {
            Ok(h) => u64::try_from(h).unwrap_or(end).min(end),
            Err(Errno::ENXIO) => end,
            Err(e) => return Err(e),
        };
        let hole = hole.max(data + 1).min(end);
        out.push((data, hole, true));
        pos = hole;
    }
    Ok(out)
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to`, in chunks.
fn copy_range(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(buf.len(), |r| r.min(buf.len()));
        src.read_exact_at(&mut buf[..n], from + done)?;
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

fn punch_hole(file: &File, start: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let (s, l) = (
        i64::try_from(start).map_err(io::Error::other)?,
        i64::try_from(len).map_err(io::Error::other)?,
    );
    if fallocate(file.as_raw_fd(), flags, s, l).is_ok() {
        return Ok(());
    }
    // A backing filesystem that cannot punch gets zeros: same contents, no hole.
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |r| r.min(CHUNK));
        file.write_all_at(&zeros[..n], start + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The namespace, the inodes and their durable states. See the module docs.
#[derive(Debug)]
pub struct Model {
    dir: PathBuf,
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    tear: bool,
    /// The backing filesystem's block size: the unit of its holes.
    block: u64,
}

impl Model {
    /// A fresh, empty filesystem whose file contents live under `backing` (created if
    /// missing; its `objects/` and `undo/` must not hold anything yet). With `tear`, a power
    /// cut keeps a prefix of each surviving file's last unsynced write (a torn write).
    pub fn new(backing: &Path, tear: bool) -> io::Result<Model> {
        for sub in ["objects", "undo"] {
            let d = backing.join(sub);
            std::fs::create_dir_all(&d)?;
            if std::fs::read_dir(&d)?.next().is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} is not empty: give the power-cut filesystem a fresh backing directory",
                        d.display()
                    ),
                ));
            }
        }
        let now = SystemTime::now();
        let meta = Meta {
            perm: 0o755,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
        };
        let root = Node {
            kind: Kind::Dir,
            live: meta.clone(),
            durable: meta,
            links: BTreeSet::new(),
            last_link: None,
            durable_refs: 0,
            open: 0,
            body: Body::Dir(DirData::default()),
        };
        let block = std::fs::metadata(backing)?.blksize().clamp(512, 1 << 20);
        Ok(Model {
            dir: backing.to_owned(),
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            tear,
            block,
        })
    }

    /// The backing directory.
    pub fn backing(&self) -> &Path {
        &self.dir
    }

    fn object_path(&self, ino: Ino) -> PathBuf {
        self.dir.join("objects").join(ino.to_string())
    }

    fn undo_path(&self, ino: Ino) -> PathBuf {
        self.dir.join("undo").join(ino.to_string())
    }

    fn base_path(&self, ino: Ino) -> PathBuf {
        self.dir.join("undo").join(format!("{ino}.base"))
    }

    /// Deletes the backing files of `ino` (object, undo log, base).
    fn remove_files(&self, ino: Ino) -> io::Result<()> {
        match std::fs::remove_file(self.object_path(ino)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let _ = std::fs::remove_file(self.undo_path(ino));
        let _ = std::fs::remove_file(self.base_path(ino));
        Ok(())
    }

    fn node(&self, ino: Ino) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: Ino) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: Ino) -> Result<&DirData, Errno> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::Gone => Err(Errno::ENOENT),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut DirData, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::Gone => Err(Errno::ENOENT),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> Result<&mut FileData, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
            Body::Gone => Err(Errno::ENOENT),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The live entry `name` of directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, Errno> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// The live attributes of `ino`.
    pub fn attr(&self, ino: Ino) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let (size, blocks) = match &node.body {
            Body::File(f) => (f.size, f.file.metadata().map(|m| m.blocks()).unwrap_or(0)),
            Body::Dir(_) => (4096, 8),
            Body::Symlink(t) => (t.as_os_str().len() as u64, 0),
            Body::Special | Body::Gone => (0, 0),
        };
        let links = u32::try_from(node.links.len()).unwrap_or(u32::MAX);
        let nlink = match &node.body {
            Body::Dir(d) if ino == ROOT || links > 0 => {
                let subdirs = d
                    .live
                    .values()
                    .filter(|c| self.nodes.get(c).is_some_and(|n| n.kind == Kind::Dir))
                    .count();
                2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2)
            }
            _ => links,
        };
        Ok(Attr {
            ino,
            kind: node.kind,
            size,
            blocks,
            nlink,
            meta: node.live.clone(),
        })
    }

    /// The live entries of directory `ino`, by name.
    pub fn entries(&self, ino: Ino) -> Result<Vec<(OsString, Ino, Kind)>, Errno> {
        Ok(self
            .dir(ino)?
            .live
            .iter()
            .filter_map(|(name, c)| self.nodes.get(c).map(|n| (name.clone(), *c, n.kind)))
            .collect())
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: Ino) -> Result<PathBuf, Errno> {
        match &self.node(ino)?.body {
            Body::Symlink(t) => Ok(t.clone()),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The path of `ino` relative to the root, through its first live entry (or its last one
    /// when it has none left).
    pub fn path(&self, ino: Ino) -> PathBuf {
        let mut parts = Vec::new();
        let mut cur = ino;
        // The live namespace is a tree; the bound only guards against a bug looping forever.
        for _ in 0..4096 {
            if cur == ROOT {
                break;
            }
            let Some(node) = self.nodes.get(&cur) else {
                break;
            };
            let Some((parent, name)) = node.links.iter().next().or(node.last_link.as_ref()) else {
                break;
            };
            parts.push(name.clone());
            cur = *parent;
        }
        parts.iter().rev().collect()
    }

    /// The directory holding `ino`'s first live entry (the root for the root and for nodes
    /// without one).
    pub fn parent(&self, ino: Ino) -> Ino {
        self.nodes
            .get(&ino)
            .and_then(|n| n.links.iter().next())
            .map_or(ROOT, |(p, _)| *p)
    }

    /// The path `name` in directory `parent` would have.
    pub fn child_path(&self, parent: Ino, name: &OsStr) -> PathBuf {
        self.path(parent).join(name)
    }

    fn touch_dir(&mut self, ino: Ino, now: SystemTime) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.live.mtime = now;
            n.live.ctime = now;
        }
    }

    fn add_link(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links.insert((parent, name.to_owned()));
            n.last_link = Some((parent, name.to_owned()));
        }
    }

    fn remove_link(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links.remove(&(parent, name.to_owned()));
        }
    }

    /// Creates `name` in `parent` (create, mknod, mkdir, symlink). Live only: the entry is
    /// durable after the next [`Model::fsync_dir`] of `parent`; the new node's own metadata
    /// and (empty) contents are durable from the start.
    pub fn create(&mut self, parent: Ino, name: &OsStr, new: NewNode) -> Result<Ino, Errno> {
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        let body = match new.kind {
            Kind::File => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(self.object_path(ino))
                    .map_err(errno)?;
                Body::File(FileData {
                    file,
                    size: 0,
                    durable_size: 0,
                    undo: Undo::default(),
                    last_write: None,
                    dirty: false,
                })
            }
            Kind::Dir => Body::Dir(DirData::default()),
            Kind::Symlink => Body::Symlink(new.target.clone().ok_or(Errno::EINVAL)?),
            Kind::Socket | Kind::Fifo | Kind::CharDevice | Kind::BlockDevice => Body::Special,
        };
        self.next_ino += 1;
        let now = SystemTime::now();
        let meta = Meta {
            perm: new.perm & 0o7777,
            uid: new.uid,
            gid: new.gid,
            rdev: new.rdev,
            atime: now,
            mtime: now,
            ctime: now,
        };
        self.nodes.insert(
            ino,
            Node {
                kind: new.kind,
                live: meta.clone(),
                durable: meta,
                links: BTreeSet::new(),
                last_link: None,
                durable_refs: 0,
                open: 0,
                body,
            },
        );
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.add_link(ino, parent, name);
        self.touch_dir(parent, now);
        Ok(ino)
    }

    /// A new live entry `name` in `parent` for the existing non-directory `ino`.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr) -> Result<(), Errno> {
        if self.node(ino)?.kind == Kind::Dir {
            return Err(Errno::EPERM);
        }
        if matches!(self.node(ino)?.body, Body::Gone) {
            return Err(Errno::ENOENT);
        }
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.add_link(ino, parent, name);
        let now = SystemTime::now();
        self.touch_dir(parent, now);
        self.node_mut(ino)?.live.ctime = now;
        Ok(())
    }

    /// Removes the live entry `name` (not a directory) from `parent`; returns its inode. The
    /// inode's data stays while a durable entry or an open handle may still need it.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<Ino, Errno> {
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        self.remove_entry(parent, name, ino);
        Ok(ino)
    }

    /// Removes the live, empty directory `name` from `parent`; returns its inode.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Result<Ino, Errno> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.remove_entry(parent, name, ino);
        Ok(ino)
    }

    fn remove_entry(&mut self, parent: Ino, name: &OsStr, ino: Ino) {
        if let Ok(d) = self.dir_mut(parent) {
            d.live.remove(name);
        }
        self.remove_link(ino, parent, name);
        let now = SystemTime::now();
        self.touch_dir(parent, now);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.live.ctime = now;
        }
        self.collect(ino);
    }

    fn is_ancestor(&self, dir: Ino, of: Ino) -> bool {
        let mut cur = of;
        for _ in 0..4096 {
            if cur == dir {
                return true;
            }
            if cur == ROOT {
                return false;
            }
            match self.nodes.get(&cur).and_then(|n| n.links.iter().next()) {
                Some((p, _)) => cur = *p,
                None => return false,
            }
        }
        false
    }

    /// Renames live entry `name` of `parent` to `new_name` of `new_parent`. Each directory's
    /// side becomes durable with that directory's own `fsync`.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        mode: RenameMode,
    ) -> Result<(), Errno> {
        let src = self.lookup(parent, name)?;
        let dst = self.dir(new_parent)?.live.get(new_name).copied();
        let src_dir = self.node(src)?.kind == Kind::Dir;
        if src_dir && src != new_parent && self.is_ancestor(src, new_parent) {
            return Err(Errno::EINVAL);
        }
        if src_dir && src == new_parent {
            return Err(Errno::EINVAL);
        }
        let now = SystemTime::now();
        match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => return Err(Errno::EEXIST),
            (RenameMode::Exchange, None) => return Err(Errno::ENOENT),
            (RenameMode::Exchange, Some(dst)) => {
                if self.node(dst)?.kind == Kind::Dir && self.is_ancestor(dst, parent) {
                    return Err(Errno::EINVAL);
                }
                self.dir_mut(parent)?.live.insert(name.to_owned(), dst);
                self.dir_mut(new_parent)?
                    .live
                    .insert(new_name.to_owned(), src);
                self.remove_link(src, parent, name);
                self.remove_link(dst, new_parent, new_name);
                self.add_link(src, new_parent, new_name);
                self.add_link(dst, parent, name);
                self.touch_dir(parent, now);
                self.touch_dir(new_parent, now);
                return Ok(());
            }
            (_, Some(d)) if d == src => return Ok(()),
            (_, Some(d)) => {
                let dst_dir = self.node(d)?.kind == Kind::Dir;
                if src_dir && !dst_dir {
                    return Err(Errno::ENOTDIR);
                }
                if !src_dir && dst_dir {
                    return Err(Errno::EISDIR);
                }
                if dst_dir && !self.dir(d)?.live.is_empty() {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            (_, None) => {}
        }
        self.dir_mut(parent)?.live.remove(name);
        self.remove_link(src, parent, name);
        self.dir_mut(new_parent)?
            .live
            .insert(new_name.to_owned(), src);
        if let Some(d) = dst {
            self.remove_link(d, new_parent, new_name);
            if let Some(n) = self.nodes.get_mut(&d) {
                n.live.ctime = now;
            }
        }
        self.add_link(src, new_parent, new_name);
        self.touch_dir(parent, now);
        self.touch_dir(new_parent, now);
        self.node_mut(src)?.live.ctime = now;
        if let Some(d) = dst {
            self.collect(d);
        }
        Ok(())
    }

    /// Reads up to `size` live bytes of file `ino` at `offset`.
    pub fn read(&mut self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let f = self.file_mut(ino)?;
        if offset >= f.size {
            return Ok(Vec::new());
        }
        let n = (f.size - offset).min(u64::from(size));
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| Errno::EINVAL)?];
        f.file.read_exact_at(&mut buf, offset).map_err(errno)?;
        Ok(buf)
    }

    /// Saves the durable bytes of `[start, end)` (clamped to the durable size) that are not
    /// saved yet, before they change. Whole backing blocks are saved: a write that fills half
    /// a block of a hole allocates the block, and the next write's save would then see data
    /// (zeros) where the durable file has a hole.
    fn save(&mut self, ino: Ino, start: u64, end: u64) -> Result<(), Errno> {
        let undo_path = self.undo_path(ino);
        let block = self.block;
        let f = self.file_mut(ino)?;
        let start = start / block * block;
        let end = end
            .div_ceil(block)
            .saturating_mul(block)
            .min(f.durable_size);
        if start >= end {
            return Ok(());
        }
        for (gs, ge) in f.undo.gaps(start, end) {
            for (s, e, data) in segments(&f.file, gs, ge)? {
                let src = if data {
                    if f.undo.file.is_none() {
                        f.undo.file = Some(
                            OpenOptions::new()
                                .read(true)
                                .write(true)
                                .create(true)
                                .truncate(true)
                                .open(&undo_path)
                                .map_err(errno)?,
                        );
                        f.undo.len = 0;
                    }
                    let undo = f.undo.file.as_ref().ok_or(Errno::EIO)?;
                    copy_range(&f.file, s, undo, f.undo.len, e - s).map_err(errno)?;
                    let at = f.undo.len;
                    f.undo.len += e - s;
                    Source::Undo(at)
                } else {
                    Source::Hole
                };
                f.undo.ranges.insert(s, Saved { len: e - s, src });
            }
        }
        Ok(())
    }

    /// Writes `data` to file `ino` at `offset` (live only).
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let end = offset + data.len() as u64;
        self.save(ino, offset, end)?;
        let f = self.file_mut(ino)?;
        f.file.write_all_at(data, offset).map_err(errno)?;
        f.size = f.size.max(end);
        f.last_write = Some((offset, data.len() as u64));
        f.dirty = true;
        let now = SystemTime::now();
        let n = self.node_mut(ino)?;
        n.live.mtime = now;
        n.live.ctime = now;
        Ok(())
    }

    /// Sets file `ino`'s size (live only). Truncating a durable file to less than a block
    /// (`O_TRUNC`) moves its object aside instead of copying what it loses.
    pub fn truncate(&mut self, ino: Ino, size: u64) -> Result<(), Errno> {
        let block = self.block;
        let (obj, base) = (self.object_path(ino), self.base_path(ino));
        let f = self.file_mut(ino)?;
        let cur = f.size;
        let live_durable = cur.min(f.durable_size);
        if size < block && size < live_durable && !f.undo.base {
            // Everything below the durable size not saved yet is in the old object: it
            // becomes the base, and a new object gets the few bytes that stay.
            let gaps = f.undo.gaps(0, live_durable);
            std::fs::rename(&obj, &base).map_err(errno)?;
            let new = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&obj)
                .map_err(errno)?;
            copy_range(&f.file, 0, &new, 0, size).map_err(errno)?;
            f.file = new;
            f.size = size;
            f.undo.base = true;
            for (s, e) in gaps {
                f.undo.ranges.insert(
                    s,
                    Saved {
                        len: e - s,
                        src: Source::Base,
                    },
                );
            }
        } else if size < cur {
            self.save(ino, size, cur)?;
        }
        let f = self.file_mut(ino)?;
        f.file.set_len(size).map_err(errno)?;
        f.size = size;
        f.last_write = None;
        f.dirty = true;
        let now = SystemTime::now();
        let n = self.node_mut(ino)?;
        n.live.mtime = now;
        n.live.ctime = now;
        Ok(())
    }

    /// `fallocate` on file `ino` with Linux `mode` flags (live only). Collapsing and inserting
    /// ranges are not supported (`EOPNOTSUPP`), as on many filesystems.
    pub fn fallocate(&mut self, ino: Ino, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::from_bits(mode).ok_or(Errno::EOPNOTSUPP)?;
        if flags.intersects(
            FallocateFlags::FALLOC_FL_COLLAPSE_RANGE
                | FallocateFlags::FALLOC_FL_INSERT_RANGE
                | FallocateFlags::FALLOC_FL_UNSHARE_RANGE,
        ) {
            return Err(Errno::EOPNOTSUPP);
        }
        let rewrites = flags.intersects(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_ZERO_RANGE,
        );
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        if rewrites {
            self.save(ino, offset, end)?;
        }
        let f = self.file_mut(ino)?;
        fallocate(f.file.as_raw_fd(), flags, off(offset)?, off(len)?)?;
        let grows = !flags.contains(FallocateFlags::FALLOC_FL_KEEP_SIZE) && end > f.size;
        if grows {
            f.size = end;
        }
        if rewrites || grows {
            f.dirty = true;
            f.last_write = None;
            let now = SystemTime::now();
            let n = self.node_mut(ino)?;
            n.live.mtime = now;
            n.live.ctime = now;
        }
        Ok(())
    }

    /// `lseek` with `SEEK_DATA` / `SEEK_HOLE` (or any other `whence`) on file `ino`'s live
    /// contents.
    pub fn seek(&mut self, ino: Ino, offset: i64, whence: Whence) -> Result<i64, Errno> {
        let f = self.file_mut(ino)?;
        nix::unistd::lseek(f.file.as_raw_fd(), offset, whence)
    }

    /// Changes live metadata.
    pub fn set_meta(&mut self, ino: Ino, set: &SetMeta) -> Result<(), Errno> {
        let n = self.node_mut(ino)?;
        if let Some(p) = set.perm {
            n.live.perm = p & 0o7777;
        }
        if let Some(u) = set.uid {
            n.live.uid = u;
        }
        if let Some(g) = set.gid {
            n.live.gid = g;
        }
        if let Some(t) = set.atime {
            n.live.atime = t;
        }
        if let Some(t) = set.mtime {
            n.live.mtime = t;
        }
        n.live.ctime = SystemTime::now();
        Ok(())
    }

    /// `fsync`/`fdatasync` of `ino`: its contents, size and metadata (mtime included) become
    /// durable. Not its directory entries: those need an `fsync` of each directory.
    pub fn fsync(&mut self, ino: Ino) -> Result<(), Errno> {
        let base = self.base_path(ino);
        let n = self.node_mut(ino)?;
        n.durable = n.live.clone();
        if let Body::File(f) = &mut n.body {
            f.durable_size = f.size;
            f.undo.ranges.clear();
            if let Some(u) = &f.undo.file {
                u.set_len(0).map_err(errno)?;
            }
            f.undo.len = 0;
            if f.undo.base {
                std::fs::remove_file(base).map_err(errno)?;
                f.undo.base = false;
            }
            f.last_write = None;
            f.dirty = false;
        }
        Ok(())
    }

    /// `fsync` of directory `ino`: its live entries and its metadata become durable.
    pub fn fsync_dir(&mut self, ino: Ino) -> Result<(), Errno> {
        let live = self.dir(ino)?.live.clone();
        let old = std::mem::replace(&mut self.dir_mut(ino)?.durable, live.clone());
        for c in live.values() {
            if let Some(n) = self.nodes.get_mut(c) {
                n.durable_refs += 1;
            }
        }
        for c in old.values() {
            if let Some(n) = self.nodes.get_mut(c) {
                n.durable_refs = n.durable_refs.saturating_sub(1);
            }
        }
        let n = self.node_mut(ino)?;
        n.durable = n.live.clone();
        for c in old.values() {
            self.collect(*c);
        }
        Ok(())
    }

    /// Makes everything durable, as if every file and directory had been fsynced (a test's
    /// set-up, or a clean shutdown).
    pub fn sync_all(&mut self) -> Result<(), Errno> {
        let mut inos: Vec<Ino> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            match self.nodes.get(&ino).map(|n| &n.body) {
                Some(Body::Dir(_)) => self.fsync_dir(ino)?,
                Some(Body::Gone) | None => {}
                Some(_) => self.fsync(ino)?,
            }
        }
        Ok(())
    }

    /// A handle on `ino` was opened.
    pub fn open_handle(&mut self, ino: Ino) -> Result<(), Errno> {
        let n = self.node_mut(ino)?;
        if matches!(n.body, Body::Gone) {
            return Err(Errno::ENOENT);
        }
        n.open += 1;
        Ok(())
    }

    /// A handle on `ino` was released.
    pub fn close_handle(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.open = n.open.saturating_sub(1);
        }
        self.collect(ino);
    }

    /// Deletes the data of `ino` (and of what only it kept alive) once no live entry, no
    /// durable entry and no open handle can reach it: a power cut cannot bring it back.
    fn collect(&mut self, ino: Ino) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            let Some(n) = self.nodes.get_mut(&ino) else {
                continue;
            };
            if ino == ROOT || !n.links.is_empty() || n.durable_refs > 0 || n.open > 0 {
                continue;
            }
            match std::mem::replace(&mut n.body, Body::Gone) {
                Body::File(f) => {
                    drop(f);
                    let _ = self.remove_files(ino);
                }
                Body::Dir(d) => {
                    for c in d.durable.values() {
                        if let Some(cn) = self.nodes.get_mut(c) {
                            cn.durable_refs = cn.durable_refs.saturating_sub(1);
                            work.push(*c);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Every live path (relative to the root) and the inode it names.
    fn live_tree(&self) -> BTreeMap<PathBuf, Ino> {
        let mut out = BTreeMap::new();
        let mut queue = VecDeque::from([(ROOT, PathBuf::new())]);
        while let Some((dir, path)) = queue.pop_front() {
            let Ok(d) = self.dir(dir) else { continue };
            for (name, &c) in &d.live {
                let p = path.join(name);
                if self.nodes.get(&c).is_some_and(|n| n.kind == Kind::Dir) {
                    queue.push_back((c, p.clone()));
                }
                out.insert(p, c);
            }
        }
        out
    }

    /// The power loss: every file goes back to its last `fsync` (contents, size, metadata),
    /// every directory to the entries of its last `fsync`, and every inode no durable entry
    /// reaches from the root is deleted. A directory that durable entries name in more than one
    /// place (a directory rename made durable on one side only) stays in the first place a
    /// breadth-first walk by name finds, so the result is a tree. Afterwards everything is
    /// durable and no handle is open.
    pub fn crash(&mut self) -> io::Result<CutReport> {
        let before = self.live_tree();

        // Which nodes a durable entry reaches, and each directory's surviving entries.
        let mut reached: HashSet<Ino> = HashSet::from([ROOT]);
        let mut maps: HashMap<Ino, BTreeMap<OsString, Ino>> = HashMap::new();
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            let durable = match self.nodes.get(&dir).map(|n| &n.body) {
                Some(Body::Dir(d)) => d.durable.clone(),
                _ => BTreeMap::new(),
            };
            let mut map = BTreeMap::new();
            for (name, c) in durable {
                let Some(cn) = self.nodes.get(&c) else {
                    continue;
                };
                if matches!(cn.body, Body::Gone) {
                    continue;
                }
                if cn.kind == Kind::Dir {
                    if reached.contains(&c) {
                        continue;
                    }
                    queue.push_back(c);
                }
                reached.insert(c);
                map.insert(name, c);
            }
            maps.insert(dir, map);
        }

        let mut report = CutReport::default();
        let mut rolled: Vec<(Ino, Rollback)> = Vec::new();
        let dropped: Vec<Ino> = self
            .nodes
            .keys()
            .copied()
            .filter(|i| !reached.contains(i))
            .collect();
        for ino in dropped {
            if let Some(n) = self.nodes.remove(&ino) {
                if let Body::File(f) = n.body {
                    if !n.links.is_empty() {
                        report.discarded_bytes += f.size;
                    }
                    drop(f);
                    self.remove_files(ino)?;
                }
            }
        }

        let mut inos: Vec<Ino> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        let tear = self.tear;
        for ino in inos {
            let undo_path = self.undo_path(ino);
            let (obj_path, base_path) = (self.object_path(ino), self.base_path(ino));
            let Some(n) = self.nodes.get_mut(&ino) else {
                continue;
            };
            // ctime and atime go back too, but alone they are not worth a line in the report.
            let meta_changed = (n.live.perm, n.live.uid, n.live.gid, n.live.mtime)
                != (
                    n.durable.perm,
                    n.durable.uid,
                    n.durable.gid,
                    n.durable.mtime,
                );
            n.live = n.durable.clone();
            n.links.clear();
            n.durable_refs = 0;
            n.open = 0;
            match &mut n.body {
                Body::File(f) => {
                    let changed = f.dirty || f.size != f.durable_size || !f.undo.ranges.is_empty();
                    if !changed {
                        if meta_changed {
                            rolled.push((
                                ino,
                                Rollback {
                                    path: PathBuf::new(),
                                    live_size: f.size,
                                    durable_size: f.size,
                                    bytes_restored: 0,
                                    torn: None,
                                    meta_only: true,
                                },
                            ));
                        }
                        continue;
                    }
                    // The torn prefix: half the last write, in whole 512-byte sectors.
                    let torn = match (tear, f.last_write) {
                        (true, Some((o, l))) if l / 2 >= 512 => {
                            let keep = (l / 2) & !511;
                            let mut buf =
                                vec![0u8; usize::try_from(keep).map_err(io::Error::other)?];
                            f.file.read_exact_at(&mut buf, o)?;
                            Some((o, buf))
                        }
                        _ => None,
                    };
                    let restored = f.undo.bytes();
                    if f.undo.base {
                        // The old object comes back whole; the other saved ranges go on top.
                        std::fs::rename(&base_path, &obj_path)?;
                        f.file = OpenOptions::new().read(true).write(true).open(&obj_path)?;
                    }
                    f.file.set_len(f.durable_size)?;
                    for (&s, r) in &f.undo.ranges {
                        match (r.src, &f.undo.file) {
                            (Source::Base, _) => {}
                            (Source::Hole, _) => punch_hole(&f.file, s, r.len)?,
                            (Source::Undo(at), Some(u)) => copy_range(u, at, &f.file, s, r.len)?,
                            (Source::Undo(_), None) => {
                                return Err(io::Error::other("undo log lost its file"))
                            }
                        }
                    }
                    let cut_off = f.size.saturating_sub(f.durable_size);
                    let live_size = f.size;
                    f.size = f.durable_size;
                    let torn = match torn {
                        Some((o, buf)) => {
                            f.file.write_all_at(&buf, o)?;
                            f.size = f.size.max(o + buf.len() as u64);
                            Some((o, buf.len() as u64))
                        }
                        None => None,
                    };
                    f.durable_size = f.size;
                    f.undo = Undo::default();
                    let _ = std::fs::remove_file(&undo_path);
                    f.last_write = None;
                    f.dirty = false;
                    report.discarded_bytes += restored + cut_off;
                    rolled.push((
                        ino,
                        Rollback {
                            path: PathBuf::new(),
                            live_size,
                            durable_size: f.size,
                            bytes_restored: restored,
                            torn,
                            meta_only: false,
                        },
                    ));
                }
                Body::Dir(d) => {
                    let map = maps.remove(&ino).unwrap_or_default();
                    d.live = map.clone();
                    d.durable = map;
                }
                _ => {}
            }
        }

        // Links and durable reference counts from the rebuilt directories.
        let links: Vec<(Ino, OsString, Ino)> = self
            .nodes
            .iter()
            .filter_map(|(&i, n)| match &n.body {
                Body::Dir(d) => Some(d.live.iter().map(move |(k, &c)| (i, k.clone(), c))),
                _ => None,
            })
            .flatten()
            .collect();
        for (dir, name, c) in links {
            if let Some(n) = self.nodes.get_mut(&c) {
                n.links.insert((dir, name.clone()));
                n.last_link = Some((dir, name));
                n.durable_refs += 1;
            }
        }

        let after = self.live_tree();
        for (p, ino) in &before {
            match after.get(p) {
                None => report.vanished.push(p.clone()),
                Some(a) if a != ino => report.replaced.push(p.clone()),
                Some(_) => {}
            }
        }
        report.reappeared = after
            .keys()
            .filter(|p| !before.contains_key(*p))
            .cloned()
            .collect();
        for (ino, mut r) in rolled {
            r.path = self.path(ino);
            report.rolled_back.push(r);
        }
        report.rolled_back.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(report)
    }

    /// The backing object of file `ino` (tests look at its holes).
    #[cfg(test)]
    fn object(&self, ino: Ino) -> PathBuf {
        self.object_path(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn model() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let m = Model::new(dir.path(), false).unwrap();
        (dir, m)
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn file(m: &mut Model, parent: Ino, n: &str) -> Ino {
        m.create(parent, name(n), NewNode::new(Kind::File, 0o600))
            .unwrap()
    }

    fn contents(m: &mut Model, ino: Ino) -> Vec<u8> {
        m.read(ino, 0, u32::MAX).unwrap()
    }

    fn at(m: &Model, path: &str) -> Option<Ino> {
        let mut cur = ROOT;
        for part in Path::new(path).iter() {
            cur = m.lookup(cur, part).ok()?;
        }
        Some(cur)
    }

    /// A file `n` in the root with `data`, fully durable (data and entry).
    fn durable_file(m: &mut Model, n: &str, data: &[u8]) -> Ino {
        let f = file(m, ROOT, n);
        m.write(f, 0, data).unwrap();
        m.fsync(f).unwrap();
        m.fsync_dir(ROOT).unwrap();
        f
    }

    #[test]
    fn write_without_fsync_is_lost() {
        let (_d, mut m) = model();
        let f = durable_file(&mut m, "a", b"old contents");
        m.write(f, 0, b"NEW").unwrap();
        assert_eq!(contents(&mut m, f), b"NEW contents");
        let r = m.crash().unwrap();
        let f = at(&m, "a").unwrap();
        assert_eq!(contents(&mut m, f), b"old contents");
        assert_eq!(r.rolled_back.len(), 1, "{r}");
        // Whole blocks are saved: here the whole (12-byte) durable file.
        assert_eq!(r.rolled_back[0].bytes_restored, 12);
    }

    #[test]
    fn fsync_keeps_data_but_a_new_entry_needs_the_directory_fsync() {
        let (_d, mut m) = model();
        let f = file(&mut m, ROOT, "new");
        m.write(f, 0, b"data").unwrap();
        m.fsync(f).unwrap();
        let r = m.crash().unwrap();
        assert_eq!(at(&m, "new"), None);
        assert_eq!(r.vanished, vec![PathBuf::from("new")]);
        // Its data is gone from the backing directory too.
        assert!(!m.object(f).exists());

        let f = file(&mut m, ROOT, "new");
        m.write(f, 0, b"data").unwrap();
        m.fsync(f).unwrap();
        m.fsync_dir(ROOT).unwrap();
        m.crash().unwrap();
        let f = at(&m, "new").unwrap();
        assert_eq!(contents(&mut m, f), b"data");
    }

    #[test]
    fn a_durable_entry_without_data_fsync_keeps_the_durable_size() {
        let (_d, mut m) = model();
        let f = file(&mut m, ROOT, "f");
        m.fsync_dir(ROOT).unwrap();
        m.write(f, 0, b"never synced").unwrap();
        m.crash().unwrap();
        let f = at(&m, "f").unwrap();
        assert_eq!(m.attr(f).unwrap().size, 0);
    }

    #[test]
    fn rename_without_directory_fsync_reverts_to_the_old_file() {
        let (_d, mut m) = model();
        let old = durable_file(&mut m, "cfg.json", b"{\"v\":1}");
        let tmp = file(&mut m, ROOT, "cfg.json.tmp");
        m.write(tmp, 0, b"{\"v\":2}").unwrap();
        m.fsync(tmp).unwrap();
        m.rename(
            ROOT,
            name("cfg.json.tmp"),
            ROOT,
            name("cfg.json"),
            RenameMode::Replace,
        )
        .unwrap();
        let r = m.crash().unwrap();
        assert_eq!(at(&m, "cfg.json"), Some(old));
        assert_eq!(contents(&mut m, old), b"{\"v\":1}");
        assert_eq!(at(&m, "cfg.json.tmp"), None);
        assert_eq!(r.replaced, vec![PathBuf::from("cfg.json")], "{r}");
    }

    #[test]
    fn rename_with_directory_fsync_sticks() {
        let (_d, mut m) = model();
        durable_file(&mut m, "cfg.json", b"{\"v\":1}");
        let tmp = file(&mut m, ROOT, "cfg.json.tmp");
        m.write(tmp, 0, b"{\"v\":2}").unwrap();
        m.fsync(tmp).unwrap();
        m.rename(
            ROOT,
            name("cfg.json.tmp"),
            ROOT,
            name("cfg.json"),
            RenameMode::Replace,
        )
        .unwrap();
        m.fsync_dir(ROOT).unwrap();
        let r = m.crash().unwrap();
        let f = at(&m, "cfg.json").unwrap();
        assert_eq!(f, tmp);
        assert_eq!(contents(&mut m, f), b"{\"v\":2}");
        assert!(r.is_empty(), "{r}");
    }

    #[test]
    fn rename_noreplace_and_exchange() {
        let (_d, mut m) = model();
        let a = durable_file(&mut m, "a", b"A");
        let b = durable_file(&mut m, "b", b"B");
        assert_eq!(
            m.rename(ROOT, name("a"), ROOT, name("b"), RenameMode::NoReplace),
            Err(Errno::EEXIST)
        );
        m.rename(ROOT, name("a"), ROOT, name("b"), RenameMode::Exchange)
            .unwrap();
        assert_eq!(at(&m, "a"), Some(b));
        assert_eq!(at(&m, "b"), Some(a));
        m.crash().unwrap();
        assert_eq!(at(&m, "a"), Some(a));
    }

    #[test]
    fn unlink_without_directory_fsync_comes_back_with_its_durable_data() {
        let (_d, mut m) = model();
        let f = durable_file(&mut m, "keep", b"durable");
        m.write(f, 0, b"LIVE!!!").unwrap();
        m.unlink(ROOT, name("keep")).unwrap();
        let r = m.crash().unwrap();
        assert_eq!(r.reappeared, vec![PathBuf::from("keep")], "{r}");
        let f = at(&m, "keep").unwrap();
        assert_eq!(contents(&mut m, f), b"durable");

        m.unlink(ROOT, name("keep")).unwrap();
        m.fsync_dir(ROOT).unwrap();
        assert!(
            !m.object(f).exists(),
            "a durably unlinked file's data is deleted"
        );
        m.crash().unwrap();
        assert_eq!(at(&m, "keep"), None);
    }

    #[test]
    fn an_open_unlinked_file_keeps_its_data_until_closed() {
        let (_d, mut m) = model();
        let f = file(&mut m, ROOT, "tmp");
        m.open_handle(f).unwrap();
        m.write(f, 0, b"x").unwrap();
        m.unlink(ROOT, name("tmp")).unwrap();
        assert_eq!(contents(&mut m, f), b"x");
        m.close_handle(f);
        assert!(!m.object(f).exists());
    }

    #[test]
    fn hard_link_then_unlink_of_the_old_name() {
        let (_d, mut m) = model();
        let f = file(&mut m, ROOT, "tmp");
        m.write(f, 0, b"content").unwrap();
        m.fsync(f).unwrap();
        m.link(f, ROOT, name("final")).unwrap();
        assert_eq!(m.attr(f).unwrap().nlink, 2);
        m.unlink(ROOT, name("tmp")).unwrap();
        m.crash().unwrap();
        assert_eq!(at(&m, "final"), None);

        let f = file(&mut m, ROOT, "tmp");
        m.write(f, 0, b"content").unwrap();
        m.fsync(f).unwrap();
        m.link(f, ROOT, name("final")).unwrap();
        m.unlink(ROOT, name("tmp")).unwrap();
        m.fsync_dir(ROOT).unwrap();
        m.crash().unwrap();
        let f = at(&m, "final").unwrap();
        assert_eq!(contents(&mut m, f), b"content");
        assert_eq!(at(&m, "tmp"), None);
        assert_eq!(m.attr(f).unwrap().nlink, 1);
    }

    #[test]
    fn extending_write_is_truncated_back_to_the_durable_size() {
        let (_d, mut m) = model();
        let f = durable_file(&mut m, "f", b"0123456789");
        m.write(f, 8, b"89abcdef").unwrap();
        m.write(f, 1 << 20, b"far").unwrap();
        let r = m.crash().unwrap();
        let f = at(&m, "f").unwrap();
        assert_eq!(contents(&mut m, f), b"0123456789");
        assert_eq!(std::fs::metadata(m.object(f)).unwrap().len(), 10);
        assert_eq!(r.rolled_back[0].live_size, (1 << 20) + 3);
        assert_eq!(r.rolled_back[0].bytes_restored, 10, "{r}");
    }

    #[test]
    fn truncate_is_undone() {
        let (_d, mut m) = model();
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let f = durable_file(&mut m, "f", &data);
        m.truncate(f, 10).unwrap();
        m.write(f, 50_000, b"junk").unwrap();
        m.truncate(f, 0).unwrap();
        m.crash().unwrap();
        let f = at(&m, "f").unwrap();
        assert_eq!(contents(&mut m, f), data);
    }

    #[test]
    fn o_trunc_of_a_large_durable_file_moves_it_aside_and_comes_back() {
        let (d, mut m) = model();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let f = durable_file(&mut m, "mem", &data);
        // Saved first the ordinary way, then truncated to nothing twice, rewritten, cut.
        m.write(f, 10_000, &[1u8; 5000]).unwrap();
        m.truncate(f, 0).unwrap();
        let undo_bytes: u64 = std::fs::read_dir(d.path().join("undo"))
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".base")
            })
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            undo_bytes < 100_000,
            "nothing large was copied: {undo_bytes}"
        );
        m.write(f, 0, &[2u8; 2_000_000]).unwrap();
        m.truncate(f, 7).unwrap();
        m.write(f, 100, b"x").unwrap();
        assert_eq!(
            contents(&mut m, f),
            [&[2u8; 7][..], &[0u8; 93], b"x"].concat()
        );
        let r = m.crash().unwrap();
        assert_eq!(contents(&mut m, f), data, "{r}");
        assert!(!d.path().join("undo").join(format!("{f}.base")).exists());

        // Keeping a few bytes, then fsync: the base goes away and the new state sticks.
        m.truncate(f, 100).unwrap();
        assert_eq!(contents(&mut m, f), &data[..100]);
        m.fsync(f).unwrap();
        assert!(!d.path().join("undo").join(format!("{f}.base")).exists());
        m.crash().unwrap();
        assert_eq!(contents(&mut m, f), &data[..100]);
    }

    #[test]
    fn overwrite_in_the_middle_is_rolled_back_byte_exact() {
        let (_d, mut m) = model();
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| u8::try_from(i * 7 % 256).unwrap())
            .collect();
        let f = durable_file(&mut m, "f", &data);
        // Overlapping overwrites: only the first save of a byte may count.
        m.write(f, 1000, &[1u8; 5000]).unwrap();
        m.write(f, 3000, &[2u8; 200_000]).unwrap();
        m.write(f, 999, &[3u8; 3]).unwrap();
        m.crash().unwrap();
        let f = at(&m, "f").unwrap();
        assert_eq!(contents(&mut m, f), data);
    }

    #[test]
    fn synced_overwrites_stay() {
        let (_d, mut m) = model();
        let f = durable_file(&mut m, "f", &[0u8; 8192]);
        m.write(f, 100, b"synced").unwrap();
        m.fsync(f).unwrap();
        m.write(f, 200, b"lost").unwrap();
        m.crash().unwrap();
        let f = at(&m, "f").unwrap();
        let c = contents(&mut m, f);
        assert_eq!(&c[100..106], b"synced");
        assert_eq!(&c[200..204], &[0u8; 4]);
    }

    fn data_at(path: &Path, from: i64) -> Option<i64> {
        let f = File::open(path).unwrap();
        nix::unistd::lseek(f.as_raw_fd(), from, Whence::SeekData).ok()
    }

    #[test]
    fn holes_stay_holes_after_a_rollback() {
        let (_d, mut m) = model();
        let f = file(&mut m, ROOT, "sparse");
        // 4 MiB file: data only in its last 4 KiB.
        m.write(f, (4 << 20) - 4096, &[7u8; 4096]).unwrap();
        m.fsync(f).unwrap();
        m.fsync_dir(ROOT).unwrap();
        let first_data = data_at(&m.object(f), 0).unwrap();
        if first_data == 0 {
            eprintln!("backing filesystem does not report holes; nothing to check");
            return;
        }
        // Fill the hole, punch the data, then cut.
        m.write(f, 0, &[9u8; 1 << 20]).unwrap();
        m.fallocate(f, (4 << 20) - 4096, 4096, libc_flags(&["punch", "keep"]))
            .unwrap();
        m.crash().unwrap();
        let f = at(&m, "sparse").unwrap();
        let c = contents(&mut m, f);
        assert_eq!(c.len(), 4 << 20);
        assert!(c[..(4 << 20) - 4096].iter().all(|&b| b == 0));
        assert!(c[(4 << 20) - 4096..].iter().all(|&b| b == 7));
        assert_eq!(
            data_at(&m.object(f), 0),
            Some(first_data),
            "the hole came back"
        );
        assert_eq!(
            m.seek(f, 0, Whence::SeekData).unwrap(),
            first_data,
            "SEEK_DATA on the model sees the hole"
        );
    }

    #[test]
    fn unaligned_writes_into_a_hole_leave_a_hole_after_the_cut() {
        let (_d, mut m) = model();
        let f = file(&mut m, ROOT, "sparse");
        m.write(f, 1 << 20, &[7u8; 4096]).unwrap();
        m.fsync(f).unwrap();
        m.fsync_dir(ROOT).unwrap();
        if data_at(&m.object(f), 0) == Some(0) {
            return;
        }
        // The kernel splits writes where it likes: 21888 bytes, then 64 KiB pieces.
        let mut pos = 0u64;
        for len in [21_888u64, 65_536, 65_536, 65_536] {
            m.write(f, pos, &vec![2u8; usize::try_from(len).unwrap()])
                .unwrap();
            pos += len;
        }
        m.crash().unwrap();
        assert_eq!(data_at(&m.object(f), 0), Some(1 << 20));
        assert_eq!(m.read(f, 0, 1 << 20).unwrap(), vec![0u8; 1 << 20]);
    }

    fn libc_flags(names: &[&str]) -> i32 {
        use nix::fcntl::FallocateFlags as F;
        names
            .iter()
            .map(|n| match *n {
                "punch" => F::FALLOC_FL_PUNCH_HOLE,
                "keep" => F::FALLOC_FL_KEEP_SIZE,
                "zero" => F::FALLOC_FL_ZERO_RANGE,
                _ => unreachable!(),
            })
            .fold(F::empty(), |a, b| a | b)
            .bits()
    }

    #[test]
    fn zero_range_and_allocate_are_undone() {
        let (_d, mut m) = model();
        let f = durable_file(&mut m, "f", &[5u8; 10_000]);
        m.fallocate(f, 100, 200, libc_flags(&["zero"])).unwrap();
        m.fallocate(f, 0, 50_000, 0).unwrap();
        assert_eq!(m.attr(f).unwrap().size, 50_000);
        m.crash().unwrap();
        let f = at(&m, "f").unwrap();
        assert_eq!(contents(&mut m, f), vec![5u8; 10_000]);
    }

    #[test]
    fn mtime_and_mode_go_back_to_the_last_fsync() {
        let (_d, mut m) = model();
        let f = durable_file(&mut m, "img", b"image");
        let stamp = UNIX_EPOCH + Duration::from_secs(1_000_000);
        m.set_meta(
            f,
            &SetMeta {
                mtime: Some(stamp),
                ..Default::default()
            },
        )
        .unwrap();
        m.fsync(f).unwrap();
        m.set_meta(
            f,
            &SetMeta {
                perm: Some(0o644),
                mtime: Some(stamp + Duration::from_secs(5)),
                ..Default::default()
            },
        )
        .unwrap();
        let r = m.crash().unwrap();
        let a = m.attr(f).unwrap();
        assert_eq!(a.meta.mtime, stamp);
        assert_eq!(a.meta.perm, 0o600);
        assert!(r.rolled_back[0].meta_only, "{r}");
        // Untouched since then: a second cut changes nothing.
        let r = m.crash().unwrap();
        assert!(r.is_empty(), "{r}");
        assert_eq!(m.attr(f).unwrap().meta.mtime, stamp);
    }

    #[test]
    fn a_new_directory_needs_its_parents_fsync_and_takes_its_subtree_with_it() {
        let (_d, mut m) = model();
        let d = m
            .create(ROOT, name("vms"), NewNode::new(Kind::Dir, 0o700))
            .unwrap();
        let f = file(&mut m, d, "vm.json");
        m.write(f, 0, b"{}").unwrap();
        m.fsync(f).unwrap();
        m.fsync_dir(d).unwrap();
        let r = m.crash().unwrap();
        assert_eq!(at(&m, "vms"), None);
        assert_eq!(r.vanished.len(), 2, "{r}");

        let d = m
            .create(ROOT, name("vms"), NewNode::new(Kind::Dir, 0o700))
            .unwrap();
        let f = file(&mut m, d, "vm.json");
        m.write(f, 0, b"{}").unwrap();
        m.fsync(f).unwrap();
        m.fsync_dir(d).unwrap();
        m.fsync_dir(ROOT).unwrap();
        m.crash().unwrap();
        let f = at(&m, "vms/vm.json").unwrap();
        assert_eq!(contents(&mut m, f), b"{}");
        assert_eq!(m.attr(at(&m, "vms").unwrap()).unwrap().meta.perm, 0o700);
    }

    #[test]
    fn rename_across_directories_is_durable_per_directory() {
        let (_d, mut m) = model();
        let a = m
            .create(ROOT, name("a"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        let b = m
            .create(ROOT, name("b"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        let f = file(&mut m, a, "f");
        m.fsync(f).unwrap();
        m.sync_all().unwrap();

        // Only the destination fsynced: the file is in both.
        m.rename(a, name("f"), b, name("f"), RenameMode::Replace)
            .unwrap();
        m.fsync_dir(b).unwrap();
        m.crash().unwrap();
        assert_eq!(at(&m, "a/f"), Some(f));
        assert_eq!(at(&m, "b/f"), Some(f));
        assert_eq!(m.attr(f).unwrap().nlink, 2);

        // Only the source fsynced: in neither, and its data is gone.
        m.unlink(b, name("f")).unwrap();
        m.fsync_dir(b).unwrap();
        m.rename(a, name("f"), b, name("f"), RenameMode::Replace)
            .unwrap();
        m.fsync_dir(a).unwrap();
        m.crash().unwrap();
        assert_eq!(at(&m, "a/f"), None);
        assert_eq!(at(&m, "b/f"), None);
        assert!(!m.object(f).exists());
    }

    #[test]
    fn a_directory_durable_in_two_places_is_kept_once() {
        let (_d, mut m) = model();
        let a = m
            .create(ROOT, name("a"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        let b = m
            .create(ROOT, name("b"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        m.sync_all().unwrap();
        // b into a, a fsynced: durable entries name b in the root and in a.
        m.rename(ROOT, name("b"), a, name("b"), RenameMode::Replace)
            .unwrap();
        m.fsync_dir(a).unwrap();
        // b back, then a into b, b fsynced: durable entries now form a cycle a -> b -> a.
        m.rename(a, name("b"), ROOT, name("b"), RenameMode::Replace)
            .unwrap();
        m.rename(ROOT, name("a"), b, name("a"), RenameMode::Replace)
            .unwrap();
        m.fsync_dir(b).unwrap();
        m.crash().unwrap();
        assert_eq!(at(&m, "a"), Some(a));
        assert_eq!(at(&m, "b"), Some(b));
        assert_eq!(at(&m, "a/b"), None, "a directory has one parent");
        assert_eq!(at(&m, "b/a"), None, "a directory has one parent");
        assert_eq!(m.attr(ROOT).unwrap().nlink, 4);
    }

    #[test]
    fn rmdir_without_fsync_brings_the_directory_back_with_its_durable_entries() {
        let (_d, mut m) = model();
        let d = m
            .create(ROOT, name("d"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        let f = file(&mut m, d, "f");
        m.sync_all().unwrap();
        m.unlink(d, name("f")).unwrap();
        assert_eq!(m.rmdir(ROOT, name("d")), Ok(d));
        m.crash().unwrap();
        assert_eq!(at(&m, "d/f"), Some(f));
    }

    #[test]
    fn sockets_and_symlinks_are_entries_like_any_other() {
        let (_d, mut m) = model();
        let s = m
            .create(ROOT, name("qmp.sock"), NewNode::new(Kind::Socket, 0o755))
            .unwrap();
        let mut link = NewNode::new(Kind::Symlink, 0o777);
        link.target = Some(PathBuf::from("qmp.sock"));
        let l = m.create(ROOT, name("link"), link).unwrap();
        assert_eq!(m.readlink(l).unwrap(), PathBuf::from("qmp.sock"));
        assert_eq!(m.attr(s).unwrap().kind, Kind::Socket);
        m.crash().unwrap();
        assert_eq!(at(&m, "qmp.sock"), None);
        let s = m
            .create(ROOT, name("qmp.sock"), NewNode::new(Kind::Socket, 0o755))
            .unwrap();
        m.fsync_dir(ROOT).unwrap();
        m.crash().unwrap();
        assert_eq!(at(&m, "qmp.sock"), Some(s));
    }

    #[test]
    fn a_torn_write_keeps_a_sector_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::new(dir.path(), true).unwrap();
        let f = durable_file(&mut m, "f", &[0u8; 8192]);
        m.write(f, 1024, &[1u8; 4096]).unwrap();
        m.write(f, 0, &[2u8; 3000]).unwrap();
        let r = m.crash().unwrap();
        let c = contents(&mut m, f);
        // The last write (3000 bytes at 0) keeps its first 1024 bytes (half, in sectors)...
        assert_eq!(r.rolled_back[0].torn, Some((0, 1024)), "{r}");
        assert!(c[..1024].iter().all(|&b| b == 2));
        // ...and everything else is durable state.
        assert!(c[1024..].iter().all(|&b| b == 0));
        assert_eq!(c.len(), 8192);
    }

    #[test]
    fn errors_match_the_kernel_s() {
        let (_d, mut m) = model();
        let d = m
            .create(ROOT, name("d"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        file(&mut m, d, "f");
        assert_eq!(
            m.create(ROOT, name("d"), NewNode::new(Kind::File, 0o600)),
            Err(Errno::EEXIST)
        );
        assert_eq!(m.rmdir(ROOT, name("d")), Err(Errno::ENOTEMPTY));
        assert_eq!(m.unlink(ROOT, name("d")), Err(Errno::EISDIR));
        assert_eq!(m.lookup(ROOT, name("nope")), Err(Errno::ENOENT));
        assert_eq!(m.link(d, ROOT, name("x")), Err(Errno::EPERM));
        assert_eq!(
            m.rename(ROOT, name("d"), d, name("inside"), RenameMode::Replace),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn paths_follow_renames() {
        let (_d, mut m) = model();
        let d = m
            .create(ROOT, name("vms"), NewNode::new(Kind::Dir, 0o755))
            .unwrap();
        let f = file(&mut m, d, "a.tmp");
        assert_eq!(m.path(f), PathBuf::from("vms/a.tmp"));
        m.rename(d, name("a.tmp"), d, name("a.json"), RenameMode::Replace)
            .unwrap();
        assert_eq!(m.path(f), PathBuf::from("vms/a.json"));
    }
}
