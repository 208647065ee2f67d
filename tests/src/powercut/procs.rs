//! What `/proc` says about the processes that use the power-cut filesystem: thread → process,
//! parent chains, start times (so a recycled pid is never killed), and who holds files in the
//! mount. Reads only, except [`kill_and_wait`], which signals only the processes it is given
//! and never the test process, its ancestors, init or a kernel thread.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

/// The fields of `/proc/<pid>/stat` that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    /// Clock ticks after boot: with the pid, names one process across pid reuse.
    pub starttime: u64,
}

/// Parses `/proc/<pid>/stat` (also valid for a thread id).
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(Stat {
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        starttime: fields.get(19)?.parse().ok()?,
    })
}

/// The command line of `pid`, arguments joined by spaces (empty when it cannot be read).
/// Never call it while a FUSE request waits: it takes the process's mmap lock.
pub(crate) fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .split('\0')
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The process (thread group) a thread belongs to. FUSE requests carry the calling *thread*'s
/// id, and QEMU and a tokio engine issue I/O from many threads.
pub(crate) fn tgid(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Kernel threads (kthreadd and its children) and the idle task: never a caller to kill.
pub(crate) fn is_kernel_thread(pid: u32, st: &Stat) -> bool {
    pid <= 2 || st.ppid == 2
}

/// Parent, grandparent, … of `pid` up to init, as far as they can be read.
pub(crate) fn ancestors(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut cur = pid;
    while out.len() < 64 {
        match stat(cur) {
            Some(s) if s.ppid != 0 => {
                out.push(s.ppid);
                cur = s.ppid;
            }
            _ => break,
        }
    }
    out
}

/// The processes with an open file, a memory mapping, a working directory or a root inside
/// `mountpoint` (like `fuser -m`), except the test process itself.
pub(crate) fn mount_users(mountpoint: &Path) -> Vec<u32> {
    let me = std::process::id();
    let inside = |p: &Path| p.starts_with(mountpoint);
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = entry.path();
        let mut uses = ["cwd", "root"]
            .iter()
            .any(|l| std::fs::read_link(base.join(l)).is_ok_and(|p| inside(&p)));
        if !uses {
            if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
                uses = fds
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| inside(&p)));
            }
        }
        if !uses {
            if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
                uses = maps.lines().any(|l| {
                    l.split_whitespace()
                        .nth(5)
                        .is_some_and(|p| inside(Path::new(p)))
                });
            }
        }
        if uses {
            out.push(pid);
        }
    }
    out
}

/// True when `pid` no longer runs: gone, a zombie (its files are closed), or a different
/// process by now.
pub(crate) fn ended(pid: u32, starttime: u64) -> bool {
    match stat(pid) {
        None => true,
        Some(s) => s.starttime != starttime || matches!(s.state, 'Z' | 'X' | 'x'),
    }
}

/// SIGSTOPs every `(pid, starttime)` that still names the same running process, then every
/// process descended from one of them, until a scan of `/proc` finds no new descendant.
/// Returns all of them (the ones given first). A power loss takes a process tree at one
/// instant; killing it process by process would let a child forked in between (a QEMU still
/// loading its libraries, with no file in the mount yet) outlive its parent and run on after
/// the "power cut". Stopped first, a parent forks no more and its children keep it as their
/// parent, so the scan finds them all. Never stops the test process, its ancestors, init or
/// a kernel thread.
pub(crate) fn freeze_tree(targets: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let me = std::process::id();
    let protected: Vec<u32> = ancestors(me);
    let mut frozen: Vec<(u32, u64)> = Vec::new();
    let stop = |pid: u32, start: u64, frozen: &mut Vec<(u32, u64)>| {
        if pid == me || protected.contains(&pid) || frozen.iter().any(|&(p, _)| p == pid) {
            return;
        }
        let Some(st) = stat(pid) else { return };
        if st.starttime != start || is_kernel_thread(pid, &st) {
            return;
        }
        let Ok(raw) = i32::try_from(pid) else { return };
        if kill(Pid::from_raw(raw), Signal::SIGSTOP).is_ok() {
            frozen.push((pid, start));
        }
    };
    for &(pid, start) in targets {
        stop(pid, start, &mut frozen);
    }
    // A fork in flight when its parent stopped finishes; its child then shows up here (and
    // is stopped in turn). Bounded: a tree cannot grow once every member is stopped.
    for _ in 0..64 {
        let before = frozen.len();
        for (pid, st) in all_processes() {
            if frozen.iter().any(|&(p, _)| p == st.ppid) {
                stop(pid, st.starttime, &mut frozen);
            }
        }
        if frozen.len() == before {
            break;
        }
    }
    frozen
}

/// Every process `/proc` lists, with its stat (those that vanish while read are skipped).
fn all_processes() -> Vec<(u32, Stat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect()
}

/// SIGKILLs every `(pid, starttime)` that still names the same running process, then waits
/// up to `timeout` for all of them to end. Returns the ones still running at the deadline.
pub(crate) fn kill_and_wait(targets: &[(u32, u64)], timeout: Duration) -> Vec<u32> {
    let me = std::process::id();
    let protected: Vec<u32> = ancestors(me);
    let mut waiting = Vec::new();
    for &(pid, start) in targets {
        if pid == me || protected.contains(&pid) {
            continue;
        }
        let Some(st) = stat(pid) else { continue };
        if st.starttime != start || is_kernel_thread(pid, &st) {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
            waiting.push((pid, start));
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        waiting.retain(|&(pid, start)| !ended(pid, start));
        if waiting.is_empty() || Instant::now() >= deadline {
            return waiting.into_iter().map(|(p, _)| p).collect();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let st = stat(me).unwrap();
        assert!(st.starttime > 0);
        assert_eq!(tgid(me), Some(me));
        assert!(!ancestors(me).is_empty());
        assert!(!is_kernel_thread(me, &st));
    }

    #[test]
    fn freezes_a_tree_with_its_grandchild_then_kills_it_all() {
        // sh forks sleep; the tree is frozen from sh alone and must include the sleep.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = stat(pid).unwrap().starttime;
        let deadline = Instant::now() + Duration::from_secs(10);
        let grandchild = loop {
            let kids: Vec<u32> = all_processes()
                .into_iter()
                .filter(|(_, st)| st.ppid == pid)
                .map(|(p, _)| p)
                .collect();
            if let Some(&k) = kids.first() {
                break k;
            }
            assert!(Instant::now() < deadline, "sh never forked");
            std::thread::sleep(Duration::from_millis(10));
        };
        let frozen = freeze_tree(&[(pid, start)]);
        assert!(frozen.iter().any(|&(p, _)| p == pid), "{frozen:?}");
        assert!(frozen.iter().any(|&(p, _)| p == grandchild), "{frozen:?}");
        let left = kill_and_wait(&frozen, Duration::from_secs(10));
        assert!(left.is_empty(), "still running: {left:?}");
        child.wait().unwrap();
    }

    #[test]
    fn kills_a_child_and_sees_it_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = stat(pid).unwrap().starttime;
        // A recycled pid (other start time) is left alone.
        assert!(kill_and_wait(&[(pid, start + 1)], Duration::ZERO).is_empty());
        assert!(!ended(pid, start));
        let left = kill_and_wait(&[(pid, start)], Duration::from_secs(10));
        assert!(left.is_empty(), "still running: {left:?}");
        child.wait().unwrap();
    }
}
