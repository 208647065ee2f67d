//! Typed QMP commands the engine sends that the bundled `qapi-qmp` schema lacks or types too
//! strictly for QEMUs newer than it (an unknown enum value must not break a snapshot).
//! Everything else uses `qsnap_qmp::types` directly. No logic lives here: only wire shapes.

use qsnap_qmp::Command;
use serde::{Deserialize, Serialize};

/// An empty reply (`{}`).
#[derive(Debug, Deserialize)]
pub struct Empty {}

/// `query-migrate`, keeping `status` as text so that a newer QEMU's states still decode.
#[derive(Debug, Serialize)]
pub struct QueryMigrate {}

/// The parts of `query-migrate`'s reply the engine reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MigrateInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, …
    #[serde(default)]
    pub status: Option<String>,
    /// RAM progress.
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Time the VM was stopped for the save, in ms, as QEMU measured it.
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Why it failed.
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
    /// What blocks migration.
    #[serde(rename = "blocked-reasons", default)]
    pub blocked_reasons: Option<Vec<String>>,
}

impl MigrateInfo {
    /// True while a migration is under way (including its setup and wind-down).
    pub fn is_running(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some(
                "setup"
                    | "active"
                    | "cancelling"
                    | "device"
                    | "pre-switchover"
                    | "wait-unplug"
                    | "postcopy-active"
                    | "postcopy-paused"
                    | "postcopy-recover"
                    | "postcopy-recover-setup"
            )
        )
    }
}

/// RAM counters of a migration.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RamStats {
    /// Guest RAM size.
    #[serde(default)]
    pub total: u64,
    /// Pages sent in full.
    #[serde(default)]
    pub normal: u64,
    /// Zero pages sent as a flag.
    #[serde(default)]
    pub duplicate: u64,
    /// Bytes sent so far.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes still to send (precopy: dirty memory).
    #[serde(default)]
    pub remaining: u64,
    /// Current rate in Mbit/s.
    #[serde(default)]
    pub mbps: f64,
    /// Passes over RAM so far (precopy).
    #[serde(rename = "dirty-sync-count", default)]
    pub dirty_sync_count: u64,
}

impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
    type Ok = MigrateInfo;
}

/// One capability and its state, with the name kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Capability name.
    pub capability: String,
    /// On or off.
    pub state: bool,
}

/// `query-migrate-capabilities`.
#[derive(Debug, Serialize)]
pub struct QueryMigrateCapabilities {}

impl Command for QueryMigrateCapabilities {
    const NAME: &'static str = "query-migrate-capabilities";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<Capability>;
}

/// `migrate-set-capabilities`.
#[derive(Debug, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to set.
    pub capabilities: Vec<Capability>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `blockdev-add` of a qcow2 overlay over a new file node, with `backing: null` so that
/// `blockdev-snapshot` attaches the current top as its backing.
#[derive(Debug, Serialize)]
pub struct BlockdevAddOverlay {
    /// Always `qcow2`.
    pub driver: &'static str,
    /// Our node name.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The protocol node, defined inline.
    pub file: FileNode,
    /// `null`: no backing yet.
    pub backing: Option<()>,
}

/// An inline `file` protocol node.
#[derive(Debug, Serialize)]
pub struct FileNode {
    /// Always `file`.
    pub driver: &'static str,
    /// The image path.
    pub filename: String,
}

impl Command for BlockdevAddOverlay {
    const NAME: &'static str = "blockdev-add";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `migrate-set-parameters` with only `max-bandwidth` (bytes/s).
#[derive(Debug, Serialize)]
pub struct SetMaxBandwidth {
    /// Bytes per second.
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
}

impl Command for SetMaxBandwidth {
    const NAME: &'static str = "migrate-set-parameters";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `query-migrate-parameters`, reading only `max-bandwidth`.
#[derive(Debug, Serialize)]
pub struct QueryMaxBandwidth {}

/// The part of `query-migrate-parameters` the engine reads.
#[derive(Debug, Deserialize)]
pub struct MaxBandwidth {
    /// Bytes per second.
    #[serde(rename = "max-bandwidth", default)]
    pub max_bandwidth: Option<u64>,
}

impl Command for QueryMaxBandwidth {
    const NAME: &'static str = "query-migrate-parameters";
    const ALLOW_OOB: bool = false;
    type Ok = MaxBandwidth;
}

/// `block-commit` of an active layer into its backing (an "active commit"): the job goes
/// `ready`, and `job-complete` then pivots the device back onto the base.
#[derive(Debug, Serialize)]
pub struct BlockCommit {
    /// Our job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The root node (the overlay).
    pub device: String,
    /// The node to commit into.
    #[serde(rename = "base-node")]
    pub base_node: String,
}

impl Command for BlockCommit {
    const NAME: &'static str = "block-commit";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `blockdev-set-active` (QEMU >= 10.0) for all nodes: after a completed precopy save the
/// nodes are inactive until `cont`, which a VM that stays paused never sends.
#[derive(Debug, Serialize)]
pub struct BlockdevSetActive {
    /// True to activate.
    pub active: bool,
}

impl Command for BlockdevSetActive {
    const NAME: &'static str = "blockdev-set-active";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `query-cpus-fast`, reading only each CPU's QOM path (the typed union is per-target).
#[derive(Debug, Serialize)]
pub struct QueryCpusFast {}

/// One CPU's QOM path.
#[derive(Debug, Deserialize)]
pub struct CpuPath {
    /// e.g. `/machine/unattached/device[0]`.
    #[serde(rename = "qom-path")]
    pub qom_path: String,
}

impl Command for QueryCpusFast {
    const NAME: &'static str = "query-cpus-fast";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<CpuPath>;
}
