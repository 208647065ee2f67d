//! What a remote holds, as a format other tools may read (docs/remotes.md says the same):
//!
//! - `chunks/<h[0..2]>/<h>` — one chunk: a run of a file's bytes, zstd-compressed; `h` is
//!   the BLAKE3 (hex) of the plain bytes. Immutable: same name, same bytes.
//! - `snapshots/<vm>/<snapshot>.json` — one [`RemoteManifest`] per snapshot, written last,
//!   with a conditional put: it exists only once every chunk it names does.
//!
//! Nothing read from a remote is trusted: a chunk's bytes are hashed before they are used, a
//! manifest's bundle manifest and seal go through `import`'s checks.

use crate::error::{RemoteError, Result};
use qsnap_engine::{SnapshotName, VmName};
use serde::{Deserialize, Serialize};

/// `format` of a remote manifest.
pub const FORMAT: &str = "qsnap-remote";
/// The remote manifest version this build writes and reads.
pub const VERSION: u32 = 1;
/// A manifest larger than this is not one (a million chunks is 100 MiB of JSON; 64 GiB of
/// data in 2 MiB chunks is 32 768).
pub(crate) const MANIFEST_LIMIT: u64 = 64 << 20;
/// A chunk's plain size is at most this (FastCDC's maximum, below).
pub(crate) const CHUNK_MAX: u32 = 8 << 20;
/// FastCDC's minimum and average chunk sizes.
pub(crate) const CHUNK_MIN: u32 = 512 << 10;
pub(crate) const CHUNK_AVG: u32 = 2 << 20;

/// A remote snapshot's name: `VM/SNAPSHOT`, each part a valid qsnap name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteName {
    /// The VM part.
    pub vm: VmName,
    /// The snapshot part.
    pub snapshot: SnapshotName,
}

impl RemoteName {
    /// Parses `VM/SNAPSHOT`.
    pub fn parse(s: &str) -> Result<RemoteName> {
        let bad = |why: String| RemoteError::BadName {
            name: s.to_owned(),
            why,
        };
        let (vm, snap) = s
            .split_once('/')
            .ok_or_else(|| bad("it is VM/SNAPSHOT".into()))?;
        Ok(RemoteName {
            vm: VmName::new(vm).map_err(|e| bad(e.to_string()))?,
            snapshot: SnapshotName::new(snap).map_err(|e| bad(e.to_string()))?,
        })
    }
}

impl std::fmt::Display for RemoteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.vm, self.snapshot)
    }
}

/// One remote snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RemoteManifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// `VM/SNAPSHOT`.
    pub name: String,
    /// When the push finished (RFC 3339).
    pub pushed_at: String,
    /// The pushing qsnap's version.
    pub qsnap_version: String,
    /// The whole snapshot: what a pull into a new VM imports.
    pub whole: View,
    /// With `push --base`: the same snapshot as an incremental bundle on that base, for a
    /// pull into the VM that holds the base (its chunks are mostly the whole view's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<Incremental>,
}

/// The snapshot as one bundle: its manifest, its seal, and its files as chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct View {
    /// The bundle manifest's exact text (its hash is in the seal).
    pub bundle: String,
    /// The seal's exact text: the bundle manifest's hash, each file's content hash and size.
    pub seal: String,
    /// A minisign signature of the seal, when the push was signed.
    pub signature: Option<String>,
    /// Every file of the bundle, in bundle order.
    pub files: Vec<RemoteFile>,
}

/// The incremental view and the snapshot it builds on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Incremental {
    /// The base snapshot's name on the pushing VM.
    pub base: String,
    /// The incremental bundle (a delta file's chunks cover only the blocks that differ from
    /// the base's file; everything else is the base's).
    pub view: View,
}

/// One file: its size and the chunks holding its data (what no chunk covers is zeros in the
/// whole view, the base's bytes for a delta in the incremental view).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RemoteFile {
    /// Its name in the bundle.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its chunks, by increasing offset, apart.
    pub chunks: Vec<ChunkRef>,
}

/// Where a chunk goes in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ChunkRef {
    /// Offset in the file.
    pub offset: u64,
    /// Plain length.
    pub len: u32,
    /// BLAKE3 of the plain bytes, hex.
    pub hash: String,
}

impl RemoteManifest {
    /// Refuses a manifest this build cannot read or whose chunk lists cannot be a file:
    /// another format or version, chunks out of order, overlapping, past the size, of a
    /// length over the maximum chunk size (8 MiB), or named by something that is not a BLAKE3 hash.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "it is not a qsnap remote manifest ({:?})",
                self.format
            ));
        }
        if self.version != VERSION {
            return Err(format!(
                "it is remote format version {}, and this qsnap reads version {VERSION}",
                self.version
            ));
        }
        if let Some(i) = &self.incremental {
            SnapshotName::new(&i.base)
                .map_err(|e| format!("its incremental view's base {:?}: {e}", i.base))?;
        }
        let views = std::iter::once(&self.whole).chain(self.incremental.as_ref().map(|i| &i.view));
        for f in views.flat_map(|v| &v.files) {
            let mut end = 0u64;
            for c in &f.chunks {
                let stop = c.offset.checked_add(u64::from(c.len));
                if c.offset < end
                    || stop.is_none_or(|s| s > f.size)
                    || c.len == 0
                    || c.len > CHUNK_MAX
                {
                    return Err(format!("file {}'s chunk list is not a file", f.name));
                }
                if c.hash.len() != 64
                    || !c
                        .hash
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(format!("file {} names a chunk {:?}", f.name, c.hash));
                }
                end = stop.unwrap_or(u64::MAX);
            }
        }
        Ok(())
    }

    /// Every chunk reference of both views.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        std::iter::once(&self.whole)
            .chain(self.incremental.as_ref().map(|i| &i.view))
            .flat_map(|v| &v.files)
            .flat_map(|f| &f.chunks)
    }

    /// Distinct chunks of both views: (chunks, plain bytes).
    pub fn distinct(&self) -> (usize, u64) {
        let mut seen = std::collections::BTreeMap::new();
        for c in self.chunks() {
            seen.insert(c.hash.as_str(), u64::from(c.len));
        }
        (seen.len(), seen.values().sum())
    }
}
