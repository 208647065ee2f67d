//! Snapshots: names, the memory file, disk overlays, and the create state machine.
//!
//! ```text
//! point-in-time create (background-snapshot)
//!   preflight ── nothing changed yet; every failure here leaves the VM untouched
//!   memory file (0600, header "incomplete") → add-fd → overlay files → overlay nodes
//!   → capabilities (background-snapshot, events; others off) → max-bandwidth up
//!   stop ─┐ guest frozen
//!   migrate file:/dev/fdset/N,offset=4096
//!   wait until QEMU saved device state and armed write protection (RAM pages flowing)
//!   transaction [blockdev-snapshot …]   (disks switch while the guest is still frozen)
//!   cont ─┘ pause ends; QEMU keeps writing RAM as it was at `stop`
//!   wait MIGRATION completed → fsync → header "complete" → remove-fd → capabilities back
//! ```
//! Every step before `cont` has an undo, run in reverse order on failure.

mod create;
pub mod disks;
pub mod memfile;
mod name;

pub use create::{create, CreateOptions, CreateReport};
pub use name::SnapshotName;
