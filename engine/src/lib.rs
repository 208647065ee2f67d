//! # qsnap-engine — snapshot orchestration over QMP
//!
//! The library a VMM embeds to take live snapshots (qcow2 overlays + memory and device state)
//! of a running QEMU, revert to them and delete them, talking QMP directly (no libvirt).
//! It knows nothing of terminals or argument parsing: the `qsnap` binary is a thin layer on
//! top.
//!
//! Two levels:
//! - [`Engine`] and [`Vm`]: VMs by name in a [`Store`], one operation per VM at a time,
//!   snapshot manifests kept on disk. What the CLI uses.
//! - [`snapshot::create`], [`snapshot::revert`] (prepare → your QEMU with `-incoming defer`
//!   → restore) and [`inspect`]: the same work on a bare [`qsnap_qmp::Qmp`] connection, for a
//!   VMM that keeps its own records and starts QEMU its own way. Or hand [`Vm::revert_with`] a
//!   [`launch::Launcher`].
//!
//! Every operation on a [`Vm`] journals its intent before its first change; an interrupted
//! one (qsnap killed, host crash) is finished or rolled back by the next operation, and
//! [`Vm::check`] verifies (and repairs) a VM's store against the files and QEMU.
//!
//! ```no_run
//! # async fn demo() -> qsnap_engine::Result<()> {
//! use qsnap_engine::{Engine, SnapshotName, Store, VmName};
//! let engine = Engine::new(Store::new("/var/lib/qsnap"));
//! let vm = engine.attach(&VmName::new("web1")?, "/run/web1/qmp.sock").await?;
//! let opts = vm.create_options(SnapshotName::new("before-upgrade")?);
//! let manifest = vm.create_snapshot(opts).await?;
//! println!("guest paused {:.1} ms", manifest.snapshot.pause_ms);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod blocks;
pub mod bundle;
mod cache;
mod chains;
mod error;
mod failpoint;
mod features;
mod guest_agent;
mod image;
pub mod inspect;
pub mod launch;
mod name;
mod proc;
mod qcow2;
mod qemu;
pub mod snapshot;
pub mod store;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
mod tool;
mod unlink;
mod vm;

pub use bundle::{
    keygen, BundleProgressFn, ExportOptions, ExportReport, ExportedFile, ImportOptions,
    ImportReport,
};
pub use cache::{file_identity, resolve_binary, sweep as sweep_cache};
pub use error::{
    BundleError, CreateError, DeleteError, Error, ErrorKind, ForgetRefusal, LazyRamError,
    LazyRamRefusal, QemuFeature, RemoveRefusal, Result, RevertError,
};
pub use failpoint::{setup_from_env as failpoints_from_env, Scenario as FailpointScenario};
pub use guest_agent::answers as guest_agent_answers;
pub use image::create_blank as create_blank_image;
pub use inspect::{DiskInfo, VmInfo};
pub use name::{check_description, SnapshotName, VmName};
pub use store::{Manifest, Store, VmRecord};
pub use vm::{
    AttachOptions, CheckOptions, CheckReport, CloneOptions, CloneReport, DeleteOptions,
    DeleteReport, DiskChain, Engine, Finding, ForgetOptions, ForgetReport, ForgottenDisk,
    Interrupted, LazyReport, MergeProgress, MergeProgressFn, MergeReport, Operation, PauseOutcome,
    RamRestore, Recovery, RecoveryFn, RemoveReport, RevertOptions, RevertReport, RunOptions,
    RunReport, ShutdownOutcome, Status, Vm, VmState,
};
pub use vm::{CreateOutcome, Replacement, VmCreateOptions};
pub use vm::{DiscardedStandby, PoolReport, PoolStatus};
pub use vm::{Listing, Size, SnapshotUsage, Usage};
