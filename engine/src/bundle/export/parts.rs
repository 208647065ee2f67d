//! A snapshot for a road other than a bundle (an object store's chunks: `qsnap push`): the
//! bundle manifest, the files to ship and, once the caller has hashed them, the seal — the same
//! decisions and checks as `export`, under the same shared lock. Reads only; never writes a
//! byte of a snapshot.

use super::{ExportOptions, Prepared, Vm};
use crate::bundle::format::{Seal, Sealed, FORMAT};
use crate::error::{Error, Result};
use crate::name::SnapshotName;
use crate::store::VmLock;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A snapshot ready to leave the host by another road than a bundle (an object store's
/// chunks): the bundle manifest, the files to ship, and the seal to close them with. Holds
/// the snapshot's shared lock (a delete or revert waits) until dropped.
pub struct ExportParts {
    _lock: VmLock,
    /// The bundle manifest's exact bytes (the seal names their hash).
    pub manifest: Vec<u8>,
    /// Every file, in bundle order.
    pub files: Vec<ExportPart>,
    /// What the user should know.
    pub notes: Vec<String>,
    sign: Option<(minisign::SecretKey, String)>,
}

/// One file of [`ExportParts`].
#[derive(Debug, Clone)]
pub struct ExportPart {
    /// Its name in the bundle.
    pub name: String,
    /// Where it is on this host (read it; never write it).
    pub path: PathBuf,
    /// Its size when planned (the seal refuses another).
    pub size: u64,
    /// A delta: the base snapshot's file it is shipped against (the receiver has it), whose
    /// bytes stand wherever the shipped blocks do not. The seal holds the whole file's hash.
    pub delta_base: Option<PathBuf>,
}

/// The seal of [`ExportParts`] (and its signature, when one was asked for).
#[derive(Debug, Clone)]
pub struct SealedParts {
    /// The seal entry's exact bytes.
    pub seal: Vec<u8>,
    /// The signature entry's bytes (minisign), if signed.
    pub signature: Option<Vec<u8>>,
}

impl std::fmt::Debug for ExportParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportParts")
            .field("files", &self.files)
            .field("notes", &self.notes)
            .finish_non_exhaustive()
    }
}

impl ExportParts {
    /// Closes the parts with a seal over the manifest and every file's content hash (as read
    /// by whoever shipped them: [`ContentHasher`](crate::bundle::ContentHasher)), signed when asked.
    /// Refuses a digest missing, or of a file whose size changed since it was planned.
    pub fn seal(&self, digests: &BTreeMap<String, (String, u64)>) -> Result<SealedParts> {
        let mut seal = Seal {
            format: FORMAT.into(),
            manifest: crate::bundle::hash_bytes(&self.manifest),
            files: BTreeMap::new(),
        };
        for f in &self.files {
            let Some((hash, size)) = digests.get(&f.name) else {
                return Err(Error::Io {
                    what: "sealing an export (a file was not shipped)",
                    path: f.path.clone(),
                    source: std::io::Error::other("no digest"),
                });
            };
            if *size != f.size {
                return Err(Error::Io {
                    what: "exporting (the file changed size while it was read)",
                    path: f.path.clone(),
                    source: std::io::Error::other("size changed"),
                });
            }
            seal.files.insert(
                f.name.clone(),
                Sealed {
                    hash: hash.clone(),
                    size: *size,
                },
            );
        }
        let seal = serde_json::to_vec_pretty(&seal).expect("serializable");
        let signature = match &self.sign {
            Some((key, what)) => Some(crate::bundle::sign::sign(key, &seal, what)?),
            None => None,
        };
        Ok(SealedParts { seal, signature })
    }
}

impl Vm {
    /// Snapshot `snap` as [`ExportParts`], the VM untouched: a whole snapshot, or with
    /// `opts.base` the incremental one (`export --base`'s manifest; a part with a
    /// [`ExportPart::delta_base`] ships only the blocks that differ from that file).
    pub async fn export_parts(
        &self,
        snap: &SnapshotName,
        opts: &ExportOptions,
    ) -> Result<ExportParts> {
        let Prepared { lock, job, notes } = self.prepare_export(snap, opts).await?;
        Ok(ExportParts {
            _lock: lock,
            manifest: job.manifest,
            files: job
                .planned
                .into_iter()
                .map(|p| ExportPart {
                    name: p.file.name,
                    path: p.path,
                    size: p.file.size,
                    delta_base: p.base,
                })
                .collect(),
            notes,
            sign: job.sign,
        })
    }
}
