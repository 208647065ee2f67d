//! `qsnap remote list | rm | gc`: what a remote holds, forgetting a snapshot, and removing
//! the chunks no snapshot uses.
//!
//! # Why `gc` never removes a chunk a push needs
//! A push puts its chunks first and its manifest last. A chunk it finds already in the
//! store it relies on only if that chunk is younger than the push's refresh age (one hour);
//! an older one it puts again, making it young. `gc` reads every manifest *first*, then
//! lists the chunks, and removes a chunk only if no manifest it read names it *and* it is
//! older than the grace period. So a chunk a push in progress relies on is younger than
//! `refresh + the push's duration`; with a grace period longer than that (the default, 24
//! hours, is), `gc` leaves it. A manifest written after `gc` read the manifests names only
//! chunks that are young for the same reason. `gc` stops, removing nothing, when any
//! manifest cannot be read: it cannot know what that one needs.

use crate::error::{RemoteError, Result};
use crate::format::{RemoteManifest, RemoteName};
use crate::location::Remote;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use serde::Serialize;
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

/// One snapshot a remote holds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteEntry {
    /// `VM/SNAPSHOT`.
    pub name: String,
    /// When its push finished.
    pub pushed_at: String,
    /// Bytes of its files (apparent sizes).
    pub size_bytes: u64,
    /// Its distinct chunks.
    pub chunks: usize,
    /// Plain bytes of its distinct chunks (what its data needs).
    pub chunk_bytes: u64,
    /// Whether its seal is signed.
    pub signed: bool,
}

/// What `gc` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    /// The remote.
    pub url: String,
    /// Snapshots (manifests) read.
    pub snapshots: usize,
    /// Chunks found.
    pub chunks: usize,
    /// Chunks some snapshot uses.
    pub referenced: usize,
    /// Unused chunks kept because they are younger than the grace period.
    pub kept_young: usize,
    /// Chunks removed.
    pub removed: usize,
    /// Bytes removed (as stored).
    pub removed_bytes: u64,
}

impl Remote {
    /// Every snapshot the remote holds, by name.
    pub async fn list(&self) -> Result<Vec<RemoteEntry>> {
        let mut out = Vec::new();
        for name in self.names().await? {
            let m = self.manifest(&name).await?;
            let (chunks, chunk_bytes) = m.distinct();
            out.push(RemoteEntry {
                name: name.to_string(),
                pushed_at: m.pushed_at.clone(),
                size_bytes: m.files.iter().map(|f| f.size).sum(),
                chunks,
                chunk_bytes,
                signed: m.signature.is_some(),
            });
        }
        Ok(out)
    }

    /// The names of the manifests under `snapshots/`.
    async fn names(&self) -> Result<Vec<RemoteName>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.manifests_prefix()))
            .try_collect()
            .await
            .map_err(self.err("listing snapshots"))?;
        let mut names: Vec<RemoteName> = metas
            .iter()
            .filter_map(|m| self.name_of(&m.location))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Forgets snapshot `name` (its manifest); its chunks go at the next `gc` unless another
    /// snapshot uses them.
    pub async fn remove(&self, name: &RemoteName) -> Result<()> {
        let key = self.manifest_key(name);
        match self.store.head(&key).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::NotFound {
                    url: self.url().to_owned(),
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(self.err(format!("looking for {name}"))(e)),
        }
        self.store
            .delete(&key)
            .await
            .map_err(self.err(format!("removing {name}")))
    }

    /// Removes the chunks no snapshot uses that are older than `grace` (see the module doc).
    pub async fn gc(&self, grace: Duration) -> Result<GcReport> {
        let names = self.names().await?;
        let mut used: HashSet<String> = HashSet::new();
        for name in &names {
            let m: RemoteManifest =
                self.manifest(name)
                    .await
                    .map_err(|e| RemoteError::Corrupt {
                        url: self.url().to_owned(),
                        why: format!("gc removed nothing: {e}"),
                    })?;
            used.extend(m.files.into_iter().flat_map(|f| f.chunks).map(|c| c.hash));
        }
        let metas: Vec<_> = self
            .store
            .list(Some(&self.chunks_prefix()))
            .try_collect()
            .await
            .map_err(self.err("listing chunks"))?;
        let mut report = GcReport {
            url: self.url().to_owned(),
            snapshots: names.len(),
            chunks: 0,
            referenced: 0,
            kept_young: 0,
            removed: 0,
            removed_bytes: 0,
        };
        let mut doomed = Vec::new();
        for meta in metas {
            let Some(hash) = self.hash_of(&meta.location) else {
                continue;
            };
            report.chunks += 1;
            if used.contains(&hash) {
                report.referenced += 1;
                continue;
            }
            let age = SystemTime::now()
                .duration_since(SystemTime::from(meta.last_modified))
                .unwrap_or_default();
            if age < grace {
                report.kept_young += 1;
                continue;
            }
            report.removed_bytes += meta.size;
            doomed.push(meta.location);
        }
        report.removed = doomed.len();
        let removals = futures::stream::iter(doomed)
            .map(|key| async move {
                match self.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.err(format!("removing {key}"))(e)),
                }
            })
            .buffer_unordered(8);
        futures::pin_mut!(removals);
        while let Some(r) = removals.next().await {
            r?;
        }
        Ok(report)
    }
}
