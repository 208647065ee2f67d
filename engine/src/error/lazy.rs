//! What a lazy-RAM conversion ([`crate::Vm::make_lazy`]) did when it failed: refused (the
//! snapshot stays as it was, and loads eagerly), or switched the manifest without knowing
//! the switch is durable (every memory file is kept until `qsnap check --repair`).

use std::path::PathBuf;

use super::Error;

/// How making a snapshot's memory lazy failed (inside [`Error::LazyRam`]). QEMU too old for
/// it is [`Error::QemuLacks`] with [`crate::QemuFeature::LazyRam`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyRamError {
    /// This snapshot cannot have lazy RAM; nothing was changed.
    #[error("lazy RAM for snapshot {snapshot}: {reason}")]
    Refused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        reason: LazyRamRefusal,
    },
    /// A file the conversion would write exists but no snapshot names it (left by an
    /// interrupted conversion); nothing was changed.
    #[error("{} exists but no snapshot names it (an interrupted lazy-ram?); `qsnap check {vm} --repair` removes it", path.display())]
    Leftover {
        /// The file.
        path: PathBuf,
        /// The VM.
        vm: String,
    },
    /// The helper QEMU that writes the RAM image cannot be launched from this command line.
    #[error("lazy RAM: {why}")]
    HelperCommandLine {
        /// What is wrong with the command line.
        why: String,
    },
    /// The manifest names the RAM image, but writing it reported an error twice: the switch
    /// may not survive a power cut. Every memory file of the snapshot is kept.
    #[error("the manifest names the RAM image, but that could not be made durable ({problem}); every memory file of {snapshot} is kept, and `qsnap check {vm} --repair` removes the one the manifest does not name")]
    NotDurable {
        /// The VM.
        vm: String,
        /// The snapshot.
        snapshot: String,
        /// Why the second write failed.
        problem: Box<Error>,
    },
    /// Writing the manifest failed and it could not be read back: whether it names the
    /// stream or the RAM image is unknown. Every memory file of the snapshot is kept.
    #[error("the manifest could not be read back ({problem}), so whether it names the stream or the RAM image is unknown; every memory file of {snapshot} is kept")]
    SwitchUnknown {
        /// The snapshot.
        snapshot: String,
        /// Why it could not be read.
        problem: Box<Error>,
    },
}

/// Why a snapshot cannot have lazy RAM ([`LazyRamError::Refused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyRamRefusal {
    /// A disk-only snapshot has no memory.
    #[error("it is a disk-only snapshot (no memory to map)")]
    DiskOnly,
    /// The VM's command line or machine type does not allow it (no memory backend, a RAM
    /// size qsnap cannot read, …).
    #[error("{why}")]
    CommandLine {
        /// What stands in the way.
        why: String,
    },
    /// The memory directory has too little room for the RAM image.
    #[error("the memory directory has {} MiB free; the RAM image needs about {} MiB", free >> 20, need >> 20)]
    NoSpace {
        /// Bytes free.
        free: u64,
        /// Bytes the image needs (what the stream holds, and a margin).
        need: u64,
    },
    /// The snapshot's memory file is damaged or incomplete.
    #[error("its memory file is not whole: {problem}")]
    MemoryFileNotWhole {
        /// What the check found.
        problem: Box<Error>,
    },
}
