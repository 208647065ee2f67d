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
    #[error("{step}")]
    Qmp {
        /// What the engine was doing.
        step: &'static str,
        /// The QMP error (keeps QEMU's `class` and `desc` when QEMU refused).
        source: qsnap_qmp::Error,
    },
    /// A snapshot name that cannot be used.
    #[error("invalid snapshot name \"{name}\": {why}")]
    InvalidName {
        /// The name as given (escaped).
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// QEMU says the VM's memory cannot be saved.
    #[error("QEMU cannot save this VM's memory: {}{}", reasons.join("; "), blocked_hint(reasons))]
    MigrationBlocked {
        /// QEMU's `blocked-reasons`.
        reasons: Vec<String>,
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
    /// A file the operation would create already exists; qsnap never overwrites.
    #[error("{} already exists; qsnap never overwrites (pick another snapshot name or remove it)", path.display())]
    TargetExists {
        /// The path.
        path: PathBuf,
    },
    /// A local file operation failed.
    #[error("{what} ({})", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `qemu-img` refused.
    #[error("qemu-img could not create {}: {stderr}", path.display())]
    ImageTool {
        /// The image it was asked to create.
        path: PathBuf,
        /// What it said.
        stderr: String,
    },
    /// QEMU failed to save memory (e.g. disk full); everything was rolled back.
    #[error("saving memory failed: {desc}")]
    SaveFailed {
        /// QEMU's description.
        desc: String,
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

fn blocked_hint(reasons: &[String]) -> &'static str {
    if reasons.iter().any(|r| r.contains("invtsc")) {
        " — start QEMU with a fixed TSC frequency (-cpu …,+invtsc,tsc-frequency=<Hz>) or take a disk-only snapshot"
    } else {
        ""
    }
}

impl Error {
    pub(crate) fn qmp(step: &'static str) -> impl FnOnce(qsnap_qmp::Error) -> Error {
        move |source| Error::Qmp { step, source }
    }
}
