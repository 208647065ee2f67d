//! `qsnap push`: a snapshot → chunks the store lacks → its manifest, last.
//!
//! ```text
//! name free? (else refuse, having uploaded nothing)
//! → export parts (engine: the snapshot's shared lock, its checks, the portable manifest)
//! → each file cut into chunks (chunk.rs) → each chunk: in the store and young enough?
//!   skip : compress + put (bounded, in parallel)
//! → seal (every file's content hash) → manifest, put only if absent (If-None-Match: *)
//! ```
//! A push killed at any moment leaves chunks and no manifest: nothing lists it, a re-run
//! uploads only what is missing, `gc` removes the rest after its grace period. A chunk
//! found in the store older than [`PushOptions::refresh`] is put again (same bytes), so
//! that its time says it is in use: `gc` deletes only chunks older than its grace. After
//! the manifest, every chunk it names is looked for once more and put again if a `gc` that
//! decided before the manifest existed removed it meanwhile (manage.rs says why that closes
//! the race).
//!
//! Never writes over a manifest; never writes a local file; never writes a chunk under a
//! name that is not the hash of its bytes.

use crate::chunk::{self, Cut};
use crate::error::{RemoteError, Result};
use crate::format::{
    ChunkRef, Incremental, RemoteFile, RemoteManifest, RemoteName, View, FORMAT, MANIFEST_LIMIT,
    VERSION,
};
use crate::location::Remote;
use crate::ProgressFn;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use qsnap_engine::{ExportOptions, SnapshotName, Vm};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// How to push.
#[derive(Clone)]
pub struct PushOptions {
    /// The remote name (default: `VM/SNAPSHOT`).
    pub as_name: Option<RemoteName>,
    /// Sign the seal with this secret key (`qsnap keygen`).
    pub sign: Option<PathBuf>,
    /// Also an incremental view on this earlier snapshot (`export --base`'s bundle), for a
    /// pull into the VM that holds it: its chunks are mostly the whole view's.
    pub base: Option<SnapshotName>,
    /// Chunks in flight at once.
    pub parallel: usize,
    /// A chunk already in the store but older than this is put again (see the module doc).
    pub refresh: Duration,
    /// Progress over the snapshot's bytes read.
    pub progress: Option<ProgressFn>,
    /// Cancelled (Ctrl-C): the push stops before its manifest; a re-run goes on.
    pub cancel: CancellationToken,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            as_name: None,
            sign: None,
            base: None,
            parallel: 8,
            refresh: Duration::from_secs(3600),
            progress: None,
            cancel: CancellationToken::new(),
        }
    }
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("as_name", &self.as_name)
            .field("sign", &self.sign)
            .field("base", &self.base)
            .field("parallel", &self.parallel)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PushReport {
    /// The remote.
    pub url: String,
    /// `VM/SNAPSHOT` there.
    pub name: String,
    /// Files of the snapshot.
    pub files: usize,
    /// Bytes of the files (apparent sizes).
    pub size_bytes: u64,
    /// Chunks of the snapshot (distinct).
    pub chunks: usize,
    /// Chunks uploaded (the store lacked them, or they were refreshed).
    pub uploaded_chunks: usize,
    /// Bytes uploaded (compressed, as stored).
    pub uploaded_bytes: u64,
    /// Chunks the store had already.
    pub deduplicated_chunks: usize,
    /// Plain bytes of the chunks the store had already.
    pub deduplicated_bytes: u64,
    /// Whether the seal is signed.
    pub signed: bool,
    /// What the user should know.
    pub notes: Vec<String>,
    /// Wall time.
    pub total_ms: f64,
}

#[derive(Default)]
struct Tally {
    uploaded_chunks: usize,
    uploaded_bytes: u64,
    deduplicated_chunks: usize,
    deduplicated_bytes: u64,
}

impl Remote {
    /// Pushes snapshot `snap` of `vm` (which may be running; nothing of it changes).
    pub async fn push(
        &self,
        vm: &Vm,
        snap: &SnapshotName,
        opts: &PushOptions,
    ) -> Result<PushReport> {
        let started = Instant::now();
        let name = opts.as_name.clone().unwrap_or_else(|| RemoteName {
            vm: vm.name().clone(),
            snapshot: snap.clone(),
        });
        let key = self.manifest_key(&name);
        match self.store.head(&key).await {
            Ok(_) => return Err(self.exists(&name)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.err(format!("looking for {name}"))(e)),
        }
        let export = |base: Option<SnapshotName>| ExportOptions {
            base,
            sign: opts.sign.clone(),
            ..ExportOptions::default()
        };
        let parts = vm.export_parts(snap, &export(None)).await?;
        let inc_parts = match &opts.base {
            Some(b) => Some(vm.export_parts(snap, &export(Some(b.clone()))).await?),
            None => None,
        };
        let size_bytes: u64 = parts.files.iter().map(|f| f.size).sum();
        let total: u64 = size_bytes
            + inc_parts
                .iter()
                .flat_map(|p| &p.files)
                .filter(|f| f.delta_base.is_some())
                .map(|f| f.size)
                .sum::<u64>();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
        // A file both views ship whole is cut once.
        let mut done_files: BTreeMap<PathBuf, (Vec<ChunkRef>, String, u64)> = BTreeMap::new();
        let mut done = 0u64;
        let mut views = Vec::new();
        for p in std::iter::once(&parts).chain(inc_parts.iter()) {
            let mut files = Vec::new();
            let mut digests = BTreeMap::new();
            for f in &p.files {
                let cut = match (&f.delta_base, done_files.get(&f.path)) {
                    (None, Some(c)) => c.clone(),
                    _ => {
                        let pushed = tokio::select! {
                            () = opts.cancel.cancelled() => return Err(RemoteError::Interrupted),
                            r = self.push_file(&f.path, f.delta_base.as_deref(), opts, (&tally, &seen), (done, total)) => r,
                        };
                        let c = pushed?;
                        done += f.size;
                        if f.delta_base.is_none() {
                            done_files.insert(f.path.clone(), c.clone());
                        }
                        c
                    }
                };
                let (chunks, hash, size) = cut;
                digests.insert(f.name.clone(), (hash, size));
                files.push(RemoteFile {
                    name: f.name.clone(),
                    size,
                    chunks,
                });
            }
            let sealed = p.seal(&digests)?;
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            views.push(View {
                bundle: text(&p.manifest),
                seal: text(&sealed.seal),
                signature: sealed.signature.as_deref().map(text),
                files,
            });
        }
        let incremental = match (views.len(), &opts.base) {
            (2, Some(b)) => views.pop().map(|view| Incremental {
                base: b.to_string(),
                view,
            }),
            _ => None,
        };
        let whole = views.pop().expect("the whole view");
        let manifest = RemoteManifest {
            format: FORMAT.into(),
            version: VERSION,
            name: name.to_string(),
            pushed_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            qsnap_version: env!("CARGO_PKG_VERSION").into(),
            whole,
            incremental,
        };
        manifest.check().map_err(|why| RemoteError::Corrupt {
            url: self.url().to_owned(),
            why: format!("qsnap made a manifest it would not read ({why}); this is a bug"),
        })?;
        let body = serde_json::to_vec(&manifest).expect("serializable");
        if body.len() as u64 > MANIFEST_LIMIT {
            return Err(RemoteError::Corrupt {
                url: self.url().to_owned(),
                why: format!(
                    "{name}'s manifest would be {} bytes, more than a pull reads ({MANIFEST_LIMIT}); nothing was written but chunks (gc removes them)",
                    body.len()
                ),
            });
        }
        if opts.cancel.is_cancelled() {
            return Err(RemoteError::Interrupted);
        }
        let put = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.store.put_opts(&key, PutPayload::from(body), put).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => return Err(self.exists(&name)),
            Err(e) => return Err(self.err(format!("writing the manifest of {name}"))(e)),
        }
        let mut sources = vec![(&manifest.whole, &parts.files)];
        if let (Some(i), Some(p)) = (&manifest.incremental, &inc_parts) {
            sources.push((&i.view, &p.files));
        }
        for (view, files) in sources {
            self.recheck(view, files).await?;
        }
        let (chunks, _) = manifest.distinct();
        let t = std::mem::take(&mut *tally.lock().expect("not poisoned"));
        Ok(PushReport {
            url: self.url().to_owned(),
            name: name.to_string(),
            files: manifest.whole.files.len(),
            size_bytes,
            chunks,
            uploaded_chunks: t.uploaded_chunks,
            uploaded_bytes: t.uploaded_bytes,
            deduplicated_chunks: t.deduplicated_chunks,
            deduplicated_bytes: t.deduplicated_bytes,
            signed: manifest.whole.signature.is_some(),
            notes: parts
                .notes
                .iter()
                .chain(inc_parts.iter().flat_map(|p| &p.notes))
                .cloned()
                .collect(),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn exists(&self, name: &RemoteName) -> RemoteError {
        RemoteError::Exists {
            url: self.url().to_owned(),
            name: name.to_string(),
        }
    }

    /// Cuts one file (on a blocking thread) and uploads its chunks as they come, at most
    /// `opts.parallel` at once. Returns the chunk list, the content hash and the size.
    async fn push_file(
        &self,
        path: &std::path::Path,
        delta_base: Option<&std::path::Path>,
        opts: &PushOptions,
        (tally, seen): (&Arc<Mutex<Tally>>, &Arc<Mutex<HashSet<String>>>),
        (done, total): (u64, u64),
    ) -> Result<(Vec<ChunkRef>, String, u64)> {
        // Small: `buffer_unordered` is the window of chunks in flight.
        let (tx, rx) = tokio::sync::mpsc::channel::<Cut>(2);
        let (p, base) = (path.to_owned(), delta_base.map(std::path::Path::to_owned));
        let cutter = tokio::task::spawn_blocking(move || {
            let send = |c| {
                tx.blocking_send(c)
                    .map_err(|_| std::io::Error::other("the upload stopped"))
            };
            match &base {
                Some(b) => chunk::cut_delta(&p, b, send),
                None => chunk::cut_file(&p, send),
            }
        });
        let progress = opts.progress.clone();
        let uploads =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .map(|cut| {
                    if let Some(p) = &progress {
                        p(done + cut.offset + cut.data.len() as u64, total);
                    }
                    self.put_chunk(path, cut, opts.refresh, tally, seen)
                })
                .buffer_unordered(opts.parallel.max(1));
        // Boxed, so that dropping it drops the receiver: a cutter blocked on a full channel
        // then stops.
        let mut uploads = Box::pin(uploads);
        let mut chunks = Vec::new();
        let mut failed = None;
        while let Some(r) = uploads.next().await {
            match r {
                Ok(c) => chunks.push(c),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(uploads);
        let cut = cutter.await.expect("the cutter does not panic");
        if let Some(e) = failed {
            return Err(e);
        }
        let (hash, size) = cut.map_err(|source| RemoteError::Io {
            what: "reading a snapshot file to push",
            path: path.to_owned(),
            source,
        })?;
        chunks.sort_by_key(|c: &ChunkRef| c.offset);
        Ok((chunks, hash, size))
    }

    /// One chunk: skipped when the store has it (and it is young), else put.
    async fn put_chunk(
        &self,
        path: &std::path::Path,
        cut: Cut,
        refresh: Duration,
        tally: &Arc<Mutex<Tally>>,
        seen: &Arc<Mutex<HashSet<String>>>,
    ) -> Result<ChunkRef> {
        let len = u32::try_from(cut.data.len()).expect("chunks are at most 8 MiB");
        let r = ChunkRef {
            offset: cut.offset,
            len,
            hash: cut.hash.clone(),
        };
        let first = seen.lock().expect("not poisoned").insert(cut.hash.clone());
        let key = self.chunk_key(&cut.hash);
        let have = first
            && match self.store.head(&key).await {
                Ok(meta) => SystemTime::from(meta.last_modified)
                    .elapsed()
                    .is_ok_and(|age| age < refresh),
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => return Err(self.err(format!("looking for chunk {}", cut.hash))(e)),
            };
        if !first || have {
            let mut t = tally.lock().expect("not poisoned");
            t.deduplicated_chunks += usize::from(first);
            t.deduplicated_bytes += if first { u64::from(len) } else { 0 };
            return Ok(r);
        }
        let data = cut.data;
        let stored = tokio::task::spawn_blocking(move || chunk::compress(&data))
            .await
            .expect("compression does not panic")
            .map_err(|source| RemoteError::Io {
                what: "compressing a chunk of",
                path: path.to_owned(),
                source,
            })?;
        let n = stored.len() as u64;
        self.store
            .put(&key, PutPayload::from(stored))
            .await
            .map_err(self.err(format!("uploading chunk {}", cut.hash)))?;
        let mut t = tally.lock().expect("not poisoned");
        t.uploaded_chunks += 1;
        t.uploaded_bytes += n;
        Ok(r)
    }

    /// After the manifest: every chunk it names is in the store, or is put again from the
    /// snapshot's file (still under the export's lock, so still the same bytes).
    async fn recheck(&self, view: &View, files: &[qsnap_engine::bundle::ExportPart]) -> Result<()> {
        let mut seen = HashSet::new();
        for (f, part) in view.files.iter().zip(files) {
            for c in &f.chunks {
                if !seen.insert(c.hash.clone()) {
                    continue;
                }
                let key = self.chunk_key(&c.hash);
                match self.store.head(&key).await {
                    Ok(_) => continue,
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.err(format!("looking for chunk {}", c.hash))(e)),
                }
                tracing::warn!(chunk = %c.hash, "a chunk went while the push ran (a gc); putting it again");
                let (path, c2) = (part.path.clone(), c.clone());
                let stored = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; c2.len as usize];
                    std::fs::File::open(&path)?.read_exact_at(&mut buf, c2.offset)?;
                    if blake3::hash(&buf).to_hex().as_str() != c2.hash {
                        return Err(std::io::Error::other(
                            "the file changed while it was pushed",
                        ));
                    }
                    chunk::compress(&buf)
                })
                .await
                .expect("no panic")
                .map_err(|source| RemoteError::Io {
                    what: "reading a chunk again from",
                    path: part.path.clone(),
                    source,
                })?;
                self.store
                    .put(&key, PutPayload::from(stored))
                    .await
                    .map_err(self.err(format!("uploading chunk {}", c.hash)))?;
            }
        }
        Ok(())
    }
}
