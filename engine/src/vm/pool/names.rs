//! Standbys by name and what they are made from: the name prefix of a pool's standbys (one
//! directory listing finds them), fresh names, and the fingerprint a standby must still match
//! to be handed out.

use super::super::Vm;
use crate::error::Result;
use crate::name::{SnapshotName, VmName};
use crate::store::{self, Fingerprint, Manifest, VmRecord};

/// How every standby's name starts.
pub(super) const STANDBY_PREFIX: &str = "sb-";

/// The name prefix of the standbys of `snap` of `vm`: `sb-` and a hash of both, so that a
/// pool finds its standbys with one directory listing.
pub(super) fn prefix(vm: &VmName, snap: &SnapshotName) -> String {
    format!(
        "{STANDBY_PREFIX}{}-",
        crate::snapshot::disks::short_hash(&format!("{vm}/{snap}"))
    )
}

/// A fresh standby name for the pool of `snap` of `vm`.
pub(super) fn fresh_name(vm: &VmName, snap: &SnapshotName) -> Result<VmName> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    VmName::new(&format!(
        "{}{}",
        prefix(vm, snap),
        crate::snapshot::disks::short_hash(&seed)
    ))
}

/// What a standby of `manifest` of the VM recorded in `source` is made from now.
pub(super) async fn fingerprint(source: &VmRecord, manifest: &Manifest) -> Result<Fingerprint> {
    let command = source.command.as_ref();
    let text = serde_json::to_string(&command).unwrap_or_default();
    let binary = command.and_then(|c| c.argv.first().cloned());
    let cwd = command.map(|c| c.cwd.clone());
    let qemu = store::blocking(move || {
        Ok(binary
            .and_then(|b| resolve(&b, cwd.as_deref()))
            .and_then(|p| identity(&p))
            .unwrap_or_else(|| "unknown".into()))
    })
    .await?;
    Ok(Fingerprint {
        snapshot_taken_at: manifest.created_at.clone(),
        command: crate::snapshot::disks::short_hash(&text),
        qemu,
    })
}

/// The QEMU binary a command line starts: a path as given (relative to `cwd`), or a bare
/// name found on `PATH`.
fn resolve(binary: &str, cwd: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(binary);
    if binary.contains('/') {
        return Some(match cwd {
            Some(c) if p.is_relative() => c.join(p),
            _ => p.to_owned(),
        });
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(binary))
        .find(|c| c.is_file())
}

/// A file's identity: device, inode, size and modification time (a replaced binary differs).
fn identity(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

impl Vm {
    /// Every standby of this VM, of any snapshot (by its record), with what it is for.
    pub(super) async fn my_standbys(&self) -> Result<Vec<(VmName, store::StandbyOf)>> {
        let mut out = Vec::new();
        for name in self.store().vms().await? {
            if !name.as_str().starts_with(STANDBY_PREFIX) {
                continue;
            }
            let Ok(rec) = self.store().record(&name).await else {
                continue;
            };
            if let Some(of) = rec.standby.filter(|s| s.vm == self.name().as_str()) {
                out.push((name, of));
            }
        }
        Ok(out)
    }

    /// The standbys of the pool of `snap` in the store (by name; their records say whether
    /// each still is one), sorted.
    pub(super) async fn standbys(&self, snap: &SnapshotName) -> Result<Vec<VmName>> {
        let prefix = prefix(self.name(), snap);
        Ok(self
            .store()
            .vms()
            .await?
            .into_iter()
            .filter(|n| n.as_str().starts_with(&prefix))
            .collect())
    }
}
