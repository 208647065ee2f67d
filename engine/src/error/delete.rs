//! What a delete ([`crate::Vm::delete`]) did when it failed: refused with nothing changed, or
//! deleted the snapshots but did not finish merging the layers they leave (nothing is lost; a
//! repair merges them). An embedder retries the first after fixing its cause and runs
//! `check --repair` for the second.

use super::Error;

/// How a delete failed (inside [`Error::Delete`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeleteError {
    /// A delete that would lose data or break another snapshot is refused; nothing changed.
    #[error("cannot delete {snapshot}: {why}; nothing was changed")]
    Refused {
        /// The snapshot (or the image whose merge is refused).
        snapshot: String,
        /// Why.
        why: String,
    },
    /// Snapshots were deleted, but merging the layers they leave did not finish. Nothing is
    /// lost: the layers stay in the chains until a repair merges them.
    #[error("{} deleted, but merging the layers left behind did not finish ({problem}); nothing is lost: `qsnap check {vm} --repair` merges them", snapshots.join(", "))]
    MergeUnfinished {
        /// The VM.
        vm: String,
        /// The snapshots deleted.
        snapshots: Vec<String>,
        /// What stopped the merge.
        problem: Box<Error>,
    },
}
