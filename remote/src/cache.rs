//! The local chunk cache, `<store>/chunk-cache/<h[0..2]>/<h>`: chunks as the remote stores
//! them (compressed), kept after a pull so that the next pull of a related snapshot fetches
//! only new chunks, and so that an interrupted pull resumes. Chunks of guest memory are
//! secrets: files 0600, directories 0700. A cached chunk is checked like a fetched one
//! whenever it is used; a damaged one is removed and fetched again.

use crate::error::{RemoteError, Result};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The cache of a store.
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub(crate) fn of_store(root: &Path) -> Cache {
        Cache {
            dir: root.join("chunk-cache"),
        }
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(&hash[..2]).join(hash)
    }

    /// Removes what killed pulls left: files being written (`*.part*`) older than an hour.
    pub(crate) async fn sweep(&self) {
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let hour = std::time::Duration::from_secs(3600);
            for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                for f in std::fs::read_dir(sub.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let old = f
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > hour);
                    if old {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        })
        .await;
    }

    /// The stored bytes of a chunk, if cached.
    pub(crate) async fn get(&self, hash: &str) -> Option<Vec<u8>> {
        tokio::fs::read(self.path(hash)).await.ok()
    }

    /// Forgets a chunk found damaged.
    pub(crate) async fn drop_bad(&self, hash: &str) {
        let _ = tokio::fs::remove_file(self.path(hash)).await;
    }

    /// Keeps a chunk's stored bytes (already checked): written aside, then renamed in, so
    /// that a cached file is always whole.
    pub(crate) async fn put(&self, hash: &str, stored: &[u8]) -> Result<()> {
        let path = self.path(hash);
        let stored = stored.to_vec();
        // Unique per writer: two fetches of one chunk (it appears twice in a snapshot) may
        // both get here; each renames a whole file of the same bytes into place.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("part{}.{n}", std::process::id()));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let parent = path.parent().expect("two levels");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&stored)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .expect("cache write does not panic")
        .map_err(|source| RemoteError::Io {
            what: "keeping a chunk in the cache",
            path: self.dir.clone(),
            source,
        })
    }
}
