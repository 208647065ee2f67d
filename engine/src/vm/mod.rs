//! VMs by name: the layer that joins QMP work ([`crate::snapshot`]), image files
//! ([`crate::image`]) and the store ([`crate::store`]), one operation per VM at a time.
//!
//! Every operation that changes a VM runs inside an [`Op`]: the VM's lock is taken, an
//! interrupted earlier operation (a journal left behind) is finished or rolled back first
//! (`recover/`), the VM's state is derived once (`state.rs`) and checked against what the
//! operation needs, and the operation journals its intent before its first change.
//!
//! Files (one operation or one concern each; `README.md` has the map): `create.rs`,
//! `revert.rs`, `delete.rs` and `merge/` (merging layers no snapshot needs), `clone.rs`
//! (clone and remove), `pool/` (standbys made ahead of time, and a clone claiming one), `forget.rs` (a VM out of the store, its disks kept), `lazy/` (lazy-ram and its helper QEMU), `register.rs` (run, attach),
//! `lifecycle.rs` (start, stop, pause, resume, status), `create/offline.rs` (a disk-only snapshot of a stopped VM), `check.rs` and `findings.rs` (check and its report),
//! `rename.rs` (rename, the latest snapshot, free names), `relative.rs` (relative paths an older qsnap recorded, for `check`), `recover/` (settling an
//! interrupted operation), `refs.rs` (who uses which image: the guard before any unlink),
//! `state.rs` (the one place a VM's state is derived), `usage.rs` (what its snapshots take on disk), `overview.rs` (every VM at a glance).
//! Holds no QMP connection between calls (QEMU's monitor serves one client at a time).

mod check;
mod clone;
mod create;
mod delete;
mod findings;
mod forget;
mod lazy;
mod lifecycle;
mod merge;
mod overview;
mod pool;
mod recover;
mod refs;
mod register;
mod relative;
mod rename;
mod revert;
mod state;
mod usage;
mod verified;

pub use check::CheckOptions;
pub use clone::{CloneOptions, CloneReport, RemoveReport, Replacement};
pub use create::{CreateOutcome, VmCreateOptions};
pub use delete::{DeleteOptions, DeleteReport, MergeProgress, MergeProgressFn, MergeReport};
pub use findings::{CheckReport, Finding};
pub use forget::{ForgetOptions, ForgetReport, ForgottenDisk};
pub use lazy::LazyReport;
pub use lifecycle::{DiskChain, Interrupted, PauseOutcome, ShutdownOutcome, Status};
pub use overview::Listing;
pub use pool::{DiscardedStandby, PoolReport, PoolStatus};
pub use recover::Recovery;
pub use register::{AttachOptions, RunOptions, RunReport};
pub use revert::{RamRestore, RevertOptions, RevertReport};
pub use state::{Operation, VmState};
pub use usage::{Size, SnapshotUsage, Usage};

use crate::error::{Error, Result};
use crate::name::{SnapshotName, VmName};
use crate::snapshot::CreateOptions;
use crate::store::{Manifest, Store, VmLock, VmRecord};
use qsnap_qmp::{ConnectOptions, Endpoint, Qmp};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Called when an operation finds and settles an interrupted one.
pub type RecoveryFn = Arc<dyn Fn(&Recovery) + Send + Sync>;

/// The entry point: a store, how to reach VMs, and what cancels their operations.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    connect: ConnectOptions,
    cancel: CancellationToken,
    on_recovery: Option<RecoveryFn>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `store`, with default connection options.
    pub fn new(store: Store) -> Engine {
        crate::cache::cache_in(store.root().join("cache"));
        Engine {
            store,
            connect: ConnectOptions {
                // A VM that is starting may not have its socket yet.
                connect_retry: Duration::from_secs(2),
                ..ConnectOptions::default()
            },
            cancel: CancellationToken::new(),
            on_recovery: None,
        }
    }

    /// Replaces the QMP connection options (timeouts).
    pub fn with_connect_options(mut self, opts: ConnectOptions) -> Engine {
        self.connect = opts;
        self
    }

    /// Operations stop cleanly when `token` is cancelled (Ctrl-C): before their point of no
    /// return they roll back; a merge in progress is cancelled.
    pub fn with_cancel(mut self, token: CancellationToken) -> Engine {
        self.cancel = token;
        self
    }

    /// The same engine with VM locks taken at once (no `--wait`): for work that is best
    /// effort and must not queue behind another operation.
    pub(crate) fn at_once(&self) -> Engine {
        let mut e = self.clone();
        e.store = e.store.at_once();
        e
    }

    /// The same engine with VM locks waited for up to `wait`: for background work (a pool's
    /// refill) that should wait for the user's operations rather than give up.
    pub(crate) fn patient(&self, wait: Duration) -> Engine {
        let mut e = self.clone();
        e.store = e.store.with_lock_wait(wait);
        e
    }

    /// Tells `f` whenever an operation finds an interrupted one and finishes or rolls it back.
    pub fn on_recovery(mut self, f: RecoveryFn) -> Engine {
        self.on_recovery = Some(f);
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The token that cancels this engine's operations.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// A VM in the store.
    pub async fn vm(&self, name: &VmName) -> Result<Vm> {
        let record = self.store.record(name).await?;
        Ok(self.vm_from(name.clone(), record))
    }

    /// The names of the VMs in the store.
    pub async fn vms(&self) -> Result<Vec<VmName>> {
        self.store.vms().await
    }

    pub(crate) fn vm_from(&self, name: VmName, record: VmRecord) -> Vm {
        Vm {
            name,
            record,
            engine: self.clone(),
        }
    }
}

/// A VM in the store.
#[derive(Clone)]
pub struct Vm {
    name: VmName,
    record: VmRecord,
    engine: Engine,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Its name.
    pub fn name(&self) -> &VmName {
        &self.name
    }

    /// Its record as last read.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// The store it lives in.
    pub fn store(&self) -> &Store {
        &self.engine.store
    }

    pub(crate) fn cancel(&self) -> &CancellationToken {
        &self.engine.cancel
    }

    /// Connects without waiting for a socket to appear: "is it up?".
    pub(crate) async fn connect_quick(&self, record: &VmRecord) -> Result<Qmp> {
        let opts = ConnectOptions {
            connect_retry: Duration::ZERO,
            greeting_timeout: Duration::from_secs(2),
            ..self.engine.connect.clone()
        };
        Qmp::connect_with(Endpoint::parse(&record.qmp), &opts)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))
    }

    /// Connects to its monitor. Drop the client soon: QEMU serves one monitor client at a time.
    pub async fn connect(&self) -> Result<Qmp> {
        Qmp::connect_with(Endpoint::parse(&self.record.qmp), &self.engine.connect)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))
    }

    /// The engine it belongs to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Default options for a snapshot of this VM: memory goes into the store, overlays are
    /// named after each disk's original image, the engine's cancel token applies.
    pub fn create_options(&self, snap: SnapshotName) -> CreateOptions {
        let mut opts = CreateOptions::new(snap, self.store().memory_dir(&self.name));
        opts.overlay_stems = self
            .record
            .disks
            .iter()
            .filter_map(|d| {
                let stem = d.launch_image.file_stem()?.to_string_lossy().into_owned();
                Some((d.device.clone(), stem))
            })
            .collect();
        opts.cancel = self.engine.cancel.child_token();
        opts
    }

    /// Its snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<Manifest>> {
        self.store().manifests(&self.name).await
    }

    /// One snapshot.
    pub async fn snapshot(&self, snap: &SnapshotName) -> Result<Manifest> {
        self.store().manifest(&self.name, snap).await
    }

    /// The VM's lock, shared, for an operation that only reads its snapshots (a clone, an
    /// export): refused while an interrupted operation waits to be settled (its files may be
    /// half-made; only an exclusive holder settles it).
    pub(crate) async fn lock_for_reading(&self, operation: &str) -> Result<VmLock> {
        let lock = self.store().lock_shared(self.name(), operation).await?;
        refuse_if_interrupted(self.store(), self.name()).await?;
        Ok(lock)
    }

    /// Starts an operation: takes the VM's lock, settles an interrupted earlier operation
    /// (journal) first, and reads the record fresh.
    pub(crate) async fn begin(&self, operation: &str) -> Result<Op> {
        let lock = self.store().lock(&self.name, operation).await?;
        if let Some(done) = recover::settle(self).await? {
            if let Some(f) = &self.engine.on_recovery {
                f(&done);
            }
        }
        let record = self.store().record(&self.name).await?;
        Ok(Op {
            _lock: lock,
            record,
        })
    }
}

/// One operation on a VM, holding its lock.
pub(crate) struct Op {
    _lock: VmLock,
    /// The record, read after the lock was taken.
    pub record: VmRecord,
}

/// Refuses (busy) while an interrupted operation on `vm` waits for `check --repair`: for
/// holders of its lock that do not settle it themselves (a clone, an export, an import into
/// it, pause and resume).
pub(crate) async fn refuse_if_interrupted(store: &Store, vm: &VmName) -> Result<()> {
    if store.journal(vm).await?.is_some() {
        return Err(Error::Unsettled { vm: vm.to_string() });
    }
    Ok(())
}
