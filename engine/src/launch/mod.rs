//! Starting and stopping QEMU.
//!
//! `argv.rs` models the command line (disk rewrites, `tsc-frequency`, `-incoming defer`);
//! `ram.rs` the RAM image a lazy revert maps and the inert helper QEMU that makes it;
//! `clone_argv.rs` a clone's command line (per-VM paths moved, what must differ refused);
//! [`Launcher`] is how the engine asks for a QEMU to be started — [`ProcessLauncher`] runs the
//! recorded command line as a detached process, an embedder plugs in its own; `process.rs`
//! holds the process side (spawn, wait for the monitor, graceful quit then kill); `tsc.rs`
//! finds the TSC frequency to pin for invtsc CPUs; `machine.rs` checks and pins the versioned
//! machine type a snapshot needs.

pub mod argv;
pub(crate) mod clone_argv;
pub mod machine;
mod options;
mod process;
pub(crate) mod ram;
pub(crate) mod replace;
pub(crate) mod tsc;
pub(crate) mod untrusted;

pub use argv::DiskSubstitution;
pub use process::{
    build_argv, quit_or_kill, stop_qemu, KillSignal, ProcessLauncher, SpawnHook, StopOutcome,
    QUIT_TIMEOUT,
};
#[cfg_attr(not(feature = "failpoints"), allow(unused_imports))]
pub(crate) use process::{log_tail, nobody_serves, wait_ready, NotReady};
pub use ram::RamMapping;
pub use replace::candidates as replace_candidates;
pub use tsc::{tsc_frequency_for, TscSource};

use crate::error::Result;
use crate::store::LaunchCommand;
use std::future::Future;
use std::path::PathBuf;

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The VM's name (for logs and process titles).
    pub vm: String,
    /// The recorded command line.
    pub command: LaunchCommand,
    /// Disk images to open instead of the ones the command line names.
    pub disks: Vec<DiskSubstitution>,
    /// The unix socket qsnap will reach the monitor on; added to the command line if absent.
    pub qmp_socket: PathBuf,
    /// Start with `-incoming defer`, waiting for `migrate-incoming`.
    pub incoming: bool,
    /// Start with the vCPUs paused (`-S`).
    pub paused: bool,
    /// Run this exact machine type (a revert: the snapshot's versioned type, whatever alias
    /// the command line names).
    pub machine: Option<String>,
    /// Where QEMU's stdout and stderr go.
    pub log: PathBuf,
    /// Guest RAM mapped from an image (a lazy revert) instead of QEMU's own.
    pub ram: Option<RamMapping>,
}

/// A started QEMU.
#[derive(Debug, Clone)]
pub struct Launched {
    /// Its pid, if the launcher knows it.
    pub pid: Option<u32>,
    /// The command line actually run.
    pub argv: Vec<String>,
}

/// Starts QEMU for the engine. Must return once the QMP socket in the spec answers (or fail
/// saying why QEMU did not come up).
pub trait Launcher: Send + Sync {
    /// Starts QEMU as `spec` says.
    fn launch(&self, spec: &LaunchSpec) -> impl Future<Output = Result<Launched>> + Send;
}
