//! The engine's one error type. Variants say which step failed and carry what a caller needs
//! to react; QEMU's own refusals keep QEMU's class and description (inside [`Error::Qmp`]).

use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Talking to QEMU failed (connection, timeout, or QEMU refused a command).
    #[error("{step}: {source}")]
    Qmp {
        /// What the engine was doing.
        step: &'static str,
        /// The QMP error (keeps QEMU's `class` and `desc` when QEMU refused).
        source: qsnap_qmp::Error,
    },
    /// A VM or snapshot name that cannot be used.
    #[error("invalid {name}: {why}")]
    InvalidName {
        /// The name as given (escaped).
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// QEMU says the VM's memory cannot be saved.
    #[error("QEMU cannot save this VM's memory: {}{}", reasons.join("; "), blocked_hint(reasons, *tsc_hz))]
    MigrationBlocked {
        /// QEMU's `blocked-reasons`.
        reasons: Vec<String>,
        /// For the invtsc blocker: the TSC frequency to pin at launch.
        tsc_hz: Option<u64>,
    },
    /// The VM is in a state a snapshot cannot start from.
    #[error("the VM is {state}; a snapshot needs it running or paused")]
    BadRunState {
        /// QEMU's run state.
        state: String,
    },
    /// Something else is going on in QEMU that a snapshot must not race with.
    #[error("the VM is busy: {what}; try again when it is done")]
    Busy {
        /// What is running.
        what: String,
    },
    /// This QEMU lacks what the operation needs.
    #[error("{what}")]
    Unsupported {
        /// What is missing.
        what: String,
    },
    /// A disk that cannot take a qcow2 overlay.
    #[error("disk {device} cannot be snapshotted: {why}")]
    DiskNotSnapshottable {
        /// Device id or node name.
        device: String,
        /// Why.
        why: String,
    },
    /// A directory a snapshot would write into cannot be used (missing, not a directory,
    /// not writable, or relative); found before anything changes.
    #[error("the {what} {} cannot be used: {why}", path.display())]
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
    #[error("cannot register VM \"{vm}\": {why}; nothing was recorded")]
    RegisterRefused {
        /// The name asked for.
        vm: String,
        /// Why, and what to do.
        why: String,
    },
    /// A file the operation would create already exists; qsnap never overwrites.
    #[error("{} already exists; qsnap never overwrites (pick another snapshot name or remove it)", path.display())]
    TargetExists {
        /// The path.
        path: PathBuf,
    },
    /// A local file operation failed. The OS's reason is in the message too, not only in
    /// `source`: an `Io` nested in another error's message (`TakenBut`, `StoreBehind`) must
    /// still say "No space left on device".
    #[error("{what} ({}): {source}", path.display())]
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
    #[error("{tool} failed on {}: {why}", path.display())]
    Tool {
        /// The tool and its subcommand (`qemu-img create`).
        tool: String,
        /// The file it worked on.
        path: PathBuf,
        /// What it said, or that it timed out.
        why: String,
    },
    /// QEMU failed to save memory (e.g. disk full); everything was rolled back.
    #[error("saving memory failed: {desc}")]
    SaveFailed {
        /// QEMU's description.
        desc: String,
    },
    /// QEMU exited (or closed the monitor) during the operation.
    #[error("QEMU went away during the snapshot ({cause}); nothing QMP-side could be rolled back{}", if kept_overlays.is_empty() { String::new() } else { format!("; the disks stay on their new overlays, which hold the guest's last writes and are recorded as its disks: {}", overlay_list(kept_overlays)) })]
    QemuExited {
        /// What failed first.
        cause: Box<Error>,
        /// Disks that had switched to their new overlay before QEMU went: `(device, overlay)`.
        /// The overlays hold the guest's latest writes; a restart must use them.
        kept_overlays: Vec<(String, PathBuf)>,
    },
    /// The operation failed and some of its changes could not be undone.
    #[error("{cause}; and the rollback was incomplete: {}", problems.join("; "))]
    RollbackIncomplete {
        /// What failed first.
        cause: Box<Error>,
        /// What could not be undone.
        problems: Vec<String>,
        /// Disks that stay on the new overlay (merging it back failed): `(device, overlay)`.
        /// The VM writes there now; the store records it.
        kept_overlays: Vec<(String, PathBuf)>,
    },
    /// The snapshot was taken (QEMU's part is done), but recording it failed; the journal
    /// lets a repair finish it — unless the journal could not be written either.
    #[error("snapshot {snapshot} was taken, but the store could not record it ({problem}); {}", taken_but_fix(vm, *journaled))]
    TakenBut {
        /// The VM.
        vm: String,
        /// The snapshot.
        snapshot: String,
        /// What failed afterwards.
        problem: Box<Error>,
        /// Whether the journal holds the snapshot (committed), so that a repair can finish
        /// recording it.
        journaled: bool,
    },
    /// The snapshot was taken and recorded, but something after it failed; `fix` says what
    /// finishes it.
    #[error("snapshot {snapshot} of {vm} was taken, but {problem}; {fix}")]
    TakenWithProblem {
        /// The VM.
        vm: String,
        /// The snapshot.
        snapshot: String,
        /// What failed.
        problem: String,
        /// The exact command to run.
        fix: String,
    },
    /// An operation failed, and the store could not be brought in line with what QEMU does
    /// now; its journal says what is left to do.
    #[error(
        "{cause}; and the store could not be updated ({problem}): run `qsnap check {vm} --repair`"
    )]
    StoreBehind {
        /// The VM.
        vm: String,
        /// What failed first.
        cause: Box<Error>,
        /// Why the store could not be updated.
        problem: Box<Error>,
    },
    /// Snapshots were deleted, but merging the layers they leave did not finish. Nothing is
    /// lost: the layers stay in the chains until a repair merges them.
    #[error("{} deleted, but merging the layers left behind did not finish ({problem}); nothing is lost: `qsnap check {vm} --repair` merges them", snapshots.join(", "))]
    DeletedBut {
        /// The VM.
        vm: String,
        /// The snapshots deleted.
        snapshots: Vec<String>,
        /// What stopped the merge.
        problem: Box<Error>,
    },
    /// A fault injected by a test (`failpoints` builds only).
    #[error("injected fault at {point}")]
    Injected {
        /// The failpoint.
        point: String,
    },
    /// The operation was cancelled (e.g. Ctrl-C); everything was rolled back.
    #[error("cancelled; everything was rolled back")]
    Cancelled,
    /// A block job failed.
    #[error("block job {job} failed: {desc}")]
    BlockJob {
        /// Job id.
        job: String,
        /// QEMU's description.
        desc: String,
    },
    /// No such VM in the store.
    #[error("no VM named \"{vm}\" in the store {} (register it with `qsnap attach {vm} --qmp SOCKET`)", store.display())]
    UnknownVm {
        /// The name asked for.
        vm: String,
        /// The store searched.
        store: PathBuf,
    },
    /// The VM is already in the store.
    #[error("a VM named \"{vm}\" is already in the store")]
    VmExists {
        /// The name.
        vm: String,
    },
    /// No such snapshot.
    #[error("VM \"{vm}\" has no snapshot named \"{snapshot}\" (see `qsnap list {vm}`)")]
    UnknownSnapshot {
        /// The VM.
        vm: String,
        /// The name asked for.
        snapshot: String,
    },
    /// A snapshot of that name exists.
    #[error("VM \"{vm}\" already has a snapshot named \"{snapshot}\"; pick another name")]
    SnapshotExists {
        /// The VM.
        vm: String,
        /// The name.
        snapshot: String,
    },
    /// Another operation holds the VM.
    #[error("VM \"{vm}\" is busy with another qsnap operation (pid and operation: {holder}); wait for it to finish")]
    Locked {
        /// The VM.
        vm: String,
        /// `<pid> <operation>` of the holder, as it wrote it.
        holder: String,
    },
    /// A store file that cannot be read.
    #[error("the store file {} is unreadable: {why}", path.display())]
    CorruptStore {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// QEMU's recorded command line cannot be used as asked.
    #[error("cannot relaunch from the recorded command line: {why}")]
    CommandLine {
        /// What is wrong.
        why: String,
    },
    /// QEMU did not come up.
    #[error("QEMU did not start: {why} (log {}){}", log.display(), if tail.is_empty() { String::new() } else { format!(":\n{tail}") })]
    LaunchFailed {
        /// What happened.
        why: String,
        /// QEMU's log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The VM is running and the operation needs it stopped.
    #[error("VM \"{vm}\" is running (pid {pid}); stop it first with `qsnap stop {vm}`")]
    AlreadyRunning {
        /// The VM.
        vm: String,
        /// QEMU's pid.
        pid: u32,
    },
    /// The operation needs a running QEMU and there is none.
    #[error("VM \"{vm}\" is not running; start it with `qsnap start {vm}`")]
    NotRunning {
        /// The VM.
        vm: String,
    },
    /// The VM's QEMU is alive but its monitor does not answer: qsnap will not act on it, and
    /// never starts a second QEMU beside it.
    #[error("VM \"{vm}\"'s QEMU{} is alive but its monitor does not answer ({why}); if another client holds the monitor, give qsnap its own -qmp socket; `qsnap stop {vm}` kills a hung QEMU", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
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
    #[error("could not stop the QEMU{} at {endpoint}: {why}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
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
    #[error("the QEMU behind this socket runs as uid {uid}, qsnap as uid {ours}; re-running another user's command line is refused unless you ask for it (--allow-other-user)")]
    ForeignQemu {
        /// QEMU's uid.
        uid: u32,
        /// Ours.
        ours: u32,
    },
    /// An interrupted operation needs a person to decide how to go on.
    #[error(
        "VM \"{vm}\" has an interrupted {operation} that qsnap cannot finish by itself: {what}"
    )]
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
    #[error("kept {}: {why}", path.display())]
    UnlinkRefused {
        /// The image.
        path: PathBuf,
        /// What uses it, or why qsnap may not remove it.
        why: String,
    },
    /// A delete that would lose data or break another snapshot is refused; nothing changed.
    #[error("cannot delete {snapshot}: {why}; nothing was changed")]
    DeleteRefused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        why: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
    /// A snapshot that cannot be cloned; nothing was changed.
    #[error("cannot clone {snapshot}: {why}; nothing was changed")]
    CloneRefused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        why: String,
    },
    /// A snapshot that cannot be reverted to; nothing was changed.
    #[error("cannot revert to {snapshot}: {why}; nothing was changed")]
    RevertRefused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        why: String,
    },
    /// A revert failed after the old QEMU was stopped; says how to get back.
    #[error("revert failed: {cause}. The VM is stopped; its disks are untouched ({}). `qsnap start {vm}` starts it again on them", disks.join(", "))]
    RevertFailed {
        /// The VM.
        vm: String,
        /// What failed.
        cause: Box<Error>,
        /// The images the VM's disks are still on.
        disks: Vec<String>,
    },
    /// The guest agent failed or did not answer.
    #[error("guest agent at {}: {what}", socket.display())]
    GuestAgent {
        /// Its socket.
        socket: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The guest was left paused on purpose, or could not be resumed: the store and QEMU
    /// agree on its disks, but it does not run. `fix` is the command that resumes it.
    #[error("{what} ({cause}); the guest is left paused: {fix}")]
    LeftPaused {
        /// What happened.
        what: String,
        /// What failed.
        cause: Box<Error>,
        /// The exact command to run.
        fix: String,
    },
    /// A memory file that is not a complete qsnap memory file.
    #[error("{} is not usable: {why}", path.display())]
    BadMemoryFile {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The overlay paths of `disks` (`(device, overlay)`), for messages.
pub(crate) fn overlay_list(disks: &[(String, PathBuf)]) -> String {
    disks
        .iter()
        .map(|(dev, p)| format!("{dev}: {}", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn blocked_hint(reasons: &[String], tsc_hz: Option<u64>) -> String {
    if !reasons.iter().any(|r| r.contains("invtsc")) {
        return String::new();
    }
    let hz = tsc_hz.map_or("<Hz>".to_owned(), |hz| hz.to_string());
    format!(
        ". Fix: start QEMU with a fixed TSC frequency (-cpu …,+invtsc,tsc-frequency={hz}; `qsnap run` adds it), \
         or take a disk-only snapshot (--disk-only)"
    )
}

/// What finishes a snapshot taken but not recorded ([`Error::TakenBut`]).
fn taken_but_fix(vm: &str, journaled: bool) -> String {
    if journaled {
        format!("`qsnap check {vm} --repair` finishes recording it")
    } else {
        format!(
            "its journal could not be written either, so it cannot be finished: `qsnap check {vm} --repair` makes the record name the disks QEMU writes to and removes its memory file; take it again once the store can be written"
        )
    }
}

impl Error {
    /// For a failed create: the overlays the disks stay on (QEMU went away after the switch,
    /// or merging back failed). The VM writes to them; a restart must open them.
    pub fn kept_overlays(&self) -> Vec<(String, PathBuf)> {
        match self {
            Error::QemuExited { kept_overlays, .. } => kept_overlays.clone(),
            Error::RollbackIncomplete {
                cause,
                kept_overlays,
                ..
            } => {
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
            Error::QemuExited { .. } => true,
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

    pub(crate) fn qmp(step: &'static str) -> impl FnOnce(qsnap_qmp::Error) -> Error {
        move |source| Error::Qmp { step, source }
    }
}
