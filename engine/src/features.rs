//! What a QEMU can do, asked of its own schema once per QEMU *binary* rather than on every
//! operation: `query-qmp-schema` costs tens of milliseconds (QEMU renders ~300 KB of JSON and
//! qsnap parses it), which a revert or a create would otherwise pay each time.
//!
//! The answers go in the engine's cache (`cache.rs`), keyed by the binary's identity as
//! `/proc/<pid>/exe` shows it for the QEMU at the other end of the socket (device, inode,
//! size, mtime, ctime), plus the version in its greeting. An upgraded or rebuilt binary
//! changes the key; a QEMU whose binary cannot be identified (TCP monitor, deleted binary) is
//! asked every
//! time. This module only reads the schema; it never changes QEMU.

use crate::cache::{lookup, remember};
use crate::error::{Error, Result};
use qsnap_qmp::Qmp;
use serde::{Deserialize, Serialize};

/// The features qsnap decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Features {
    /// The `background-snapshot` migration capability (point-in-time snapshots).
    pub background_snapshot: bool,
    /// `file:` migration URIs (and so fdsets as the memory file): QEMU ≥ 8.2.
    pub file_uri: bool,
    /// `blockdev-set-active` (QEMU ≥ 10.0).
    pub blockdev_set_active: bool,
    /// The `x-ignore-shared` migration capability (lazy RAM).
    pub ignore_shared: bool,
    /// The `mapped-ram` and `multifd` migration capabilities (QEMU ≥ 9.0): RAM pages at
    /// fixed offsets of the file, written and read by several threads.
    pub mapped_ram: bool,
}

impl Features {
    fn from_schema(schema: &qsnap_qmp::Schema) -> Features {
        Features {
            background_snapshot: schema.has_migration_capability("background-snapshot"),
            file_uri: schema.has_argument("migrate", &["channels", "addr", "filename"]),
            blockdev_set_active: schema.has_command("blockdev-set-active"),
            ignore_shared: schema.has_migration_capability("x-ignore-shared"),
            mapped_ram: schema.has_migration_capability("mapped-ram")
                && schema.has_migration_capability("multifd"),
        }
    }

    /// The features of the QEMU behind `qmp`: from the cache when its binary was seen before,
    /// else from its schema (then cached).
    pub async fn of(qmp: &Qmp) -> Result<Features> {
        let key = match qmp.peer_pid() {
            Some(pid) => {
                binary_key(pid, &format!("features|{}", qmp.greeting().version.qemu)).await
            }
            None => None,
        };
        if let Some(key) = &key {
            if let Some(f) = lookup(key).await {
                return Ok(f);
            }
        }
        let schema = qmp
            .schema()
            .await
            .map_err(Error::qmp("reading QEMU's schema"))?;
        let f = Features::from_schema(&schema);
        if let Some(key) = key {
            remember(key, &f).await;
        }
        Ok(f)
    }
}

/// `path|size|mtime_ns|version` of the QEMU binary running as `pid`, if it can be told.
async fn binary_key(pid: u32, version: &str) -> Option<String> {
    let exe = tokio::fs::read_link(format!("/proc/{pid}/exe"))
        .await
        .ok()?;
    // A replaced binary shows as "… (deleted)": its features are the old file's.
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return None;
    }
    crate::cache::stat_key(
        &exe,
        std::path::Path::new(&format!("/proc/{pid}/exe")),
        version,
    )
    .await
}
