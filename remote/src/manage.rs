//! `qsnap remote list | rm | gc`: what a remote holds, forgetting a snapshot, and removing
//! the chunks no snapshot uses.
//!
//! # Why `gc` never removes a chunk a push needs
//! A push puts its chunks first and its manifest last. A chunk it finds already in the
//! store it relies on only if that chunk is younger than the push's refresh age (one hour);
//! an older one it puts again, making it young. `gc` reads every manifest *first*, then
//! lists the chunks, and removes a chunk only if no manifest it read names it *and* it is
//! older than the grace period — looking at it once more just before removing it, and
//! leaving it if its time or tag changed since the listing (a push put it again). So a
//! chunk a push in progress relies on is younger than `refresh + the push's duration`; with
//! a grace period longer than that (the default, 24 hours, is), `gc` leaves it. What is
//! left is one round trip between that last look and the removal: a push that puts the
//! chunk again inside it loses it — and finds that out, because after writing its manifest
//! a push looks for every chunk the manifest names and puts back any that is gone. A gc
//! that starts after the manifest reads it, and keeps its chunks. `gc` stops, removing
//! nothing, when any object under `snapshots/` cannot be read as a manifest: it cannot know
//! what that one needs. (Times are the store's: a push and a gc compare the store's
//! `last-modified` with their own clocks, so a clock skew eats into the grace period.)
//!
//! Never removes a manifest (only `rm` does, one, by name); never removes a chunk that a
//! manifest it read names.

use crate::error::{RemoteError, Result};
use crate::format::{RemoteManifest, RemoteName};
use crate::location::Remote;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use serde::Serialize;
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

/// One snapshot a remote holds.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
    /// With an incremental view (`push --base`): the snapshot it builds on.
    pub incremental_on: Option<String>,
    /// Why its manifest cannot be read (a pull and gc refuse it), if it cannot.
    pub problem: Option<String>,
}

/// What `gc` did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
        for name in self.names(false).await? {
            let m = match self.manifest(&name).await {
                Ok(m) => m,
                // One bad manifest does not hide the others: it is listed with its problem.
                Err(RemoteError::Corrupt { why, .. }) => {
                    out.push(RemoteEntry {
                        name: name.to_string(),
                        pushed_at: String::new(),
                        size_bytes: 0,
                        chunks: 0,
                        chunk_bytes: 0,
                        signed: false,
                        incremental_on: None,
                        problem: Some(why),
                    });
                    continue;
                }
                // Removed between the listing and now: not there any more.
                Err(RemoteError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let (chunks, chunk_bytes) = m.distinct();
            out.push(RemoteEntry {
                name: name.to_string(),
                pushed_at: m.pushed_at.clone(),
                size_bytes: m.whole.files.iter().map(|f| f.size).sum(),
                chunks,
                chunk_bytes,
                signed: m.whole.signature.is_some(),
                incremental_on: m.incremental.as_ref().map(|i| i.base.clone()),
                problem: None,
            });
        }
        Ok(out)
    }

    /// The names of the manifests under `snapshots/`; `strict`: an object there that is not
    /// one is an error (gc), else skipped (list).
    async fn names(&self, strict: bool) -> Result<Vec<RemoteName>> {
        let metas: Vec<_> = self
            .store
            .list(Some(&self.manifests_prefix()))
            .try_collect()
            .await
            .map_err(self.err("listing snapshots"))?;
        let mut names = Vec::new();
        for m in &metas {
            match self.name_of(&m.location) {
                Some(n) => names.push(n),
                None if strict => {
                    return Err(RemoteError::Corrupt {
                        url: self.url().to_owned(),
                        why: format!(
                            "{} is not a snapshot manifest qsnap can name; gc removed nothing (move it away, or remove it, first)",
                            m.location
                        ),
                    })
                }
                None => tracing::warn!(key = %m.location, "not a snapshot manifest; skipped"),
            }
        }
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
        let names = self.names(true).await?;
        let mut used: HashSet<String> = HashSet::new();
        for name in &names {
            let m: RemoteManifest = self.manifest(name).await.map_err(|e| match e {
                RemoteError::Corrupt { url, why } => RemoteError::Corrupt {
                    url,
                    why: format!("gc removed nothing: {why}"),
                },
                other => other,
            })?;
            used.extend(m.chunks().map(|c| c.hash.clone()));
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
            doomed.push(meta);
        }
        let removals = futures::stream::iter(doomed)
            .map(|listed| async move {
                // One more look: a push that put it again since the listing keeps it.
                match self.store.head(&listed.location).await {
                    Ok(now)
                        if now.last_modified == listed.last_modified
                            && now.e_tag == listed.e_tag => {}
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(self.err(format!("looking at {}", listed.location))(e)),
                }
                match self.store.delete(&listed.location).await {
                    Ok(()) => Ok(Some(listed.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.err(format!("removing {}", listed.location))(e)),
                }
            })
            .buffer_unordered(8);
        futures::pin_mut!(removals);
        while let Some(r) = removals.next().await {
            match r? {
                Some(bytes) => {
                    report.removed += 1;
                    report.removed_bytes += bytes;
                }
                None => report.kept_young += 1,
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{ChunkRef, RemoteFile, View, FORMAT, VERSION};
    use object_store::{path::Path as Key, PutPayload};

    fn manifest(name: &str, chunks: &[&str]) -> Vec<u8> {
        let m = RemoteManifest {
            format: FORMAT.into(),
            version: VERSION,
            name: name.into(),
            pushed_at: "2026-12-05T00:00:00Z".into(),
            qsnap_version: "0".into(),
            whole: View {
                bundle: "{}".into(),
                seal: "{}".into(),
                signature: None,
                files: vec![RemoteFile {
                    name: "memory/state.mem".into(),
                    size: 1 << 30,
                    chunks: chunks
                        .iter()
                        .enumerate()
                        .map(|(i, h)| ChunkRef {
                            offset: i as u64 * 4096,
                            len: 4096,
                            hash: (*h).into(),
                        })
                        .collect(),
                }],
            },
            incremental: None,
        };
        serde_json::to_vec(&m).unwrap()
    }

    #[tokio::test]
    async fn gc_removes_only_unused_chunks_and_nothing_when_a_manifest_is_unreadable() {
        let r = Remote::in_memory();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for h in [&a, &b] {
            r.store
                .put(&r.chunk_key(h), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        let name = RemoteName::parse("vm/s1").unwrap();
        r.store
            .put(&r.manifest_key(&name), manifest("vm/s1", &[&a]).into())
            .await
            .unwrap();
        // Young: kept.
        let g = r.gc(Duration::from_secs(3600)).await.unwrap();
        assert_eq!((g.removed, g.kept_young, g.referenced), (0, 1, 1));
        // Something under snapshots/ that is no manifest: gc stops, removing nothing.
        let junk = Key::from("p/snapshots/vm/notes.txt");
        r.store
            .put(&junk, PutPayload::from_static(b"hi"))
            .await
            .unwrap();
        let e = r.gc(Duration::ZERO).await.unwrap_err();
        assert!(e.to_string().contains("gc removed nothing"), "{e}");
        r.store.delete(&junk).await.unwrap();
        // A manifest cut short: the same.
        let cut = RemoteName::parse("vm/s2").unwrap();
        let body = manifest("vm/s2", &[&b]);
        r.store
            .put(
                &r.manifest_key(&cut),
                body[..body.len() / 2].to_vec().into(),
            )
            .await
            .unwrap();
        let e = r.gc(Duration::ZERO).await.unwrap_err();
        assert!(e.to_string().contains("gc removed nothing"), "{e}");
        let listed = r.list().await.unwrap();
        assert_eq!(listed.len(), 2, "list shows the good one and the bad one");
        assert!(listed[1]
            .problem
            .as_deref()
            .unwrap()
            .contains("not readable"));
        assert!(listed[0].problem.is_none());
        r.store.delete(&r.manifest_key(&cut)).await.unwrap();
        // Grace 0: exactly the unused chunk goes.
        let g = r.gc(Duration::ZERO).await.unwrap();
        assert_eq!((g.removed, g.referenced, g.snapshots), (1, 1, 1));
        assert!(r.store.head(&r.chunk_key(&a)).await.is_ok());
        assert!(r.store.head(&r.chunk_key(&b)).await.is_err());
        // rm forgets the manifest; then its chunk goes too.
        r.remove(&name).await.unwrap();
        assert!(matches!(
            r.remove(&name).await,
            Err(RemoteError::NotFound { .. })
        ));
        assert_eq!(r.gc(Duration::ZERO).await.unwrap().removed, 1);
    }

    #[test]
    fn chunk_lists_that_are_no_file_are_refused() {
        let good: RemoteManifest =
            serde_json::from_slice(&manifest("vm/s1", &[&"a".repeat(64), &"b".repeat(64)]))
                .unwrap();
        assert!(good.check().is_ok());
        let with = |f: &dyn Fn(&mut Vec<ChunkRef>)| {
            let mut m = good.clone();
            f(&mut m.whole.files[0].chunks);
            m.check()
        };
        assert!(with(&|c| c.reverse()).is_err(), "out of order");
        assert!(with(&|c| c[1].offset = 100).is_err(), "overlapping");
        assert!(with(&|c| c[0].len = 0).is_err(), "empty");
        assert!(with(&|c| c[1].len = (8 << 20) + 1).is_err(), "too long");
        assert!(
            with(&|c| c[1].offset = (1 << 30) - 10).is_err(),
            "past the size"
        );
        assert!(
            with(&|c| c[0].hash = "A".repeat(64)).is_err(),
            "not lower hex"
        );
        assert!(with(&|c| c[0].hash = "../x".into()).is_err(), "not a hash");
        let mut m = good.clone();
        m.version = 2;
        assert!(m.check().unwrap_err().contains("version 2"));
        // Keys name what they should.
        let r = Remote::in_memory();
        let n = RemoteName::parse("vm/s1").unwrap();
        assert_eq!(r.name_of(&r.manifest_key(&n)), Some(n));
        let h = "c".repeat(64);
        assert_eq!(r.hash_of(&r.chunk_key(&h)), Some(h));
        assert_eq!(r.hash_of(&Key::from("p/chunks/cc/short")), None);
        assert!(RemoteName::parse("a/../b").is_err());
        assert!(RemoteName::parse("vm").is_err());
    }
}
