//! The bundle's own records: the manifest that opens a bundle and the seal that closes it.
//! This file is the one home of what a bundle says about itself (the container — tar, zstd,
//! sparse entries, the content hash — is `container.rs` and `sparse.rs`); `docs/bundles.md`
//! describes both for people.
//!
//! Everything here is read from input that can come from anyone: the types are plain data,
//! and [`BundleManifest::check`] refuses a manifest whose names could reach outside the
//! bundle before anything else looks at it.

use crate::store::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `format` field of every bundle manifest.
pub(crate) const FORMAT: &str = "qsnap-bundle";
/// The version of the bundle layout this build writes and reads.
pub(crate) const VERSION: u32 = 1;
/// The first entry of a bundle.
pub const MANIFEST: &str = "qsnap-bundle.json";
/// The last entry of a bundle.
pub const SEAL: &str = "qsnap-seal.json";
/// Where a path of the VM's own directory stands in a bundle's command line.
pub(crate) const VM_TOKEN: &str = "/@qsnap-vm";
/// Where a file of the bundle stands in a bundle's command line (`/@qsnap-bundle/<name>`).
pub(crate) const BUNDLE_TOKEN: &str = "/@qsnap-bundle";
/// The largest manifest or seal a reader takes (they are JSON, kilobytes in practice).
pub(crate) const JSON_LIMIT: u64 = 16 << 20;

/// What a file of the bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Role {
    /// One layer of a disk's chain.
    Disk,
    /// The memory file (qsnap header + QEMU's stream, or device state for a lazy snapshot).
    Memory,
    /// A lazy snapshot's RAM image.
    Ram,
    /// A file the command line reads at start (`-kernel`, `-initrd`, `-dtb`).
    Boot,
}

/// One file carried by the bundle (its bytes are the entry of the same name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct BundleFile {
    /// The entry's name (`disks/0/1.qcow2`, `memory/state.mem`, `boot/vmlinuz`).
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Its size in bytes.
    pub size: u64,
    /// The file's name on the exporting host (a hint for naming it on the importing one).
    pub file_name: String,
    /// Set for a delta: the content hash of the base file (held by the receiver, named in
    /// [`BaseRef`]) that the bytes outside the entry's regions come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_of: Option<String>,
}

/// One disk's chain, bottom layer first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct BundleDisk {
    /// The device, as the snapshot's manifest names it.
    pub device: String,
    /// The layers the bundle carries (bundle names), bottom first; each one's backing is the
    /// one before it.
    pub layers: Vec<Layer>,
    /// For an incremental bundle: the bottom layer stands on the base snapshot's frozen
    /// image of this disk, which the receiver holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_base: bool,
}

/// One layer of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Layer {
    /// The bundle entry.
    pub name: String,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// The QEMU that took the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct QemuInfo {
    /// Its version.
    pub version: String,
    /// The versioned machine type the snapshot needs (`pc-i440fx-10.0`).
    pub machine: Option<String>,
    /// The binary's file name (`qemu-system-x86_64`); the importer picks its own binary.
    pub binary: String,
}

/// For an incremental bundle: the snapshot the receiver must hold already. A snapshot's
/// content never changes while it exists (merges move data between layer files, never
/// change what a snapshot reads), so the receiver's copy is told by the snapshot's identity —
/// its name, creation time and memory checksum, as its import recorded them — and the files
/// a delta builds on by their content hash (memory files are never rewritten).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct BaseRef {
    /// Its name on the exporting host.
    pub snapshot: String,
    /// When it was taken (its manifest's `created-at`).
    pub created_at: String,
    /// Its memory stream's checksum (its manifest's), if it has memory.
    pub memory_checksum: Option<String>,
    /// The content hashes of the files the bundle's deltas build on.
    pub hashes: Vec<String>,
}

/// The first entry of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct BundleManifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The qsnap that wrote it.
    pub qsnap_version: String,
    /// When (RFC 3339, UTC).
    pub created_at: String,
    /// The VM it was exported from.
    pub vm: String,
    /// The QEMU that took the snapshot.
    pub qemu: QemuInfo,
    /// The VM's command line, `argv[0]` the binary's file name; per-VM paths under
    /// [`VM_TOKEN`], the bundle's files under [`BUNDLE_TOKEN`].
    pub command: Vec<String>,
    /// The snapshot's manifest as the exporting store has it, its paths replaced by bundle
    /// names (memory file, RAM image, each disk's frozen image; overlays left empty).
    pub snapshot: Manifest,
    /// Every disk's chain.
    pub disks: Vec<BundleDisk>,
    /// Every file the bundle carries, in the order of the entries.
    pub files: Vec<BundleFile>,
    /// Set for an incremental bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
}

/// One file's content hash and size, in the seal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Sealed {
    /// `blake3:<hex>` of the file's content (see `sparse.rs`).
    pub hash: String,
    /// Its size.
    pub size: u64,
}

/// The last entry of a bundle: what makes every byte before it checkable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct Seal {
    /// [`FORMAT`].
    pub format: String,
    /// `blake3:<hex>` of the manifest entry's bytes.
    pub manifest: String,
    /// Each file's hash, by entry name.
    pub files: BTreeMap<String, Sealed>,
}

impl BundleManifest {
    /// Refuses a manifest this build cannot read or whose names could reach outside the
    /// bundle: a wrong format or version, entry names that are not `dir/file` of plain
    /// parts, a file listed twice, a disk layer or memory path that is not one of its files.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "it is not a qsnap bundle (format {:?})",
                self.format
            ));
        }
        if self.version != VERSION {
            return Err(format!(
                "it is bundle format version {}, and this qsnap reads version {VERSION}; use a qsnap of the same generation as the exporter's ({})",
                self.version, self.qsnap_version
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.files {
            if !plain_name(&f.name) {
                return Err(format!("it names a file {:?}", f.name));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(format!("it lists the file {} twice", f.name));
            }
        }
        if self.files.len() > 4096 {
            return Err(format!("it lists {} files", self.files.len()));
        }
        if self
            .files
            .iter()
            .try_fold(0u64, |a, f| a.checked_add(f.size))
            .is_none()
        {
            return Err("its files' sizes add up to more than a u64".into());
        }
        let role = |n: &str| self.files.iter().find(|f| f.name == n).map(|f| f.role);
        let known = |n: &str| role(n).is_some();
        let frozen = &self.snapshot.snapshot.disks;
        if frozen.len() != self.disks.len()
            || frozen
                .iter()
                .zip(&self.disks)
                .any(|(f, d)| f.device != d.device)
        {
            return Err("its snapshot's disks and its disk chains do not match".into());
        }
        let layers: Vec<&str> = self
            .disks
            .iter()
            .flat_map(|d| d.layers.iter().map(|l| l.name.as_str()))
            .collect();
        for f in &self.files {
            let uses = layers.iter().filter(|n| **n == f.name).count();
            if (f.role == Role::Disk) != (uses == 1) {
                return Err(format!("its file {} is not exactly one disk layer", f.name));
            }
        }
        for d in &self.disks {
            if d.layers.is_empty() {
                return Err(format!("disk {} has no layer", d.device));
            }
            for (k, l) in d.layers.iter().enumerate() {
                if !known(&l.name) {
                    return Err(format!("disk {} names a layer it does not carry", d.device));
                }
                if l.format == "raw" && (k > 0 || d.on_base) {
                    return Err(format!(
                        "disk {} has a raw layer over another (only a bottom image can be raw)",
                        d.device
                    ));
                }
                if !matches!(l.format.as_str(), "qcow2" | "raw") {
                    return Err(format!(
                        "disk {} has a layer in format {:?} (qsnap carries qcow2 and raw)",
                        d.device, l.format
                    ));
                }
            }
        }
        if let Some(mem) = &self.snapshot.snapshot.memory {
            if role(&mem.file.to_string_lossy()) != Some(Role::Memory) {
                return Err("its memory file is not one it carries".into());
            }
            if let Some(l) = &mem.lazy {
                if role(&l.image.to_string_lossy()) != Some(Role::Ram) {
                    return Err("its RAM image is not one it carries".into());
                }
            }
        }
        if self.command.is_empty() {
            return Err("it has no command line".into());
        }
        Ok(())
    }
}

/// `dir/file` (or deeper), each part plain: no `.`/`..`, no empty part, no leading `/`,
/// printable ASCII without spaces.
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+/".contains(&b))
}

/// A file name made safe for the importing host: its last part, ASCII letters, digits and
/// `._-+` only, never `.`/`..`/empty (`fallback` then).
pub(crate) fn safe_file_name(name: &str, fallback: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or_default();
    let s: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') || s.len() > 120 {
        fallback.to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_bundle_are_not_plain() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/./b",
            "a b",
            "a\\b",
        ] {
            assert!(!plain_name(bad), "{bad:?}");
        }
        for good in ["disks/0/1.qcow2", "memory/state.mem", "boot/vmlinuz-6.1"] {
            assert!(plain_name(good), "{good}");
        }
        assert_eq!(safe_file_name("../..", "x"), "x");
        assert_eq!(safe_file_name("a/b c.qcow2", "x"), "b_c.qcow2");
        assert_eq!(safe_file_name("", "x"), "x");
    }
}
