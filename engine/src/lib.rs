//! # qsnap-engine — snapshot orchestration over QMP
//!
//! The library a VMM embeds to take live snapshots (qcow2 overlays + memory and device state)
//! of a running QEMU, revert to them and delete them, talking QMP directly (no libvirt).
//! It knows nothing of terminals or argument parsing: the `qsnap` binary is a thin layer on
//! top.
//!
//! Today it holds the read-only side: [`inspect`] tells what a running VM is and what it can
//! do (QEMU version, run state, migration blockers such as `invtsc`, which snapshot mechanisms
//! this QEMU offers, its disks); [`snapshot`] takes point-in-time snapshots (memory + disks at
//! one instant) with a rollback for every step. The store, revert and delete come next.
#![deny(missing_docs)]

mod error;
pub mod inspect;
mod qemu;
pub mod snapshot;

pub use error::{Error, Result};
pub use inspect::{DiskInfo, VmInfo};
