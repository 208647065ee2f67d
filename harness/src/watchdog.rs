//! Killing the QEMUs of the harness's store: in this process (a [`crate::Fork`] or
//! [`crate::Golden`] dropped, also during a panic), and from a watchdog process once this
//! process is gone however it went (a golden in a `static` is never dropped; an abort runs no
//! destructor).
//!
//! What this module must never do: kill a process that is not a QEMU of this user.

use std::path::Path;

/// SIGKILLs every process whose command line contains `needle` (QEMUs of the harness's
/// store), synchronously: it runs in `Drop`, also while a test panics.
pub(crate) fn kill_matching(needle: &str) {
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
pub(crate) fn watchdog(pattern: &str, remove: Option<&str>) {
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
}
