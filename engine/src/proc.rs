//! What `/proc` says about a process: whether it runs, when it started, whether it is a QEMU.
//! A leaf: it reads `/proc` and nothing else, and never signals or changes a process.

/// The state letter and the start time (clock ticks since boot) from a `/proc/<pid>/stat`
/// line. The fields are counted after the command name, which may hold spaces and
/// parentheses: state is the 3rd field of the line, starttime the 22nd.
fn parse_stat(stat: &str) -> Option<(&str, Option<u64>)> {
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?;
    Some((state, rest.nth(18).and_then(|s| s.parse().ok())))
}

/// Whether a `stat` line is of a process that runs (a zombie, exited but not reaped, does not).
fn runs(stat: &str) -> bool {
    parse_stat(stat).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// True while `pid` runs (a zombie counts as gone).
pub(crate) async fn alive(pid: u32) -> bool {
    tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .is_ok_and(|s| runs(&s))
}

/// [`alive`] for callers that hold no runtime (the lock file's holder check).
pub(crate) fn alive_blocking(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| runs(&s))
}

/// When `pid` started (clock ticks since boot, field 22 of `/proc/<pid>/stat`): with the pid,
/// it names one process for good, even after the kernel reuses the number.
pub(crate) async fn start_time(pid: u32) -> Option<u64> {
    let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .ok()?;
    parse_stat(&stat)?.1
}

/// Whether `pid` is a QEMU (guards against signalling a recycled pid).
pub(crate) async fn is_qemu(pid: u32) -> bool {
    tokio::fs::read(format!("/proc/{pid}/cmdline"))
        .await
        .ok()
        .and_then(|c| {
            let first = c.split(|&b| b == 0).next()?.to_vec();
            Some(String::from_utf8_lossy(&first).contains("qemu"))
        })
        .unwrap_or(false)
}

/// Whether the process `pid` that started at `start` still exists and is not a zombie. Unlike
/// [`is_recorded_qemu`] it asks nothing of the process's memory: a process being torn down
/// after SIGKILL has lost its command line (so it no longer looks like a QEMU) well before
/// it is gone.
pub(crate) async fn still_runs(pid: u32, start: u64) -> bool {
    tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .is_ok_and(|s| runs(&s) && parse_stat(&s).and_then(|(_, t)| t) == Some(start))
}

/// Whether `pid` is still the QEMU that was recorded: alive, a QEMU, and (when its start time
/// was recorded) the same process.
pub(crate) async fn is_recorded_qemu(pid: u32, start: Option<u64>) -> bool {
    if !alive(pid).await || !is_qemu(pid).await {
        return false;
    }
    match start {
        Some(s) => start_time(pid).await == Some(s),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 20 21";
        for name in ["qemu", "a b", "x) (y", ")"] {
            let line = format!("77 ({name}) {tail}");
            assert_eq!(parse_stat(&line), Some(("S", Some(4242))), "{line}");
            assert!(runs(&line));
        }
        assert!(!runs(&format!("77 (q) Z {}", &tail[2..])));
        assert!(!runs("garbage"));
        let me = std::process::id();
        assert!(alive_blocking(me));
    }

    #[tokio::test]
    async fn this_process_runs_and_has_a_start_time() {
        let me = std::process::id();
        assert!(alive(me).await);
        assert!(start_time(me).await.is_some());
        assert!(!is_qemu(me).await);
    }

    /// A killed process runs until it is a zombie, and its pid with another start time is
    /// not it.
    #[tokio::test]
    async fn a_killed_process_stops_running_when_it_is_a_zombie() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = start_time(pid).await.unwrap();
        assert!(still_runs(pid, start).await);
        assert!(!still_runs(pid, start + 1).await);
        child.kill().unwrap();
        // Not reaped: a zombie, which no longer runs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while still_runs(pid, start).await {
            assert!(std::time::Instant::now() < deadline, "pid {pid} still runs");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!alive(pid).await);
        child.wait().unwrap();
        assert!(!still_runs(pid, start).await);
    }
}
