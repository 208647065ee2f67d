//! Snapshots: the memory file, disk overlays, watching the save, and the create state machine.
//!
//! ```text
//! point-in-time create (background-snapshot)
//!   preflight ── nothing changed yet; every failure here leaves the VM untouched
//!   memory file (0600, header "incomplete") → add-fd → overlay files → overlay nodes
//!   → capabilities (background-snapshot, events; others off — precopy: events, mapped-ram,
//!     multifd) → max-bandwidth up
//!   stop ─┐ guest frozen
//!   migrate file:/dev/fdset/N,offset=4096
//!   wait until QEMU saved device state and armed write protection (RAM pages flowing)
//!   transaction [blockdev-snapshot …]   (disks switch while the guest is still frozen)
//!   cont ─┘ pause ends; QEMU keeps writing RAM as it was at `stop`
//!   wait completed → fsync → checksum → header "complete" → remove-fd → capabilities back
//!
//! precopy create: … migrate (guest runs) → QEMU pauses it at the end (or qsnap does, past
//!   the live limit) → completed → transaction → cont
//! disk-only create: overlay files → overlay nodes → transaction
//! ```
//! Every step has an undo (see `rollback.rs`), pushed before the step runs and run in reverse
//! order on failure; each asks QEMU what actually happened first, and once the disks have
//! switched, the undo is an active commit back into the base images (`jobs.rs` runs block
//! jobs). Deleting a snapshot and merging layers lives in `crate::vm` (it needs the store).

mod create;
pub(crate) mod disks;
pub(crate) mod jobs;
pub mod memfile;
pub mod revert;
pub(crate) mod rollback;
pub(crate) mod save;
pub(crate) mod transport;

/// The persisted parts of a snapshot (defined by the store, which owns the file format).
pub use crate::store::{
    CreateReport, ImageStamp, LivePhase, MemoryImage, Mode, SkippedDisk, SnapshotDisk,
};
pub(crate) use create::thaw_guest;
pub use create::{create, preflight, CreateOptions, Planned};
pub use save::{ProgressFn, SaveProgress};
pub use transport::has_file_uri;
