//! The store's on-disk records, versioned: VM records, snapshot manifests and the journal of
//! an unfinished operation. This file is the one home of the file format: every type that is
//! written to the store is defined here, and the store imports nothing above it.
//!
//! Field names are the JSON keys (kebab-case). Adding an optional field keeps [`SCHEMA`];
//! anything else bumps it, and a reader refuses a schema it does not know rather than guess.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The version of the record, manifest and journal layout this build reads and writes.
pub const SCHEMA: u32 = 1;

/// The version of a manifest whose lazy RAM maps the command line's own RAM backends
/// (`lazy.blocks`): a qsnap that reads only [`SCHEMA`] would ignore the blocks and give QEMU a
/// second backend of the same id after stopping the VM, so such a manifest is one it refuses.
/// This build reads both.
pub const SCHEMA_NAMED_RAM: u32 = 2;

/// How a VM came under qsnap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Started by something else; registered with `attach`.
    Attached,
    /// Started by qsnap (`run`).
    Run,
}

/// How to start the VM again: QEMU's command line as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct LaunchCommand {
    /// `argv[0]` first.
    pub argv: Vec<String>,
    /// The working directory relative paths in `argv` are resolved against.
    pub cwd: PathBuf,
}

/// A disk's current top image (what the VM writes to now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct CurrentDisk {
    /// Device name, as in the snapshot manifests (drive id or guest device id).
    pub device: String,
    /// The image the VM writes to.
    pub image: PathBuf,
    /// The image the recorded command line names for this disk (rewritten to `image` at
    /// relaunch).
    pub launch_image: PathBuf,
    /// True when qsnap created `image` (an overlay).
    #[serde(default)]
    pub owned: bool,
}

/// One VM in the store (`<store>/vms/<name>/vm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// When that process started (clock ticks since boot, `/proc/<pid>/stat`), so that a pid
    /// the kernel has since given to another process is never taken for this VM's QEMU.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// How to start it again (unknown for a TCP monitor on another host).
    pub command: Option<LaunchCommand>,
    /// The snapshot the VM's current state descends from (the parent of the next one).
    pub current: Option<String>,
    /// Each disk's current top image, updated after every operation.
    #[serde(default)]
    pub disks: Vec<CurrentDisk>,
    /// Every image file qsnap created for this VM and has not removed: the only files a
    /// delete or a repair may ever unlink.
    #[serde(default)]
    pub owned_images: Vec<PathBuf>,
    /// The QEMU guest agent's socket, found in the command line (for `--quiesce`).
    #[serde(default)]
    pub guest_agent: Option<PathBuf>,
    /// When it was registered (RFC 3339).
    pub registered_at: String,
    /// For a clone: the VM and snapshot it was made from, and where the per-VM paths of the
    /// source's command line went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOf>,
    /// For a standby (`qsnap pool`): the pool it belongs to and what it was made from. A
    /// standby is a clone made ahead of time whose guest has never run; a clone claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyOf>,
}

impl VmRecord {
    /// A record with nothing in it (no QEMU, no disks): the "VM that uses nothing" a
    /// reference graph is gathered from when only the other VMs' images matter.
    pub(crate) fn blank(name: &str) -> VmRecord {
        VmRecord {
            schema: SCHEMA,
            name: name.to_owned(),
            qmp: String::new(),
            origin: Origin::Run,
            pid: None,
            pid_start: None,
            command: None,
            current: None,
            disks: Vec::new(),
            owned_images: Vec::new(),
            guest_agent: None,
            registered_at: String::new(),
            clone_of: None,
            standby: None,
        }
    }
}

/// What a clone was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct CloneOf {
    /// The source VM.
    pub vm: String,
    /// The snapshot the clone started from.
    pub snapshot: String,
    /// Each per-VM path of the source's command line and the clone's own copy of it.
    pub moved: Vec<MovedPath>,
    /// The standby the clone was made from, when it claimed one: its overlays stay where
    /// the standby's QEMU opened them, `<store>/standbys/<standby>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
}

/// What a standby is ready to become: a clone of `snapshot` of `vm`, as long as nothing it
/// was made from has changed since ([`Fingerprint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct StandbyOf {
    /// The source VM.
    pub vm: String,
    /// The snapshot it holds, loaded (or mapped) and paused.
    pub snapshot: String,
    /// What it was made from.
    pub fingerprint: Fingerprint,
    /// Whether the clone that claims it runs at once (the snapshot's guest was running, or
    /// the snapshot holds no memory and the clone boots).
    pub resume: bool,
    /// Whether its RAM is mapped from the snapshot's RAM image (else it was loaded).
    #[serde(default)]
    pub lazy: bool,
    /// Why no clone may take it (a claim found it so): the next refill discards it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable: Option<String>,
}

/// What a standby was made from: if any of it differs when a clone asks, the standby is
/// discarded, never handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Fingerprint {
    /// When the snapshot was taken (a snapshot deleted and taken again under its name
    /// differs).
    pub snapshot_taken_at: String,
    /// A hash of the source's recorded command line and working directory.
    pub command: String,
    /// The QEMU binary's identity (device, inode, size, modification time).
    pub qemu: String,
}

/// A pool of standbys (`<store>/pools/<vm>/<snapshot>.json`): how many the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PoolRecord {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// The source VM.
    pub vm: String,
    /// The snapshot.
    pub snapshot: String,
    /// How many standbys to keep ready.
    pub size: usize,
    /// When the size was last set (RFC 3339).
    pub set_at: String,
}

/// A per-VM file or socket a clone got its own copy of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct MovedPath {
    /// The option it appears in (`-chardev ser`, `-pidfile`, `-qmp`, …).
    pub option: String,
    /// The source's path.
    pub from: PathBuf,
    /// The clone's.
    pub to: PathBuf,
}

/// How a snapshot captures the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Memory as it was at the request (background-snapshot); the guest pauses for
    /// milliseconds whatever its dirty rate.
    PointInTime,
    /// Memory as it was at the end of a live copy; the guest pauses while the last dirty
    /// pages are written.
    Precopy,
    /// Disks only (crash-consistent), no memory.
    DiskOnly,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::PointInTime => "point-in-time",
            Mode::Precopy => "precopy",
            Mode::DiskOnly => "disk-only",
        })
    }
}

/// The memory part of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryImage {
    /// The memory file (qsnap header, then QEMU's stream).
    pub file: PathBuf,
    /// Bytes of QEMU's stream in it.
    pub bytes: u64,
    /// Guest RAM size as QEMU reported it.
    pub ram_bytes: u64,
    /// Migration capabilities that were on for the save (a restore sets the same).
    pub capabilities: Vec<String>,
    /// Checksum of QEMU's stream (`xxh3-128:<hex>`), checked before a revert touches the VM.
    #[serde(default)]
    pub checksum: Option<String>,
    /// Set once the memory was made lazy (`qsnap lazy-ram`): guest RAM lives in a flat image
    /// a revert maps copy-on-write, and `file` holds only the device state (saved with
    /// `x-ignore-shared`, which is then among `capabilities`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyRam>,
}

/// Guest RAM as a flat image (zero pages are holes), mapped by a revert instead of loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct LazyRam {
    /// The image (`<snapshot>.ram` in the VM's memory directory).
    pub image: PathBuf,
    /// The id of the RAM backend QEMU names the block by (`pc.ram` for `-m` on pc/q35).
    pub backend: String,
    /// The image's size: the guest's RAM.
    pub size: u64,
    /// Size and mtime when it was made; a revert refuses an image that changed.
    pub stamp: ImageStamp,
    /// `xxh3-128:<hex>` of the whole image, checked by `qsnap check` (a revert checks the
    /// stamp: reading all of RAM would cost what lazy RAM saves).
    pub checksum: String,
    /// The command line's own RAM backends (`-machine memory-backend=`, `-numa
    /// node,memdev=`), each mapped from its part of the image; empty: the machine's RAM from
    /// `-m`, the one block `backend`, all of the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<RamBlock>,
}

/// One RAM block in a RAM image: the memory backend QEMU names it by, and where it lies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct RamBlock {
    /// The backend's id (`-object memory-backend-…,id=`).
    pub id: String,
    /// Where its pages start in the image, in bytes.
    pub offset: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Precopy's live phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct LivePhase {
    /// How long the guest ran while memory was copied.
    pub live_ms: f64,
    /// Passes over RAM.
    pub passes: u64,
    /// True when the copy did not converge within the limit and qsnap paused the guest.
    pub forced_pause: bool,
}

/// An image file's size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ImageStamp {
    /// Size in bytes.
    pub bytes: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
}

/// One disk of a snapshot: the image it froze and the overlay the VM went on writing to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDisk {
    /// Device id (`-drive` id) or, for `-blockdev`, the guest device's id.
    pub device: String,
    /// The node that became the overlay's backing (QEMU's name at the time).
    pub node: String,
    /// The image the snapshot froze: the disk's state at the snapshot, never written again
    /// while the snapshot exists (a delete may merge another layer into it and then names
    /// the result here).
    pub image: PathBuf,
    /// Its format.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The overlay created by the snapshot (where the VM's writes went after it).
    pub overlay: PathBuf,
    /// qsnap's node name for that overlay.
    pub overlay_node: String,
    /// The frozen image's size and modification time, so a revert can tell that nobody
    /// changed it.
    #[serde(default)]
    pub frozen: Option<ImageStamp>,
}

/// A device a snapshot left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct SkippedDisk {
    /// Device id or node name.
    pub device: String,
    /// `read-only` or `empty`.
    pub reason: String,
}

/// What a snapshot captured and how (the body of a manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct CreateReport {
    /// How the VM was captured.
    pub mode: Mode,
    /// Whether the guest was running when the snapshot was taken.
    pub was_running: bool,
    /// The memory image (`None` for disk-only).
    pub memory: Option<MemoryImage>,
    /// Disks switched to overlays (their images are frozen from now on).
    pub disks: Vec<SnapshotDisk>,
    /// Devices left alone.
    pub skipped: Vec<SkippedDisk>,
    /// How long the guest's vCPUs were stopped, measured by qsnap.
    pub pause_ms: f64,
    /// QEMU's own figure for the stop (`downtime`), when it gives one.
    pub qemu_downtime_ms: Option<u64>,
    /// Precopy's live phase.
    pub live_phase: Option<LivePhase>,
    /// Disk-only with `quiesce`: how many guest filesystems were frozen for the switch.
    #[serde(default)]
    pub quiesced_filesystems: Option<u64>,
    /// Wall time of the whole create.
    pub total_ms: f64,
    /// Disk-only with `quiesce`: why the guest's filesystems could not be thawed after the
    /// switch (the snapshot is taken; they may still be frozen). Not stored: the caller must
    /// retry the thaw (`vm` journals it).
    #[serde(skip)]
    pub thaw_failed: Option<String>,
    /// Auto mode: why a point-in-time snapshot was not possible, when QEMU refused it and the
    /// snapshot was taken with precopy instead. Not stored (the mode is).
    #[serde(skip)]
    pub fell_back: Option<String>,
}

/// One snapshot (`<store>/vms/<vm>/snapshots/<name>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// The VM it belongs to.
    pub vm: String,
    /// Its name.
    pub name: String,
    /// The snapshot the VM's state descended from when this one was taken (a delete moves
    /// the children of a deleted snapshot to its parent).
    pub parent: Option<String>,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// QEMU's version at the time (a restore needs a QEMU that reads this stream).
    pub qemu_version: String,
    /// QEMU's machine type (e.g. `pc-i440fx-10.0`), when QEMU said: a revert relaunches with
    /// exactly this type, whatever alias the command line used.
    pub machine: Option<String>,
    /// What was captured and how.
    #[serde(flatten)]
    pub snapshot: CreateReport,
    /// Set for a snapshot that came from a bundle (`qsnap import`): where from, and the
    /// content hash of every file as the bundle carried it (an incremental bundle names its
    /// base by these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<Imported>,
    /// What it is for, in the words of whoever took it (`create --description`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Where an imported snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Imported {
    /// The VM it was exported from.
    pub vm: String,
    /// Its name there.
    pub snapshot: String,
    /// When it was imported (RFC 3339).
    pub at: String,
    /// The bundle's seal hash (`blake3:<hex>` of its seal entry).
    pub bundle: String,
    /// Every file the import wrote for it, with the content hash the bundle gave it and its
    /// size and mtime once written (a file whose stamp changed since is no base for an
    /// incremental import).
    pub files: Vec<ImportedFile>,
}

/// One file an import wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ImportedFile {
    /// The file.
    pub path: PathBuf,
    /// `blake3:<hex>` of its content as the bundle carried it.
    pub hash: String,
    /// Its size and mtime once the import was done.
    pub stamp: ImageStamp,
}

// ---- the journal ------------------------------------------------------------------------

/// The journal of an operation that changes a VM in several steps (`<vm>/journal.json`):
/// written before the first change and updated at each step that matters, removed when the
/// operation is over. One that is still there was interrupted (qsnap killed, host crash); the
/// next operation on the VM finishes it or rolls it back first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Journal {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// The qsnap process that wrote it.
    pub pid: u32,
    /// When the operation began (RFC 3339).
    pub started_at: String,
    /// What it was doing.
    pub intent: Intent,
}

/// The operation of a journal, with what recovery needs to finish or undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum Intent {
    /// A snapshot being taken.
    Create(CreateIntent),
    /// A revert to a snapshot.
    Revert(RevertIntent),
    /// Snapshots being deleted and their layers merged.
    Delete(DeleteIntent),
    /// A QEMU being started.
    Start(StartIntent),
    /// A QEMU being stopped.
    Stop(StopIntent),
    /// A snapshot was taken with the guest's filesystems frozen, and thawing them failed:
    /// they may still be frozen, and the thaw is retried until it works or the guest is gone.
    Thaw(ThawIntent),
    /// A standby (this VM) becoming the clone `new`.
    Claim(ClaimIntent),
}

impl Intent {
    /// A short description for messages (`create s1`, `revert s2`, …).
    pub fn describe(&self) -> String {
        match self {
            Intent::Create(c) => format!("create {}", c.snapshot),
            Intent::Revert(r) => format!("revert {}", r.snapshot),
            Intent::Delete(d) if d.snapshots.is_empty() => {
                "merge of layers no snapshot needs".into()
            }
            Intent::Delete(d) => format!("delete {}", d.snapshots.join(", ")),
            Intent::Start(_) => "start".into(),
            Intent::Stop(_) => "stop".into(),
            Intent::Thaw(t) => format!("thaw after create {}", t.snapshot),
            Intent::Claim(c) => format!("claim as {}", c.new),
        }
    }
}

/// A migration setting to put back after a save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SavedSettings {
    /// Every migration capability and its state before the save.
    pub capabilities: Vec<(String, bool)>,
    /// `max-bandwidth` before the save.
    pub max_bandwidth: Option<u64>,
}

/// An overlay a create makes and switches a disk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlannedOverlay {
    /// The disk.
    pub device: String,
    /// The image it is on now (the overlay's backing).
    pub image: PathBuf,
    /// That image's node in QEMU (what a merge-back commits into).
    #[serde(default)]
    pub node: String,
    /// The overlay file.
    pub overlay: PathBuf,
    /// Its node name in QEMU.
    pub overlay_node: String,
}

/// An unfinished create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateIntent {
    /// The snapshot being taken.
    pub snapshot: String,
    /// The memory file it writes (`None` for disk-only).
    pub memory_file: Option<PathBuf>,
    /// The overlays it makes.
    pub overlays: Vec<PlannedOverlay>,
    /// Whether the guest ran before (so a recovery resumes it).
    pub was_running: bool,
    /// The QEMU it talks to.
    pub qemu_pid: Option<u32>,
    /// Migration settings to restore.
    pub settings: Option<SavedSettings>,
    /// The guest agent's socket when the create freezes the guest's filesystems (a recovery
    /// thaws them first).
    #[serde(default)]
    pub quiesce: Option<PathBuf>,
    /// Set once QEMU's part is done: the snapshot exists, only the store is left to update.
    pub committed: Option<Box<Manifest>>,
    /// Made offline, with qemu-img (a stopped VM): no QEMU ever opened its overlays, so an
    /// interrupted one's overlays go whatever they hold (a half-written header included).
    #[serde(default)]
    pub offline: bool,
}

/// Where a revert got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevertPhase {
    /// New overlays being made; the VM untouched.
    Preparing,
    /// The old QEMU is being stopped or the new one started and loaded. The new QEMU's guest
    /// has not run yet: qsnap resumes it only after the journal says [`RevertPhase::Running`].
    Relaunching,
    /// The new QEMU holds the snapshot's state and its guest may run (on the new overlays);
    /// the store is left to update. Written *before* the guest is resumed.
    Running,
}

/// An unfinished revert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RevertIntent {
    /// The snapshot reverted to.
    pub snapshot: String,
    /// Where it got to.
    pub phase: RevertPhase,
    /// The new overlays it makes.
    pub new_overlays: Vec<PathBuf>,
    /// The disks before it (their overlays are abandoned once it is done).
    pub old_disks: Vec<CurrentDisk>,
    /// The disks once it is done.
    pub new_disks: Vec<CurrentDisk>,
    /// Whether the reverted guest is to run (not left paused).
    pub resume: bool,
    /// The QEMU it replaces.
    pub old_pid: Option<u32>,
    /// The QEMU it started, recorded right after the launch (before anything is loaded into
    /// it), so that a recovery tells it apart from any other QEMU by pid and start time.
    pub new_pid: Option<u32>,
    /// When that process started (clock ticks since boot, `/proc/<pid>/stat`).
    #[serde(default)]
    pub new_pid_start: Option<u64>,
    /// The snapshot a `--keep-current` revert saved first, if any.
    #[serde(default)]
    pub kept_current: Option<String>,
}

/// Where a delete got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeletePhase {
    /// Manifests and memory files being removed (children moved to the parent).
    Removing,
    /// Layers no snapshot needs any more being merged.
    Consolidating,
}

/// An unfinished delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeleteIntent {
    /// The snapshots being deleted.
    pub snapshots: Vec<String>,
    /// Their manifests as they were (so a recovery knows their files and parents).
    pub manifests: Vec<Manifest>,
    /// Where it got to.
    pub phase: DeletePhase,
    /// The round of merges in progress (at most one per disk), if any.
    #[serde(default)]
    pub merges: Vec<MergeStep>,
    /// Set while a round may pause the guest (to switch a disk's active layer): whether the
    /// guest ran before, so a recovery resumes it.
    #[serde(default)]
    pub guest_was_running: Option<bool>,
}

/// One merge of two layers of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MergeStep {
    /// The disk.
    pub device: String,
    /// How.
    pub kind: MergeKind,
    /// The layer no snapshot needs (merged away, or merged into when it is an original image).
    pub lower: PathBuf,
    /// Its only child.
    pub upper: PathBuf,
    /// `lower`'s backing (what `upper` ends up on, for a stream).
    pub lower_backing: Option<PathBuf>,
    /// The format of `lower_backing`.
    pub lower_backing_format: Option<String>,
    /// The format of `lower`.
    pub lower_format: String,
    /// The children of `upper` (rebased onto `lower` after a commit).
    pub upper_children: Vec<PathBuf>,
    /// Live (in the running QEMU) or offline (`qemu-img`).
    pub live: bool,
    /// The block job's id, for a live merge.
    pub job: Option<String>,
}

/// The two ways two layers become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeKind {
    /// `lower`'s data is copied up into `upper`, which then backs onto `lower`'s backing;
    /// `lower` is unlinked. Writes only into `upper`, whose content does not change.
    Stream,
    /// `upper`'s data is copied down into `lower` (an original image, never unlinked);
    /// everything that named `upper` names `lower` afterwards; `upper` is unlinked. Writes
    /// only into `lower`, which nothing but `upper` reads.
    Commit,
}

/// An unfinished start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StartIntent {
    /// The command line being started.
    pub argv: Vec<String>,
}

/// A thaw still owed to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ThawIntent {
    /// The snapshot whose `--quiesce` froze the filesystems.
    pub snapshot: String,
    /// The guest agent's socket.
    pub socket: PathBuf,
}

/// A claim of a standby by a clone: the standby's files move into the clone's directory,
/// then the clone's record is written (the point of no return), then the standby's goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClaimIntent {
    /// The clone's name.
    pub new: String,
    /// The entries of the standby's directory the claim moves (only these ever move back).
    #[serde(default)]
    pub moved: Vec<String>,
}

/// An unfinished stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StopIntent {
    /// The QEMU being stopped.
    pub pid: Option<u32>,
}
