//! What a revert ([`crate::Vm::revert`], [`crate::snapshot::revert`]) did when it failed:
//! refused with nothing changed, or failed after the old QEMU was stopped (the VM is stopped
//! on its untouched disks, and `qsnap start` brings it back).

use super::Error;

/// How a revert failed (inside [`Error::Revert`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevertError {
    /// A snapshot that cannot be reverted to; nothing was changed.
    #[error("cannot revert to {snapshot}: {why}; nothing was changed")]
    Refused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        why: String,
    },
    /// A revert failed after the old QEMU was stopped; says how to get back.
    #[error("revert failed: {cause}. The VM is stopped; its disks are untouched ({}). `qsnap start {vm}` starts it again on them", disks.join(", "))]
    Failed {
        /// The VM.
        vm: String,
        /// What failed.
        cause: Box<Error>,
        /// The images the VM's disks are still on.
        disks: Vec<String>,
    },
}
