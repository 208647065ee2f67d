//! The per-VM lock: one operation (create, revert, delete, …) on a VM at a time, across
//! processes. An advisory `flock` on `<vm>/lock`, tried without blocking: a second operation is
//! refused at once with the holder's pid and what it is doing, rather than queued behind an
//! operation that may take minutes — unless its caller asked to wait (`Store::with_lock_wait`,
//! `--wait`: it tries again until its deadline). The kernel drops the lock when the holder exits, however
//! it exits, so a crash never leaves a VM locked. Runs on the blocking pool.
//!
//! [`lock_holder`] reads the holder's note without taking the lock (taking it, even for a
//! moment, would refuse the very operation it looks at): what `qsnap status` calls busy.

use super::atomic::{blocking, io};
use crate::error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The operation that holds a VM's lock now, as its note says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct LockHolder {
    /// What it is doing (`create s1`, `stop`, …).
    pub operation: String,
    /// The pid of the process doing it.
    pub pid: u32,
    /// When it took the lock (RFC 3339: when it wrote its note).
    pub since: Option<String>,
}

/// Who holds the lock of the VM whose directory is `vm_dir`, if anyone does. Reads only. A
/// note is believed only while its process runs (a zombie does not): a holder that was
/// killed leaves its note behind.
pub async fn lock_holder(vm_dir: &Path) -> Result<Option<LockHolder>> {
    let path = vm_dir.join("lock");
    blocking(move || read_holder(&path)).await
}

fn read_holder(path: &Path) -> Result<Option<LockHolder>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading the VM lock", path)(e)),
    };
    let mut note = String::new();
    file.read_to_string(&mut note)
        .map_err(io("reading the VM lock", path))?;
    let mut words = note.trim().splitn(2, ' ');
    let (Some(Ok(pid)), Some(operation)) = (words.next().map(str::parse::<u32>), words.next())
    else {
        return Ok(None);
    };
    if !crate::proc::alive_blocking(pid) {
        return Ok(None);
    }
    let since = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .map(|t| humantime::format_rfc3339_millis(t).to_string());
    Ok(Some(LockHolder {
        operation: operation.to_owned(),
        pid,
        since,
    }))
}

/// Held while an operation runs; dropping it releases the lock.
#[derive(Debug)]
pub struct VmLock {
    file: Flock<File>,
    exclusive: bool,
}

impl Drop for VmLock {
    /// The last holder erases its note before the kernel drops the lock, so an operation
    /// refused in the moment between the next holder's lock and its note waits for that note
    /// instead of naming this finished operation. A shared holder is the last when it can
    /// turn its lock exclusive; if it cannot, other sharers hold on and the note stays (the
    /// failed conversion may already have dropped this lock: it was being released anyway).
    fn drop(&mut self) {
        if self.exclusive || self.file.relock(FlockArg::LockExclusiveNonblock).is_ok() {
            let _ = self.file.set_len(0);
        }
    }
}

impl VmLock {
    /// Takes the lock at `path` for `operation`, or says who holds it.
    pub(crate) fn acquire(path: &Path, vm: &str, operation: &str) -> Result<VmLock> {
        Self::take(path, vm, operation, FlockArg::LockExclusiveNonblock)
    }

    /// Takes the lock shared: operations that only read the VM's snapshots (clones of it) run
    /// side by side, and keep every operation that changes them out meanwhile.
    pub(crate) fn acquire_shared(path: &Path, vm: &str, operation: &str) -> Result<VmLock> {
        Self::take(path, vm, operation, FlockArg::LockSharedNonblock)
    }

    fn take(path: &Path, vm: &str, operation: &str, how: FlockArg) -> Result<VmLock> {
        // A lock file can be unlinked by its last holder (an import that made no VM removes
        // the directory it made): a lock taken on the unlinked file is no lock. Taken, it is
        // checked to still be the file at `path`, else taken again on the new one.
        let mut tries = 0;
        loop {
            let lock = Self::take_once(path, vm, operation, how)?;
            use std::os::unix::fs::MetadataExt;
            let same = match (std::fs::metadata(path), lock.file.metadata()) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same || tries == 10 {
                return Ok(lock);
            }
            tries += 1;
            drop(lock);
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
    }

    fn take_once(path: &Path, vm: &str, operation: &str, how: FlockArg) -> Result<VmLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io("opening the VM lock", path))?;
        // Refused, the holder's note says who holds it. The holder writes it just after
        // locking, and the last holder erases it just before letting go (`Drop`): while no
        // live note is there, the lock is tried again (a busy host may delay either by more
        // than a scheduler tick), so that a lock let go meanwhile is taken, not refused.
        let mut file = file;
        let mut holder = String::new();
        for _ in 0..50 {
            match Flock::lock(file, how) {
                Ok(mut locked) => {
                    // Say who we are, for the message a refused operation prints.
                    let note = format!("{} {operation}\n", std::process::id());
                    let _ = locked
                        .set_len(0)
                        .and_then(|()| locked.rewind())
                        .and_then(|()| locked.write_all(note.as_bytes()));
                    return Ok(VmLock {
                        file: locked,
                        exclusive: matches!(how, FlockArg::LockExclusiveNonblock),
                    });
                }
                Err((mut f, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                    holder.clear();
                    let _ = f.rewind().and_then(|()| f.read_to_string(&mut holder));
                    if note_is_live(&holder) {
                        return Err(Error::Locked {
                            vm: vm.to_owned(),
                            holder: holder.trim().to_owned(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    file = f;
                }
                Err((_, errno)) => return Err(io("locking the VM", path)(errno.into())),
            }
        }
        Err(Error::Locked {
            vm: vm.to_owned(),
            holder: "another qsnap process".into(),
        })
    }
}

/// Whether a note names a process that still runs: a holder that crashed leaves its note
/// behind (nothing erases it), and the next holder has perhaps not written its own yet.
fn note_is_live(note: &str) -> bool {
    let Some(pid) = note
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let first = VmLock::acquire(&p, "vm1", "create s1").unwrap();
        match VmLock::acquire(&p, "vm1", "create s2") {
            Err(Error::Locked { vm, holder }) => {
                assert_eq!(vm, "vm1");
                assert_eq!(holder, format!("{} create s1", std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        let second = VmLock::acquire(&p, "vm1", "create s2").unwrap();
        drop(second);
        // A finished holder's note is gone: one refused before the next holder writes its own
        // never names the finished operation.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }

    #[test]
    fn the_last_shared_holder_erases_the_note() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = VmLock::acquire_shared(&p, "vm1", "clone s1 to a").unwrap();
        let b = VmLock::acquire_shared(&p, "vm1", "clone s1 to b").unwrap();
        drop(a);
        assert!(!std::fs::read_to_string(&p).unwrap().is_empty());
        drop(b);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }

    #[test]
    fn the_holder_is_read_without_taking_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        assert_eq!(read_holder(&p).unwrap(), None);
        let held = VmLock::acquire(&p, "vm1", "create s1").unwrap();
        let holder = read_holder(&p).unwrap().expect("a holder");
        assert_eq!(holder.operation, "create s1");
        assert_eq!(holder.pid, std::process::id());
        assert!(holder.since.is_some());
        // Reading did not take it: the holder still holds it alone.
        assert!(matches!(
            VmLock::acquire(&p, "vm1", "stop"),
            Err(Error::Locked { .. })
        ));
        drop(held);
        assert_eq!(read_holder(&p).unwrap(), None);
        // A note left by a process that is gone names no holder.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        std::fs::write(&p, format!("{pid} create s2\n")).unwrap();
        assert_eq!(read_holder(&p).unwrap(), None);
        // Nor one whose process was killed and not reaped yet (a zombie).
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        std::fs::write(&p, format!("{pid} create s3\n")).unwrap();
        assert!(read_holder(&p).unwrap().is_some());
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while crate::proc::alive_blocking(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} never died");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert_eq!(read_holder(&p).unwrap(), None);
        child.wait().unwrap();
    }

    #[test]
    fn a_note_from_a_dead_process_is_not_believed() {
        assert!(note_is_live(&format!("{} create s1\n", std::process::id())));
        assert!(!note_is_live(""));
        assert!(!note_is_live("garbage"));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!note_is_live(&format!("{pid} create s1")));
    }
}
