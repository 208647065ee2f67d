//! What a create ([`crate::Vm::create_snapshot`], [`crate::snapshot::create`]) did when it
//! failed: refused before anything changed, rolled back, rolled back only in part, or took the
//! snapshot but could not finish the rest. An embedder matches on [`CreateError`] to know
//! which: a snapshot taken but not recorded needs a repair; one rolled back can just be retried.

use std::path::PathBuf;

use super::{blocked_hint, overlay_list, Error};

/// How a create failed (inside [`Error::Create`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// QEMU says the VM's memory cannot be saved; nothing was changed.
    #[error("QEMU cannot save this VM's memory: {}{}", reasons.join("; "), blocked_hint(reasons, *tsc_hz))]
    MigrationBlocked {
        /// QEMU's `blocked-reasons`.
        reasons: Vec<String>,
        /// For the invtsc blocker: the TSC frequency to pin at launch.
        tsc_hz: Option<u64>,
    },
    /// A memory snapshot was asked to quiesce the guest; nothing was changed.
    #[error("quiescing is for disk-only snapshots: a memory snapshot already holds what the guest has not written, and would save its filesystems frozen")]
    QuiesceNeedsDiskOnly,
    /// A point-in-time snapshot of a VM whose RAM QEMU cannot write-protect (a VM reverted
    /// lazily maps its RAM from a snapshot's image); nothing was changed. Precopy works.
    #[error("a point-in-time snapshot: QEMU cannot write-protect this VM's RAM ({qemu}); a VM reverted lazily maps its RAM from a snapshot's image, which allows precopy snapshots only — use --mode precopy (or auto)")]
    CannotWriteProtect {
        /// QEMU's refusal of `background-snapshot`.
        qemu: qsnap_qmp::Error,
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
}

/// What finishes a snapshot taken but not recorded ([`CreateError::TakenBut`]).
fn taken_but_fix(vm: &str, journaled: bool) -> String {
    if journaled {
        format!("`qsnap check {vm} --repair` finishes recording it")
    } else {
        format!(
            "its journal could not be written either, so it cannot be finished: `qsnap check {vm} --repair` makes the record name the disks QEMU writes to and removes its memory file; take it again once the store can be written"
        )
    }
}
