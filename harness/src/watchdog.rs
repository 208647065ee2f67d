//! Killing the QEMUs of the harness's VMs: in this process (a [`crate::Fork`] or
//! [`crate::Golden`] dropped, also during a panic), and from a watchdog process once this
//! process is gone however it went (a golden in a `static` is never dropped; an abort runs no
//! destructor).
//!
//! A QEMU is known by what was written when it started, in the VM's directory of the
//! harness's own store: the harness's own note (`harness-qemu.json`, written by
//! [`launcher`] the moment QEMU is spawned — before the wait for its monitor, during which the
//! test process may die), the record's `pid` and `pid-start` (`vm.json`), and an unfinished
//! revert's `new-pid` and `new-pid-start` (`journal.json`). It is killed only while
//! `/proc/<pid>/stat` (field 22, the start time) still shows that very process, and only if
//! it is this user's.
//!
//! What this module must never do: pick a process by its command line or its name, kill a
//! process whose start time differs from the record's (the pid was given to another
//! process), kill a process a record outside the harness's store names, or kill itself or the
//! test process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A process, told apart from any later one given its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Process {
    pid: u32,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    start: u64,
}

impl Process {
    /// This process.
    fn me() -> Option<Process> {
        let pid = std::process::id();
        Some(Process {
            pid,
            start: start_time(pid)?,
        })
    }
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`), if it exists and has not
/// ended (a zombie has).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state …`: the name may hold spaces and parentheses; what follows the last
    // `)` is plain fields, from field 3 (the state) on.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Which VMs of a store's `vms/` directory.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Vms<'a> {
    /// The VM of that name.
    Named(&'a str),
    /// Every VM whose name starts so (`""`: every VM).
    Prefixed(&'a str),
}

impl Vms<'_> {
    /// Their directories in `vms`.
    fn dirs(self, vms: &Path) -> Vec<PathBuf> {
        match self {
            Vms::Named(name) => vec![vms.join(name)],
            Vms::Prefixed(prefix) => std::fs::read_dir(vms)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// What a watchdog removes once it has killed the QEMUs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Remove<'a> {
    /// Nothing (a cached golden stays for the next process).
    Nothing,
    /// The directories of the VMs it watches.
    TheVms,
    /// This directory (a private store's).
    Dir(&'a Path),
}

/// The harness's note of the QEMU it last spawned for a VM, in the VM's directory.
pub(crate) const SPAWNED: &str = "harness-qemu.json";

/// The launcher every QEMU of the harness is started with: the engine's process launcher,
/// which tells it each QEMU's pid the moment it is spawned; noted (with its start time) in
/// the VM's directory, where [`kill_qemus_of`] and the watchdog find it.
pub(crate) fn launcher() -> qsnap_engine::launch::ProcessLauncher {
    let mut l = qsnap_engine::launch::ProcessLauncher::default();
    l.on_spawn = Some(std::sync::Arc::new(|spec, pid| {
        let (Some(dir), Some(start)) = (spec.log.parent(), start_time(pid)) else {
            return;
        };
        let note = serde_json::json!({ "pid": pid, "pid-start": start });
        if let Err(e) = std::fs::write(dir.join(SPAWNED), note.to_string()) {
            tracing::warn!(error = %e, pid, "could not note a QEMU the harness started");
        }
    }));
    l
}

/// The QEMUs the files of the VM directory `dir` record.
fn recorded(dir: &Path) -> Vec<Process> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
    };
    let pair = |v: &serde_json::Value, pid: &str, start: &str| {
        Some(Process {
            pid: u32::try_from(v[pid].as_u64()?).ok()?,
            start: v[start].as_u64()?,
        })
    };
    let mut out = Vec::new();
    if let Some(note) = read(SPAWNED) {
        out.extend(pair(&note, "pid", "pid-start"));
    }
    if let Some(record) = read("vm.json") {
        out.extend(pair(&record, "pid", "pid-start"));
    }
    if let Some(journal) = read("journal.json") {
        out.extend(pair(&journal["intent"], "new-pid", "new-pid-start"));
    }
    out
}

/// SIGKILLs `p` if it is still that very process (same start time), this user's, and not this
/// process; whether it did. (Left open: the pid freed and given again in the instant between
/// the check and the signal.)
fn kill_if_same(p: Process) -> bool {
    use std::os::unix::fs::MetadataExt;
    if p.pid == std::process::id() || start_time(p.pid) != Some(p.start) {
        return false;
    }
    let mine = std::fs::metadata(format!("/proc/{}", p.pid))
        .is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw());
    let (true, Ok(pid)) = (mine, i32::try_from(p.pid)) else {
        return false;
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}

/// SIGKILLs each of `processes` that is still that very process ([`kill_if_same`]), then
/// waits until those have ended (at most 5 s): a SIGKILLed QEMU takes a moment to go, and
/// what the caller removes next must no longer be in use.
fn kill_all(processes: Vec<Process>) {
    let killed: Vec<Process> = processes.into_iter().filter(|&p| kill_if_same(p)).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|p| start_time(p.pid) == Some(p.start)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILLs the QEMUs the VM directory `dir` records and waits until they have ended,
/// synchronously: it runs in `Drop`, also while a test panics.
pub(crate) fn kill_qemus_of(dir: &Path) {
    kill_all(recorded(dir));
}

/// SIGKILLs the QEMUs of the VMs `which` of the `vms` directory, as [`kill_qemus_of`].
pub(crate) fn kill_qemus(vms: &Path, which: Vms<'_>) {
    kill_all(which.dirs(vms).iter().flat_map(|d| recorded(d)).collect());
}

/// Does what [`kill_qemus`] does, and removes `remove`, once `parent` has ended: polls its
/// `/proc/<pid>/stat` every half second, ended when gone, a zombie, or another process (start
/// time). POSIX `sh`, `cat`, `sed`, `sleep`, `kill` and `rm` only.
const SCRIPT: &str = r#"start_of() {
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*)}
  set -- $s
  case $1 in Z|X|x) return 0 ;; esac
  echo "${20}"
}
while [ "$(start_of "$QSNAP_H_PID")" = "$QSNAP_H_START" ]; do sleep 0.5; done
num() {
  sed -n "s/.*\"$2\" *: *\([0-9][0-9]*\).*/\1/p" "$1" 2>/dev/null | head -n 1
}
kill_recorded() {
  pid=$(num "$1" "$2")
  start=$(num "$1" "$3")
  if [ -n "$pid" ] && [ -n "$start" ] && [ "$pid" != "$$" ] && [ -O "/proc/$pid" ] \
    && [ "$(start_of "$pid")" = "$start" ]; then
    kill -9 "$pid" 2>/dev/null
  fi
}
for d in "$QSNAP_H_VMS/$QSNAP_H_NAME"$QSNAP_H_ANY; do
  [ -d "$d" ] || continue
  kill_recorded "$d/harness-qemu.json" pid pid-start
  kill_recorded "$d/vm.json" pid pid-start
  kill_recorded "$d/journal.json" new-pid new-pid-start
done
case $QSNAP_H_RM in
  vms) sleep 0.2
    for d in "$QSNAP_H_VMS/$QSNAP_H_NAME"$QSNAP_H_ANY; do
      [ -d "$d" ] && rm -rf -- "$d"
    done ;;
  dir) sleep 0.2; rm -rf -- "$QSNAP_H_DIR" ;;
esac"#;

/// Starts a watchdog process: when this process is gone, however it went, it SIGKILLs the
/// QEMUs the VMs `which` of `vms` record then (pid and start time, as [`kill_qemus`] does),
/// and removes `remove`. This is what cleans up after a golden in a `static`, never dropped.
/// It runs until this process ends, unless [`Watchdog::dismiss`]ed.
pub(crate) fn watchdog(vms: &Path, which: Vms<'_>, remove: Remove<'_>) -> Option<Watchdog> {
    let spawned = match Process::me() {
        Some(me) => spawn(me, vms, which, remove),
        None => Err(std::io::Error::other(
            "this process's start time is unreadable",
        )),
    };
    match spawned {
        Ok(child) => Some(Watchdog(child)),
        Err(e) => {
            tracing::warn!(error = %e, "no watchdog: a golden VM that is never dropped outlives the test process");
            None
        }
    }
}

/// A watchdog process (a child of this process). Dropped, it keeps watching.
#[derive(Debug)]
pub(crate) struct Watchdog(std::process::Child);

impl Watchdog {
    /// Ends it before it acts: what it watches is no longer this process's to clean up (a
    /// cached golden built and stopped; the next QEMU of that VM may be another process's).
    pub(crate) fn dismiss(mut self) {
        // Its own child, not yet waited for: the pid cannot have been given to another.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The watchdog for `parent`.
fn spawn(
    parent: Process,
    vms: &Path,
    which: Vms<'_>,
    remove: Remove<'_>,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let (name, any) = match which {
        Vms::Named(name) => (name, ""),
        Vms::Prefixed(prefix) => (prefix, "*"),
    };
    let (rm, dir) = match remove {
        Remove::Nothing => ("", Path::new("")),
        Remove::TheVms => ("vms", Path::new("")),
        Remove::Dir(d) => ("dir", d),
    };
    std::process::Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .env("QSNAP_H_PID", parent.pid.to_string())
        .env("QSNAP_H_START", parent.start.to_string())
        .env("QSNAP_H_VMS", vms)
        .env("QSNAP_H_NAME", name)
        .env("QSNAP_H_ANY", any)
        .env("QSNAP_H_RM", rm)
        .env("QSNAP_H_DIR", dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Its own process group: a Ctrl-C to the test run does not stop it before it cleans.
        .process_group(0)
        .spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};

    /// The name `/proc/<pid>/stat` shows.
    fn comm(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()
    }

    /// `program ARGS…`, quiet, once it has exec'd (its start time read).
    fn started(program: &Path, args: &[&str]) -> (Child, Process) {
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until it has exec'd (a fresh child still shows this process's name).
        let mine = comm(std::process::id());
        for _ in 0..200 {
            if comm(pid) != mine {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let start = start_time(pid).unwrap();
        (child, Process { pid, start })
    }

    /// A VM directory `vms/name` whose record names `p` (pid and start time).
    fn record(vms: &Path, name: &str, p: Process) {
        std::fs::create_dir_all(vms.join(name)).unwrap();
        let json = serde_json::json!({"name": name, "pid": p.pid, "pid-start": p.start});
        std::fs::write(
            vms.join(name).join("vm.json"),
            serde_json::to_vec_pretty(&json).unwrap(),
        )
        .unwrap();
    }

    fn sleep_binary() -> PathBuf {
        ["/bin/sleep", "/usr/bin/sleep"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap()
    }

    fn alive(c: &mut Child) -> bool {
        c.try_wait().unwrap().is_none()
    }

    fn killed_by_sigkill(c: &mut Child) -> bool {
        c.wait().unwrap().signal() == Some(9)
    }

    fn end(mut c: Child) {
        let _ = c.kill();
        let _ = c.wait();
    }

    #[test]
    fn only_qemus_the_store_records_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("store/vms");
        // Someone's process naming the directory, and a "QEMU" (a program whose name says
        // so) naming it: only a record in the store makes a process the harness's.
        let qemu = dir.path().join("qemu-system-fake");
        std::os::unix::fs::symlink("/bin/sh", &qemu).unwrap();
        let serial = dir.path().join("serial.log").display().to_string();
        let sock = dir.path().join("qmp.sock").display().to_string();
        let (mut theirs, their_p) = started(Path::new("/bin/sh"), &["-c", "sleep 30", &serial]);
        let (mut ours, our_p) = started(&qemu, &["-c", "sleep 30", &sock]);
        let (mut stranger, _) = started(&qemu, &["-c", "sleep 30", &sock]);
        record(&vms, "f1", our_p);
        // A record naming their pid with another start time: the pid of a QEMU long gone,
        // given to someone else since.
        record(
            &vms,
            "f2",
            Process {
                pid: their_p.pid,
                start: their_p.start + 1,
            },
        );
        kill_qemus(&vms, Vms::Prefixed(""));
        assert!(killed_by_sigkill(&mut ours));
        assert!(
            alive(&mut theirs),
            "a process that is not the harness's was killed"
        );
        assert!(alive(&mut stranger), "a QEMU no record names was killed");
        end(theirs);
        end(stranger);
    }

    #[test]
    fn the_watchdog_acts_once_its_process_is_gone_and_only_on_what_it_watches() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        // A name with spaces and parentheses, as a stat line shows it: `pid (q) (x) S …`.
        let odd = dir.path().join("q) (x");
        std::os::unix::fs::symlink(sleep_binary(), &odd).unwrap();
        let (parent, parent_p) = started(&sleep_binary(), &["30"]);
        let (mut ours, our_p) = started(&odd, &["30"]);
        let (mut other_vm, other_p) = started(&sleep_binary(), &["30"]);
        let (mut reused, reused_p) = started(&sleep_binary(), &["30"]);
        record(&vms, "f1-1", our_p);
        record(&vms, "other", other_p);
        record(
            &vms,
            "f1-2",
            Process {
                pid: reused_p.pid,
                start: reused_p.start + 1,
            },
        );
        let mut dog = spawn(parent_p, &vms, Vms::Prefixed("f1-"), Remove::TheVms).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(alive(&mut ours), "killed while its process runs");
        assert!(alive(&mut dog));
        end(parent);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(&mut dog) {
            assert!(Instant::now() < deadline, "the watchdog did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(killed_by_sigkill(&mut ours));
        assert!(alive(&mut other_vm), "a VM it does not watch lost its QEMU");
        assert!(
            alive(&mut reused),
            "a process with another start time was killed"
        );
        assert!(!vms.join("f1-1").exists() && !vms.join("f1-2").exists());
        assert!(vms.join("other").exists());
        end(other_vm);
        end(reused);
    }

    #[test]
    fn a_watchdog_kills_a_named_vm_only_or_everything_and_removes_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("qsnap-h-x");
        let vms = root.join("store/vms");
        let (mut golden, golden_p) = started(&sleep_binary(), &["30"]);
        let (mut fork, fork_p) = started(&sleep_binary(), &["30"]);
        record(&vms, "golden", golden_p);
        record(&vms, "goldenish", fork_p);
        // The golden VM only, nothing removed.
        let (parent, parent_p) = started(&sleep_binary(), &["30"]);
        let mut named = spawn(parent_p, &vms, Vms::Named("golden"), Remove::Nothing).unwrap();
        end(parent);
        assert!(named.wait().unwrap().success());
        assert!(killed_by_sigkill(&mut golden));
        assert!(
            alive(&mut fork),
            "a VM whose name only starts like it lost its QEMU"
        );
        assert!(vms.join("golden").exists());
        // Every VM, then the whole store.
        let (parent, parent_p) = started(&sleep_binary(), &["30"]);
        let mut all = spawn(parent_p, &vms, Vms::Prefixed(""), Remove::Dir(&root)).unwrap();
        end(parent);
        assert!(all.wait().unwrap().success());
        assert!(killed_by_sigkill(&mut fork));
        assert!(!root.exists());
    }

    #[test]
    fn a_dismissed_watchdog_kills_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        let (mut golden, golden_p) = started(&sleep_binary(), &["30"]);
        record(&vms, "golden", golden_p);
        let (parent, parent_p) = started(&sleep_binary(), &["30"]);
        let dog = spawn(parent_p, &vms, Vms::Named("golden"), Remove::Nothing).unwrap();
        Watchdog(dog).dismiss();
        end(parent);
        std::thread::sleep(Duration::from_millis(1200));
        assert!(alive(&mut golden), "a dismissed watchdog killed");
        end(golden);
    }

    /// A QEMU is known from the moment it is spawned, not only once its monitor answers and
    /// the engine records it: a test process that dies during that wait leaves nothing.
    #[tokio::test]
    async fn a_qemu_still_waiting_for_its_monitor_is_known_and_killed() {
        use qsnap_engine::launch::{LaunchSpec, Launcher};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vms").join("f1");
        std::fs::create_dir_all(&dir).unwrap();
        // A "QEMU" whose monitor never answers: `sh -c 'exec sleep 60'` ignores the monitor
        // arguments the launcher appends.
        let spec = LaunchSpec {
            vm: "f1".into(),
            command: qsnap_engine::store::LaunchCommand {
                argv: vec!["sh".into(), "-c".into(), "exec sleep 60".into()],
                cwd: tmp.path().to_owned(),
            },
            disks: Vec::new(),
            qmp_socket: dir.join("qmp.sock"),
            incoming: false,
            paused: false,
            machine: None,
            log: dir.join("qemu.log"),
            ram: None,
        };
        let mut l = launcher();
        l.ready_timeout = Duration::from_secs(60);
        let launch = tokio::spawn(async move { l.launch(&spec).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while recorded(&dir).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the spawned QEMU was never noted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let noted = recorded(&dir);
        assert_eq!(noted.len(), 1, "{noted:?}");
        // The test process "dies" here: what it would run on drop kills the noted process.
        kill_qemus_of(&dir);
        assert_eq!(start_time(noted[0].pid), None, "still running");
        let err = tokio::time::timeout(Duration::from_secs(10), launch)
            .await
            .expect("the launch did not notice its QEMU had gone")
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("QEMU exited"), "{err}");
    }

    #[test]
    fn the_start_time_is_field_22() {
        let me = Process::me().unwrap();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat.split_whitespace().collect();
        // The test binary's name has no spaces: plain splitting finds field 22 too.
        assert_eq!(fields[21].parse::<u64>().unwrap(), me.start);
        assert_eq!(start_time(u32::MAX), None);
    }
}
