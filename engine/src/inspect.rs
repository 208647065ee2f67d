//! What a running VM is and what it can do, read over QMP without changing anything.
//!
//! This is the first half of every preflight: the snapshot code asks here whether memory can be
//! saved at all (migration blockers), which mechanism this QEMU offers (background snapshot,
//! `file:` migration to an fdset) and which disks there are. It must never change VM state.

use crate::error::{Error, Result};
use qsnap_qmp::{types, Qmp, VersionTriple};
use serde::Serialize;

/// One block device as QEMU reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct DiskInfo {
    /// The name qsnap uses for it (the `-drive` id, else the guest device's id): stable across
    /// snapshots, unlike node names.
    pub name: String,
    /// The `-drive` id / legacy device name (empty for `-blockdev` nodes without one).
    pub device: String,
    /// The qdev id or path of the guest device it backs.
    pub qdev: Option<String>,
    /// The top node's name (QEMU's auto name like `#block123` for `-drive`).
    pub node_name: Option<String>,
    /// The image file of the top node (absent for an empty drive).
    pub file: Option<String>,
    /// The format driver of the top node (`qcow2`, `raw`, …).
    pub format: Option<String>,
    /// True for read-only media.
    pub read_only: bool,
}

/// A read-only summary of a running VM.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct VmInfo {
    /// QEMU's version.
    pub qemu_version: String,
    /// The distribution's package string.
    pub qemu_package: String,
    /// QEMU's run state (`running`, `paused`, `postmigrate`, …).
    pub runstate: String,
    /// True while the vCPUs run.
    pub running: bool,
    /// Why QEMU would refuse to save memory (`query-migrate` `blocked-reasons`), e.g.
    /// `State blocked by non-migratable CPU device (invtsc flag)`. Empty when it can.
    pub migration_blockers: Vec<String>,
    /// A migration currently in progress or just finished (`query-migrate` status).
    pub migration_status: Option<String>,
    /// QEMU offers `background-snapshot` (memory as of the request, guest paused for ms).
    pub background_snapshot: bool,
    /// QEMU accepts `file:` migration URIs (so memory can go to an fdset file).
    pub file_migration: bool,
    /// The block devices.
    pub disks: Vec<DiskInfo>,
}

fn enum_name<E: serde::Serialize>(e: &E) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl VmInfo {
    /// Reads the summary from a connected VM.
    pub async fn read(qmp: &Qmp) -> Result<VmInfo> {
        let version: VersionTriple = qmp.greeting().version.qemu;
        let status = qmp
            .execute(types::query_status {})
            .await
            .map_err(Error::qmp("reading the run state"))?;
        let migration = qmp
            .execute(crate::qemu::QueryMigrate {})
            .await
            .map_err(Error::qmp("reading the migration state"))?;
        let features = crate::features::Features::of(qmp).await?;
        let disks = crate::blocks::read(qmp)
            .await?
            .into_iter()
            .map(|d| DiskInfo {
                name: d.device,
                device: d.drive,
                qdev: d.qdev,
                node_name: d.medium.as_ref().and_then(|m| m.node.clone()),
                file: d.medium.as_ref().map(|m| m.raw_file.clone()),
                format: d.medium.as_ref().map(|m| m.format().to_owned()),
                read_only: d.medium.as_ref().is_some_and(|m| m.read_only),
            })
            .collect();
        Ok(VmInfo {
            qemu_version: version.to_string(),
            qemu_package: qmp.greeting().version.package.trim().to_owned(),
            runstate: enum_name(&status.status),
            running: status.running,
            migration_blockers: migration.blocked_reasons.unwrap_or_default(),
            migration_status: migration.status,
            background_snapshot: features.background_snapshot,
            file_migration: features.file_uri,
            disks,
        })
    }
}
