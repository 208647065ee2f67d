//! A registered VM's lifecycle: `start` (relaunch on the current disk chain), `stop`,
//! `shutdown` (the guest powers off, then QEMU is stopped if it has not exited),
//! `pause`/`resume` (the guest's CPUs, QEMU running on), and `status` (registering is
//! `register.rs`).
//!
//! Every relaunch rewrites the recorded command line's disk paths to the current images, so a
//! frozen snapshot image is never opened read-write. `start` never launches a second QEMU
//! while the recorded one is alive (`state.rs`). `stop` says how QEMU went ([`StopOutcome`])
//! and never reports stopped a QEMU it could not stop; `status` only reads, and never asks a
//! monitor that another qsnap operation holds.

use super::state::{Operation, VmState};
use super::Vm;
use crate::blocks;
use crate::error::{Error, Result};
use crate::launch::ProcessLauncher;
use crate::launch::{
    self, quit_or_kill, DiskSubstitution, LaunchSpec, Launched, Launcher, StopOutcome,
};
use crate::store::{
    self, CurrentDisk, Intent, LaunchCommand, LockHolder, StartIntent, StopIntent, VmRecord,
};
use qsnap_qmp::{types, Endpoint};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::warn;

/// A VM's state.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// The VM.
    pub vm: String,
    /// Running, unreachable or stopped (with pid and run state): the precise state.
    pub state: VmState,
    /// True while a QEMU runs for this VM: it answers (`running`), it is alive but its
    /// monitor does not answer (`unreachable`), or another qsnap operation holds the VM and
    /// its recorded QEMU is alive. `state` says which. (Not in the JSON: `state` has it.)
    #[serde(skip)]
    pub running: bool,
    /// QEMU's run state when its monitor was asked (`running`, `paused`, …). (Not in the
    /// JSON: `state.runstate` has it.)
    #[serde(skip)]
    pub runstate: Option<String>,
    /// QEMU's pid. (Not in the JSON: `state.pid` has it.)
    #[serde(skip)]
    pub pid: Option<u32>,
    /// The snapshot the current state descends from.
    pub current: Option<String>,
    /// How many snapshots it has.
    pub snapshots: usize,
    /// Each disk's chain.
    pub disks: Vec<DiskChain>,
    /// Another qsnap operation that holds the VM now (its monitor is that operation's, so
    /// `state` comes from the record and `/proc`).
    pub busy: Option<LockHolder>,
    /// An operation whose qsnap is gone before it finished: the next command (or
    /// `qsnap check --repair`) finishes or rolls it back.
    pub interrupted: Option<Interrupted>,
    /// For a clone: what it was made from and where its per-VM files are (its console, its
    /// guest agent socket, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<crate::store::CloneOf>,
    /// For a standby (`qsnap pool`): the pool it belongs to. Its guest has never run; a
    /// clone of that snapshot claims it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_of: Option<crate::store::StandbyOf>,
    /// Its snapshots' pools of standbys (`qsnap pool`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<super::PoolStatus>,
    /// Its monitor socket (`unix:PATH`, a path, or `tcp:HOST:PORT`).
    pub qmp: String,
}

/// An operation left unfinished by a qsnap that is gone (its journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Interrupted {
    /// What it was doing (`create s1`, `revert to s2`, …).
    pub operation: String,
    /// The qsnap process that ran it.
    pub qsnap_pid: u32,
    /// When it began (RFC 3339).
    pub started_at: String,
}

/// One disk's backing chain.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct DiskChain {
    /// Device name.
    pub device: String,
    /// Images from the top (written) to the base.
    pub chain: Vec<PathBuf>,
}

impl Vm {
    pub(crate) fn socket_path(&self, record: &VmRecord) -> Result<PathBuf> {
        match Endpoint::parse(&record.qmp) {
            Endpoint::Unix(p) => Ok(p),
            Endpoint::Tcp(_) => Err(Error::CommandLine {
                why: "the VM's monitor is TCP; qsnap can only relaunch VMs it reaches over a unix socket".into(),
            }),
        }
    }

    pub(crate) fn command_of(record: &VmRecord) -> Result<&LaunchCommand> {
        record.command.as_ref().ok_or_else(|| Error::CommandLine {
            why: "no command line was recorded for this VM (its QEMU's /proc entry was not readable at attach)".into(),
        })
    }

    pub(crate) fn log_path(&self) -> PathBuf {
        self.store().vm_dir(self.name()).join("qemu.log")
    }

    /// Substitutions from the command line's images to the given current images.
    pub(crate) fn substitutions(disks: &[CurrentDisk]) -> Vec<DiskSubstitution> {
        disks
            .iter()
            .filter(|d| d.image != d.launch_image)
            .map(|d| DiskSubstitution {
                from: d.launch_image.clone(),
                to: d.image.clone(),
            })
            .collect()
    }

    /// Stops QEMU and says how: `quit`, then SIGKILL after 10 s; SIGTERM first when its
    /// monitor does not answer. Works with an interrupted operation pending (it is settled
    /// once QEMU is gone). A QEMU that could not be stopped is [`Error::StopFailed`], with
    /// the record and any earlier journal left as they were.
    pub async fn stop(&self) -> Result<StopOutcome> {
        let lock = self.store().lock(self.name(), "stop").await?;
        let pending = self.store().journal(self.name()).await?;
        if pending.is_some() {
            // Settle what can be settled with QEMU still there; what needs it gone waits.
            if let Err(e) = super::recover::settle(self).await {
                warn!(error = %e, "an interrupted operation could not be settled before the stop");
            }
        }
        let mut record = self.store().record(self.name()).await?;
        let state = VmState::observe(self, &record).await;
        state.allows(self.name().as_str(), Operation::Stop)?;
        let pid = state.pid().or(record.pid);
        let pid = super::state::signallable_pid(pid, &record).await;
        let journaled = self.store().journal(self.name()).await?.is_none();
        if journaled {
            self.store()
                .write_journal(self.name(), &Intent::Stop(StopIntent { pid }))
                .await?;
        }
        let outcome = match quit_or_kill(&record.qmp, pid, crate::launch::QUIT_TIMEOUT).await {
            Ok(o) => o,
            Err(e) => {
                // Nothing changed: the record still names the QEMU that runs.
                if journaled {
                    let _ = self.store().clear_journal(self.name()).await;
                }
                return Err(e);
            }
        };
        super::state::record_qemu(&mut record, None).await;
        self.store().write_record(&record).await?;
        if journaled {
            self.store().clear_journal(self.name()).await?;
        } else {
            // QEMU is gone now: what was left of the interrupted operation can be settled.
            super::recover::settle(self).await?;
        }
        drop(lock);
        Ok(outcome)
    }

    /// Starts a stopped VM again on its current disk chain.
    pub async fn start(&self) -> Result<Launched> {
        self.start_with(&ProcessLauncher::default()).await
    }

    /// [`Vm::start`] with a launcher of your own.
    pub async fn start_with<L: Launcher>(&self, launcher: &L) -> Result<Launched> {
        let op = self.begin("start").await?;
        super::pool::refuse_standby(&op.record, "start")?;
        let mut record = op.record.clone();
        VmState::observe(self, &record)
            .await
            .allows(self.name().as_str(), Operation::Start)?;
        let spec = LaunchSpec {
            vm: self.name().to_string(),
            command: Self::command_of(&record)?.clone(),
            disks: Self::substitutions(&record.disks),
            qmp_socket: self.socket_path(&record)?,
            incoming: false,
            paused: false,
            machine: None,
            log: self.log_path(),
            ram: None,
        };
        let argv = launch::build_argv(&spec)?;
        self.store()
            .write_journal(self.name(), &Intent::Start(StartIntent { argv }))
            .await?;
        let launched = match launcher.launch(&spec).await {
            Ok(l) => l,
            Err(e) => {
                let _ = self.store().clear_journal(self.name()).await;
                return Err(e);
            }
        };
        super::state::record_qemu(&mut record, launched.pid).await;
        self.store().write_record(&record).await?;
        self.store().clear_journal(self.name()).await?;
        Ok(launched)
    }

    /// Running or not, the current snapshot, each disk's chain, an operation in progress
    /// and an interrupted one. Reads only (no lock): an interrupted operation is reported,
    /// not settled. While another qsnap operation holds the VM its monitor is not asked (it
    /// is that operation's): the state comes from the recorded pid and start time.
    pub async fn status(&self) -> Result<Status> {
        let record = self.store().record(self.name()).await?;
        let vm_dir = self.store().vm_dir(self.name());
        let mut busy = store::lock_holder(&vm_dir).await?;
        let mut state = match &busy {
            Some(_) => VmState::from_record(&record).await,
            None => None,
        };
        if state.is_none() {
            let seen = VmState::observe(self, &record).await;
            if busy.is_none() && matches!(seen, VmState::Unreachable { .. }) {
                // An operation may have taken the VM, and its monitor, since the lock was read.
                busy = store::lock_holder(&vm_dir).await?;
                if busy.is_some() {
                    state = VmState::from_record(&record).await;
                }
            }
            state = state.or(Some(seen));
        }
        let state = state.unwrap_or(VmState::Stopped);
        let asked = busy.is_none();
        let live = match &state {
            VmState::Running { .. } if asked => match self.connect_quick(&record).await {
                Ok(qmp) => blocks::read(&qmp).await.ok(),
                Err(_) => None,
            },
            _ => None,
        };
        let mut disks = Vec::new();
        for d in &record.disks {
            let from_qemu = live
                .as_ref()
                .and_then(|l| l.iter().find(|b| b.device == d.device))
                .and_then(|b| b.medium.as_ref())
                .map(|m| m.chain.iter().map(|l| l.image.clone()).collect::<Vec<_>>());
            let chain = match from_qemu {
                Some(c) => c,
                None => match crate::chains::files(&d.image, self.cancel()).await {
                    Ok(c) => c,
                    Err(_) => vec![d.image.clone()],
                },
            };
            disks.push(DiskChain {
                device: d.device.clone(),
                chain,
            });
        }
        // A journal is an interrupted operation only once its writer is gone: while the
        // lock's holder is the qsnap that wrote it (perhaps one that began after the lock
        // was read above), it is that operation's work in progress.
        let held_by = |h: &Option<LockHolder>, pid: u32| h.as_ref().is_some_and(|h| h.pid == pid);
        let mut interrupted = None;
        if let Some(j) = self.store().journal(self.name()).await? {
            if !held_by(&busy, j.pid) && !held_by(&store::lock_holder(&vm_dir).await?, j.pid) {
                interrupted = Some(Interrupted {
                    operation: j.intent.describe(),
                    qsnap_pid: j.pid,
                    started_at: j.started_at,
                });
            }
        }
        let runstate = match &state {
            VmState::Running { runstate, .. } if asked => Some(runstate.clone()),
            _ => None,
        };
        Ok(Status {
            vm: self.name().to_string(),
            pid: state.pid(),
            running: !matches!(state, VmState::Stopped),
            state,
            runstate,
            current: record.current.clone(),
            snapshots: self.store().snapshot_count(self.name()).await,
            disks,
            busy,
            interrupted,
            clone_of: record.clone_of.clone(),
            standby_of: record.standby.clone(),
            pools: self.pools().await?,
            qmp: record.qmp.clone(),
        })
    }
}

impl Vm {
    /// Before a VM's files go (`remove`, `forget`): stops whatever QEMU runs it — also one
    /// whose monitor does not answer — and records it stopped. Refused (busy) when it does
    /// not answer and its pid cannot be told apart from another process's. `what` names the
    /// operation for that message (`remove it`).
    pub(super) async fn stop_before_discarding(
        &self,
        record: &mut VmRecord,
        state: &VmState,
        what: &str,
    ) -> Result<()> {
        let pid = super::state::signallable_pid(state.pid().or(record.pid), record).await;
        if pid.is_none() && !matches!(state, VmState::Running { .. }) {
            return Err(Error::Busy {
                what: format!(
                    "{} does not answer and its QEMU cannot be told apart; stop it, then {what}",
                    self.name()
                ),
            });
        }
        crate::launch::stop_qemu(&record.qmp, pid, crate::launch::QUIT_TIMEOUT).await?;
        super::state::record_qemu(record, None).await;
        self.store().write_record(record).await
    }
}

/// How `shutdown` ended a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered off when asked (the ACPI power button), after this long.
    PoweredOff {
        /// From the button press to QEMU gone.
        after: Duration,
    },
    /// The guest did not power off within the timeout: QEMU was stopped as `stop` does.
    Forced {
        /// How long the guest was given.
        waited: Duration,
        /// How QEMU was then stopped.
        stop: StopOutcome,
    },
    /// No QEMU was running.
    AlreadyStopped,
}

impl Vm {
    /// Asks the guest to power off (QEMU's `system_powerdown`, the ACPI power button) and
    /// waits up to `grace` for QEMU to exit (or, started with `-no-shutdown`, to report the
    /// guest off, when QEMU is asked to quit); then stops it as [`Vm::stop`] does (`quit`,
    /// SIGKILL after 10 s). A guest already off (`shutdown` run state) only has its QEMU quit.
    /// Refused, with nothing sent: a paused guest (it could not see the button), a monitor
    /// that does not answer (the button cannot be pressed: `stop` is for that). Ctrl-C while
    /// it waits stops the wait and leaves QEMU as it is (the button was pressed). An
    /// interrupted operation is settled first, as every operation does.
    pub async fn shutdown(&self, grace: Duration) -> Result<ShutdownOutcome> {
        let op = self.begin("shutdown").await?;
        let mut record = op.record.clone();
        let state = VmState::observe(self, &record).await;
        let runstate = match &state {
            VmState::Stopped => {
                if record.pid.is_some() {
                    super::state::record_qemu(&mut record, None).await;
                    self.store().write_record(&record).await?;
                }
                return Ok(ShutdownOutcome::AlreadyStopped);
            }
            VmState::Unreachable { pid, why } => {
                return Err(Error::Unreachable {
                    vm: self.name().to_string(),
                    pid: *pid,
                    why: why.clone(),
                })
            }
            VmState::Running { runstate, .. } => runstate.clone(),
        };
        let off_already = runstate == "shutdown";
        if runstate != "running" && !off_already {
            return Err(Error::GuestPaused {
                vm: self.name().to_string(),
                runstate,
            });
        }
        let pid = super::state::signallable_pid(state.pid().or(record.pid), &record).await;
        let pressed = Instant::now();
        // The button first, before anything is journaled: a monitor that does not take it
        // is an error with nothing changed.
        let qmp = self.connect().await?;
        if !off_already {
            qmp.execute(types::system_powerdown {})
                .await
                .map_err(Error::qmp("pressing the power button (system_powerdown)"))?;
        }
        self.store()
            .write_journal(self.name(), &Intent::Stop(StopIntent { pid }))
            .await?;
        let watched = if off_already {
            Watch::Off
        } else {
            watch_power_off(&qmp, pid, grace, self.cancel()).await
        };
        drop(qmp);
        let ended = match watched {
            Watch::Cancelled => {
                // The guest saw the button and may still power off: QEMU is left as it is.
                let _ = self.store().clear_journal(self.name()).await;
                return Err(Error::Cancelled);
            }
            // QEMU exits by itself once the guest is off (or is asked to, -no-shutdown): what
            // `quit_or_kill` finds tells which, and a QEMU that stays is stopped.
            Watch::Off => quit_or_kill(&record.qmp, pid, crate::launch::QUIT_TIMEOUT)
                .await
                .map(|_| ShutdownOutcome::PoweredOff {
                    after: pressed.elapsed(),
                }),
            Watch::StillOn => quit_or_kill(&record.qmp, pid, crate::launch::QUIT_TIMEOUT)
                .await
                .map(|stop| ShutdownOutcome::Forced {
                    waited: pressed.elapsed(),
                    stop,
                }),
        };
        let outcome = match ended {
            Ok(o) => o,
            Err(e) => {
                // Nothing was recorded as changed: the record still names the QEMU.
                let _ = self.store().clear_journal(self.name()).await;
                return Err(e);
            }
        };
        super::state::record_qemu(&mut record, None).await;
        self.store().write_record(&record).await?;
        self.store().clear_journal(self.name()).await?;
        drop(op);
        Ok(outcome)
    }
}

/// How the wait for a guest to power off ended.
enum Watch {
    /// QEMU exited, or reports the guest off (`-no-shutdown`).
    Off,
    /// The grace period passed with the guest still on.
    StillOn,
    /// Ctrl-C.
    Cancelled,
}

/// Watches QEMU after the power button until it exits (its monitor closes, or its pid is
/// gone) or says `shutdown`, for at most `grace`. A status query that fails otherwise (slow,
/// a reply it cannot read) is not an answer: the wait goes on to the deadline.
async fn watch_power_off(
    qmp: &qsnap_qmp::Qmp,
    pid: Option<u32>,
    grace: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> Watch {
    let deadline = Instant::now() + grace.min(MAX_GRACE);
    loop {
        if let Some(p) = pid {
            if !crate::proc::alive(p).await {
                return Watch::Off;
            }
        }
        match qmp.execute(types::query_status {}).await {
            Err(e) if e.is_disconnected() => return Watch::Off,
            Ok(st) if matches!(st.status, types::RunState::shutdown) => return Watch::Off,
            Err(_) | Ok(_) => {}
        }
        if Instant::now() >= deadline {
            return Watch::StillOn;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Watch::Cancelled,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The longest grace a shutdown gives (a larger one is taken as this).
const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What `pause` or `resume` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseOutcome {
    /// The guest's CPUs were stopped (`pause`) or started (`resume`).
    Done,
    /// They were so already: nothing was sent.
    Already,
}

impl Vm {
    /// Stops the guest's CPUs (QEMU's `stop`); QEMU keeps running. Under the VM's lock, and
    /// refused while an interrupted operation waits for `check --repair`.
    pub async fn pause(&self) -> Result<PauseOutcome> {
        self.set_running(false).await
    }

    /// Starts the guest's CPUs again (QEMU's `cont`): after `pause`, `revert --paused` or a
    /// clone made paused. Refused where QEMU's run state is not one a guest resumes from
    /// (e.g. `postmigrate`, `internal-error`), naming it.
    pub async fn resume(&self) -> Result<PauseOutcome> {
        self.set_running(true).await
    }

    async fn set_running(&self, run: bool) -> Result<PauseOutcome> {
        let op = if run { "resume" } else { "pause" };
        let _lock = self.store().lock(self.name(), op).await?;
        super::refuse_if_interrupted(self.store(), self.name()).await?;
        if run {
            super::pool::refuse_standby(&self.store().record(self.name()).await?, "resume")?;
        }
        let qmp = self.connect().await?;
        let status = qmp
            .execute(types::query_status {})
            .await
            .map_err(Error::qmp("asking QEMU's run state"))?;
        let state = serde_json::to_value(status.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        match (run, state.as_str()) {
            (false, "paused") | (true, "running") => Ok(PauseOutcome::Already),
            (false, "running") => {
                qmp.execute(types::stop {})
                    .await
                    .map_err(Error::qmp("pausing the guest"))?;
                Ok(PauseOutcome::Done)
            }
            (true, "paused" | "suspended" | "debug") => {
                qmp.execute(types::cont {})
                    .await
                    .map_err(Error::qmp("resuming the guest"))?;
                Ok(PauseOutcome::Done)
            }
            (_, other) => Err(Error::Busy {
                what: format!(
                    "QEMU's run state is {other}: the guest cannot be {}d from it here",
                    op
                ),
            }),
        }
    }
}
