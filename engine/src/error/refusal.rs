//! The kinds of refusal shared by the top-level [`super::Error`] variants: what this QEMU
//! lacks ([`super::Error::QemuLacks`]) and why a VM may not be removed
//! ([`super::Error::RemoveRefused`]) or forgotten ([`super::Error::ForgetRefused`]). A refusal changed nothing.

use std::path::PathBuf;

/// What this QEMU lacks ([`super::Error::QemuLacks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QemuFeature {
    /// `background-snapshot`, which point-in-time snapshots need: take a precopy snapshot.
    BackgroundSnapshot,
    /// Before 9.0 QEMU resumes a paused VM at the end of a point-in-time snapshot: take a
    /// precopy snapshot of a paused VM there.
    PausedBackgroundSnapshot,
    /// Reading a snapshot saved in the mapped-ram format (QEMU ≥ 9.0).
    MappedRam {
        /// The snapshot being loaded.
        snapshot: String,
    },
    /// What lazy RAM needs (QEMU ≥ 8.2: `x-ignore-shared`, `file:` migration, a read-only
    /// private RAM mapping).
    LazyRam,
}

/// Why `remove` refused a VM ([`super::Error::RemoveRefused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoveRefusal {
    /// The VM is not a clone: its overlays hold what its guest wrote (`delete --all` merges
    /// them into its images).
    NotAClone,
    /// Another VM runs on one of this VM's images (a clone of one of its snapshots): remove
    /// that one first.
    InUse {
        /// The other VM.
        by: String,
        /// The image it runs on.
        image: PathBuf,
    },
}

/// Why `forget` refused a VM ([`super::Error::ForgetRefused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForgetRefusal {
    /// Its QEMU runs (or may run): `--stop` stops it first.
    Running {
        /// QEMU's pid, when known.
        pid: Option<u32>,
    },
    /// It has snapshots: `delete --all` merges them into its images first, or
    /// `--with-snapshots` forgets them too (their memory files go; disk images stay).
    HasSnapshots {
        /// Their names.
        snapshots: Vec<String>,
    },
    /// It is a clone: `remove` removes it with its overlays (which back onto its source's
    /// snapshot images).
    Clone {
        /// The VM it was cloned from.
        of: String,
    },
    /// Another VM runs on one of its images (a clone of one of its snapshots).
    InUse {
        /// The other VM.
        by: String,
        /// The image it runs on.
        image: PathBuf,
    },
}
