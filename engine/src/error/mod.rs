//! The engine's errors. [`Error`] is what every operation returns; its variants say which
//! step failed and carry what a caller needs to react. Variants many operations share
//! (I/O, tools, QMP, timeouts, the store, the lock, a guest left paused) are top-level; what
//! one operation's failure did is in that operation's own enum, wrapped by [`Error`]:
//!
//! - [`CreateError`] ([`Error::Create`]): refused, rolled back (in full or in part), QEMU gone
//!   mid-way, or the snapshot taken but not recorded / not finished;
//! - [`RevertError`] ([`Error::Revert`]): refused with nothing changed, or failed with the VM
//!   stopped on its untouched disks;
//! - [`LazyRamError`] ([`Error::LazyRam`]): refused (with a [`LazyRamRefusal`]), or the
//!   manifest switch not known to be durable.
//!
//! Refusals a caller can act on are typed too: [`Error::QemuLacks`] (with the missing
//! [`QemuFeature`]), [`Error::ForeignJob`], [`Error::RemoveRefused`] (with a
//! [`RemoveRefusal`]). QEMU's own refusals keep QEMU's class and description (inside
//! [`Error::Qmp`]).
//!
//! # Printing
//!
//! Every message is whole: it already says its causes — QEMU's reason, the OS's reason, the
//! error an operation failed on — because errors nest inside other errors' messages
//! (`TakenBut`, `StoreBehind`, `LeftPaused`, …) and a reason must not be lost there. So
//! [`std::error::Error::source`] returns `None` for every engine error (a chain printer shows
//! each reason once); the wrapped errors stay reachable as fields (`Error::Qmp { source, .. }`,
//! `Error::Io { source, .. }`, `cause`, `problem`) for matching. Print an engine error with
//! `{}`; a caller that adds its own context (anyhow's `context`) prints the chain joined
//! with ": ".

use std::path::PathBuf;

mod bundle;
mod create;
mod delete;
mod display;
mod kind;
mod lazy;
mod refusal;
mod revert;

pub use bundle::BundleError;
pub use create::CreateError;
pub use delete::DeleteError;
pub use kind::ErrorKind;
pub use lazy::{LazyRamError, LazyRamRefusal};
pub use refusal::{ForgetRefusal, QemuFeature, RemoveRefusal};
pub use revert::RevertError;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Talking to QEMU failed (connection, timeout, or QEMU refused a command).
    Qmp {
        /// What the engine was doing.
        step: &'static str,
        /// The QMP error (keeps QEMU's `class` and `desc` when QEMU refused). Said in the
        /// message; not returned as `source()` (see the module docs).
        source: qsnap_qmp::Error,
    },
    /// A VM or snapshot name that cannot be used.
    InvalidName {
        /// The name as given (escaped).
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The VM is in a state a snapshot cannot start from.
    BadRunState {
        /// QEMU's run state.
        state: String,
    },
    /// Something else is going on in QEMU that a snapshot must not race with.
    Busy {
        /// What is running.
        what: String,
    },
    /// This QEMU lacks what the operation needs; nothing was changed. Another QEMU (the
    /// version the message names) or another mode does it.
    QemuLacks {
        /// What is missing.
        feature: QemuFeature,
        /// This QEMU's version.
        version: String,
    },
    /// `forget` refused a VM; nothing was changed.
    ForgetRefused {
        /// The VM.
        vm: String,
        /// Why.
        reason: ForgetRefusal,
    },
    /// The guest is paused (or otherwise not running its CPUs) and the operation needs it
    /// to act (e.g. on the ACPI power button).
    GuestPaused {
        /// The VM.
        vm: String,
        /// QEMU's run state.
        runstate: String,
    },
    /// An interrupted operation on the VM waits to be finished or rolled back (`qsnap check
    /// VM --repair`) before this operation may hold the VM.
    Unsettled {
        /// The VM.
        vm: String,
    },
    /// A block-stream job that qsnap did not start has ended but was not dismissed: QEMU
    /// crashes when asked for its block nodes in that state, so qsnap does nothing until its
    /// owner dismisses it (`job-dismiss`).
    ForeignJob {
        /// The job's id.
        job: String,
    },
    /// `remove` refused a VM; nothing was changed.
    RemoveRefused {
        /// The VM.
        vm: String,
        /// Why.
        reason: RemoveRefusal,
    },
    /// A create failed: refused, rolled back (in full or in part), or taken but not finished.
    Create(CreateError),
    /// A revert failed: refused, or failed after the old QEMU was stopped.
    Revert(RevertError),
    /// A delete failed: refused, or the snapshots are gone but merging did not finish.
    Delete(DeleteError),
    /// Making a snapshot's memory lazy failed.
    LazyRam(LazyRamError),
    /// An export or import failed ([`BundleError`]).
    Bundle(BundleError),
    /// A disk that cannot take a qcow2 overlay.
    DiskNotSnapshottable {
        /// Device id or node name.
        device: String,
        /// Why.
        why: String,
    },
    /// A directory a snapshot would write into cannot be used (missing, not a directory,
    /// not writable, or relative); found before anything changes.
    UnusableDirectory {
        /// Which directory (`overlay directory`, `memory directory`).
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// What is wrong with it and what to do.
        why: String,
    },
    /// A QEMU that `run` or `attach` will not register; nothing was recorded, and a QEMU
    /// `run` had started for it was stopped again.
    RegisterRefused {
        /// The name asked for.
        vm: String,
        /// Why, and what to do.
        why: String,
    },
    /// A file the operation would create already exists; qsnap never overwrites.
    TargetExists {
        /// The path.
        path: PathBuf,
    },
    /// A local file operation failed. The OS's reason is in the message (an `Io` nested in
    /// another error's message, `TakenBut` or `StoreBehind`, must still say "No space left on
    /// device"); the `source` field keeps the OS error for matching, and is not returned as
    /// `source()` (see the module docs).
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An external tool (`qemu-img`, `qemu-system-* -machine help`) failed or did not
    /// finish in time.
    Tool {
        /// The tool and its subcommand (`qemu-img create`).
        tool: String,
        /// The file it worked on.
        path: PathBuf,
        /// What it said, or that it timed out.
        why: String,
    },
    /// QEMU failed to save memory (e.g. disk full); everything was rolled back.
    SaveFailed {
        /// QEMU's description.
        desc: String,
    },
    /// An operation failed, and the store could not be brought in line with what QEMU does
    /// now; its journal says what is left to do.
    StoreBehind {
        /// The VM.
        vm: String,
        /// What failed first.
        cause: Box<Error>,
        /// Why the store could not be updated.
        problem: Box<Error>,
    },
    /// A fault injected by a test (`failpoints` builds only).
    Injected {
        /// The failpoint.
        point: String,
    },
    /// The operation was cancelled (e.g. Ctrl-C); everything was rolled back.
    Cancelled,
    /// A block job failed.
    BlockJob {
        /// Job id.
        job: String,
        /// QEMU's description.
        desc: String,
    },
    /// No such VM in the store.
    UnknownVm {
        /// The name asked for.
        vm: String,
        /// The store searched.
        store: PathBuf,
        /// The VMs the store has (`None`: the store's directory does not exist), for a
        /// "did you mean".
        known: Option<Vec<String>>,
    },
    /// The VM is already in the store.
    VmExists {
        /// The name.
        vm: String,
        /// The directory a forgotten VM of that name left (its disk images), when that is
        /// what holds the name.
        leftovers: Option<PathBuf>,
    },
    /// No such snapshot.
    UnknownSnapshot {
        /// The VM.
        vm: String,
        /// The name asked for.
        snapshot: String,
    },
    /// A snapshot of that name exists.
    SnapshotExists {
        /// The VM.
        vm: String,
        /// The name.
        snapshot: String,
    },
    /// Another operation holds the VM.
    Locked {
        /// The VM.
        vm: String,
        /// `<pid> <operation>` of the holder, as it wrote it.
        holder: String,
    },
    /// A store file that cannot be read.
    CorruptStore {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// QEMU's recorded command line cannot be used as asked.
    CommandLine {
        /// What is wrong.
        why: String,
    },
    /// QEMU did not come up.
    LaunchFailed {
        /// What happened.
        why: String,
        /// QEMU's log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The VM is running and the operation needs it stopped.
    AlreadyRunning {
        /// The VM.
        vm: String,
        /// QEMU's pid.
        pid: u32,
    },
    /// The operation needs a running QEMU and there is none.
    NotRunning {
        /// The VM.
        vm: String,
    },
    /// The VM's QEMU is alive but its monitor does not answer: qsnap will not act on it, and
    /// never starts a second QEMU beside it.
    Unreachable {
        /// The VM.
        vm: String,
        /// QEMU's pid, when known.
        pid: Option<u32>,
        /// What the monitor did.
        why: String,
    },
    /// A QEMU that runs (or may run) could not be stopped: it was left as it was, and the
    /// record still names it.
    StopFailed {
        /// Its monitor.
        endpoint: String,
        /// Its pid, when known.
        pid: Option<u32>,
        /// What happened, and what to do.
        why: String,
    },
    /// The QEMU belongs to another user: acting on it (and later re-running its command line)
    /// crosses a privilege boundary.
    ForeignQemu {
        /// QEMU's uid.
        uid: u32,
        /// Ours.
        ours: u32,
    },
    /// An interrupted operation needs a person to decide how to go on.
    NeedsDecision {
        /// The VM.
        vm: String,
        /// The operation (`create s1`, …).
        operation: String,
        /// What is wrong and the exact command to run.
        what: String,
    },
    /// An image file was kept because something may still need it (the reference guard in
    /// front of every unlink).
    UnlinkRefused {
        /// The image.
        path: PathBuf,
        /// What uses it, or why qsnap may not remove it.
        why: String,
    },
    /// Something did not happen in time.
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
    /// A standby (`qsnap pool`) is kept as it was made until a clone claims it: its guest
    /// must not run nor its state change; nothing was changed.
    StandbyUntouchable {
        /// The standby.
        vm: String,
        /// What was asked (`create`, `start`, `resume`).
        operation: String,
    },
    /// A snapshot that cannot be cloned; nothing was changed.
    CloneRefused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        why: String,
    },
    /// The guest agent failed or did not answer.
    GuestAgent {
        /// Its socket.
        socket: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The guest was left paused on purpose, or could not be resumed: the store and QEMU
    /// agree on its disks, but it does not run. `fix` is the command that resumes it.
    LeftPaused {
        /// What happened.
        what: String,
        /// What failed.
        cause: Box<Error>,
        /// The exact command to run.
        fix: String,
    },
    /// A memory file that is not a complete qsnap memory file.
    BadMemoryFile {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Every message already says its causes, so [`std::error::Error::source`] is `None`: see
/// the module docs.
impl std::error::Error for Error {}

impl From<CreateError> for Error {
    fn from(e: CreateError) -> Self {
        Error::Create(e)
    }
}

impl From<DeleteError> for Error {
    fn from(e: DeleteError) -> Self {
        Error::Delete(e)
    }
}

impl From<RevertError> for Error {
    fn from(e: RevertError) -> Self {
        Error::Revert(e)
    }
}

impl From<BundleError> for Error {
    fn from(e: BundleError) -> Self {
        Error::Bundle(e)
    }
}

impl From<LazyRamError> for Error {
    fn from(e: LazyRamError) -> Self {
        Error::LazyRam(e)
    }
}

/// The overlay paths of `disks` (`(device, overlay)`), for messages.
pub(crate) fn overlay_list(disks: &[(String, PathBuf)]) -> String {
    disks
        .iter()
        .map(|(dev, p)| format!("{dev}: {}", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn blocked_hint(reasons: &[String], tsc_hz: Option<u64>) -> String {
    if !reasons.iter().any(|r| r.contains("invtsc")) {
        return String::new();
    }
    let hz = tsc_hz.map_or("<Hz>".to_owned(), |hz| hz.to_string());
    format!(
        ". Fix: start QEMU with a fixed TSC frequency (-cpu …,+invtsc,tsc-frequency={hz}; `qsnap run` adds it), \
         or take a disk-only snapshot (--disk-only)"
    )
}

impl Error {
    /// For a failed create: the overlays the disks stay on (QEMU went away after the switch,
    /// or merging back failed). The VM writes to them; a restart must open them.
    pub fn kept_overlays(&self) -> Vec<(String, PathBuf)> {
        match self {
            Error::Create(CreateError::QemuExited { kept_overlays, .. }) => kept_overlays.clone(),
            Error::Create(CreateError::RollbackIncomplete {
                cause,
                kept_overlays,
                ..
            }) => {
                let mut all = cause.kept_overlays();
                all.extend(kept_overlays.iter().cloned());
                all
            }
            Error::StoreBehind { cause, .. } => cause.kept_overlays(),
            _ => Vec::new(),
        }
    }

    /// True when QEMU closed the connection (it exited or crashed).
    pub fn is_disconnected(&self) -> bool {
        match self {
            Error::Qmp { source, .. } => source.is_disconnected(),
            Error::Create(CreateError::QemuExited { .. }) => true,
            _ => false,
        }
    }

    /// True when a QMP command got no answer in time (it may still have run).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Qmp {
                source: qsnap_qmp::Error::Timeout { .. },
                ..
            }
        )
    }

    /// True when a QMP command may have run though no answer to it could be taken as
    /// success or failure: it timed out, or QEMU's answer could not be read (it ran, and
    /// how is unknown). Undo paths look at QEMU's state rather than assume either way.
    pub fn may_have_run(&self) -> bool {
        self.is_timeout()
            || matches!(
                self,
                Error::Qmp {
                    source: qsnap_qmp::Error::Unreadable { .. },
                    ..
                }
            )
    }

    pub(crate) fn qmp(step: &'static str) -> impl FnOnce(qsnap_qmp::Error) -> Error {
        move |source| Error::Qmp { step, source }
    }
}

#[cfg(test)]
mod tests;
