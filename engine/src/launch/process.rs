//! QEMU as a process: start the recorded command line detached (its own process group, output
//! to a log file, so it outlives qsnap and ignores qsnap's Ctrl-C), wait until its monitor
//! answers, and stop it — `quit` first (SIGTERM when its monitor does not answer), then
//! SIGKILL after a timeout — saying which it took ([`StopOutcome`]). It never reports a QEMU
//! stopped that it could not stop.

use super::{argv, LaunchSpec, Launched, Launcher};
use crate::error::{Error, Result};
use crate::proc::{alive, is_qemu};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qsnap_qmp::{types, ConnectOptions, Endpoint, Qmp};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Called with the spec and the pid of a QEMU just spawned, before the wait for its monitor:
/// a caller that must be able to clean up after itself (a test harness whose process may die
/// during that wait) learns the pid as soon as it exists. It must not block.
pub type SpawnHook = std::sync::Arc<dyn Fn(&LaunchSpec, u32) + Send + Sync>;

/// Runs the recorded command line as a detached process.
#[derive(Clone)]
#[non_exhaustive]
pub struct ProcessLauncher {
    /// How long QEMU may take until its monitor answers.
    pub ready_timeout: Duration,
    /// Told each QEMU's pid right after it is spawned.
    pub on_spawn: Option<SpawnHook>,
}

impl std::fmt::Debug for ProcessLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessLauncher")
            .field("ready_timeout", &self.ready_timeout)
            .field("on_spawn", &self.on_spawn.is_some())
            .finish()
    }
}

impl Default for ProcessLauncher {
    fn default() -> Self {
        ProcessLauncher {
            ready_timeout: Duration::from_secs(30),
            on_spawn: None,
        }
    }
}

/// The command line a spec asks for.
pub fn build_argv(spec: &LaunchSpec) -> Result<Vec<String>> {
    let cmd = &spec.command;
    let mut a = argv::remove_flag(&cmd.argv, "incoming");
    a = argv::substitute_disks(&a, &cmd.cwd, &spec.disks)?;
    if let Some(m) = &spec.machine {
        a = super::machine::pin(&a, m)?;
    }
    if let Some(ram) = &spec.ram {
        a = ram.apply(&a).map_err(|why| Error::CommandLine { why })?;
    }
    if !argv::has_qmp_socket(&a, &spec.qmp_socket) {
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", spec.qmp_socket.display()),
        ]);
    }
    if spec.incoming {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    if spec.paused && !a.iter().any(|x| x == "-S") {
        a.push("-S".into());
    }
    Ok(a)
}

/// The last lines of a QEMU log (for an error that says why QEMU did not come up).
pub(crate) async fn log_tail(log: &Path) -> String {
    let text = tokio::fs::read_to_string(log).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

impl Launcher for ProcessLauncher {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Launched> {
        let argv = build_argv(spec)?;
        let log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .await
            .map_err(|source| Error::Io {
                what: "opening QEMU's log",
                path: spec.log.clone(),
                source,
            })?
            .into_std()
            .await;
        let log2 = log.try_clone().map_err(|source| Error::Io {
            what: "opening QEMU's log",
            path: spec.log.clone(),
            source,
        })?;
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(&spec.command.cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| Error::Io {
                what: "starting QEMU",
                path: argv[0].clone().into(),
                source,
            })?;
        let pid = child.id();
        if let (Some(hook), Some(pid)) = (&self.on_spawn, pid) {
            hook(spec, pid);
        }
        let daemonizes = argv.iter().any(|a| a == "-daemonize");
        let why = match wait_ready(
            &mut child,
            &spec.qmp_socket,
            self.ready_timeout,
            daemonizes,
            None,
        )
        .await
        {
            Ok(qmp) => {
                drop(qmp);
                return Ok(Launched {
                    pid: if daemonizes { None } else { pid },
                    argv,
                });
            }
            Err(NotReady::Exited(status)) => format!("QEMU exited ({status})"),
            Err(NotReady::TimedOut(after) | NotReady::Cancelled(after)) => {
                format!("its monitor did not answer within {after:?}")
            }
        };
        Err(Error::LaunchFailed {
            why,
            log: spec.log.clone(),
            tail: log_tail(&spec.log).await,
        })
    }
}

/// Why a QEMU that was started did not come up.
#[derive(Debug)]
pub(crate) enum NotReady {
    /// It exited.
    Exited(std::process::ExitStatus),
    /// Its monitor did not answer within this long (it was killed).
    TimedOut(Duration),
    /// The operation was cancelled after this long (it was killed).
    Cancelled(Duration),
}

/// Waits until the monitor of a QEMU just started as `child` answers at `socket`: the one
/// ready loop for every QEMU qsnap starts (a VM, the lazy-RAM helper). A QEMU that does not
/// come up in time, or whose start is cancelled, is killed and reaped; with `daemonizes`, a
/// parent that exits 0 has handed over to its daemon and the wait goes on.
pub(crate) async fn wait_ready(
    child: &mut tokio::process::Child,
    socket: &Path,
    timeout: Duration,
    daemonizes: bool,
    cancel: Option<&CancellationToken>,
) -> std::result::Result<Qmp, NotReady> {
    let started = Instant::now();
    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        ..ConnectOptions::default()
    };
    loop {
        if let Ok(qmp) = Qmp::connect_with(socket.to_owned(), &opts).await {
            return Ok(qmp);
        }
        if let Ok(Some(status)) = child.try_wait() {
            if !(daemonizes && status.success()) {
                return Err(NotReady::Exited(status));
            }
        }
        let why = if started.elapsed() > timeout {
            Some(NotReady::TimedOut(timeout))
        } else if cancel.is_some_and(CancellationToken::is_cancelled) {
            Some(NotReady::Cancelled(started.elapsed()))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(why);
        }
        // QEMU creates its socket within tens of milliseconds: poll finely, a revert waits on
        // this.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    !alive(pid).await
}

/// How a QEMU was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// It quit when asked over its monitor (`quit`).
    Quit {
        /// Its pid, when known.
        pid: Option<u32>,
    },
    /// It was signalled: SIGTERM when its monitor could not be reached (QEMU shuts down on it
    /// as on `quit`), SIGKILL when it did not exit in time.
    Killed {
        /// Its pid.
        pid: u32,
        /// The signal that ended it.
        signal: KillSignal,
        /// Why it was not simply asked to quit, or why asking was not enough.
        why: String,
    },
    /// No QEMU was running.
    AlreadyStopped,
}

/// The signal that ended a QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillSignal {
    /// SIGTERM: QEMU shuts down cleanly (disks flushed).
    Term,
    /// SIGKILL: QEMU did not exit on its own.
    Kill,
}

impl std::fmt::Display for KillSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KillSignal::Term => "SIGTERM",
            KillSignal::Kill => "SIGKILL",
        })
    }
}

/// Stops a QEMU and says how: `quit` over its monitor, then SIGKILL if it is still there
/// after `timeout`; a QEMU whose monitor does not answer gets SIGTERM instead (no `quit` is
/// coming), then SIGKILL. `pid` is signalled only while it is still a QEMU. Without a pid
/// (a TCP monitor) a QEMU that answers is watched until its monitor goes; one that does not
/// answer cannot be stopped, and that is an [`Error::StopFailed`], never "stopped".
pub async fn quit_or_kill(
    endpoint: &str,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<StopOutcome> {
    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        greeting_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    // A recorded pid may have been reused by another program since: only a QEMU is signalled.
    let pid = match pid {
        Some(p) if alive(p).await && is_qemu(p).await => Some(p),
        _ => None,
    };
    let failed = |why: String| Error::StopFailed {
        endpoint: endpoint.to_owned(),
        pid,
        why,
    };
    match Qmp::connect_with(Endpoint::parse(endpoint), &opts).await {
        Ok(qmp) => {
            // QEMU may close the socket before it answers; either way it is on its way out.
            let _ = qmp.execute(types::quit {}).await;
            drop(qmp);
            match pid {
                Some(pid) if wait_gone(pid, timeout).await => {
                    Ok(StopOutcome::Quit { pid: Some(pid) })
                }
                Some(pid) => {
                    kill_hard(
                        pid,
                        format!("it did not quit within {timeout:?} of `quit`"),
                        failed,
                    )
                    .await
                }
                None if monitor_gone(endpoint, timeout).await => {
                    Ok(StopOutcome::Quit { pid: None })
                }
                None => Err(failed(format!(
                    "it was asked to quit, but its monitor still answers after {timeout:?}, and \
                     its pid is unknown (a TCP monitor?), so qsnap cannot kill it; kill it \
                     yourself, then run `qsnap stop` again to record it"
                ))),
            }
        }
        Err(e) => match pid {
            None if nobody_serves(&e) => Ok(StopOutcome::AlreadyStopped),
            None => Err(failed(format!(
                "its monitor does not answer ({e}) and its pid is unknown (a TCP monitor?), so \
                 qsnap cannot signal it; stop it through whatever holds its monitor, or kill it \
                 yourself, then run `qsnap stop` again to record it"
            ))),
            Some(pid) => {
                let why = unanswered(&e);
                signal(pid, Signal::SIGTERM).await;
                if wait_gone(pid, timeout).await {
                    return Ok(StopOutcome::Killed {
                        pid,
                        signal: KillSignal::Term,
                        why,
                    });
                }
                kill_hard(
                    pid,
                    format!("{why}, and it did not exit within {timeout:?} of SIGTERM"),
                    failed,
                )
                .await
            }
        },
    }
}

/// How long `quit` may take before QEMU is killed, for the engine's own stops.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops a QEMU ([`quit_or_kill`]); true if it had to be signalled.
pub async fn stop_qemu(endpoint: &str, pid: Option<u32>, timeout: Duration) -> Result<bool> {
    Ok(matches!(
        quit_or_kill(endpoint, pid, timeout).await?,
        StopOutcome::Killed { .. }
    ))
}

/// Why a monitor did not let qsnap ask QEMU to quit, in words.
fn unanswered(e: &qsnap_qmp::Error) -> String {
    match e {
        qsnap_qmp::Error::GreetingTimeout { .. } => {
            "its monitor did not answer (another client probably holds it)".into()
        }
        qsnap_qmp::Error::Connect { io, .. } if io.kind() == std::io::ErrorKind::WouldBlock => {
            "its monitor did not answer (its queue of waiting clients is full: another client \
             holds it)"
                .into()
        }
        _ => format!("its monitor could not be reached ({e})"),
    }
}

/// Sends `sig` to `pid` if it is (still) a QEMU.
async fn signal(pid: u32, sig: Signal) {
    if is_qemu(pid).await {
        if sig == Signal::SIGKILL {
            warn!(pid, "QEMU did not exit in time; killing it");
        } else {
            info!(pid, signal = %sig, "signalling QEMU");
        }
        if let Ok(raw) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(raw), sig);
        }
    }
}

/// SIGKILL, and the proof that it worked.
async fn kill_hard(
    pid: u32,
    why: String,
    failed: impl FnOnce(String) -> Error,
) -> Result<StopOutcome> {
    signal(pid, Signal::SIGKILL).await;
    if wait_gone(pid, Duration::from_secs(10)).await {
        Ok(StopOutcome::Killed {
            pid,
            signal: KillSignal::Kill,
            why,
        })
    } else {
        Err(failed(format!(
            "{why}; it did not exit even after SIGKILL (stuck in the kernel? see /proc/{pid}/stack)"
        )))
    }
}

/// A connect error that means no process serves the endpoint (rather than one that does not
/// answer, or a network that cannot tell).
pub(crate) fn nobody_serves(e: &qsnap_qmp::Error) -> bool {
    match e {
        qsnap_qmp::Error::NotASocket { .. } => true,
        qsnap_qmp::Error::Connect { io, .. } => matches!(
            io.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
        _ => false,
    }
}

/// Waits (up to `timeout`) until nothing serves `endpoint` any more: how a QEMU whose pid is
/// unknown is seen to have gone.
async fn monitor_gone(endpoint: &str, timeout: Duration) -> bool {
    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        greeting_timeout: Duration::from_millis(200),
        ..ConnectOptions::default()
    };
    let deadline = Instant::now() + timeout;
    loop {
        match Qmp::connect_with(Endpoint::parse(endpoint), &opts).await {
            Err(e) if nobody_serves(&e) => return true,
            _ if Instant::now() >= deadline => return false,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
