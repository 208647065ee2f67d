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
    /// multifd compression (`none` when off; absent before QEMU 5.0).
    #[serde(rename = "multifd-compression", default)]
    pub multifd_compression: Option<String>,
    /// TLS credentials for migration (empty when off).
    #[serde(rename = "tls-creds", default)]
    pub tls_creds: Option<String>,
}

impl MaxBandwidth {
    /// Why QEMU would refuse mapped-ram with these settings (it takes neither compression
    /// nor TLS with it), if it would.
    pub fn mapped_ram_obstacle(&self) -> Option<String> {
        if let Some(c) = self.multifd_compression.as_deref().filter(|c| *c != "none") {
            return Some(format!("multifd-compression is {c}"));
        }
        if self.tls_creds.as_deref().is_some_and(|t| !t.is_empty()) {
            return Some("migration TLS is set".into());
        }
        None
    }
}

impl Command for QueryMaxBandwidth {
    const NAME: &'static str = "query-migrate-parameters";
    const ALLOW_OOB: bool = false;
    type Ok = MaxBandwidth;
}

/// `block-commit`: the data of `top-node` (default: the active layer) and every layer
/// between it and `base-node` is copied into `base-node`. An active commit goes `ready` and
/// pivots on `job-complete`; an intermediate one rewrites the backing of the layer above
/// `top-node` when it finalizes.
#[derive(Debug, Serialize)]
pub struct BlockCommit {
    /// Our job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The root node of the disk (QEMU wants a root here).
    pub device: String,
    /// The highest layer to commit (`None`: the active layer).
    #[serde(rename = "top-node", skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    /// The node to commit into.
    #[serde(rename = "base-node")]
    pub base_node: String,
    /// `false`: the job waits in `pending` until `job-finalize`, so several disks' jobs can
    /// finish together or be cancelled together.
    #[serde(rename = "auto-finalize", skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// `false`: the concluded job stays until `job-dismiss`, so its outcome can be read.
    #[serde(rename = "auto-dismiss", skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}

impl Command for BlockCommit {
    const NAME: &'static str = "block-commit";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `block-stream`: the data of every layer between `device` and `base-node` is copied into
/// `device` (any node of the chain), which then backs onto `base-node`.
#[derive(Debug, Serialize)]
pub struct BlockStream {
    /// Our job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The node that receives the data.
    pub device: String,
    /// The node it ends up backed by (`None`: no backing, the whole chain is copied).
    #[serde(rename = "base-node", skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// See [`BlockCommit::auto_finalize`].
    #[serde(rename = "auto-finalize")]
    pub auto_finalize: bool,
    /// See [`BlockCommit::auto_dismiss`].
    #[serde(rename = "auto-dismiss")]
    pub auto_dismiss: bool,
}

impl Command for BlockStream {
    const NAME: &'static str = "block-stream";
    const ALLOW_OOB: bool = false;
    type Ok = Empty;
}

/// `query-jobs`, with states and types as text.
#[derive(Debug, Serialize)]
pub struct QueryJobs {}

/// One job.
#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    /// Its id.
    pub id: String,
    /// `created`, `running`, `ready`, `pending`, `concluded`, …
    pub status: String,
    /// `commit`, `stream`, `mirror`, `backup`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Work done so far (only the ratio to `total_progress` means something).
    #[serde(rename = "current-progress", default)]
    pub current_progress: u64,
    /// Work to do (may change while the job runs).
    #[serde(rename = "total-progress", default)]
    pub total_progress: u64,
    /// Why it failed, once concluded.
    #[serde(default)]
    pub error: Option<String>,
}

impl Command for QueryJobs {
    const NAME: &'static str = "query-jobs";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<JobInfo>;
}

/// `query-block`, reading only what the engine uses (tolerant of newer QEMUs).
#[derive(Debug, Serialize)]
pub struct QueryBlock {}

/// One block device.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    /// The `-drive` id (empty for `-blockdev` disks).
    #[serde(default)]
    pub device: String,
    /// The guest device's id or QOM path.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium (absent for an empty drive).
    #[serde(default)]
    pub inserted: Option<NodeInfo>,
}

impl Command for QueryBlock {
    const NAME: &'static str = "query-block";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<BlockInfo>;
}

/// A block node (`BlockDeviceInfo`).
#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    /// Its node name.
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// Its image (a path, or a `json:{…}` description).
    #[serde(default)]
    pub file: String,
    /// Its format driver.
    #[serde(default)]
    pub drv: String,
    /// Read-only.
    #[serde(default)]
    pub ro: bool,
    /// Its image and backing chain.
    #[serde(default)]
    pub image: Option<ImageInfo>,
}

/// An image and (nested) its backing chain.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    /// The image file.
    #[serde(default)]
    pub filename: String,
    /// Its format.
    #[serde(default)]
    pub format: String,
    /// Virtual size.
    #[serde(rename = "virtual-size", default)]
    pub virtual_size: i64,
    /// Its backing image.
    #[serde(rename = "backing-image", default)]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// `query-named-block-nodes` (`flat`: no nested chains).
#[derive(Debug, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Omit nested backing chains.
    pub flat: bool,
}

impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<NodeInfo>;
}

/// `x-debug-query-block-graph`: every node of the block layer and every edge between them,
/// without the per-image details (an unstable interface: callers fall back to
/// [`QueryNamedBlockNodes`] when it is missing or says anything unexpected).
#[derive(Debug, Serialize)]
pub struct XDebugQueryBlockGraph {}

impl Command for XDebugQueryBlockGraph {
    const NAME: &'static str = "x-debug-query-block-graph";
    const ALLOW_OOB: bool = false;
    type Ok = BlockGraph;
}

/// The block graph (`XDbgBlockGraph`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct BlockGraph {
    /// Backends, jobs and driver nodes.
    #[serde(default)]
    pub nodes: Vec<GraphNode>,
    /// Parent → child links.
    #[serde(default)]
    pub edges: Vec<GraphEdge>,
}

/// One node of the block graph.
#[derive(Debug, Clone, Deserialize)]
pub struct GraphNode {
    /// Its id in this answer.
    pub id: u64,
    /// `block-backend`, `block-job` or `block-driver` (text: a newer QEMU may add kinds).
    #[serde(rename = "type")]
    pub kind: String,
    /// A driver node's node name; a backend's or job's name.
    #[serde(default)]
    pub name: String,
}

/// One edge of the block graph.
#[derive(Debug, Clone, Deserialize)]
pub struct GraphEdge {
    /// The parent's id.
    pub parent: u64,
    /// The child's id.
    pub child: u64,
    /// The child's role (`root`, `file`, `backing`, …).
    #[serde(default)]
    pub name: String,
}

/// `query-fdsets`, reading ids and opaque names only.
#[derive(Debug, Serialize)]
pub struct QueryFdsets {}

/// One fdset.
#[derive(Debug, Clone, Deserialize)]
pub struct FdsetInfo {
    /// Its id.
    #[serde(rename = "fdset-id")]
    pub fdset_id: i64,
    /// Its descriptors.
    #[serde(default)]
    pub fds: Vec<FdsetFd>,
}

/// One descriptor of an fdset.
#[derive(Debug, Clone, Deserialize)]
pub struct FdsetFd {
    /// The opaque name given with `add-fd`.
    #[serde(default)]
    pub opaque: Option<String>,
}

impl Command for QueryFdsets {
    const NAME: &'static str = "query-fdsets";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<FdsetInfo>;
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
