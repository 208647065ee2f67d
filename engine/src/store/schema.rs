//! The store's on-disk records, versioned. Field names are the JSON keys (kebab-case); adding
//! an optional field keeps `SCHEMA`, anything else bumps it, and a reader refuses a schema it
//! does not know rather than guessing.

use crate::snapshot::CreateReport;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The version of the record and manifest layout this build reads and writes.
pub const SCHEMA: u32 = 1;

/// How a VM came under qsnap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Started by something else; registered with `attach`.
    Attached,
    /// Started by qsnap (`run`).
    Run,
}

/// How to start the VM again: QEMU's command line as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LaunchCommand {
    /// `argv[0]` first.
    pub argv: Vec<String>,
    /// The working directory relative paths in `argv` are resolved against.
    pub cwd: PathBuf,
}

/// A disk's current top image (what the VM writes to now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CurrentDisk {
    /// Device name, as in the snapshot manifests (drive id or guest device id).
    pub device: String,
    /// The image the VM writes to.
    pub image: PathBuf,
    /// The image the recorded command line names for this disk (rewritten to `image` at
    /// relaunch).
    pub launch_image: PathBuf,
    /// True when qsnap created `image` (an overlay), so it may delete it once abandoned.
    #[serde(default)]
    pub owned: bool,
}

/// One VM in the store (`<store>/vms/<name>/vm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmRecord {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// The VM's name.
    pub name: String,
    /// Its QMP socket (`unix:PATH`, a path, or `tcp:HOST:PORT`).
    pub qmp: String,
    /// How it came under qsnap.
    pub origin: Origin,
    /// QEMU's pid when it was last seen.
    pub pid: Option<u32>,
    /// How to start it again (unknown for a TCP monitor on another host).
    pub command: Option<LaunchCommand>,
    /// The snapshot the VM's current state descends from (the parent of the next one).
    pub current: Option<String>,
    /// Each disk's current top image, updated after every snapshot.
    #[serde(default)]
    pub disks: Vec<CurrentDisk>,
    /// The QEMU guest agent's socket, found in the command line (for `--quiesce`).
    #[serde(default)]
    pub guest_agent: Option<PathBuf>,
    /// When it was registered (RFC 3339).
    pub registered_at: String,
}

/// One snapshot (`<store>/vms/<vm>/snapshots/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// The VM it belongs to.
    pub vm: String,
    /// Its name.
    pub name: String,
    /// The snapshot the VM's state descended from when this one was taken.
    pub parent: Option<String>,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// QEMU's version at the time (a restore needs a QEMU that reads this stream).
    pub qemu_version: String,
    /// QEMU's machine type (e.g. `pc-i440fx-10.0`), when QEMU said.
    pub machine: Option<String>,
    /// What was captured and how.
    #[serde(flatten)]
    pub snapshot: CreateReport,
}
