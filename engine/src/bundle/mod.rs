//! Snapshots that leave the host: `export` writes one snapshot as a bundle — a tar archive,
//! zstd-compressed, that `tar --zstd -tvf` lists — and `import` makes a VM (or a snapshot of
//! one) from a bundle on another host, trusting nothing in it until every byte is checked.
//!
//! - `format.rs` — what a bundle says about itself: the manifest (first entry: versions,
//!   portable command line, the snapshot's manifest, each disk's chain, every file) and the
//!   seal (last entry: the manifest's hash, each file's content hash).
//! - `container.rs` — the tar + zstd stream, sparse entries (holes and zero blocks are never
//!   shipped), deltas against a base file; `sparse.rs` — holes, and the content hash (BLAKE3
//!   over the data, whatever the holes).
//! - `export.rs` — a snapshot → a bundle (reads only).
//! - `import.rs` — a bundle → staging → checks → commit (the entry, the stream read into
//!   staging, the seal's check); `import/plan.rs` — what the manifest decides before anything
//!   is written; `import/commit.rs` — after the seal: rebase, checks, renames into place,
//!   manifest, record. `staging.rs` — the staging area and the removal of one an interrupted
//!   import left.
//! - `sign.rs` — minisign keys and the signature over the seal.
//!
//! Never trusts a bundle: names are checked before use, sizes are never allocated from,
//! the command line passes `launch/untrusted.rs` unless the user trusts its author, QEMU
//! never sees a byte before its hash matched.

pub(crate) mod container;
mod export;
pub(crate) mod format;
mod import;
mod sign;
pub(crate) mod sparse;
mod staging;

pub use container::{delta_regions, DataSink, Delta, TarStream};
pub use export::{
    BundleProgressFn, ExportOptions, ExportPart, ExportParts, ExportReport, ExportedFile,
    SealedParts,
};
pub use format::{MANIFEST as MANIFEST_ENTRY, SEAL as SEAL_ENTRY};
pub use import::{ImportOptions, ImportReport};
pub use sign::keygen;
pub use sign::SIGNATURE as SIGNATURE_ENTRY;
pub use sparse::{data_spans, ContentHasher};

use crate::error::Result;
use crate::store;
use std::path::Path;

/// `blake3:<hex>` of some bytes (the manifest and seal entries).
pub(crate) fn hash_bytes(b: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(b).to_hex())
}

/// The content hash of a file (`sparse.rs`), remembered under the file's identity so that an
/// unchanged base image is read once.
pub(crate) async fn hash_cached(path: &Path) -> Result<String> {
    let key = crate::cache::file_key(path, "content-blake3").await;
    if let Some(k) = &key {
        if let Some(h) = crate::cache::lookup::<String>(k).await {
            return Ok(h);
        }
    }
    let p = path.to_owned();
    let digest =
        store::blocking(move || sparse::hash_file(&p).map_err(store::io("hashing a file", &p)))
            .await?;
    if let Some(k) = key {
        crate::cache::remember(k, &digest.hash).await;
    }
    Ok(digest.hash)
}

/// Refuses `seal` unless `signature` (a minisign signature) is by one of the public keys in
/// the files `trust` names: what `import --trust` checks after the data, for a caller that
/// has the seal before the data (a pull checks it before fetching anything).
pub async fn check_signature(
    trust: &[std::path::PathBuf],
    seal: &[u8],
    signature: Option<&[u8]>,
) -> Result<()> {
    let (trust, seal, signature) = (trust.to_vec(), seal.to_vec(), signature.map(<[u8]>::to_vec));
    store::blocking(move || {
        let keys = trust
            .iter()
            .map(|k| sign::read_public(k))
            .collect::<Result<Vec<_>>>()?;
        sign::verify(&keys, &seal, signature.as_deref())
    })
    .await
}
