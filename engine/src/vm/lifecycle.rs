//! A VM's lifecycle under qsnap: `run` (start a command line and register it), `attach`
//! (register a QEMU started elsewhere), `start` (relaunch on the current disk chain), `stop`,
//! and `status`.
//!
//! Every relaunch rewrites the recorded command line's disk paths to the current images, so a
//! frozen snapshot image is never opened read-write. `start` never launches a second QEMU
//! while the recorded one is alive (`state.rs`), and attaching another user's QEMU — whose
//! command line qsnap would later run — is refused unless asked for. `stop` says how QEMU
//! went ([`StopOutcome`]) and never reports stopped a QEMU it could not stop; `status` only
//! reads, and never asks a monitor that another qsnap operation holds.

use super::state::{Operation, VmState};
use super::{Engine, Vm};
use crate::blocks;
use crate::error::{Error, Result};
use crate::image;
use crate::launch::ProcessLauncher;
use crate::launch::{
    self, argv, quit_or_kill, DiskSubstitution, LaunchSpec, Launched, Launcher, StopOutcome,
};
use crate::name::VmName;
use crate::store::{
    self, CurrentDisk, Intent, LaunchCommand, LockHolder, Origin, StartIntent, StopIntent, VmRecord,
};
use qsnap_qmp::{Endpoint, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::warn;

/// How long `quit` may take before QEMU is killed.
pub(crate) const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for `run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Do not add `tsc-frequency` to an invtsc CPU.
    pub no_tsc_fix: bool,
    /// The working directory for relative paths (default: the current one).
    pub cwd: Option<PathBuf>,
}

/// Options for `attach`.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Accept a QEMU that runs as another user (qsnap records its command line and would run
    /// it again on start and revert: a privilege boundary when qsnap runs as root).
    pub allow_other_user: bool,
}

/// What `run` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunReport {
    /// The new record.
    pub record: VmRecord,
    /// `tsc-frequency` added for an invtsc CPU, in Hz, and where the figure came from.
    pub tsc_pinned: Option<(u64, String)>,
}

/// A VM's state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// The VM.
    pub vm: String,
    /// Running, unreachable or stopped (with pid and run state): the precise state.
    pub state: VmState,
    /// True while a QEMU runs for this VM: it answers (`running`), it is alive but its
    /// monitor does not answer (`unreachable`), or another qsnap operation holds the VM and
    /// its recorded QEMU is alive. `state` says which.
    pub running: bool,
    /// QEMU's run state when its monitor was asked (`running`, `paused`, …).
    pub runstate: Option<String>,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// The snapshot the current state descends from.
    pub current: Option<String>,
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
    /// Its monitor socket (`unix:PATH`, a path, or `tcp:HOST:PORT`).
    pub qmp: String,
}

/// An operation left unfinished by a qsnap that is gone (its journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskChain {
    /// Device name.
    pub device: String,
    /// Images from the top (written) to the base.
    pub chain: Vec<PathBuf>,
}

impl Engine {
    /// Registers a QEMU that something else started: records its monitor socket and, from the
    /// socket's peer credentials, its pid, command line and working directory (what a later
    /// relaunch needs). Refuses a name already in use.
    pub async fn attach(&self, name: &VmName, qmp_socket: &str) -> Result<Vm> {
        self.attach_with(name, qmp_socket, &AttachOptions::default())
            .await
    }

    /// [`Engine::attach`] with options.
    pub async fn attach_with(
        &self,
        name: &VmName,
        qmp_socket: &str,
        opts: &AttachOptions,
    ) -> Result<Vm> {
        if self.store.has_vm(name).await? {
            return Err(Error::VmExists {
                vm: name.to_string(),
            });
        }
        let endpoint = normalise_endpoint(qmp_socket).await;
        let qmp = Qmp::connect_with(Endpoint::parse(&endpoint), &self.connect)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))?;
        let ours = nix::unistd::geteuid().as_raw();
        if let Some(uid) = qmp.peer_uid() {
            if uid != ours && !opts.allow_other_user {
                return Err(Error::ForeignQemu { uid, ours });
            }
        }
        let pid = qmp.peer_pid();
        let command = match pid {
            Some(pid) => launch_command(pid).await,
            None => None,
        };
        let disks = disks_now(&qmp).await?;
        drop(qmp);

        let _lock = self.store.lock(name, "attach").await?;
        if self.store.has_vm(name).await? {
            return Err(Error::VmExists {
                vm: name.to_string(),
            });
        }
        let guest_agent = command
            .as_ref()
            .and_then(|c| argv::guest_agent_socket(&c.argv, &c.cwd));
        let record = VmRecord {
            schema: store::SCHEMA,
            name: name.to_string(),
            qmp: endpoint,
            origin: Origin::Attached,
            pid,
            pid_start: match pid {
                Some(p) => launch::start_time(p).await,
                None => None,
            },
            command,
            current: None,
            disks,
            owned_images: Vec::new(),
            guest_agent,
            registered_at: store::now_rfc3339(),
            clone_of: None,
        };
        self.store.write_record(&record).await?;
        Ok(self.vm_from(name.clone(), record))
    }

    /// Starts `argv` (a `qemu-system-*` command line) detached, with a monitor socket in the
    /// store, and registers it as `name`. Adds `tsc-frequency` to an invtsc CPU unless told
    /// not to, so the VM's memory can be saved.
    pub async fn run(
        &self,
        name: &VmName,
        argv: Vec<String>,
        opts: &RunOptions,
    ) -> Result<RunReport> {
        self.run_with(name, argv, opts, &ProcessLauncher::default())
            .await
    }

    /// [`Engine::run`] with a launcher of your own.
    pub async fn run_with<L: Launcher>(
        &self,
        name: &VmName,
        argv: Vec<String>,
        opts: &RunOptions,
        launcher: &L,
    ) -> Result<RunReport> {
        if argv.is_empty() {
            return Err(Error::CommandLine {
                why: "no QEMU command given".into(),
            });
        }
        let _lock = self.store.lock(name, "run").await?;
        if self.store.has_vm(name).await? {
            return Err(Error::VmExists {
                vm: name.to_string(),
            });
        }
        let mut argv = argv;
        let mut tsc_pinned = None;
        if !opts.no_tsc_fix && argv::needs_tsc_frequency(&argv) {
            let (hz, source) =
                launch::tsc_frequency_for(&argv)
                    .await
                    .ok_or_else(|| Error::CommandLine {
                        why: "the CPU asks for invtsc but the TSC frequency could not be found; \
                              add tsc-frequency=<Hz> to -cpu yourself"
                            .into(),
                    })?;
            argv = argv::pin_tsc_frequency(&argv, hz);
            tsc_pinned = Some((hz, format!("{source:?}").to_lowercase()));
        }
        let cwd = match &opts.cwd {
            Some(c) => c.clone(),
            None => std::env::current_dir().map_err(|source| Error::Io {
                what: "reading the working directory",
                path: ".".into(),
                source,
            })?,
        };
        let socket = self.store.vm_dir(name).join("qmp.sock");
        check_socket_path(&socket)?;
        let command = LaunchCommand { argv, cwd };
        let spec = LaunchSpec {
            vm: name.to_string(),
            command: command.clone(),
            disks: Vec::new(),
            qmp_socket: socket.clone(),
            incoming: false,
            paused: false,
            machine: None,
            log: self.store.vm_dir(name).join("qemu.log"),
            ram: None,
        };
        let launched = launcher.launch(&spec).await?;
        let mut record = VmRecord {
            schema: store::SCHEMA,
            name: name.to_string(),
            qmp: socket.display().to_string(),
            origin: Origin::Run,
            pid: launched.pid,
            pid_start: None,
            guest_agent: argv::guest_agent_socket(&command.argv, &command.cwd),
            command: Some(command),
            current: None,
            disks: Vec::new(),
            owned_images: Vec::new(),
            registered_at: store::now_rfc3339(),
            clone_of: None,
        };
        let handle = self.vm_from(name.clone(), record.clone());
        let qmp = handle.connect().await?;
        record.disks = disks_now(&qmp).await?;
        let pid = qmp.peer_pid().or(record.pid);
        super::state::record_qemu(&mut record, pid).await;
        drop(qmp);
        self.store.write_record(&record).await?;
        Ok(RunReport { record, tsc_pinned })
    }
}

/// A unix socket path is stored absolute, so the record works from any directory.
async fn normalise_endpoint(s: &str) -> String {
    match Endpoint::parse(s) {
        Endpoint::Unix(p) if p.is_relative() => tokio::fs::canonicalize(&p)
            .await
            .map(|abs| abs.display().to_string())
            .unwrap_or_else(|_| s.to_owned()),
        _ => s.to_owned(),
    }
}

/// QEMU's command line and working directory from `/proc`, if readable.
async fn launch_command(pid: u32) -> Option<LaunchCommand> {
    let raw = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cwd = tokio::fs::read_link(format!("/proc/{pid}/cwd"))
        .await
        .ok()?;
    (!argv.is_empty()).then_some(LaunchCommand { argv, cwd })
}

/// Each disk with a medium and its current top image, as QEMU reports it; at registration
/// the top is also what the command line names.
async fn disks_now(qmp: &Qmp) -> Result<Vec<CurrentDisk>> {
    Ok(blocks::read(qmp)
        .await?
        .into_iter()
        .filter_map(|d| {
            let top = d.top()?.to_owned();
            Some(CurrentDisk {
                device: d.device,
                launch_image: top.clone(),
                image: top,
                owned: false,
            })
        })
        .collect())
}

/// Unix socket paths are limited to 107 bytes.
fn check_socket_path(p: &Path) -> Result<()> {
    if p.as_os_str().len() > 107 {
        return Err(Error::CommandLine {
            why: format!(
                "the monitor socket path {} is longer than a unix socket allows (107 bytes); use a shorter --store",
                p.display()
            ),
        });
    }
    Ok(())
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
        let outcome = match quit_or_kill(&record.qmp, pid, QUIT_TIMEOUT).await {
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
                None => match image::chain(&d.image, self.cancel()).await {
                    Ok(c) => c.into_iter().map(|c| c.filename).collect(),
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
            disks,
            busy,
            interrupted,
            clone_of: record.clone_of.clone(),
            qmp: record.qmp.clone(),
        })
    }
}
