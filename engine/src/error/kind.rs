//! What a caller (a script, a supervisor) does about an [`Error`]: its [`ErrorKind`] — look
//! again (not found), retry (busy), change the request (refused), reach the VM (unreachable),
//! or read the message (failed) — and, where one command is the way on, that command
//! ([`Error::fix`]). The CLI maps kinds to exit codes and to `{"error": {"kind", …}}`.
//!
//! Classifying must never change what an error says: the message stays [`Error`]'s own.

use super::{BundleError, CreateError, DeleteError, Error, LazyRamError, RevertError};
use serde::Serialize;

/// What kind of failure an [`Error`] is, for a caller deciding what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// No such VM or snapshot.
    NotFound,
    /// Another qsnap operation holds the VM (`--wait` queues behind it), or something in
    /// QEMU must finish first (a block job): the same request may succeed later.
    Busy,
    /// The request cannot be done as asked (a name taken, a VM running that must be stopped,
    /// a QEMU that lacks a feature, an interrupted operation to settle first…); nothing was
    /// changed. Retrying as it is does not help.
    Refused,
    /// The VM's monitor could not be reached.
    Unreachable,
    /// A name or argument that cannot be used.
    Usage,
    /// An interrupt (Ctrl-C, SIGTERM) stopped it; what was done was rolled back.
    Cancelled,
    /// It was tried and failed, or needs a person to decide (an interrupted operation qsnap
    /// cannot finish by itself); the message says what state things are in.
    Failed,
}

impl Error {
    /// What kind of failure this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            Error::UnknownVm { .. } | Error::UnknownSnapshot { .. } => K::NotFound,
            Error::Locked { .. } | Error::Busy { .. } | Error::ForeignJob { .. } => K::Busy,
            Error::InvalidName { .. } => K::Usage,
            Error::Unreachable { .. } => K::Unreachable,
            Error::Qmp { source, .. } if source.is_unreachable() => K::Unreachable,
            Error::Cancelled => K::Cancelled,
            Error::QemuLacks { .. }
            | Error::RemoveRefused { .. }
            | Error::ForgetRefused { .. }
            | Error::DiskNotSnapshottable { .. }
            | Error::UnusableDirectory { .. }
            | Error::RegisterRefused { .. }
            | Error::TargetExists { .. }
            | Error::VmExists { .. }
            | Error::SnapshotExists { .. }
            | Error::AlreadyRunning { .. }
            | Error::NotRunning { .. }
            | Error::GuestPaused { .. }
            | Error::BadRunState { .. }
            | Error::CommandLine { .. }
            | Error::ForeignQemu { .. }
            | Error::CloneRefused { .. }
            | Error::StandbyUntouchable { .. }
            | Error::Unsettled { .. } => K::Refused,
            Error::Create(
                CreateError::MigrationBlocked { .. } | CreateError::QuiesceNeedsDiskOnly,
            )
            | Error::Revert(RevertError::Refused { .. })
            | Error::Delete(DeleteError::Refused { .. })
            | Error::LazyRam(LazyRamError::Refused { .. })
            // A bundle that is damaged or signed by another key is refused as one that asks
            // too much: nothing was imported, and the same bundle will not do better.
            | Error::Bundle(
                BundleError::ExportRefused { .. }
                | BundleError::ImportRefused { .. }
                | BundleError::Untrusted { .. }
                | BundleError::BadKey { .. }
                | BundleError::Corrupt { .. },
            ) => K::Refused,
            _ => K::Failed,
        }
    }

    /// The one command that is the way on, when there is one (the message says it too).
    pub fn fix(&self) -> Option<String> {
        match self {
            Error::UnknownSnapshot { vm, .. } => Some(format!("qsnap list {vm}")),
            Error::AlreadyRunning { vm, .. } => Some(format!("qsnap stop {vm}")),
            Error::NotRunning { vm } => Some(format!("qsnap start {vm}")),
            Error::GuestPaused { vm, .. } => Some(format!("qsnap resume {vm}")),

            Error::StoreBehind { vm, .. } => Some(format!("qsnap check {vm} --repair")),
            Error::Delete(DeleteError::MergeUnfinished { vm, .. }) => {
                Some(format!("qsnap check {vm} --repair"))
            }
            Error::Revert(RevertError::Failed { vm, .. }) => Some(format!("qsnap start {vm}")),
            Error::LeftPaused { fix, .. } => Some(fix.clone()),
            Error::Unsettled { vm } => Some(format!("qsnap check {vm} --repair")),
            Error::RemoveRefused {
                vm,
                reason: super::RemoveRefusal::NotAClone,
            } => Some(format!("qsnap forget {vm}")),
            Error::ForgetRefused {
                vm,
                reason: super::ForgetRefusal::Clone { .. },
            } => Some(format!("qsnap remove {vm}")),
            _ => None,
        }
    }
}

/// The name in `known` closest to `asked` by edit distance, when it is close enough to be a
/// typo (at most two edits, or a third of the name's length for long names).
pub(crate) fn closest<'a>(asked: &str, known: &'a [String]) -> Option<&'a str> {
    let limit = (asked.chars().count() / 3).max(2);
    known
        .iter()
        .map(|k| (distance(asked, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_its_name_and_a_stranger_finds_none() {
        let known = vec!["web1".to_owned(), "database".to_owned()];
        assert_eq!(closest("wbe1", &known), Some("web1"));
        assert_eq!(closest("databse", &known), Some("database"));
        assert_eq!(closest("xyz", &known), None);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
